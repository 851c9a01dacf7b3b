"""Kahneman-Tversky Optimization on TRL's KTOTrainer: unpaired answers labelled desirable or undesirable.

Rows are ``prompt`` + ``completion`` + ``label`` (true/false); preference rows are accepted too and give one
desirable (chosen) and one undesirable (rejected) example. Loss, reference handling and metrics are TRL's;
the reference is the frozen starting model as for DPO (adapter disabled with LoRA/QLoRA).

KTO estimates its KL term from mismatched pairs: each example's prompt with the previous example's answer
inside a fixed batch of the training order. TRL builds those in its text pipeline, which lmforge replaces
with pre-tokenised records, so ``_prepare_dataset`` below rebuilds them the same way on a seeded shuffle
and the sampler keeps that order (TRL requires sequential sampling for KTO).
"""

from __future__ import annotations

from trl import KTOConfig, KTOTrainer

from lmforge.config import Config
from lmforge.training.checkpoint import EpochSampler, LmforgeTrainerMixin
from lmforge.training.preference import (
    DropReferenceAdapterAtEnd, TokenCountingMixin, drop_fresh_reference_adapter, reference_model, setup,
)
from lmforge.training.run import log, run_trainer, trainer_hooks, training_args


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
    trainer = LmforgeKTOTrainer(
        model=run.model, ref_model=reference_model(cfg, run, cfg.kto.precompute_ref_log_probs),
        args=kto_args(cfg, run.prec, has_eval=run.eval_ds is not None), train_dataset=run.train_ds,
        eval_dataset=run.eval_ds, processing_class=run.tokenizer, callbacks=[DropReferenceAdapterAtEnd()],
        lmforge=trainer_hooks(cfg),
    )
    drop_fresh_reference_adapter(trainer, run)
    return trainer


def train(cfg: Config):
    run = setup(cfg)
    labels = run.train_ds["label"]
    log(f"kto examples: {sum(labels)} desirable, {len(labels) - sum(labels)} undesirable")
    return run_trainer(build_trainer(cfg, run), cfg, run.tokenizer, run.resume, run.data_lines)
