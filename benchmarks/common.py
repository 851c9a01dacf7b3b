"""Shared by the benchmark scripts: the step timer both runs (lmforge and its peer) are measured with,
running one measured run in a child process of its own, and a scratch directory removed at exit."""

import atexit
import json
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


class StepTimer(TrainerCallback):
    """Sums the wall time of training steps only (not loading, data preparation, evaluation or saving)."""

    def __init__(self):
        self.seconds, self.steps, self._t = 0.0, 0, None

    def on_step_begin(self, args, state, control, **kw):
        self._t = time.perf_counter()

    def on_step_end(self, args, state, control, **kw):
        self.seconds += time.perf_counter() - self._t
        self.steps += 1
