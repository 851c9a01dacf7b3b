"""bf16 compute with fp32 master weights, for full fine-tuning on the native engine.

Why not autocast: under ``torch.autocast`` the model keeps fp32 weights and every matmul casts its weight to
bf16 on the way in (and the gradient back to fp32 on the way out), while norms, activations and their
backward run in fp32. Profiled on SmolLM2-135M (AMD Zen 4, 2 cores, 8 x 256 tokens): fwd+bwd 10.4 s under
autocast, 8.4 s with the model itself in bf16, 16.2 s in fp32 (docs/training.md). So the model computes in
bf16 and the optimizer updates fp32 copies ("master weights", as Megatron and apex O2 do): gradients are
accumulated in fp32 after each micro-batch, clipped and all-reduced in fp32, and the updated fp32 weights
are rounded into the model after each step. Small updates are not lost (pure bf16 AdamW would round them
away), checkpoints and the final model hold the fp32 weights, and resume stays bitwise.

Under bf16 the masters are not stored whole: an fp32 weight is its bf16 rounding (the model's own parameter,
the high 16 bits) plus a 16-bit remainder (``lo``), so the masters cost 2 bytes per parameter, not 4, also at
the backward's peak, where they are dead weight (SmolLM2-135M: -270 MB). The split is exact in bit terms:
``hi = (bits + 0x8000) >> 16`` (round to nearest, ties away from zero: the model computes with what
``p.copy_(master)`` gave, except on exact ties, 1 in 65536) and ``lo = bits - (hi << 16)``, in [-32768, 32767]:
the low 16 bits of ``bits`` as a signed int16; ``bits = (hi << 16) + lo`` (modulo 2**32: NaN and inf patterns
round-trip too; the bf16 half of the NaNs arithmetic makes, 0x7fc00000 and 0xffc00000, is NaN, of rarer payloads
inf or 0). At the optimizer step the fp32 weights are rebuilt, updated by torch's own fused AdamW kernel and
split again, a chunk at a time in cache (``CHUNK``): torch has no optimizer wrapper for split weights, and
rebuilding whole tensors for ``optimizer.step()`` cost ~0.7 s a step (SmolLM2-135M, 2 cores) and 540 MB.

With one micro-batch a step in one process (``model_grads``), the backward's bf16 gradients are the step's whole
gradients: they stay on the model's parameters and are widened to fp32 a chunk at a time inside the step, instead
of into fp32 master gradients (SmolLM2-135M: 540 MB written, page-faulted in and freed every step, at the step's
peak of RSS). The norm, clipping and update are the same arithmetic on the same fp32 values, so the same bits
(tests/test_native.py).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

CHUNK = 1 << 18  # elements rebuilt, updated and split at a time: 1 MB of fp32, in a core's L2 beside AdamW's rows
_BIAS = 0x8000  # half of the low 16 bits: rounds the high half to nearest


def split(full: torch.Tensor, hi: torch.Tensor, lo: torch.Tensor) -> None:
    """fp32 ``full`` (overwritten) into its bf16 rounding ``hi`` and the remainder ``lo`` (int16), elementwise."""
    bits = full.view(torch.int32)
    lo.copy_(bits.view(lo.shape))  # the low 16 bits: bits - (hi << 16), as a signed int16
    bits.add_(_BIAS)  # wraps modulo 2**32 for NaN patterns near 0x7fffffff: the round trip stays exact
    # shifted in place, then narrowed: a shift writing int16 directly is 4x slower (62 vs 25 us a CHUNK, AMX kind)
    hi.view(torch.int16).copy_(bits.bitwise_right_shift_(16).view(hi.shape))


def join(hi: torch.Tensor, lo: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """The fp32 weights whose ``split`` gave ``hi`` and ``lo``, into ``out``."""
    bits = out.view(torch.int32).view(lo.shape)
    bits.copy_(lo)
    bits.add_(hi.view(torch.int16), alpha=1 << 16)
    return out


class MasterWeights:
    """fp32 master weights of a model's parameters; the model's own parameters are converted to ``dtype``.

    ``trainable_only`` (LoRA/DoRA): only the adapter weights get masters; the frozen base stays as loaded
    (already bf16). Saving then goes through PEFT (adapter keys without the adapter name).

    Under bf16 each master is the model's parameter plus its int16 remainder (module docstring); the master
    ``Parameter`` the optimizer holds keeps only its fp32 gradient and a storage-less placeholder of its shape,
    and holds the fp32 weights only inside ``step``. Under fp16 (not the high half of an fp32) masters are
    whole fp32 copies.

    ``model_grads`` (one micro-batch a step, one process): under bf16 the gradients stay the model's own, widened a
    chunk at a time in ``step`` (module docstring); ``clip_grad_norm_`` then reads them."""

    def __init__(self, model, dtype: torch.dtype, trainable_only: bool = False, model_grads: bool = False):
        self.model, self.adapter = model, trainable_only
        self.halves = dtype == torch.bfloat16 and sys.byteorder == "little"  # split() reads the halves in place
        self.model_grads = model_grads and self.halves
        self.clip_coef: torch.Tensor | None = None  # ``clip_grad_norm_``'s factor, applied in ``step`` (model_grads)
        # (name, model param, master, remainder or None)
        self.pairs: list[tuple[str, torch.nn.Parameter, torch.nn.Parameter, torch.Tensor | None]] = []
        self.lo_of: dict[int, tuple[torch.nn.Parameter, torch.Tensor]] = {}  # id(master) -> (model param, lo)
        for name, p in model.named_parameters():  # tied weights come once, under their first name
            if trainable_only and not p.requires_grad:
                continue
            lo = None
            if self.halves:
                full = p.detach().to(torch.float32, copy=True)
                lo = torch.empty(p.shape, dtype=torch.int16)
                hi = torch.empty(p.shape, dtype=dtype)
                split(full, hi, lo)
                p.data = hi
                master = torch.nn.Parameter(_placeholder(p.shape), requires_grad=p.requires_grad)
                self.lo_of[id(master)] = (p, lo)
            else:
                master = torch.nn.Parameter(p.detach().float().clone(), requires_grad=p.requires_grad)
                p.data = p.data.to(dtype)
            self.pairs.append((name, p, master, lo))
        self.scratch = torch.empty(CHUNK) if self.halves else None
        self.grad_scratch = torch.empty(CHUNK) if self.model_grads else None

    def named_trainable(self) -> list[tuple[str, torch.nn.Parameter]]:
        return [(name, m) for name, _, m, _ in self.pairs if m.requires_grad]

    def collect_grads(self) -> None:
        """Move this micro-batch's bf16 gradients into the fp32 master gradients (summing); with ``model_grads``
        they stay where they are."""
        if self.model_grads:
            return
        for _, p, m, _ in self.pairs:
            if p.grad is None:
                continue
            if m.grad is None:
                m.grad = p.grad.float()
            else:
                m.grad.add_(p.grad)
            p.grad = None

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """``torch.nn.utils.clip_grad_norm_`` on the step's gradients (the masters', or with ``model_grads`` the
        model's bf16 ones read as fp32); returns the total norm. The factor is torch's (``clamp(max_norm / (norm +
        1e-6), max=1)``); the norm is summed a chunk at a time, because ``vector_norm`` widens a bf16 tensor whole
        before summing it (113 MB for SmolLM2-135M's embedding, at the step's peak of RSS). Either kind of gradient
        gives the same bits (a chunk's norm of bf16 read as fp32 equals its fp32 copy's). With ``model_grads`` the
        factor is applied in ``step``."""
        grads = [p.grad if self.model_grads else m.grad for _, p, m, _ in self.pairs if m.requires_grad]
        grads = [g.view(-1) for g in grads if g is not None]
        if not grads:
            self.clip_coef = None
            return torch.tensor(0.0)
        total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g[s:s + CHUNK], 2.0, dtype=torch.float32)
                                                      for g in grads for s in range(0, g.numel(), CHUNK)]), 2.0)
        self.clip_coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        if not self.model_grads:
            torch._foreach_mul_(grads, self.clip_coef)
        return total

    @torch.no_grad()
    def step(self, optimizer: torch.optim.Optimizer) -> None:
        """``optimizer.step()`` on the fp32 masters; the model then computes with their bf16 rounding."""
        if self.model_grads and not _chunkable(optimizer):
            self._masters_take_grads()
        if not self.halves:
            optimizer.step()
            for _, p, m, _ in self.pairs:
                if m.requires_grad:
                    p.copy_(m)
        elif _chunkable(optimizer):
            self._adamw_in_chunks(optimizer)
        else:  # other optimizers see whole fp32 tensors: rebuilt for the step, split after it
            for _, p, m, lo in self.pairs:
                if m.requires_grad:
                    m.data = join(p, lo, torch.empty(p.shape))
            optimizer.step()
            for _, p, m, lo in self.pairs:
                if m.requires_grad:
                    split(m.data, p, lo)
                    m.data = _placeholder(p.shape)

    def _masters_take_grads(self) -> None:
        """``model_grads`` for an optimizer stepped on whole tensors: the clipped fp32 gradients on the masters."""
        for _, p, m, _ in self.pairs:
            if p.grad is not None and m.requires_grad:
                m.grad = p.grad.float().mul_(self.clip_coef)
                p.grad = None

    def init_state(self, optimizer: torch.optim.Optimizer) -> None:
        """Fused AdamW's states made now, before the first step, as ``AdamW._init_group`` would at it: made after the
        first backward they land among the holes its freed activations left in the heap, which later steps'
        activations then fit less well (peak RSS 3587/3638 -> 3524/3541 MB, SmolLM2-135M, AMX kind)."""
        if not (self.halves and _chunkable(optimizer)):
            return
        for group in optimizer.param_groups:
            for m in group["params"]:
                if m.requires_grad and not optimizer.state[m]:
                    _new_adamw_state(optimizer.state[m], m.shape)

    def _adamw_in_chunks(self, optimizer: torch.optim.AdamW) -> None:
        """torch's fused AdamW step (``torch.optim.adam._fused_adam``: the same state, kernel and arithmetic),
        run CHUNK elements at a time on rebuilt fp32 weights. The kernel is elementwise, so chunks give the same
        bits as one call over whole tensors (tests/test_native.py)."""
        for group in optimizer.param_groups:
            beta1, beta2 = group["betas"]
            kwargs = dict(lr=group["lr"], beta1=beta1, beta2=beta2, weight_decay=group["weight_decay"],
                          eps=group["eps"], amsgrad=False, maximize=False)
            for m in group["params"]:
                p, lo = self.lo_of[id(m)]
                source = p.grad if self.model_grads else m.grad
                if source is None:
                    continue
                state = optimizer.state[m]
                if not state:
                    _new_adamw_state(state, m.shape)
                state["step"] += 1
                hi, lo, grad = p.view(-1), lo.view(-1), source.view(-1)
                avg, avg_sq = state["exp_avg"].view(-1), state["exp_avg_sq"].view(-1)
                for s in range(0, hi.numel(), CHUNK):
                    e = min(s + CHUNK, hi.numel())
                    w = join(hi[s:e], lo[s:e], self.scratch[:e - s])
                    g = grad[s:e]
                    if self.model_grads:  # the fp32 gradient clip_grad_norm_ would have left: widened, times its factor
                        g = self.grad_scratch[:e - s].copy_(g).mul_(self.clip_coef)
                    torch._fused_adamw_([w], [g], [avg[s:e]], [avg_sq[s:e]], [], [state["step"]], **kwargs)
                    split(w, hi[s:e], lo[s:e])
                if self.model_grads:
                    p.grad = None
        optimizer._opt_called = True  # what optimizer.step() tells the LR scheduler (it warns otherwise)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The model's state dict with every parameter replaced by its fp32 master (tied names share one)."""
        full = {id(p): join(p, lo, torch.empty(p.shape)) if lo is not None else m.detach()
                for _, p, m, lo in self.pairs}
        return {k: full.get(id(v), v).detach() for k, v in self.model.state_dict(keep_vars=True).items()}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Load saved fp32 weights (a model's state dict, or a PEFT adapter file's) into masters and model."""
        for name, p, m, lo in self.pairs:
            key = name.replace(f".{self.model.active_adapter}.", ".") if self.adapter else name
            if lo is not None:
                split(state[key].to(torch.float32, copy=True), p, lo)
            else:
                m.copy_(state[key])
                p.copy_(m)

    def save_pretrained(self, directory: Path) -> None:
        """``save_pretrained`` with the fp32 weights; config.json says float32, the dtype of what was written."""
        self.model.save_pretrained(directory, state_dict=self.state_dict(), safe_serialization=True)
        if self.adapter:
            return  # adapter_config.json has no dtype
        path = Path(directory) / "config.json"
        config = json.loads(path.read_text())
        config["dtype"] = "float32"
        path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _new_adamw_state(state: dict, shape: torch.Size) -> None:
    """A parameter's state as ``AdamW._init_group`` makes it for the fused kernel on the CPU."""
    state["step"] = torch.zeros((), dtype=torch.float32)
    state["exp_avg"] = torch.zeros(shape)
    state["exp_avg_sq"] = torch.zeros(shape)


def _placeholder(shape: torch.Size) -> torch.Tensor:
    """A master's stand-in between steps: its shape (for its gradient) over a single float of storage."""
    return torch.zeros(()).expand(shape)


def _chunkable(optimizer) -> bool:
    """torch's fused AdamW with the defaults lmforge builds (``optim.build_optimizer``): stepped in chunks."""
    d = optimizer.defaults
    return (type(optimizer) is torch.optim.AdamW and d.get("fused") and not d["amsgrad"] and not d["maximize"]
            and not d["capturable"] and not d["differentiable"]
            and all(not isinstance(g["lr"], torch.Tensor) for g in optimizer.param_groups))
