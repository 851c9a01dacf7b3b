"""DeepSpeed ZeRO configs: the presets lmforge ships, or a user's JSON file.

Values left as ``"auto"`` are filled in by transformers from the train section (batch size, accumulation,
clipping, precision), so the preset never disagrees with the rest of the config.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

from lmforge.errors import ConfigError

PRESETS = ("zero1", "zero2", "zero3", "zero3_offload")

_COMMON = {
    "train_micro_batch_size_per_gpu": "auto",
    "train_batch_size": "auto",
    "gradient_accumulation_steps": "auto",
    "gradient_clipping": "auto",
    "bf16": {"enabled": "auto"},
    "fp16": {"enabled": "auto"},
    # The optimizer is the one named in train.optim (built by the Trainer). Without this DeepSpeed would
    # replace it by its own CPU Adam whenever state is offloaded, which compiles a C++ extension on first use.
    "zero_force_ds_cpu_optimizer": False,
    "zero_allow_untested_optimizer": True,
}


def preset(name: str) -> dict:
    stage = {"zero1": 1, "zero2": 2, "zero3": 3, "zero3_offload": 3}[name]
    zero: dict = {"stage": stage}
    if stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    if name == "zero3_offload":
        zero["offload_optimizer"] = {"device": "cpu"}
        zero["offload_param"] = {"device": "cpu"}
    return {**copy.deepcopy(_COMMON), "zero_optimization": zero}


def load(value: str, where: str = "config") -> dict:
    """The DeepSpeed config dict for train.deepspeed (a preset name or a JSON path)."""
    if value in PRESETS:
        return preset(value)
    path = Path(value)
    if path.suffix != ".json" and not path.exists():
        raise ConfigError(f"{where}: train.deepspeed: {value!r} is neither a preset ({', '.join(PRESETS)}) "
                          "nor a DeepSpeed JSON file")
    try:
        ds = json.loads(path.read_text())
    except OSError as e:
        raise ConfigError(f"{where}: train.deepspeed: cannot read {value} ({e.strerror})") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{where}: train.deepspeed: {value}:{e.lineno}: invalid JSON ({e.msg})") from None
    if not isinstance(ds, dict):
        raise ConfigError(f"{where}: train.deepspeed: {value} must hold a JSON object")
    zero = ds.setdefault("zero_optimization", {})
    if zero.get("stage", 0) == 3:
        # lmforge always writes a plain model at the end; ZeRO-3 can only do that if it gathers the shards.
        zero.setdefault("stage3_gather_16bit_weights_on_model_save", True)
    return ds


def stage(ds: dict) -> int:
    return int(ds.get("zero_optimization", {}).get("stage", 0))


def offloads(ds: dict) -> bool:
    zero = ds.get("zero_optimization", {})
    return any(zero.get(k, {}).get("device", "none") != "none" for k in ("offload_optimizer", "offload_param"))
