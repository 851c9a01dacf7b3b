"""Run outputs shared by every method: metrics.jsonl, plots/loss.png, the progress bar, tokens/s.

Only the main process writes (``state.is_world_process_zero``); the numbers it writes are already reduced
across ranks by the Trainer (loss) or by ``TokenCounter`` (tokens).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import TrainerCallback

from lmforge.training.flops import mfu
from lmforge.training.memory import HeapTrim
from lmforge.training.outputs import PLOT_EVERY_SECONDS, progress_postfix, refresh_plot
from lmforge.training.tracking import Trackers

class TokenCounter:
    """Counts non-padding tokens a trainer has trained on, summed over all ranks when read."""

    def __init__(self):
        self.local = 0

    def add(self, n: int) -> None:
        self.local += int(n)

    def total(self) -> int:
        """Summed over every rank (a collective: every rank must call it)."""
        if world_size() == 1:
            return self.local
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
        t = torch.tensor([self.local], device=device)
        dist.all_reduce(t)
        return int(t.item())


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class OutputsCallback(TrainerCallback):
    """Writes metrics.jsonl (one object per log), refreshes plots/loss.png, shows a progress bar, and sends each
    row to the ``report_to`` trackers lmforge writes itself (``tracking.Trackers``, as the native engine)."""

    def __init__(self, output_dir: str, counter: TokenCounter, show_progress: bool = True,
                 perplexity: bool = True, flops_per_token: float | None = None, peak_flops: float | None = None,
                 report_to: list[str] = ()):
        self.dir = Path(output_dir)
        self.report_to, self.trackers = list(report_to), None  # opened on rank 0 when training begins
        self.flops_per_token, self.peak_flops = flops_per_token, peak_flops  # for mfu (training/flops.py)
        self.perplexity = perplexity
        self.counter = counter
        self.show_progress = show_progress
        self.bar = None
        self.train_seconds = 0.0
        self._step_t0 = None
        self._last = (0, 0.0)  # (tokens, train seconds) at the previous log
        self._last_plot = 0.0
        self.heap = HeapTrim()

    # timing covers training steps only, not evaluation or checkpointing
    def on_step_begin(self, args, state, control, **kw):
        self._step_t0 = time.perf_counter()

    def on_step_end(self, args, state, control, **kw):
        self.heap.after_step()  # inside the step's time, as on the native engine
        if self._step_t0 is not None:
            self.train_seconds += time.perf_counter() - self._step_t0
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)

    def on_train_begin(self, args, state, control, **kw):
        if state.is_world_process_zero and self.show_progress:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=state.max_steps, initial=state.global_step, desc="train", dynamic_ncols=True)
        if state.is_world_process_zero and self.trackers is None:
            self.trackers = Trackers(self.dir, self.report_to)
        tokens = self.counter.total()
        self._last = (tokens, self.train_seconds)

    def on_log(self, args, state, control, logs=None, **kw):
        logs = dict(logs or {})
        tokens = self.counter.total()  # collective: every rank takes part
        if not state.is_world_process_zero:
            return
        row = {"step": state.global_step}
        if "loss" in logs:
            d_tok, d_sec = tokens - self._last[0], self.train_seconds - self._last[1]
            if d_sec > 0 and d_tok > 0:
                logs["tokens_per_second"] = round(d_tok / d_sec, 2)
                if self.flops_per_token and self.peak_flops:
                    logs["flops_per_token"] = round(self.flops_per_token)
                    logs["mfu"] = round(mfu(self.flops_per_token, d_tok / d_sec, self.peak_flops, world_size()), 4)
            self._last = (tokens, self.train_seconds)
        if self.perplexity and "eval_loss" in logs and "eval_perplexity" not in logs:
            logs["eval_perplexity"] = math.exp(min(logs["eval_loss"], 50.0))
        for k, v in logs.items():
            if k in ("total_flos",):
                continue
            row[k] = float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v
        row["tokens_seen"] = tokens
        self.dir.mkdir(parents=True, exist_ok=True)
        with open(self.dir / "metrics.jsonl", "a") as fh:
            fh.write(json.dumps(row) + "\n")
        if self.trackers is not None:
            self.trackers.log(row)
        if self.bar is not None and "loss" in logs:
            self.bar.set_postfix(progress_postfix(logs), refresh=False)
        if time.monotonic() - self._last_plot > PLOT_EVERY_SECONDS or "eval_loss" in logs:
            self.refresh_plot()

    def refresh_plot(self):
        self._last_plot = time.monotonic()
        refresh_plot(self.dir)

    def on_train_end(self, args, state, control, **kw):
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if state.is_world_process_zero:
            self.refresh_plot()
        if self.trackers is not None:
            self.trackers.close()
            self.trackers = None


class ProfileCallback(TrainerCallback):
    """``train.profile`` on the hf engine: the native engine's ``tracking.Profiler`` around the same steps
    (1-based ``start_step`` .. ``start_step + steps - 1``), on the main process."""

    def __init__(self, profiler):
        self.profiler = profiler

    def on_step_begin(self, args, state, control, **kw):
        self.profiler.before_step(state.global_step + 1)

    def on_step_end(self, args, state, control, **kw):
        self.profiler.after_step(state.global_step)
