"""RMSNorm and the SwiGLU MLP as autograd nodes that keep less for the backward and recompute the rest.

Why by hand: under autograd, a Llama-style ``RMSNorm`` keeps an fp32 copy of its input and its bf16 normalised
output for the backward (6 bytes per element for a 2-byte input), and the MLP ``down(silu(gate(x)) * up(x))`` keeps
four (tokens x intermediate) tensors: the gate's output, its SiLU, the up projection and their product. Counted on
SmolLM2-135M (8 x 206 tokens, bf16, saved-tensor hooks): 331 MiB for the norms and 580 MiB for the MLPs, of 1.2 GiB
of activations in all. Here the norm keeps its bf16 input and one fp32 number per row, and the MLP keeps the gate and
up outputs only; the backward recomputes the rest (elementwise work, no matmul) with the same ops, so the values
are autograd's and the forward does the same arithmetic as the module it replaces.

The norm's output is what the next linears (q/k/v, gate/up, the head) save as their input: 2 bytes per element per
norm, again. Inside ``NormOutputs`` (the native engine's forward), a saved tensor that is a norm node's output is
kept as that node's recipe (its input, weight and rstd, which the node keeps anyway) and remade once in the backward
by the forward's own ops, so bitwise the same; on SmolLM2-135M 30 layers x 2 norms x (tokens x 576) bf16, 141 MiB at
2,048 tokens.

``use_recompute_layers`` gives these forwards to the modules whose own forward is exactly Llama's (compared by code,
so the copies transformers makes for Qwen2, Mistral, ... qualify and variants such as Gemma's ``1 + weight`` do
not). A call without autograd (evaluation, generation), under autocast or with mixed dtypes runs the module's own
forward; a down projection that is not a plain bias-free ``nn.Linear`` (e.g. a LoRA layer) stays a module call
after the SwiGLU node.
"""

from __future__ import annotations

import functools
import time
import types
import weakref
from pathlib import Path

import torch
from torch.autograd.function import once_differentiable

from lmforge.models import same_code


class RMSNorm(torch.autograd.Function):
    """``weight * (x * rsqrt(mean(x^2) + eps)).to(x.dtype)`` with the statistics in fp32, as ``LlamaRMSNorm``;
    keeps x (its dtype) and the fp32 rsqrt per row. Its elementwise work is ``kernels``' (``Kernels``)."""

    @staticmethod
    def forward(ctx, x, weight, eps: float, outputs: NormOutputs | None, kernels: Kernels):
        out, rstd = kernels.norm(x, weight, eps)
        ctx.save_for_backward(x, weight, rstd)
        ctx.kernels = kernels
        if outputs is not None:
            outputs.made(out, _Remade(x, weight, rstd, kernels))
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        x, weight, rstd = ctx.saved_tensors
        grad_x, grad_w = ctx.kernels.norm_grads(grad, x, weight, rstd, *ctx.needs_input_grad[:2])
        return grad_x, grad_w, None, None, None


def _norm(x, weight, eps: float):
    x32 = x.to(torch.float32)
    rstd = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)  # (N, 1)
    return _norm_output(x, weight, rstd), rstd


def _norm_output(x, weight, rstd):
    return weight * (x.to(torch.float32) * rstd).to(x.dtype)


def _norm_grad_x(grad, x, weight, rstd):
    x32 = x.to(torch.float32)
    g = (grad * weight).to(torch.float32)  # the gradient of the normalised x, (N, C)
    # d/dx of x * rstd(x): rstd * (g - x * rstd^2 * mean(g * x))
    dot = (g * x32).mean(-1, keepdim=True)
    return ((g - x32 * (rstd * rstd * dot)) * rstd).to(x.dtype)


def _norm_grad_w(grad, x, weight, rstd):  # autograd's: the product in the compute dtype, summed over the positions
    return (grad * (x.to(torch.float32) * rstd).to(x.dtype)).sum(0)


def _swiglu(gate, up):
    return torch.nn.functional.silu(gate) * up


def _swiglu_grads(grad_h, gate, up):
    return torch.ops.aten.silu_backward(grad_h * up, gate), grad_h * torch.nn.functional.silu(gate)


class Kernels:
    """The nodes' elementwise work on rows (N, C): torch's ops one by one, or, with ``ops`` (``train_kernels.cpp``,
    ``torch.ops.lmforge_train``), each function one pass over its inputs.

    Why fused: on SmolLM2-135M at 8 x 512 tokens (bf16, 2 threads, the AMX kind) a norm's forward and backward
    are ~14 elementwise passes over (tokens x 576) fp32 copies, ~20 ms a norm, 61 norms a step, about a seventh of
    the step, and the SwiGLU backward's five passes over (tokens x 1536) another ~6%; fused, each function reads
    its inputs once. Not bitwise the torch ops (sums in another order, exp a polynomial: within a bf16 step, tested;
    both runs of a comparison use the same kernels, chosen once per process by ``use_recompute_layers``)."""

    def __init__(self, ops=None):
        self.ops = ops

    @property
    def fused(self) -> bool:
        return self.ops is not None

    def _ops(self, x: torch.Tensor):
        """The fused ops for rows like ``x``; None for torch's: no ops, not bf16, or under a dispatch mode (e.g. the
        FLOP counter's, whose counts are of torch's ops)."""
        return self.ops if self.ops is not None and x.dtype == torch.bfloat16 and _dispatch_mode() is None else None

    @staticmethod
    def _rows(*ts):
        """Each tensor as (rows, last dim) with the last dim contiguous, detached (no autograd state)."""
        rows = [t.detach().reshape(-1, t.shape[-1]) for t in ts]
        return [t if t.stride(-1) == 1 else t.contiguous() for t in rows]

    def norm(self, x, weight, eps: float):
        (x2,), w = self._rows(x), weight.detach()
        ops = self._ops(x)
        out, rstd = ops.rms_norm(x2, w, eps) if ops else _norm(x2, w, eps)
        return out.view(x.shape), rstd.view(*x.shape[:-1], 1)

    def norm_output(self, x, weight, rstd):
        (x2, r), w = self._rows(x, rstd), weight.detach()
        ops = self._ops(x)
        return (ops.rms_norm_output(x2, w, r) if ops else _norm_output(x2, w, r)).view(x.shape)

    def norm_grads(self, grad, x, weight, rstd, need_x: bool, need_w: bool):
        if not (need_x or need_w):
            return None, None
        (g, x2, r), w = self._rows(grad, x, rstd), weight.detach()
        if ops := self._ops(x):
            grad_x, grad_w = ops.rms_norm_backward(g, x2, w, r, need_x, need_w)
        else:
            grad_x = _norm_grad_x(g, x2, w, r) if need_x else None
            grad_w = _norm_grad_w(g, x2, w, r) if need_w else None
        return (grad_x.view(x.shape) if need_x else None), (grad_w if need_w else None)

    def swiglu(self, gate, up):
        g, u = self._rows(gate, up)
        ops = self._ops(gate)
        return (ops.swiglu(g, u) if ops else _swiglu(g, u)).view(gate.shape)

    def swiglu_grads(self, grad_h, gate, up):
        grad_gate, grad_up, _ = self._swiglu_backward(grad_h, gate, up, False)
        return grad_gate, grad_up

    def swiglu_grads_and_product(self, grad_h, gate, up):
        """``swiglu_grads`` and ``swiglu``'s product (for the down weight's gradient) from one read of gate and up."""
        return self._swiglu_backward(grad_h, gate, up, True)

    def _swiglu_backward(self, grad_h, gate, up, product: bool):
        d, g, u = self._rows(grad_h, gate, up)
        if ops := self._ops(gate):
            grad_gate, grad_up, h = ops.swiglu_backward(d, g, u, product)
        else:
            grad_gate, grad_up = _swiglu_grads(d, g, u)
            h = _swiglu(g, u) if product else None
        return grad_gate.view(gate.shape), grad_up.view(up.shape), (h.view(up.shape) if product else None)


def _dispatch_mode():
    from torch.utils._python_dispatch import _get_current_dispatch_mode

    return _get_current_dispatch_mode()


class _Remade:
    """A norm node's output, remade from what the node keeps on the first unpack and shared by its other consumers
    (q, k and v's saved inputs are three views of one output: it is remade once, then freed with the last)."""

    def __init__(self, x, weight, rstd, kernels: Kernels):
        self.parts, self.kernels, self.out = (x, weight, rstd), kernels, None

    def get(self, shape) -> torch.Tensor:
        if self.out is None:
            self.out = self.kernels.norm_output(*self.parts)
        return self.out.view(shape)


class NormOutputs:
    """``with NormOutputs():`` around a forward: a tensor autograd saves that is, whole, the output of an ``RMSNorm``
    node made inside the block is kept as a ``_Remade`` recipe instead (saved-tensor hooks). The block ends with the
    forward; the recipes live on in the graph until the backward has used them."""

    _active: NormOutputs | None = None  # the innermost block's (forwards run on one thread)

    def __init__(self):
        self.outputs: dict[int, tuple[weakref.ref, _Remade]] = {}  # storage address -> (the output, its recipe)
        self.hooks = torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)

    def __enter__(self):
        self.outer, NormOutputs._active = NormOutputs._active, self
        self.hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self.hooks.__exit__(*exc)
        NormOutputs._active = self.outer
        self.outputs.clear()

    def made(self, out: torch.Tensor, recipe: _Remade) -> None:
        self.outputs[out.untyped_storage().data_ptr()] = (weakref.ref(out), recipe)

    def pack(self, t: torch.Tensor):
        if not self.outputs or t.layout != torch.strided:
            return t
        entry = self.outputs.get(t.untyped_storage().data_ptr())
        out = entry[0]() if entry else None
        if (out is None or t.dtype != out.dtype or t.numel() != out.numel() or t.storage_offset() != out.storage_offset()
                or not t.is_contiguous() or t._version != out._version):
            return t  # not the whole output as made (a slice, another layout, changed in place)
        return entry[1], t.shape

    @staticmethod
    def unpack(packed):
        if isinstance(packed, torch.Tensor):
            return packed
        recipe, shape = packed
        return recipe.get(shape)


class SwiGLU(torch.autograd.Function):
    """``silu(gate) * up``, then ``@ down.T`` when a down weight is given; keeps gate and up (and the weight) and
    recomputes ``silu(gate)`` and the product in the backward. Its elementwise work is ``kernels``'."""

    @staticmethod
    def forward(ctx, gate, up, down, kernels: Kernels):
        h = kernels.swiglu(gate, up)  # (..., I)
        ctx.save_for_backward(gate, up, down)
        ctx.kernels = kernels
        return h if down is None else h @ down.t()  # (..., C)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        gate, up, down = ctx.saved_tensors
        k = ctx.kernels
        grad_down = None
        grad_h = grad if down is None else grad @ down  # (..., I)
        if down is not None and ctx.needs_input_grad[2]:  # the product remade in the same pass over gate and up
            grad_gate, grad_up, h = k.swiglu_grads_and_product(grad_h, gate, up)
            grad_down = grad.reshape(-1, grad.shape[-1]).t() @ h.reshape(-1, up.shape[-1])  # (C, I)
        else:
            grad_gate, grad_up = k.swiglu_grads(grad_h, gate, up)
        return (grad_gate if ctx.needs_input_grad[0] else None), (grad_up if ctx.needs_input_grad[1] else None), \
            grad_down, None


def _served(x: torch.Tensor) -> bool:
    """True where the nodes compute what the module would: no autocast, not in inference mode (generation, the
    decode loop and ``evaluate`` keep the module's own ops). Without a graph (``torch.no_grad``: a reference model's
    forward, the native engine's evaluation, GRPO's old log-probs) the nodes' kernels run without autograd, so such a
    forward equals the training forward bitwise (DPO's rewards are exactly 0 at step 1 with fused kernels too)."""
    return not torch.is_inference_mode_enabled() and not torch.is_autocast_enabled(x.device.type)


def _norm_forward(self, hidden_states):
    if not _served(hidden_states) or hidden_states.dtype != self.weight.dtype:
        return self._module_forward(hidden_states)
    if not torch.is_grad_enabled():
        return self._lmforge_kernels.norm(hidden_states, self.weight, self.variance_epsilon)[0]
    return RMSNorm.apply(hidden_states, self.weight, self.variance_epsilon, NormOutputs._active, self._lmforge_kernels)


def _mlp_forward(self, x):
    if not _served(x):
        return self._module_forward(x)
    gate, up, down = self.gate_proj(x), self.up_proj(x), self.down_proj
    if gate.dtype != up.dtype:
        return down(self.act_fn(gate) * up)  # the module's own forward
    fused = type(down) is torch.nn.Linear and down.bias is None and \
        not (down._forward_pre_hooks or down._forward_hooks) and down.weight.dtype == gate.dtype
    if not torch.is_grad_enabled():  # SwiGLU's forward without autograd (``_served``)
        h = self._lmforge_kernels.swiglu(gate, up)
        return h @ down.weight.t() if fused else down(h)
    if fused:
        return SwiGLU.apply(gate, up, down.weight, self._lmforge_kernels)
    return down(SwiGLU.apply(gate, up, None, self._lmforge_kernels))


def _llama_style(kind: type) -> str | None:
    """"norm" or "mlp" when ``kind``'s forward is ``LlamaRMSNorm``'s or ``LlamaMLP``'s, else None."""
    from transformers.models.llama.modeling_llama import LlamaMLP, LlamaRMSNorm

    forward = getattr(kind, "forward", None)
    if not hasattr(forward, "__code__"):
        return None
    if same_code(forward, LlamaRMSNorm.forward):
        return "norm"
    return "mlp" if same_code(forward, LlamaMLP.forward) else None


FUSE_FROM = 256  # hidden sizes from which the fused kernels serve (below, the test-sized models keep torch's ops)


def use_recompute_layers(model) -> int:
    """Give every Llama-style RMSNorm and SiLU-gated MLP of ``model`` the forwards above; returns how many. Their
    elementwise work is fused (``Kernels``) for bf16 models on a CPU from a hidden size of ``FUSE_FROM``."""
    from transformers.activations import SiLUActivation

    for module in model.modules():
        # transformers >= 5 "kernelizes" hub layers (RMSNorm, MLP, ...) again on every train()/eval() switch when the
        # `kernels` package is installed, which resets each such layer's forward to its class's: these nodes would be
        # gone at the engine's first model.train() (they were, unseen, until 2026-12-07). Off first: it resets too.
        if getattr(module, "use_kernels", False) is True:
            module.use_kernels = False
    changed = []
    for module in model.modules():
        if "forward" in module.__dict__:  # already given a forward of its own
            continue
        style = _llama_style(type(module))
        if style == "norm":
            module._module_forward, module.forward = module.forward, types.MethodType(_norm_forward, module)
        elif style == "mlp" and isinstance(getattr(module, "act_fn", None), (SiLUActivation, torch.nn.SiLU)):
            module._module_forward, module.forward = module.forward, types.MethodType(_mlp_forward, module)
        else:
            continue
        changed.append((style, module))
    if changed:
        kernels = kernels_for(model, [m for style, m in changed if style == "norm"])
        for _, module in changed:
            module._lmforge_kernels = kernels
    return len(changed)


def kernels_for(model, norms: list) -> Kernels:
    """The kernels for ``model``'s nodes: fused where they apply (bf16 on a CPU, hidden size >= ``FUSE_FROM``), loaded
    once per process (the first use says which, in the log)."""
    config = model.config.get_text_config(decoder=True) if hasattr(model, "config") else None
    hidden = getattr(config, "hidden_size", 0) or 0
    weight = norms[0].weight if norms else next(model.parameters())
    wants = weight.dtype == torch.bfloat16 and weight.device.type == "cpu" and hidden >= FUSE_FROM
    return _fused() if wants else _EAGER


_EAGER = Kernels()
SOURCE = Path(__file__).with_name("train_kernels.cpp")


@functools.cache
def _fused() -> Kernels:
    """The fused kernels (built once per machine by ``lmforge.kernels``); where they cannot be built (no C++
    compiler), torch's ops."""
    from lmforge import kernels
    from lmforge.log import log

    start = time.perf_counter()
    ops = kernels.load(SOURCE, "lmforge_train", "training kernels", "RMSNorm and SwiGLU run on torch's ops")
    if ops is None:
        log("training kernels: torch's ops one by one (the fused kernels could not be built, see above)")
        return _EAGER
    log(f"training kernels: RMSNorm and SwiGLU fused (training/train_kernels.cpp, ready in "
        f"{time.perf_counter() - start:.1f} s)")
    return Kernels(ops)
