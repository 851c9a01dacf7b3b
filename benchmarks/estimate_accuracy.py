"""How close `lmforge estimate` comes: for several configs on the real SmolLM2-135M, the estimate (`--json`) against a
short real `lmforge train` of the same config: peak RSS per process (psutil, sampled over the process tree) and
tokens/s (metrics.jsonl, the first step left out as warm-up).

    python benchmarks/estimate_accuracy.py                      # all configs, 20 steps each
    python benchmarks/estimate_accuracy.py --steps 2 --configs lora   # a quick check that it runs

Run it on an idle machine: the measured tokens/s falls with the load (the load average is printed). The figures
go in docs/estimate.md with the CPU kind printed here (``flops.cpu_kind``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import yaml

ROOT = Path(__file__).resolve().parent.parent
LMFORGE = [sys.executable, "-m", "lmforge"]

# name -> (overrides, processes): full, LoRA, QLoRA, each with and without gradient checkpointing, 2-process DDP
CONFIGS = {
    "full": (["peft.kind=none"], 1),
    "full_gc": (["peft.kind=none", "train.gradient_checkpointing=true"], 1),
    "lora": (["peft.kind=lora"], 1),
    "lora_gc": (["peft.kind=lora", "train.gradient_checkpointing=true"], 1),
    "qlora": (["peft.kind=qlora"], 1),
    "qlora_gc": (["peft.kind=qlora", "train.gradient_checkpointing=true"], 1),
    "ddp_full": (["peft.kind=none", "train.distributed=ddp"], 2),
}


def write_config(work: Path, rows: int, steps: int, batch: int, max_length: int) -> Path:
    from lmforge.synthetic import extraction_rows

    data = work / "train.jsonl"
    with open(data, "w") as fh:
        for r in extraction_rows(rows, 0):
            fh.write(json.dumps(r) + "\n")
    tree = {
        "method": "sft",
        "model": {"name_or_path": "smollm2-135m-instruct", "dtype": "auto"},
        "peft": {"kind": "lora", "r": 16, "alpha": 32, "dropout": 0.05, "target_modules": "all-linear"},
        "data": {"train": [{"path": str(data)}], "max_length": max_length, "packing": True},
        "train": {"output_dir": str(work / "out"), "max_steps": steps, "per_device_train_batch_size": batch,
                  "learning_rate": 1e-4, "logging_steps": 1, "save_strategy": "no", "report_to": ["none"],
                  "resume": "never"},
    }
    path = work / "config.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


def estimate(config: Path, overrides: list[str], procs: int) -> dict:
    cmd = LMFORGE + ["estimate", str(config), *overrides, "--json", "--nproc-per-node", str(procs)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(proc.stdout)


def train(config: Path, overrides: list[str], procs: int, out: Path) -> dict:
    """Run `lmforge train`; the largest RSS any one process of its tree reached, and its metrics."""
    cmd = LMFORGE + ["train", str(config), *overrides, f"train.output_dir={out}"]
    if procs > 1:
        cmd += ["--nproc-per-node", str(procs)]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    root, peak = psutil.Process(proc.pid), 0
    while proc.poll() is None:
        try:
            for p in [root, *root.children(recursive=True)]:
                try:
                    peak = max(peak, p.memory_info().rss)
                except psutil.NoSuchProcess:
                    pass
        except psutil.NoSuchProcess:
            pass
        time.sleep(0.1)
    output = proc.stdout.read()
    if proc.returncode != 0:
        raise RuntimeError(f"lmforge train failed ({proc.returncode}):\n{output[-3000:]}")
    rows = [json.loads(x) for x in open(out / "metrics.jsonl") if x.strip()]
    speeds = [r["tokens_per_second"] for r in rows if "tokens_per_second" in r]
    steady = [r["tokens_per_second"] for r in rows if "tokens_per_second" in r and r["step"] > 1] or speeds
    return {"peak_rss": peak, "tokens_per_second": sum(steady) / len(steady), "seconds": time.perf_counter() - start,
            "mfu": next((r["mfu"] for r in reversed(rows) if "mfu" in r), None)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated, from {', '.join(CONFIGS)}")
    ap.add_argument("--steps", type=int, default=20, help="training steps per run")
    ap.add_argument("--rows", type=int, default=400, help="generated chat rows")
    ap.add_argument("--batch", type=int, default=8, help="per-device batch")
    ap.add_argument("--max-length", type=int, default=256, help="data.max_length (packed rows)")
    args = ap.parse_args()
    from lmforge.training.flops import cpu_kind

    names = [n.strip() for n in args.configs.split(",") if n.strip()]
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        ap.error(f"unknown config(s) {unknown}; choose from {', '.join(CONFIGS)}")
    results = []
    with tempfile.TemporaryDirectory(prefix="estimate-accuracy-") as tmp:
        work = Path(tmp)
        config = write_config(work, args.rows, args.steps, args.batch, args.max_length)
        for name in names:
            overrides, procs = CONFIGS[name]
            est = estimate(config, overrides, procs)
            load = os.getloadavg()[0]
            got = train(config, overrides, procs, work / f"out-{name}")
            results.append((name, est, got, load))
            print(f"{name}: estimated peak {est['peak'] / 2**30:.2f} GB, {est['time']['tokens_per_second']} tok/s; "
                  f"measured {got['peak_rss'] / 2**30:.2f} GB, {got['tokens_per_second']:.1f} tok/s "
                  f"({got['seconds']:.0f} s, load {load:.1f})", flush=True)
    print(f"\nCPU: {cpu_kind()}; {os.cpu_count()} cores; {args.steps} steps, batch {args.batch}, max_length "
          f"{args.max_length}, {args.rows} rows; load average now {os.getloadavg()[0]:.1f}\n")
    print("| config | processes | peak RSS est / measured (GB) | ratio | tokens/s est / measured | ratio |")
    print("|---|---|---|---|---|---|")
    for name, est, got, load in results:
        pe, pm = est["peak"] / 2**30, got["peak_rss"] / 2**30
        te, tm = est["time"]["tokens_per_second"], got["tokens_per_second"]
        print(f"| {name} | {CONFIGS[name][1]} | {pe:.2f} / {pm:.2f} | {pe / pm:.2f} | {te:.0f} / {tm:.0f} | "
              f"{te / tm:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
