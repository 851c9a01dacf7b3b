"""Merge a LoRA/DoRA adapter into its base model and save a plain Hugging Face model + tokenizer.

The merge runs in float32 (bf16 rounding of W + BA would cost accuracy) and the result is saved in the
base model's own dtype. A QLoRA adapter is merged onto the dequantised (not the 4-bit) base: merging into
4-bit weights would re-quantise the deltas away.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from lmforge.errors import ConfigError, UnsupportedError
from lmforge.cache import cache_root
from lmforge.inference.loading import load_for_inference
from lmforge.models import adapter_base, is_adapter_dir, resolve_model_path


def _base_dtype(model_dir: Path) -> torch.dtype:
    config = json.loads((model_dir / "config.json").read_text())
    name = config.get("dtype") or config.get("torch_dtype") or "float32"
    return getattr(torch, name, torch.float32)


MARKER = "lmforge_merge.json"  # written into every merged model: what it was merged from


def check_output_dir(out: Path, adapter: Path, overwrite: bool) -> None:
    """Refuse an ``--output`` whose replacement would lose data: a file, or a non-empty directory that is not
    a model ``lmforge merge`` wrote (``--output runs`` must never delete every run), unless ``overwrite``;
    and, always, the adapter itself or a directory holding it."""
    if out.exists() and adapter.resolve().is_relative_to(out.resolve()):
        raise ConfigError(f"--output: {out} holds the adapter being merged ({adapter}); choose another directory")
    if overwrite or not out.exists():
        return
    if not out.is_dir():
        raise ConfigError(f"--output: {out} is a file; choose a directory, or pass --overwrite to replace it")
    if any(out.iterdir()) and not (out / MARKER).exists():
        raise ConfigError(f"--output: {out} is not empty and is not a model lmforge merge wrote; choose a new "
                          "directory, or pass --overwrite to replace it (everything in it is deleted)")


def merge_adapter_to_dir(adapter: str, output: str | Path, dtype: str | None = None, overwrite: bool = False) -> Path:
    """Merge the adapter dir ``adapter`` into its base; write the plain model to ``output`` atomically.

    An existing ``output`` is replaced only when it is empty, a model this function wrote, or ``overwrite``."""
    path = resolve_model_path(adapter)
    if not is_adapter_dir(path):
        raise ConfigError(f"--model: {adapter} is not a PEFT adapter directory (no adapter_config.json)")
    out = Path(output)
    check_output_dir(out, path, overwrite)  # before the (slow) merge
    loaded = load_for_inference(adapter, dtype="float32")
    if hasattr(loaded.model, "peft_config"):
        raise UnsupportedError(f"--model: {adapter} is a prompt-tuning adapter; its virtual tokens cannot be merged "
                               "into weights (use it directly with generate/serve)")
    save_dtype = getattr(torch, dtype) if dtype else _base_dtype(loaded.model_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.merging-"))
    try:
        model = loaded.model.to(save_dtype)
        model.config.dtype = str(save_dtype).removeprefix("torch.")
        model.save_pretrained(tmp)
        tok = loaded.tokenizer
        tok.padding_side = "right"  # the training default; inference code sets left padding itself
        tok.save_pretrained(tmp)
        (tmp / MARKER).write_text(json.dumps({"adapter": str(path.resolve()), "base": adapter_base(path),
                                              "dtype": str(save_dtype).removeprefix("torch.")}, indent=2) + "\n")
        if out.is_dir():
            shutil.rmtree(out)
        elif out.exists():
            out.unlink()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def merged_model_dir(model: str) -> Path:
    """A plain model directory for ``model``: itself, or its adapter merged once into the lmforge cache."""
    path = resolve_model_path(model)
    if not is_adapter_dir(path):
        return path
    weights = next((p for p in sorted(path.glob("adapter_model.*"))), path / "adapter_config.json")
    stat = weights.stat()
    key = hashlib.sha256(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    target = cache_root() / "merged" / f"{path.name}-{key}"
    if not (target / "config.json").exists():
        adapter_base(path)  # fail early on a malformed adapter_config.json
        merge_adapter_to_dir(model, target, overwrite=True)  # lmforge's own cache entry
    return target
