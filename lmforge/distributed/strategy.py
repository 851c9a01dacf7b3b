"""Set up the strategy named in ``train.distributed`` and check, once training starts, that it is the one running.

The engines do the work: accelerate creates the process group, the Trainer wraps the model (DDP, FSDP2 or
a DeepSpeed engine). lmforge creates the accelerate state itself, before the Trainer, for two reasons the
engines get silently wrong on CPU (measured; see docs/distributed.md):
  * DeepSpeed with several CPU processes needs the process group created first (gloo) and the Trainer told
    to use it (``use_configured_state``);
  * accelerate selects FSDP only on accelerator devices and quietly keeps DDP on CPU, although torch FSDP2
    runs over gloo; lmforge selects FSDP explicitly.
``verify`` then compares world size, backend, accelerate's distributed type and the model's wrapper with
the config and stops the run with a clear message on any difference: never a silent switch.
"""

from __future__ import annotations

import os
import socket
from datetime import timedelta

import torch
from transformers import TrainerCallback

from lmforge.distributed import extensions, zero
from lmforge.distributed.ranks import EXPECTED_WORLD_ENV, nodes, world_size
from lmforge.errors import ConfigError, UnsupportedError
TIMEOUT = timedelta(minutes=30)  # data preparation on rank 0 happens while the others wait at a barrier


def backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def setup(cfg) -> None:
    """Create the process group and accelerate state for train.distributed; every method calls this first."""
    kind, world = cfg.train.distributed, world_size()
    expected = os.environ.get(EXPECTED_WORLD_ENV)
    if expected is not None and int(expected) != world:
        raise UnsupportedError(f"the launcher asked for {expected} processes but WORLD_SIZE is {world}")
    if kind == "none":
        if world > 1:
            raise ConfigError(f"train.distributed: 'none', but {world} processes were started; set "
                              "train.distributed: ddp, fsdp or deepspeed")
        return
    if kind in ("ddp", "fsdp") and world == 1:
        raise ConfigError(f"train.distributed: {kind} needs several processes, but this is a single process; "
                          "run `lmforge train CONFIG --nproc-per-node N` or start lmforge under torchrun")
    from accelerate.state import PartialState

    if kind == "deepspeed":
        _deepspeed_environment()
        os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"  # how accelerate is told; the Trainer does the same
        try:
            PartialState(backend=backend(), timeout=TIMEOUT)
        finally:
            del os.environ["ACCELERATE_USE_DEEPSPEED"]
    else:
        PartialState(cpu=not torch.cuda.is_available(), backend=backend(), timeout=TIMEOUT)


def teardown() -> None:
    """End a finished run's process group without tripping over its shutdown.

    Seen in CI, about once in twenty multi-process runs (FSDP and ZeRO-3 alike): after training and the final
    save, a rank died at interpreter exit with ``terminate called without an active exception`` (SIGABRT from
    a C++ thread of the communication backend still joinable during static destruction), failing the run.
    Barrier + ``destroy_process_group`` did not prevent it. So a worker of a multi-process run, once every
    rank has passed the barrier (all files written), flushes its output and leaves with ``os._exit(0)``,
    skipping those destructors. A single process (world size 1, e.g. DeepSpeed in-process) exits normally.
    """
    import logging
    import sys

    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    dist.barrier()
    if world_size() == 1:
        dist.destroy_process_group()
        return
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _deepspeed_environment() -> None:
    extensions.load_ops()
    if "RANK" not in os.environ:  # one process without a launcher: DeepSpeed still wants a rendezvous
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))


def trainer_kwargs(cfg, prec) -> dict:
    """TrainingArguments keyword arguments for the strategy (after ``setup``)."""
    kind = cfg.train.distributed
    if kind == "none":
        return {}
    kwargs = {"accelerator_config": {"use_configured_state": True}, "ddp_timeout": int(TIMEOUT.total_seconds())}
    if kind == "deepspeed":
        kwargs["deepspeed"] = zero.load(cfg.train.deepspeed)
    if kind == "fsdp":
        _fsdp_state(prec, hybrid=_hybrid(cfg))
    return kwargs


def _hybrid(cfg) -> bool:
    return cfg.train.fsdp_sharding == "hybrid" and nodes() > 1  # on one node hybrid is full sharding


def _hybrid_mesh():
    """HSDP: shard within a node, replicate across nodes (a 2-D mesh: nodes x processes per node)."""
    from accelerate.parallelism_config import ParallelismConfig

    return ParallelismConfig(dp_replicate_size=nodes(), dp_shard_size=world_size() // nodes())


def _fsdp_state(prec, hybrid: bool) -> None:
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin, TorchDynamoPlugin

    mixed = "bf16" if prec.bf16 else "fp16" if prec.fp16 else "no"
    plugin = FullyShardedDataParallelPlugin(
        fsdp_version=2, reshard_after_forward=True, auto_wrap_policy="transformer_based_wrap",
        state_dict_type="SHARDED_STATE_DICT",  # checkpoints: each rank writes its shard (DCP)
    )
    state = AcceleratorState(mixed_precision=mixed, cpu=not torch.cuda.is_available(), fsdp_plugin=plugin,
                             dynamo_plugin=TorchDynamoPlugin(), _from_accelerator=True,
                             parallelism_config=_hybrid_mesh() if hybrid else None)
    if state.distributed_type != DistributedType.FSDP:
        if state.distributed_type != DistributedType.MULTI_CPU:
            raise UnsupportedError(f"train.distributed: fsdp: accelerate set up {state.distributed_type.value}")
        # accelerate enables FSDP only for accelerator devices; torch FSDP2 itself runs on a CPU mesh over gloo.
        state.distributed_type = DistributedType.FSDP
        PartialState._shared_state["distributed_type"] = DistributedType.FSDP
        state.fsdp_plugin = plugin
        if mixed != "no":
            plugin.set_mixed_precision(mixed)


# ------------------------------------------------------------------------------------ after set-up
def running(trainer) -> dict:
    """What is actually running: world size, backend, accelerate's distributed type, the model's wrapper."""
    import torch.distributed as dist

    wrapped = trainer.model_wrapped
    info = {
        "world_size": dist.get_world_size() if dist.is_initialized() else 1,
        "backend": str(dist.get_backend()) if dist.is_initialized() else None,
        "distributed_type": trainer.accelerator.distributed_type.value,
        "wrapper": type(wrapped).__name__,
    }
    if info["wrapper"] == "DeepSpeedEngine":
        info["zero_stage"] = wrapped.zero_optimization_stage()
    mesh = getattr(next(wrapped.parameters(), None), "device_mesh", None)  # FSDP2 parameters are DTensors
    if mesh is not None:
        info["mesh"] = dict(zip(mesh.mesh_dim_names or ("shard",), mesh.shape))
    return info


def mismatches(cfg, info: dict) -> list[str]:
    from torch.distributed.fsdp import FSDPModule
    from torch.nn.parallel import DistributedDataParallel

    kind, world, out = cfg.train.distributed, world_size(), []
    if info["world_size"] != world:
        out.append(f"world size {info['world_size']} (expected {world})")
    if kind == "none":
        return out
    if backend() not in (info["backend"] or ""):
        out.append(f"backend {info['backend']} (expected {backend()})")
    expected_type = {"ddp": ("MULTI_CPU", "MULTI_GPU"), "fsdp": ("FSDP",), "deepspeed": ("DEEPSPEED",)}[kind]
    if info["distributed_type"] not in expected_type:
        out.append(f"accelerate distributed type {info['distributed_type']} (expected {' or '.join(expected_type)})")
    wrapper_ok = {
        "ddp": lambda m: isinstance(m, DistributedDataParallel),
        "fsdp": lambda m: isinstance(m, FSDPModule),
        "deepspeed": lambda m: type(m).__name__ == "DeepSpeedEngine",
    }[kind]
    if not wrapper_ok(info["model"]):
        out.append(f"model wrapper {info['wrapper']}")
    if kind == "fsdp" and len(info.get("mesh", {})) != (2 if _hybrid(cfg) else 1):
        out.append(f"device mesh {info.get('mesh')} (expected {cfg.train.fsdp_sharding} sharding)")
    if kind == "deepspeed" and info.get("zero_stage") != zero.stage(zero.load(cfg.train.deepspeed)):
        out.append(f"ZeRO stage {info.get('zero_stage')} (expected {zero.stage(zero.load(cfg.train.deepspeed))})")
    return out


def verify(cfg, trainer) -> dict:
    info = running(trainer)
    problems = mismatches(cfg, {**info, "model": trainer.model_wrapped})
    if problems:
        raise UnsupportedError(f"train.distributed: {cfg.train.distributed} was asked for, but the run set up "
                               f"{'; '.join(problems)}. Stopping rather than training with another strategy.")
    return info


class StrategyCheck(TrainerCallback):
    """Runs ``verify`` once the Trainer has wrapped the model, before the first step."""

    def __init__(self, cfg, trainer):
        self.cfg, self.trainer = cfg, trainer

    def on_train_begin(self, args, state, control, **kwargs):
        info = verify(self.cfg, self.trainer)
        if self.cfg.train.distributed != "none" and state.is_world_process_zero:
            extra = f", ZeRO-{info['zero_stage']}" if "zero_stage" in info else ""
            extra += f", mesh {info['mesh']}" if "mesh" in info else ""
            n = info["world_size"]
            print(f"[lmforge] distributed: {self.cfg.train.distributed} on {n} process{'es' if n > 1 else ''}, "
                  f"backend {info['backend']}, model in {info['wrapper']}{extra}", flush=True)


def before_final_save(trainer) -> None:
    """Checkpoints stay sharded (each rank writes its part); the final model is gathered into one plain file."""
    if getattr(trainer, "is_fsdp_enabled", False):
        trainer.accelerator.state.fsdp_plugin.set_state_dict_type("FULL_STATE_DICT")
