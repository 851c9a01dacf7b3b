"""The decode loop's fused kernels (``decode_kernels.cpp``): the one-token attention (``decode_attention.attend``) and
the decode step's elementwise work (``llama_step``: residual add + RMSNorm, rotary, SiLU x up). Built once per
machine, loaded once per process.

Built with the C++ compiler torch's Inductor uses (``$CXX`` or ``g++``) against torch's headers, for the CPU it runs
on (``-march=native``), into ``~/.cache/lmforge/kernels`` (or ``$LMFORGE_CACHE``) under a name keyed by the source,
torch's version, the compiler and the CPU: a few seconds the first time, a library load after. Where it cannot be
built (no compiler, a failed build) ``load`` says why once and returns None, and the decode loop stays on torch's
ops (the attention on ``decode_attention.attend_matmul``).
"""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch

from lmforge.cache import cache_root, file_lock

SOURCE = Path(__file__).with_name("decode_kernels.cpp")
DIMS = (16, 32, 64, 128)  # head dims the attention kernel is built for
MAX_GROUP = 8  # query heads per key/value head (GMAX in the source)


def _cpu() -> str:
    """The CPU's model name and flags: a build for one CPU kind must not load on another (``-march=native``)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return ""
    return "\n".join(next((ln for ln in lines if ln.startswith(k)), "") for k in ("model name", "flags"))


def _command(compiler: str, out: Path) -> list[str]:
    from torch.utils import cpp_extension

    lib = Path(torch.__file__).parent / "lib"
    includes = [f"-I{p}" for p in cpp_extension.include_paths()]
    # -fopenmp: at::parallel_for runs on torch's OpenMP threads (libgomp.so.1 resolves to the one torch loaded)
    return [compiler, "-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c++20", "-w",
            f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}", *includes, str(SOURCE), "-o", str(out),
            f"-L{lib}", "-lc10", "-ltorch_cpu", f"-Wl,-rpath,{lib}"]


def _say(msg: str) -> None:
    # stderr: stdout may carry a command's output (generate's rows, eval's JSON)
    print(f"[lmforge] {msg}", file=sys.stderr, flush=True)


@functools.cache
def load():
    """The kernels, ``torch.ops.lmforge_decode`` (``one_token_attention``, ``add_rms_norm``, ``rotary``,
    ``silu_mul``), built first if this machine has no build yet; None where they cannot be built (said once)."""
    compiler = shutil.which(os.environ.get("CXX", "g++"))
    if compiler is None or sys.platform != "linux":
        _say("decode kernels: no C++ compiler (g++ or $CXX) on this Linux machine; the decode loop runs on torch's ops")
        return None
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout
    key = hashlib.sha256("\0".join([SOURCE.read_text(), torch.__version__, version, _cpu(),
                                    " ".join(_command(compiler, Path("-")))]).encode()).hexdigest()[:16]
    path = cache_root() / "kernels" / f"decode_kernels-{key}.so"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        with file_lock(path.with_suffix(".lock"), "building the decode kernels"):
            if not path.exists():
                _say(f"building the decode kernels for this CPU (once, a few seconds): {path}")
                tmp = path.with_suffix(f".{os.getpid()}.tmp")
                done = subprocess.run(_command(compiler, tmp), capture_output=True, text=True)
                if done.returncode != 0:
                    tmp.unlink(missing_ok=True)
                    _say("decode kernels: the build failed; the decode loop runs on torch's ops. "
                         f"{compiler}: {done.stderr.strip()[-800:]}")
                    return None
                os.replace(tmp, path)
    torch.ops.load_library(str(path))
    return torch.ops.lmforge_decode


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
