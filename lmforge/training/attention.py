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
    B, H, T, D = query.shape
    groups = H // key.shape[1]  # grouped-query attention: query heads per key/value head
    scale = scaling if scaling is not None else D ** -0.5
    p = dropout if module.training else 0.0
    rows = []
    # rows by unbind and samples by split, not by indexing: the backward of an index or slice adds its gradient
    # into a zero tensor of the whole input's size, once per sample per layer (measured on the AMX kind: a
    # quarter of an SFT step); unbind's and split's backwards are one stack and one cat
    for q_row, k_row, v_row, lens in zip(query.unbind(0), key.unbind(0), value.unbind(0), packed_seq_lens):
        masks = [_masked(n, query.device) for n in lens]  # (n, n) True = masked
        sizes = [m.shape[0] for m in masks]
        split = sizes + ([T - sum(sizes)] if sum(sizes) < T else [])  # right padding: attends nowhere, no loss
        pieces = []
        for masked, q, k, v in zip(masks, q_row.split(split, dim=1), k_row.split(split, dim=1),
                                   v_row.split(split, dim=1)):
            k = k.repeat_interleave(groups, dim=0)  # (H, n, D), as transformers' repeat_kv
            v = v.repeat_interleave(groups, dim=0)
            scores = torch.matmul(q, k.transpose(1, 2))  # (H, n, n), softmax in fp32 at least (fp64 stays fp64)
            scores = scores.to(torch.promote_types(scores.dtype, torch.float32)) * scale
            probs = torch.softmax(scores.masked_fill_(masked, float("-inf")), dim=-1).to(q.dtype)
            pieces.append(torch.matmul(F.dropout(probs, p) if p else probs, v))  # (H, n, D)
        if len(split) > len(sizes):
            pieces.append(query.new_zeros(H, split[-1], D))
        rows.append(torch.cat(pieces, dim=1))
    return torch.stack(rows).transpose(1, 2).contiguous(), None


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
