"""PEFT adapters (LoRA, DoRA, QLoRA, prompt tuning) and freezing by name: written once for every method."""

from __future__ import annotations

import fnmatch
import json
from pathlib import Path

import torch

from lmforge.config import PeftConfig
from lmforge.errors import ConfigError, UnsupportedError


def quantization_kwargs(peft: PeftConfig, compute_dtype: torch.dtype) -> dict:
    """from_pretrained kwargs that load the frozen base quantised for QLoRA (bitsandbytes; runs on CPU too)."""
    if peft.kind != "qlora":
        return {}
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise UnsupportedError("peft.kind: qlora needs bitsandbytes: pip install bitsandbytes") from None
    from transformers import BitsAndBytesConfig

    if peft.bits == 4:
        q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=compute_dtype)
    else:
        q = BitsAndBytesConfig(load_in_8bit=True)
    return {"quantization_config": q}


def apply_peft(model, peft: PeftConfig, task_type: str = "CAUSAL_LM", tokenizer_path: str | None = None):
    """Wrap ``model`` with the configured adapter; returns it unchanged for kind none."""
    if peft.kind == "none":
        return model
    from peft import LoraConfig, PromptTuningConfig, PromptTuningInit, get_peft_model, prepare_model_for_kbit_training

    if peft.kind == "prompt_tuning":
        init = PromptTuningInit.TEXT if peft.prompt_tuning_init == "text" else PromptTuningInit.RANDOM
        pcfg = PromptTuningConfig(
            task_type=task_type, num_virtual_tokens=peft.num_virtual_tokens, prompt_tuning_init=init,
            prompt_tuning_init_text=peft.prompt_tuning_init_text if init == PromptTuningInit.TEXT else None,
            tokenizer_name_or_path=tokenizer_path if init == PromptTuningInit.TEXT else None,
        )
        return get_peft_model(model, pcfg)
    if peft.kind == "qlora":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    target = peft.target_modules
    lcfg = LoraConfig(
        r=peft.r, lora_alpha=peft.alpha, lora_dropout=peft.dropout, target_modules=target,
        use_dora=peft.kind == "dora", modules_to_save=peft.modules_to_save, task_type=task_type,
    )
    try:
        return get_peft_model(model, lcfg)
    except ValueError as e:
        raise ConfigError(f"peft.target_modules: {e}") from None


def freeze_except(model, patterns: list[str]) -> int:
    """Full fine-tune with only parameters matching a glob trainable; returns how many tensors stay trainable."""
    n = 0
    for name, p in model.named_parameters():
        keep = any(fnmatch.fnmatch(name, pat) for pat in patterns)
        p.requires_grad_(keep)
        n += keep
    if n == 0:
        raise ConfigError(f"train.trainable: no parameter name matches {patterns}")
    return n


def count_parameters(model) -> tuple[int, int]:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, total
