"""What a training method gives the native engine's loop (``native.py``), and what a step adds up.

``Objective`` is the interface: how a method collates its rows, the units its loss is averaged over (loss tokens,
pairs, examples), the loss sum of a micro-batch and the sums of its metrics; and hooks with no-op defaults that a
method overrides where it needs them (DPO's reference log-probs before the first step, KTO's KL estimate before
each step, GRPO's rollouts, a checkpointed state). The loop calls every hook unconditionally, so a reader sees all of them in
one place instead of ``hasattr`` probes.

``StepTotals`` is what one step sums on a rank: the loss terms, the tokens trained on, the stop signals pending
and the metric sums, packed into one float64 vector for the step's single all-reduce and unpacked by name.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch


class Objective(ABC):
    """A method's loss for the native engine. A loss of several terms, each averaged over its own units (ORPO:
    the odds-ratio term over pairs, the NLL over tokens), names a tuple of units, counts a tuple and returns a
    vector of term sums; units past the loss terms average metrics only (KTO: desirable, undesirable examples),
    and ``stat_units`` says which units a metric is averaged over (the first by default)."""

    unit: str | tuple[str, ...] = "tokens"
    perplexity = False  # eval_loss is a token NLL: eval_perplexity is logged
    stat_keys: tuple[str, ...] = ()  # the metrics ``loss`` sums (averaged over the step's units when logged)
    stat_units: dict[str, int] = {}  # metric -> index of the units it is averaged over (read only)
    reuse_steps = 1  # optimizer steps trained on each step's rows (GRPO: num_iterations on one rollout)

    @property
    def terms(self) -> int:
        """How many kinds of units ``count`` counts."""
        return len(self.unit) if isinstance(self.unit, tuple) else 1

    @abstractmethod
    def batch(self, split: str, rows: list[int] | None, records: list[dict]) -> dict:
        """The collated micro-batch of ``records`` (rows ``rows`` of ``split``, or None from a stream)."""

    @abstractmethod
    def count(self, batch: dict) -> int | tuple[int, ...]:
        """The units in ``batch`` (one number, or one per kind of unit)."""

    @abstractmethod
    def loss(self, model, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        """(the loss sum over the batch's units, a 0-d tensor or one per term; the metric sums by key)."""

    # hooks: no-ops unless a method needs them
    def start(self, trainer) -> None:
        """Before the first step of a fresh run (not on resume)."""

    def before_step(self, trainer, batches: list[dict]) -> None:
        """On every rank before a step's first forward (and before an evaluation, with its batches)."""

    def flops_batch(self, records: list[dict]) -> dict | None:
        """A batch to count FLOPs per token on (``flops.per_token``), or None when the loss is no token loss."""
        return None

    def logged(self, split: str) -> dict[str, float]:
        """Metrics that are no sum over units (GRPO: the reward's spread, rollout time), for the next logged row of
        ``split`` ("train": since the last log; "eval": of the evaluation just run). Rank 0's view; may be empty."""
        return {}

    def state_dict(self) -> dict | None:
        """What a checkpoint keeps of this objective on this rank, or None for nothing."""
        return None

    def load_state_dict(self, state: dict) -> None:
        """Restore ``state_dict()``'s result on resume."""


@dataclass
class StepTotals:
    """A step's sums on this rank, then (``unpack`` after the all-reduce) over every rank."""

    loss: torch.Tensor  # (terms,) float64: each loss term's sum over its units
    units: torch.Tensor  # (terms,) float64: the units counted (evaluation; a training step counts them first)
    stats: torch.Tensor  # (len(stat_keys),) float64: each metric's sum
    tokens: float = 0.0  # non-padding tokens trained on
    sigterm: float = 0.0  # ranks with a SIGTERM pending (a sum names the signal on every rank)
    sigint: float = 0.0

    @classmethod
    def zeros(cls, terms: int, stats: int) -> StepTotals:
        return cls(*(torch.zeros(n, dtype=torch.float64) for n in (terms, terms, stats)))

    def add(self, loss: torch.Tensor, stats: list[float], weight: float, tokens: int = 0,
            units: list[float] | None = None) -> None:
        """One micro-batch's loss terms (a loss of fewer terms than units fills the first), metrics, tokens and
        units, each times ``weight`` (0 for a stand-in batch under FSDP)."""
        terms = loss.detach().double().reshape(-1)
        self.loss[:len(terms)] += terms * weight
        self.stats += torch.tensor(stats, dtype=torch.float64) * weight
        self.tokens += tokens * weight
        if units is not None:
            self.units += torch.tensor(units, dtype=torch.float64) * weight

    def pack(self) -> torch.Tensor:
        head = torch.tensor([self.tokens, self.sigterm, self.sigint], dtype=torch.float64)
        return torch.cat([self.loss, self.units, head, self.stats])

    @classmethod
    def unpack(cls, flat: torch.Tensor, terms: int) -> StepTotals:
        flat = flat.double()
        tokens, sigterm, sigint = flat[2 * terms:2 * terms + 3].tolist()
        return cls(flat[:terms].clone(), flat[terms:2 * terms].clone(), flat[2 * terms + 3:].clone(), tokens,
                   sigterm, sigint)
