"""The rewards of method ``grpo``: each ``grpo.rewards`` entry loaded once (a Python function or a reward model
directory) and asked for one number per completion.

Functions are called as TRL 1.16's ``GRPOTrainer._calculate_rewards`` calls them, so a TRL reward function works
unchanged: ``fn(prompts=..., completions=..., completion_ids=..., trainer_state=..., **columns)``, each extra
column of the data rows passed as a list of B values; for message-list prompts each completion is
``[{"role": "assistant", "content": text}]``. ``None`` means "does not apply to this sample" (NaN here, as in
TRL), async functions run concurrently in one event loop, and the total is TRL's nansum of the weighted rewards,
NaN only where every reward is NaN.

What lmforge adds or does differently:
- Every value is checked: a function that raises, returns the wrong number of values, a non-number (a bool too)
  or NaN/inf stops the run with a DataError naming ``grpo.rewards[i] (fn)`` and the data row (file:line) of the
  offending completion. TRL raises only on a wrong length and passes NaN/inf into the advantages.
- ``trainer_state`` is None: lmforge's native loop has no HF ``TrainerState``. TRL's ``log_extra``,
  ``log_metric`` and ``environments`` are not passed (lmforge has no equivalent yet); a function that requires
  them fails with a DataError saying so, rather than logging into nothing.
- A row missing a column that another row of the batch has gets None for it (as ``datasets`` reads such JSON).
- A reward model scores prompt + completion tokenised exactly as reward training rendered them
  (``inference/score.py``, shared with ``lmforge eval`` and ``serve``), with its own tokenizer, in fp32; TRL
  re-tokenises the concatenated text, which can split tokens differently at the prompt/completion seam.
"""

from __future__ import annotations

import asyncio
import functools
import importlib
import importlib.util
import inspect
import math
import numbers
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from lmforge.config import GrpoReward
from lmforge.data.preference import encode_side
from lmforge.data.tokenize import Encoder
from lmforge.errors import ConfigError, DataError, LmforgeError
from lmforge.inference.loading import LoadedModel, load_for_inference
from lmforge.inference.score import conversation_ids, score_sequences
from lmforge.models import is_score_model, resolve_model_path

ROWS_SHOWN = 3  # origins named for an error that concerns the whole batch


# ------------------------------------------------------------------------------------------ loading
def load_function(spec: str, base_dir: Path, key: str):
    """The callable ``spec`` names: 'package.module:fn', or 'path/to/file.py:fn' (relative to ``base_dir``)."""
    target, _, attr = spec.rpartition(":")
    if not target or not attr:
        raise ConfigError(f"{key}: {spec!r} must be 'package.module:fn' or 'path/to/file.py:fn'")
    try:
        if target.endswith(".py"):
            module = _module_from_file(Path(target).expanduser(), base_dir, key)
        else:
            module = importlib.import_module(target)
    except LmforgeError:
        raise
    except Exception as e:  # the user's module failed to import: say why in one line
        raise ConfigError(f"{key}: cannot import {target} ({type(e).__name__}: {_one_line(e)})") from e
    fn = getattr(module, attr, None)
    if fn is None:
        raise ConfigError(f"{key}: {target} has no attribute {attr!r}")
    if not callable(fn):
        raise ConfigError(f"{key}: {target}:{attr} is not callable ({type(fn).__name__})")
    return fn


def _module_from_file(path: Path, base_dir: Path, key: str):
    path = path if path.is_absolute() else base_dir / path
    if not path.is_file():
        raise ConfigError(f"{key}: {path} does not exist")
    name = f"lmforge_reward_{path.stem}_{abs(hash(str(path.resolve())))}"  # unique: two files may share a stem
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # registered before running it, as the importlib recipe does (dataclasses need it)
    spec.loader.exec_module(module)
    return module


@dataclass
class RewardModel:
    """A reward model directory loaded for scoring, with its own tokenizer's encoder."""

    loaded: LoadedModel
    encoder: Encoder

    @classmethod
    def load(cls, model: str, base_dir: Path, key: str) -> RewardModel:
        path = Path(model).expanduser()
        # a relative directory is read from base_dir, as a function's file is; an alias or a remote URI as given
        path = str(base_dir / path if (base_dir / path).exists() else model)
        try:
            if not is_score_model(resolve_model_path(path)):
                raise ConfigError(f"{path} is not a reward model (a one-label sequence classifier, what method "
                                  "reward writes)")
            loaded = load_for_inference(path, dtype="float32", reward_model_ok=True)
        except LmforgeError as e:
            raise ConfigError(f"{key}: {e}") from None
        return cls(loaded, Encoder(loaded.tokenizer))

    def sequence(self, prompt, completion: str) -> list[int]:
        """prompt + completion as reward training renders them (the same as ``lmforge eval``'s reward_accuracy)."""
        if isinstance(prompt, list):
            return conversation_ids(self.encoder, prompt + [{"role": "assistant", "content": completion}])
        prompt_ids, answer_ids = encode_side(self.encoder, prompt, completion)
        return prompt_ids + answer_ids

    def __call__(self, prompts: list, completions: list[str]) -> list[float]:
        seqs = [self.sequence(p, c) for p, c in zip(prompts, completions)]
        return score_sequences(self.loaded.model, self.loaded.tokenizer.pad_token_id, seqs)


def _callable_name(fn) -> str:
    while isinstance(fn, functools.partial):  # as TRL's get_callable_name: a partial, or a callable instance
        fn = fn.func
    return getattr(fn, "__name__", type(fn).__name__)


def _is_async(fn) -> bool:
    while isinstance(fn, functools.partial):  # as TRL's is_async_callable: an instance may have an async __call__
        fn = fn.func
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(getattr(fn, "__call__", None))


def _unique(names: list[str]) -> list[str]:
    out: list[str] = []
    for name in names:
        candidate, n = name, 1
        while candidate in out or (candidate != name and candidate in names):
            n += 1
            candidate = f"{name}_{n}"
        out.append(candidate)
    return out


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())


# ------------------------------------------------------------------------------------------ the rewards
class Rewards:
    """The ``grpo.rewards`` of a run: ``score`` gives (B, R) rewards, ``total`` their weighted sum (B,)."""

    def __init__(self, specs: list[GrpoReward], tokenizer, base_dir: Path):
        # ``tokenizer`` is the policy's: unused today (completions arrive decoded, a reward model brings its own)
        self.fns: list = []  # a callable or a RewardModel per reward
        names = []
        for i, spec in enumerate(specs):
            if (spec.function is None) == (spec.model is None):
                raise ConfigError(f"grpo.rewards[{i}]: give exactly one of function or model")
            if spec.function is not None:
                fn = load_function(spec.function, base_dir, f"grpo.rewards[{i}].function")
                names.append(_callable_name(fn))
            else:
                fn = RewardModel.load(spec.model, base_dir, f"grpo.rewards[{i}].model")
                names.append(f"rm_{Path(spec.model).name}")
            self.fns.append(fn)
        self.names = _unique(names)
        self.weights = torch.tensor([s.weight for s in specs], dtype=torch.float64)  # (R,)

    def score(self, prompts: list, completions: list[str], completion_ids: list[list[int]], columns: list[dict],
              origins: list[str]) -> torch.Tensor:
        """(B, R) float64 rewards, NaN where a function returned None; a bad value stops with a DataError."""
        B = len(completions)
        if not len(prompts) == len(completion_ids) == len(columns) == len(origins) == B:
            raise ValueError("prompts, completions, completion_ids, columns and origins must have one item each")
        conversational = B > 0 and isinstance(prompts[0], list)
        keys = list(dict.fromkeys(k for row in columns for k in row))
        # the columns first: TRL's own argument names win over a column of the same name, as in TRL
        kwargs = {k: [row.get(k) for row in columns] for k in keys}
        kwargs.update(prompts=prompts, completion_ids=completion_ids, trainer_state=None,
                      completions=[[{"role": "assistant", "content": c}] for c in completions]
                      if conversational else completions)
        outputs: dict[int, object] = {}
        pending = []  # async functions, gathered below
        for i, fn in enumerate(self.fns):
            if isinstance(fn, RewardModel):
                outputs[i] = self._call(i, fn, origins, prompts, completions)
            elif _is_async(fn):
                pending.append(i)
            else:
                outputs[i] = self._call(i, fn, origins, **kwargs)
        if pending:
            for i, out in zip(pending, asyncio.run(self._gather(pending, kwargs))):
                if isinstance(out, Exception):
                    raise self._failure(i, out, origins) from out
                outputs[i] = out
        per = torch.empty(B, len(self.fns), dtype=torch.float64)
        for i in range(len(self.fns)):
            per[:, i] = torch.tensor(self._checked(i, outputs[i], origins), dtype=torch.float64)
        return per

    def total(self, per: torch.Tensor) -> torch.Tensor:
        """(B,) sum over rewards of weight x value ignoring NaN (TRL's nansum); NaN where every reward is NaN."""
        total = (per * self.weights.to(per.device)).nansum(dim=1)
        return total.masked_fill(per.isnan().all(dim=1), math.nan)

    # -------------------------------------------------------------------------------------- helpers
    def _where(self, i: int) -> str:
        return f"grpo.rewards[{i}] ({self.names[i]})"

    def _call(self, i: int, fn, origins: list[str], *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception as e:
            raise self._failure(i, e, origins) from e

    def _failure(self, i: int, e: Exception, origins: list[str]) -> DataError:
        """The user's function (or a reward model's encoding) failed on the batch: name it and the rows."""
        reason = str(e) if isinstance(e, LmforgeError) else f"raised {type(e).__name__}: {_one_line(e)}"
        return DataError(f"{self._where(i)}: {reason} (rows {_rows(origins)})")

    async def _gather(self, indices: list[int], kwargs: dict) -> list:
        async def run(fn):  # called inside the coroutine, so a bad call is caught with the rest
            return await fn(**kwargs)

        return await asyncio.gather(*(run(self.fns[i]) for i in indices), return_exceptions=True)

    def _checked(self, i: int, out, origins: list[str]) -> list[float]:
        """``out`` as B floats (None -> NaN), or a DataError naming the first bad completion's row."""
        B = len(origins)
        if not isinstance(out, (list, tuple)):
            raise DataError(f"{self._where(i)}: returned a {type(out).__name__}, not a list of one reward per "
                            f"completion (rows {_rows(origins)})")
        if len(out) != B:
            raise DataError(f"{self._where(i)}: returned {len(out)} values for {B} completions "
                            f"(rows {_rows(origins)})")
        values = []
        for k, v in enumerate(out):
            if v is None:
                values.append(math.nan)
                continue
            if isinstance(v, bool) or not isinstance(v, numbers.Real):
                raise DataError(f"{self._where(i)}: returned {v!r} ({type(v).__name__}) for completion {k} "
                                f"(row {origins[k]}); a reward is a number, or None where it does not apply")
            if not math.isfinite(v):
                raise DataError(f"{self._where(i)}: returned {v} for completion {k} (row {origins[k]}); "
                                "return None where a reward does not apply")
            values.append(float(v))
        return values


def _rows(origins: list[str]) -> str:
    shown = ", ".join(origins[:ROWS_SHOWN])
    return shown + (f" and {len(origins) - ROWS_SHOWN} more" if len(origins) > ROWS_SHOWN else "")
