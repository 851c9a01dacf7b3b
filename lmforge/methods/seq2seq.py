"""Encoder-decoder SFT (T5, BART, ...): input/output rows through transformers' ``Seq2SeqTrainer``.

``method: sft`` lands here when the model's config says ``is_encoder_decoder`` (``models.architecture``; the
registry in ``methods/__init__.py`` routes it).
The input goes to the encoder and the output is the decoder's target, so there is no prompt masking or
packing to do: the stock trainer and ``DataCollatorForSeq2Seq`` are used as they are. lmforge adds its
checkpoints and outputs (``LmforgeTrainerMixin``, ``OutputsCallback``), and with ``eval.metrics`` evaluates
by generating (``predict_with_generate``) and logs ``eval_rouge`` / ``eval_bleu`` / ``eval_exact_match``.
"""

from __future__ import annotations

import numpy as np
from transformers import AutoModelForSeq2SeqLM, DataCollatorForSeq2Seq, Seq2SeqTrainer, Seq2SeqTrainingArguments

from lmforge.config import Config
from lmforge.data.tokenize import IGNORE
from lmforge.errors import DataError
from lmforge.evaluation.metrics import compute_metrics
from lmforge.training.checkpoint import LmforgeTrainerMixin
from lmforge.training.eval_metrics import generation_metric_names
from lmforge.training.run import (
    load_model_and_tokenizer, log, prepare_output_dir, run_trainer, trainer_hooks, training_args,
)


class Seq2SeqLMTrainer(LmforgeTrainerMixin, Seq2SeqTrainer):
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if model.training:  # encoder + decoder tokens, for tokens/s
            self.lmforge.counter.add(int(inputs["attention_mask"].sum()) + int((inputs["labels"] != IGNORE).sum()))
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)


def _ids(tokenizer, text: str, max_length: int) -> list[int]:
    """Token ids ending with EOS (T5 tokenizers add it themselves; byte-level BPE ones do not)."""
    ids = tokenizer(text, add_special_tokens=True).input_ids
    if not ids or ids[-1] != tokenizer.eos_token_id:
        ids.append(tokenizer.eos_token_id)
    return ids[: max_length - 1] + [tokenizer.eos_token_id] if len(ids) > max_length else ids


def encode_split(cfg: Config, tokenizer, role: str, limit: int | None = None):
    """Input/output rows -> datasets.Dataset of encoder input_ids and decoder labels; None without rows."""
    from datasets import Dataset

    from lmforge.data.prepare import load_rows, sources_for

    if not sources_for(cfg, role):
        return None
    records = []
    for fmt, rows in load_rows(cfg, role)[0]:
        if fmt != "prompt_completion":
            where = rows[0].origin if rows else role
            raise DataError(f"{where}: encoder-decoder SFT needs input/output (prompt/completion) rows, got {fmt}")
        for r in rows:
            records.append({"input_ids": _ids(tokenizer, r.data["prompt"], cfg.data.max_length),
                            "labels": _ids(tokenizer, r.data["completion"], cfg.data.max_length)})
    records = records[:limit] if limit else records
    log(f"{role} data: {len(records)} input/output rows")
    return Dataset.from_list(records)


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
    resume = prepare_output_dir(cfg)
    model, tokenizer, prec = load_model_and_tokenizer(cfg, auto_class=AutoModelForSeq2SeqLM, task_type="SEQ_2_SEQ_LM")
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if getattr(base.config, "decoder_start_token_id", None) is None:  # from-scratch T5 configs lack it; T5 uses pad
        base.config.decoder_start_token_id = tokenizer.pad_token_id
        base.generation_config.decoder_start_token_id = tokenizer.pad_token_id
    names = generation_metric_names(cfg)
    generate = cfg.train.predict_with_generate or bool(names)
    train_ds = encode_split(cfg, tokenizer, "train")
    # generating is slow: with generation metrics, evaluate on the first eval.max_samples rows only
    eval_ds = encode_split(cfg, tokenizer, "eval", limit=cfg.eval.max_samples if generate else None)
    args = training_args(cfg, prec, has_eval=eval_ds is not None, args_cls=Seq2SeqTrainingArguments,
                         predict_with_generate=generate, generation_max_length=cfg.eval.max_new_tokens + 1)
    trainer = Seq2SeqLMTrainer(
        model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds,
        data_collator=DataCollatorForSeq2Seq(tokenizer, model=base, label_pad_token_id=IGNORE),
        processing_class=tokenizer, lmforge=trainer_hooks(cfg),
        compute_metrics=metrics_fn(tokenizer, names) if generate and names else None,
    )
    return run_trainer(trainer, cfg, tokenizer, resume, [f"{len(train_ds)} input/output rows"])
