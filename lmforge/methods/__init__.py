"""The registry of training methods: what trains a method on which architecture, and the facts every layer reads.

One table (``METHODS``) says, for each ``method:``, the row formats it reads, which module under
``lmforge.methods`` trains it on each architecture (a decoder-only causal LM, an encoder-decoder such as T5, an
encoder-only model such as BERT; ``models.architecture`` tells them apart), whether its rows may be packed,
whether the native engine runs it, and whether its eval_loss is a token NLL. The CLI (``train``), the data
layer and ``prepare``/``inspect``, the config schema and both engines read it instead of keeping lists of
their own. Each module exposes ``train(cfg) -> output_dir``.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field

from lmforge.errors import ConfigError, UnsupportedError


@dataclass(frozen=True)
class Method:
    formats: tuple[str, ...]  # row formats it trains on (data/formats.py)
    modules: dict[str, str] = field(default_factory=dict)  # architecture -> module of lmforge.methods
    packs: bool = False  # rows may be packed (causal LMs only; ``packing`` has the whole rule)
    native: bool = False  # train.engine: native runs it (causal LMs only; ``training/native.py:unsupported``)
    token_loss: bool = False  # eval_loss is a per-token NLL: eval_perplexity, and mfu for the causal LM
    pairs: bool = False  # preference data: prompt/chosen/rejected (or kto) ids, never packed (data/preference.py)


METHODS: dict[str, Method] = {
    "pretrain": Method(("text",), {"decoder": "pretrain", "encoder-only": "mlm"}, packs=True, native=True,
                       token_loss=True),
    "sft": Method(("prompt_completion", "chat", "text"), {"decoder": "sft", "encoder-decoder": "seq2seq"},
                  packs=True, native=True, token_loss=True),
    "dpo": Method(("preference",), {"decoder": "dpo"}, native=True, pairs=True),
    "orpo": Method(("preference",), {"decoder": "orpo"}, native=True, pairs=True),
    "kto": Method(("kto", "preference"), {"decoder": "kto"}, native=True, pairs=True),
    "mlm": Method(("text",), {"encoder-only": "mlm"}, token_loss=True),
}
NAMES = tuple(METHODS)
PAIR_METHODS = tuple(name for name, m in METHODS.items() if m.pairs)


def module_name(cfg) -> str:
    """The module of lmforge.methods that trains ``cfg`` (its method on its model's architecture)."""
    from lmforge.models import architecture

    arch = architecture(cfg)
    name = METHODS[cfg.method].modules.get(arch)
    if name is None:
        kinds = " and ".join(METHODS[cfg.method].modules)
        others = ", ".join(n for n, m in METHODS.items() if arch in m.modules)
        raise UnsupportedError(f"method: {cfg.method} trains {kinds} models; this model is {arch} (for {arch} "
                               f"models use method: {others})")
    if cfg.train.engine == "native" and arch != "decoder":
        raise ConfigError(f"train.engine: native trains causal LMs; this is an {arch} model: use train.engine: hf")
    return name


def get_method(cfg):
    """``train(cfg)`` of the module that trains ``cfg``."""
    return importlib.import_module(f"lmforge.methods.{module_name(cfg)}").train


def packing(cfg, architecture: str = "decoder", log=None) -> bool:
    """The one rule for packing rows: the method allows it, the model is a causal LM, ``data.packing`` is not
    false, and no prompt-tuning adapter (PEFT prepends virtual tokens, which a packed row cannot take)."""
    if cfg.data.packing and (not METHODS[cfg.method].packs or architecture != "decoder"):
        from lmforge.errors import ConfigError

        what = f"method {cfg.method}" if not METHODS[cfg.method].packs else f"an {architecture} model"
        raise ConfigError(f"data.packing: true: {what} trains on one row per sample (packing is for causal-LM "
                          "pretrain and sft); remove the key or set it to false")
    if not METHODS[cfg.method].packs or architecture != "decoder" or cfg.data.packing is False:
        return False
    if cfg.peft.kind == "prompt_tuning":
        if cfg.data.packing and log is not None:
            log("packing is off for prompt tuning: PEFT prepends virtual tokens, which a packed 4D mask cannot cover")
        return False
    return True
