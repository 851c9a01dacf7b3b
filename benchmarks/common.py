"""Shared by the benchmark scripts: the step timer both runs (lmforge and its peer) are measured with."""

import time

from transformers import TrainerCallback


class StepTimer(TrainerCallback):
    """Sums the wall time of training steps only (not loading, data preparation, evaluation or saving)."""

    def __init__(self):
        self.seconds, self.steps, self._t = 0.0, 0, None

    def on_step_begin(self, args, state, control, **kw):
        self._t = time.perf_counter()

    def on_step_end(self, args, state, control, **kw):
        self.seconds += time.perf_counter() - self._t
        self.steps += 1
