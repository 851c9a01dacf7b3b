"""FSDP2 on the native engine (``train.distributed: fsdp``, ``train.engine: native``), with torch's
``fully_shard``: every decoder layer is one shard group, and the root is ``LossModule``, whose forward is
the objective's whole loss.

Why that root: the loss runs the decoder and the LM head separately, the head only on positions that carry
loss (``sft.causal_lm_loss``). FSDP2 gathers the root group's weights (embeddings, final norm, head) only
inside the root's own forward, so the root's forward must be the loss, not the model's ``forward``.

The promises are the DDP path's (``native.py``):
  * gradients are summed over ranks, not averaged: each rank's loss is already divided by the units (loss
    tokens, pairs) of the whole step. They are reduce-scattered once per optimizer step, after the last
    micro-batch (no sync on the earlier ones);
  * every rank runs the same number of forwards (FSDP gathers weights collectively): a rank without rows
    for a micro-batch runs a stand-in batch whose loss counts zero (``stand_in``).
Under bf16 compute the sharded parameters stay fp32 (they are the master weights) and FSDP2 casts them to
bf16 as it gathers them (``MixedPrecisionPolicy``); gradients are reduced in fp32.

Checkpoints: the weights are gathered into one full state dict and saved by rank 0 as a plain model or
adapter, so checkpoints and the final model read like the single-process ones (``lmforge consolidate``
copies them); the optimizer's sharded state goes through torch.distributed.checkpoint (``optimizer/``),
and resumes with the same number of processes.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions, get_model_state_dict, get_optimizer_state_dict, set_optimizer_state_dict,
)
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from lmforge.errors import UnsupportedError

OPTIMIZER_DIR = "optimizer"  # in checkpoint-STEP/: the sharded optimizer state (torch.distributed.checkpoint)


class LossModule(torch.nn.Module):
    """The FSDP root: ``forward(batch)`` is ``objective.loss(model, batch)`` -> (loss sum, metric sums)."""

    def __init__(self, objective, model: torch.nn.Module):
        super().__init__()
        self.model = model
        self.objective = objective  # not a module: it holds no parameters

    def forward(self, batch: dict):
        return self.objective.loss(self.model, batch)


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated blocks of a transformers model (through a PEFT wrapper): the classes it names in
    ``_no_split_modules``, as accelerate's ``transformer_based_wrap`` does."""
    base = model.get_base_model() if hasattr(model, "peft_config") else model
    names = set(getattr(base, "_no_split_modules", None) or ())
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise UnsupportedError(
            f"train.distributed: fsdp on train.engine: native shards a model per decoder layer (the classes its "
            f"_no_split_modules names), and {type(base).__name__} names none; use train.distributed: ddp (each "
            "process keeps a whole copy of the weights)")
    return layers


def _mesh(hybrid_nodes: int):
    """One dimension (shard over every process), or HSDP's two with ``train.fsdp_sharding: hybrid`` on several
    nodes: replicate across nodes, shard within each."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    device = "cuda" if torch.cuda.is_available() else "cpu"
    world = dist.get_world_size()
    if hybrid_nodes > 1:
        return init_device_mesh(device, (hybrid_nodes, world // hybrid_nodes), mesh_dim_names=("replicate", "shard"))
    return init_device_mesh(device, (world,), mesh_dim_names=("shard",))


class Sharded:
    """``model`` sharded over the default process group; ``loss(batch, sync)`` runs the objective."""

    def __init__(self, model: torch.nn.Module, objective, compute: torch.dtype, hybrid_nodes: int = 1):
        self.model = model
        layers = decoder_layers(model)  # first: a model it cannot shard is refused before any process-group work
        policy = MixedPrecisionPolicy(param_dtype=compute, reduce_dtype=torch.float32) \
            if compute != torch.float32 else MixedPrecisionPolicy()
        self.mesh = _mesh(hybrid_nodes)
        for layer in layers:
            fully_shard(layer, mesh=self.mesh, mp_policy=policy)
        self.root = fully_shard(LossModule(objective, model), mesh=self.mesh, mp_policy=policy)
        for m in self.root.modules():
            if isinstance(m, FSDPModule):  # a plain sum (gloo has no pre-scaled sum): see the module docstring
                m.set_gradient_divide_factor(1.0)
                m.set_force_sum_reduction_for_comms(True)

    def describe(self) -> dict[str, int]:
        return dict(zip(self.mesh.mesh_dim_names, self.mesh.shape))

    def loss(self, batch: dict, sync: bool):
        """The objective's (loss, stats) on ``batch``; ``sync``: reduce-scatter the gradients in this backward
        (the step's last micro-batch), else accumulate them unsharded."""
        self.root.set_requires_gradient_sync(sync)
        return self.root(batch)

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The model's full state dict (names as ``model.state_dict()``) on rank 0, {} on the others.
        Collective: every rank calls it."""
        state = get_model_state_dict(self.root, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return {k.removeprefix("model."): v for k, v in state.items()}

    def save_optimizer(self, optimizer, directory: Path) -> None:
        import torch.distributed.checkpoint as dcp

        dcp.save({"optimizer": get_optimizer_state_dict(self.root, optimizer)}, checkpoint_id=str(directory))

    def load_optimizer(self, optimizer, directory: Path) -> None:
        import torch.distributed.checkpoint as dcp

        state = {"optimizer": get_optimizer_state_dict(self.root, optimizer)}
        dcp.load(state, checkpoint_id=str(directory))
        set_optimizer_state_dict(self.root, optimizer, state["optimizer"])


def full_norm(norm: torch.Tensor) -> float:
    """``clip_grad_norm_``'s total norm: a DTensor over sharded gradients, a tensor otherwise."""
    return float(norm.full_tensor() if isinstance(norm, DTensor) else norm)
