"""The LM head and its cross-entropy in chunks of positions, so the (positions x vocabulary) logits never exist
whole (``sft.causal_lm_loss`` uses it for a plain ``nn.Linear`` head without bias).

Why by hand: with autograd, ``cross_entropy(head(h).float())`` keeps the bf16 logits, their fp32 copy and the
log-softmax for the backward, and the backward adds the fp32 gradient and its bf16 cast: on a 49k vocabulary
that is 2-3 GB at 8 x 512 positions, the largest allocation of a pretraining step (measured: a step's peak RSS
3.5-3.9 GB against 1.0-1.6 GB between steps, the streaming benchmark's model). Fused linear cross-entropy
kernels (Liger, Apple's cut-cross-entropy) do this on GPUs only. Here each chunk's logits are made, turned
into their gradient (softmax minus the one-hot target) and multiplied into the gradients of the hidden states
and of the head's weight right away, in the forward; the backward only scales them by the incoming gradient.
The matmul FLOPs are the same as autograd's (one forward, two gradients; none for a frozen head's weight).

Precision is autograd's on the same dtypes: the logits come out of the matmul in the compute dtype and the
log-sum-exp and softmax are taken in fp32; the weight gradient is summed over chunks in fp32 (one chunk's is made
in the compute dtype directly: the same values, without a (V, C) fp32 buffer).
"""

from __future__ import annotations

import torch

CHUNK_BYTES = 256 << 20  # one chunk's fp32 logits; 1365 positions on a 49,152 vocabulary


def rows_per_chunk(vocab: int) -> int:
    return max(64, CHUNK_BYTES // (4 * vocab))


def _chunk(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, softmax: bool):
    """(loss sum over the chunk (fp32), the logits' gradient softmax - one_hot (n, V) in fp32 or None)."""
    z = (h @ weight.T).to(torch.promote_types(h.dtype, torch.float32))  # (n, V): fp32, or fp64 in fp64
    target = z.gather(1, targets[:, None]).squeeze(1)
    top = z.amax(-1, keepdim=True)
    e = z.sub_(top).exp_()  # in place: one (n, V) fp32 buffer for the chunk
    total = e.sum(-1, keepdim=True)
    loss = (top.squeeze(1) + total.squeeze(1).log() - target).sum()
    if not softmax:
        return loss, None
    p = e.div_(total)
    p[torch.arange(len(targets)), targets] -= 1
    return loss, p


def _chunks(hidden, weight, targets, want_h: bool, want_w: bool):
    """(the summed loss, the gradient of the hidden states or None, the head weight's gradient (fp32; one chunk's in
    the weight's dtype) or None)."""
    wide = torch.promote_types(hidden.dtype, torch.float32)
    loss = torch.zeros((), dtype=wide, device=hidden.device)
    grad_h = torch.empty_like(hidden) if want_h else None
    rows = rows_per_chunk(weight.shape[0])
    one = hidden.shape[0] <= rows  # one chunk: its weight gradient is the sum, made in the weight's dtype
    grad_w = torch.zeros(weight.shape, dtype=wide, device=weight.device) if want_w and not one else None
    for s in range(0, hidden.shape[0], rows):
        h = hidden[s:s + rows]
        part, p = _chunk(h, weight, targets[s:s + rows], softmax=want_h or want_w)
        loss += part
        if p is None:
            continue
        p = p.to(hidden.dtype)  # the gradient matmuls run in the compute dtype, as autograd's would
        if want_h:
            torch.mm(p, weight, out=grad_h[s:s + rows])  # (n, V) @ (V, C)
        if want_w and one:
            grad_w = p.T @ h  # (V, n) @ (n, C): no (V, C) fp32 sum (113 MB on a 49k x 576 head)
        elif want_w:
            grad_w += p.T @ h
    if want_w and grad_w is None:  # no positions: a zero gradient
        grad_w = torch.zeros_like(weight)
    return loss, grad_h, grad_w


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        # hidden (N, C), weight (V, C), targets (N,) -> the summed cross-entropy (fp32 scalar)
        want_h, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        loss, grad_h, grad_w = _chunks(hidden, weight, targets, want_h, want_w)
        # kept on ctx, not saved: they are no inputs or outputs, and the backward scales them in place (a
        # (V, C) copy less while every activation of the step is still alive)
        ctx.grads = (grad_h, grad_w.to(weight.dtype) if want_w else None)
        return loss

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        if ctx.grads is None:
            raise RuntimeError("linear_cross_entropy: backward ran twice through the same graph (retain_graph)")
        grads, ctx.grads = ctx.grads, None
        return tuple(None if g is None else g.mul_(grad.to(g.dtype)) for g in grads) + (None,)


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """sum_i cross_entropy(hidden[i] @ weight.T, targets[i]): (N, C) hidden states, the (V, C) head weight, (N,)
    targets -> an fp32 scalar. Under autocast, the hidden states and weight are cast to its dtype first (as the
    head's matmul would be), and the chunks run with autocast off."""
    if torch.is_autocast_enabled(hidden.device.type):
        dtype = torch.get_autocast_dtype(hidden.device.type)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
    with torch.autocast(hidden.device.type, enabled=False):
        if not torch.is_grad_enabled() or not (hidden.requires_grad or weight.requires_grad):
            return _chunks(hidden, weight, targets, False, False)[0]
        return _LinearCrossEntropy.apply(hidden, weight, targets)
