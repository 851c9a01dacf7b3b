"""Nothing accepted and ignored, nothing replaced without a word (issue 12, "Silent fallbacks").

Each test here failed before its fix: HF keys accepted and ignored, keywords dropped on the way to
TrainingArguments, names checked only after the model loaded, learning_rate 0 replaced by the default,
invalid UTF-8 trained as U+FFFD, data.num_samples ignored for one source, silent attention and LM-head
fallbacks, and model.train_tokenizer without the special tokens masked LM needs (retrained on every call).
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
import torch
import yaml
from conftest import base_config, chat_rows, corpus, write_config, write_jsonl

from lmforge.cli import main
from lmforge.config import load_config
from lmforge.errors import ConfigError, DataError

MIN = {"model": {"name_or_path": "x"}, "data": {"train": [{"path": "d.jsonl"}]}}


def _tree(**train):
    tree = yaml.safe_load(yaml.safe_dump(MIN))
    tree["train"] = train
    return tree


def _metrics(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


# ------------------------------------------------------------------------------ HF keys: honoured or refused
@pytest.mark.parametrize("key, value, hint", [
    ("bf16", True, "model.dtype: bfloat16"), ("fp16", True, "model.dtype: float16"),
    ("do_train", True, "always trains"), ("do_eval", False, "eval_strategy: no"),
    ("save_strategy", "epoch", "save_steps"), ("eval_strategy", "epoch", "eval_steps"),
    ("evaluation_strategy", "epoch", "eval_steps"),
])
def test_hf_keys_without_a_meaning_here_are_refused_with_the_reason(key, value, hint):
    with pytest.raises(ConfigError) as e:
        load_config(None, tree=_tree(**{key: value}))
    assert "train." in str(e.value) and hint in str(e.value)


def test_refused_key_exits_2_from_the_cli(tmp_path, capsys):
    path = write_config(tmp_path / "c.yaml", yaml.safe_load(yaml.safe_dump(MIN)))
    assert main(["train", str(path), "train.bf16=true"]) == 2
    assert "train.bf16" in capsys.readouterr().err


def test_save_and_eval_strategy_no_read_from_plain_yaml(tmp_path):
    path = tmp_path / "c.yaml"  # YAML 1.1 reads an unquoted no as false
    path.write_text(yaml.safe_dump(MIN) + "train:\n  save_strategy: no\n  evaluation_strategy: no\n")
    cfg = load_config(path)
    assert cfg.train.save_strategy == "no" and cfg.train.eval_strategy == "no"
    assert load_config(None, tree=_tree()).train.save_strategy == "steps"


@pytest.mark.parametrize("engine", ["native", "hf"])
def test_save_strategy_no_saves_only_the_final_model_and_eval_strategy_no_skips_eval(
        tmp_path, tiny_model_dir, lmforge_cache, engine):
    data = write_jsonl(tmp_path / "d" / "train.jsonl", chat_rows(16))
    write_jsonl(tmp_path / "d" / "val.jsonl", chat_rows(4, seed=5))
    out = tmp_path / "out"
    tree = base_config(tiny_model_dir, data.parent, out, train={
        "engine": engine, "max_steps": 2, "save_steps": 1, "eval_steps": 1, "save_strategy": "no",
        "eval_strategy": "no"})
    assert main(["train", str(write_config(tmp_path / "c.yaml", tree))]) == 0
    assert (out / "model.safetensors").exists()
    assert not list(out.glob("checkpoint-*"))
    assert not any("eval_loss" in r for r in _metrics(out))


def test_training_args_refuses_a_keyword_the_class_lacks(tmp_path):
    from lmforge.training.run import precision_for, training_args

    cfg = load_config(None, tree=_tree(output_dir=str(tmp_path)))
    with pytest.raises(TypeError, match="no_such_field"):
        training_args(cfg, precision_for(cfg), has_eval=False, no_such_field=1)
    args = training_args(cfg, precision_for(cfg), has_eval=True)
    assert args.save_strategy == "steps" and args.eval_strategy == "steps"
    cfg = load_config(None, tree=_tree(output_dir=str(tmp_path), save_strategy="no", eval_strategy="no"))
    args = training_args(cfg, precision_for(cfg), has_eval=True)
    assert args.save_strategy == "no" and args.eval_strategy == "no"


# ------------------------------------------------------------------------------ names checked at load
@pytest.mark.parametrize("key, value, suggestion", [
    ("optim", "adamw_torhc", "adamw_torch"), ("lr_scheduler_type", "cosin", "cosine"),
    ("report_to", ["tensorbaord"], "tensorboard"),
])
def test_optimizer_schedule_and_tracker_names_are_checked_at_load(key, value, suggestion):
    with pytest.raises(ConfigError) as e:
        load_config(None, tree=_tree(**{key: value}))
    assert f"train.{key}" in str(e.value) and f"did you mean {suggestion!r}" in str(e.value)


def test_valid_names_load():
    cfg = load_config(None, tree=_tree(optim="lamb", lr_scheduler_type="warmup_stable_decay",
                                       report_to=["wandb", "mlflow"]))
    assert cfg.train.optim == "lamb"


def test_known_names_exist_in_the_installed_transformers():
    """The lists config.py checks against without importing transformers are transformers' own."""
    from lmforge.config import installed_hf_names
    from lmforge.registry import HF_OPTIMIZERS, HF_SCHEDULERS, HF_TRACKERS

    assert set(HF_OPTIMIZERS) <= set(installed_hf_names("optim"))
    assert set(HF_SCHEDULERS) <= set(installed_hf_names("lr_scheduler_type"))
    assert set(HF_TRACKERS) <= set(installed_hf_names("report_to"))


# ------------------------------------------------------------------------------ learning_rate 0
def test_learning_rate_zero_means_zero():
    from lmforge.training.optim import default_learning_rate

    assert default_learning_rate(load_config(None, tree=_tree(learning_rate=0))) == 0.0
    assert default_learning_rate(load_config(None, tree=_tree())) == 2e-5  # unset: the method default
    with pytest.raises(ConfigError, match="train.learning_rate"):
        load_config(None, tree=_tree(learning_rate=-1e-4))


@pytest.mark.parametrize("optim", ["adamw_torch", "lamb"])
def test_learning_rate_zero_leaves_the_weights(tmp_path, tiny_model_dir, lmforge_cache, optim):
    from safetensors.torch import load_file

    data = write_jsonl(tmp_path / "t.jsonl", chat_rows(8))
    out = tmp_path / "out"
    tree = base_config(tiny_model_dir, data, out, train={"engine": "native", "max_steps": 1, "save_steps": 10,
                                                         "learning_rate": 0, "optim": optim})
    assert main(["train", str(write_config(tmp_path / "c.yaml", tree))]) == 0
    before, after = load_file(tiny_model_dir / "model.safetensors"), load_file(out / "model.safetensors")
    assert all(torch.equal(before[k], after[k]) for k in before)


# ------------------------------------------------------------------------------ data
def _cfg(tmp_path, path, **data):
    tree = {"method": "pretrain", "model": {"name_or_path": "x"}, "data": {"train": [{"path": str(path)}], **data},
            "train": {"output_dir": str(tmp_path / "out"), "seed": 0}}
    return load_config(None, tree=tree)


def test_invalid_utf8_in_a_jsonl_line_is_a_bad_row(tmp_path):
    from lmforge.data.prepare import load_rows

    path = tmp_path / "t.jsonl"
    path.write_bytes(b'{"text": "fine"}\n{"text": "caf\xe9 latin-1"}\n{"text": "caf\xc3\xa9 utf-8"}\n')
    with pytest.raises(DataError) as e:
        load_rows(_cfg(tmp_path, path), "train")
    assert f"{path}:2" in str(e.value) and "UTF-8" in str(e.value)
    per_source, bad, _ = load_rows(_cfg(tmp_path, path, on_bad_rows="skip"), "train")
    assert [b.origin for b in bad] == [f"{path}:2"]
    assert [r.data["text"] for r in per_source[0][1]] == ["fine", "café utf-8"]


def test_invalid_utf8_in_json_and_csv_rows_is_a_bad_row(tmp_path):
    from lmforge.data.sources import read_source

    (tmp_path / "a.json").write_bytes(b'[{"text": "ok"},\n {"text": "bad \xff"}]')
    (tmp_path / "b.csv").write_bytes(b'text\nok\nbad \xfe\n')
    for name, origin in (("a.json", "row 2"), ("b.csv", "3")):
        rows, bad = read_source(_cfg(tmp_path, tmp_path / name).data.train[0], "train")
        assert len(rows) == 1 and [b.origin for b in bad] == [f"{tmp_path / name}:{origin}"]


@pytest.mark.parametrize("n", [5, 30])
def test_num_samples_is_honoured_for_a_single_source(tmp_path, tiny_tokenizer_dir, lmforge_cache, n):
    from transformers import AutoTokenizer

    from lmforge.data.split import prepare_split

    path = write_jsonl(tmp_path / "t.jsonl", chat_rows(12))
    tree = {"method": "sft", "model": {"name_or_path": "x"}, "train": {"output_dir": str(tmp_path), "seed": 0},
            "data": {"train": [{"path": str(path)}], "num_samples": n, "max_length": 256}}
    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    ds, stats, _ = prepare_split(load_config(None, tree=tree), tok, "train", packed=False)
    assert len(ds) == stats.samples == n  # fewer rows than the source (5), or repeated rows (30)


# ------------------------------------------------------------------------------ logged fallbacks
def test_attention_fallback_is_logged_once(tiny_model_dir, capsys):
    from transformers import AutoModelForCausalLM

    from lmforge.models import load_model, load_tokenizer

    class NoSdpa:  # a model class that, like some remote-code models, rejects the attention choice
        @staticmethod
        def from_pretrained(path, **kw):
            if "attn_implementation" in kw:
                raise ValueError("LlamaForCausalLM does not support an attention implementation through sdpa yet")
            return AutoModelForCausalLM.from_pretrained(path, **kw)

    cfg = load_config(None, tree={**MIN, "model": {"name_or_path": str(tiny_model_dir)}}).model
    tok = load_tokenizer(cfg, tiny_model_dir)
    for _ in range(2):
        load_model(cfg, tiny_model_dir, tok, auto_class=NoSdpa, dtype=torch.float32)
    lines = [x for x in capsys.readouterr().out.splitlines() if "attn_implementation" in x]
    assert len(lines) == 1 and "sdpa is not available" in lines[0] and "does not support" in lines[0]


def test_lm_head_on_every_position_under_ddp_is_logged_once(tmp_path, tiny_model_dir, capsys):
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM

    from lmforge.training.losses import token_loss_sum

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    batch = {"input_ids": torch.tensor([[5, 6, 7, 8]]), "labels": torch.tensor([[-100, -100, 7, 8]])}
    plain, _ = token_loss_sum(model, dict(batch))
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        for _ in range(2):
            wrapped, _ = token_loss_sum(ddp, dict(batch))
    finally:
        dist.destroy_process_group()
    assert torch.allclose(plain, wrapped)
    lines = [x for x in capsys.readouterr().out.splitlines() if "LM head runs on every position under DDP" in x]
    assert len(lines) == 1


# ------------------------------------------------------------------------------ model.train_tokenizer
BERT = {"model_type": "bert", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 4, "max_position_embeddings": 128}


def test_encoder_only_model_from_scratch_trains_with_a_trained_tokenizer(tmp_path, lmforge_cache):
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    data = write_jsonl(tmp_path / "t.jsonl", [{"text": t} for t in corpus(100)])
    out = tmp_path / "out"
    tree = base_config(None, data, out, method="mlm", train={"max_steps": 2, "save_steps": 10})
    tree["model"] = {"config": BERT, "train_tokenizer": {"vocab_size": 300}, "dtype": "float32"}
    assert main(["train", str(write_config(tmp_path / "c.yaml", tree))]) == 0
    tok = AutoTokenizer.from_pretrained(out)
    assert (tok.mask_token, tok.cls_token, tok.sep_token, tok.pad_token) == ("[MASK]", "[CLS]", "[SEP]", "[PAD]")
    ids = tok("the quick fox").input_ids
    assert ids[0] == tok.cls_token_id and ids[-1] == tok.sep_token_id
    assert AutoModelForMaskedLM.from_pretrained(out).config.vocab_size == len(tok)


def test_encoder_decoder_tokenizer_has_pad_eos_unk(tmp_path):
    from lmforge.models import train_bpe_tokenizer

    tok = train_bpe_tokenizer(corpus(50), 300, 2, tmp_path, architecture="encoder-decoder")
    assert (tok.pad_token_id, tok.eos_token, tok.unk_token) == (0, "</s>", "<unk>")  # T5: pad starts the decoder
    assert tok("the fox").input_ids[-1] == tok.eos_token_id


def _scratch_cfg(tmp_path, out):
    data = write_jsonl(tmp_path / "t.jsonl", [{"text": t} for t in corpus(60)])
    tree = base_config(None, data, out, method="pretrain")
    tree["model"] = {"config": {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64,
                                "num_hidden_layers": 1, "num_attention_heads": 4},
                     "train_tokenizer": {"vocab_size": 300}}
    return load_config(None, tree=tree)


def test_tokenizer_is_trained_once_by_processes_starting_together_and_reused(tmp_path, monkeypatch):
    import lmforge.data.prepare as prepare
    from lmforge.training.run import resolve_model_and_tokenizer

    calls = []  # each tokenizer training reads the training texts once
    real = prepare.training_texts
    monkeypatch.setattr(prepare, "training_texts", lambda cfg: calls.append(1) or real(cfg))
    cfg = _scratch_cfg(tmp_path, tmp_path / "out")
    vocabs, errors = [], []

    def rank():
        try:
            vocabs.append(resolve_model_and_tokenizer(cfg)[2].get_vocab())
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=rank) for _ in range(3)]  # a file lock serialises threads too
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(calls) == 1 and all(v == vocabs[0] for v in vocabs)
    resolve_model_and_tokenizer(cfg)  # a resumed run, prepare, inspect: the same tokenizer, not retrained
    assert len(calls) == 1


def test_a_crash_while_training_the_tokenizer_leaves_nothing_used_later(tmp_path, monkeypatch):
    import lmforge.models as models
    from lmforge.training.run import resolve_model_and_tokenizer

    real = models.train_bpe_tokenizer

    def crash(texts, vocab_size, min_frequency, out_dir, architecture="decoder"):
        (out_dir / "tokenizer_config.json").write_text("{half")
        raise KeyboardInterrupt

    out = tmp_path / "out"
    cfg = _scratch_cfg(tmp_path, out)
    monkeypatch.setattr(models, "train_bpe_tokenizer", crash)
    with pytest.raises(KeyboardInterrupt):
        resolve_model_and_tokenizer(cfg)
    assert not [p for p in out.iterdir() if p.name.startswith(".tokenizer-")]
    monkeypatch.setattr(models, "train_bpe_tokenizer", real)
    assert len(resolve_model_and_tokenizer(cfg)[2]) > 250
