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


def cached_measurement(name: str, key: str, measure, what: str, keep=None) -> tuple[object, bool]:
    """``(value, cached)``: the value under ``key`` in the JSON object ``cache_root()/name``, made by ``measure()``
    and stored when it is not there yet (``cached`` False then). Processes that start together (the ranks of a run)
    measure one at a time under a file lock, and one that waited reads what the first wrote: measured side by side
    each would see the others' load, and the cache would keep that figure for good. ``keep(value)`` False: the value
    is returned but not stored (e.g. measured while other processes were busy). ``measure`` None: only read,
    ``(None, False)`` when nothing is stored."""
    import json

    path = cache_root() / name
    stored = _read_json(path)
    if key in stored:
        return stored[key], True
    if measure is None:
        return None, False
    path.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(path.with_suffix(".lock"), what):
        stored = _read_json(path)
        if key in stored:
            return stored[key], True
        value = measure()
        if keep is not None and not keep(value):
            return value, False
        stored[key] = value
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(stored, indent=1))
        os.replace(tmp, path)
    return stored[key], False


def _read_json(path: Path) -> dict:
    import json

    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
