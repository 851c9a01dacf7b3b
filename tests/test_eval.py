"""Evaluation: metrics against hand-computed values, perplexity against a hand loop, the eval CLI."""

from __future__ import annotations

import math

import pytest

from lmforge.errors import ConfigError
from lmforge.evaluation.metrics import compute_metrics

PREDS = ["the cat sat on the mat", " the cat\n"]
REFS = ["the cat sat on the mat", "the cat sat"]


def test_rouge_matches_hand_computed():
    # pair 1 is identical (all 1.0). Pair 2 "the cat" vs "the cat sat":
    #   rouge1: P = 2/2, R = 2/3 -> F = 0.8;  rouge2: bigrams {the cat} vs {the cat, cat sat} -> F = 2/3;
    #   rougeL: LCS = 2 -> F = 0.8.
    m = compute_metrics(["rouge"], PREDS, REFS)
    assert m["rouge1"] == pytest.approx((1 + 0.8) / 2)
    assert m["rouge2"] == pytest.approx((1 + 2 / 3) / 2)
    assert m["rougeL"] == pytest.approx((1 + 0.8) / 2)
    assert m["rouge"] == m["rougeL"]


def test_bleu_matches_hand_computed():
    # every n-gram precision is 1 (8/8, 6/6, 4/4, 3/3); hypothesis length 8, reference length 9,
    # so BLEU = 100 * brevity penalty = 100 * exp(1 - 9/8).
    m = compute_metrics(["bleu"], PREDS, REFS)
    assert m["bleu"] == pytest.approx(100 * math.exp(1 - 9 / 8), abs=1e-4)


def test_exact_match_strips_whitespace():
    assert compute_metrics(["exact_match"], PREDS, REFS) == {"exact_match": 0.5}
    assert compute_metrics(["exact_match"], [" a\n", "b"], ["a", "b"]) == {"exact_match": 1.0}


def test_perplexity_is_left_to_evaluate_and_unknown_names_fail():
    assert compute_metrics(["perplexity"], PREDS, REFS) == {}
    with pytest.raises(ConfigError, match="rogue.*valid: perplexity, rouge, bleu, exact_match"):
        compute_metrics(["rogue"], PREDS, REFS)


# ------------------------------------------------------------------------------------------ with the tiny model
import json  # noqa: E402

import torch  # noqa: E402
from conftest import write_jsonl  # noqa: E402

from lmforge.cli import main  # noqa: E402

PC_ROWS = [{"prompt": "the quick brown", "completion": " fox jumps"},
           {"prompt": "alpha beta", "completion": " gamma delta over a lazy dog"},
           {"prompt": "name", "completion": " json"}]


def _hand_perplexity(model_dir, rows) -> tuple[float, int]:
    """Completion tokens (and the EOS after them) only, one row at a time, written out by hand."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    nll, count = 0.0, 0
    for row in rows:
        p = tok(row["prompt"], add_special_tokens=False).input_ids
        c = tok(row["completion"], add_special_tokens=False).input_ids + [tok.eos_token_id]
        ids = torch.tensor([p + c])
        with torch.no_grad():
            logp = torch.log_softmax(model(ids).logits[0].float(), -1)
        for t in range(len(p), len(p) + len(c)):
            nll -= logp[t - 1, ids[0, t]].item()
            count += 1
    return math.exp(nll / count), count


def test_cli_perplexity_counts_completion_tokens_only(tmp_path, tiny_model_dir, capsys):
    data = write_jsonl(tmp_path / "val.jsonl", PC_ROWS)
    report = tmp_path / "report.json"
    assert main(["eval", "--model", str(tiny_model_dir), "--data", str(data), "--dtype", "float32",
                 "--batch-size", "2", "--output", str(report)]) == 0
    got = json.loads(report.read_text())["metrics"]
    ppl, count = _hand_perplexity(tiny_model_dir, PC_ROWS)
    assert got["tokens"] == count
    assert got["perplexity"] == pytest.approx(ppl, rel=1e-4)
    assert "perplexity" in capsys.readouterr().out


def test_cli_generation_metrics_against_known_predictions(tmp_path, tiny_model_dir):
    from lmforge.inference.generate import GenerationOptions, Generator, encode_prompt
    from lmforge.inference.loading import load_for_inference

    loaded = load_for_inference(str(tiny_model_dir), dtype="float32")
    prompts = ["the quick brown", "alpha beta", "name", "seven wizards"]
    preds = [c.text for c in Generator(loaded).generate(
        [encode_prompt({"prompt": p}, loaded.tokenizer) for p in prompts], GenerationOptions(max_new_tokens=6))]
    # two rows whose reference is exactly what the model says, two it cannot match
    refs = [preds[0], preds[1], "zzz unmatched", "qqq unmatched"]
    data = write_jsonl(tmp_path / "val.jsonl", [{"prompt": p, "completion": r} for p, r in zip(prompts, refs)])
    report = tmp_path / "r.json"
    assert main(["eval", "--model", str(tiny_model_dir), "--data", str(data), "--dtype", "float32",
                 "--metrics", "exact_match,rouge,bleu", "--max-new-tokens", "6", "--output", str(report)]) == 0
    out = json.loads(report.read_text())
    assert [s["prediction"] for s in out["samples"]] == preds
    assert out["metrics"]["exact_match"] == 0.5
    assert out["metrics"] == pytest.approx(compute_metrics(["exact_match", "rouge", "bleu"], preds, refs))


def test_cli_eval_errors(tmp_path, tiny_model_dir, capsys):
    data = write_jsonl(tmp_path / "val.jsonl", [PC_ROWS[0], {"prompt": "x"}])
    assert main(["eval", "--model", str(tiny_model_dir), "--data", str(data)]) == 2
    assert "val.jsonl:2: missing key 'completion'" in capsys.readouterr().err
    assert main(["eval", "--model", str(tiny_model_dir), "--data", str(data), "--metrics", "perplexity,blue"]) == 2
    assert "--metrics: unknown metric(s) 'blue'" in capsys.readouterr().err
    import importlib.util

    if importlib.util.find_spec("lm_eval") is None:
        assert main(["eval", "--model", str(tiny_model_dir), "--tasks", "hellaswag"]) == 2
        assert "lm-eval-harness is not installed" in capsys.readouterr().err
