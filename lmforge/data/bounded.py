"""Building a causal-LM split in bounded memory: what ``prepare_split`` runs for pretrain and SFT data.

The rows are never all in memory. Each source is cut into tasks: a JSON Lines file into byte ranges that start at a
line, which the worker reads and parses itself; any other source into chunks of rows read here. A task is parsed,
validated, tokenised, masked and truncated in a forked worker (``prepare.tokenising_processes``; at most two tasks
per worker in flight). Its tokens are appended to two int32 spill files in task order, and this process keeps a few
numbers per row and per sample (samples per row, lengths, loss tokens). Mixing (``prepare.mix_indices`` replayed on
row numbers), the statistics of the selection, packing (``pack_bins`` on lengths) and the Arrow data of the cache are
computed from those numbers; the spilled tokens are gathered through a memory map a slice at a time, and the pages of
each slice are released after it, so the peak RSS does not grow with the row count.

What ``datasets.load_from_disk`` reads is written here directly (one Arrow stream file of record batches, plus
``state.json`` and ``dataset_info.json``), which saves building the table in memory for ``save_to_disk``.
"""

from __future__ import annotations

import itertools
import json
import multiprocessing
import os
import uuid
from collections import deque
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from lmforge.config import Config
from lmforge.data.origins import SourceRows
from lmforge.data.packing import pack_bins
from lmforge.data.prepare import (
    DROP_NO_LOSS, Stats, _encode_chunk, add_counts, mix_indices, sources_for, spans, tokenising_processes,
)
from lmforge.data.rows import RowChecks, SourceCheck
from lmforge.data.sources import (
    BadRow, Row, iter_source_rows, jsonl_range_lines, jsonl_ranges, parse_jsonl_line, resolve_files, is_saved_dataset,
)
from lmforge.data.tokenize import Encoder
from lmforge.errors import DataError

TASK_BYTES = 4 << 20  # a JSON Lines task: about 8,000 two-turn chats
TASK_ROWS = 8_000  # a task of rows read here
SLICE_TOKENS = 1 << 18  # tokens per Arrow record batch
BLOCK_TOKENS = 1 << 20  # spilled tokens read at a time
BUCKET_TOKENS = 1 << 21  # output tokens per bucket file (at least)


@dataclass
class _Task:
    source: int
    path: str | None = None  # a JSON Lines byte range ...
    start: int = 0
    end: int = 0
    rows: list | None = None  # ... or rows read here: Row, or BadRow for what could not be parsed


@dataclass
class _Done:
    """A task's result: tokens, counts and its bad rows (JSON Lines: line numbers within the range)."""

    tokens: object
    counts: dict
    masks: dict
    per_row: object
    bad: list[BadRow]  # origin: the line within the range (JSON Lines) or the row's origin
    good_at: list  # where each good row is: line within the range (JSON Lines) or origin (data/origins.py)
    read: int  # rows read (good or bad)
    lines: int  # lines in the range (JSON Lines)
    good: int


# Set before forking the workers, which inherit it (the tokenizer is not pickled per task).
_JOB: tuple | None = None
_ENCODER: Encoder | None = None


def _run(task: _Task) -> _Done:
    global _ENCODER
    cfg, tokenizer, checks = _JOB
    if _ENCODER is None:
        if multiprocessing.parent_process() is not None:
            os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one process per core already; no threads inside
        _ENCODER = Encoder(tokenizer, apply_chat_template=cfg.data.apply_chat_template)
    check: SourceCheck = checks[task.source]
    good: list[tuple[str, Row]] = []
    good_at: list = []
    bad: list[BadRow] = []
    read, lines = 0, [0]  # rows read; lines of a JSON Lines range (set by _range_rows)
    for row in _range_rows(task, lines) if task.path is not None else task.rows:
        read += 1
        row = check.check(row)
        if isinstance(row, BadRow):
            bad.append(row)
        else:
            good.append((check.fmt, row))
            good_at.append(row.origin)
    tokens, counts, masks, per_row = _encode_chunk(cfg, _ENCODER, good)
    return _Done(tokens, counts, masks, per_row, bad, good_at, read, lines[0], len(good))


def _range_rows(task: _Task, counter: list[int]):
    """The rows of a JSON Lines range's non-blank lines (Row, or BadRow if unparseable), each with its line within the
    range as origin (an int: the caller adds the lines before the range); counts every line."""
    for k, line in jsonl_range_lines(Path(task.path), task.start, task.end):
        counter[0] = k
        if line.strip():
            data, reason = parse_jsonl_line(line)
            yield BadRow(k, reason) if reason else Row(data, k)


def _tasks(cfg: Config, role: str):
    """Every task of every source of a role, in order; rows of non-JSONL sources are read as the tasks are taken."""
    for index, src in enumerate(sources_for(cfg, role)):
        files = [] if src.loader or is_saved_dataset(Path(src.path).expanduser()) else resolve_files(src, role)
        if files and all(f.suffix == ".jsonl" for f in files):
            for f in files:
                for a, b in jsonl_ranges(f, TASK_BYTES):
                    yield _Task(index, path=str(f), start=a, end=b)
            continue
        rows: list = []
        for r in iter_source_rows(src, role):
            rows.append(r)
            if len(rows) == TASK_ROWS:
                yield _Task(index, rows=rows)
                rows = []
        if rows:
            yield _Task(index, rows=rows)


def _estimated_rows(cfg: Config, role: str) -> int:
    """Rows a role will read, roughly, to decide on workers before reading: file sizes over a sampled line size."""
    n = 0
    for src in sources_for(cfg, role):
        if src.loader:
            continue
        if is_saved_dataset(Path(src.path).expanduser()):
            from datasets import load_from_disk

            ds = load_from_disk(src.path)
            n += sum(len(d) for d in ds.values()) if hasattr(ds, "values") else len(ds)
            continue
        for f in resolve_files(src, role):
            with f.open("rb") as fh:
                head = fh.read(1 << 16)
            n += f.stat().st_size * max(1, head.count(b"\n")) // max(1, len(head))
    return n


def _results(tasks, procs: int):
    """The tasks' results in task order: here, or in ``procs`` forked workers with a bounded queue."""
    if procs == 1:
        yield from map(_run, tasks)
        return
    with multiprocessing.get_context("fork").Pool(procs) as pool:
        pending: deque = deque()
        for task in tasks:
            pending.append(pool.apply_async(_run, (task,)))
            if len(pending) >= 2 * procs:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


class _Spill:
    """Tokens and labels of every sample in task order, in two int32 files, and the per-row/per-sample numbers."""

    def __init__(self, directory: Path):
        self.dir = directory
        self.ids = open(directory / "ids.bin", "wb")
        self.labels = open(directory / "labels.bin", "wb")
        self.parts: dict[str, list[np.ndarray]] = {k: [] for k in
                                                     ("lengths", "loss", "samples", "truncated", "split", "dropped")}

    def add(self, done: _Done) -> None:
        done.tokens.ids.tofile(self.ids)
        done.tokens.labels.tofile(self.labels)
        r = done.per_row
        for key, arr in (("lengths", done.tokens.lengths), ("loss", r.loss), ("samples", r.samples),
                         ("truncated", r.truncated), ("split", r.split), ("dropped", r.dropped)):
            self.parts[key].append(arr)

    def close(self) -> dict[str, np.ndarray]:
        self.ids.close()
        self.labels.close()
        return {k: np.concatenate(v) if v else np.zeros(0, np.int64) for k, v in self.parts.items()}


def _selection(cfg: Config, role: str, good_per_source: list[int]):
    """The rows a split uses, as global row numbers (None: every row once, in order): training sources mixed by
    weight, eval sources concatenated (``prepare.split_rows``' rule on row numbers)."""
    if role == "eval" or (len(good_per_source) == 1 and cfg.data.num_samples is None):
        return None
    weights = [1.0 if s.weight is None else s.weight for s in sources_for(cfg, role)]
    picks, rows = mix_indices(good_per_source, weights, cfg.train.seed, cfg.data.num_samples)
    offsets = np.concatenate([[0], np.cumsum(good_per_source)[:-1]]).astype(np.int64)
    return offsets[picks] + rows


def _buckets(spill: Path, lengths: np.ndarray, order: np.ndarray, row_bucket: np.ndarray, entry_bucket: np.ndarray):
    """Pass 1 of putting the spilled samples in output order without random reads: read the spill files in order,
    a block at a time, and append each sample (once per place it takes in ``order``) to the bucket file of the
    output rows it belongs to. Returns where each entry of ``order`` sits in its bucket file (ids, labels)."""
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    lens = lengths[order]
    by_sample = np.argsort(order, kind="stable")  # entries grouped by the sample they take
    sample_of = order[by_sample]
    ids_at = np.zeros(len(order), dtype=np.int64)
    labels_at = np.zeros(len(order), dtype=np.int64)
    n_buckets = int(row_bucket[-1]) + 1 if len(row_bucket) else 0
    files = [open(spill / f"bucket-{k}.bin", "wb") for k in range(n_buckets)]
    try:
        with open(spill / "ids.bin", "rb") as fi, open(spill / "labels.bin", "rb") as fl:
            first = 0
            while first < len(lengths):
                # a block: whole samples, about BLOCK_TOKENS tokens, at least one
                last = max(first + 1, int(np.searchsorted(starts, starts[first] + BLOCK_TOKENS, side="left")))
                last = min(last, len(lengths))
                count = int(starts[last - 1] + lengths[last - 1] - starts[first])
                ids, labels = (np.fromfile(fh, dtype=np.int32, count=count) for fh in (fi, fl))
                lo, hi = np.searchsorted(sample_of, [first, last])
                entries = by_sample[lo:hi]
                entries = entries[np.argsort(entry_bucket[entries], kind="stable")]
                take = spans(starts[order[entries]] - starts[first], lens[entries])
                ids, labels = ids[take], labels[take]
                buckets, begins = np.unique(entry_bucket[entries], return_index=True)
                bounds = np.concatenate([[0], np.cumsum(lens[entries])])
                ends = np.append(begins[1:], len(entries))
                for k, e0, e1 in zip(buckets.tolist(), begins.tolist(), ends.tolist()):
                    fh = files[k]
                    at = fh.tell() // 4
                    t0, t1 = int(bounds[e0]), int(bounds[e1])
                    within = bounds[e0:e1] - t0
                    ids_at[entries[e0:e1]] = at + within
                    labels_at[entries[e0:e1]] = at + (t1 - t0) + within
                    ids[t0:t1].tofile(fh)
                    labels[t0:t1].tofile(fh)
                first = last
    finally:
        for fh in files:
            fh.close()
    return ids_at, labels_at


def _write_arrow(directory: Path, spill: Path, lengths: np.ndarray, order: np.ndarray, per_row: np.ndarray) -> None:
    """Arrow rows (input_ids, labels, seq_lens) of the samples ``order`` grouped ``per_row`` samples a row, written
    as ``load_from_disk`` reads it.

    The order is random (mixing, shuffled bins), and reading the spill at random through a memory map maps far more
    than each sample (the kernel maps the neighbouring pages, or a whole large folio, on each fault): RSS would grow
    with the data. So the samples go through bucket files instead (``_buckets``: sequential reads, appends), and
    each bucket (a run of output rows, about BUCKET_TOKENS tokens) is read whole and written in output order."""
    import pyarrow as pa
    from datasets import DatasetInfo, Features

    schema = pa.schema([("input_ids", pa.list_(pa.int32())), ("labels", pa.list_(pa.int32())),
                        ("seq_lens", pa.list_(pa.int64()))])
    directory.mkdir(parents=True)
    name = "data-00000-of-00001.arrow"
    lens = lengths[order]
    row_ends = np.cumsum(per_row)
    row_tokens = np.add.reduceat(lens, row_ends - per_row)
    row_before = np.cumsum(row_tokens) - row_tokens
    # at most 512 bucket files open at once, whatever the size of the data
    size = max(BUCKET_TOKENS, -(-int(row_tokens.sum()) // 512))
    row_bucket = row_before // size
    entry_bucket = np.repeat(row_bucket, per_row)
    ids_at, labels_at = _buckets(spill, lengths, order, row_bucket, entry_bucket)
    bucket_rows = np.concatenate([[0], np.flatnonzero(np.diff(row_bucket)) + 1, [len(per_row)]])
    with pa.OSFile(str(directory / name), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
        for k, (r0, r1) in enumerate(zip(bucket_rows[:-1].tolist(), bucket_rows[1:].tolist())):
            buf = np.fromfile(spill / f"bucket-{int(row_bucket[r0])}.bin", dtype=np.int32)
            os.unlink(spill / f"bucket-{int(row_bucket[r0])}.bin")
            row = r0
            while row < r1:  # record batches of about SLICE_TOKENS tokens, at least one row
                stop = min(r1, max(row + 1, int(np.searchsorted(row_before, row_before[row] + SLICE_TOKENS))))
                e0, e1 = int(row_ends[row] - per_row[row]), int(row_ends[stop - 1])
                ids, labels = (buf[spans(at[e0:e1], lens[e0:e1])] for at in (ids_at, labels_at))
                token_bounds = np.concatenate([[0], np.cumsum(row_tokens[row:stop])]).astype(np.int32)
                sample_bounds = np.concatenate([[0], np.cumsum(per_row[row:stop])]).astype(np.int32)
                writer.write_batch(pa.record_batch([
                    pa.ListArray.from_arrays(pa.array(token_bounds), pa.array(ids)),
                    pa.ListArray.from_arrays(pa.array(token_bounds), pa.array(labels)),
                    pa.ListArray.from_arrays(pa.array(sample_bounds), pa.array(lens[e0:e1].astype(np.int64))),
                ], schema=schema))
                row = stop
            del buf
    (directory / "state.json").write_text(json.dumps({
        "_data_files": [{"filename": name}], "_fingerprint": uuid.uuid4().hex[:16], "_format_columns": None,
        "_format_kwargs": {}, "_format_type": None, "_output_all_columns": False, "_split": None}, indent=2))
    DatasetInfo(features=Features.from_arrow_schema(schema)).write_to_directory(str(directory))


def build_causal(cfg: Config, tokenizer, role: str, packed: bool, out: Path, source_names: list[str]) -> Stats:
    """Read, validate, tokenise, mix, pack and write a causal-LM split into ``out`` (a ``load_from_disk``
    directory); returns its statistics. Bad rows stop here (exit 2) unless ``data.on_bad_rows: skip``."""
    global _JOB, _ENCODER
    checks = RowChecks(cfg, role)
    for src in sources_for(cfg, role):  # the formats first: read up to each source's first object row
        checks.add_source(src, iter_source_rows(src, role))
    stats = Stats()
    procs = tokenising_processes(_estimated_rows(cfg, role))
    spill_dir = out.parent / "spill"
    spill_dir.mkdir()
    spill = _Spill(spill_dir)
    line_base: dict[str, int] = {}  # JSON Lines file -> lines in the ranges before the current one
    origins = SourceRows()  # file:line of every good row, for messages that name the data (data/origins.py)
    _JOB, _ENCODER = (cfg, tokenizer, checks.sources), None  # an Encoder of an earlier call holds another tokenizer
    try:
        for task, done in _zip_tasks(_tasks(cfg, role), procs):
            if task.path is not None:
                base = line_base.get(task.path, 0)
                line_base[task.path] = base + done.lines
                checks.add_bad([BadRow(f"{task.path}:{base + b.origin}", b.reason) for b in done.bad])
                origins.add_lines(task.path, np.asarray(done.good_at, dtype=np.int64) + base)
            else:
                checks.add_bad(done.bad)
                origins.add(done.good_at)
            checks.count(task.source, done.read, done.good)
            add_counts(stats, done.counts, done.masks, source_names)
            spill.add(done)
    finally:
        _JOB, _ENCODER = None, None
    arrays = spill.close()
    stats = replace(stats, processes=procs, **checks.finish())
    samples_per_row = arrays["samples"].astype(np.int64)
    first_sample = np.concatenate([[0], np.cumsum(samples_per_row)[:-1]]).astype(np.int64)
    chosen = _selection(cfg, role, checks.good)
    if chosen is not None:  # a mixed selection of rows: recount what it holds
        order = spans(first_sample[chosen], samples_per_row[chosen])
        stats.truncated = int(arrays["truncated"][chosen].sum())
        stats.split = int(arrays["split"][chosen].sum())
        dropped = int(arrays["dropped"][chosen].sum())
        stats.dropped = {DROP_NO_LOSS: dropped} if dropped else {}
        stats.tokens = int(arrays["lengths"][order].sum())
        stats.loss_tokens = int(arrays["loss"][order].sum())
    else:
        order = np.arange(len(arrays["lengths"]), dtype=np.int64)
    stats.samples = len(order)
    if not len(order):
        raise DataError(f"no {role} samples left after tokenisation ({stats.dropped or 'all rows were bad'})")
    lengths = arrays["lengths"].astype(np.int64)
    if packed:
        bins = pack_bins(lengths[order], cfg.data.max_length, cfg.train.seed)
        order = order[np.fromiter(itertools.chain.from_iterable(bins), dtype=np.int64, count=len(order))]
        per_row = np.fromiter((len(b) for b in bins), dtype=np.int64, count=len(bins))
        stats.packed_rows = len(bins)
        del bins
    else:
        per_row = np.ones(len(order), dtype=np.int64)
    _write_arrow(out, spill_dir, lengths, order, per_row)
    origins.write(out, samples_per_row, order, per_row)
    for f in spill_dir.iterdir():
        f.unlink()
    spill_dir.rmdir()
    return stats


def _zip_tasks(tasks, procs: int):
    """(task, result) pairs in order; the task is kept here for its source and file, its rows are not."""
    kept: deque = deque()

    def feed():
        for t in tasks:
            kept.append(replace(t, rows=None))
            yield t

    for done in _results(feed(), procs):
        yield kept.popleft(), done
