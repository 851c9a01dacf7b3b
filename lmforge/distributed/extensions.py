"""DeepSpeed's compiled C++ ops: where they are kept, and loading them without waiting on a dead build's lock."""
from __future__ import annotations

import fcntl
import os
from pathlib import Path

from lmforge.cache import cache_root

# Ops lmforge makes DeepSpeed load on a CPU machine: the shared-memory collective its torch backend builds.
_OPS = ("ShareMemCommBuilder",)


def extensions_dir() -> Path:
    """DeepSpeed compiles its C++ ops on first use (about a minute); keep them across runs."""
    root = Path(os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(cache_root() / "torch_extensions")))
    root.mkdir(parents=True, exist_ok=True)
    return root


def load_ops() -> None:
    """Build or load DeepSpeed's ops before DeepSpeed asks for them (it then reuses the loaded module).

    torch guards each op's build directory with a bare ``lock`` file (``FileBaton``) that it deletes when done;
    a process killed while it holds it (a timeout, SIGKILL, the OOM killer) leaves it behind, and every later
    run waits on it forever. lmforge processes take the op under ``flock``, which the kernel drops when its
    holder dies: whoever holds it is the only one building, so a ``lock`` file found then is stale."""
    from deepspeed import ops
    from deepspeed.accelerator import get_accelerator

    root = extensions_dir()
    with open(root / "lmforge-build.flock", "a") as guard:
        fcntl.flock(guard, fcntl.LOCK_EX)
        for name in _OPS:
            builder = get_accelerator().create_op_builder(name)
            if builder is None or not ops.__compatible_ops__.get(builder.NAME, False):
                continue  # DeepSpeed will not ask for it either
            (root / builder.name / "lock").unlink(missing_ok=True)
            builder.load()
