"""Where lmforge keeps what it makes once and reuses (imported models, prepared data, tokenizers, machine peaks),
and the lock that lets processes started together build each thing once."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path


def cache_root() -> Path:
    root = os.environ.get("LMFORGE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "lmforge")
    return Path(root)


@contextlib.contextmanager
def file_lock(path: Path, what: str):
    """An exclusive ``flock`` on ``path`` for the block; says once that it waits for another process."""
    import fcntl

    with open(path, "a") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"[lmforge] waiting for another process {what} ({path})", flush=True)
            fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
