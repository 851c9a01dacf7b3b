"""A checkpoint from any strategy -> a plain HF model (or PEFT adapter) directory with its tokenizer.

FSDP2 checkpoints hold one DCP shard per rank (``pytorch_model_fsdp_0/``); DeepSpeed checkpoints hold ZeRO
partitions (``global_stepN/`` + ``latest``). Both are merged with the engines' own tools (torch DCP's
``dcp_to_torch_save``, DeepSpeed's ``zero_to_fp32``), loaded into the model the config describes (base
model + adapters, built exactly as training built it) and saved with ``save_pretrained``. DDP checkpoints
are plain already and are copied.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import torch

from lmforge.config import load_config
from lmforge.errors import ConfigError

_PLAIN_FILES = ("config.json", "generation_config.json", "model.safetensors", "model.safetensors.index.json",
                "adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "tokenizer_config.json",
                "special_tokens_map.json", "chat_template.jinja", "README.md")


def checkpoint_kind(ckpt: Path) -> str:
    if any(ckpt.glob("pytorch_model_fsdp_*")):
        return "fsdp"
    if (ckpt / "latest").exists() and any(ckpt.glob("global_step*")):
        return "deepspeed"
    if any((ckpt / f).exists() for f in ("model.safetensors", "model.safetensors.index.json",
                                         "adapter_model.safetensors")):
        return "plain"
    raise ConfigError(f"{ckpt}: no model state found (expected an FSDP, DeepSpeed or plain checkpoint directory)")


def full_state_dict(ckpt: Path, kind: str) -> dict[str, torch.Tensor]:
    """The merged, unsharded state dict of a sharded checkpoint (parameter names as in the trained model)."""
    if kind == "fsdp":
        from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

        shard_dir = sorted(ckpt.glob("pytorch_model_fsdp_*"))[0]
        with tempfile.TemporaryDirectory() as tmp:
            dcp_to_torch_save(str(shard_dir), f"{tmp}/model.pt")
            state = torch.load(f"{tmp}/model.pt", map_location="cpu", weights_only=True)
        return state["model"] if set(state) == {"model"} else state  # accelerate nests it under "model"
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(ckpt))


def consolidate(checkpoint: str | Path, output: str | Path) -> Path:
    """Write a plain model or adapter for ``checkpoint`` into ``output``; returns ``output``."""
    ckpt, out = Path(checkpoint), Path(output)
    if not (ckpt / "config.yaml").exists():
        raise ConfigError(f"{ckpt}: not an lmforge checkpoint (no config.yaml beside the state)")
    kind = checkpoint_kind(ckpt)
    out.mkdir(parents=True, exist_ok=True)
    if kind == "plain":
        for name in _PLAIN_FILES:
            if (ckpt / name).exists():
                shutil.copy2(ckpt / name, out / name)
        for shard in ckpt.glob("model-*.safetensors"):
            shutil.copy2(shard, out / shard.name)
        return out
    cfg = load_config(ckpt / "config.yaml")
    state = full_state_dict(ckpt, kind)
    model, tokenizer = _model_for(cfg)
    _load_exactly(model, state, ckpt)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def _model_for(cfg):
    """The model as training built it (base + adapters), with the tokenizer; weights are overwritten next."""
    # lazy: training.run loads the trainer stack (transformers, peft, accelerate); a plain checkpoint is only copied
    from lmforge.training.run import load_model_and_tokenizer

    model, tokenizer, _ = load_model_and_tokenizer(cfg)
    return model, tokenizer


def _load_exactly(model, state: dict, ckpt: Path) -> None:
    """Load every trained tensor; names missing on either side mean the checkpoint is for another model."""
    expected = {n for n, p in model.named_parameters() if p.requires_grad}
    if hasattr(model, "peft_config") and not expected & set(state):
        # FSDP saves a PEFT model's adapter alone, named without the adapter name (lora_A.weight)
        from peft import set_peft_model_state_dict

        result = set_peft_model_state_dict(model, state)
    else:
        result = model.load_state_dict(state, strict=False)
    missing = sorted(expected & set(result.missing_keys))
    if missing or result.unexpected_keys:
        raise ConfigError(f"{ckpt}: the checkpoint does not match the model in its config.yaml "
                          f"(missing {missing[:3]}, unexpected {result.unexpected_keys[:3]})")
