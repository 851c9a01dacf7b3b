"""GRPO / RLOO math (lmforge/training/rl.py): the loss against TRL 1.16's own loss code on fixed float64
batches, advantages against numbers worked out by hand, and the loss's independence of how a step is split."""

from __future__ import annotations

import itertools
import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
from trl.trainer.grpo_trainer import GRPOTrainer

from lmforge.training.rl import group_advantages, grpo_loss, loss_denominator, zero_std_groups

LOSS_TYPES = ["grpo", "bnpo", "dr_grpo", "dapo"]
LEVELS = ["token", "sequence"]
L = 7  # completion positions in the fixed batch
MAX_LEN = 10  # max_completion_length: above L, as when no completion of a batch reaches the limit


def _batch(B: int = 8, seed: int = 9):  # seed 9: both clip sides bind at token level
    """A fixed float64 rollout batch: (B, L) log-probs near each other so some ratios clip, ragged masks."""
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(B, L, generator=g, dtype=torch.float64) * 3  # (B, L)
    logps = old + torch.randn(B, L, generator=g, dtype=torch.float64) * 0.3  # (B, L): ratios around 1 +- 0.3
    ref = old + torch.randn(B, L, generator=g, dtype=torch.float64) * 0.2  # (B, L)
    lengths = torch.tensor([L, 3, 5, 1, 6, L, 2, 4][:B])
    mask = (torch.arange(L)[None, :] < lengths[:, None]).long()  # (B, L)
    advantages = torch.randn(B, generator=g, dtype=torch.float64)  # (B,)
    return logps, old, ref, advantages, mask


def _trl_loss(logps, old, ref, advantages, mask, loss_type, beta, eps_low, eps_high, level,
              grad_accum=1, num_items_in_batch=None):
    """TRL's ``GRPOTrainer._compute_loss`` run unchanged on a stand-in ``self``.

    It needs ``self`` only for settings, the metrics dict, the accelerator's gather/reduce and the forward
    (``_get_per_token_logps_and_entropies``); a SimpleNamespace with those attributes, one process, and a
    forward that returns our fixed log-probs lets its loss code run as shipped. Returns (loss, metrics).
    """
    B, T = mask.shape
    stub = SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *a, **k: (logps, torch.zeros_like(logps), None),
        top_entropy_quantile=1.0, aux_loss_enabled=False, off_policy_mask_threshold=None,
        importance_sampling_level=level, beta=beta, loss_type=loss_type, epsilon_low=eps_low,
        epsilon_high=eps_high, use_vllm=False, vllm_importance_sampling_correction=False,
        model=SimpleNamespace(training=True), current_gradient_accumulation_steps=grad_accum,
        max_completion_length=MAX_LEN, _entropy_bonus_enabled=False, _metrics={"train": defaultdict(list)},
        args=SimpleNamespace(use_bias_correction_kl=False, delta=None, steps_per_generation=grad_accum),
        accelerator=SimpleNamespace(num_processes=1, gather=lambda x: x, reduce=lambda x, reduction: x),
    )
    inputs = {
        "prompt_ids": torch.zeros(B, 1, dtype=torch.long), "prompt_mask": torch.ones(B, 1, dtype=torch.long),
        "completion_ids": torch.zeros(B, T, dtype=torch.long), "completion_mask": mask,
        "advantages": advantages, "old_per_token_logps": old, "ref_per_token_logps": ref,
        "num_items_in_batch": mask.sum() if num_items_in_batch is None else num_items_in_batch,
    }
    return GRPOTrainer._compute_loss(stub, None, inputs), stub._metrics["train"]


@pytest.mark.parametrize("loss_type,level,beta", list(itertools.product(LOSS_TYPES, LEVELS, [0.0, 0.04])))
def test_loss_gradients_and_stats_equal_trl(loss_type, level, beta):
    logps, old, ref, adv, mask = _batch()
    eps_low, eps_high = 0.2, 0.28  # epsilon_high != epsilon so the two clip sides are told apart
    ours_in = logps.clone().requires_grad_()
    trl_in = logps.clone().requires_grad_()
    ours, stats = grpo_loss(ours_in, old, ref, adv, mask, loss_type=loss_type, beta=beta, epsilon_low=eps_low,
                            epsilon_high=eps_high, importance_sampling_level=level, max_completion_length=MAX_LEN)
    theirs, metrics = _trl_loss(trl_in, old, ref, adv, mask, loss_type, beta, eps_low, eps_high, level)
    ours.backward()
    theirs.backward()
    assert abs(ours.item() - theirs.item()) < 1e-10
    assert (ours_in.grad - trl_in.grad).abs().max().item() < 1e-10
    assert ours_in.grad.abs().max().item() > 0
    assert abs(stats.clip_low.item() - metrics["clip_ratio/low_mean"][0]) < 1e-7
    assert abs(stats.clip_high.item() - metrics["clip_ratio/high_mean"][0]) < 1e-7
    assert abs(stats.clip_region.item() - metrics["clip_ratio/region_mean"][0]) < 1e-7
    if beta:
        assert abs(stats.kl.item() - metrics["kl"][0]) < 1e-12
    else:
        assert stats.kl is None and "kl" not in metrics
    if level == "token":  # the batch is built so that both sides clip somewhere (at sequence level, rarely)
        assert stats.clip_low.item() > 0 and stats.clip_high.item() > 0


@pytest.mark.parametrize("loss_type,level,beta", list(itertools.product(LOSS_TYPES, LEVELS, [0.0, 0.04])))
def test_split_step_equals_whole_step(loss_type, level, beta):
    """Two micro-batches, each divided by the whole step's denominator, add up to the whole step: loss and
    gradients (trl#3021). The halves hold different token counts (16 and 19)."""
    logps, old, ref, adv, mask = _batch()
    kw = dict(loss_type=loss_type, beta=beta, epsilon_low=0.2, epsilon_high=0.28,
              importance_sampling_level=level, max_completion_length=MAX_LEN)
    whole_in = logps.clone().requires_grad_()
    whole, _ = grpo_loss(whole_in, old, ref, adv, mask, **kw)
    whole.backward()
    denominator = loss_denominator(mask[:4], loss_type, MAX_LEN) + loss_denominator(mask[4:], loss_type, MAX_LEN)
    assert denominator.item() == loss_denominator(mask, loss_type, MAX_LEN).item()  # additive
    split_in = logps.clone().requires_grad_()
    parts = [grpo_loss(split_in[s], old[s], ref[s], adv[s], mask[s], denominator=denominator, **kw)[0]
             for s in (slice(0, 4), slice(4, 8))]
    total = parts[0] + parts[1]
    total.backward()
    assert abs(total.item() - whole.item()) < 1e-12
    assert (split_in.grad - whole_in.grad).abs().max().item() < 1e-12
    # without the step's denominator, token-normalised losses do depend on the split (what the test guards)
    if loss_type in ("bnpo", "dapo"):
        naive = sum(grpo_loss(logps[s], old[s], ref[s], adv[s], mask[s], **kw)[0] / 2
                    for s in (slice(0, 4), slice(4, 8)))
        assert abs(naive.item() - whole.item()) > 1e-6


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "dapo"])
def test_split_matches_trl_accumulation(loss_type):
    """Where TRL's accumulation is split-proof (grpo, dr_grpo over equal micro-batches; dapo over the generation
    batch's tokens), TRL's two micro-batch losses add up to ours over the whole step."""
    logps, old, ref, adv, mask = _batch()
    ours, _ = grpo_loss(logps, old, ref, adv, mask, loss_type=loss_type, beta=0.04, epsilon_low=0.2,
                        epsilon_high=0.28, max_completion_length=MAX_LEN)
    theirs = sum(_trl_loss(logps[s], old[s], ref[s], adv[s], mask[s], loss_type, 0.04, 0.2, 0.28, "token",
                           grad_accum=2, num_items_in_batch=mask.sum())[0]
                 for s in (slice(0, 4), slice(4, 8)))
    assert abs(ours.item() - theirs.item()) < 1e-12


# Hand example: three groups of G = 3.
#   [1, 2, 3]: mean 2 -> [-1, 0, 1]; Bessel std 1.
#   [5, 5, 5]: all tie -> [0, 0, 0]; std 0.
#   [0, 0, 3]: mean 1 -> [-1, -1, 2]; Bessel std sqrt((1 + 1 + 4) / 2) = sqrt(3).
# Leave-one-out means: [2.5, 2, 1.5] -> [-1.5, 0, 1.5]; [5, 5, 5] -> 0s; [1.5, 1.5, 0] -> [-1.5, -1.5, 3].
# Batch: mean 24/9 = 8/3, squared deviations sum to 306/9 = 34, Bessel var 34/8 = 4.25.
REWARDS = torch.tensor([1.0, 2, 3, 5, 5, 5, 0, 0, 3], dtype=torch.float64)
CENTRED = torch.tensor([-1.0, 0, 1, 0, 0, 0, -1, -1, 2], dtype=torch.float64)
LOO = torch.tensor([-1.5, 0, 1.5, 0, 0, 0, -1.5, -1.5, 3], dtype=torch.float64)
GROUP_STD = torch.tensor([1.0, 1, 1, 0, 0, 0, 3 ** 0.5, 3 ** 0.5, 3 ** 0.5], dtype=torch.float64)


@pytest.mark.parametrize("baseline,scale,expected", [
    ("group", "none", CENTRED),
    ("group", "group", CENTRED / (GROUP_STD + 1e-4)),
    ("group", "batch", CENTRED / (math.sqrt(4.25) + 1e-4)),
    ("rloo", "none", LOO),
    ("rloo", "group", LOO / (GROUP_STD + 1e-4)),
    ("rloo", "batch", LOO / (math.sqrt(4.25) + 1e-4)),
])
def test_advantages_by_hand(baseline, scale, expected):
    got = group_advantages(REWARDS, 3, scale_rewards=scale, baseline=baseline)
    assert torch.allclose(got, expected, rtol=0, atol=1e-12)
    assert got[3:6].abs().max().item() == 0  # the tied group: no advantage, so no gradient


def test_tied_groups_counted_and_give_no_gradient():
    assert zero_std_groups(REWARDS, 3) == pytest.approx(1 / 3)
    assert zero_std_groups(torch.full((6,), 0.5, dtype=torch.float64), 3) == 1.0
    assert zero_std_groups(torch.tensor([0.0, 1, 0, 1]), 2) == 0.0
    logps, old, ref, _, mask = _batch(B=6)
    adv = group_advantages(torch.tensor([1.0, 1, 1, 0, 2, 5], dtype=torch.float64), 3)  # first group ties
    logps.requires_grad_()
    grpo_loss(logps, old, ref, adv, mask[:6], loss_type="grpo")[0].backward()
    assert logps.grad[:3].abs().max().item() == 0 and logps.grad[3:].abs().max().item() > 0


def test_unscorable_rewards_left_out():
    """A NaN reward (no function applies) is out of its group's baseline and std, and gets advantage 0:
    group [1, nan, 3] has mean 2 and Bessel std sqrt(2); leave-one-out: 1 - 3 = -2 and 3 - 1 = 2."""
    r = torch.tensor([1.0, float("nan"), 3], dtype=torch.float64)
    assert torch.allclose(group_advantages(r, 3, "none"), torch.tensor([-1.0, 0, 1], dtype=torch.float64))
    assert torch.allclose(group_advantages(r, 3, "group"),
                          torch.tensor([-1.0, 0, 1], dtype=torch.float64) / (2 ** 0.5 + 1e-4))
    assert torch.allclose(group_advantages(r, 3, "none", "rloo"), torch.tensor([-2.0, 0, 2], dtype=torch.float64))


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_on_policy_loss_is_advantage_weighted_yet_moves_the_weights(loss_type):
    """num_iterations 1, beta 0: the ratio is exactly 1, so the loss is minus the normalised sum of advantages
    (0 for grpo with zero-mean groups; for token-normalised types, the length-weighted sum, near 0 only when
    lengths are alike), while its gradient -A / denominator on each token is not 0."""
    logps, _, _, _, mask = _batch()
    adv = group_advantages(torch.tensor([1.0, 0, 0, 1, 3, 2, 0, 1], dtype=torch.float64), 4)
    logps.requires_grad_()
    loss, stats = grpo_loss(logps, None, None, adv, mask, loss_type=loss_type, max_completion_length=MAX_LEN)
    loss.backward()
    lengths = mask.sum(-1).double()
    expected = {"grpo": -adv.mean(), "bnpo": -(adv * lengths).sum() / lengths.sum(),
                "dapo": -(adv * lengths).sum() / lengths.sum(), "dr_grpo": -(adv * lengths).sum() / (8 * MAX_LEN)}
    assert abs(loss.item() - expected[loss_type].item()) < 1e-12
    if loss_type == "grpo":
        assert abs(loss.item()) < 1e-12
    assert logps.grad.abs().max().item() > 0
    assert stats.clip_region.item() == 0
