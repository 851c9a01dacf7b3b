"""Masked-LM pretraining: a tiny BERT lowers its loss through `lmforge train` (method mlm, and method pretrain
dispatching on an encoder-only model); masking follows data.mlm_probability; misuse is a clear error."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import base_config, corpus, write_config, write_jsonl

from lmforge.cli import main


@pytest.fixture(scope="module")
def tiny_bert_dir(tmp_path_factory):
    """A 2-layer BERT (hidden 32) with a WordPiece tokenizer trained on the fly."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import BertConfig, BertForMaskedLM, PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tk = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tk.normalizer = normalizers.BertNormalizer(lowercase=True)
    tk.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tk.train_from_iterator(corpus(), trainers.WordPieceTrainer(vocab_size=300, special_tokens=specials,
                                                               show_progress=False))
    tk.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", tk.token_to_id("[CLS]")), ("[SEP]", tk.token_to_id("[SEP]"))])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                  sep_token="[SEP]", mask_token="[MASK]")
    cfg = BertConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=4, max_position_embeddings=128, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("tiny-bert")
    BertForMaskedLM(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def _texts(tmp_path, n=64):
    return write_jsonl(tmp_path / "text.jsonl", [{"text": t} for t in corpus(n, seed=3)[:n]])


def test_tiny_bert_mlm_lowers_its_loss(tmp_path, tiny_bert_dir, lmforge_cache):
    from transformers import AutoModelForMaskedLM

    data = _texts(tmp_path)
    out = tmp_path / "run"
    tree = base_config(tiny_bert_dir, data, out, method="mlm", data={"mlm_probability": 0.3})
    tree["data"]["eval"] = [{"path": str(data)}]
    tree["train"].update(max_steps=24, logging_steps=4, save_steps=24, eval_steps=24, learning_rate=3e-3,
                         per_device_train_batch_size=8)
    assert main(["train", str(write_config(tmp_path / "cfg.yaml", tree))]) == 0
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert losses[-1] < 0.8 * losses[0], losses  # from ~ln(300) = 5.7 at init
    assert any("eval_loss" in r for r in rows)
    assert AutoModelForMaskedLM.from_pretrained(out).config.model_type == "bert"


def test_pretrain_on_an_encoder_only_model_runs_masked_lm(tmp_path, tiny_bert_dir, lmforge_cache):
    from transformers import AutoModelForMaskedLM

    out = tmp_path / "run"
    tree = base_config(tiny_bert_dir, _texts(tmp_path, 16), out, method="pretrain")
    tree["train"].update(max_steps=2, save_steps=2)
    assert main(["train", str(write_config(tmp_path / "cfg.yaml", tree))]) == 0
    before = AutoModelForMaskedLM.from_pretrained(tiny_bert_dir).state_dict()
    after = AutoModelForMaskedLM.from_pretrained(out).state_dict()
    assert not torch.equal(before["cls.predictions.transform.dense.weight"],
                           after["cls.predictions.transform.dense.weight"])  # the MLM head trained


def test_masking_follows_mlm_probability(tiny_bert_dir):
    """The collator lmforge uses masks about data.mlm_probability of the non-special tokens."""
    from transformers import AutoTokenizer, DataCollatorForLanguageModeling

    tok = AutoTokenizer.from_pretrained(tiny_bert_dir)
    torch.manual_seed(0)
    rows = [{"input_ids": tok(t).input_ids} for t in corpus(200, seed=1)[:200]]
    for p in (0.15, 0.4):
        batch = DataCollatorForLanguageModeling(tok, mlm=True, mlm_probability=p)(rows)
        masked = batch["labels"] != -100
        real = (batch["attention_mask"] == 1).sum() - 2 * len(rows)  # minus [CLS] and [SEP]
        assert abs(float(masked.sum()) / float(real) - p) < 0.03
        specials = torch.tensor([tok.cls_token_id, tok.sep_token_id, tok.pad_token_id])
        assert not torch.isin(batch["labels"][masked], specials).any()  # special tokens are never masked


def test_sft_on_an_encoder_only_model_is_unsupported(tmp_path, tiny_bert_dir, lmforge_cache, capsys):
    tree = base_config(tiny_bert_dir, _texts(tmp_path, 8), tmp_path / "run")
    assert main(["train", str(write_config(tmp_path / "cfg.yaml", tree))]) == 2
    assert "encoder-only" in capsys.readouterr().err


def test_mlm_on_a_causal_model_is_unsupported(tmp_path, tiny_model_dir, lmforge_cache, capsys):
    tree = base_config(tiny_model_dir, _texts(tmp_path, 8), tmp_path / "run", method="mlm")
    assert main(["train", str(write_config(tmp_path / "cfg.yaml", tree))]) == 2
    assert "encoder-only" in capsys.readouterr().err


# ----------------------------------------------------------------------------------- the shared data layer
def _sources(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [{"text": f"alpha {t}"} for t in corpus(60, seed=4)[:60]])
    b = write_jsonl(tmp_path / "b.jsonl", [{"text": f"beta {t}"} for t in corpus(60, seed=5)[:60]])
    return a, b


def test_mlm_sources_mix_by_weight_and_num_samples(tmp_path, tiny_bert_dir, lmforge_cache):
    """Two weighted text sources are drawn 1:3 within sampling error, data.num_samples documents in all, each a
    block framed by [CLS] ... [SEP] (what encode_texts, and so train, gets from prepare_split)."""
    from transformers import AutoTokenizer

    from lmforge.config import load_config
    from lmforge.methods.mlm import encode_texts

    a, b = _sources(tmp_path)
    tree = base_config(tiny_bert_dir, a, tmp_path / "run", method="mlm", data={"num_samples": 400})
    tree["data"]["train"] = [{"path": str(a), "weight": 1.0}, {"path": str(b), "weight": 3.0}]
    tok = AutoTokenizer.from_pretrained(tiny_bert_dir)
    ds, stats = encode_texts(load_config(None, tree=tree), tok, "train")
    blocks = ds.to_dict()["input_ids"]
    assert ds.column_names == ["input_ids"] and len(blocks) == 400 == stats.samples  # texts shorter than 128
    assert all(x[0] == tok.cls_token_id and x[-1] == tok.sep_token_id for x in blocks)
    share = sum(tok.decode(x[1:2]) == "beta" for x in blocks) / 400
    assert abs(share - 0.75) < 4 * (0.75 * 0.25 / 400) ** 0.5, share
    assert stats.tokens == sum(map(len, blocks)) and stats.loss_tokens == stats.tokens - 2 * 400


def test_mlm_prepare_inspect_and_train_share_one_cache(tmp_path, tiny_bert_dir, lmforge_cache, capsys):
    """`lmforge prepare` prints the text-block counts and caches them; `inspect` shows the blocks with the maskable
    tokens marked (which are masked is drawn each step); `train` reuses that cache entry; long texts are split."""
    long_text = " ".join(corpus(40, seed=6)[:40])
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": "the quick fox"}, {"text": long_text}])
    tree = base_config(tiny_bert_dir, data, tmp_path / "run", method="mlm")
    tree["train"].update(max_steps=1, save_steps=1)
    cfg = str(write_config(tmp_path / "cfg.yaml", tree))
    assert main(["prepare", cfg]) == 0
    out = capsys.readouterr().out
    assert "samples (text blocks):" in out and "maskable tokens:" in out
    assert "long documents split into max_length pieces: 1" in out
    cached = [p for p in lmforge_cache.rglob("stats.json")]
    assert len(cached) == 1
    (cached[0].parent / "marker").write_text("x")

    assert main(["inspect", cfg, "--n", "1"]) == 0
    out = capsys.readouterr().out
    assert "text blocks; each step masks a random data.mlm_probability (0.15)" in out
    assert "[CLS][[the quick fox]][SEP]" in out and "5 tokens, 3 maskable" in out

    assert main(["train", cfg]) == 0
    assert "samples (text blocks):" in capsys.readouterr().out
    assert [p for p in lmforge_cache.rglob("stats.json")] == cached and (cached[0].parent / "marker").exists()
