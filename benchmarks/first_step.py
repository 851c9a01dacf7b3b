"""Time to the first training step of SmolLM2-135M with cached data (the issue's target: <= 10 s).

1. Writes ``--rows`` generated chat rows (record -> JSON extraction) and a full fine-tune SFT config (max_length
   256, batch 8, ``train.max_steps`` 3, logging every step, the default engine and ``model.dtype: auto``), then
   runs ``lmforge prepare`` on it once, so the data is cached, as it is when a user re-runs ``train``.
2. Runs ``python -m lmforge train CONFIG`` ``--runs`` times, each into a fresh output directory, polling every
   0.1 s, and reports two wall times from spawning the child:
   - to the first step (the target): until the engine says it starts its loop (the native engine's
     ``native engine: N steps ...`` line, printed right before step 1): interpreter start, imports, model load,
     the cached data's memory map, the FLOP count and the optimizer included;
   - to the first step logged: until ``metrics.jsonl`` holds step 1, i.e. with one full step of 8 rows as well.
Prints the CPU kind and the load before and after.

    .venv/bin/python benchmarks/first_step.py [--runs 2] [--rows 200]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

LOOP_STARTS = "native engine: "  # what the native engine prints right before its first step


def timed_run(cfg: Path, metrics: Path, log: Path) -> tuple[int, float | None, float | None]:
    """(exit code, s to the loop's start, s to step 1 logged), both from spawning the child."""
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    loop = first = None
    with log.open("w") as out:
        t0 = time.perf_counter()
        child = subprocess.Popen([sys.executable, "-m", "lmforge", "train", str(cfg)], stdout=out,
                                 stderr=subprocess.STDOUT, env=env, cwd=Path(__file__).resolve().parent.parent)
        while child.poll() is None:
            now = time.perf_counter() - t0
            if loop is None and LOOP_STARTS in log.read_text(errors="replace"):
                loop = now
            if first is None and metrics.exists() and '"step": 1' in metrics.read_text():
                first = now
            time.sleep(0.1)
    return child.returncode, loop, first


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--rows", type=int, default=200)
    args = ap.parse_args()
    import yaml

    from lmforge.models import pick_dtype
    from lmforge.synthetic import extraction_rows, write_jsonl
    from lmforge.training.flops import cpu_kind

    work = Path(tempfile.mkdtemp(prefix="first-step-"))
    data = write_jsonl(extraction_rows(args.rows, seed=0), work / "train.jsonl")
    tree = {
        "method": "sft", "model": {"name_or_path": "smollm2-135m-instruct"},
        "data": {"train": [{"path": str(data)}], "max_length": 256, "cache_dir": str(work / "cache")},
        "train": {"output_dir": str(work / "out"), "max_steps": 3, "per_device_train_batch_size": 8,
                  "logging_steps": 1, "save_steps": 10_000, "report_to": ["none"], "seed": 0, "resume": "never"},
    }
    cfg = work / "sft.yaml"
    cfg.write_text(yaml.safe_dump(tree))
    print(f"CPU: {cpu_kind()}; cores: {len(os.sched_getaffinity(0))}; compute dtype (auto): {pick_dtype('auto')}; "
          f"load before: {os.getloadavg()[0]:.2f}")
    try:
        subprocess.run([sys.executable, "-m", "lmforge", "prepare", str(cfg)], check=True, capture_output=True,
                       env=dict(os.environ, HF_HUB_OFFLINE="1"))
        for run in range(1, args.runs + 1):
            shutil.rmtree(work / "out", ignore_errors=True)
            rc, loop, first = timed_run(cfg, work / "out" / "metrics.jsonl", work / f"train-{run}.log")
            if rc != 0 or loop is None or first is None:
                sys.exit(f"run {run} failed (exit {rc}); its log:\n{(work / f'train-{run}.log').read_text()[-3000:]}")
            print(f"run {run}: first step starts {loop:.1f} s after spawn; step 1 logged at {first:.1f} s")
        print(f"load after: {os.getloadavg()[0]:.2f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
