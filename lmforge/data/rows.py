"""The checks every row of a split goes through, written once for the three readers of rows: ``prepare.load_rows``
(rows in memory), ``bounded.build_causal`` (rows checked in forked workers) and ``streaming.PackedStream`` (rows
checked while training).

- A source is not empty, and its format (``format:``, or detected from its first object row) is one the method trains
  on (``registry.METHOD_FORMATS``): checked before any row is tokenised.
- Each row is parsed (sources.py) and normalised against that format (formats.py), or becomes a ``BadRow`` that
  names it (``file:line``) and says why.
- Bad rows stop the run (exit 2) unless ``data.on_bad_rows: skip``, which drops them and counts them (``bad rows
  skipped`` in ``lmforge prepare``). A split read whole stops after reading it, quoting the first ``SHOWN_BAD``; a
  stream stops at its first bad row, as it cannot read ahead to count the others.
"""

from __future__ import annotations

from itertools import chain
from typing import Iterable

from lmforge.config import Config, DataSource
from lmforge.data.formats import check_row, source_format
from lmforge.data.sources import BadRow, Row
from lmforge.errors import DataError
from lmforge.registry import METHOD_FORMATS

SHOWN_BAD = 20  # bad rows quoted in the error (all are counted)


class SourceCheck:
    """One source's format, checked against the method, and the check of each of its rows. Picklable: the workers of
    ``bounded.py`` get a copy."""

    def __init__(self, method: str, src: DataSource, index: int, rows: Iterable[Row | BadRow]):
        """``rows``: the source's rows in order (Row, or BadRow for what could not be parsed), read only as far as
        detecting the format needs (its first object row; not at all with ``format:`` set)."""
        self.src, self.index, self.name = src, index, src.path or src.loader
        if src.format == "auto":
            rows = iter(rows)
            first = next(rows, None)
            if first is None:
                self.require_rows(0)
            rows = chain([first], rows)
        self.fmt = source_format(src, rows)
        allowed = METHOD_FORMATS[method]
        if self.fmt not in allowed:
            raise DataError(f"{self.name}: {self.fmt} rows cannot train method {method!r} "
                            f"(expected {' or '.join(allowed)})")

    def check(self, row: Row | BadRow) -> Row | BadRow:
        """The row normalised (``Row.source`` is this source's index), or a BadRow with the reason."""
        return check_row(row, self.fmt, self.src, self.index)

    def require_rows(self, read: int) -> None:
        """Stop on a source that gave no row at all (good or bad) once read through."""
        if not read:
            raise DataError(f"{self.name}: the source is empty")


class RowChecks:
    """The row checks of one split (a role's sources): a ``SourceCheck`` per source, what they found (rows read and
    good rows per source; bad rows, all counted, the first ``SHOWN_BAD`` kept to quote), and what stops the run.
    ``streamed``: the checks of a stream, which stops at its first bad row (``add_bad``) unless skipped."""

    def __init__(self, cfg: Config, role: str, streamed: bool = False):
        self.method, self.role, self.on_bad_rows, self.streamed = cfg.method, role, cfg.data.on_bad_rows, streamed
        self.sources: list[SourceCheck] = []
        self.read: list[int] = []
        self.good: list[int] = []
        self.bad_count = 0
        self.bad_shown: list[BadRow] = []

    def add_source(self, src: DataSource, rows: Iterable[Row | BadRow]) -> SourceCheck:
        """The next source's check (see ``SourceCheck`` for what of ``rows`` is read)."""
        check = SourceCheck(self.method, src, len(self.sources), rows)
        self.sources.append(check)
        self.read.append(0)
        self.good.append(0)
        return check

    def count(self, source: int, read: int, good: int) -> None:
        """Rows read from a source (good or bad) and the good ones among them."""
        self.read[source] += read
        self.good[source] += good

    def add_bad(self, bad: list[BadRow]) -> None:
        """Bad rows found; a stream stops here unless ``data.on_bad_rows: skip``."""
        self.bad_count += len(bad)
        self.bad_shown += bad[:SHOWN_BAD - len(self.bad_shown)]
        if self.streamed:
            self._stop_on_bad_rows()

    def finish(self) -> dict:
        """After the split was read: an empty source, or any bad row unless ``data.on_bad_rows: skip``, stops here
        (DataError, exit 2). Returns the counts ``lmforge prepare`` prints (``Stats`` fields): rows read, good rows
        per format, bad rows skipped."""
        for check, read in zip(self.sources, self.read):
            check.require_rows(read)
        self._stop_on_bad_rows()
        formats: dict[str, int] = {}
        for check, good in zip(self.sources, self.good):
            formats[check.fmt] = formats.get(check.fmt, 0) + good
        return {"rows": sum(self.read), "formats": formats, "bad_rows": self.bad_count}

    def _stop_on_bad_rows(self) -> None:
        if not self.bad_count or self.on_bad_rows != "error":
            return
        if self.streamed:
            raise DataError(f"bad row in the training stream: {self.bad_shown[0]}\n"
                            "Fix it, or set data.on_bad_rows: skip to drop bad rows.")
        shown = "\n".join(f"  {b}" for b in self.bad_shown)
        unshown = self.bad_count - len(self.bad_shown)
        more = f"\n  ... and {unshown} more" if unshown else ""
        raise DataError(f"{self.bad_count} bad row(s) in the {self.role} data:\n{shown}{more}\n"
                        "Fix them, or set data.on_bad_rows: skip to drop them.")
