"""Where each row of a prepared split came from: the source ``file:line`` of every sample in it.

A prepared causal-LM row can hold several samples from anywhere in the sources (mixed by weight, packed by
length), so its number tells a user nothing about which lines of which file to look at. ``SourceRows`` collects,
while a split is built (``data/bounded.py``), each source row's origin as a shared prefix and a number
(``data/train.jsonl:`` and 12, ``data/t.parquet:row `` and 3), and ``write`` saves beside the cached Arrow data
the source rows of every output row's samples: a few integers per row and per sample. They are read back only
when a message must name the data (``of_rows``: the NaN stop, ``training/stopping.py``).

A training batch names its rows under ``ROWS`` where the engine does not know them from its own sampler: the HF
engine's dataset is ``numbered`` and its collator passes the numbers on; the trainer pops them before the model
sees the batch.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

DIRNAME = "origins"  # in the cached split's Arrow directory, beside its data files
ROWS = "lmforge_rows"  # a record's row number in its split, and a batch's list of them
_NUMBERED = re.compile(r"^(.*?)(\d+)$")  # "path:12" -> ("path:", 12); "path:row 3" -> ("path:row ", 3)


class SourceRows:
    """The origin of every source row that gave samples, in the order the build reads them (its global row
    numbers), kept as a prefix index and a number per row."""

    def __init__(self):
        self.prefixes: dict[str, int] = {}
        self.prefix_parts: list[np.ndarray] = []
        self.number_parts: list[np.ndarray] = []

    def _prefix(self, prefix: str) -> int:
        return self.prefixes.setdefault(prefix, len(self.prefixes))

    def add_lines(self, path: str, lines) -> None:
        """Rows of one file, by line number."""
        lines = np.asarray(lines, dtype=np.int64)
        self.prefix_parts.append(np.full(len(lines), self._prefix(f"{path}:"), dtype=np.int32))
        self.number_parts.append(lines)

    def add(self, origins: list[str]) -> None:
        """Rows by their origin strings (``sources.Row.origin``)."""
        prefix, number = np.empty(len(origins), dtype=np.int32), np.empty(len(origins), dtype=np.int64)
        for i, origin in enumerate(origins):
            m = _NUMBERED.match(origin)
            prefix[i], number[i] = (self._prefix(m[1]), int(m[2])) if m else (self._prefix(origin), -1)
        self.prefix_parts.append(prefix)
        self.number_parts.append(number)

    def write(self, directory: Path, samples_per_row: np.ndarray, order: np.ndarray, per_row: np.ndarray) -> None:
        """Save under ``directory/origins``: ``samples_per_row`` (samples each source row gave), ``order`` (the
        samples in output order) and ``per_row`` (samples per output row) are the build's own arrays."""
        source_of_sample = np.repeat(np.arange(len(samples_per_row), dtype=np.int64), samples_per_row)
        out = directory / DIRNAME
        out.mkdir()
        np.save(out / "ends.npy", np.cumsum(per_row))  # output row r holds entries ends[r-1]:ends[r]
        np.save(out / "sources.npy", source_of_sample[order])  # the source row of each entry
        np.save(out / "prefix.npy", np.concatenate(self.prefix_parts or [np.zeros(0, np.int32)]))
        np.save(out / "number.npy", np.concatenate(self.number_parts or [np.zeros(0, np.int64)]))
        (out / "prefixes.json").write_text(json.dumps(list(self.prefixes)))


def numbered(dataset):
    """``dataset`` (a ``datasets.Dataset``) whose records also carry their row number under ``ROWS`` (an extra
    in-memory column; the data files are shared)."""
    return dataset.add_column(ROWS, np.arange(len(dataset), dtype=np.int64))


def of_rows(dataset, rows) -> list[str] | None:
    """The origins of the samples in rows ``rows`` of ``dataset`` (a prepared split), in row order, each once;
    None when the split recorded none (a layout built in memory, or a cache written before they were kept)."""
    directory = next((Path(f["filename"]).parent / DIRNAME for f in getattr(dataset, "cache_files", None) or []
                      if (Path(f["filename"]).parent / DIRNAME).is_dir()), None)
    if directory is None:
        return None
    ends, sources, prefix, number = (np.load(directory / f"{name}.npy", mmap_mode="r")
                                     for name in ("ends", "sources", "prefix", "number"))
    prefixes = json.loads((directory / "prefixes.json").read_text())
    out: dict[str, None] = {}  # ordered, without repeats (a row split into pieces, a row drawn twice)
    for r in rows:
        for s in sources[(int(ends[r - 1]) if r else 0):int(ends[r])].tolist():
            n = int(number[s])
            out[prefixes[prefix[s]] + (str(n) if n >= 0 else "")] = None
    return list(out)
