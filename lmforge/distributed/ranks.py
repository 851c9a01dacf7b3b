"""Rank helpers that work with or without an initialised process group."""

from __future__ import annotations

import functools
import os
import sys

EXPECTED_WORLD_ENV = "LMFORGE_EXPECTED_WORLD_SIZE"  # set by `lmforge train --nproc-per-node`, checked by workers


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def nodes() -> int:
    """Number of nodes: torchrun starts LOCAL_WORLD_SIZE processes on each."""
    return max(1, world_size() // int(os.environ.get("LOCAL_WORLD_SIZE", world_size())))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def _group_ready() -> bool:
    """A process group of several ranks exists. Without torch loaded there is none, and importing torch here would
    cost `lmforge prepare` (which needs no torch) over a second."""
    dist = sys.modules.get("torch.distributed")
    return dist is not None and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def main_process_first(fn):
    """Run ``fn`` on local rank 0 of each node first, then on the other ranks (which then read its cache).

    The prepared-data cache lives on each node's disk; building it once per node and letting the other
    ranks load it avoids N processes tokenising the same data and racing to write the same directory.
    Every rank passes exactly one barrier, also when rank 0 raises (the others then hit the same error).
    """

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if not _group_ready():
            return fn(*args, **kwargs)
        import torch.distributed as dist

        first = local_rank() == 0
        if not first:
            dist.barrier()  # wait for local rank 0 to build the cache
        try:
            return fn(*args, **kwargs)
        finally:
            if first:
                dist.barrier()

    return wrapper
