"""`lmforge generate` on several processes (``--nproc-per-node N``, or a user's own torchrun): one output file.

The rows the output does not hold yet are cut into one contiguous shard per rank (sizes differ by at most
one row). Contiguous rather than strided: a rank then batches by length inside its windows exactly as one
process does, its rows keep their input index as sampling seed (``generate_rows``), so seeded sampling in
the decode loop gives the same text as one process, and merging is concatenation.

Each rank appends its shard to its own part file beside the output (``.OUT.from-D.rank-R-of-N.part``; D = the
rows the output held when the run began), flushed a window at a time like the output of one process, so a
failed or killed run keeps what every rank finished and a re-run with the same N resumes each part. When
every rank has finished, rank 0 writes the output's old rows, then each part in rank order (the other
ranks send theirs over gloo, so nodes need no shared disk), to a temporary file, and renames it over the
output: readers see the old output or the complete new one, never a mixture. A rank that fails reports its
error to the others at the end; rank 0 then stops the command with every rank's message, and the output is
left as it was.
"""

from __future__ import annotations

import os
import sys
import traceback
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Callable

from lmforge.distributed.ranks import EXPECTED_WORLD_ENV, local_rank, world_size
from lmforge.errors import DataError, LmforgeError, UnsupportedError
from lmforge.inference.batch import completed_rows, generate_rows
from lmforge.inference.generate import GenerationOptions

# ranks finish their shards at different times and then wait for each other; generation of a large shard may
# take hours, so the collectives after it must not time out first
TIMEOUT = timedelta(hours=24)
CHUNK_BYTES = 64 << 20  # a part is sent to rank 0 in pieces of about this size (bounds rank 0's memory)


def shard(n: int, world: int, rank: int) -> tuple[int, int]:
    """Rows ``[lo, hi)`` of ``n`` for ``rank``: contiguous, sizes differing by at most one."""
    size, extra = divmod(n, world)
    lo = rank * size + min(rank, extra)
    return lo, lo + size + (rank < extra)


def part_path(output: Path, done: int, rank: int, world: int) -> Path:
    """Rank ``rank``'s part file; ``done`` (rows already in the output) ties it to the rows it covers."""
    return output.with_name(f".{output.name}.from-{done}.rank-{rank}-of-{world}.part")


def _stale_parts(output: Path, keep: set[Path]) -> list[Path]:
    """Part files of earlier runs with another process count or starting point (they cover other rows)."""
    return [p for p in output.parent.glob(f".{output.name}.from-*.part") if p not in keep]


def run(rows: list, output: Path, opts: GenerationOptions, batch_size: int, load: Callable[[], Worker],
        progress: bool = True) -> tuple[int, int]:
    """This rank's share of a sharded ``generate``; returns (rows skipped, rows generated) on rank 0.

    ``load()`` loads the model (on every rank, also one without rows: loading may be collective, as under
    ZeRO-3) and returns a ``Worker``. Every rank returns only after all have finished; if any failed, rank 0
    prints each failure and every rank raises ``RankFailed``."""
    import torch
    import torch.distributed as dist

    world = world_size()
    expected = os.environ.get(EXPECTED_WORLD_ENV)
    if expected is not None and int(expected) != world:
        raise UnsupportedError(f"the launcher asked for {expected} processes but WORLD_SIZE is {world}")
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank())  # else every rank would load onto GPU 0
    if not dist.is_initialized():
        dist.init_process_group("gloo", timeout=TIMEOUT)  # rows and results only: CPU objects
    rank = dist.get_rank()

    # 1. rank 0 reads how far the output got (other nodes may not see the file) and tells the others
    start: list = [None]
    if rank == 0:
        try:
            start = [completed_rows(output)]
            if start[0] > len(rows):
                raise DataError(f"{output}: holds {start[0]} rows but the input has only {len(rows)}; "
                                "use a new output file")
        except LmforgeError as e:
            start = [e]
    dist.broadcast_object_list(start, src=0)
    if not isinstance(start[0], int):
        _fail(rank, str(start[0]))
    done = start[0]
    parts = [part_path(output, done, r, world) for r in range(world)]
    mine = parts[rank]

    # 2. each rank generates its shard into its part (resuming it); a failure is reported, not raised, so that
    #    every rank reaches the exchange below and nobody waits for a rank that has gone
    error = None
    try:
        if local_rank() == 0:
            stale = _stale_parts(output, set(parts))
            for part in stale:
                part.unlink(missing_ok=True)
            if stale:
                sys.stderr.write(f"[lmforge] removed {len(stale)} part file(s) of an earlier run with another number "
                                 f"of processes beside {output}\n")
        lo, hi = (done + i for i in shard(len(rows) - done, world, rank))
        mine.touch()
        if done < len(rows):  # (the same on every rank)
            worker = load()
            try:
                generate_rows(rows[lo:hi], mine, lo, opts, batch_size, worker.encode, worker.generate,
                              progress and rank == 0, worker.max_prompt_tokens, desc=f"generate (rank 0 of {world})")
            finally:
                if worker.drain is not None:
                    worker.drain()  # keep the forward passes of the ranks still generating company
    except Exception as e:
        error = _describe(e)
    status: list = [None] * world
    dist.all_gather_object(status, (rank, error))
    failed = [(r, msg) for r, msg in status if msg is not None]
    if failed:
        lines = "\n  ".join(f"rank {r}: {msg}" for r, msg in failed)
        _fail(rank, f"generate failed on {len(failed)} of {world} processes; {output} was not changed, the rows "
                    "each process finished are kept beside it, and a re-run with the same number of processes "
                    f"resumes them:\n  {lines}")

    # 3. rank 0 merges the parts into the output; the others send theirs, then hear whether it worked
    verdict: list = [None]
    if rank == 0:
        verdict = [_merge(output, done, len(rows), parts)]
    else:
        _send(mine)
    dist.broadcast_object_list(verdict, src=0)
    if verdict[0] is not None:
        _fail(rank, f"merging the parts into {output}: {verdict[0]}; the parts are kept, a re-run merges them")
    mine.unlink()
    return done, len(rows) - done


@dataclass
class Worker:
    """What a rank generates with: ``generate_rows``'s ``encode``, ``generate`` and ``max_prompt_tokens``, and
    ``drain()``, called once this rank is done (or has failed), for models whose forward passes are collective
    (ZeRO-3 over several ranks: zero.LockStep); it returns when every rank is done."""

    encode: Callable[[dict], list[int]]
    generate: Callable
    max_prompt_tokens: int | None = None
    drain: Callable[[], None] | None = None


class RankFailed(LmforgeError):
    """The sharded run failed; rank 0 has already printed why (for every rank), so the command exits 2 quietly."""


def _fail(rank: int, message: str):
    """Rank 0 prints ``message`` (as the CLI prints an LmforgeError), then every rank raises RankFailed.

    Rank 0 writes before the barrier, and nobody exits before it: torchrun stops all workers as soon as one
    exits with an error, which would otherwise cut rank 0 off before it had said what went wrong."""
    import torch.distributed as dist

    if rank == 0:
        sys.stderr.write(f"lmforge: error: {message}\n")
        sys.stderr.flush()
    dist.barrier()
    raise RankFailed(message)


def _describe(e: Exception) -> str:
    if isinstance(e, LmforgeError):
        return str(e)
    traceback.print_exc()  # a bug, not a user error: its traceback belongs in this rank's stderr
    return f"{type(e).__name__}: {e}"


def _merge(output: Path, done: int, total: int, parts: list[Path]) -> str | None:
    """Old output rows + every part in rank order -> a temporary file renamed over ``output``.

    Returns None, or what went wrong; the other ranks' pieces are received to the end either way (they
    must not be left blocked in a send)."""
    tmp = output.with_name(f".{output.name}.merging")
    error = None
    try:
        out = tmp.open("wb")
        if done:
            with output.open("rb") as old:
                _copy(old, out)
        with parts[0].open("rb") as own:
            _copy(own, out)
    except OSError as e:
        error = f"{e.strerror}: {e.filename}"
    for rank in range(1, len(parts)):
        for chunk in _receive(rank):
            if error is None:
                try:
                    out.write(chunk)
                except OSError as e:
                    error = f"{e.strerror}: {tmp}"
    try:
        if error is None:
            out.flush()
            os.fsync(out.fileno())
            out.close()
            rows = completed_rows(tmp)
            if rows != total:
                error = f"the merged file holds {rows} rows, expected {total}"
            else:
                os.replace(tmp, output)
    except OSError as e:
        error = f"{e.strerror}: {e.filename}"
    except LmforgeError as e:  # a part that is not JSON lines
        error = str(e)
    if error is not None:
        tmp.unlink(missing_ok=True)
    return error


def _copy(src, dst) -> None:
    while chunk := src.read(CHUNK_BYTES):
        dst.write(chunk)


def _send(part: Path) -> None:
    """Send ``part`` to rank 0 in pieces; an empty piece ends it."""
    import torch.distributed as dist

    with part.open("rb") as fh:
        while True:
            chunk = fh.read(CHUNK_BYTES)
            dist.send_object_list([chunk], dst=0)
            if not chunk:
                return


def _receive(rank: int):
    import torch.distributed as dist

    while True:
        box = [None]
        dist.recv_object_list(box, src=rank)
        if not box[0]:
            return
        yield box[0]


def finish() -> None:
    """Leave after a successful run: every rank passes a barrier (the output is in place), then leaves with
    ``strategy.teardown`` (which skips the interpreter's teardown of the gloo threads: it sometimes aborts)."""
    from lmforge.distributed.strategy import teardown  # lazy: strategy imports the trainer stack (accelerate, peft)

    teardown()
