"""Masked-LM pretraining for encoder-only models (BERT, RoBERTa, ModernBERT, ...).

``method: mlm``, or ``method: pretrain`` on an encoder-only model (the plan in ``plan.py`` routes it). The shared data layer (``data/prepare.py``: mixing by weight, ``data.num_samples``, the cache, what
``lmforge prepare``/``inspect`` show) tokenises text rows and splits long documents into ``data.max_length``
blocks framed by the tokenizer's [CLS]/[SEP] (or BOS/EOS); each batch masks ``data.mlm_probability`` of the
tokens with transformers' ``DataCollatorForLanguageModeling`` (80% [MASK], 10% random, 10% kept), and the model
learns to restore them.
Checkpoints, resume and outputs are the shared ones.
"""

from __future__ import annotations

from transformers import AutoModelForMaskedLM, DataCollatorForLanguageModeling, Trainer

from lmforge.config import Config
from lmforge.data.split import prepare_split
from lmforge.errors import ConfigError, UnsupportedError
from lmforge.log import log
from lmforge.training.checkpoint import LmforgeTrainerMixin
from lmforge.training.run import load_model_and_tokenizer, run_trainer, start, trainer_hooks, training_args


class MaskedLMTrainer(LmforgeTrainerMixin, Trainer):
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if model.training:
            self.lmforge.counter.add(int(inputs["attention_mask"].sum()))
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)


def _check(cfg: Config) -> None:
    """What the plan leaves to the method (it routed the method and architecture here)."""
    if cfg.peft.kind == "prompt_tuning":
        raise UnsupportedError("peft.kind: prompt_tuning is not available for masked-LM pretraining")
    if not 0 < cfg.data.mlm_probability < 1:
        raise ConfigError(f"data.mlm_probability: must be in (0, 1), got {cfg.data.mlm_probability}")


def encode_texts(cfg: Config, tokenizer, role: str):
    """(datasets.Dataset of framed text blocks (``input_ids`` only, what the collator takes), Stats) from the shared
    data layer (mixed by weight, cached, what ``lmforge prepare``/``inspect`` show); (None, None) without rows."""
    ds, stats, _ = prepare_split(cfg, tokenizer, role, packed=False, architecture="encoder-only")
    return (ds.select_columns(["input_ids"]) if ds is not None else None), stats


def train(cfg: Config):
    _check(cfg)
    run = start(cfg)  # the plan (hf engine, one row per sample), train.distributed, the output directory
    cfg, resume = run.cfg, run.resume
    model, tokenizer, prec = load_model_and_tokenizer(cfg, auto_class=AutoModelForMaskedLM, task_type=None)
    if tokenizer.mask_token is None:
        raise ConfigError("model.tokenizer: masked-LM pretraining needs a tokenizer with a mask token")
    train_ds, train_stats = encode_texts(cfg, tokenizer, "train")
    eval_ds, _ = encode_texts(cfg, tokenizer, "eval")
    for line in train_stats.lines():
        log(f"train data: {line}")
    collator = DataCollatorForLanguageModeling(tokenizer, mlm=True, mlm_probability=cfg.data.mlm_probability)
    args = training_args(cfg, prec, has_eval=eval_ds is not None)
    trainer = MaskedLMTrainer(
        model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds, data_collator=collator,
        processing_class=tokenizer, lmforge=trainer_hooks(cfg),
    )
    return run_trainer(trainer, cfg, tokenizer, resume,
                       train_stats.lines() + [f"mlm_probability: {cfg.data.mlm_probability}"])
