"""`lmforge train CONFIG --nproc-per-node N [--nnodes M --node-rank R --master-addr A --master-port P]`
(and `lmforge generate ... --nproc-per-node N`, which shards its rows: lmforge/inference/sharded.py).

lmforge does not start worker processes itself: it re-executes the same command through torchrun
(``python -m torch.distributed.run``), which spawns the workers, sets RANK/WORLD_SIZE/MASTER_* and
watches them. A user's own ``torchrun ... -m lmforge train CONFIG`` reaches the same code path.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

from lmforge.distributed.ranks import EXPECTED_WORLD_ENV, world_size
from lmforge.errors import ConfigError


def add_arguments(p) -> None:
    g = p.add_argument_group("multi-process / multi-node (runs the command again under torchrun)")
    g.add_argument("--nproc-per-node", type=int, default=None, help="processes on this node (e.g. GPUs)")
    g.add_argument("--nnodes", type=int, default=1, help="number of nodes")
    g.add_argument("--node-rank", type=int, default=0, help="rank of this node, 0 .. nnodes-1")
    g.add_argument("--master-addr", default="127.0.0.1", help="address of node 0 (multi-node)")
    g.add_argument("--master-port", type=int, default=None, help="free port on node 0; with several nodes 29500 when not given")


def under_launcher() -> bool:
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def wants_launch(args) -> bool:
    """True when this process should start torchrun rather than train."""
    if args.nproc_per_node is None:
        if args.nnodes != 1:
            raise ConfigError("--nnodes needs --nproc-per-node")
        return False
    if args.nproc_per_node < 1 or args.nnodes < 1 or not 0 <= args.node_rank < args.nnodes:
        raise ConfigError("--nproc-per-node and --nnodes must be >= 1, and --node-rank in 0 .. nnodes-1")
    if under_launcher():  # already a torchrun worker: the flags must agree with what torchrun started
        if world_size() != args.nproc_per_node * args.nnodes:
            raise ConfigError(f"--nproc-per-node {args.nproc_per_node} x --nnodes {args.nnodes} does not match "
                              f"the {world_size()} processes torchrun started")
        return False
    return True


def torchrun_command(args, argv: list[str], command: str = "train") -> list[str]:
    """The torchrun command line that re-runs ``lmforge COMMAND`` with ``argv`` (the command's arguments)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(args.nproc_per_node)]
    if args.nnodes == 1 and args.master_port is None:
        cmd += ["--standalone"]  # single node: torchrun picks a free port itself
    else:
        cmd += ["--nnodes", str(args.nnodes), "--node-rank", str(args.node_rank),
                "--master-addr", args.master_addr, "--master-port", str(args.master_port or 29500)]
    return cmd + ["-m", "lmforge", command, *argv]


def relaunch(args, cfg) -> int:
    """Start torchrun for this node and wait for it; returns its exit code."""
    total = args.nproc_per_node * args.nnodes
    if total > 1 and cfg.train.distributed == "none":
        raise ConfigError(f"{args.config}: train.distributed: set ddp, fsdp or deepspeed to train on {total} processes")
    argv = [args.config, *args.overrides] + (["--debug"] if args.debug else [])
    return run_torchrun(args, argv, "train")


def run_torchrun(args, argv: list[str], command: str) -> int:
    """Run ``lmforge COMMAND argv`` under torchrun on this node and wait for it; returns its exit code."""
    total = args.nproc_per_node * args.nnodes
    cmd = torchrun_command(args, argv, command)
    env = {**os.environ, EXPECTED_WORLD_ENV: str(total)}
    # after a stop signal torchrun SIGKILLs workers still running after this many seconds (its default, 30, is
    # too short for the checkpoint of a large model); the scheduler's own grace period must be longer too
    env.setdefault("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", "600")
    if not any(k in os.environ for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")):
        # torchrun's default is 1 thread per worker; share this node's cores between the workers instead
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // args.nproc_per_node))
    print(f"[lmforge] launching: {' '.join(cmd[1:])}", flush=True)
    # torchrun gets each stop signal exactly once, from here: a scheduler's SIGTERM to this process would
    # otherwise leave torchrun training on, and a Ctrl-C, which the terminal sends to the whole foreground
    # group, would reach it twice; torchrun passes a second signal on as a second SIGTERM, on which the
    # workers leave at once, without their checkpoint (training/stopping.py)
    proc = subprocess.Popen(cmd, env=env, start_new_session=True)

    def forward(signum, frame):
        proc.send_signal(signum)  # torchrun passes it to every worker: they checkpoint and exit (stopping.py)

    old = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    try:
        return proc.wait()
    finally:
        for s, h in old.items():
            signal.signal(s, h)
