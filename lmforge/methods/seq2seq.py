"""Encoder-decoder SFT (T5, BART, ...): input/output rows through transformers' ``Seq2SeqTrainer``.

``method: sft`` lands here when the model's config says ``is_encoder_decoder`` (``models.architecture``; the
plan in ``plan.py`` routes it).
The input goes to the encoder and the output is the decoder's target, so there is no prompt masking or
packing to do. The rows come from the shared data layer (``data/prepare.py``: mixing by weight,
``data.num_samples``, the cache, what ``lmforge prepare``/``inspect`` show); the stock trainer and
``DataCollatorForSeq2Seq`` are used as they are. lmforge adds its checkpoints and outputs
(``LmforgeTrainerMixin``, ``OutputsCallback``), and with ``eval.metrics`` evaluates by generating
(``predict_with_generate``) and logs ``eval_rouge`` / ``eval_bleu`` / ``eval_exact_match``.
"""

from __future__ import annotations

import numpy as np
from transformers import AutoModelForSeq2SeqLM, DataCollatorForSeq2Seq, Seq2SeqTrainer, Seq2SeqTrainingArguments

from lmforge.config import Config
from lmforge.data.split import prepare_split
from lmforge.data.tokenize import IGNORE
from lmforge.evaluation.metrics import compute_metrics
from lmforge.log import log
from lmforge.training.checkpoint import LmforgeTrainerMixin
from lmforge.training.eval_metrics import generation_metric_names
from lmforge.training.run import load_model_and_tokenizer, run_trainer, start, trainer_hooks, training_args


class Seq2SeqLMTrainer(LmforgeTrainerMixin, Seq2SeqTrainer):
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if model.training:  # encoder + decoder tokens, for tokens/s
            self.lmforge.counter.add(int(inputs["attention_mask"].sum()) + int((inputs["labels"] != IGNORE).sum()))
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)


def encode_split(cfg: Config, tokenizer, role: str, limit: int | None = None):
    """(datasets.Dataset of encoder input_ids and decoder labels, Stats), from the shared data layer (mixed by
    weight, cached, what ``lmforge prepare``/``inspect`` show); (None, None) without rows. ``limit``: the first rows."""
    ds, stats, _ = prepare_split(cfg, tokenizer, role, packed=False, architecture="encoder-decoder")
    if ds is not None and limit and limit < len(ds):
        ds = ds.select(range(limit))
    return ds, stats


def metrics_fn(tokenizer, names: list[str]):
    """compute_metrics for Seq2SeqTrainer: decode generated ids and labels, score with evaluation.metrics."""

    def compute(eval_pred):
        preds, labels = eval_pred.predictions, eval_pred.label_ids
        preds = preds[0] if isinstance(preds, tuple) else preds
        pad = tokenizer.pad_token_id
        preds = np.where(preds == IGNORE, pad, preds)  # the eval loop pads across batches with -100
        labels = np.where(labels == IGNORE, pad, labels)
        decoded = [t.strip() for t in tokenizer.batch_decode(preds, skip_special_tokens=True)]
        refs = [t.strip() for t in tokenizer.batch_decode(labels, skip_special_tokens=True)]
        return compute_metrics(names, decoded, refs)

    return compute


def train(cfg: Config):
    run = start(cfg)  # the plan (hf engine, one row per sample), train.distributed, the output directory
    cfg, resume = run.cfg, run.resume
    model, tokenizer, prec = load_model_and_tokenizer(cfg, auto_class=AutoModelForSeq2SeqLM, task_type="SEQ_2_SEQ_LM")
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if getattr(base.config, "decoder_start_token_id", None) is None:  # from-scratch T5 configs lack it; T5 uses pad
        base.config.decoder_start_token_id = tokenizer.pad_token_id
        base.generation_config.decoder_start_token_id = tokenizer.pad_token_id
    names = generation_metric_names(cfg)
    generate = cfg.train.predict_with_generate or bool(names)
    train_ds, train_stats = encode_split(cfg, tokenizer, "train")
    for line in train_stats.lines():
        log(f"train data: {line}")
    # generating is slow: with generation metrics, evaluate on the first eval.max_samples rows only
    eval_ds, _ = encode_split(cfg, tokenizer, "eval", limit=cfg.eval.max_samples if generate else None)
    args = training_args(cfg, prec, has_eval=eval_ds is not None, args_cls=Seq2SeqTrainingArguments,
                         predict_with_generate=generate, generation_max_length=cfg.eval.max_new_tokens + 1)
    trainer = Seq2SeqLMTrainer(
        model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds,
        data_collator=DataCollatorForSeq2Seq(tokenizer, model=base, label_pad_token_id=IGNORE),
        processing_class=tokenizer, lmforge=trainer_hooks(cfg),
        compute_metrics=metrics_fn(tokenizer, names) if generate and names else None,
    )
    return run_trainer(trainer, cfg, tokenizer, resume, train_stats.lines())
