"""Direct Preference Optimization on TRL's DPOTrainer.

The loss variants (``dpo.loss_type``: sigmoid, ipo, hinge, robust, ...), the reference forward and the
metrics (``rewards/chosen``, ``rewards/rejected``, ``rewards/accuracies``, ``rewards/margins``,
``logps/...``; ``eval_``-prefixed at evaluation) are TRL's. The reference model is the frozen starting model:
with LoRA/QLoRA the same base weights with the adapter disabled (one copy in memory), with
``dpo.precompute_ref_log_probs`` log-probs scored once before training, otherwise a frozen second copy.
The starting model may be an SFT run's output directory (a full model, or an adapter that is continued).
"""

from __future__ import annotations

from trl import DPOConfig, DPOTrainer

from lmforge.config import Config
from lmforge.training.checkpoint import LmforgeTrainerMixin
from lmforge.training.preference import (
    DropReferenceAdapterAtEnd, TokenCountingMixin, drop_fresh_reference_adapter, reference_model, setup,
)
from lmforge.training.run import run_trainer, training_args


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
        callbacks=[run.callback, DropReferenceAdapterAtEnd()],
    )
    drop_fresh_reference_adapter(trainer, run)
    trainer.token_counter = run.counter
    run.trainer_ref.append(trainer)
    return trainer


def train(cfg: Config):
    run = setup(cfg)
    trainer = build_trainer(cfg, run)
    return run_trainer(trainer, cfg, run.tokenizer, run.resume, run.data_lines)
