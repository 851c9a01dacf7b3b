"""Kahneman-Tversky Optimization: unpaired answers labelled desirable or undesirable, on the native engine (the
default where it can run the config) or on TRL's KTOTrainer (``train.engine: hf``).

Rows are ``prompt`` + ``completion`` + ``label`` (true/false); preference rows are accepted too and give one
desirable (chosen) and one undesirable (rejected) example. The reference is the frozen starting model as for
DPO (adapter disabled with LoRA/QLoRA, else scored once before training on the native engine).

KTO estimates a KL term z from mismatched pairs (a prompt with another example's answer): the mean of policy
minus reference log-prob over them, clamped at 0 and detached. A desirable example's loss is
``desirable_weight * (1 - sigmoid(beta * (logratio - z)))``, an undesirable one's
``undesirable_weight * (1 - sigmoid(beta * (z - logratio)))`` (``kto_loss``, TRL 1.16's; ``apo_zero_unpaired``
has no z); the loss is their mean.

hf engine: TRL pairs each example's prompt with the previous example's answer inside a fixed batch of the
training order, and estimates z per micro-batch. TRL builds those pairs in its text pipeline, which lmforge
replaces with pre-tokenised records, so ``_prepare_dataset`` below rebuilds them the same way on a seeded
shuffle and the sampler keeps that order (TRL requires sequential sampling for KTO).

Native engine: each row's mismatched answer is fixed for the run (the answer of the row before it in a
seeded permutation, ``kl_partners``), so it packs with its row as one sample ``[prompt, answer, mismatched
answer]`` (the prompt computed once, ``SharedPromptCollator``) and the reference scores both once per row
(``ReferenceLogps``). z is estimated over the whole optimizer step (every micro-batch and rank, by a forward
without gradients before the step's first, ``before_step``), and over the whole eval set at evaluation; so
1 x 8 == 8 x 1 with accumulation == 2 processes x 4, and rows are sampled in the engine's seeded order.
Metrics: ``kl``, ``rewards/chosen``, ``logps/chosen`` (means over the step's desirable examples),
``rewards/rejected``, ``logps/rejected`` (over its undesirable ones); TRL's ``rewards/margins``, ``logits/...``
and ``entropy`` are only on the hf engine.
"""

from __future__ import annotations

import torch
from trl import KTOConfig, KTOTrainer

from lmforge.config import Config
from lmforge.data.preference import SharedPromptCollator
from lmforge.log import log
from lmforge.training import preference
from lmforge.training.checkpoint import EpochSampler, LmforgeTrainerMixin
from lmforge.training.preference import (
    DropReferenceAdapterAtEnd, ReferenceLogps, ScoredByReference, TokenCountingMixin, drop_fresh_reference_adapter,
    pair_attention, reference_model, token_logps,
)
from lmforge.training.run import trainer_hooks, training_args


# --------------------------------------------------------------------------------------------- the loss
def kto_loss(logratios: torch.Tensor, desirable: torch.Tensor, kl: float, beta: float, loss_type: str = "kto",
             desirable_weight: float = 1.0, undesirable_weight: float = 1.0) -> torch.Tensor:
    """(N,) per-example losses of TRL 1.16's KTOTrainer from (N,) log-ratios (policy minus reference summed
    answer log-probs), (N,) desirable flags and the KL estimate ``kl`` (ignored by apo_zero_unpaired). TRL's
    batch loss is their mean; the native engine sums them over a step and divides by its examples."""
    if loss_type == "kto":
        chosen = 1 - torch.sigmoid(beta * (logratios - kl))
        rejected = 1 - torch.sigmoid(beta * (kl - logratios))
    else:  # apo_zero_unpaired
        chosen = 1 - torch.sigmoid(beta * logratios)
        rejected = torch.sigmoid(beta * logratios)
    return torch.where(desirable, desirable_weight * chosen, undesirable_weight * rejected)


def add_kl_completions(dataset, batch_size: int):
    """Rotate answers by one inside each batch of ``batch_size``: (x1,y_n), (x2,y1), ... as TRL does."""

    def rotate(batch):
        batch["KL_completion_ids"] = [batch["completion_ids"][-1]] + batch["completion_ids"][:-1]
        return batch

    return dataset.map(rotate, batched=True, batch_size=batch_size)


class LmforgeKTOTrainer(TokenCountingMixin, LmforgeTrainerMixin, KTOTrainer):
    """TRL's KTOTrainer with lmforge's checkpoints, a fixed seeded order and token counting."""

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        # lmforge already tokenised and truncated the rows (data/preference.py); only the KL pairs are missing.
        if dataset_name == "train":
            dataset = dataset.shuffle(seed=args.seed).flatten_indices()
        if self.calculate_KL:
            dataset = add_kl_completions(dataset, args.per_device_train_batch_size)
        return dataset

    def _get_train_sampler(self, train_dataset=None):
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        return EpochSampler(len(dataset), self.args.seed, shuffle=False)


def kto_args(cfg: Config, prec, has_eval: bool) -> KTOConfig:
    k = cfg.kto
    return training_args(
        cfg, prec, has_eval, args_cls=KTOConfig, beta=k.beta, loss_type=k.loss_type,
        desirable_weight=k.desirable_weight, undesirable_weight=k.undesirable_weight,
        max_length=cfg.data.max_length, precompute_ref_log_probs=k.precompute_ref_log_probs,
        disable_dropout=True, pad_to_multiple_of=None, train_sampling_strategy="sequential",
    )


def build_trainer(cfg: Config, run) -> LmforgeKTOTrainer:
    _log_examples(run)
    trainer = LmforgeKTOTrainer(
        model=run.model, ref_model=reference_model(cfg, run, cfg.kto.precompute_ref_log_probs),
        args=kto_args(cfg, run.prec, has_eval=run.eval_ds is not None), train_dataset=run.train_ds,
        eval_dataset=run.eval_ds, processing_class=run.tokenizer, callbacks=[DropReferenceAdapterAtEnd()],
        lmforge=trainer_hooks(cfg),
    )
    drop_fresh_reference_adapter(trainer, run)
    return trainer


# --------------------------------------------------------------------------------------------- native engine
def kl_partners(n: int, seed: int) -> list[int]:
    """Each row's mismatched partner for the KL estimate: the row before it in a seeded permutation (the
    first row's is the last), so every answer serves once as another prompt's mismatched answer."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    partner = [0] * n
    for k, row in enumerate(perm):
        partner[row] = perm[k - 1]
    return partner


class KTOObjective(ScoredByReference):
    """What the native engine's loop asks of a method (see ``training/native.py``): per example the loss sum,
    averaged over the step's examples; the KL estimate of the step first (``before_step``); metrics per
    desirable or undesirable example."""

    unit = ("examples", "desirable", "undesirable")  # the loss's; the other two average metrics only
    perplexity = False  # eval_loss is KTO's loss, not a token NLL
    stat_keys = ("kl", "rewards/chosen", "logps/chosen", "rewards/rejected", "logps/rejected")
    stat_units = {"rewards/chosen": 1, "logps/chosen": 1, "rewards/rejected": 2, "logps/rejected": 2}

    def __init__(self, cfg: Config, collator, reference: ReferenceLogps, datasets: dict, partners: dict):
        self.k, self.max_length = cfg.kto, cfg.data.max_length
        self.collator, self.reference = collator, reference
        self.datasets, self.partners = datasets, partners  # split -> dataset, split -> each row's KL partner
        self.kl = 0.0  # the KL estimate of the current step or evaluation (before_step)

    def batch(self, split: str, rows: list[int], records: list[dict]) -> dict:
        """Each example as a pair layout: its answer in the chosen slot, its mismatched answer in the rejected slot."""
        ds, partner = self.datasets[split], self.partners[split]
        laid_out = [{"prompt_ids": r["prompt_ids"], "chosen_ids": r["completion_ids"],
                     "rejected_ids": ds[partner[i]]["completion_ids"][:self.max_length - len(r["prompt_ids"])]}
                    for i, r in zip(rows, records)]
        batch = self.collator(laid_out)
        batch.update(split=split, rows=torch.tensor(rows), desirable=torch.tensor([bool(r["label"]) for r in records]))
        return batch

    def count(self, batch: dict) -> tuple[int, int, int]:
        desirable = int(batch["desirable"].sum())
        return len(batch["rows"]), desirable, len(batch["rows"]) - desirable

    @torch.no_grad()
    def before_step(self, trainer, batches: list[dict]) -> None:
        """z for the coming step (or evaluation): the mean over all its rows, on every rank, of policy minus
        reference log-prob of each prompt with its mismatched answer, clamped at 0 (TRL: per micro-batch)."""
        if self.k.loss_type != "kto":
            return
        sums = torch.zeros(2, dtype=torch.float64)  # KL log-ratio sum, rows
        for batch in batches:
            with trainer.autocast():
                mismatched = self.slot_logps(trainer.model, batch, 1).double()
            sums += torch.stack([(mismatched - self.reference(trainer.model, batch)[:, 1]).sum(),
                                 torch.tensor(float(len(mismatched)), dtype=torch.float64)])
        trainer.all_reduce(sums)
        self.kl = max(sums[0].item() / max(sums[1].item(), 1.0), 0.0)

    @staticmethod
    def slot_logps(model, batch: dict, slot: int) -> torch.Tensor:
        """(B,) summed log-probs of each example's answer (slot 0) or mismatched answer (slot 1); the LM head
        runs only on the positions that predict that slot's tokens."""
        mine = batch["answer_index"] % 2 == slot
        token = token_logps(model, batch, batch["pred_index"][mine], batch["targets"][mine])
        sums = torch.zeros(len(batch["rows"]), dtype=token.dtype, device=token.device)
        return sums.index_add_(0, batch["answer_index"][mine] // 2, token)

    def loss(self, model, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        logps = self.slot_logps(model, batch, 0)  # (B,) the answers (the mismatched ones count in before_step)
        ratios = logps - self.reference(model, batch)[:, 0].to(logps.dtype)  # (B,)
        desirable = batch["desirable"]
        losses = kto_loss(ratios, desirable, self.kl, self.k.beta, self.k.loss_type, self.k.desirable_weight,
                          self.k.undesirable_weight)
        with torch.no_grad():
            answer, d = logps.detach().double(), desirable.double()
            rewards = self.k.beta * ratios.detach().double()
            stats = torch.stack([torch.tensor(self.kl * len(answer), dtype=torch.float64), (rewards * d).sum(),
                                 (answer * d).sum(), (rewards * (1 - d)).sum(), (answer * (1 - d)).sum()])
        return losses.sum(), dict(zip(self.stat_keys, stats.tolist()))


def _log_examples(run) -> None:
    labels = run.train_ds["label"]
    log(f"kto examples: {sum(labels)} desirable, {len(labels) - sum(labels)} undesirable")


def train_native(cfg: Config, run):
    _log_examples(run)
    datasets = {"train": run.train_ds, "eval": run.eval_ds}
    sizes = {split: len(ds) for split, ds in datasets.items() if ds is not None}
    partners = {split: kl_partners(n, cfg.train.seed) for split, n in sizes.items()}
    fresh_adapter = cfg.peft.kind != "none" and not run.continues_adapter
    reference = ReferenceLogps(sizes, by_disabling=fresh_adapter and not cfg.kto.precompute_ref_log_probs)
    objective = KTOObjective(cfg, SharedPromptCollator(pair_attention(run.model)), reference, datasets, partners)
    return preference.train_native(cfg, run, objective)


def train(cfg: Config):
    return preference.train(cfg, train_native, build_trainer)
