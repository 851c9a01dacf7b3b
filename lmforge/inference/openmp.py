"""One OpenMP thread pool for a process whose torch work moves to another thread (a server's engine thread).

Why: GNU OpenMP (the libgomp torch ships) keeps a pool of worker threads for every thread that ran a parallel
op, and once the pooled threads outnumber the CPUs it stops spinning between parallel regions (its throttled
spin), so each op then waits for its workers to wake up. A server loads its model on the main thread and decodes
on the engine thread: two pools. Measured on the AMX kind (2 cores): a small elementwise op 9 -> 90 us, a decode
matmul 0.12 -> 0.25 ms, a server's decode step about 2x slower. Releasing the pool of a thread that is done with
torch (OpenMP 5's ``omp_pause_resource_all``; torch has no call for it) leaves the engine's the only one.
"""

from __future__ import annotations

import ctypes
import functools

OMP_PAUSE_SOFT = 1


@functools.cache
def _runtime():
    """The OpenMP runtime loaded into this process (GNU or LLVM), or None."""
    try:
        with open("/proc/self/maps") as fh:
            paths = {line.split()[-1] for line in fh if any(k in line for k in ("libgomp", "libomp", "libiomp"))}
    except OSError:  # not Linux
        return None
    for path in sorted(paths):
        try:
            lib = ctypes.CDLL(path)
            lib.omp_pause_resource_all.argtypes = [ctypes.c_int]
            return lib
        except (OSError, AttributeError):
            continue
    return None


def release_thread_pool() -> None:
    """Let the OpenMP worker threads this thread started go (the next parallel op here starts new ones)."""
    lib = _runtime()
    if lib is not None:
        lib.omp_pause_resource_all(OMP_PAUSE_SOFT)


def released(fn):
    """``fn`` that releases its thread's OpenMP pool when it returns: for torch work on a borrowed worker thread
    (``asyncio.to_thread``) of a process whose engine thread does the rest."""
    @functools.wraps(fn)
    def run(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        finally:
            release_thread_pool()
    return run
