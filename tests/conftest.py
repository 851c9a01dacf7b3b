"""Fixtures: a tiny Llama and a tokenizer trained on the fly (nothing is downloaded)."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# On a machine shared with other jobs, OpenMP threads spinning at barriers slow tiny ops by 10x or more;
# one thread per test process (and per launched subprocess, via the env) is then much faster.
if os.getloadavg()[0] > 1.5 * (os.cpu_count() or 1):
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
else:
    torch.set_num_threads(min(2, os.cpu_count() or 1))

from lmforge.models import CHATML_TEMPLATE, finalize_tokenizer, train_bpe_tokenizer  # noqa: E402
from lmforge.synthetic import extraction_rows  # noqa: E402

WORDS = ("the quick brown fox jumps over a lazy dog while seven wizards quietly judge boxing matches "
         "alpha beta gamma delta name age city job json extract text record lives works").split()


def corpus(n: int = 400, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    texts = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 30))) for _ in range(n)]
    texts += [m["content"] for r in extraction_rows(200, seed) for m in r["messages"]]
    return texts


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tok")
    train_bpe_tokenizer(corpus(), vocab_size=400, min_frequency=2, out_dir=out)
    return out


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_tokenizer_dir) -> Path:
    """A 2-layer Llama with hidden size 32, saved with its tokenizer."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = finalize_tokenizer(AutoTokenizer.from_pretrained(tiny_tokenizer_dir))
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    out = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def sharp_model_dir(tiny_model_dir, tmp_path_factory):
    """The tiny model with peaked attention: at random init attention is nearly uniform, so wrong positions
    or masks would barely change the output; scaled query/key weights make them show."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    return save_sharpened(model, AutoTokenizer.from_pretrained(tiny_model_dir), tmp_path_factory.mktemp("sharp-llama"))


def save_sharpened(model, tokenizer, out: Path) -> Path:
    """``model`` with its query/key weights scaled 12x (peaked attention), saved with ``tokenizer`` to ``out``."""
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(12)
            layer.self_attn.k_proj.weight.mul_(12)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


# What lmforge measures of the machine into an empty cache, the matmul peak (0.5 s a dtype) and the estimate's speed
# probe (0.1 s on the tiny model, per model shape, method kind and micro-batch), is measured once a test session: each
# test's fresh cache starts with what was measured so far and hands back what it measured. The decode attention
# kernel is built once a session too (decode_kernels).
SESSION_MEASURED = ("peak_flops.json", "estimate_probe.json")


@pytest.fixture(scope="session")
def measured_peaks(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("machine")


@pytest.fixture()
def lmforge_cache(tmp_path, monkeypatch, measured_peaks) -> Path:
    cache = tmp_path / "cache"
    cache.mkdir()
    for name in SESSION_MEASURED:
        if (measured_peaks / name).exists():
            (cache / name).write_text((measured_peaks / name).read_text())
    (measured_peaks / "kernels").mkdir(exist_ok=True)
    (cache / "kernels").symlink_to(measured_peaks / "kernels")  # built once a session (decode_kernels)
    monkeypatch.setenv("LMFORGE_CACHE", str(cache))
    yield cache
    for name in SESSION_MEASURED:
        try:
            got = {**json.loads((cache / name).read_text()),
                   **(json.loads((measured_peaks / name).read_text()) if (measured_peaks / name).exists() else {})}
        except (OSError, ValueError):
            continue  # the test measured nothing (or left no readable file)
        (measured_peaks / name).write_text(json.dumps(got))


def write_jsonl(path: Path, rows) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        for r in rows:
            fh.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return path


def chat_rows(n: int, seed: int = 0) -> list[dict]:
    return extraction_rows(n, seed)


def base_config(model_dir: Path, data_path: Path, out: Path, **sections) -> dict:
    """A small, fast config tree for the tiny model; sections override keys."""
    tree = {
        "method": "sft",
        "model": {"name_or_path": str(model_dir), "dtype": "float32"},
        "data": {"train": [{"path": str(data_path)}], "max_length": 128},
        "train": {"output_dir": str(out), "max_steps": 4, "per_device_train_batch_size": 4, "logging_steps": 1,
                  "save_steps": 2, "learning_rate": 1e-3, "report_to": ["none"], "seed": 0},
    }
    for name, values in sections.items():
        if isinstance(values, dict) and isinstance(tree.get(name), dict):
            tree[name].update(values)
        else:
            tree[name] = values
    return tree


def write_config(path: Path, tree: dict) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(tree))
    return path


__all__ = ["CHATML_TEMPLATE", "base_config", "chat_rows", "corpus", "write_config", "write_jsonl"]
