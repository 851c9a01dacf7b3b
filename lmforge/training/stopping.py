"""Runs that stop on purpose, the same way in both engines: a stop signal, a non-finite loss.

* SIGTERM/SIGINT (a preempted node, Slurm's time limit, Ctrl-C): the step in flight finishes, every rank
  writes its part of a checkpoint at that step, and the run exits 1 with ``interrupted_message``; a second
  signal to the same process leaves at once (KeyboardInterrupt) with the last whole checkpoint in place.
* a NaN or inf loss (``train.on_nan``): ``stop`` raises before the update, so no checkpoint is written after
  it; ``skip_batch`` drops that step's update and counts it (``skipped_batches`` in metrics.jsonl).

``stop_signals`` and the messages are shared by the native engine (``NativeTrainer``); ``StepGuard`` is the
HF Trainer engine's callback. Ranks must agree on both (one all-reduce per step), or one rank would enter a
checkpoint's barriers or skip an update alone.
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState

from lmforge.data import origins
from lmforge.errors import TrainingError
from lmforge.log import log

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


@contextlib.contextmanager
def stop_signals(on_first: Callable[[int], None]):
    """While inside, SIGTERM/SIGINT call ``on_first(signum)`` once; a second one raises KeyboardInterrupt.

    Only signals delivered to this process count: a peer rank's signal, learnt through an all-reduce, is not
    a "second" one here (that rank's first signal must still lead to the collective checkpoint).
    """
    received: list[int] = []

    def handler(signum, frame):
        if received:
            raise KeyboardInterrupt  # a second signal: leave now; the last checkpoint is whole (atomic)
        received.append(signum)
        on_first(signum)

    old = {s: signal.signal(s, handler) for s in STOP_SIGNALS}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def interrupted_message(signum: int, step: int, max_steps: int, output_dir: str | Path) -> str:
    return (f"stopped by {signal.Signals(signum).name} at step {step} of {max_steps}; checkpoint-{step} is in "
            f"{output_dir}. Run the same command again (train.resume: auto) to continue exactly where it stopped")


def nan_message(step: int, output_dir: str | Path, data=None, rows=()) -> str:
    """The NaN stop's message on both engines: the step, where its rows came from, what to do. ``rows``: this
    process's rows of ``data`` (the prepared training split) in the step, named by their source ``file:line`` where
    the split recorded them (``data/origins.py``), else by their numbers in it."""
    rows = sorted(set(rows))
    try:
        named = origins.of_rows(data, rows) if rows and data is not None else None
    except (OSError, ValueError):  # an unreadable record of the origins must not hide the stop: numbers instead
        named = None
    if named:
        where = f" on rows from {_listed(named)}"
    elif rows:
        where = (f" on rows {_listed(list(map(str, rows)))} of the prepared training data (as `lmforge inspect` "
                 "numbers them)")
    else:
        where = ""
    return (f"step {step}: the loss is not finite (nan or inf){where}; stopping before the update, so the last "
            f"checkpoint in {output_dir} stays the last good state (lower train.learning_rate, check the data of "
            "this step, or set train.on_nan: skip_batch to skip such steps)")


def _listed(items: list[str], shown: int = 16) -> str:
    return ", ".join(items[:shown]) + (f" and {len(items) - shown} more" if len(items) > shown else "")


class StepGuard(TrainerCallback, ExportableState):
    """The HF engine's stops. ``LmforgeTrainerMixin.training_step`` reports every micro-batch loss here.

    Before each optimizer step the ranks all-reduce (max) two numbers: "some loss was not finite" and "a stop
    signal arrived". A non-finite loss stops the run there (``on_nan: stop``) or drops every gradient, so the
    optimizer, which skips parameters without a gradient, changes neither weights nor its state
    (``skip_batch``; the step still counts, with its rows and learning rate). A
    signal marks the step's end for a checkpoint and a stop; once it is written, ``on_save`` raises.
    """

    def __init__(self, on_nan: str, output_dir: str):
        self.on_nan, self.output_dir = on_nan, output_dir
        self.pending: int | None = None  # a stop signal this process received, for the next all-reduce
        self.signum: int | None = None  # the stop signal every rank has agreed on (the all-reduce's result)
        self.finite = True  # every micro-batch loss of the current step on this rank was finite
        self.rows: list[int] = []  # this rank's dataset rows in the current step, where its batches name them
        self.skipped = 0  # steps skipped for a non-finite loss, since step 0 (kept in checkpoints)

    def signals(self):
        def first(signum: int) -> None:
            self.pending = signum
            log(f"{signal.Signals(signum).name}: writing a checkpoint at the end of a step (every rank), then stopping")

        return stop_signals(first)

    def add_loss(self, loss: torch.Tensor, rows: list[int] | None = None) -> None:
        """A micro-batch's loss, and its dataset rows if its collator names them (``origins.ROWS``)."""
        self.finite = self.finite and bool(torch.isfinite(loss).all())
        self.rows += rows or []

    def add_to_log(self, logs: dict) -> None:
        if self.on_nan == "skip_batch" and "loss" in logs:
            logs["skipped_batches"] = self.skipped

    def state(self) -> dict:
        return {"args": {"on_nan": self.on_nan, "output_dir": self.output_dir}, "attributes": {"skipped": self.skipped}}

    def on_train_begin(self, args, state, control, **kw):
        saved = (state.stateful_callbacks or {}).get(type(self).__name__)  # a resumed run's count
        self.skipped = saved["attributes"]["skipped"] if isinstance(saved, dict) else 0

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, train_dataloader=None, **kw):
        flags = torch.tensor([0.0 if self.finite else 1.0, float(self.pending or 0)], device=args.device)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        rows, self.rows, self.finite = self.rows, [], True
        if flags[1].item():  # this rank or another got a signal: every rank stops at the end of this step
            self.signum = int(flags[1].item())
        if flags[0].item():
            step = state.global_step + 1
            if self.on_nan == "stop":
                data = getattr(train_dataloader, "dataset", None)
                raise TrainingError(nan_message(step, args.output_dir, data, rows))
            optimizer.zero_grad(set_to_none=True)
            self.skipped += 1
            log(f"step {step}: the loss is not finite; its update is skipped (train.on_nan: skip_batch, "
                f"{self.skipped} skipped so far)")

    def on_step_end(self, args, state, control, **kw):
        if self.signum is not None:  # agreed, never just this rank's: a lone rank would wait in the save's barriers
            control.should_save = True
            control.should_training_stop = True

    def on_save(self, args, state, control, **kw):
        if self.signum is not None:  # the checkpoint at this step is written on every rank (the mixin's barriers)
            raise TrainingError(interrupted_message(self.signum, state.global_step, state.max_steps, args.output_dir))
