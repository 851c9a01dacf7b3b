"""The causal-LM loss both engines and every causal method use: next-token cross-entropy summed over the
positions that carry loss, with the LM head run only there.

Why by hand: on a 49k vocabulary the output layer is a large share of a step's compute, and SFT masks most
prompt tokens; so the decoder stack and the head are called apart (``decoder_and_head``), the head only on
loss positions, in chunks (``cross_entropy.py``). Where splitting the model is unsafe (prompt tuning, logit
soft-capping, a DDP or FSDP wrapper whose forward must run) the full forward runs instead, said once.
The library's callers (``flops.py``, ``preference.py``, the native engine through the methods' objectives) and
the recipes (``methods/sft.py``) import it from here.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from lmforge.data.tokenize import IGNORE
from lmforge.log import log
from lmforge.training.cross_entropy import linear_cross_entropy

log_once = functools.cache(log)  # a fallback taken at every step is said once per process


def decoder_and_head(model):
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
    parts = decoder_and_head(model)
    if parts is not None:
        decoder, head = parts
        return causal_lm_loss(decoder(**inputs).last_hidden_state, head, labels)
    logits = model(**inputs).logits[:, -labels.shape[1]:]  # prompt tuning prepends virtual positions
    return causal_lm_loss(logits, torch.nn.Identity(), labels)  # the logits are the head's output already
