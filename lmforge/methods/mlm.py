"""Masked-LM pretraining for encoder-only models (BERT, RoBERTa, ModernBERT, ...).

``method: mlm``, or ``method: pretrain`` on an encoder-only model (``sft.train`` dispatches here). Text rows
are tokenised and long documents split into ``data.max_length`` pieces framed by the tokenizer's [CLS]/[SEP]
(or BOS/EOS); each batch masks ``data.mlm_probability`` of the tokens with transformers'
``DataCollatorForLanguageModeling`` (80% [MASK], 10% random, 10% kept), and the model learns to restore them.
Checkpoints, resume and outputs are the shared ones.
"""

from __future__ import annotations

from transformers import AutoModelForMaskedLM, DataCollatorForLanguageModeling, Trainer

from lmforge.config import Config
from lmforge.errors import ConfigError, DataError, UnsupportedError
from lmforge.training.checkpoint import LmforgeTrainerMixin
from lmforge.training.run import (
    load_model_and_tokenizer, log, prepare_output_dir, run_trainer, trainer_hooks, training_args,
)


class MaskedLMTrainer(LmforgeTrainerMixin, Trainer):
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if model.training:
            self.lmforge.counter.add(int(inputs["attention_mask"].sum()))
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)


def _check(cfg: Config) -> None:
    from lmforge.models import architecture

    if cfg.method == "sft":
        raise UnsupportedError("method: sft on an encoder-only model; encoder-only models support masked-LM "
                               "pretraining only (method: mlm)")
    if architecture(cfg) != "encoder-only":
        raise UnsupportedError("method: mlm needs an encoder-only model (BERT-style); causal LMs use method: pretrain")
    if cfg.peft.kind == "prompt_tuning":
        raise UnsupportedError("peft.kind: prompt_tuning is not available for masked-LM pretraining")
    if not 0 < cfg.data.mlm_probability < 1:
        raise ConfigError(f"data.mlm_probability: must be in (0, 1), got {cfg.data.mlm_probability}")


def encode_texts(cfg: Config, tokenizer, role: str):
    """Text rows -> datasets.Dataset of framed pieces of at most data.max_length tokens; None without rows."""
    from datasets import Dataset

    from lmforge.data.prepare import load_rows, sources_for

    if not sources_for(cfg, role):
        return None
    start = tokenizer.cls_token_id if tokenizer.cls_token_id is not None else tokenizer.bos_token_id
    end = tokenizer.sep_token_id if tokenizer.sep_token_id is not None else tokenizer.eos_token_id
    frame = [t for t in (start, end) if t is not None]
    width = cfg.data.max_length - len(frame)
    records = []
    for _, rows in load_rows(cfg, role)[0]:
        for r in rows:
            ids = tokenizer(r.data["text"], add_special_tokens=False).input_ids
            for i in range(0, len(ids), width):
                piece = ([start] if start is not None else []) + ids[i:i + width] + ([end] if end is not None else [])
                records.append({"input_ids": piece})
    if not records:
        raise DataError(f"no {role} text left after tokenisation")
    log(f"{role} data: {len(records)} pieces, {sum(len(r['input_ids']) for r in records)} tokens")
    return Dataset.from_list(records)


def train(cfg: Config):
    _check(cfg)
    resume = prepare_output_dir(cfg)
    model, tokenizer, prec = load_model_and_tokenizer(cfg, auto_class=AutoModelForMaskedLM, task_type=None)
    if tokenizer.mask_token is None:
        raise ConfigError("model.tokenizer: masked-LM pretraining needs a tokenizer with a mask token")
    train_ds, eval_ds = encode_texts(cfg, tokenizer, "train"), encode_texts(cfg, tokenizer, "eval")
    collator = DataCollatorForLanguageModeling(tokenizer, mlm=True, mlm_probability=cfg.data.mlm_probability)
    args = training_args(cfg, prec, has_eval=eval_ds is not None)
    trainer = MaskedLMTrainer(
        model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds, data_collator=collator,
        processing_class=tokenizer, lmforge=trainer_hooks(cfg),
    )
    return run_trainer(trainer, cfg, tokenizer, resume, [f"{len(train_ds)} text pieces, mlm_probability "
                                                         f"{cfg.data.mlm_probability}"])
