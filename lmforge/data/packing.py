"""Packing and collation.

Packing puts several samples in one row (best-fit decreasing). The collator gives each packed row a
block-diagonal causal 4D mask and positions that restart per sample, so no token attends across a sample
boundary with SDPA or eager attention on CPU (transformers' own packed-sequence detection only covers some
paths; an explicit 4D mask is honoured by every attention implementation that accepts masks).
"""

from __future__ import annotations

import bisect
import random

import numpy as np

from lmforge.data.tokenize import IGNORE

PACKED_ATTENTION = "lmforge_packed_sdpa"  # lmforge.training.attention.NAME


def pack_bins(lengths, max_length: int, seed: int) -> list[list[int]]:
    """Best-fit-decreasing bins of at most max_length tokens, as lists of sample indices, in a seeded order.

    Works on lengths only (a numpy array or a list), so a million samples pack without their tokens in memory.
    """
    arr = np.asarray(lengths, dtype=np.int64)
    order = np.argsort(-arr, kind="stable").tolist()  # longest first, ties in sample order
    lengths = arr.tolist()
    smallest = min(lengths, default=0)
    free: list[tuple[int, int]] = []  # sorted (remaining capacity, bin index)
    bins: list[list[int]] = []
    for i in order:
        n = lengths[i]
        k = bisect.bisect_left(free, (n, -1))
        if k < len(free):
            cap, b = free.pop(k)
        else:
            cap, b = max_length, len(bins)
            bins.append([])
        bins[b].append(i)
        # a bin left with less room than the shortest sample can never take another one: keep it out of the
        # search list (same bins as keeping it, but the list stays short when samples have similar lengths)
        if cap - n > 0 and cap - n >= smallest:
            bisect.insort(free, (cap - n, b))
    random.Random(seed).shuffle(bins)
    return bins


def pack(samples: list[tuple[list[int], list[int]]], max_length: int, seed: int) -> list[dict]:
    """Best-fit-decreasing bins of at most max_length tokens; returns rows with input_ids, labels, seq_lens."""
    rows = []
    for members in pack_bins([len(s[0]) for s in samples], max_length, seed):
        ids: list[int] = []
        labels: list[int] = []
        for i in members:
            ids += samples[i][0]
            labels += samples[i][1]
        rows.append({"input_ids": ids, "labels": labels, "seq_lens": [len(samples[i][0]) for i in members]})
    return rows


def shared_prompt_mask(P: int, *answers: int) -> torch.Tensor:
    """(n, n) boolean mask, True = attend, of a prompt followed by several answers, ``[prompt, a1, a2, ...]``
    (a preference pair's chosen and rejected; GRPO's completions of one prompt): causal, except that no answer
    sees the answers before it. So each answer attends to exactly what it would in its own row ``prompt +
    answer``, with the prompt computed once."""
    import torch  # here, not at import: `lmforge prepare` needs no torch

    n = P + sum(answers)
    mask = torch.ones(n, n, dtype=torch.bool).tril_()
    start = P
    for length in answers:
        mask[start:start + length, P:start] = False
        start += length
    return mask


def block_causal_mask(seg: torch.Tensor, float_dtype: torch.dtype | None) -> torch.Tensor:
    """(B, T) segment ids -> (B, 1, T, T) mask: causal within a segment, nothing across segments.

    Boolean (True = attend) for SDPA; additive float (0 / -inf-like) when float_dtype is given (eager).
    """
    import torch

    T = seg.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool).tril_()
    mask = (seg[:, :, None] == seg[:, None, :]) & causal  # (B, T, T)
    mask = mask[:, None]  # (B, 1, T, T)
    if float_dtype is None:
        return mask
    return torch.zeros(mask.shape, dtype=float_dtype).masked_fill_(~mask, torch.finfo(float_dtype).min)


class CausalCollator:
    """Pads rows (right) into a batch for causal-LM training; packed rows get a block-diagonal 4D mask."""

    def __init__(self, pad_id: int, packed: bool, attn_implementation: str = "sdpa", pad_to_multiple_of: int = 1):
        self.pad_id = pad_id
        self.packed = packed
        self.attn = attn_implementation
        self.multiple = pad_to_multiple_of

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        import torch

        B = len(rows)
        T = max(len(r["input_ids"]) for r in rows)
        T = -(-T // self.multiple) * self.multiple
        input_ids = torch.full((B, T), self.pad_id, dtype=torch.long)
        labels = torch.full((B, T), IGNORE, dtype=torch.long)
        position_ids = torch.zeros((B, T), dtype=torch.long)
        # segment id per token: samples are 0, 1, ...; every pad token its own negative id (attends to itself only,
        # which keeps SDPA from producing NaN on fully masked rows)
        seg = -torch.arange(1, T + 1).repeat(B, 1)
        for b, r in enumerate(rows):
            n = len(r["input_ids"])
            input_ids[b, :n] = torch.tensor(r["input_ids"])
            labels[b, :n] = torch.tensor(r["labels"])
            start = 0
            for k, length in enumerate(r.get("seq_lens") or [n]):
                position_ids[b, start:start + length] = torch.arange(length)
                seg[b, start:start + length] = k
                start += length
        batch = {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}
        if self.packed and self.attn == PACKED_ATTENTION:  # one causal call per sample (training/attention.py)
            batch["packed_seq_lens"] = [list(r.get("seq_lens") or [len(r["input_ids"])]) for r in rows]
        elif self.packed:
            float_dtype = torch.float32 if self.attn == "eager" else None
            # flash-attention finds sample boundaries from the restarting position_ids itself
            if self.attn != "flash_attention_2":
                batch["attention_mask"] = block_causal_mask(seg, float_dtype)
        else:
            batch["attention_mask"] = (seg >= 0).long()
        return batch
