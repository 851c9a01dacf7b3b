"""The decode loop's fused kernels (``decode_kernels.cpp``): the one-token attention (``decode_attention.attend``) and
the decode step's elementwise work (``llama_step``: residual add + RMSNorm, rotary, SiLU x up). Built once per
machine, loaded once per process.

Built by ``lmforge.kernels`` (the C++ compiler Inductor uses, torch's headers, ``-march=native``, cached per machine).
Where it cannot be built (no compiler, a failed build) ``load`` says why once and returns None, and the decode loop
stays on torch's ops (the attention on ``decode_attention.attend_matmul``).
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch

from lmforge import kernels

SOURCE = Path(__file__).with_name("decode_kernels.cpp")
DIMS = (16, 32, 64, 128)  # head dims the attention kernel is built for
MAX_GROUP = 8  # query heads per key/value head (GMAX in the source)


@functools.cache
def load():
    """The kernels, ``torch.ops.lmforge_decode`` (``one_token_attention``, ``add_rms_norm``, ``rotary``,
    ``silu_mul``), built first if this machine has no build yet; None where they cannot be built (said once)."""
    return kernels.load(SOURCE, "lmforge_decode", "decode kernels", "the decode loop runs on torch's ops")


def attention_applies(q, key, value, mask, out) -> bool:
    """Whether the attention kernel covers this call: a CPU inference call in bf16 or fp32 with a head dim in
    ``DIMS``, at most ``MAX_GROUP`` query heads per key/value head, a (B or 1, 1, 1, positions) bool or fp32 mask, and the head dim
    contiguous in every tensor."""
    dtype = q.dtype
    return (q.device.type == "cpu" and dtype in (torch.bfloat16, torch.float32) and q.shape[-1] in DIMS
            and q.shape[2] <= MAX_GROUP and key.dtype == value.dtype == out.dtype == dtype
            and mask is not None and mask.dtype in (torch.bool, torch.float32) and mask.dim() == 4
            and mask.shape[1] == mask.shape[2] == 1 and mask.shape[0] in (1, q.shape[0])
            and mask.shape[3] == key.shape[2] and all(t.stride(-1) == 1 for t in (q, key, value, out))
            and not (torch.is_grad_enabled() and any(t.requires_grad for t in (q, key, value))))
