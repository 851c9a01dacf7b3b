"""data.streaming: true — rows read, tokenised and packed while training (lmforge/data/streaming.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import base_config, chat_rows, corpus, write_config, write_jsonl
from safetensors.torch import load_file

from lmforge.cli import main
from lmforge.config import load_config
from lmforge.data.streaming import PackedStream
from lmforge.models import load_tokenizer


def _text_rows(n: int, tag: str) -> list[dict]:
    lines = corpus()
    return [{"text": f"{tag} {i} " + " ".join(lines[(i + k) % len(lines)] for k in range(1 + i % 4))}
            for i in range(n)]


def _stream_cfg(tmp_path, tiny_model_dir, sources: list[dict], **data):
    tree = base_config(tiny_model_dir, tmp_path / "unused.jsonl", tmp_path / "out", method="pretrain",
                       data={"streaming": True, "max_length": 64, "shuffle_buffer": 8, **data})
    tree["data"]["train"] = sources
    return load_config(write_config(tmp_path / "c.yaml", tree))


def _ids(rows: list[dict]) -> list[tuple[int, ...]]:
    return [tuple(r["input_ids"]) for r in rows]


def test_stream_packs_every_row_once_per_epoch_and_ranks_never_overlap(tmp_path, tiny_model_dir):
    rows = _text_rows(40, "doc")
    src = write_jsonl(tmp_path / "a.jsonl", rows)
    # shuffle_buffer 1: rows come in file order, so 20 rows of each rank are exactly one epoch
    cfg = _stream_cfg(tmp_path, tiny_model_dir, [{"path": str(src)}], max_length=256, shuffle_buffer=1)
    tok = load_tokenizer(cfg.model, tiny_model_dir)
    # ranks 0 and 1 of 2: each reads every other row; together one epoch is every row's tokens once
    parts = []
    for rank in (0, 1):
        s = PackedStream(cfg, tok, packed=False, rank=rank, world=2)
        parts.append(s.take(20))  # 20 rows each = one epoch (short documents: one sample per row)
    seen = sorted(tuple(r["input_ids"]) for part in parts for r in part)
    expected = sorted(tuple(tok(r["text"]).input_ids + [tok.eos_token_id]) for r in rows)
    assert max(map(len, expected)) <= 256  # one sample per document: none is split
    assert seen == expected
    # packed: rows hold whole samples up to max_length, with their lengths
    s = PackedStream(cfg, tok, packed=True)
    for r in s.take(10):
        assert len(r["input_ids"]) <= 256 and sum(r["seq_lens"]) == len(r["input_ids"]) == len(r["labels"])


def test_stream_reads_parquet(tmp_path, tiny_model_dir):
    """Parquet files stream like the other kinds (sources.iter_file_rows, a record batch at a time)."""
    rows = _text_rows(6, "doc")
    pq.write_table(pa.table({"text": [r["text"] for r in rows]}), tmp_path / "a.parquet")
    cfg = _stream_cfg(tmp_path, tiny_model_dir, [{"path": str(tmp_path / "a.parquet")}], max_length=256,
                      shuffle_buffer=1)
    tok = load_tokenizer(cfg.model, tiny_model_dir)
    expected = [tok(r["text"]).input_ids + [tok.eos_token_id] for r in rows]
    assert [r["input_ids"] for r in PackedStream(cfg, tok, packed=False).take(12)] == expected * 2


def test_stream_state_resumes_the_same_rows(tmp_path, tiny_model_dir):
    a = write_jsonl(tmp_path / "a.jsonl", _text_rows(30, "qqq"))
    b = write_jsonl(tmp_path / "b.jsonl", _text_rows(30, "xxx"))
    cfg = _stream_cfg(tmp_path, tiny_model_dir, [{"path": str(a), "weight": 3.0}, {"path": str(b)}])
    tok = load_tokenizer(cfg.model, tiny_model_dir)
    whole = PackedStream(cfg, tok, packed=True).take(40)
    first = PackedStream(cfg, tok, packed=True)
    head = first.take(15)
    state = first.state_dict()
    again = PackedStream(cfg, tok, packed=True)
    again.load_state_dict(state)
    assert _ids(head + again.take(25)) == _ids(whole)
    # weights: about 3 rows of the first source per row of the second
    text = tok.decode([t for r in whole for t in r["input_ids"]])
    assert 2.0 < text.count("qqq") / max(text.count("xxx"), 1) < 4.5


def test_bad_row_in_the_stream_names_file_and_line(tmp_path, tiny_model_dir, lmforge_cache, capsys):
    src = tmp_path / "a.jsonl"
    src.write_text("\n".join(json.dumps(r) for r in _text_rows(6, "doc")) + "\n{not json\n")
    tree = base_config(tiny_model_dir, src, tmp_path / "out", method="pretrain",
                       data={"streaming": True, "shuffle_buffer": 2, "max_length": 64},
                       train={"max_steps": 20, "save_steps": 100})
    assert main(["train", str(write_config(tmp_path / "c.yaml", tree))]) == 2
    err = capsys.readouterr().err
    assert f"{src}:7: invalid JSON" in err and "Traceback" not in err


@pytest.mark.parametrize("overrides, message", [
    (["train.max_steps=-1"], "train.max_steps is required"),
    (["method=dpo"], "method dpo reads it whole"),
    (["train.engine=hf"], "data.streaming: runs on train.engine: native"),
])
def test_streaming_refuses_what_it_cannot_do(tmp_path, tiny_model_dir, capsys, overrides, message):
    src = write_jsonl(tmp_path / "a.jsonl", _text_rows(4, "doc"))
    tree = base_config(tiny_model_dir, src, tmp_path / "out", method="pretrain", data={"streaming": True})
    assert main(["train", str(write_config(tmp_path / "c.yaml", tree)), *overrides]) == 2
    assert message in capsys.readouterr().err


def streamed_sft_tree(model_dir, data, out) -> dict:
    """A streamed LoRA SFT run of 6 steps (dropout on) that checkpoints at step 3."""
    return base_config(model_dir, data, out, data={"streaming": True, "shuffle_buffer": 4, "max_length": 96},
                       train={"max_steps": 6, "save_steps": 3, "engine": "native", "lr_scheduler_type": "constant",
                              "per_device_train_batch_size": 2, "gradient_accumulation_steps": 2},
                       peft={"kind": "lora", "r": 4, "dropout": 0.1})


def test_streamed_sft_run_resumes_bitwise(tmp_path, tiny_model_dir, lmforge_cache):
    """A streamed SFT run stopped at step 3 (its checkpoint holds the stream's state) and resumed ends with the
    same weights and losses as an uninterrupted one; shards of a directory are read in turn."""
    shards = tmp_path / "shards"
    for k in range(3):
        write_jsonl(shards / f"part-{k}.jsonl", chat_rows(12, seed=k))
    runs = {}
    for name, steps in (("full", [6]), ("stop", [3, 6])):
        cfg = write_config(tmp_path / f"{name}.yaml", streamed_sft_tree(tiny_model_dir, shards, tmp_path / name))
        for max_steps in steps:
            assert main(["train", str(cfg), f"train.max_steps={max_steps}"]) == 0
        runs[name] = tmp_path / name
    assert (runs["stop"] / "checkpoint-3" / "stream_0.pt").exists()
    a, b = (load_file(runs[n] / "adapter_model.safetensors") for n in ("full", "stop"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    losses = [[(r["step"], r["loss"]) for r in map(json.loads, (runs[n] / "metrics.jsonl").read_text().splitlines())
               if "loss" in r] for n in ("full", "stop")]
    assert losses[0] == losses[1] and len(losses[0]) == 6


@pytest.mark.slow
def test_streamed_two_process_run_trains(tmp_path, tiny_model_dir):
    src = write_jsonl(tmp_path / "a.jsonl", _text_rows(64, "doc"))
    tree = base_config(tiny_model_dir, src, tmp_path / "out", method="pretrain",
                       data={"streaming": True, "shuffle_buffer": 8, "max_length": 64},
                       train={"max_steps": 4, "save_steps": 2, "distributed": "ddp"})
    cfg = write_config(tmp_path / "c.yaml", tree)
    env = {**os.environ, "LMFORGE_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "lmforge", "train", "--nproc-per-node", "2", str(cfg)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / "out" / "checkpoint-2").glob("stream_*.pt")) == \
        ["stream_0.pt", "stream_1.pt"]


def test_prepare_caches_nothing_for_a_streamed_train_split(tmp_path, tiny_model_dir, lmforge_cache, capsys):
    src = write_jsonl(tmp_path / "a.jsonl", _text_rows(4, "doc"))
    tree = base_config(tiny_model_dir, src, tmp_path / "out", method="pretrain", data={"streaming": True})
    assert main(["prepare", str(write_config(tmp_path / "c.yaml", tree))]) == 0
    out = capsys.readouterr().out
    assert "data.streaming: true: read, tokenised and packed while training" in out and "cached at" not in out
