"""Config rules for distributed training: impossible combinations fail at load time (exit 2), not mid-run."""

from __future__ import annotations

from lmforge.distributed import zero
from lmforge.errors import ConfigError


def check_distributed(cfg, where: str) -> None:
    t = cfg.train
    if t.deepspeed is not None and t.distributed != "deepspeed":
        raise ConfigError(f"{where}: train.deepspeed is set but train.distributed is {t.distributed!r}; "
                          "set train.distributed: deepspeed (or remove train.deepspeed)")
    if t.distributed == "deepspeed":
        _check_deepspeed(cfg, where)
    if t.distributed == "fsdp":
        if cfg.peft.kind == "qlora":
            raise ConfigError(f"{where}: peft.kind: qlora cannot be sharded with train.distributed: fsdp "
                              "(bitsandbytes-quantised weights are not FSDP2 parameters); use ddp, deepspeed "
                              "zero1/zero2, or peft.kind: lora")
    if t.distributed != "fsdp" and t.fsdp_sharding != "full":
        raise ConfigError(f"{where}: train.fsdp_sharding applies only to train.distributed: fsdp")


def _check_deepspeed(cfg, where: str) -> None:

    if cfg.train.deepspeed is None:
        raise ConfigError(f"{where}: train.deepspeed: required with train.distributed: deepspeed; "
                          f"give a preset ({', '.join(zero.PRESETS)}) or a DeepSpeed JSON path")
    ds = zero.load(cfg.train.deepspeed, where)
    if cfg.peft.kind == "qlora" and zero.stage(ds) == 3:
        raise ConfigError(f"{where}: train.deepspeed: ZeRO-3 cannot partition a bitsandbytes-quantised base "
                          "(peft.kind: qlora); use zero1 or zero2, or peft.kind: lora")
    if cfg.train.optim.startswith(("adamw_bnb", "paged_", "adamw_8bit")) and zero.offloads(ds):
        raise ConfigError(f"{where}: train.optim: {cfg.train.optim} keeps bitsandbytes state that DeepSpeed "
                          "cannot offload; use adamw_torch with an offloading ZeRO config")
