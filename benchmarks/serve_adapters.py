"""Several adapters over one base vs one merged model, both behind `lmforge serve`, on the same requests.

    .venv/bin/python benchmarks/serve_adapters.py [--requests 128] [--concurrency 32] [--max-new-tokens 64]

Four LoRA adapters (rank --rank, all linear layers, small random B so answers stay fluent) are built over the
base. Run "4 adapters": `lmforge serve --model BASE --adapter a0=... --adapter a3=...`, the requests cycling
through a0..a3, so every batch mixes them (per-row LoRA). Run "merged": `lmforge serve --model MERGED` (a0 merged
into the base by `lmforge merge`), every request for it. Same chat prompts, greedy, concurrent clients; only the
requests are timed (not the start-up). Printed: completion tokens/s of each and their ratio, the server's peak
RSS (VmHWM) of each, the adapters' size, and the CPU kind (model name and bf16 flags from /proc/cpuinfo).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from common import scratch_dir

ROOT = Path(__file__).resolve().parents[1]
TOPICS = ["the sea", "a cat", "bread", "winter", "the moon", "a robot", "music", "a forest"]


def build_adapters(base_dir: Path, out: Path, n: int, rank: int) -> list[Path]:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    dirs = []
    for i in range(n):
        model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
        peft_model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", r=rank, lora_alpha=2 * rank,
                                                      target_modules="all-linear"))
        torch.manual_seed(i)
        with torch.no_grad():
            for name, p in peft_model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.002)
        peft_model.save_pretrained(out / f"a{i}")
        dirs.append(out / f"a{i}")
    return dirs


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args: list[str], log: Path) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    with open(log, "w") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "lmforge", "serve", *args, "--port", str(port)],
                                stdout=fh, stderr=subprocess.STDOUT, cwd=ROOT)
    base = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            urllib.request.urlopen(f"{base}/health", timeout=1)
            return proc, base
        except OSError:
            if proc.poll() is not None:
                sys.exit(f"the server exited: {log.read_text()}")
            time.sleep(0.25)
    proc.kill()
    sys.exit(f"the server did not come up: {log.read_text()}")


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of the server process: less disturbed by other jobs on a shared machine than wall
    time (reported beside it)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_requests(base: str, models: list[str], n: int, concurrency: int, max_new: int, pid: int) -> dict:
    def one(i: int) -> int:
        body = {"model": models[i % len(models)], "max_tokens": max_new, "temperature": 0,
                "messages": [{"role": "user", "content": f"Write a short paragraph about {TOPICS[i % len(TOPICS)]}."}]}
        req = urllib.request.Request(f"{base}/v1/chat/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=600) as r:
            return json.loads(r.read())["usage"]["completion_tokens"]

    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(one, range(min(4, n))))  # warm-up
        start, cpu = time.perf_counter(), cpu_seconds(pid)
        tokens = sum(pool.map(one, range(n)))
    return {"tokens": tokens, "seconds": time.perf_counter() - start, "cpu": cpu_seconds(pid) - cpu}


def measure(name: str, serve_args: list[str], models: list[str], args, work: Path) -> dict:
    proc, base = start_server(serve_args + ["--max-batch-size", str(args.concurrency)], work / f"{name}.log")
    try:
        result = run_requests(base, models, args.requests, args.concurrency, args.max_new_tokens, proc.pid)
        result["rss"] = peak_rss_mib(proc.pid)
    finally:
        proc.terminate()
        proc.wait(timeout=120)
    rate = result["tokens"] / result["seconds"]
    print(f"{name:<12} {result['tokens']:>7} tokens {result['seconds']:>7.1f} s {rate:>7.1f} tok/s "
          f"{result['tokens'] / result['cpu']:>7.1f} tok/cpu-s  peak RSS {result['rss']:.0f} MiB", flush=True)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--requests", type=int, default=128)
    ap.add_argument("--concurrency", type=int, default=32, help="clients at once (and --max-batch-size)")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--adapters", type=int, default=4)
    ap.add_argument("--repeat", type=int, default=1, help="rounds of both runs (interleaved); the median is reported")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    from lmforge.inference.merge import merge_adapter_to_dir
    from lmforge.models import pick_dtype, resolve_model_path
    from lmforge.training.flops import cpu_kind

    work = scratch_dir("serve-adapters-")
    base_dir = resolve_model_path(args.model)
    dirs = build_adapters(base_dir, work, args.adapters, args.rank)
    merged = merge_adapter_to_dir(str(dirs[0]), work / "merged")
    adapter_mib = sum(f.stat().st_size for d in dirs for f in d.glob("adapter_model.*")) / 2**20
    print(f"CPU: {cpu_kind()}; {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}; compute dtype (auto): "
          f"{pick_dtype('auto')}; {args.requests} chat requests, {args.concurrency} at once, greedy, "
          f"max_tokens {args.max_new_tokens}; {args.adapters} adapters of rank {args.rank} ({adapter_mib:.1f} MiB "
          "of float32 files)", flush=True)
    names = [f"a{i}" for i in range(args.adapters)]
    runs: dict[str, list[dict]] = {"adapters": [], "merged": []}
    for _ in range(args.repeat):  # interleaved, so a slow spell of the machine hits both alike
        runs["adapters"].append(measure(f"{args.adapters} adapters", ["--model", str(base_dir), *[
            x for n, d in zip(names, dirs) for x in ("--adapter", f"{n}={d}")]], names, args, work))
        runs["merged"].append(measure("merged", ["--model", str(merged), "--served-model-name", "m"], ["m"], args,
                                      work))
    mixed, single = (sorted(rs, key=lambda r: r["tokens"] / r["seconds"])[len(rs) // 2] for rs in runs.values())
    ratio = (mixed["tokens"] / mixed["seconds"]) / (single["tokens"] / single["seconds"])
    per_cpu = (mixed["tokens"] / mixed["cpu"]) / (single["tokens"] / single["cpu"])
    print(f"\nthroughput, {args.adapters} adapters mixed / one merged model: {ratio:.2f}x tokens/s ({per_cpu:.2f}x "
          f"tokens per CPU-second); median of {args.repeat}; peak RSS "
          f"{mixed['rss']:.0f} MiB vs {single['rss']:.0f} MiB (+{mixed['rss'] - single['rss']:.0f} MiB for "
          f"{args.adapters} adapters; a second base would add about the merged server's weights again)")


if __name__ == "__main__":
    main()
