"""The decode loop's attention and KV cache: one-token attention as two batched matmuls over grouped key/value
heads, a masked prefill on grouped heads, and cache layers that write new tokens into spare room.

Registered with transformers' attention and mask interfaces under ``ATTENTION`` (``use_decode_attention`` for the
decode loop's model, ``decoding_attention`` around GRPO's rollouts from a model being trained); ``attend`` is also
the attention of ``llama_step``'s one-token forward. The scheduling around them is ``decode.py``'s.
"""

from __future__ import annotations

import contextlib
import functools

import torch

from lmforge.inference import decode_kernels

ATTENTION = "lmforge_decode"


def decode_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """Attention for one query token per row, as two batched matmuls over the key/value heads.

    Why: torch's CPU SDPA kernels are built for long queries; for a single decoding token with a padding
    mask they cost several times the matmuls (measured: 0.25 vs 0.66-2.6 ms a layer at 64 rows). Same
    arithmetic as transformers' eager attention (scores in the model dtype, softmax in float32), without
    repeating the key/value heads. A masked prefill of grouped heads runs torch's SDPA on them as they are; anything
    else (dropout, extra kwargs) goes to transformers' SDPA.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if dropout or kwargs.get("position_bias") is not None or kwargs.get("softcap"):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    if query.shape[2] != 1:
        if attention_mask is None or key.shape[1] == query.shape[1]:
            return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, **kwargs)
        # a masked prefill with grouped key/value heads. Why not transformers': with a mask it repeats the key/value
        # heads on CPU (``use_gqa_in_sdpa``), a copy of the cache a layer (measured: 3.6 of 12 ms a layer at 256 x 17
        # prompt tokens); torch's CPU kernel takes grouped heads with a mask (``enable_gqa``): the same values (tested)
        out = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask,
                                                               scale=scaling, enable_gqa=True)
        return out.transpose(1, 2).contiguous(), None
    batch, heads, _, dim = query.shape
    kv_heads = key.shape[1]
    q = query.reshape(batch, kv_heads, heads // kv_heads, dim)  # query heads grouped under their key/value head
    out = attend(q, key, value, attention_mask, scaling if scaling is not None else dim ** -0.5)
    return out.reshape(batch, 1, heads, dim), None


def attend(q, key, value, attention_mask, scaling: float, out: torch.Tensor | None = None, shared=None) -> torch.Tensor:
    """One query token per row: q (batch, kv_heads, group, dim) over key/value (batch, kv_heads, positions, dim);
    ``attention_mask`` (batch, 1, 1, positions) boolean (True = attend) or additive, or None. Returns (batch,
    kv_heads, group, dim), written into ``out`` (contiguous, of that shape) if given. Scores in the model dtype,
    softmax in float32, as transformers' eager attention: by lmforge's fused kernel where it is built and covers the
    call (``decode_kernels``; it reads only the attended positions), else by ``attend_matmul``. ``shared``: (keys,
    values (kv_heads, L, dim), rows (batch,) bool), the L first attended positions of the rows flagged, which the
    kernel reads from this one copy (they are the same values: the rows' caches started with them)."""
    if decode_kernels.attention_applies(q, key, value, attention_mask, out if out is not None else q) and \
            (ops := decode_kernels.load()) is not None:
        return ops.one_token_attention(q, key, value, attention_mask.expand(q.shape[0], -1, -1, -1), scaling,
                                       out if out is not None else q.new_empty(q.shape), *(shared or ()))
    return attend_matmul(q, key, value, attention_mask, scaling, out)


def attend_matmul(q, key, value, attention_mask, scaling: float, out: torch.Tensor | None = None,
                  shared=None) -> torch.Tensor:
    """``attend`` as torch's batched matmuls over the whole key/value buffer (the reference the kernel is tested
    against; bitwise transformers' eager arithmetic in bf16). ``shared`` is not needed: the rows hold those values."""
    # the scores as key @ q^T, read back transposed into a new fp32 tensor (in place after). Why not q @ key^T: the
    # same values (the same dot products), but oneDNN streams the cache faster as the left operand (measured, AMX
    # kind, caches out of CPU cache: 0.78 vs 0.95 ms a layer at 256 rows x 73 positions, 116 vs 214 us at 32 x 172)
    scores = torch.matmul(key, q.transpose(-1, -2)).transpose(-1, -2)
    scores = scores.to(torch.float32, memory_format=torch.contiguous_format).mul_(scaling)
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            scores.masked_fill_(~attention_mask, float("-inf"))
        else:  # an additive mask (0 or -inf), e.g. LlamaStep's, built once per step for every layer
            scores.add_(attention_mask)
    probs = scores.softmax(-1).to(value.dtype)
    if out is None:
        return torch.matmul(probs, value)
    return torch.bmm(probs.flatten(0, 1), value.flatten(0, 1), out=out.view(-1, *out.shape[2:])).view(out.shape)


@functools.cache
def _roomy_layer():
    from transformers.cache_utils import DynamicLayer

    class RoomyLayer(DynamicLayer):
        """A DynamicLayer that writes new tokens into spare room instead of concatenating.

        Why: DynamicLayer copies the whole layer cache for every token (``torch.cat``), about 20% of a
        decode step at 64 rows (measured). Here keys/values are (batch, heads, capacity, dim) buffers of
        which the first ``n`` positions are written; the whole buffer is handed to attention (slicing it
        would make the batched matmuls copy it anyway), and the unwritten positions are hidden by the
        causal mask and by the padding mask, which transformers pads to ``get_mask_sizes``. A prefill (several
        tokens) gets the written positions only, a view: SDPA reads it without a copy (at 256 prompts of 41
        tokens, 41 positions instead of 73). When full the buffer grows by ``SPARE`` positions, so a token
        costs a copy only once every ``SPARE`` steps.
        """

        SPARE = 32

        def lazy_initialization(self, key_states, value_states) -> None:
            super().lazy_initialization(key_states, value_states)
            self.n = 0

        def capacity_for(self, query_length: int) -> int:
            """The buffer length once ``query_length`` more positions are written (grown if need be). A first
            write gets no spare room: transformers drops the mask of a first forward whose only masked
            positions lie past the query (relying on causal alignment), which single-token attention cannot."""
            if not self.is_initialized or not self.keys.numel():
                return query_length
            cap = self.keys.shape[-2]
            return cap if self.n + query_length <= cap else self.n + query_length + self.SPARE

        def update(self, key_states, value_states, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            q = key_states.shape[-2]
            cap = self.capacity_for(q)
            if not self.keys.numel() or cap != self.keys.shape[-2]:
                self.keys, self.values = (_regrow(t, self.n, cap, like) for t, like in
                                          ((self.keys, key_states), (self.values, value_states)))
            self.keys[:, :, self.n:self.n + q] = key_states
            self.values[:, :, self.n:self.n + q] = value_states
            self.n += q
            if q > 1:  # a prefill: SDPA reads the strided slice as it is, and would pay for the spare room
                return self.keys[:, :, :self.n], self.values[:, :, :self.n]
            return self.keys, self.values

        def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
            # a prefill attends to the written positions only (see ``update``)
            return (self.get_seq_length() + query_length if query_length > 1 else self.capacity_for(query_length)), 0

        def get_seq_length(self) -> int:
            return self.n if self.is_initialized else 0

    return RoomyLayer


def _regrow(t: torch.Tensor, n: int, cap: int, like: torch.Tensor) -> torch.Tensor:
    """A (batch, heads, cap, dim) zero buffer holding the first ``n`` positions of ``t``."""
    out = like.new_zeros(like.shape[0], like.shape[1], cap, like.shape[3])
    if n:
        out[:, :, :n] = t[:, :, :n]
    return out


def new_cache(model):
    """A DynamicCache for ``model`` whose layers write into spare room (RoomyLayer)."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    cache.layers = [_roomy_layer()() for _ in cache.layers]
    return cache


def use_decode_attention(model) -> None:
    """Switch a model on SDPA to ``decode_attention`` (its masks are SDPA's). Other implementations (flash, eager)
    are left alone."""
    if model.config._attn_implementation == "sdpa":
        _switch_to_decode_attention(model)


@contextlib.contextmanager
def decoding_attention(model):
    """``decode_attention`` inside the block, the model's own attention after it: for a model being trained
    whose attention is SDPA or a function that falls back to SDPA's for unpacked batches (training's packed
    attention), decoded between steps (GRPO's rollouts)."""
    before = model.config._attn_implementation
    _switch_to_decode_attention(model)
    try:
        yield
    finally:
        model.set_attn_implementation(before)


def _switch_to_decode_attention(model) -> None:
    """Register ``decode_attention`` with transformers' attention and mask interfaces under ``ATTENTION`` and
    switch ``model`` to it."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTENTION, decode_attention)
    AttentionMaskInterface.register(ATTENTION, sdpa_mask)
    model.set_attn_implementation(ATTENTION)
