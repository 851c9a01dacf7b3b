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

import functools

import torch
import torch.nn.functional as F
from transformers import Trainer

from lmforge.config import Config
from lmforge.data.packing import CausalCollator
from lmforge.data.prepare import prepare_split
from lmforge.data.tokenize import IGNORE
from lmforge.training.checkpoint import LmforgeTrainerMixin
from lmforge.training.cross_entropy import linear_cross_entropy
from lmforge.training.eval_metrics import add_generation_metrics, generation_scorer
from lmforge.training.run import (
    load_model_and_tokenizer, log, prepare_output_dir, run_trainer, trainer_hooks, training_args,
)

log_once = functools.cache(log)  # a fallback taken at every step is said once per process


def _decoder_and_head(model):
    """The decoder stack and LM head of a causal LM (through a PEFT wrapper), or None if unsafe to split.

    Prompt tuning prepends virtual tokens inside PEFT's forward, and logit soft-capping lives in the
    model's forward: both need the full forward.
    """
    from torch.distributed.fsdp import FSDPModule

    if isinstance(model, FSDPModule):  # FSDP2 gathers the root's weights (embeddings, norm, head) in its forward only
        log_once("the LM head runs on every position under FSDP: FSDP2 gathers the head's weights only in the "
                 "model's own forward")
        return None
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        # calling the decoder and head of model.module would skip DDP's forward, which prepares the gradient
        # all-reduce; the native engine keeps the head-only path (it all-reduces gradients itself)
        log_once("the LM head runs on every position under DDP on train.engine: hf (the DDP wrapper's forward "
                 "must run); train.engine: native keeps running it only where there is loss")
        return None
    base = model
    if hasattr(model, "peft_config"):
        if getattr(model, "active_peft_config", None) is not None and model.active_peft_config.is_prompt_learning:
            return None
        base = model.get_base_model()
    cfg = getattr(base, "config", None)
    if cfg is None or getattr(cfg, "final_logit_softcapping", None) or getattr(cfg, "logit_scale", None):
        return None
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    decoder = getattr(base, getattr(base, "base_model_prefix", "model"), None)
    if head is None or decoder is None or decoder is base:
        return None
    return decoder, head


def causal_lm_loss(hidden: torch.Tensor, head, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(B, T, C) hidden states, the LM head, (B, T) labels -> (the sum of next-token cross-entropy over the
    positions whose next label is not IGNORE, how many there were). The head runs only on those positions: on
    a 49k vocabulary it is a large share of the compute, and SFT masks most prompt tokens."""
    targets = labels[:, 1:]  # (B, T-1): position t predicts token t + 1
    sel = targets != IGNORE
    # chunked (the (N, V) logits never exist whole) where the head is a plain linear layer whose weight is whole:
    # a head with hooks is called as a module (DeepSpeed ZeRO-3 gathers its weight in a forward pre-hook)
    if type(head) is torch.nn.Linear and head.bias is None and not (head._forward_pre_hooks or head._forward_hooks):
        return linear_cross_entropy(hidden[:, :-1][sel], head.weight, targets[sel]), int(sel.sum())
    logits = head(hidden[:, :-1][sel])  # (N, V)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # fp32 at least
    return F.cross_entropy(logits, targets[sel], reduction="sum"), int(sel.sum())


def token_loss_sum(model, batch: dict) -> tuple[torch.Tensor, int]:
    """``causal_lm_loss`` of ``model`` on ``batch`` (a collated batch with ``labels``)."""
    labels = batch["labels"]
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    parts = _decoder_and_head(model)
    if parts is not None:
        decoder, head = parts
        return causal_lm_loss(decoder(**inputs).last_hidden_state, head, labels)
    logits = model(**inputs).logits[:, -labels.shape[1]:]  # prompt tuning prepends virtual positions
    return causal_lm_loss(logits, torch.nn.Identity(), labels)  # the logits are the head's output already


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


class CausalLMObjective:
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
    """Adds the number of non-padding tokens, for tokens/s."""

    def __call__(self, rows):
        batch = super().__call__(rows)
        batch["num_tokens"] = sum(len(r["input_ids"]) for r in rows)
        return batch


def train(cfg: Config):
    from lmforge.methods import packing
    from lmforge.training.native import choose_engine

    choose_engine(cfg)  # the faster engine where it can run this config (docs/training.md)
    resume = prepare_output_dir(cfg)
    model, tokenizer, prec = load_model_and_tokenizer(cfg)
    packed = packing(cfg, "decoder", log)
    stream = None
    if cfg.data.streaming:  # read, tokenised and packed while training (data/streaming.py)
        from lmforge.data.streaming import PackedStream
        from lmforge.distributed.ranks import world_size

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
        from lmforge.training.attention import NAME, use_packed_attention

        if use_packed_attention(model):  # one causal SDPA call per packed sample, no dense mask
            attn = NAME
        else:
            log(f"packed rows use a dense block-diagonal mask: {attn} attention cannot run per sample")
    collator = CountingCollator(tokenizer.pad_token_id, packed=packed, attn_implementation=attn)
    if cfg.train.engine == "native":
        from lmforge.training.native import NativeTrainer

        scorer = generation_scorer(cfg, tokenizer, eval_ds is not None, log)
        trainer = NativeTrainer(cfg, model, tokenizer, prec, train_ds, eval_ds, CausalLMObjective(collator),
                                train_lines, scorer, stream=stream)
        return trainer.train(resume)
    from lmforge.training import flops

    hooks = trainer_hooks(cfg, flops.per_token(model, collator([train_ds[0]])), prec)
    args = training_args(cfg, prec, has_eval=eval_ds is not None)
    trainer = CausalLMTrainer(
        model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds, data_collator=collator,
        processing_class=tokenizer, lmforge=hooks,
    )
    add_generation_metrics(trainer, cfg, tokenizer, log)  # eval.metrics: rouge/bleu/exact_match at each eval
    return run_trainer(trainer, cfg, tokenizer, resume, train_lines)
