"""How close `lmforge estimate` comes: for several configs on the real SmolLM2-135M, a short real `lmforge train`
(the CLI, in its own process tree), then the estimate that run wrote at start (``output_dir/estimate.json``, the
same as `lmforge estimate --json` for that config and process count) against what it measured: peak RSS per
process (psutil, sampled over the process tree: the largest any one process reached) and, from metrics.jsonl,
tokens/s, MFU and seconds per step, read the way the run report reads them (``report.measured_speed``: the
first logged step left out as warm-up), and which speed model the estimate used: ``probe`` (measured on this
machine at the run's start, training/estimate_probe.py) or ``fitted`` (the efficiency fitted on a Zen 4).

    python benchmarks/estimate_accuracy.py                                      # all configs, 20 steps each
    python benchmarks/estimate_accuracy.py --configs lora --steps 3 --rows 40   # a quick check that it runs

Run it on an idle machine: the measured tokens/s falls with the load (the load average is printed). The figures
go in docs/estimate.md with the CPU kind printed here (``flops.cpu_kind``: the model name and which of
avx512_bf16 / amx_bf16 / avx512f it has; without the bf16 ones bf16 is ~5x slower than fp32, NOTES.md).
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
GB = 2 ** 30  # as `lmforge estimate` prints

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


def train(config: Path, overrides: list[str], procs: int, out: Path) -> dict:
    """Run `lmforge train`; the largest RSS any one process of its tree reached, the estimate it wrote, and
    the speed its metrics show."""
    from lmforge.training.estimate import ESTIMATE_FILE
    from lmforge.training.report import measured_speed

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
    if not (out / ESTIMATE_FILE).exists():
        raise RuntimeError(f"lmforge train wrote no {ESTIMATE_FILE}; its log:\n{output[-3000:]}")
    rows = [json.loads(x) for x in open(out / "metrics.jsonl") if x.strip()]
    return {"estimate": json.loads((out / ESTIMATE_FILE).read_text()), "peak_rss": peak,
            "seconds": time.perf_counter() - start, **measured_speed(rows)}


def ratio(measured: float | None, estimated: float | None) -> str:
    return f"{measured / estimated:.2f}" if measured is not None and estimated else "-"


def row(name: str, procs: int, got: dict) -> str:
    est = got["estimate"]
    t = est["time"]
    est_mfu = t["flops_per_token"] * t["tokens_per_second"] / est["machine"]["peak_flops"]
    mfu = got.get("mfu")
    tps, step = got.get("tokens_per_second"), got.get("seconds_per_step")
    return (f"| {name} | {procs} | {est['compute']} | {t.get('speed_from', 'fitted')} | "
            f"{est['peak'] / GB:.2f} / {got['peak_rss'] / GB:.2f} | "
            f"{ratio(got['peak_rss'], est['peak'])} | {t['tokens_per_second']:.0f} / {tps or 0:.0f} | "
            f"{ratio(tps, t['tokens_per_second'])} | {100 * est_mfu:.1f} / "
            f"{'-' if mfu is None else f'{100 * mfu:.1f}'} | {t['seconds_per_step']:.2f} / "
            f"{'-' if step is None else f'{step:.2f}'} | {ratio(step, t['seconds_per_step'])} |")


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
            load = os.getloadavg()[0]
            got = train(config, overrides, procs, work / f"out-{name}")
            results.append((name, procs, got))
            est = got["estimate"]
            print(f"{name}: estimated peak {est['peak'] / GB:.2f} GB, {est['time']['tokens_per_second']} tok/s; "
                  f"measured {got['peak_rss'] / GB:.2f} GB, {got.get('tokens_per_second') or 0:.1f} tok/s "
                  f"({got['seconds']:.0f} s, load before {load:.1f})", flush=True)
            probe = est["time"].get("probe")
            if probe:  # what the run's estimate measured on this machine (training/estimate_probe.py)
                print(f"  probe ({'cached' if probe['cached'] else 'measured'} {probe['measured_at']}, "
                      f"{probe['probe_seconds']} s): layer {1e3 * probe['layer_seconds']:.1f} ms, rest "
                      f"{1e3 * probe['rest_seconds']:.1f} ms, optimizer {1e3 * probe['optimizer_seconds']:.1f} ms per "
                      f"{probe['optimizer_params']:,} parameters; {probe['batch']}", flush=True)
    print(f"\nCPU: {cpu_kind()} (bf16 flags listed when present); {os.cpu_count()} cores; {args.steps} steps, "
          f"batch {args.batch}, max_length {args.max_length}, {args.rows} rows; load average now "
          f"{os.getloadavg()[0]:.1f}\n")
    print("| config | processes | compute | speed from | peak RSS per process est / measured (GB) | ratio | tokens/s "
          "est / measured | ratio | MFU % est / measured | s per step est / measured | ratio |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name, procs, got in results:
        print(row(name, procs, got))
    print("\nratio = measured / estimated")
    return 0


if __name__ == "__main__":
    sys.exit(main())
