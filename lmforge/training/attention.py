"""Attention over packed rows: attention per sample, as two matmuls, instead of one masked SDPA call per row.

Packing puts several samples in a row; a dense block-diagonal mask (``data/packing.py``) makes SDPA compute
the whole ``T x T`` score matrix of the row, and its cost grows with ``max_length`` however short the samples
are. FlexAttention has no CPU backward and torch's varlen attention dispatches only to CUDA kernels
(NOTES.md). On CPU, per-sample attention written as matmul + fp32 softmax + matmul is also faster than
SDPA's CPU flash kernel, whose bf16 backward is slow: measured on a Zen 4 (bf16, 8 rows x 256 tokens, 9
heads), forward + backward per layer 64 ms for SDPA with the block mask, 63 ms for one causal SDPA call per
sample, 35 ms for this function. Attention was 17% of a native-engine step before (docs/training.md).

Registered with transformers' ``AttentionInterface`` under ``NAME``; the collator passes each row's sample
lengths as ``packed_seq_lens``, which transformers forwards to the attention function. Batches without it
(unpacked, generation) go to transformers' own SDPA function unchanged.

A sample may also be a prompt with several answers laid out as ``[prompt, a1, a2, ...]`` with the prompt computed
once (a preference pair, ``data/preference.py:SharedPromptCollator``; GRPO's completions of one prompt,
``methods/grpo.py``): its entry is the tuple ``(P, len(a1), len(a2), ...)`` and its mask is ``shared_prompt_mask``.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from lmforge.data.packing import PACKED_ATTENTION as NAME  # the collator's switch for this function
from lmforge.data.packing import shared_prompt_mask


def packed_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                     packed_seq_lens: list[list] | None = None, **kwargs):
    """(B, H, T, D) query, (B, Hkv, T, D) key/value -> ((B, T, H, D) output, None), as transformers expects.
    Each sample attends causally within itself only (a ``(P, a1, a2, ...)`` prompt with answers: each answer sees
    the prompt and itself); positions after the last sample (padding) get zeros."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if packed_seq_lens is None or query.shape[2] == 1:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    samples = [_row_samples(lens, query.device) for lens in packed_seq_lens]
    p = dropout if module.training else 0.0
    if p:  # dropout draws a mask on the probabilities: autograd's path keeps them (attention dropout is rare)
        out = reference_attention(query, key, value, samples, scale, p)
    else:
        out = PerSampleAttention.apply(query, key, value, samples, scale)
    return out.transpose(1, 2).contiguous(), None


def _row_samples(lens: list, device: torch.device) -> list[tuple[int, torch.Tensor]]:
    """(start position, (n, n) mask, True = masked) of each sample in a packed row."""
    out, start = [], 0
    for sample in lens:
        masked = _masked(sample, device)
        out.append((start, masked))
        start += masked.shape[0]
    return out


def _probs(q: torch.Tensor, k: torch.Tensor, masked: torch.Tensor, scale: float) -> torch.Tensor:
    """One sample's attention probabilities, (Hkv, groups, n, n) in fp32 (fp64 stays fp64), from its (H, n, D) queries
    and (Hkv, n, D) keys. The query heads that share a key head are stacked along the positions, so the keys are
    used as they are (no ``repeat_kv`` copy): (Hkv, groups * n, D) @ (Hkv, D, n)."""
    kv_heads, n = k.shape[0], k.shape[1]
    scores = torch.matmul(q.reshape(kv_heads, -1, q.shape[-1]), k.transpose(1, 2))  # (Hkv, groups * n, n)
    scores = scores.to(torch.promote_types(scores.dtype, torch.float32)) * scale
    return torch.softmax(scores.view(kv_heads, -1, n, n).masked_fill_(masked, float("-inf")), dim=-1)


class PerSampleAttention(torch.autograd.Function):
    """Causal attention within each packed sample, as matmul + fp32 softmax + matmul, with a hand-written backward.

    Why by hand: under autograd, every sample's slices, its repeated keys and values, its fp32 scores and both copies
    of its probabilities were kept for the backward and each became graph nodes: per layer about 30 MB at 8 x 512
    tokens and ~40 small ops per sample (profiled on the AMX kind: docs/training.md). Here the forward keeps only q, k
    and v, and the backward recomputes each sample's probabilities with the same ops (the same fp32 values) before
    the gradients of the two matmuls and the softmax, as FlashAttention does. ``reference_attention`` is the autograd
    version it is tested against."""

    @staticmethod
    def forward(ctx, query, key, value, samples, scale):
        B, H, T, D = query.shape
        out = query.new_zeros(B, H, T, D)  # padding after the last sample attends nowhere: zeros
        for b, row in enumerate(samples):
            for start, masked in row:
                end = start + masked.shape[0]
                k, v = key[b, :, start:end], value[b, :, start:end]
                probs = _probs(query[b, :, start:end], k, masked, scale).to(query.dtype)
                out[b, :, start:end] = torch.matmul(probs.flatten(1, 2), v).view(H, end - start, D)
        ctx.save_for_backward(query, key, value)
        ctx.samples, ctx.scale = samples, scale
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        query, key, value = ctx.saved_tensors
        H, D = query.shape[1], query.shape[3]
        kv_heads = key.shape[1]
        grad_q, grad_k, grad_v = torch.zeros_like(query), torch.zeros_like(key), torch.zeros_like(value)
        for b, row in enumerate(ctx.samples):
            for start, masked in row:
                end = start + masked.shape[0]
                q, k, v = query[b, :, start:end], key[b, :, start:end], value[b, :, start:end]
                probs = _probs(q, k, masked, ctx.scale)  # (Hkv, groups, n, n), as in the forward
                p = probs.to(query.dtype).flatten(1, 2)  # (Hkv, groups * n, n)
                g = grad_out[b, :, start:end].reshape(kv_heads, -1, D)  # (Hkv, groups * n, D)
                grad_v[b, :, start:end] = torch.matmul(p.transpose(1, 2), g)  # summed over the query groups
                dp = torch.matmul(g, v.transpose(1, 2)).to(probs.dtype).view_as(probs)
                ds = (probs * (dp - (dp * probs).sum(-1, keepdim=True)) * ctx.scale).to(query.dtype).flatten(1, 2)
                grad_q[b, :, start:end] = torch.matmul(ds, k).view(H, end - start, D)
                grad_k[b, :, start:end] = torch.matmul(ds.transpose(1, 2), q.reshape(kv_heads, -1, D))
        return grad_q, grad_k, grad_v, None, None


def reference_attention(query, key, value, samples, scale: float, dropout: float = 0.0) -> torch.Tensor:
    """``PerSampleAttention`` through autograd, (B, H, T, D); with dropout on the probabilities when ``dropout``."""
    B, H, T, D = query.shape
    rows = []
    # rows by unbind and samples by split, not by indexing: the backward of an index or slice adds its gradient
    # into a zero tensor of the whole input's size, once per sample per layer (measured on the AMX kind: a
    # quarter of an SFT step); unbind's and split's backwards are one stack and one cat
    for q_row, k_row, v_row, row in zip(query.unbind(0), key.unbind(0), value.unbind(0), samples):
        sizes = [masked.shape[0] for _, masked in row]
        split = sizes + ([T - sum(sizes)] if sum(sizes) < T else [])  # right padding: attends nowhere, no loss
        pieces = []
        for (_, masked), q, k, v in zip(row, q_row.split(split, dim=1), k_row.split(split, dim=1),
                                        v_row.split(split, dim=1)):
            probs = _probs(q, k, masked, scale).to(q.dtype).flatten(1, 2)  # (Hkv, groups * n, n)
            probs = F.dropout(probs, dropout) if dropout else probs
            pieces.append(torch.matmul(probs, v).view(H, -1, D))  # (H, n, D)
        if len(split) > len(sizes):
            pieces.append(query.new_zeros(H, split[-1], D))
        rows.append(torch.cat(pieces, dim=1))
    return torch.stack(rows)


_CAUSAL: dict[torch.device, torch.Tensor] = {}  # device -> the largest causal mask asked for so far


def _masked(sample: int | tuple[int, ...], device: torch.device) -> torch.Tensor:
    """The masked-out positions of one sample. A causal mask is the top-left corner of any larger one, so one
    mask serves every length (a mask cached per length held sum(n^2) bytes: 2.8 GB at max_length 2048)."""
    if isinstance(sample, tuple):
        return _shared_prompt_masked(sample, device)
    full = _CAUSAL.get(device)
    if full is None or full.shape[0] < sample:
        full = _CAUSAL[device] = torch.ones(sample, sample, dtype=torch.bool, device=device).triu_(1)
    return full[:sample, :sample]


@functools.lru_cache(maxsize=64)  # one step's pairs, reused by every layer; pairs rarely recur across steps
def _shared_prompt_masked(sample: tuple[int, ...], device: torch.device) -> torch.Tensor:
    return ~shared_prompt_mask(*sample).to(device)


def use_packed_attention(model) -> bool:
    """Switch ``model`` (SDPA) to ``packed_attention``; False (nothing changed) where the model cannot."""
    from peft import PeftModel
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    base = model.get_base_model() if isinstance(model, PeftModel) else model
    if getattr(base.config, "_attn_implementation", None) != "sdpa":
        return False
    AttentionInterface.register(NAME, packed_attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)  # padding masks of unpacked batches, as for SDPA
    try:
        base.set_attn_implementation(NAME)
    except (ValueError, AttributeError):  # a model that does not dispatch through AttentionInterface
        return False
    return True
