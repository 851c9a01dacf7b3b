"""Load any model lmforge produced for inference: a full model dir, a PEFT adapter dir, a .gguf file or an alias.

Adapters are merged into their base on load (LoRA/DoRA: plain weights afterwards, so inference costs the
same as for a full model); prompt-tuning adapters cannot be merged and stay wrapped. The tokenizer pads on
the left, as batched decoder-only generation needs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from lmforge.config import ModelConfig
from lmforge.errors import ConfigError, UnsupportedError
from lmforge.models import (ScoreModel, adapter_base, finalize_tokenizer, is_adapter_dir, is_score_model, load_model,
                             pick_dtype, resolve_model_path)


@dataclass
class LoadedModel:
    model: object
    tokenizer: object
    name: str  # what the user passed; shown as the model id by the server
    model_dir: Path  # the base model directory (the adapter's base for an adapter)
    adapter_dir: Path | None
    is_encoder_decoder: bool
    is_reward_model: bool = False  # a one-label sequence classifier: it scores sequences, it does not generate

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype


def _auto_class(model_dir: Path):
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    config = json.loads((model_dir / "config.json").read_text())
    return AutoModelForSeq2SeqLM if config.get("is_encoder_decoder") else AutoModelForCausalLM


def _tokenizer(source: Path, side: str):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as e:
        raise ConfigError(f"--model: cannot load a tokenizer from {source} ({e})") from None
    tok = finalize_tokenizer(tok)
    tok.padding_side = side
    return tok


def merge_adapter(base, adapter_dir: Path):
    """Apply the PEFT adapter in ``adapter_dir`` to ``base`` and fold it into the weights where PEFT can."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(base, str(adapter_dir))
    if model.peft_config["default"].is_prompt_learning:
        return model  # virtual tokens are inputs, not weight deltas: nothing to merge
    return model.merge_and_unload()


def load_for_inference(name_or_path: str, dtype: str = "auto", merge: bool = True,
                       reward_model_ok: bool = False) -> LoadedModel:
    """Resolve ``name_or_path`` (dir, adapter dir, .gguf, alias) and load model + tokenizer in eval mode. A reward
    model loads only for a caller that scores with it (``reward_model_ok``); for the others it is a clear error,
    not a generation that fails inside transformers."""
    path = resolve_model_path(name_or_path)
    adapter_dir = None
    if is_adapter_dir(path):
        adapter_dir, path = path, resolve_model_path(adapter_base(path))
    is_reward = is_score_model(adapter_dir or path)
    if is_reward and not reward_model_ok:
        raise UnsupportedError(f"--model: {name_or_path} is a reward model (a sequence classifier): it scores "
                               "sequences and does not generate; score preference pairs with "
                               "`lmforge eval --metrics reward_accuracy`")
    auto_class = ScoreModel if is_reward else _auto_class(path)
    is_enc_dec = auto_class.__name__.endswith("Seq2SeqLM")
    tok_source = adapter_dir if adapter_dir and (adapter_dir / "tokenizer_config.json").exists() else path
    tokenizer = _tokenizer(tok_source, "right" if is_enc_dec or is_reward else "left")
    torch_dtype = pick_dtype(dtype)
    if torch_dtype == torch.float16 and not torch.cuda.is_available():
        raise ConfigError("--dtype: float16 is slow and inexact on CPU; use bfloat16 or float32")
    model = load_model(ModelConfig(name_or_path=str(path)), path, tokenizer, auto_class=auto_class, dtype=torch_dtype)
    if adapter_dir is not None and merge:
        model = merge_adapter(model, adapter_dir)
    if is_reward:
        model.config.pad_token_id = tokenizer.pad_token_id  # as methods/reward.py trains it
    if torch.cuda.is_available():
        model.to("cuda")
    model.eval()
    return LoadedModel(model, tokenizer, name_or_path, path, adapter_dir, is_enc_dec, is_reward)
