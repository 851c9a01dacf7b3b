"""Reading raw rows from a source (file, directory, glob, save_to_disk dataset, custom loader).

Every row keeps its origin (``file:line`` for JSONL, ``file:row N`` for tables) so that any later
problem with it can be reported precisely. Rows that are not even parseable are returned as bad rows.
"""

from __future__ import annotations

import csv
import glob
import importlib
import io
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmforge import cloud
from lmforge.config import DataSource
from lmforge.errors import DataError

DATA_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")
SPLIT_NAMES = {"train": ("train",), "eval": ("val", "validation", "eval", "dev"), "test": ("test",)}


@dataclass
class Row:
    data: Any
    origin: str  # "path:line" or "path:row N" or "loader:row N"
    source: int = 0  # index of the config source it came from (set by rows.SourceCheck)


@dataclass
class BadRow:
    origin: str
    reason: str

    def __str__(self) -> str:
        return f"{self.origin}: {self.reason}"


def is_saved_dataset(path: Path) -> bool:
    return path.is_dir() and ((path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists()
                              or (path / "state.json").exists())


def _split_files(directory: Path, role: str, split: str | None) -> list[Path] | None:
    """For a train/val/test layout return the files of the wanted split; None if not such a layout."""
    names = (split,) if split else SPLIT_NAMES[role]
    entries = {p.stem if p.is_file() else p.name: p for p in directory.iterdir()
               if (p.is_file() and p.suffix in DATA_SUFFIXES) or p.is_dir()}
    if not any(n in entries for group in SPLIT_NAMES.values() for n in group):
        return None
    for name in names:
        if name in entries:
            p = entries[name]
            return [p] if p.is_file() else _data_files_in(p)
    return []


def _data_files_in(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir() if p.is_file() and p.suffix in DATA_SUFFIXES)


def resolve_files(src: DataSource, role: str) -> list[Path]:
    """The data files a source path names, in a deterministic (sorted) order."""
    assert src.path is not None
    given = src.path
    if cloud.is_remote(given):  # a URL: a local copy in the cache, fetched again when an object changes
        given = str(cloud.fetch(given, f"data source {src.path}"))
    path = Path(given).expanduser()
    if any(ch in given for ch in "*?["):
        files = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).suffix in DATA_SUFFIXES)
        if not files:
            raise DataError(f"{src.path}: the glob matches no .jsonl/.json/.parquet/.csv file")
        return files
    if path.is_file():
        if path.suffix not in DATA_SUFFIXES:
            raise DataError(f"{src.path}: unsupported file type {path.suffix!r} (use .jsonl, .json, .parquet or .csv)")
        return [path]
    if path.is_dir():
        files = _split_files(path, role, src.split)
        if files is None:
            files = _data_files_in(path)
        if not files:
            raise DataError(f"{src.path}: no data files for the {src.split or role} split in this directory")
        return files
    raise DataError(f"{src.path}: no such file or directory")


def has_split(path: str, role: str) -> bool:
    p = Path(path).expanduser()
    return p.is_dir() and not is_saved_dataset(p) and bool(_split_files(p, role, None))


# Undecodable bytes are read as lone surrogates (errors="surrogateescape"), never as U+FFFD, so that a row
# holding them is reported as a bad row instead of training on replacement characters.
_UNDECODABLE = re.compile("[\udc80-\udcff]")


def _invalid_utf8(text: str, column: bool = True) -> str | None:
    """The bad-row reason for text read with surrogateescape, or None when it was valid UTF-8."""
    m = _UNDECODABLE.search(text)
    if m is None:
        return None
    at = f" at column {m.start() + 1}" if column else ""
    return f"invalid UTF-8 (byte 0x{ord(m.group()) - 0xDC00:02x}{at}); re-encode the file as UTF-8"


def parse_jsonl_line(line: str) -> tuple[Any, str | None]:
    """(row, None) for a JSON Lines line, or (None, the bad-row reason). Blank lines are not passed here."""
    reason = _invalid_utf8(line)
    if reason:
        return None, reason
    try:
        return json.loads(line), None
    except json.JSONDecodeError as e:
        return None, f"invalid JSON ({e.msg} at column {e.colno})"


def _jsonl_rows(path: Path):
    with path.open("r", encoding="utf-8", errors="surrogateescape") as fh:
        for lineno, line in enumerate(fh, start=1):
            if line.strip():
                obj, reason = parse_jsonl_line(line)
                yield BadRow(f"{path}:{lineno}", reason) if reason else Row(obj, f"{path}:{lineno}")


def _read_jsonl(path: Path, rows: list[Row], bad: list[BadRow]) -> None:
    for r in _jsonl_rows(path):
        (bad if isinstance(r, BadRow) else rows).append(r)


def jsonl_ranges(path: Path, size: int) -> list[tuple[int, int]]:
    """Byte ranges of a JSON Lines file of about ``size`` bytes each, every one starting at a line start, so that
    workers can read and parse their own part of a large file."""
    total = path.stat().st_size
    bounds = [0]
    with path.open("rb") as fh:
        while bounds[-1] + size < total:
            fh.seek(bounds[-1] + size)
            fh.readline()  # to the end of the line the cut fell in
            if fh.tell() >= total:
                break
            bounds.append(fh.tell())
    return list(zip(bounds, bounds[1:] + [total]))


def jsonl_range_lines(path: Path, start: int, end: int):
    """The lines of a byte range (``jsonl_ranges``) as text mode reads them (universal newlines, undecodable bytes
    kept as surrogates): yields (line number within the range, counting from 1, line)."""
    with path.open("rb") as fh:
        fh.seek(start)
        text = fh.read(end - start).decode("utf-8", errors="surrogateescape")
    yield from enumerate(io.StringIO(text, newline=None), start=1)


def _read_json(path: Path, rows: list[Row], bad: list[BadRow]) -> None:
    try:
        obj = json.loads(path.read_text(encoding="utf-8", errors="surrogateescape"))
    except json.JSONDecodeError as e:
        # A .json file may also be JSON Lines: fall back before reporting.
        if e.msg == "Extra data":
            return _read_jsonl(path, rows, bad)
        bad.append(BadRow(f"{path}:{e.lineno}", f"invalid JSON ({e.msg} at column {e.colno})"))
        return
    if isinstance(obj, dict) and len(obj) == 1 and isinstance(next(iter(obj.values())), list):
        obj = next(iter(obj.values()))  # {"data": [...]}
    if not isinstance(obj, list):
        bad.append(BadRow(f"{path}:1", "a .json file must hold a list of row objects"))
        return
    for i, item in enumerate(obj):
        reason = _invalid_utf8(json.dumps(item, ensure_ascii=False), column=False)
        if reason:
            bad.append(BadRow(f"{path}:row {i + 1}", reason))
        else:
            rows.append(Row(item, f"{path}:row {i + 1}"))


def _read_csv(path: Path, rows: list[Row], bad: list[BadRow]) -> None:
    with path.open(newline="", encoding="utf-8", errors="surrogateescape") as fh:
        reader = csv.DictReader(fh)
        for rec in reader:
            reason = _invalid_utf8(json.dumps(rec, ensure_ascii=False), column=False)
            if reason:
                bad.append(BadRow(f"{path}:{reader.line_num}", reason))
                continue
            rows.append(Row(dict(rec), f"{path}:{reader.line_num}"))


_READERS = {".jsonl": _read_jsonl, ".json": _read_json, ".csv": _read_csv}


def _read_saved_dataset(src: DataSource, role: str):
    """The rows of a ``save_to_disk`` dataset, read lazily from its memory-mapped Arrow data."""
    from datasets import DatasetDict, load_from_disk

    ds = load_from_disk(src.path)
    if isinstance(ds, DatasetDict):
        names = (src.split,) if src.split else SPLIT_NAMES[role]
        name = next((n for n in names if n in ds), None)
        if name is None:
            raise DataError(f"{src.path}: the saved dataset has splits {list(ds)}, none of them {list(names)}")
        ds = ds[name]
    for i, rec in enumerate(ds):
        yield Row(rec, f"{src.path}:row {i + 1}")


def _read_loader(src: DataSource):
    spec = src.loader or ""
    module_name, _, func_name = spec.partition(":")
    if not module_name or not func_name:
        raise DataError(f"loader {spec!r}: expected 'package.module:function'")
    try:
        func = getattr(importlib.import_module(module_name), func_name)
    except (ImportError, AttributeError) as e:
        raise DataError(f"loader {spec!r}: cannot import ({e})") from None
    for i, rec in enumerate(func()):
        yield Row(rec, f"{spec}:row {i + 1}")


def iter_file_rows(path: Path):
    """The rows of one data file, lazily where the format allows (JSON Lines, CSV, Parquet by record batch):
    yields Row or BadRow in file order."""
    if path.suffix == ".jsonl":
        yield from _jsonl_rows(path)
    elif path.suffix == ".parquet":
        import pyarrow.parquet as pq

        i = 0
        for batch in pq.ParquetFile(path).iter_batches(batch_size=10_000):
            for rec in batch.to_pylist():
                i += 1
                yield Row(rec, f"{path}:row {i}")
    else:  # .json holds one document; CSV is small next to what JSONL and Parquet hold at scale
        rows: list[Row] = []
        bad: list[BadRow] = []
        _READERS[path.suffix](path, rows, bad)
        yield from sorted(rows + bad, key=lambda r: _origin_order(r.origin))


def _origin_order(origin: str) -> int:
    """Position of a row in its file from its origin ("path:7" or "path:row 7")."""
    tail = origin.rsplit(":", 1)[1]
    return int(tail.removeprefix("row "))


def iter_source_rows(src: DataSource, role: str):
    """Every row of one source in order, lazily: Row, or BadRow for what cannot even be parsed."""
    if src.loader:
        yield from _read_loader(src)
    elif is_saved_dataset(Path(src.path).expanduser()):
        yield from _read_saved_dataset(src, role)
    else:
        for path in resolve_files(src, role):
            yield from iter_file_rows(path)


def read_source(src: DataSource, role: str) -> tuple[list[Row], list[BadRow]]:
    """All rows of one source, plus the rows that could not even be parsed."""
    rows: list[Row] = []
    bad: list[BadRow] = []
    for r in iter_source_rows(src, role):
        (bad if isinstance(r, BadRow) else rows).append(r)
    if not rows and not bad:
        raise DataError(f"{src.path or src.loader}: the source is empty")
    return rows, bad
