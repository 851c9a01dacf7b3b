"""Shared by the benchmark scripts: the step timer both runs (lmforge and its peer) are measured with,
running one measured run in a child process of its own, a scratch directory removed at exit, and an lmforge
cache without the stored matmul peak (so MFU is against the peak of the machine as it runs now)."""

import atexit
import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from transformers import TrainerCallback


def child_result(cmd: list[str], env: dict) -> tuple[dict | None, subprocess.CompletedProcess]:
    """Run ``cmd``; its result is the JSON it prints after ``RESULT `` (None when it printed none)."""
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    return (json.loads(line[7:]) if line else None), proc


def scratch_dir(prefix: str, **kw) -> Path:
    """A new temporary directory, removed when the benchmark exits (models and checkpoints fill a disk fast)."""
    path = Path(tempfile.mkdtemp(prefix=prefix, **kw))
    atexit.register(shutil.rmtree, path, True)
    return path


def cache_measuring_peak(scratch: Path) -> Path:
    """An lmforge cache (for ``LMFORGE_CACHE``) holding the user's cache's entries (models, prepared data, kernels)
    as links, but not the stored matmul peaks: lmforge measures the peak at its start (under a second), so its MFU
    is against what this machine does now. Why: a VM's speed drifts between hours (up to ~25% seen), and a peak
    stored in a faster hour makes the MFU read low. ``peak_flops.json`` there afterwards holds what was measured."""
    real = Path(os.environ.get("LMFORGE_CACHE") or Path.home() / ".cache" / "lmforge")
    cache = scratch / "lmforge-cache"
    cache.mkdir()
    for entry in real.iterdir() if real.is_dir() else ():
        if not entry.name.startswith("peak_flops."):
            (cache / entry.name).symlink_to(entry)
    return cache


def measured_peaks(cache: Path) -> dict:
    """The peaks lmforge measured into ``cache`` (``cache_measuring_peak``), FLOP/s by key."""
    path = cache / "peak_flops.json"
    return json.loads(path.read_text()) if path.exists() else {}


class StepTimer(TrainerCallback):
    """Sums the wall time of training steps only (not loading, data preparation, evaluation or saving)."""

    def __init__(self):
        self.seconds, self.steps, self._t = 0.0, 0, None

    def on_step_begin(self, args, state, control, **kw):
        self._t = time.perf_counter()

    def on_step_end(self, args, state, control, **kw):
        self.seconds += time.perf_counter() - self._t
        self.steps += 1
