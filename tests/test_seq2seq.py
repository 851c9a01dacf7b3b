"""Encoder-decoder SFT: a tiny T5 trains on input/output rows through `lmforge train`, evaluates by generating
and logs eval_rouge / eval_bleu / eval_exact_match to metrics.jsonl; the saved model reloads and generates."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from conftest import WORDS, base_config, write_config, write_jsonl

from lmforge.cli import main
from lmforge.evaluation.metrics import compute_metrics
from lmforge.methods.seq2seq import metrics_fn


@pytest.fixture(scope="module")
def tiny_t5_dir(tmp_path_factory, tiny_tokenizer_dir):
    from transformers import AutoTokenizer, T5Config, T5ForConditionalGeneration

    from lmforge.models import finalize_tokenizer

    tok = finalize_tokenizer(AutoTokenizer.from_pretrained(tiny_tokenizer_dir))
    cfg = T5Config(vocab_size=len(tok), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2,
                   num_heads=4, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                   decoder_start_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("tiny-t5")
    T5ForConditionalGeneration(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def copy_rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 5)))
        rows.append({"input": f"copy: {words}", "output": words})
    return rows


def test_metrics_fn_decodes_generations_and_labels(tiny_tokenizer_dir):
    """-100 padding in generations and labels is dropped before scoring; scores equal direct computation."""
    from transformers import AutoTokenizer
    from transformers.trainer_utils import EvalPrediction

    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    pred_texts, ref_texts = ["the quick fox", "a dog"], ["the quick fox", "a lazy dog"]
    enc = lambda texts: [tok(t, add_special_tokens=False).input_ids for t in texts]  # noqa: E731

    def padded(seqs):
        width = max(map(len, seqs)) + 2
        return np.array([s + [-100] * (width - len(s)) for s in seqs])

    scores = metrics_fn(tok, ["rouge", "bleu", "exact_match"])(
        EvalPrediction(predictions=padded(enc(pred_texts)), label_ids=padded(enc(ref_texts))))
    assert scores == pytest.approx(compute_metrics(["rouge", "bleu", "exact_match"], pred_texts, ref_texts))
    assert scores["exact_match"] == 0.5
    assert scores["rouge1"] == pytest.approx((1 + 2 * (1.0 * 2 / 3) / (1.0 + 2 / 3)) / 2)  # pair 2: P 1, R 2/3


def test_tiny_t5_trains_and_logs_generation_metrics(tmp_path, tiny_t5_dir, lmforge_cache):
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    train = write_jsonl(tmp_path / "train.jsonl", copy_rows(32, 0))
    val = write_jsonl(tmp_path / "val.jsonl", copy_rows(6, 1))
    out = tmp_path / "run"
    tree = base_config(tiny_t5_dir, train, out, eval={"metrics": ["rouge", "bleu", "exact_match"],
                                                      "max_new_tokens": 8, "max_samples": 4})
    tree["data"]["eval"] = [{"path": str(val)}]
    tree["train"].update(max_steps=6, eval_steps=3, save_steps=3, learning_rate=3e-3)
    assert main(["train", str(write_config(tmp_path / "cfg.yaml", tree))]) == 0

    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "eval_loss" in r]
    assert [r["step"] for r in evals] == [3, 6]
    for r in evals:
        assert 0 <= r["eval_rouge"] <= 1 and 0 <= r["eval_bleu"] <= 100 and 0 <= r["eval_exact_match"] <= 1
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 6 and all(np.isfinite(losses))
    assert (out / "checkpoint-6" / "trainer_state.json").exists()

    model = AutoModelForSeq2SeqLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    ids = tok("copy: the fox", return_tensors="pt").input_ids
    gen = model.generate(input_ids=ids, max_new_tokens=4, do_sample=False)
    assert gen.shape[0] == 1 and gen.shape[1] >= 2


def test_t5_with_lora_saves_a_seq2seq_adapter(tmp_path, tiny_t5_dir, lmforge_cache):
    from peft import AutoPeftModelForSeq2SeqLM

    train = write_jsonl(tmp_path / "train.jsonl", copy_rows(16, 0))
    out = tmp_path / "run"
    tree = base_config(tiny_t5_dir, train, out, peft={"kind": "lora", "r": 4, "alpha": 8})
    assert main(["train", str(write_config(tmp_path / "cfg.yaml", tree))]) == 0
    assert '"task_type": "SEQ_2_SEQ_LM"' in (out / "adapter_config.json").read_text()
    model = AutoPeftModelForSeq2SeqLM.from_pretrained(out)
    assert any("lora_B" in n and p.abs().sum() > 0 for n, p in model.named_parameters())


def test_chat_rows_on_t5_are_a_data_error(tmp_path, tiny_t5_dir, lmforge_cache, capsys):
    from conftest import chat_rows

    train = write_jsonl(tmp_path / "train.jsonl", chat_rows(4))
    tree = base_config(tiny_t5_dir, train, tmp_path / "run")
    assert main(["train", str(write_config(tmp_path / "cfg.yaml", tree))]) == 2
    assert "input/output" in capsys.readouterr().err


def test_t5_from_model_config_trains_from_scratch(tmp_path, tiny_tokenizer_dir, lmforge_cache):
    from transformers import AutoModelForSeq2SeqLM

    train = write_jsonl(tmp_path / "train.jsonl", copy_rows(8, 0))
    out = tmp_path / "run"
    tree = base_config(tiny_tokenizer_dir, train, out)
    tree["model"] = {"config": {"model_type": "t5", "d_model": 32, "d_kv": 8, "d_ff": 64, "num_layers": 1,
                                "num_heads": 2}, "tokenizer": str(tiny_tokenizer_dir), "dtype": "float32"}
    tree["train"].update(max_steps=2, save_steps=2)
    assert main(["train", str(write_config(tmp_path / "cfg.yaml", tree))]) == 0
    model = AutoModelForSeq2SeqLM.from_pretrained(out)
    assert model.config.model_type == "t5" and model.config.d_model == 32
    assert model.config.decoder_start_token_id is not None


def test_generate_cli_on_t5_equals_plain_transformers(tmp_path, tiny_t5_dir):
    """Encoder-decoder models go through transformers generate (static batches): same text, one at a time."""
    from transformers import AutoTokenizer, T5ForConditionalGeneration

    prompts = [{"prompt": r["input"]} for r in copy_rows(5, 3)]
    inp = write_jsonl(tmp_path / "in.jsonl", prompts)
    out = tmp_path / "out.jsonl"
    assert main(["generate", "--model", str(tiny_t5_dir), "--input", str(inp), "--output", str(out),
                 "--max-new-tokens", "8", "--dtype", "float32", "--batch-size", "2", "--no-progress"]) == 0
    got = [json.loads(line) for line in out.read_text().splitlines()]
    tok = AutoTokenizer.from_pretrained(tiny_t5_dir)
    model = T5ForConditionalGeneration.from_pretrained(tiny_t5_dir).eval()
    for row, result in zip(prompts, got):
        ids = tok(row["prompt"], return_tensors="pt").input_ids
        want = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False)
        assert result["completion"] == tok.decode(want[0], skip_special_tokens=True)
        assert 1 <= result["completion_tokens"] <= 8


# ----------------------------------------------------------------------------------- the shared data layer
def _two_sources(tmp_path, n_a=40, n_b=40):
    a = write_jsonl(tmp_path / "a.jsonl", [{"input": f"copy: alpha {r['output']}", "output": f"alpha {r['output']}"}
                                           for r in copy_rows(n_a, 0)])
    b = write_jsonl(tmp_path / "b.jsonl", [{"input": f"copy: beta {r['output']}", "output": f"beta {r['output']}"}
                                           for r in copy_rows(n_b, 1)])
    return a, b


def test_seq2seq_sources_mix_by_weight_and_num_samples(tmp_path, tiny_t5_dir, lmforge_cache):
    """Two weighted sources are drawn 3:1 within sampling error, data.num_samples rows in all, each target the
    completion of its own input (what encode_split, and so train, gets from prepare_split)."""
    from transformers import AutoTokenizer

    from lmforge.config import load_config
    from lmforge.methods.seq2seq import encode_split

    a, b = _two_sources(tmp_path)
    tree = base_config(tiny_t5_dir, a, tmp_path / "run", data={"num_samples": 400})
    tree["data"]["train"] = [{"path": str(a), "weight": 3.0}, {"path": str(b), "weight": 1.0}]
    tok = AutoTokenizer.from_pretrained(tiny_t5_dir)
    ds, stats = encode_split(load_config(None, tree=tree), tok, "train")
    assert len(ds) == 400 and stats.samples == 400 and sorted(ds.column_names) == ["input_ids", "labels"]
    cols = ds.to_dict()
    inputs = tok.batch_decode(cols["input_ids"], skip_special_tokens=True)
    targets = tok.batch_decode(cols["labels"], skip_special_tokens=True)
    assert all(i.replace(" ", "") == "copy:" + t.replace(" ", "") for i, t in zip(inputs, targets))
    share = sum(t.replace(" ", "").startswith("alpha") for t in targets) / 400
    assert abs(share - 0.75) < 4 * (0.75 * 0.25 / 400) ** 0.5, share
    assert stats.loss_tokens == sum(map(len, cols["labels"]))
    assert stats.tokens == stats.loss_tokens + sum(map(len, cols["input_ids"]))


def test_seq2seq_prepare_inspect_and_train_share_one_cache(tmp_path, tiny_t5_dir, lmforge_cache, capsys):
    """`lmforge prepare` prints the input/target counts and caches them; `inspect` shows input and marked target;
    `train` reuses that cache entry instead of tokenising again."""
    a, b = _two_sources(tmp_path, 6, 3)
    tree = base_config(tiny_t5_dir, a, tmp_path / "run")
    tree["data"]["train"] = [{"path": str(a)}, {"path": str(b)}]
    tree["train"].update(max_steps=1, save_steps=1)
    cfg = str(write_config(tmp_path / "cfg.yaml", tree))
    assert main(["prepare", cfg]) == 0
    out = capsys.readouterr().out
    assert "samples (input/target pairs): 9" in out and "target tokens (all carry loss)" in out
    cached = [p for p in lmforge_cache.rglob("stats.json")]
    assert len(cached) == 1
    (cached[0].parent / "marker").write_text("x")

    assert main(["inspect", cfg, "--n", "9"]) == 0
    out = capsys.readouterr().out
    assert "input/target pairs" in out and "input:  copy: alpha" in out and "target: [[alpha" in out

    assert main(["train", cfg]) == 0
    assert "samples (input/target pairs): 9" in capsys.readouterr().out
    assert [p for p in lmforge_cache.rglob("stats.json")] == cached and (cached[0].parent / "marker").exists()


def test_seq2seq_refuses_apply_chat_template(tmp_path, tiny_t5_dir, lmforge_cache, capsys):
    """An encoder-decoder has no chat template to apply: the key is refused, not ignored."""
    train = write_jsonl(tmp_path / "train.jsonl", copy_rows(4, 0))
    tree = base_config(tiny_t5_dir, train, tmp_path / "run", data={"apply_chat_template": True})
    assert main(["train", str(write_config(tmp_path / "cfg.yaml", tree))]) == 2
    assert "data.apply_chat_template" in capsys.readouterr().err


def test_packing_true_is_refused_for_an_encoder_decoder_and_for_preference_methods(tmp_path, tiny_t5_dir,
                                                                                   tiny_model_dir, capsys):
    """data.packing: true is never accepted and ignored: a T5 trains one row per sample, and so does DPO."""
    train = write_jsonl(tmp_path / "train.jsonl", [{"prompt": f"q {i}", "completion": f"a {i}"} for i in range(4)])
    cfg = write_config(tmp_path / "t5.yaml", base_config(tiny_t5_dir, train, tmp_path / "t5", data={"packing": True}))
    assert main(["train", str(cfg)]) == 2
    assert "data.packing: true: an encoder-decoder model trains on one row per sample" in capsys.readouterr().err
    cfg = write_config(tmp_path / "dpo.yaml", base_config(tiny_model_dir, train, tmp_path / "dpo", method="dpo",
                                                          data={"packing": True}))
    assert main(["train", str(cfg)]) == 2
    assert "data.packing: true: method dpo trains on one row per sample" in capsys.readouterr().err
