"""Streaming pretraining: time to the first step and memory over a long run, on a generated text corpus.

The issue's target: a 10 GB corpus, first step within 30 s, RSS flat over 500 steps (idle machine).

1. Generates ``--gb`` GB of seeded text as JSONL shards (``{"text": ...}``, documents of 200-4000 words drawn
   from a word list) in a temporary directory, checking first that the disk holds the corpus plus 2 GB. The
   generation time is printed on its own; it is not part of the target.
2. Runs ``python -m lmforge train CONFIG`` as a child process: ``method: pretrain``, ``data.streaming: true``
   over the shard directory, the native engine, a small Llama built from scratch (4 layers, hidden 256) with
   the SmolLM2 tokenizer, max_length 512, batch 8, logging every step, no eval, no checkpoint before the end.
3. Measures, polling every 0.5 s while the child runs:
   - first step: wall time from spawning the child (interpreter start, imports, model build and the stream's
     first rows included) to the moment its ``metrics.jsonl`` first holds a record of a step >= 1; the
     resolution is the 0.5 s poll, and the time is refined down to the file's mtime when that is earlier;
   - RSS: the child and all its descendants (psutil), summed, every 0.5 s; each sample is tagged with the last
     step logged by then. Reported at steps ~10, ~half and ~last, the max (with its time and step), and the
     slope (least squares, MB per 100 steps) over the second half of the steps: flat means a slope near 0;
   - steps/s and tokens/s from the first to the last logged step (``tokens_seen`` in metrics.jsonl).
Prints the CPU kind and the load before and after; exits nonzero if the run failed. The corpus is deleted at
the end unless ``--keep``.

    .venv/bin/python benchmarks/stream_speed.py [--gb 10] [--steps 500] [--shards N] [--dir TMP] [--keep]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

WORDS = ("the of and to in is was for on that with as by at from his her it an were are which this be or has had "
         "not but first one their its new after who they have two been other all also time year she into more "
         "city river music film team school world system water energy data model train learn answer question "
         "explain history science market country people family government company problem reason result").split()
CHARS_PER_WORD = 5.6  # mean over the pool below, spaces and full stops included (roughly)


def generate(root: Path, gb: float, shards: int, seed: int = 0) -> tuple[int, int]:
    """Write about ``gb`` GB of JSONL over ``shards`` files; returns (documents, bytes).

    Documents are slices of a seeded pool of sentences (cut at word boundaries) so writing is disk-bound."""
    rng = random.Random(seed)
    sentences = []
    for _ in range(400_000):
        sentences.append(" ".join(rng.choices(WORDS, k=rng.randint(6, 24))).capitalize() + ".")
    pool = " ".join(sentences)  # ~25 MB of text, only letters, spaces and full stops: no JSON escaping needed
    per_shard = int(gb * 1e9 / shards)
    docs = total = 0
    for s in range(shards):
        written, chunk, size = 0, [], 0
        with (root / f"shard-{s:05d}.jsonl").open("w") as fh:
            while written < per_shard:
                n = int(rng.randint(200, 4000) * CHARS_PER_WORD)
                a = pool.find(" ", rng.randrange(len(pool) - n - 100)) + 1
                b = pool.find(" ", a + n)
                line = '{"text": "' + pool[a:b] + '"}\n'
                chunk.append(line)
                size += len(line)
                written += len(line)
                docs += 1
                if size >= 64 << 20:
                    fh.write("".join(chunk))
                    chunk, size = [], 0
            fh.write("".join(chunk))
        total += written
    return docs, total


def config(work: Path, corpus: Path, steps: int) -> Path:
    import yaml

    from lmforge.models import resolve_model_path

    tok = resolve_model_path("smollm2-135m-instruct")
    tree = {
        "method": "pretrain",
        "model": {"tokenizer": str(tok), "config": {
            "model_type": "llama", "hidden_size": 256, "intermediate_size": 1024, "num_hidden_layers": 4,
            "num_attention_heads": 4, "num_key_value_heads": 4, "vocab_size": 49152,
            "max_position_embeddings": 512, "tie_word_embeddings": True}},
        "data": {"train": [{"path": str(corpus)}], "streaming": True, "max_length": 512,
                 "cache_dir": str(work / "cache")},
        "train": {"output_dir": str(work / "out"), "engine": "native", "max_steps": steps,
                  "per_device_train_batch_size": 8, "logging_steps": 1, "save_steps": 10 * steps,
                  "eval_strategy": "no", "learning_rate": 1e-3, "report_to": ["none"], "seed": 0},
    }
    path = work / "stream.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


def _tree_rss(proc: psutil.Process) -> int:
    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


def _records(path: Path) -> list[dict]:
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a line being written
            break
    return [r for r in rows if r.get("step", 0) >= 1 and "loss" in r]


def watch(cfg: Path, metrics: Path, log: Path, on_poll=None) -> tuple[int, float | None, list[tuple], list[dict], dict]:
    """Run the training child; returns (rc, first-step s, RSS samples (t, step, MB), records, step -> seen s).
    ``on_poll(s from spawn, first step seen)``, if given, is called at every poll."""
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    with log.open("w") as out:
        t0 = time.time()
        child = subprocess.Popen([sys.executable, "-m", "lmforge", "train", str(cfg)], stdout=out,
                                 stderr=subprocess.STDOUT, env=env, cwd=Path(__file__).resolve().parent.parent)
        ps = psutil.Process(child.pid)
        samples, seen, first, step = [], {}, None, 0
        while True:
            done = child.poll() is not None
            rows = _records(metrics)
            now = time.time() - t0
            for r in rows:
                seen.setdefault(int(r["step"]), now)
            if rows and first is None:
                first = min(now, metrics.stat().st_mtime - t0)  # the file's first write, if we polled late
            step = int(rows[-1]["step"]) if rows else 0
            if on_poll is not None:
                on_poll(now, first is not None)
            if done:
                break
            samples.append((now, step, _tree_rss(ps) / 2**20))
            time.sleep(0.5)
    return child.returncode, first, samples, _records(metrics), seen


def _slope(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of y on x (0 with fewer than 2 distinct x)."""
    if len({x for x, _ in points}) < 2:
        return 0.0
    mx = sum(x for x, _ in points) / len(points)
    my = sum(y for _, y in points) / len(points)
    return sum((x - mx) * (y - my) for x, y in points) / sum((x - mx) ** 2 for x, _ in points)


def _rss_at(samples: list[tuple], step: int) -> float:
    """The first RSS sample taken once ``step`` had been logged (the last sample if never)."""
    return next((mb for _, s, mb in samples if s >= step), samples[-1][2])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gb", type=float, default=10.0, help="corpus size in GB (the issue's target: 10)")
    ap.add_argument("--steps", type=int, default=500, help="training steps (the issue's target: 500)")
    ap.add_argument("--shards", type=int, default=0, help="JSONL shards (default: one per 250 MB)")
    ap.add_argument("--dir", default=None, help="where the temporary corpus goes (default: the system temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the corpus and the run directory")
    args = ap.parse_args()
    from lmforge.training.flops import cpu_kind

    base = Path(args.dir or tempfile.gettempdir())
    need = args.gb * 1e9 + 2e9
    free = shutil.disk_usage(base).free
    if free < need:
        sys.exit(f"not enough disk in {base}: {free / 1e9:.1f} GB free, the corpus needs {args.gb:g} GB + 2 GB spare "
                 f"(choose another place with --dir, or a smaller --gb)")
    shards = args.shards or max(1, math.ceil(args.gb / 0.25))
    work = Path(tempfile.mkdtemp(prefix="stream-speed-", dir=base))
    corpus = work / "corpus"
    corpus.mkdir()
    print(f"CPU: {cpu_kind()}; cores: {len(os.sched_getaffinity(0))}; load before: {os.getloadavg()[0]:.2f}")
    try:
        t = time.perf_counter()
        docs, size = generate(corpus, args.gb, shards)
        print(f"generated {size / 1e9:.2f} GB, {docs:,} documents in {shards} shards in {time.perf_counter() - t:.1f} s "
              f"(not part of the target)", flush=True)
        cfg = config(work, corpus, args.steps)
        log = work / "train.log"
        rc, first, samples, rows, seen = watch(cfg, work / "out" / "metrics.jsonl", log)
        failed = rc != 0 or not rows or int(rows[-1]["step"]) < args.steps
        if failed:
            print(f"training failed (exit {rc}, {int(rows[-1]['step']) if rows else 0} of {args.steps} steps "
                  f"logged); last lines of its log:\n" + "\n".join(log.read_text().splitlines()[-30:]))
        if rows and samples:
            half = args.steps // 2
            a, b = rows[0], rows[-1]
            secs = seen[int(b["step"])] - seen[int(a["step"])]
            sps = (b["step"] - a["step"]) / secs if secs > 0 else float("nan")
            tps = (b["tokens_seen"] - a["tokens_seen"]) / secs if secs > 0 else float("nan")
            late = [(s, mb) for _, s, mb in samples if s >= half]
            print(f"{'first step logged (s from spawn)':40}{first:10.1f}")
            for k in (min(10, args.steps), half, args.steps):
                print(f"{f'RSS at step ~{k} (MB, process tree)':40}{_rss_at(samples, k):10.0f}")
            t_max, s_max, mb_max = max(samples, key=lambda x: x[2])
            where = "after the last step (final save)" if s_max >= args.steps else f"last logged step {s_max}"
            print(f"{'RSS max (MB)':40}{mb_max:10.0f}   at {t_max:.1f} s, {where}")
            print(f"{f'RSS slope, steps {half}-{args.steps} (MB/100 steps)':40}{100 * _slope(late):10.1f}")
            print(f"{'steps/s (first to last logged step)':40}{sps:10.2f}")
            print(f"{'tokens/s':40}{tps:10.0f}")
            print(f"{'wall s, whole run':40}{samples[-1][0]:10.1f}")
        print(f"load after: {os.getloadavg()[0]:.2f}")
    finally:
        if args.keep:
            print(f"kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
