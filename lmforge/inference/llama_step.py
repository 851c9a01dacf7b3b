"""A one-token forward for the decode loop's steps on Llama-architecture models: fewer, larger ops per layer.

Why by hand: a decode step runs every layer on one token per row (32-256 rows), where an op's fixed cost
dominates. Measured on the AMX kind (2 threads, bf16): a small matmul costs ~30-60 us beside its arithmetic, and
``F.linear`` reorders the weight into oneDNN's blocked layout at every call, which makes decode-sized matmuls run
at about half the speed of large ones. Here, per layer:

- q/k/v are one matmul over their concatenated weights, and gate/up another (7 matmuls become 4);
- where oneDNN runs bf16 natively (``torch.ops.mkldnn._is_mkldnn_bf16_supported``) and the weights are bf16, every
  weight (the LM head too) is packed once per ``Decoder.run`` into oneDNN's layout
  (``torch.ops.mkldnn._reorder_linear_weight``, what Inductor's freezing pass does) and applied with
  ``torch.ops.mkldnn._linear_pointwise`` (same values as ``F.linear``, bitwise); elsewhere ``F.linear``;
- rotary embedding of q and k in one set of elementwise ops, the padding mask built once for all layers;
- with packed weights, the matmuls' rows padded to a multiple of 16 (``PACKED_ROW_MULTIPLE``); attention and the
  cache see the real rows only, its output written into a zero-padded buffer;
- with ``fused`` (the decode loop's default where ``decode_kernels`` builds, for SiLU models in bf16 or fp32), the
  elementwise work in three kernels a layer instead of ~20 torch ops: the residual add with the next RMSNorm, the
  rotary embedding in place, SiLU(gate) x up. Each rounds to the model dtype where the torch ops do; the rotary
  embedding is bitwise theirs, the norm's mean of squares and SiLU's exp are summed and approximated in another
  order (within a bf16 step: tested), so fused steps are close to, not bitwise, the transformers forward.

Unfused, the arithmetic is the modules' own, op by op (the norms' statistics by torch's fused ``rms_norm``, equal to
their five ops; the rotary embedding and the activation are the model's modules; the attention is the one passed in,
``decode_attention.attend_matmul`` in the test), so on a tiny Llama the logits equal the transformers forward's bitwise
(tested). One step is not bitwise on every shape: oneDNN may block a joint q/k/v matmul differently from the narrower k and v
ones (seen on SmolLM2-135M in bf16: a few rows' v differ in the last bit; packing and the joint gate/up were
bitwise there), so long greedy outputs can part from the transformers forward's, as they do when the batch
shape changes (on the benchmark's 256 prompts, 128 of the 256 rows' outputs stay identical).

``build`` takes a model only when its classes' forwards are Llama's by code (``_llama_classes``) and every projection
is a plain ``nn.Linear``; anything else (a row adapter's wrapped layers, Gemma's norm, Qwen's q/k norms) keeps the
transformers forward.

Memory: the fused and packed weights are a second copy of the layers' and the head's weights while a run lasts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.inference import decode_kernels
from lmforge.models import same_code


# Rows of a packed (oneDNN bf16) step's matmuls are padded to a multiple of this. Why: oneDNN's AMX kernels work on
# tiles of 16 rows, and a row count just below a multiple of 16 costs more than the multiple (measured, AMX kind, 30
# layers' linears and the head: 248 rows 49-51 ms, 256 rows 40 ms; 232 45 vs 240 40; 136 27 vs 144 26), and one
# primitive serves up to 16 batch sizes. Only where weights are packed: unmeasured elsewhere.
PACKED_ROW_MULTIPLE = 16


def _llama_classes() -> dict[str, type]:
    from transformers.models.llama import modeling_llama as m

    return {"causal_lm": m.LlamaForCausalLM, "model": m.LlamaModel, "layer": m.LlamaDecoderLayer,
            "attention": m.LlamaAttention, "mlp": m.LlamaMLP, "norm": m.LlamaRMSNorm}


class _Linear:
    """A weight (out, in) applied as ``F.linear``, or packed for oneDNN once (``pack``): the same values."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, pack: bool):
        self.bias = bias
        self.packed = pack
        self.weight = torch.ops.mkldnn._reorder_linear_weight(weight) if pack else weight

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed:
            return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)


class _Norm:
    """``LlamaRMSNorm``'s arithmetic (statistics in fp32, cast back, then the weight) with torch's fused ``rms_norm``
    for the fp32 part: one op instead of five (pow, mean, add, rsqrt, mul), the same values (tested)."""

    def __init__(self, module: nn.Module):
        self.weight, self.eps = module.weight.detach(), module.variance_epsilon

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * torch.rms_norm(x.float(), [x.shape[-1]], None, self.eps).to(x.dtype)


@dataclass
class _Layer:
    input_norm: _Norm
    post_norm: _Norm
    qkv: _Linear  # (q heads + 2 * kv heads) * head_dim outputs
    o: _Linear
    gate_up: _Linear  # 2 * intermediate outputs
    down: _Linear
    act: nn.Module
    scaling: float


def _plain(*modules) -> bool:
    return all(type(m) is nn.Linear and not (m._forward_hooks or m._forward_pre_hooks) for m in modules)


def _is_llama(model) -> bool:
    """Whether ``model``'s forward is Llama's, class by class (so transformers' copies for other names qualify), with
    plain linear projections."""
    kinds = _llama_classes()
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)

    def same(module, kind: str) -> bool:
        forward = getattr(type(module), "forward", None)
        return hasattr(forward, "__code__") and same_code(forward, kinds[kind].forward) and \
            not (module._forward_hooks or module._forward_pre_hooks)

    if layers is None or not same(model, "causal_lm") or not same(inner, "model") or not same(inner.norm, "norm"):
        return False
    if len(layers) != model.config.num_hidden_layers:
        return False
    for layer in layers:
        attn, mlp = layer.self_attn, layer.mlp
        if not (same(layer, "layer") and same(attn, "attention") and same(mlp, "mlp")
                and same(layer.input_layernorm, "norm") and same(layer.post_attention_layernorm, "norm")):
            return False
        if not _plain(attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj):
            return False
    head = model.lm_head
    return _plain(head) and head.bias is None


def packs(dtype: torch.dtype) -> bool:
    """Whether weights of ``dtype`` are packed for oneDNN: bf16 where oneDNN runs it natively (measured only on the
    AMX kind: decode matmuls ~1.2-1.6x faster there)."""
    return dtype == torch.bfloat16 and torch.backends.mkldnn.is_available() and \
        torch.ops.mkldnn._is_mkldnn_bf16_supported()


def _joined(*linears: nn.Linear, pack: bool) -> _Linear:
    weight = torch.cat([m.weight.detach() for m in linears])  # a copy: the model's own weights stay as they are
    biases = [m.bias for m in linears]
    bias = None
    if any(b is not None for b in biases):
        bias = torch.cat([b.detach() if b is not None else weight.new_zeros(m.out_features)
                          for b, m in zip(biases, linears)])
    return _Linear(weight, bias, pack)


class LlamaStep:
    """The decode step (one new token per row) of a Llama-architecture model, on the decode loop's cache."""

    def __init__(self, model, attend, fused: bool = True):
        self.attend = attend  # (q (B, kv, group, dim), keys, values, mask (B, 1, 1, L), scaling, out=) -> out
        inner = model.model
        dtype = inner.embed_tokens.weight.dtype
        self.kernels = None  # decode_kernels' ops, when the step's elementwise work runs fused (``fused``)
        if fused and _fusable(model):
            self.kernels = decode_kernels.load()
        pack = packs(dtype) and inner.embed_tokens.weight.device.type == "cpu"
        self.embed, self.norm, self.rotary = inner.embed_tokens, _Norm(inner.norm), inner.rotary_emb
        self.head = _joined(model.lm_head, pack=pack)
        self.row_multiple = PACKED_ROW_MULTIPLE if pack else 1
        cfg = model.config
        self.heads, self.kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        self.layers = []
        for layer in inner.layers:
            a, m = layer.self_attn, layer.mlp
            self.layers.append(_Layer(_Norm(layer.input_layernorm), _Norm(layer.post_attention_layernorm),
                                      _joined(a.q_proj, a.k_proj, a.v_proj, pack=pack), _joined(a.o_proj, pack=pack),
                                      _joined(m.gate_proj, m.up_proj, pack=pack), _joined(m.down_proj, pack=pack),
                                      m.act_fn, a.scaling))
        self.head_dim = inner.layers[0].self_attn.head_dim
        self.intermediate = inner.layers[0].mlp.gate_proj.out_features

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor, cache,
                 shared=None) -> torch.Tensor:
        """Logits (B, vocab) of the next token after ``tokens`` (B,) at ``positions`` (B,); ``mask`` (B, L) marks
        the cached positions each row attends to, the new one last. Writes the new keys/values into ``cache``.
        ``shared``: (per layer (keys, values) (kv, P, dim), rows (B,) bool): a prefix the rows flagged start with
        (their first P attended positions), for the attention to read once (``decode_attention.attend``)."""
        batch, heads, kv, dim = tokens.shape[0], self.heads, self.kv_heads, self.head_dim
        spare = -batch % self.row_multiple  # rows of padding for the matmuls (PACKED_ROW_MULTIPLE); not attended
        x = self.embed(torch.cat([tokens, tokens.new_zeros(spare)]) if spare else tokens)  # (B + spare, C)
        cos, sin = self.rotary(x, positions[:, None])  # (B, 1, dim): broadcast over the heads below
        half = dim // 2
        # rotate_half(t) * sin = cat(-t2, t1) * sin = cat(t2, t1) * cat(-sin1, sin2): the same products (a sign
        # flip is exact), one negation per step instead of one per layer
        sin = torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)
        width = mask.shape[1]
        cap = cache.layers[0].capacity_for(1)
        # the padding mask as an additive fp32 bias (0 or -inf), built once for every layer: the same scores as
        # transformers' boolean SDPA mask with fewer ops per layer (decode_attention.attend adds it in place)
        allowed = torch.full((batch, 1, 1, cap), float("-inf"), device=x.device)
        allowed[:, 0, 0, :width].masked_fill_(mask.bool(), 0.0)
        out = x.new_zeros(batch + spare, heads * dim)  # each layer's attention output; the padding rows stay zero
        shared = [(k, v, shared[1]) for k, v in shared[0]] if shared is not None else [None] * len(self.layers)
        if self.kernels is not None:
            return self._fused(x, batch, cos.view(batch, dim), sin.view(batch, dim), allowed, out, cache, shared)
        for layer, cached, common in zip(self.layers, cache.layers, shared):
            qkv = layer.qkv(layer.input_norm(x))[:batch]  # (B, (heads + 2 kv) * dim)
            qk = qkv[:, :(heads + kv) * dim].view(batch, heads + kv, dim)
            qk = (qk * cos) + (torch.cat((qk[..., half:], qk[..., :half]), dim=-1) * sin)
            k = qk[:, heads:, None]  # (B, kv, 1, dim)
            v = qkv[:, (heads + kv) * dim:].view(batch, kv, 1, dim)
            keys, values = cached.update(k, v)
            self.attend(qk[:, :heads].reshape(batch, kv, heads // kv, dim), keys, values, allowed, layer.scaling,
                        out=out[:batch].view(batch, kv, heads // kv, dim), shared=common)
            x = x + layer.o(out)
            gate_up = layer.gate_up(layer.post_norm(x))
            x = x + layer.down(layer.act(gate_up[:, :self.intermediate]) * gate_up[:, self.intermediate:])
        return self.head(self.norm(x))[:batch]

    def _fused(self, x, batch, cos, sin, allowed, out, cache, shared) -> torch.Tensor:
        """The layers with their elementwise work in ``decode_kernels``: x (B + spare, C) is the residual stream,
        updated in place, h its normed copy for the next matmul."""
        ops, heads, kv, dim = self.kernels, self.heads, self.kv_heads, self.head_dim
        h, act = torch.empty_like(x), x.new_empty(x.shape[0], self.intermediate)
        norms = [layer.input_norm for layer in self.layers[1:]] + [self.norm]
        ops.add_rms_norm(x, None, self.layers[0].input_norm.weight, self.layers[0].input_norm.eps, h)
        for layer, cached, following, common in zip(self.layers, cache.layers, norms, shared):
            qkv = layer.qkv(h)[:batch]
            qk = ops.rotary(qkv[:, :(heads + kv) * dim].view(batch, heads + kv, dim), cos, sin)
            keys, values = cached.update(qk[:, heads:, None], qkv[:, (heads + kv) * dim:].view(batch, kv, 1, dim))
            self.attend(qk[:, :heads].reshape(batch, kv, heads // kv, dim), keys, values, allowed, layer.scaling,
                        out=out[:batch].view(batch, kv, heads // kv, dim), shared=common)
            ops.add_rms_norm(x, layer.o(out), layer.post_norm.weight, layer.post_norm.eps, h)
            ops.add_rms_norm(x, layer.down(ops.silu_mul(layer.gate_up(h), act)), following.weight, following.eps, h)
        return self.head(h)[:batch]


def _fusable(model) -> bool:
    """Whether ``decode_kernels`` cover the step's elementwise work: SiLU MLPs, a CPU model in bf16 or fp32, an even
    head dim up to 256."""
    from transformers.activations import SiLUActivation

    inner = model.model
    return inner.embed_tokens.weight.device.type == "cpu" and \
        inner.embed_tokens.weight.dtype in (torch.bfloat16, torch.float32) and \
        all(type(layer.mlp.act_fn) in (nn.SiLU, SiLUActivation) for layer in inner.layers) and \
        inner.layers[0].self_attn.head_dim % 2 == 0 and inner.layers[0].self_attn.head_dim <= 256


def build(model, attend, fused: bool = True) -> LlamaStep | None:
    """The decode step for ``model`` when it is a Llama-architecture model this forward covers, else None; ``fused``:
    its elementwise work in ``decode_kernels`` where they build and cover the model."""
    return LlamaStep(model, attend, fused) if _is_llama(model) else None
