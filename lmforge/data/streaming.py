"""``data.streaming: true``: training rows read, tokenised and packed while the model trains, so a corpus
larger than memory or the disk cache trains (pretrain and sft on the native engine; ``train.max_steps`` sets
the length, as a stream has no epochs to count).

The pipeline, in a background thread that stays a few rows ahead of the training loop:
  sources (read lazily where they are, local or at any fsspec URL, in ranges of ``sources.BLOCK`` bytes: JSONL line
           by line, Parquet by row group, a ``datasets`` save_to_disk directory's Arrow files by record batch, JSON
           and CSV files whole; epoch after epoch; nothing is copied to disk)
  -> this rank's rows (row k of a source goes to rank k % world: no overlap between ranks)
  -> weighted mixing (a seeded draw of the source for each row, ``weight`` as in the cached mode)
  -> row checks and tokenisation (the same ``rows.RowChecks`` and ``Encoder`` as the cached mode; long pretraining
     documents split, long SFT samples truncated, samples without loss dropped)
  -> a shuffle buffer of ``data.shuffle_buffer`` samples (seeded)
  -> packing (greedy: samples are appended to the current row until the next one does not fit).

Exact resume: a checkpoint holds this rank's whole stream state (each source's position, the RNG, the shuffle
buffer, the row being packed, and the rows produced ahead but not yet trained on), taken while the producer
waits, so a resumed run gets the same rows as an uninterrupted one, bitwise. A source's position is its epoch,
file index, rows read from the file (``line``: lines for JSONL, blank ones included) and where in the file that is
(``sources.rows_from``: a byte offset for JSONL and Arrow; Parquet's footer maps the row to its row group), so a
resumed stream seeks there instead of reading the file from its start.
"""

from __future__ import annotations

import copy
import random
import threading

from lmforge.config import Config, DataSource
from lmforge.data.rows import RowChecks
from lmforge.data.sources import START, BadRow, iter_file_rows, parsed, rows_from, source_files
from lmforge.data.tokenize import IGNORE, Encoder, chunk
from lmforge.errors import ConfigError


READ_AHEAD_ROWS = 1000  # rows the format check may read and keep for the stream (it stops at the first object row)


class _Source:
    """One config source read lazily and endlessly; its position is (epoch, file index, the position in the file:
    ``sources.rows_from``). Its format and the check of its rows come from ``checks`` (rows.RowChecks), as in the
    cached mode."""

    def __init__(self, src: DataSource, index: int, checks: RowChecks):
        if src.loader:
            raise ConfigError(f"data.train[{index}]: data.streaming reads files (JSONL, JSON, CSV, Parquet; a "
                              "directory or glob of them; a saved dataset); a loader needs data.streaming: false")
        self.files = source_files(src, "train")  # where they are: nothing is downloaded
        # The first file is opened once: the format check reads its first rows, which are kept, and a stream that
        # starts at the beginning goes on from there (an object in a bucket: no second open, no second first range)
        self.opened = rows_from(self.files[0], START)
        self.read_ahead: list | None = []  # the rows of self.opened read so far; None: too many kept, reopen instead
        # the format: from the source's first object row, read here (rows.SourceCheck), as in the cached mode
        self.check = checks.add_source(src, self._first_rows())
        self.pos = {"epoch": 0, "file": 0, **START, "seen": 0}

    def _first_rows(self):
        """The source's rows for its format check: the first file's through ``self.opened`` (kept in
        ``self.read_ahead`` up to READ_AHEAD_ROWS), then the other files'."""
        for item in self.opened:
            if self.read_ahead is not None:
                self.read_ahead.append(item)
                if len(self.read_ahead) > READ_AHEAD_ROWS:  # a long run of rows that are not objects: not kept
                    self.read_ahead = None
            yield parsed(item[1], item[2])
        for f in self.files[1:]:
            yield from iter_file_rows(f)

    def _rows_of_file(self):
        """(position after, origin, row) of the current file from the current position: the first file's reader,
        opened for the format check, when the stream starts at the beginning; else the file opened at the
        position."""
        opened, kept, self.opened, self.read_ahead = self.opened, self.read_ahead, None, None
        if opened is not None and kept is not None and self.pos["file"] == 0 and self.pos["line"] == 0:
            yield from kept
            yield from opened
            return
        if opened is not None:
            opened.close()
        yield from rows_from(self.files[self.pos["file"]], self.pos)

    def raw(self):
        """(origin, unparsed JSON Lines line, or Row / BadRow of another file), forever, from the current position."""
        # rows in this pass over the files; none in a whole pass: an empty source (else this would loop forever)
        read, whole = 0, self.pos["file"] == 0 and self.pos["line"] == 0
        while True:
            for after, origin, row in self._rows_of_file():
                self.pos.update(after)
                read += 1
                yield origin, row
            self.pos.update(START, file=self.pos["file"] + 1)
            if self.pos["file"] == len(self.files):
                if whole:
                    self.check.require_rows(read)
                self.pos["file"], self.pos["epoch"] = 0, self.pos["epoch"] + 1
                read, whole = 0, True

    def rows(self, rank: int, world: int):
        """This rank's rows, checked (rows.SourceCheck): Row (normalised) or BadRow (file:line and reason)."""
        for origin, row in self.raw():
            mine = self.pos["seen"] % world == rank
            self.pos["seen"] += 1
            if not mine:
                continue
            yield self.check.check(parsed(origin, row))  # a JSON Lines line is parsed by the one rank that reads it


class PackedStream:
    """An endless iterator of this rank's training rows (``input_ids``, ``labels``, ``seq_lens``); ``take(n)``
    returns the next n, ``peek()`` the next one without taking it; ``state_dict`` / ``load_state_dict``."""

    def __init__(self, cfg: Config, tokenizer, packed: bool, rank: int = 0, world: int = 1, ahead: int = 16):
        self.cfg, self.packed, self.rank, self.world, self.ahead = cfg, packed, rank, world, ahead
        self.checks = RowChecks(cfg, "train", streamed=True)  # stops at the first bad row unless on_bad_rows: skip
        self.sources = [_Source(src, i, self.checks) for i, src in enumerate(cfg.data.train)]
        self.weights = [src.weight if src.weight is not None else 1.0 for src in cfg.data.train]
        self.encoder = Encoder(tokenizer, apply_chat_template=cfg.data.apply_chat_template)
        self.rng = random.Random(f"{cfg.train.seed}/{rank}")
        self.buffer: list[tuple[list[int], list[int]]] = []  # the shuffle buffer: (input_ids, labels)
        self.row: dict = {"input_ids": [], "labels": [], "seq_lens": []}  # the row being packed
        self.ready: list[dict] = []  # rows produced, not yet taken
        self.counts = {"rows": 0, "samples": 0}  # and bad rows: self.checks.bad_count
        self.error: BaseException | None = None
        self.cond = threading.Condition()
        self.thread: threading.Thread | None = None
        self._iters = None

    # ------------------------------------------------------------------------------------------ consuming
    def take(self, n: int) -> list[dict]:
        rows: list[dict] = []
        with self.cond:
            self._start()
            while len(rows) < n:  # as they come: n may exceed how far the producer reads ahead
                self.cond.wait_for(lambda: self.ready or self.error is not None)
                if self.error is not None:
                    raise self.error
                k = min(n - len(rows), len(self.ready))
                rows, self.ready = rows + self.ready[:k], self.ready[k:]
                self.cond.notify_all()
        return rows

    def peek(self) -> dict:
        with self.cond:
            self._start()
            self.cond.wait_for(lambda: self.ready or self.error is not None)
            if self.error is not None:
                raise self.error
            return self.ready[0]

    def state_dict(self) -> dict:
        """Everything the next rows depend on, taken while the producer waits."""
        with self.cond:
            return copy.deepcopy({"positions": [s.pos for s in self.sources], "rng": self.rng.getstate(),
                                  "buffer": self.buffer, "row": self.row, "ready": self.ready,
                                  "counts": {**self.counts, "bad_rows": self.checks.bad_count}})

    def load_state_dict(self, state: dict) -> None:
        if self.thread is not None:
            raise RuntimeError("load_state_dict before the first take")
        for s, pos in zip(self.sources, state["positions"]):
            s.pos = dict(pos)
        self.rng.setstate(state["rng"])
        self.buffer, self.row, self.ready = state["buffer"], state["row"], state["ready"]
        self.counts = dict(state["counts"])
        self.checks.bad_count = self.counts.pop("bad_rows")

    # ------------------------------------------------------------------------------------------ producing
    def _start(self) -> None:
        if self.thread is None:
            self._iters = [s.rows(self.rank, self.world) for s in self.sources]
            self.thread = threading.Thread(target=self._produce, name="lmforge-stream", daemon=True)
            self.thread.start()

    def _produce(self) -> None:
        try:
            while True:
                with self.cond:  # one row at a time under the lock: state_dict sees a consistent stream
                    self.cond.wait_for(lambda: len(self.ready) < self.ahead)
                    self.ready.append(self._next_row())
                    self.cond.notify_all()
        except BaseException as e:  # noqa: BLE001 - handed to the training loop, which raises it
            with self.cond:
                self.error = e
                self.cond.notify_all()

    def _next_row(self) -> dict:
        if not self.packed:
            ids, labels = self._next_sample()
            return {"input_ids": ids, "labels": labels}
        max_len = self.cfg.data.max_length
        while True:
            ids, labels = self._next_sample()
            if self.row["seq_lens"] and len(self.row["input_ids"]) + len(ids) > max_len:
                done, self.row = self.row, {"input_ids": [], "labels": [], "seq_lens": []}
                self._append(ids, labels)
                return done
            self._append(ids, labels)

    def _append(self, ids: list[int], labels: list[int]) -> None:
        self.row["input_ids"] += ids
        self.row["labels"] += labels
        self.row["seq_lens"].append(len(ids))

    def _next_sample(self) -> tuple[list[int], list[int]]:
        """The next sample out of the shuffle buffer (filled first, then one in for each one out)."""
        size = max(1, self.cfg.data.shuffle_buffer)
        while len(self.buffer) < size:
            self.buffer.extend(self._encoded_row())
        k = self.rng.randrange(len(self.buffer))
        self.buffer[k], self.buffer[-1] = self.buffer[-1], self.buffer[k]
        return self.buffer.pop()

    def _encoded_row(self) -> list[tuple[list[int], list[int]]]:
        """The samples of the next row of a source drawn by weight (a pretraining document may give several)."""
        i = self.rng.choices(range(len(self.sources)), weights=self.weights)[0]
        row = next(self._iters[i])
        self.counts["rows"] += 1
        if isinstance(row, BadRow):
            self.checks.add_bad([row])  # the run stops here unless data.on_bad_rows: skip
            return []
        fmt = self.sources[i].check.fmt
        e = self.encoder.encode(row.data, fmt)
        max_len = self.cfg.data.max_length
        if self.cfg.method == "pretrain" or fmt == "text":
            pieces = chunk(e, max_len)
        else:
            pieces = [e]
            if len(e.input_ids) > max_len:
                e.input_ids, e.labels = e.input_ids[:max_len], e.labels[:max_len]
        out = [(p.input_ids, p.labels) for p in pieces if any(x != IGNORE for x in p.labels)]
        self.counts["samples"] += len(out)
        return out
