"""Direct Preference Optimization: on TRL's DPOTrainer (``train.engine: hf``) or on the native engine.

The native engine (the default where it can run the config: the engines' table in ``plan.py`` lists the
loss types it runs, ``NATIVE_DPO_LOSSES``, the keys of ``NATIVE_LOSSES`` below) trains the same loss faster: each pair is one packed sample
``[prompt, chosen, rejected]`` with the prompt computed once (``data/preference.py:SharedPromptCollator``),
no padding, the LM head only on answer tokens, and the reference log-probs computed once per row
(``training/preference.py:ReferenceLogps``). ``dpo_loss`` is TRL's per-pair loss as a pure function, tested
against TRL's trainer on the same batch (tests/test_dpo.py).

On the hf engine, the loss variants (``dpo.loss_type``: sigmoid, ipo, hinge, robust, ...), the reference forward and the
metrics (``rewards/chosen``, ``rewards/rejected``, ``rewards/accuracies``, ``rewards/margins``,
``logps/...``; ``eval_``-prefixed at evaluation) are TRL's. The reference model is the frozen starting model:
with LoRA/QLoRA the same base weights with the adapter disabled (one copy in memory), with
``dpo.precompute_ref_log_probs`` log-probs scored once before training, otherwise a frozen second copy.
The starting model may be an SFT run's output directory (a full model, or an adapter that is continued).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from trl import DPOConfig, DPOTrainer

from lmforge.config import Config
from lmforge.data.preference import SharedPromptCollator
from lmforge.training import preference
from lmforge.training.checkpoint import LmforgeTrainerMixin
from lmforge.training.preference import (
    DropReferenceAdapterAtEnd, ReferenceLogps, ScoredByReference, TokenCountingMixin, answer_logps,
    drop_fresh_reference_adapter, pair_attention, reference_model,
)
from lmforge.training.run import trainer_hooks, training_args


# --------------------------------------------------------------------------------------------- the loss
# TRL 1.16's per-pair DPO losses (DPOTrainer._compute_loss with f_divergence_type reverse_kl), as functions of
# the log-ratios c = logp(chosen) - ref_logp(chosen), r = likewise for rejected, beta, label smoothing eps and
# the answers' token counts (nc, nr). The batch-level variants (aot, aot_unpaired sort across the batch; sft
# averages over the batch's tokens) and discopop stay on the hf engine.
NATIVE_LOSSES = {
    "sigmoid": lambda c, r, b, eps, nc, nr: -F.logsigmoid(b * (c - r)),
    "hinge": lambda c, r, b, eps, nc, nr: torch.relu(1 - b * (c - r)),
    "ipo": lambda c, r, b, eps, nc, nr: (c / nc.clamp(min=1) - r / nr.clamp(min=1) - 1 / (2 * b)) ** 2,
    "sigmoid_norm": lambda c, r, b, eps, nc, nr: -F.logsigmoid(b * (c / nc.clamp(min=1) - r / nr.clamp(min=1))),
    "robust": lambda c, r, b, eps, nc, nr: (-(1 - eps) * F.logsigmoid(b * (c - r))
                                            + eps * F.logsigmoid(-b * (c - r))) / (1 - 2 * eps),
    "exo_pair": lambda c, r, b, eps, nc, nr: (
        torch.sigmoid(b * (c - r)) * (F.logsigmoid(b * (c - r)) - math.log1p(-eps))
        + torch.sigmoid(-b * (c - r)) * (F.logsigmoid(-b * (c - r)) - (math.log(eps) if eps > 0 else -math.inf))),
    "nca_pair": lambda c, r, b, eps, nc, nr: (-F.logsigmoid(b * c) - 0.5 * F.logsigmoid(-b * c)
                                              - 0.5 * F.logsigmoid(-b * r)),
    "bco_pair": lambda c, r, b, eps, nc, nr: -F.logsigmoid(b * c) - F.logsigmoid(-b * r),
    "sppo_hard": lambda c, r, b, eps, nc, nr: (c - 0.5 / b) ** 2 + (r + 0.5 / b) ** 2,
    "apo_zero": lambda c, r, b, eps, nc, nr: 1 - torch.sigmoid(b * c) + torch.sigmoid(b * r),
    "apo_down": lambda c, r, b, eps, nc, nr: torch.sigmoid(b * c) + 1 - torch.sigmoid(b * (c - r)),
}


def dpo_loss(logps: torch.Tensor, ref_logps: torch.Tensor, lengths: torch.Tensor, beta: float,
             loss_type: str = "sigmoid", label_smoothing: float = 0.0) -> torch.Tensor:
    """(B,) per-pair losses from (B, 2) summed answer log-probs (chosen, rejected) of the policy and the
    reference and the (B, 2) answer token counts. The batch loss is their mean (TRL) or, on the native engine,
    their sum over the whole step divided by the step's pairs."""
    ratios = logps - ref_logps  # (B, 2)
    return NATIVE_LOSSES[loss_type](ratios[:, 0], ratios[:, 1], beta, label_smoothing,
                                    lengths[:, 0].to(ratios.dtype), lengths[:, 1].to(ratios.dtype))


class LmforgeDPOTrainer(TokenCountingMixin, LmforgeTrainerMixin, DPOTrainer):
    """TRL's DPOTrainer with lmforge's checkpoints, sampler and token counting."""

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        # lmforge already tokenised prompt/chosen/rejected with the SFT chat template (data/preference.py) and
        # applied max_prompt_length/max_length; TRL's own pass would re-tokenise from text columns we do not keep.
        return dataset


def dpo_args(cfg: Config, prec, has_eval: bool) -> DPOConfig:
    d = cfg.dpo
    return training_args(
        cfg, prec, has_eval, args_cls=DPOConfig, beta=d.beta, loss_type=[d.loss_type],
        label_smoothing=d.label_smoothing, max_length=cfg.data.max_length,
        precompute_ref_log_probs=d.precompute_ref_log_probs, disable_dropout=True, pad_to_multiple_of=None,
    )


def build_trainer(cfg: Config, run) -> LmforgeDPOTrainer:
    args = dpo_args(cfg, run.prec, has_eval=run.eval_ds is not None)
    trainer = LmforgeDPOTrainer(
        model=run.model, ref_model=reference_model(cfg, run, cfg.dpo.precompute_ref_log_probs), args=args,
        train_dataset=run.train_ds, eval_dataset=run.eval_ds, processing_class=run.tokenizer,
        callbacks=[DropReferenceAdapterAtEnd()], lmforge=trainer_hooks(cfg),
    )
    drop_fresh_reference_adapter(trainer, run)
    return trainer


# --------------------------------------------------------------------------------------------- native engine
class DPOObjective(ScoredByReference):
    """What the native engine's loop asks of a method (see ``training/native.py``): batches of this method's
    rows, how many units a batch's loss is averaged over (pairs here), the loss sum and the metric sums."""

    unit = "pairs"
    perplexity = False  # eval_loss is a mean pair loss, not a token NLL
    stat_keys = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
                 "logps/rejected")

    def __init__(self, cfg: Config, collator, reference: ReferenceLogps):
        self.d, self.collator, self.reference = cfg.dpo, collator, reference

    def batch(self, split: str, rows: list[int], records: list[dict]) -> dict:
        batch = self.collator(records)
        batch.update(split=split, rows=torch.tensor(rows))
        return batch

    def count(self, batch: dict) -> int:
        return len(batch["rows"])

    def loss(self, model, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        logps = answer_logps(model, batch).view(-1, 2)  # (B, 2): chosen, rejected
        ref = self.reference(model, batch).to(logps.dtype)  # (B, 2)
        losses = dpo_loss(logps, ref, batch["answer_lengths"].view(-1, 2), self.d.beta, self.d.loss_type,
                          self.d.label_smoothing)
        with torch.no_grad():
            rewards = self.d.beta * (logps.detach() - ref)  # (B, 2)
            stats = torch.stack([rewards[:, 0].sum(), rewards[:, 1].sum(), (rewards[:, 0] > rewards[:, 1]).sum(),
                                 (rewards[:, 0] - rewards[:, 1]).sum(), logps[:, 0].sum(), logps[:, 1].sum()])
        return losses.sum(), dict(zip(self.stat_keys, stats.tolist()))


def train_native(cfg: Config, run):
    fresh_adapter = cfg.peft.kind != "none" and not run.continues_adapter
    sizes = {"train": len(run.train_ds), "eval": len(run.eval_ds) if run.eval_ds is not None else 0}
    reference = ReferenceLogps(sizes, by_disabling=fresh_adapter and not cfg.dpo.precompute_ref_log_probs)
    objective = DPOObjective(cfg, SharedPromptCollator(pair_attention(run.model)), reference)
    return preference.train_native(cfg, run, objective)


def train(cfg: Config):
    return preference.train(cfg, train_native, build_trainer)
