"""Reading raw rows from a source (file, directory, glob, save_to_disk dataset, custom loader).

Every row keeps its origin (``file:line`` for JSONL, ``file:row N`` for tables) so that any later
problem with it can be reported precisely. Rows that are not even parseable are returned as bad rows.

Files are listed (``LocalTree``, ``FsTree``) and read (``rows_from``) where they are, on the local disk or at a URL
of any fsspec protocol, from a position: a stream (streaming.py) reads a bucket in ranges as training consumes it
and a resumed one seeks. The cached mode (``resolve_files``) copies a URL's files into the cache first.
"""

from __future__ import annotations

import csv
import glob
import importlib
import io
import json
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Iterator

from lmforge import cloud
from lmforge.config import DataSource
from lmforge.errors import DataError, LmforgeError

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


SAVED_DATASET_FILES = ("dataset_info.json", "dataset_dict.json", "state.json")  # what save_to_disk writes


class LocalTree:
    """The listing operations ``source_files`` needs, on the local disk (``FsTree``: at an fsspec URL)."""

    def path(self, given: str) -> Path:
        return Path(given).expanduser()

    def glob(self, pattern: str) -> list[Path]:
        return sorted(Path(p) for p in glob.glob(pattern, recursive=True))

    def is_file(self, path: Path) -> bool:
        return path.is_file()

    def is_dir(self, path: Path) -> bool:
        return path.is_dir()

    def children(self, directory: Path) -> list[tuple[Path, bool]]:
        """(entry, is a file) for the files and directories in ``directory``."""
        return [(p, p.is_file()) for p in directory.iterdir() if p.is_file() or p.is_dir()]

    def read_text(self, path: Path) -> str:
        return path.read_text()

    def name(self, path: Path) -> str:
        """How files are named to the rest of lmforge: the local path, or the URL."""
        return str(path)


class FsTree(LocalTree):
    """The same operations inside the fsspec filesystem of ``url`` (s3://, memory://, file://, ...), read where the
    files are: nothing is copied. Paths are ``PurePosixPath`` inside the filesystem; ``name`` gives them as URLs."""

    def __init__(self, url: str):
        self.fs, self.root = cloud.filesystem(url)

    def path(self, given: str) -> PurePosixPath:
        """Inside the filesystem: the path of ``url`` (``given``)."""
        return PurePosixPath(self.root)

    def glob(self, pattern: str) -> list[PurePosixPath]:
        return sorted(PurePosixPath(p) for p in self.fs.glob(pattern))

    def is_file(self, path: PurePosixPath) -> bool:
        return self.fs.isfile(str(path))

    def is_dir(self, path: PurePosixPath) -> bool:
        return self.fs.isdir(str(path))

    def children(self, directory: PurePosixPath) -> list[tuple[PurePosixPath, bool]]:
        return [(PurePosixPath(e["name"]), e["type"] == "file") for e in self.fs.ls(str(directory), detail=True)
                if e["type"] in ("file", "directory")]

    def read_text(self, path: PurePosixPath) -> str:
        return self.fs.cat_file(str(path)).decode()

    def name(self, path: PurePosixPath) -> str:
        return self.fs.unstrip_protocol(str(path))


def at_url(path: str) -> bool:
    """``path`` is a URL fsspec reads (``file://`` too), not a plain local path."""
    return cloud.is_remote(path) or str(path).startswith("file://")


def tree_of(path: str) -> LocalTree:
    """Where ``path`` is listed and read: the local disk, or the fsspec filesystem of a URL."""
    return FsTree(path) if at_url(path) else LocalTree()


def is_saved_dataset(path, tree: LocalTree | None = None) -> bool:
    tree = tree or LocalTree()
    return tree.is_dir(path) and any(tree.is_file(path / n) for n in SAVED_DATASET_FILES)


def saved_split(splits, src: DataSource, role: str) -> str:
    """The split of a saved ``DatasetDict`` a source reads: ``split:``, or the role's usual names."""
    names = (src.split,) if src.split else SPLIT_NAMES[role]
    name = next((n for n in names if n in splits), None)
    if name is None:
        raise DataError(f"{src.path}: the saved dataset has splits {list(splits)}, none of them {list(names)}")
    return name


def saved_dataset_files(src: DataSource, role: str, tree: LocalTree, path) -> list[str]:
    """The Arrow files of a ``save_to_disk`` dataset in row order (its ``state.json``; for a ``DatasetDict``, those of
    the split the source reads), named as ``tree.name`` does."""
    if tree.is_file(path / "dataset_dict.json"):
        path = path / saved_split(json.loads(tree.read_text(path / "dataset_dict.json"))["splits"], src, role)
    state = json.loads(tree.read_text(path / "state.json"))
    return [tree.name(path / f["filename"]) for f in state["_data_files"]]


def _split_files(tree: LocalTree, directory, role: str, split: str | None) -> list | None:
    """For a train/val/test layout return the files of the wanted split; None if not such a layout."""
    names = (split,) if split else SPLIT_NAMES[role]
    entries = {p.stem if is_file else p.name: (p, is_file) for p, is_file in tree.children(directory)
               if not is_file or p.suffix in DATA_SUFFIXES}
    if not any(n in entries for group in SPLIT_NAMES.values() for n in group):
        return None
    for name in names:
        if name in entries:
            p, is_file = entries[name]
            return [p] if is_file else _data_files_in(tree, p)
    return []


def _data_files_in(tree: LocalTree, directory) -> list:
    return sorted(p for p, is_file in tree.children(directory) if is_file and p.suffix in DATA_SUFFIXES)


def resolve_files(src: DataSource, role: str) -> list[Path]:
    """The data files a source path names, in a deterministic (sorted) order; a URL's are first copied into the
    cache (``source_files`` reads them where they are)."""
    assert src.path is not None
    given = src.path
    if cloud.is_remote(given):  # a URL: a local copy in the cache, fetched again when an object changes
        given = str(cloud.fetch(given, f"data source {src.path}"))
    return _files(src, role, LocalTree(), given)


def source_files(src: DataSource, role: str) -> list[str]:
    """The files of a source where they are, local paths or URLs (any fsspec protocol), nothing copied: its data
    files in sorted order, or a ``save_to_disk`` dataset's Arrow files in row order."""
    assert src.path is not None
    tree = tree_of(src.path)
    path = tree.path(src.path)
    try:
        if is_saved_dataset(path, tree):
            return saved_dataset_files(src, role, tree, path)
        return [tree.name(p) for p in _files(src, role, tree, src.path)]
    except LmforgeError:
        raise
    except Exception as e:  # noqa: BLE001 - no access, no credentials, no such bucket, an unreachable server
        raise DataError(f"{src.path}: cannot read it: {type(e).__name__}: {e}") from None


def _files(src: DataSource, role: str, tree: LocalTree, given: str) -> list:
    path = tree.path(given)
    if any(ch in given for ch in "*?["):
        files = [p for p in tree.glob(str(path)) if p.suffix in DATA_SUFFIXES]
        if not files:
            raise DataError(f"{src.path}: the glob matches no .jsonl/.json/.parquet/.csv file")
        return files
    if tree.is_file(path):
        if path.suffix not in DATA_SUFFIXES:
            raise DataError(f"{src.path}: unsupported file type {path.suffix!r} (use .jsonl, .json, .parquet or .csv)")
        return [path]
    if tree.is_dir(path):
        files = _split_files(tree, path, role, src.split)
        if files is None:
            files = _data_files_in(tree, path)
        if not files:
            raise DataError(f"{src.path}: no data files for the {src.split or role} split in this directory")
        return files
    raise DataError(f"{src.path}: no such file or directory")


def has_split(path: str, role: str) -> bool:
    p = Path(path).expanduser()
    return p.is_dir() and not is_saved_dataset(p) and bool(_split_files(LocalTree(), p, role, None))


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


def jsonl_lines(fh, at: dict | None = None):
    """The lines of a JSON Lines file (``fh``: binary, seekable) as text mode reads them (universal newlines,
    undecodable bytes kept as surrogates), from position ``at`` on (``START`` or None: the beginning):
    yields (the position after the line, the line). A position is ``line`` (lines read, blank ones included),
    ``offset`` (the byte offset of the next line: ``fh`` is seeked there, nothing before it is read) and ``sub``
    (lines already read of the one at ``offset``: text mode also ends a line at a lone CR)."""
    at = at or {}
    line, offset, sub = at.get("line", 0), at.get("offset"), at.get("sub", 0)
    again = 0
    if offset is None:  # a position in lines only (a stream state written before byte offsets): count them again
        again, line, offset = line, 0, 0
    fh.seek(offset)
    for raw in fh:
        text = raw.decode("utf-8", errors="surrogateescape")
        parts = list(io.StringIO(text, newline=None)) if "\r" in text else [text]
        end = offset + len(raw)
        for k in range(sub, len(parts)):
            line += 1
            if line > again:
                last = k == len(parts) - 1
                yield {"line": line, "offset": end if last else offset, "sub": 0 if last else k + 1}, parts[k]
        offset, sub = end, 0


def _jsonl_rows(name: str, fh):
    """Row or BadRow for each non-blank line of a JSON Lines file (``fh``: binary), its origin ``name:line``."""
    for at, line in jsonl_lines(fh):
        if line.strip():
            yield parsed(f"{name}:{at['line']}", line)


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


def _text(data: bytes, newline: str | None = None) -> str:
    """A file's bytes as text mode reads them (universal newlines unless ``newline=""``; undecodable bytes kept as
    surrogates)."""
    return io.TextIOWrapper(io.BytesIO(data), encoding="utf-8", errors="surrogateescape", newline=newline).read()


def _read_json(name: str, data: bytes, rows: list[Row], bad: list[BadRow]) -> None:
    try:
        obj = json.loads(_text(data))
    except json.JSONDecodeError as e:
        # A .json file may also be JSON Lines: fall back before reporting.
        if e.msg == "Extra data":
            for r in _jsonl_rows(name, io.BytesIO(data)):
                (bad if isinstance(r, BadRow) else rows).append(r)
            return
        bad.append(BadRow(f"{name}:{e.lineno}", f"invalid JSON ({e.msg} at column {e.colno})"))
        return
    if isinstance(obj, dict) and len(obj) == 1 and isinstance(next(iter(obj.values())), list):
        obj = next(iter(obj.values()))  # {"data": [...]}
    if not isinstance(obj, list):
        bad.append(BadRow(f"{name}:1", "a .json file must hold a list of row objects"))
        return
    for i, item in enumerate(obj):
        reason = _invalid_utf8(json.dumps(item, ensure_ascii=False), column=False)
        if reason:
            bad.append(BadRow(f"{name}:row {i + 1}", reason))
        else:
            rows.append(Row(item, f"{name}:row {i + 1}"))


def _read_csv(name: str, data: bytes, rows: list[Row], bad: list[BadRow]) -> None:
    reader = csv.DictReader(io.StringIO(_text(data, newline=""), newline=""))
    for rec in reader:
        reason = _invalid_utf8(json.dumps(rec, ensure_ascii=False), column=False)
        if reason:
            bad.append(BadRow(f"{name}:{reader.line_num}", reason))
            continue
        rows.append(Row(dict(rec), f"{name}:{reader.line_num}"))


def document_rows(name: str, suffix: str, data: bytes) -> list[Row | BadRow]:
    """The rows of a file read whole, a .json document or a .csv table (``data``: its bytes), in file order."""
    rows: list[Row] = []
    bad: list[BadRow] = []
    {".json": _read_json, ".csv": _read_csv}[suffix](name, data, rows, bad)
    return sorted(rows + bad, key=lambda r: _origin_order(r.origin))


def _read_saved_dataset(src: DataSource, role: str):
    """The rows of a ``save_to_disk`` dataset, read lazily from its memory-mapped Arrow data."""
    from datasets import DatasetDict, load_from_disk

    ds = load_from_disk(src.path)
    if isinstance(ds, DatasetDict):
        ds = ds[saved_split(ds, src, role)]
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


# ------------------------------------------------------------------------------------------ reading a file from a position
BLOCK = 1 << 20  # bytes per ranged read of a file at a URL: all a stream reads ahead of what it consumed
START = {"line": 0, "offset": 0, "sub": 0}  # the position of a file's first row (see rows_from)


def open_binary(file: str):
    """A data file (a local path, or a URL of any fsspec protocol) opened for reading bytes. A URL is read where it
    is, ``BLOCK`` bytes per ranged request as it is consumed: nothing is copied to disk, and a seek costs nothing."""
    if not at_url(file):
        return open(file, "rb")
    fs, path = cloud.filesystem(file)
    # fsspec's read-ahead caches serve readline by copying a whole block per line; a BufferedReader over the
    # uncached file makes one ranged request per block and splits lines in C
    return io.BufferedReader(fs.open(path, "rb", block_size=BLOCK, cache_type="none"), buffer_size=BLOCK)


def rows_from(file: str, at: dict):
    """The rows of a data file (local path or URL) from position ``at`` on (``START``: the beginning): yields (the
    position after the row, its origin, the row: a JSON Lines line, unparsed, else a Row or BadRow).

    A position: ``line``, rows read (for JSON Lines: lines, blank ones included); JSON Lines and Arrow also
    ``offset`` (the byte offset reading goes on from) and ``sub`` (lines of that JSON Lines line, or rows of that
    Arrow record batch, read already). A Parquet file's footer maps ``line`` to its row group, and only the row
    groups from there are read. JSON and CSV files are read whole (a JSON document has no rows to seek to)."""
    suffix = PurePosixPath(file).suffix
    with open_binary(file) as fh:
        if suffix == ".jsonl":
            for after, line in jsonl_lines(fh, at):
                if line.strip():
                    yield after, f"{file}:{after['line']}", line
        elif suffix == ".parquet":
            yield from _parquet_rows(file, fh, at["line"])
        elif suffix == ".arrow":
            yield from _arrow_rows(file, fh, at)
        else:
            rows = document_rows(file, suffix, fh.read())
            for k, row in enumerate(rows[at["line"]:], start=at["line"] + 1):
                yield {"line": k}, row.origin, row


def _parquet_rows(file: str, fh, start: int):
    import pyarrow.parquet as pq  # heavy: loaded when a Parquet file is read

    pf = pq.ParquetFile(fh)
    first = 0  # the row group's first row
    for g in range(pf.num_row_groups):
        n = pf.metadata.row_group(g).num_rows
        if first + n > start:  # row groups before the position are never read
            i = first
            for batch in pf.iter_batches(batch_size=1024, row_groups=[g]):
                skip = min(max(0, start - i), batch.num_rows)
                i += skip
                for rec in batch.slice(skip).to_pylist():
                    i += 1
                    yield {"line": i}, f"{file}:row {i}", Row(rec, f"{file}:row {i}")
        first += n


def _arrow_rows(file: str, fh, at: dict):
    """The rows of an Arrow IPC stream file (what ``datasets``' save_to_disk writes), one record batch in memory at a
    time; a position's ``offset`` is that of a record batch message, read from there on."""
    import pyarrow as pa  # heavy: loaded when an Arrow file is read

    schema = pa.ipc.read_schema(pa.ipc.read_message(fh))
    line, offset, sub = at["line"], at["offset"] or fh.tell(), at["sub"]
    fh.seek(offset)
    while True:
        try:
            message = pa.ipc.read_message(fh)
        except EOFError:
            return
        end = fh.tell()
        if message.type != "record batch":
            raise DataError(f"{file}: holds an Arrow {message.type} message (dictionary-encoded columns), which "
                            "data.streaming does not read; set data.streaming: false")
        batch = pa.ipc.read_record_batch(message, schema)
        for k, rec in enumerate(batch.slice(sub).to_pylist(), start=sub + 1):
            line += 1
            last = k == batch.num_rows
            yield ({"line": line, "offset": end if last else offset, "sub": 0 if last else k},
                   f"{file}:row {line}", Row(rec, f"{file}:row {line}"))
        offset, sub = end, 0


def parsed(origin: str, item):
    """A row from ``rows_from`` as a Row or BadRow (a JSON Lines line parsed)."""
    if not isinstance(item, str):
        return item
    data, reason = parse_jsonl_line(item)
    return BadRow(origin, reason) if reason else Row(data, origin)


def iter_file_rows(path) -> Iterator[Row | BadRow]:
    """The rows of one data file (a local path or a URL) from its start, lazily where the format allows: Row or
    BadRow in file order."""
    for _, origin, item in rows_from(str(path), START):
        yield parsed(origin, item)


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
