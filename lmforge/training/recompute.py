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

import types
import weakref

import torch
from torch.autograd.function import once_differentiable

from lmforge.models import same_code


class RMSNorm(torch.autograd.Function):
    """``weight * (x * rsqrt(mean(x^2) + eps)).to(x.dtype)`` with the statistics in fp32, as ``LlamaRMSNorm``;
    keeps x (its dtype) and the fp32 rsqrt per row."""

    @staticmethod
    def forward(ctx, x, weight, eps: float, outputs: NormOutputs | None):
        x32 = x.to(torch.float32)
        rstd = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)  # (..., 1)
        ctx.save_for_backward(x, weight, rstd)
        out = RMSNorm.output(x, weight, rstd)
        if outputs is not None:
            outputs.made(out, _Remade(x, weight, rstd))
        return out

    @staticmethod
    def output(x, weight, rstd):
        """The forward's output from its input and rstd (the forward and ``_Remade`` both call this)."""
        return weight * (x.to(torch.float32) * rstd).to(x.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        x, weight, rstd = ctx.saved_tensors
        x32 = x.to(torch.float32)
        grad_x = grad_w = None
        if ctx.needs_input_grad[1]:  # autograd's: the product in the compute dtype, summed over the positions
            grad_w = (grad * (x32 * rstd).to(x.dtype)).sum_to_size(weight.shape)
        if ctx.needs_input_grad[0]:
            g = (grad * weight).to(torch.float32)  # the gradient of the normalised x, (..., C)
            # d/dx of x * rstd(x): rstd * (g - x * rstd^2 * mean(g * x))
            dot = (g * x32).mean(-1, keepdim=True)
            grad_x = (g - x32 * (rstd * rstd * dot)).mul_(rstd).to(x.dtype)
        return grad_x, grad_w, None, None


class _Remade:
    """A norm node's output, remade from what the node keeps on the first unpack and shared by its other consumers
    (q, k and v's saved inputs are three views of one output: it is remade once, then freed with the last)."""

    def __init__(self, x, weight, rstd):
        self.parts, self.out = (x, weight, rstd), None

    def get(self, shape) -> torch.Tensor:
        if self.out is None:
            self.out = RMSNorm.output(*self.parts)
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
    recomputes ``silu(gate)`` and the product in the backward."""

    @staticmethod
    def forward(ctx, gate, up, down):
        h = torch.nn.functional.silu(gate) * up  # (..., I)
        ctx.save_for_backward(gate, up, down)
        return h if down is None else h @ down.t()  # (..., C)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        gate, up, down = ctx.saved_tensors
        a = torch.nn.functional.silu(gate)
        grad_down = None
        if down is None:
            grad_h = grad
        else:
            if ctx.needs_input_grad[2]:
                grad_down = grad.reshape(-1, grad.shape[-1]).t() @ (a * up).reshape(-1, up.shape[-1])  # (C, I)
            grad_h = grad @ down  # (..., I)
        grad_gate = torch.ops.aten.silu_backward(grad_h * up, gate) if ctx.needs_input_grad[0] else None
        grad_up = grad_h * a if ctx.needs_input_grad[1] else None
        return grad_gate, grad_up, grad_down


def _served(x: torch.Tensor) -> bool:
    """True where a node is worth it and computes what the module would: a graph is recorded (evaluation and
    generation keep the module's own ops), no autocast."""
    return torch.is_grad_enabled() and not torch.is_autocast_enabled(x.device.type)


def _norm_forward(self, hidden_states):
    if not _served(hidden_states) or hidden_states.dtype != self.weight.dtype:
        return self._module_forward(hidden_states)
    return RMSNorm.apply(hidden_states, self.weight, self.variance_epsilon, NormOutputs._active)


def _mlp_forward(self, x):
    if not _served(x):
        return self._module_forward(x)
    gate, up, down = self.gate_proj(x), self.up_proj(x), self.down_proj
    if gate.dtype != up.dtype:
        return down(self.act_fn(gate) * up)  # the module's own forward
    if type(down) is torch.nn.Linear and down.bias is None and not (down._forward_pre_hooks or down._forward_hooks) \
            and down.weight.dtype == gate.dtype:
        return SwiGLU.apply(gate, up, down.weight)
    return down(SwiGLU.apply(gate, up, None))


def _llama_style(kind: type) -> str | None:
    """"norm" or "mlp" when ``kind``'s forward is ``LlamaRMSNorm``'s or ``LlamaMLP``'s, else None."""
    from transformers.models.llama.modeling_llama import LlamaMLP, LlamaRMSNorm

    forward = getattr(kind, "forward", None)
    if not hasattr(forward, "__code__"):
        return None
    if same_code(forward, LlamaRMSNorm.forward):
        return "norm"
    return "mlp" if same_code(forward, LlamaMLP.forward) else None


def use_recompute_layers(model) -> int:
    """Give every Llama-style RMSNorm and SiLU-gated MLP of ``model`` the forwards above; returns how many."""
    from transformers.activations import SiLUActivation

    for module in model.modules():
        # transformers >= 5 "kernelizes" hub layers (RMSNorm, MLP, ...) again on every train()/eval() switch when the
        # `kernels` package is installed, which resets each such layer's forward to its class's: these nodes would be
        # gone at the engine's first model.train() (they were, unseen, until 2026-12-07). Off first: it resets too.
        if getattr(module, "use_kernels", False) is True:
            module.use_kernels = False
    changed = 0
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
        changed += 1
    return changed
