"""Online-RL math as pure functions: group-relative advantages (GRPO's group mean, RLOO's leave-one-out mean)
and the GRPO clipped-surrogate loss with its k3 KL term (issue 22, item 3).

Why by hand: lmforge runs GRPO in its native loop, so it cannot call TRL's ``GRPOTrainer._compute_loss``
(a method of a Trainer that runs the forward itself). These functions follow TRL 1.16's formulas line for line
and ``tests/test_rl.py`` checks them against TRL's own code on fixed float64 batches.

One deliberate difference: the loss's normaliser can be passed in. TRL divides each micro-batch by a count of
that micro-batch (``bnpo``) or by the micro-batch's size times the accumulation steps (``grpo``, ``dr_grpo``),
so the step's loss depends on how the rollouts are split (trl#3021, ms-swift#10117). Here every loss type is
``numerator(micro-batch) / denominator``: the numerator adds over sequences or tokens, and the denominator is
additive too (``loss_denominator``), so a caller that sums it over the step's micro-batches and ranks and passes
that total gets the same loss and gradients however the step is split.

Shapes: B completions (consecutive groups of ``num_generations`` per prompt), T completion positions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
IMPORTANCE_LEVELS = ("token", "sequence")
SCALE_REWARDS = ("group", "batch", "none")
BASELINES = ("group", "rloo")

STD_EPS = 1e-4  # TRL adds this to the std before dividing (grpo_trainer._generate_and_score_completions)


def nanstd(x: torch.Tensor) -> torch.Tensor:
    """Bessel-corrected std over the last dim ignoring NaNs, kept as (..., 1) (TRL's ``trainer.utils.nanstd``);
    NaN with fewer than 2 values."""
    mean = torch.nanmean(x, dim=-1, keepdim=True)
    var = torch.nanmean((x - mean) ** 2, dim=-1, keepdim=True)
    count = (~torch.isnan(x)).sum(dim=-1, keepdim=True)
    var = torch.where(count > 1, var * count / (count - 1), torch.full_like(var, float("nan")))
    return torch.sqrt(var)


def _grouped(rewards: torch.Tensor, num_generations: int) -> torch.Tensor:
    if rewards.dim() != 1 or num_generations < 1 or rewards.numel() % num_generations:
        raise ValueError(f"rewards must be a flat (B,) tensor of whole groups of {num_generations}, "
                         f"got shape {tuple(rewards.shape)}")
    return rewards.view(-1, num_generations)  # (B/G, G)


def group_advantages(rewards: torch.Tensor, num_generations: int, scale_rewards: str = "group",
                     baseline: str = "group") -> torch.Tensor:
    """Advantages (B,) for rewards (B,) laid out as consecutive groups of ``num_generations`` completions.

    baseline "group": reward minus its group's mean (TRL GRPO). "rloo": reward minus the mean of the other G-1
    rewards of its group (TRL RLOO), which is G/(G-1) times the group-mean advantage.
    scale_rewards "group": divide by the group's std + 1e-4; "batch": by the std of all B rewards + 1e-4;
    "none": no division. Stds are Bessel-corrected, as TRL's. A NaN reward (no reward function applies to the
    completion) is left out of its group's mean and std, and its advantage is 0, as in TRL.
    With "rloo" the scaling is GRPO's, by the rewards' std; TRL's RLOOTrainer instead optionally standardises
    the advantages over the batch (``normalize_advantages``) and puts its KL in the reward, not in the loss.
    """
    if scale_rewards not in SCALE_REWARDS:
        raise ValueError(f"scale_rewards must be one of {SCALE_REWARDS}, got {scale_rewards!r}")
    if baseline not in BASELINES:
        raise ValueError(f"baseline must be one of {BASELINES}, got {baseline!r}")
    grouped = _grouped(rewards, num_generations)  # (B/G, G)
    if num_generations == 1:  # no sibling to compare with: no signal (TRL: eval with one generation)
        return torch.zeros_like(rewards)
    if baseline == "group":
        base = torch.nanmean(grouped, dim=1, keepdim=True)  # (B/G, 1)
    else:
        scorable = (~torch.isnan(grouped)).sum(dim=1, keepdim=True)  # (B/G, 1)
        base = (torch.nansum(grouped, dim=1, keepdim=True) - grouped) / (scorable - 1)  # (B/G, G)
    advantages = grouped - base  # (B/G, G)
    if scale_rewards == "group":
        advantages = advantages / (nanstd(grouped) + STD_EPS)  # (B/G, 1)
    elif scale_rewards == "batch":
        advantages = advantages / (nanstd(rewards.view(1, -1)) + STD_EPS)  # (1, 1)
    return torch.nan_to_num(advantages, nan=0.0).view(-1)  # (B,)


def zero_std_groups(rewards: torch.Tensor, num_generations: int) -> float:
    """Fraction of groups whose rewards all tie (``frac_reward_zero_std``): they give no advantage, no gradient.

    A tie is TRL's test, ``isclose(group std, 0)``. TRL counts per completion from the std it scales by, so with
    ``scale_rewards: batch`` it reports 0 or 1 for the whole batch; this counts groups whatever the scaling.
    """
    std = nanstd(_grouped(rewards, num_generations)).squeeze(1)  # (B/G,)
    std = torch.nan_to_num(std, nan=0.0)  # a group with < 2 scorable rewards has no spread either
    return torch.isclose(std, torch.zeros_like(std)).float().mean().item()


@dataclass(frozen=True)
class GRPOStats:
    """What a GRPO step logs, as TRL names it: ``clip_ratio/low_mean``, ``/high_mean``, ``/region_mean``
    (fractions of completion tokens, or of sequences at sequence level) and ``kl`` (None when beta is 0).
    Means over this call's batch; detached."""

    clip_low: torch.Tensor
    clip_high: torch.Tensor
    clip_region: torch.Tensor
    kl: torch.Tensor | None


def loss_denominator(mask: torch.Tensor, loss_type: str, max_completion_length: int | None = None) -> torch.Tensor:
    """The normaliser of ``loss_type`` for the completions in ``mask`` (B, T); additive over batches.

    grpo: B (a mean of per-sequence means); bnpo and dapo: completion tokens; dr_grpo: B * max_completion_length.
    Summed over a step's micro-batches (and all-reduced over ranks) it is the step's normaliser: pass that sum as
    ``grpo_loss(denominator=...)`` and the step's loss does not depend on the split. bnpo and dapo differ only in
    which tokens TRL counts (bnpo: the micro-batch's; dapo: the whole generation batch's); given the step's
    tokens they are the same loss.
    """
    if loss_type == "grpo":
        return torch.tensor(float(mask.shape[0]), dtype=torch.float64)
    if loss_type in ("bnpo", "dapo"):
        return mask.sum().to(torch.float64)
    if loss_type == "dr_grpo":
        if max_completion_length is None:
            raise ValueError("loss_type dr_grpo needs max_completion_length")
        return torch.tensor(float(mask.shape[0] * max_completion_length), dtype=torch.float64)
    raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")


def grpo_loss(logps: torch.Tensor, old_logps: torch.Tensor | None, ref_logps: torch.Tensor | None,
              advantages: torch.Tensor, mask: torch.Tensor, loss_type: str = "dapo", beta: float = 0.0,
              epsilon_low: float = 0.2, epsilon_high: float | None = None,
              importance_sampling_level: str = "token", max_completion_length: int | None = None,
              denominator: torch.Tensor | float | None = None) -> tuple[torch.Tensor, GRPOStats]:
    """GRPO's clipped-surrogate loss with the k3 KL to a reference, as TRL 1.16's ``GRPOTrainer._compute_loss``.

    logps (B, T): log-probs of the sampled tokens under the policy being trained (with grad).
    old_logps (B, T): the same under the policy that sampled them; None means ``logps.detach()`` (one
    iteration per rollout, so the ratio is 1 and only its gradient matters). ref_logps (B, T): under the
    reference model, needed when beta > 0. advantages (B,). mask (B, T): 1 on completion tokens that carry loss.
    epsilon_high None means epsilon_low (TRL's ``epsilon_high`` default).

    denominator: None normalises within this batch exactly as TRL does for one process without accumulation
    (grpo: mean over sequences; bnpo, dapo: over tokens; dr_grpo: over B * max_completion_length). Pass the
    sum of ``loss_denominator`` over the whole step (all micro-batches, all ranks) to make the returned value
    this batch's share of the step's loss: summed over the step, it equals the loss of the step in one batch.
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    if importance_sampling_level not in IMPORTANCE_LEVELS:
        raise ValueError(f"importance_sampling_level must be one of {IMPORTANCE_LEVELS}, "
                         f"got {importance_sampling_level!r}")
    if beta != 0.0 and ref_logps is None:
        raise ValueError("beta > 0 needs ref_logps")
    epsilon_high = epsilon_low if epsilon_high is None else epsilon_high
    mask = mask.to(logps.dtype)  # (B, T)
    old_logps = logps.detach() if old_logps is None else old_logps  # (B, T)
    advantages = advantages.unsqueeze(1)  # (B, 1)

    log_ratio = logps - old_logps  # (B, T)
    if importance_sampling_level == "sequence":  # GSPO: one ratio per sequence, the geometric mean of its tokens'
        log_ratio = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)  # (B, 1)
    ratio = torch.exp(log_ratio)  # (B, T) or (B, 1)
    clipped = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high)
    per_token_loss = -torch.min(ratio * advantages, clipped * advantages)  # (B, T) or (B, 1)

    kl = None
    if beta != 0.0:
        delta = ref_logps - logps  # (B, T)
        kl = torch.exp(delta) - delta - 1  # (B, T): k3, an unbiased, non-negative estimate of KL(policy || ref)
        per_token_loss = per_token_loss + beta * kl  # broadcasts a (B, 1) sequence-level term to (B, T)

    if loss_type == "grpo":  # each sequence's token mean, then added over sequences
        numerator = ((per_token_loss * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).sum()
    else:  # bnpo, dapo, dr_grpo: added over all tokens
        numerator = (per_token_loss * mask).sum()
    if denominator is None:
        denominator = loss_denominator(mask, loss_type, max_completion_length).clamp(min=1.0)
    loss = numerator / torch.as_tensor(denominator, dtype=numerator.dtype)

    stats = _stats(ratio, advantages, mask, kl, epsilon_low, epsilon_high)
    return loss, stats


@torch.no_grad()
def _stats(ratio, advantages, mask, kl, epsilon_low, epsilon_high) -> GRPOStats:
    def masked_mean(x):  # TRL's global_masked_mean for one process
        if x.shape[1] == 1:  # sequence level: one value per sequence
            return x.sum() / x.shape[0]
        return (x * mask).sum() / mask.sum().clamp(min=1.0)

    low = (ratio < 1 - epsilon_low) & (advantages < 0)  # the clip that binds for a negative advantage
    high = (ratio > 1 + epsilon_high) & (advantages > 0)
    return GRPOStats(clip_low=masked_mean(low.to(mask.dtype)), clip_high=masked_mean(high.to(mask.dtype)),
                     clip_region=masked_mean((low | high).to(mask.dtype)),
                     kl=None if kl is None else masked_mean(kl.detach()))
