"""data.streaming from where the data is: a bucket (moto's S3 server on 127.0.0.1, behind a relay that counts the
bytes it serves), fsspec's in-memory filesystem and file:// URLs, read in ranges as the stream consumes them
(sources.rows_from), never downloaded whole; positions in files (byte offsets, Parquet row groups, Arrow record
batches) so that a resumed stream seeks and continues exactly; a datasets save_to_disk directory streams too."""

from __future__ import annotations

import collections
import io
import json
import re
import socket
import threading
import uuid

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import base_config, chat_rows, corpus, write_config, write_jsonl
from safetensors.torch import load_file
from test_cloud import _upload_dir, bucket, s3_server  # noqa: F401, F811  (fixtures)
from test_streaming import streamed_sft_tree

from lmforge import cloud
from lmforge.cli import main
from lmforge.config import DataSource, load_config
from lmforge.data import sources, streaming
from lmforge.data.sources import START, jsonl_lines
from lmforge.data.streaming import PackedStream
from lmforge.models import load_tokenizer


class _Relay:
    """A TCP relay on 127.0.0.1 in front of the S3 server: every byte the server sends (what clients download,
    HTTP headers included) is counted in ``served``, and the requests clients make in ``requests`` by kind ("LIST",
    "HEAD", "GET": of an object). Point AWS_ENDPOINT_URL at ``url``."""

    def __init__(self, server_url: str):
        host, port = server_url.removeprefix("http://").split(":")
        self.target = (host, int(port))
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.served = 0
        self.requests: collections.Counter = collections.Counter()
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return  # closed
            upstream = socket.create_connection(self.target)
            threading.Thread(target=self._pump, args=(client, upstream, False), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, True), daemon=True).start()

    def _pump(self, src, dst, count: bool):
        try:
            while data := src.recv(1 << 16):
                with self.lock:
                    if count:
                        self.served += len(data)
                    elif m := re.match(rb"(GET|HEAD|PUT|POST|DELETE) (\S+) HTTP/", data):  # a request's first line
                        self.requests["LIST" if b"list-type" in m.group(2) else m.group(1).decode()] += 1
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self):
        self.listener.close()


@pytest.fixture
def relay(s3_server):
    made = []

    def new() -> _Relay:
        made.append(_Relay(s3_server))
        return made[-1]

    yield new
    for r in made:
        r.close()


@pytest.fixture
def memory_dir():
    """A fresh directory in fsspec's in-memory filesystem (memory://), removed afterwards."""
    root = f"memory://lmforge-test-{uuid.uuid4().hex[:8]}"
    yield root
    fs, path = cloud.filesystem(root)
    if fs.exists(path):
        fs.rm(path, recursive=True)


def _cfg(tmp_path, model_dir, sources_: list[dict], method: str = "sft", **data):
    tree = base_config(model_dir, tmp_path / "unused.jsonl", tmp_path / "out", method=method,
                       data={"streaming": True, "max_length": 64, "shuffle_buffer": 8, **data})
    tree["data"]["train"] = sources_
    return load_config(write_config(tmp_path / f"c{uuid.uuid4().hex[:6]}.yaml", tree))


def _ids(rows: list[dict]) -> list[tuple[int, ...]]:
    return [tuple(r["input_ids"]) for r in rows]


def _cache_bytes(cache) -> int:
    return sum(f.stat().st_size for f in cache.rglob("*") if f.is_file()) if cache.exists() else 0


def test_jsonl_positions_read_lines_as_text_mode_and_resume_anywhere():
    """sources.jsonl_lines (binary, byte offsets) gives the lines text mode gives, numbered alike (\\r\\n, a lone
    \\r, blank lines, bad UTF-8), and from any position it gives exactly the lines after it."""
    data = b'{"a": 1}\r\n\n{"b": "\xc3\xa9"}\r{"c": 3}\r{"d": 4}\n{"e": "\xff"}\n\n{"f": 6}'
    text_mode = list(io.TextIOWrapper(io.BytesIO(data), encoding="utf-8", errors="surrogateescape"))
    read = list(jsonl_lines(io.BytesIO(data), START))
    assert [line for _, line in read] == text_mode and [at["line"] for at, _ in read] == list(range(1, 9))
    assert read[2][0] == {"line": 3, "offset": 11, "sub": 1}  # '{"b": "é"}' ends at a lone \r inside a \n-line
    for k, (at, _) in enumerate(read):
        assert [line for _, line in jsonl_lines(io.BytesIO(data), at)] == text_mode[k + 1:]
        old = {"line": at["line"]}  # a stream state written before byte offsets: the lines are counted again
        assert [line for _, line in jsonl_lines(io.BytesIO(data), old)] == text_mode[k + 1:]


def _long_rows(n: int) -> list[dict]:
    """prompt/completion rows of ~2 KB (one truncated sample each at max_length 64)."""
    lines = corpus()
    return [{"prompt": f"q{i}", "completion": f"row {i} " + " ".join(lines[(i * 7 + k) % len(lines)]
                                                                     for k in range(24))[:2000]}
            for i in range(n)]


def test_stream_from_the_bucket_reads_ranges_and_a_resumed_stream_seeks(bucket, relay, tiny_model_dir, tmp_path,
                                                                        lmforge_cache, monkeypatch):
    """A JSONL object ~40 blocks long: the stream downloads about what it consumed (not the object, not into the
    cache); a stream resumed from its state reads from its byte offset on (not from the start), and gives the same
    rows as the stream that went on."""
    monkeypatch.setattr(sources, "BLOCK", 64 << 10)
    path = write_jsonl(tmp_path / "big.jsonl", _long_rows(3000))
    size = path.stat().st_size
    cloud.upload_file(path, f"s3://{bucket}/corpus/big.jsonl")
    assert size > 80 * sources.BLOCK
    cfg = _cfg(tmp_path, tiny_model_dir, [{"path": f"s3://{bucket}/corpus/big.jsonl"}])
    tok = load_tokenizer(cfg.model, tiny_model_dir)
    measured = _cache_bytes(lmforge_cache)  # the machine's measurements the test session put there (conftest)

    first = relay()
    monkeypatch.setenv("AWS_ENDPOINT_URL", first.url)
    a = PackedStream(cfg, tok, packed=False)
    a.take(600)
    state = a.state_dict()
    offset = state["positions"][0]["offset"]
    assert offset > 15 * sources.BLOCK  # ~640 rows of ~2 KB read (taken, shuffled, read ahead)
    assert first.served < offset + 6 * sources.BLOCK < size / 2
    # one HEAD for the listing (is it a file?) and one open: the format check's reader goes on as the stream's, so
    # the object is opened once and each block up to the position is fetched once (the first one too)
    assert first.requests["HEAD"] == 2 and first.requests["GET"] == -(-offset // sources.BLOCK)
    assert _cache_bytes(lmforge_cache) == measured  # nothing copied into lmforge's cache

    again = relay()  # another "machine" resumes from the state
    monkeypatch.setenv("AWS_ENDPOINT_URL", again.url)
    b = PackedStream(cfg, tok, packed=False)
    b.load_state_dict(state)
    resumed = b.take(40)
    assert again.served < 6 * sources.BLOCK < offset  # the format check's first block, then from the offset on
    assert _ids(resumed) == _ids(a.take(40))
    assert _cache_bytes(lmforge_cache) == measured


def test_streamed_run_from_the_bucket_resumes_bitwise(bucket, tiny_model_dir, tmp_path, monkeypatch):
    """A LoRA SFT run streaming shards from the bucket, stopped at step 3 and resumed on a machine with an empty
    cache, ends with the same weights and losses as an uninterrupted run streaming the same shards locally."""
    shards = tmp_path / "shards"
    for k in range(3):
        write_jsonl(shards / f"part-{k}.jsonl", chat_rows(12, seed=k))
    _upload_dir(shards, f"s3://{bucket}/shards")
    runs = {}
    for name, data, steps in (("local", shards, [6]), ("bucket", f"s3://{bucket}/shards", [3, 6])):
        cfg = write_config(tmp_path / f"{name}.yaml", streamed_sft_tree(tiny_model_dir, data, tmp_path / name))
        for max_steps in steps:
            monkeypatch.setenv("LMFORGE_CACHE", str(tmp_path / f"cache-{name}-{max_steps}"))  # a machine each
            assert main(["train", str(cfg), f"train.max_steps={max_steps}"]) == 0
        runs[name] = tmp_path / name
    position = torch.load(runs["bucket"] / "checkpoint-3" / "stream_0.pt", weights_only=False)["positions"][0]
    assert position["offset"] > 0 or position["file"] > 0
    for name in ("cache-bucket-3", "cache-bucket-6"):
        assert not (tmp_path / name / "remote").exists()  # no copy of the data
    a, b = (load_file(runs[n] / "adapter_model.safetensors") for n in ("local", "bucket"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    losses = [[(r["step"], r["loss"]) for r in map(json.loads, (runs[n] / "metrics.jsonl").read_text().splitlines())
               if "loss" in r] for n in ("local", "bucket")]
    assert losses[0] == losses[1] and len(losses[0]) == 6


def _mixed_dir(root, rows: list[dict]) -> None:
    """The rows over four files of a directory, in sorted order: JSON Lines, Parquet (row groups of 4), CSV, JSON."""
    root.mkdir(parents=True, exist_ok=True)
    q = len(rows) // 4
    write_jsonl(root / "a.jsonl", rows[:q])
    pq.write_table(pa.Table.from_pylist(rows[q:2 * q]), root / "b.parquet", row_group_size=4)
    (root / "c.csv").write_text("text\n" + "".join(f'"{r["text"]}"\n' for r in rows[2 * q:3 * q]))
    (root / "d.json").write_text(json.dumps(rows[3 * q:]))


@pytest.mark.parametrize("where", ["memory", "file"])
def test_another_protocol_streams_every_file_kind_and_resumes_anywhere(where, memory_dir, tiny_model_dir, tmp_path,
                                                                       monkeypatch):
    """A directory of JSONL, Parquet, CSV and JSON files at a memory:// or file:// URL streams the rows the same
    directory gives locally (the same code path as s3://), and a stream resumed from its state after any number of
    rows (inside a Parquet row group, across files, into the next epoch) goes on exactly as the uninterrupted one."""
    lines = corpus()
    rows = [{"text": f"doc {i} " + lines[i % len(lines)]} for i in range(24)]
    local = tmp_path / "mixed"
    _mixed_dir(local, rows)
    if where == "memory":
        url = memory_dir + "/mixed"
        _upload_dir(local, url)
    else:
        url = f"file://{local}"
    assert cloud.is_remote(url) or url.startswith("file://")
    assert sources.source_files(DataSource(path=url), "train")[0].startswith(f"{where}://")
    kw = {"max_length": 256, "shuffle_buffer": 1}
    tok = load_tokenizer(_cfg(tmp_path, tiny_model_dir, [{"path": str(local)}], "pretrain", **kw).model, tiny_model_dir)
    ref = PackedStream(_cfg(tmp_path, tiny_model_dir, [{"path": str(local)}], "pretrain", **kw), tok, packed=False)
    cfg = _cfg(tmp_path, tiny_model_dir, [{"path": url}], "pretrain", **kw)
    whole = PackedStream(cfg, tok, packed=False).take(30)  # past one epoch (24 rows)
    expected = [tuple(tok(r["text"]).input_ids + [tok.eos_token_id]) for r in rows]
    assert _ids(whole) == _ids(ref.take(30)) == expected + expected[:6]
    for k in range(1, 30):
        head = PackedStream(cfg, tok, packed=False, ahead=1)
        head.take(k)
        again = PackedStream(cfg, tok, packed=False, ahead=1)
        again.load_state_dict(head.state_dict())
        assert _ids(again.take(30 - k)) == _ids(whole[k:]), k
    # the first file, opened for the format check, goes on as the stream's (the test above); when its rows are not
    # kept (more than streaming.READ_AHEAD_ROWS before an object row), it is opened again at the start: same rows
    monkeypatch.setattr(streaming, "READ_AHEAD_ROWS", 0)
    assert _ids(PackedStream(cfg, tok, packed=False).take(30)) == _ids(whole)


@pytest.mark.parametrize("where", ["local", "memory"])
def test_saved_dataset_streams_its_arrow_files_and_resumes_inside_a_record_batch(where, memory_dir, tiny_model_dir,
                                                                                tmp_path, monkeypatch):
    """A datasets save_to_disk DatasetDict (its train split: 3 Arrow files of record batches of 5 rows) streams its
    rows in order, locally and at a URL, and a state taken inside a record batch resumes exactly."""
    import datasets
    from datasets import Dataset, DatasetDict

    monkeypatch.setattr(datasets.config, "DEFAULT_MAX_BATCH_SIZE", 5)  # record batches of 5 rows
    lines = corpus()
    rows = [{"text": f"doc {i} " + lines[i % len(lines)]} for i in range(40)]
    saved = tmp_path / "saved"
    DatasetDict({"train": Dataset.from_list(rows), "test": Dataset.from_list(rows[:3])}).save_to_disk(
        saved, max_shard_size="2KB")
    path = str(saved)
    if where == "memory":
        path = memory_dir + "/saved"
        _upload_dir(saved, path)
    files = sources.source_files(DataSource(path=path), "train")
    assert len(files) >= 3 and all("/train/data-" in f and f.endswith(".arrow") for f in files)
    cfg = _cfg(tmp_path, tiny_model_dir, [{"path": path}], "pretrain", max_length=256, shuffle_buffer=1)
    tok = load_tokenizer(cfg.model, tiny_model_dir)
    expected = [tuple(tok(r["text"]).input_ids + [tok.eos_token_id]) for r in rows]
    whole = PackedStream(cfg, tok, packed=False).take(45)
    assert _ids(whole) == expected + expected[:5]
    head = PackedStream(cfg, tok, packed=False, ahead=1)
    head.take(7)
    state = head.state_dict()
    assert state["positions"][0]["sub"] == 2 and state["positions"][0]["offset"] > 0  # inside the 2nd batch
    again = PackedStream(cfg, tok, packed=False, ahead=1)
    again.load_state_dict(state)
    assert _ids(again.take(38)) == _ids(whole[7:])
