"""What the native engine writes and shows while it trains: the logging window, the trackers (metrics.jsonl,
plots, tensorboard), the ``train.profile`` trace and the progress bar. The HF engine does the same through
``callbacks.OutputsCallback``; both share ``callbacks.refresh_plot`` and ``callbacks.progress_postfix``."""

from __future__ import annotations

import json
import time
from pathlib import Path

from lmforge.config import Config
from lmforge.training.run import log

NATIVE_TRACKERS = ("tensorboard",)  # train.report_to names the native engine's Tracker writes to


class Window:
    """Loss, metrics and tokens/s over the steps since the last log (loss and metrics averaged per step, as
    the HF engine)."""

    def __init__(self, keys: tuple[str, ...] = ()):
        self.keys = ("loss",) + tuple(keys)
        self.values: dict[str, list[float]] = {k: [] for k in self.keys}
        self.tokens, self.seconds = 0, 0.0

    def add(self, loss: float, tokens: int, seconds: float, stats: dict[str, float] | None = None) -> None:
        for k, v in {"loss": loss, **(stats or {})}.items():
            self.values[k].append(v)
        self.tokens += tokens
        self.seconds += seconds

    def take(self) -> dict:
        out = {k: sum(v) / len(v) if v else None for k, v in self.values.items()}
        out.update(tokens=self.tokens, seconds=self.seconds)
        self.values = {k: [] for k in self.keys}
        self.tokens, self.seconds = 0, 0.0
        return out


class Tracker:
    """metrics.jsonl + plots/loss.png + tensorboard (``report_to``), written by rank 0 only."""

    def __init__(self, out: Path, report_to: list[str]):
        from lmforge.training.callbacks import PLOT_EVERY_SECONDS

        self.out, self.every, self.last_plot = out, PLOT_EVERY_SECONDS, 0.0
        self.tb = None
        if "tensorboard" in report_to:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(out / "runs"))

    def write(self, row: dict, plot: bool = False) -> None:
        with open(self.out / "metrics.jsonl", "a") as fh:
            fh.write(json.dumps(row) + "\n")
        if self.tb is not None:
            prefix = "eval/" if any(k.startswith("eval_") for k in row) else "train/"
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tb.add_scalar(prefix + k.removeprefix("eval_"), v, row["step"])
        if plot or time.monotonic() - self.last_plot > self.every:
            self.plot()

    def plot(self) -> None:
        from lmforge.training.callbacks import refresh_plot

        self.last_plot = time.monotonic()
        refresh_plot(self.out)

    def close(self) -> None:
        self.plot()
        if self.tb is not None:
            self.tb.close()


class Profiler:
    """``train.profile: {start_step, steps}``: a torch.profiler trace of those steps in output_dir/profiler."""

    def __init__(self, cfg: Config, out: Path):
        p = cfg.train.profile
        self.first, self.last = (p.start_step, p.start_step + p.steps - 1) if p else (0, -1)
        self.dir, self.prof = out / "profiler", None

    def before_step(self, step: int) -> None:
        if step == self.first:
            from torch.profiler import ProfilerActivity, profile, tensorboard_trace_handler

            self.prof = profile(activities=[ProfilerActivity.CPU], record_shapes=True,
                                on_trace_ready=tensorboard_trace_handler(str(self.dir)))
            self.prof.__enter__()

    def after_step(self, step: int) -> None:
        if self.prof is not None and step == self.last:
            self.prof.__exit__(None, None, None)
            log(f"profile of steps {self.first}-{self.last} written to {self.dir}")
            self.prof = None


def progress_bar(total: int, initial: int):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="train", dynamic_ncols=True)
