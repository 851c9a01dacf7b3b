"""Supervised fine-tuning (and, through ``pretrain.py``, causal-LM pretraining) on the HF Trainer.

What lmforge adds to the stock Trainer, and why:
  * the loss runs the LM head only on positions that carry loss: on a 49k vocabulary the output layer is a
    large share of the compute, and SFT masks most prompt tokens anyway;
  * the loss is a sum over loss tokens divided by the real number of loss tokens in the whole accumulated
    (and, with DDP, global) batch, so 1 x 8 equals 8 x 1 with accumulation;
  * packed rows carry a block-diagonal mask (see ``data/packing.py``).
"""

from __future__ import annotations

import os

import torch
from transformers import Trainer

from lmforge.config import Config
from lmforge.data.origins import ROWS, numbered
from lmforge.data.packing import CausalCollator
from lmforge.data.split import prepare_split
from lmforge.data.streaming import PackedStream
from lmforge.data.tokenize import IGNORE
from lmforge.distributed.ranks import world_size
from lmforge.log import log
from lmforge.training import flops
from lmforge.training.attention import NAME as PACKED_ATTENTION, use_packed_attention
from lmforge.training.checkpoint import LmforgeTrainerMixin
from lmforge.training.eval_metrics import add_generation_metrics, generation_scorer
from lmforge.training.losses import token_loss_sum
from lmforge.training.native import NativeTrainer
from lmforge.training.objective import Objective
from lmforge.training.run import load_model_and_tokenizer, run_trainer, start, trainer_hooks, training_args


class CausalLMTrainer(LmforgeTrainerMixin, Trainer):
    loss_is_scaled_for_ga = True  # compute_loss divides by the loss tokens of the whole accumulated batch

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.model_accepts_loss_kwargs = True  # makes the Trainer count num_items_in_batch for us

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        n_tokens = inputs.pop("num_tokens", None)
        loss_sum, n_loss = token_loss_sum(model, inputs)
        if num_items_in_batch is None:  # evaluation: mean over this batch
            loss = loss_sum / max(n_loss, 1)
        else:
            loss = loss_sum / num_items_in_batch
            if self.args.average_tokens_across_devices and self.accelerator.num_processes > 1:
                loss = loss * self.accelerator.num_processes  # DDP averages gradients; undo it (global token mean)
        if model.training and n_tokens is not None:
            self.lmforge.counter.add(n_tokens)
        return (loss, None) if return_outputs else loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, dict(inputs))
        return loss.detach(), None, None


class CausalLMObjective(Objective):
    """The native engine's view of pretrain/SFT (``training/native.py``): summed token cross-entropy over the
    loss tokens (``token_loss_sum``), averaged over the loss tokens of the whole step."""

    unit = "tokens"
    perplexity = True
    stat_keys = ()

    def __init__(self, collator):
        self.collator = collator

    def batch(self, split: str, rows: list[int], records: list[dict]) -> dict:
        return self.collator(records)

    def count(self, batch: dict) -> int:
        return int((batch["labels"][:, 1:] != IGNORE).sum())

    def loss(self, model, batch: dict) -> tuple[torch.Tensor, dict]:
        loss, _ = token_loss_sum(model, batch)
        return loss, {}

    def flops_batch(self, records: list[dict]) -> dict:
        return self.collator(records)


class CountingCollator(CausalCollator):
    """Adds the number of non-padding tokens, for tokens/s, and the rows' numbers where the records carry them
    (``origins.numbered``: the hf engine's NaN stop names the rows of its step)."""

    def __call__(self, rows):
        batch = super().__call__(rows)
        batch["num_tokens"] = sum(len(r["input_ids"]) for r in rows)
        if ROWS in rows[0]:
            batch[ROWS] = [r[ROWS] for r in rows]
        return batch


def train(cfg: Config):
    run = start(cfg)  # the plan (engine, packing), train.distributed, the output directory
    cfg, packed = run.cfg, run.plan.packing
    model, tokenizer, prec = load_model_and_tokenizer(cfg)
    if cfg.data.packing and not packed:
        log(f"packing is off: {run.plan.packing_reason}")
    stream = None
    if cfg.data.streaming:  # read, tokenised and packed while training (data/streaming.py)
        stream = PackedStream(cfg, tokenizer, packed, int(os.environ.get("RANK", "0")), world_size())
        train_ds, train_lines = None, [f"streamed from {len(cfg.data.train)} source(s), shuffle buffer "
                                       f"{cfg.data.shuffle_buffer} samples, {'packed' if packed else 'one sample per row'}"]
    else:
        train_ds, train_stats, _ = prepare_split(cfg, tokenizer, "train", packed)
        train_lines = train_stats.lines()
    eval_ds, eval_stats, _ = prepare_split(cfg, tokenizer, "eval", packed)
    for line in train_lines:
        log(f"train data: {line}")
    attn = getattr(model.config, "_attn_implementation", None) or "sdpa"
    if cfg.train.engine == "native" and packed:
        if use_packed_attention(model):  # one causal SDPA call per packed sample, no dense mask
            attn = PACKED_ATTENTION
        else:
            log(f"packed rows use a dense block-diagonal mask: {attn} attention cannot run per sample")
    collator = CountingCollator(tokenizer.pad_token_id, packed=packed, attn_implementation=attn)
    if cfg.train.engine == "native":
        scorer = generation_scorer(cfg, tokenizer, eval_ds is not None, log)
        trainer = NativeTrainer(cfg, model, tokenizer, prec, train_ds, eval_ds, CausalLMObjective(collator),
                                train_lines, scorer, stream=stream)
        return trainer.train(run.resume)
    hooks = trainer_hooks(cfg, flops.per_token(model, collator([train_ds[0]])), prec, model.config)
    args = training_args(cfg, prec, has_eval=eval_ds is not None)
    trainer = CausalLMTrainer(
        model=model, args=args, train_dataset=numbered(train_ds), eval_dataset=eval_ds, data_collator=collator,
        processing_class=tokenizer, lmforge=hooks,
    )
    add_generation_metrics(trainer, cfg, tokenizer, log)  # eval.metrics: rouge/bleu/exact_match at each eval
    return run_trainer(trainer, cfg, tokenizer, run.resume, train_lines)
