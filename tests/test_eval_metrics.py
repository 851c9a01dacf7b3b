"""Generation metrics during training: logged as eval_rouge/eval_bleu/eval_exact_match, equal to metrics
computed by hand on the same generations, and continuing without duplicates across a resume."""

from __future__ import annotations

import json

import pytest
from conftest import base_config, chat_rows, write_config, write_jsonl

from lmforge.cli import main
from lmforge.training.eval_metrics import GenerationSample, GenerationScorer


def test_toy_scores_equal_hand_computed(monkeypatch):
    """Two fixed generations vs references; ROUGE-1/L, BLEU and exact match worked out by hand."""
    import lmforge.training.eval_metrics as em

    preds = ["the cat sat on the mat", "a dog"]
    refs = ["the cat sat on the mat", "a red dog barks"]
    monkeypatch.setattr(em, "generate_completions", lambda *a, **k: list(preds))
    samples = [GenerationSample([1, 2], r) for r in refs]
    cb = GenerationScorer(None, samples, ["rouge", "bleu", "exact_match"], 8, batch_size=2)

    class _Model:
        training = True

        def eval(self):
            self.training = False

        def train(self, mode=True):
            self.training = mode

    model = _Model()
    scores = cb.score(model)
    assert model.training  # restored after generating
    # pair 2: unigrams {a, dog} vs {a, red, dog, barks}: P = 2/2, R = 2/4, F1 = 2PR/(P+R) = 2/3
    assert scores["eval_rouge1"] == pytest.approx((1.0 + 2 / 3) / 2, abs=1e-6)
    # LCS("a dog", "a red dog barks") = 2 tokens: the same F1 as ROUGE-1 here
    assert scores["eval_rougeL"] == pytest.approx((1.0 + 2 / 3) / 2, abs=1e-6)
    # bigrams: pair 1 all 5 match (F1 1); pair 2 "a dog" is not a bigram of the reference (F1 0)
    assert scores["eval_rouge2"] == pytest.approx(0.5, abs=1e-6)
    assert scores["eval_exact_match"] == pytest.approx(0.5)
    # corpus BLEU: precisions 1-gram 8/8, 2-gram 5/6, 3-gram 4/4, 4-gram 3/3 (8 hypothesis tokens,
    # 10 reference tokens): brevity penalty exp(1 - 10/8)
    import math

    p = [8 / 8, 5 / 6, 4 / 4, 3 / 3]
    bleu = 100 * math.exp(1 - 10 / 8) * math.exp(sum(math.log(x) for x in p) / 4)
    assert scores["eval_bleu"] == pytest.approx(bleu, abs=1e-3)


def _rows(path, n, seed):
    return write_jsonl(path, chat_rows(n, seed))


def test_causal_run_logs_generation_metrics_and_resume_continues(tmp_path, tiny_model_dir, lmforge_cache):
    train = _rows(tmp_path / "train.jsonl", 16, 0)
    val = _rows(tmp_path / "val.jsonl", 6, 1)
    out = tmp_path / "run"
    tree = base_config(tiny_model_dir, train, out, peft={"kind": "lora", "r": 4, "alpha": 8},
                       eval={"metrics": ["rouge", "bleu", "exact_match"], "max_new_tokens": 8, "max_samples": 4})
    tree["data"]["eval"] = [{"path": str(val)}]
    tree["train"].update(eval_steps=2, save_steps=2)
    cfg = write_config(tmp_path / "cfg.yaml", tree)
    assert main(["train", str(cfg)]) == 0
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    gen = [r for r in rows if "eval_rouge" in r]
    assert [r["step"] for r in gen] == [2, 4]
    for r in gen:
        assert 0.0 <= r["eval_rouge"] <= 1.0 and 0.0 <= r["eval_bleu"] <= 100.0
        assert r["eval_exact_match"] in (0.0, 0.25, 0.5, 0.75, 1.0)

    assert main(["train", str(cfg), "train.max_steps=6"]) == 0  # resumes from checkpoint-4
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    gen_after = [r for r in rows if "eval_rouge" in r]
    assert [r["step"] for r in gen_after] == [2, 4, 6]
    assert gen_after[:2] == gen  # the first run's curve is kept as it was


def test_unknown_eval_metric_is_a_config_error(tmp_path, tiny_model_dir, lmforge_cache, capsys):
    train = _rows(tmp_path / "train.jsonl", 8, 0)
    tree = base_config(tiny_model_dir, train, tmp_path / "run", eval={"metrics": ["rougee"]})
    tree["data"]["eval"] = [{"path": str(train)}]
    assert main(["train", str(write_config(tmp_path / "cfg.yaml", tree))]) == 2
    assert "eval.metrics" in capsys.readouterr().err
