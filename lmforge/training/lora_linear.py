"""A LoRA linear layer as one autograd node on the native engine: base matmul, adapter and scaling together.

Why by hand: PEFT's plain-LoRA forward is ``base(x) + lora_B(lora_A(dropout(x))) * scaling``, so the scaling
multiplies and the sum adds over the layer's whole (tokens x out_features) output, and the backward repeats both,
for each of the 7 adapted linears of a Llama decoder layer. Profiled on the AMX kind (LoRA r 16, 8 x 512 tokens,
perf): bf16 elementwise ``add`` and ``mul`` were ~25% of a step's CPU samples, all matmuls 18%. Here the adapter's
product goes into the base output inside one ``addmm_`` with the scaling as its ``alpha``, and into the input's
gradient the same way (without dropout); the scaling otherwise multiplies only rank-r tensors. The FLOPs are
PEFT's; the rounding differs only in where the scaling is applied and in the sum being accumulated in the GEMM.

``use_fused_lora`` leaves every call PEFT would not send down its plain-LoRA branch to PEFT's own forward
(adapters disabled, merged, several active adapters, DoRA or another variant, mixed-adapter batches), and any layer
whose base is not an ``nn.Linear`` (QLoRA's 4-bit layers) or whose dropout is not ``FastDropout`` / identity.
Tested against PEFT's forward and backward (tests/test_native.py).
"""

from __future__ import annotations

import types

import torch
from torch.autograd.function import once_differentiable

from lmforge.training.dropout import FastDropout


class LoraLinear(torch.autograd.Function):
    """(..., in) x -> (..., out): ``x W^T + bias + scaling * s (x * keep) A^T B^T``, ``keep`` the dropout's 0/1
    draws and ``s`` its 1/keep-probability (applied to the rank-r product, not to every input); gradients for x, A
    and B (and the base weight and bias if they train)."""

    @staticmethod
    def forward(ctx, x, weight, bias, a, b, keep, keep_scale: float, scaling: float):
        x2 = x.reshape(-1, x.shape[-1])  # (T, in)
        keep = None if keep is None else keep.reshape(x2.shape)
        h = (x2 if keep is None else x2 * keep) @ a.t()  # (T, r)
        if keep is not None:
            h.mul_(keep_scale)
        out = x2 @ weight.t() if bias is None else torch.addmm(bias, x2, weight.t())  # (T, out)
        out.addmm_(h, b.t(), alpha=scaling)
        ctx.save_for_backward(x2, weight, a, b, h, keep)
        ctx.scaling, ctx.keep_scale = scaling, keep_scale
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        x2, weight, a, b, h, keep = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1])  # (T, out)
        gh = (g @ b).mul_(ctx.scaling)  # (T, r): the gradient of h
        if keep is not None:
            gh.mul_(ctx.keep_scale)  # ... and of (x * keep) A^T
        need_x, need_w, need_bias, need_a, need_b = ctx.needs_input_grad[:5]
        grad_x = grad_w = grad_bias = grad_a = grad_b = None
        if need_x:
            grad_x = g @ weight  # (T, in)
            if keep is None:
                grad_x.addmm_(gh, a)
            else:
                grad_x.addcmul_(gh @ a, keep)  # one pass over (T, in)
            grad_x = grad_x.view(*grad.shape[:-1], x2.shape[-1])
        if need_w:
            grad_w = g.t() @ x2
        if need_bias:  # False for a None bias
            grad_bias = g.sum(0)
        if need_a:
            grad_a = gh.t() @ (x2 if keep is None else x2 * keep)  # (r, in)
        if need_b:
            grad_b = (g.t() @ h).mul_(ctx.scaling)  # (out, r)
        return grad_x, grad_w, grad_bias, grad_a, grad_b, None, None, None


def dropout_mask(dropout, x) -> tuple[torch.Tensor | None, float]:
    """``LoraLinear``'s dropout arguments for ``x``: the 0/1 draws and the 1/keep-probability of a ``FastDropout``;
    (None, 1.0) without dropout."""
    if isinstance(dropout, FastDropout):
        return dropout.keep(x), dropout.scale
    return None, 1.0


def _forward(self, x, *args, **kwargs):
    """PEFT's ``lora.Linear.forward`` with its plain-LoRA branch as one ``LoraLinear`` node."""
    adapters = [n for n in self.active_adapters if n in self.lora_A]
    if (args or kwargs or self.disable_adapters or self.merged or len(adapters) != 1
            or adapters[0] in self.lora_variant):
        return self._peft_forward(x, *args, **kwargs)
    name = adapters[0]
    a, b, dropout = self.lora_A[name].weight, self.lora_B[name].weight, self.lora_dropout[name]
    base = self.base_layer
    if not (x.dtype == a.dtype == b.dtype == base.weight.dtype):
        return self._peft_forward(x, *args, **kwargs)
    return LoraLinear.apply(x, base.weight, base.bias, a, b, *dropout_mask(dropout, x), self.scaling[name])


def use_fused_lora(model) -> int:
    """Give every plain LoRA linear layer of ``model`` the fused forward; returns how many."""
    from peft.tuners.lora.layer import Linear

    fused = 0
    for module in model.modules():
        if type(module) is not Linear or type(module.base_layer) is not torch.nn.Linear:
            continue
        if not all(isinstance(d, (FastDropout, torch.nn.Identity)) for d in module.lora_dropout.values()):
            continue
        module._peft_forward = module.forward
        module.forward = types.MethodType(_forward, module)
        fused += 1
    return fused
