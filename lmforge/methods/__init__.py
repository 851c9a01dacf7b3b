"""One module per training method; each exposes ``train(cfg) -> output_dir``."""

import importlib

from lmforge.errors import UnsupportedError

_MODULES = {"pretrain": "pretrain", "sft": "sft", "dpo": "dpo", "orpo": "orpo", "kto": "kto", "mlm": "mlm"}


def get_method(name: str):
    try:
        module = importlib.import_module(f"lmforge.methods.{_MODULES[name]}")
    except ModuleNotFoundError as e:
        if e.name == f"lmforge.methods.{_MODULES.get(name)}":
            raise UnsupportedError(f"method: {name!r} is not available in this version of lmforge") from None
        raise
    return module.train
