"""Streaming pretraining from a bucket: the lmforge cache's disk use, RSS and time to the first step while a
generated corpus in a loopback S3 bucket is read in ranges (issue 24 part 3: a 5 GB corpus, disk and RSS flat,
first step within 30 s).

1. Starts moto's S3 server (``moto_server``, a child process on 127.0.0.1; it keeps objects larger than ~5 MB in
   temporary files, so the corpus is on this machine's disk, outside the lmforge cache) and fills a bucket with
   ``--gb`` GB of seeded text as JSONL shards (the documents of ``stream_speed.py``), one shard at a time: each is
   written to a temporary file, uploaded, and deleted. Generating and uploading is not part of the target.
2. Runs ``python -m lmforge train`` on the ``stream_speed.py`` config (pretrain, ``data.streaming: true``, native
   engine, a 4-layer hidden-256 Llama from scratch, SmolLM2 tokenizer, max_length 512, batch 8) with the source
   ``s3://BUCKET/corpus/`` and an empty lmforge cache (``LMFORGE_CACHE``).
3. Reports, from ``stream_speed.watch`` (0.5 s polls of the child's process tree): the first logged step (s from
   spawn), RSS at step ~10 and at the end, its maximum; and from its own 0.5 s polls of the cache directory: the
   largest size it reached and its size at the end (a download of the corpus would put ``--gb`` GB there).
   Before the first step: when the child's log lines appeared (s from spawn, to the 0.5 s poll), and the requests
   moto served (its request log: listings, HEADs, GETs of the corpus' objects).
Prints the CPU kind and the load before and after; exits nonzero if the run failed.

    .venv/bin/python benchmarks/stream_bucket.py [--gb 5] [--steps 30] [--shards N] [--dir TMP]
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from stream_speed import _rss_at, config, generate, watch  # noqa: E402

from lmforge.training.checkpoint import dir_size  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fill_bucket(url: str, gb: float, shards: int, scratch: Path) -> tuple[int, int]:
    """``gb`` GB of JSONL shards uploaded to ``url`` one at a time (generated, uploaded, deleted)."""
    from lmforge import cloud

    fs, root = cloud.filesystem(url)
    docs = size = 0
    for s in range(shards):
        tmp = scratch / f"gen-{s}"
        tmp.mkdir()
        d, b = generate(tmp, gb / shards, 1, seed=s)
        fs.put_file(str(tmp / "shard-00000.jsonl"), f"{root}/shard-{s:05d}.jsonl")
        shutil.rmtree(tmp)
        docs, size = docs + d, size + b
        print(f"  shard {s + 1}/{shards} in the bucket ({size / 1e9:.2f} GB)", flush=True)
    return docs, size


MARKS = ("[lmforge] estimate", "[lmforge] plan", "[lmforge] model:", "[lmforge] train data", "[lmforge] native engine")


def requests(log: Path, start: int, end: int) -> collections.Counter:
    """The requests in moto's request log between two byte offsets, by kind (LIST, HEAD, GET of an object)."""
    with log.open("rb") as fh:
        fh.seek(start)
        text = fh.read(end - start).decode(errors="replace")
    counts: collections.Counter = collections.Counter()
    for m in re.finditer(r'"(GET|HEAD|PUT|POST|DELETE) (\S+) HTTP', text):
        counts["LIST" if "list-type" in m.group(2) else f"{m.group(1)} object"] += 1
    return counts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gb", type=float, default=5.0, help="corpus size in GB (the issue's measure: 5)")
    ap.add_argument("--steps", type=int, default=30, help="training steps")
    ap.add_argument("--shards", type=int, default=0, help="JSONL shards (default: one per 250 MB)")
    ap.add_argument("--dir", default=None, help="scratch space for the run (default: the system temp dir)")
    args = ap.parse_args()
    from lmforge.training.flops import cpu_kind

    base = Path(args.dir or tempfile.gettempdir())
    free = shutil.disk_usage(base).free
    if free < args.gb * 1e9 + 2e9:  # moto's files hold the corpus
        sys.exit(f"not enough disk in {base}: {free / 1e9:.1f} GB free for moto's copy of a {args.gb:g} GB corpus + 2 GB")
    shards = args.shards or max(1, round(args.gb / 0.25))
    work = Path(tempfile.mkdtemp(prefix="stream-bucket-", dir=base))
    port = _free_port()
    os.environ.update({"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing",
                       "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"})
    server_log = work / "moto.log"  # its request log (werkzeug's, one line per request)
    server = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=server_log.open("w"),
                              env=dict(os.environ, TMPDIR=str(work)))
    failed = True
    print(f"CPU: {cpu_kind()}; cores: {len(os.sched_getaffinity(0))}; load before: {os.getloadavg()[0]:.2f}")
    try:
        import boto3

        for _ in range(100):
            try:
                boto3.client("s3").create_bucket(Bucket="corpus")
                break
            except Exception:  # noqa: BLE001 - the server is still starting
                time.sleep(0.2)
        t = time.perf_counter()
        docs, size = fill_bucket("s3://corpus/corpus", args.gb, shards, work)
        print(f"bucket holds {size / 1e9:.2f} GB, {docs:,} documents in {shards} shards "
              f"({time.perf_counter() - t:.0f} s, not part of the target)", flush=True)
        cfg = config(work, "s3://corpus/corpus/", args.steps)  # the tokenizer from the usual cache
        cache = work / "cache"
        os.environ["LMFORGE_CACHE"] = str(cache)  # the child's cache: empty
        disk: list[int] = []
        stop = threading.Event()

        def poll_cache():
            while not stop.is_set():
                disk.append(dir_size(cache))
                time.sleep(0.5)

        poller = threading.Thread(target=poll_cache, daemon=True)
        poller.start()
        marks: dict[str, float] = {}
        served = [server_log.stat().st_size, None]  # moto's log at spawn, at the first step

        def on_poll(now: float, stepped: bool) -> None:
            text = (work / "train.log").read_text(errors="replace")
            for m in MARKS:
                if m not in marks and m in text:
                    marks[m] = now
            if stepped and served[1] is None:
                served[1] = server_log.stat().st_size

        rc, first, samples, rows, _ = watch(cfg, work / "out" / "metrics.jsonl", work / "train.log", on_poll)
        stop.set()
        poller.join()
        failed = rc != 0 or not rows or int(rows[-1]["step"]) < args.steps
        if failed:
            print(f"training failed (exit {rc}); last lines of its log:\n"
                  + "\n".join((work / "train.log").read_text().splitlines()[-30:]))
        if rows and samples:
            for m, t in sorted(marks.items(), key=lambda kv: kv[1]):
                print(f"{f'  log line {m[10:]!r} seen (s)':40}{t:10.1f}")
            print(f"{'first step logged (s from spawn)':40}{first:10.1f}")
            before = requests(server_log, served[0], served[1] or server_log.stat().st_size)
            print(f"{'requests to moto before it':40}{', '.join(f'{k} {v}' for k, v in sorted(before.items()))}")
            for k in sorted({min(10, args.steps), args.steps}):
                print(f"{f'RSS at step ~{k} (MB, process tree)':40}{_rss_at(samples, k):10.0f}")
            print(f"{'RSS max (MB)':40}{max(mb for _, _, mb in samples):10.0f}")
            print(f"{'lmforge cache, max over the run (MB)':40}{max(disk) / 2**20:10.1f}")
            print(f"{'lmforge cache, at the end (MB)':40}{disk[-1] / 2**20:10.1f}")
            print(f"{'of which data (cache/remote, MB)':40}{dir_size(cache / 'remote') / 2**20:10.1f}")
            print(f"{'wall s, whole run':40}{samples[-1][0]:10.1f}")
        print(f"load after: {os.getloadavg()[0]:.2f}")
    finally:
        server.terminate()
        server.wait()
        shutil.rmtree(work, ignore_errors=True)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
