"""lmforge's C++ kernels: each source (``inference/decode_kernels.cpp``, ``training/train_kernels.cpp``) registers
its ops with torch (``TORCH_LIBRARY``), is built once per machine and loaded once per process by ``load``.

Built with the C++ compiler torch's Inductor uses (``$CXX`` or ``g++``) against torch's headers, for the CPU it runs
on (``-march=native``), with this directory (``vec.h``, the vector pieces they share) on the include path, into
``~/.cache/lmforge/kernels`` (or ``$LMFORGE_CACHE``) under a name keyed by the source, ``vec.h``, torch's version,
the compiler and the CPU: a few seconds the first time, a library load (milliseconds) after. Where a source cannot be
built (no compiler, a failed build) ``load`` says why once and returns None, and its caller stays on torch's ops.

Why not ``torch.utils.cpp_extension.load``: it keys a build by its name, sources and flags but not the CPU (a
``-march=native`` build made on one CPU kind would load on another sharing the cache), and it needs ninja; the
command below is the one compile-and-link line it would run.
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

HERE = Path(__file__).parent
_LOADED: dict[str, object] = {}  # namespace -> its ops: a process registers a namespace once (a second library aborts)


def _cpu() -> str:
    """The CPU's model name and flags: a build for one CPU kind must not load on another (``-march=native``)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return ""
    return "\n".join(next((ln for ln in lines if ln.startswith(k)), "") for k in ("model name", "flags"))


def _command(compiler: str, source: Path, out: Path) -> list[str]:
    from torch.utils import cpp_extension

    lib = Path(torch.__file__).parent / "lib"
    includes = [f"-I{p}" for p in (*cpp_extension.include_paths(), HERE)]
    # -fopenmp: at::parallel_for runs on torch's OpenMP threads (libgomp.so.1 resolves to the one torch loaded)
    return [compiler, "-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c++20", "-w",
            f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}", *includes, str(source), "-o", str(out),
            f"-L{lib}", "-lc10", "-ltorch_cpu", f"-Wl,-rpath,{lib}"]


def _say(msg: str) -> None:
    # stderr: stdout may carry a command's output (generate's rows, eval's JSON)
    print(f"[lmforge] {msg}", file=sys.stderr, flush=True)


@functools.cache
def load(source: Path, namespace: str, what: str, otherwise: str):
    """``torch.ops.<namespace>``, the ops ``source`` registers, built first if this machine has no build of it yet;
    None where it cannot be built, said once on stderr as "``what``: why; ``otherwise``"."""
    compiler = shutil.which(os.environ.get("CXX", "g++"))
    if compiler is None or sys.platform != "linux":
        _say(f"{what}: no C++ compiler (g++ or $CXX) on this Linux machine; {otherwise}")
        return None
    if namespace in _LOADED:  # loaded already, e.g. from another cache directory ($LMFORGE_CACHE changed)
        return _LOADED[namespace]
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout
    key = hashlib.sha256("\0".join([source.read_text(), (HERE / "vec.h").read_text(), torch.__version__, version,
                                    _cpu(), " ".join(_command(compiler, source, Path("-")))]).encode()).hexdigest()[:16]
    path = cache_root() / "kernels" / f"{source.stem}-{key}.so"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        with file_lock(path.with_suffix(".lock"), f"building the {what}"):
            if not path.exists():
                _say(f"building the {what} for this CPU (once, a few seconds): {path}")
                tmp = path.with_suffix(f".{os.getpid()}.tmp")
                done = subprocess.run(_command(compiler, source, tmp), capture_output=True, text=True)
                if done.returncode != 0:
                    tmp.unlink(missing_ok=True)
                    _say(f"{what}: the build failed; {otherwise}. {compiler}: {done.stderr.strip()[-800:]}")
                    return None
                os.replace(tmp, path)
    torch.ops.load_library(str(path))
    _LOADED[namespace] = getattr(torch.ops, namespace)
    return _LOADED[namespace]
