"""Data preparation speed: `lmforge prepare` (assistant-only masks + packing) vs TRL's own SFT data preparation.

Generated two-turn chat rows (user, assistant, user, assistant; about 130 SmolLM2 tokens each) in one JSONL
file. Each run is a subprocess of its own, so wall time and peak RSS are its own:
- lmforge: `lmforge prepare CONFIG` (SFT, max_length 1024, packing on), cache in a fresh directory; then the
  same command again (a cached re-run);
- TRL 1.16: `SFTTrainer._prepare_dataset` on the same rows read with `datasets.load_dataset("json")`: per-row
  `apply_chat_template(tokenize=True)` in `Dataset.map`, labels, then BFD packing to 1024, with
  `dataset_num_proc` set to the cores lmforge uses. TRL computes no assistant masks here (SmolLM2's template
  has no `{% generation %}` markers, so `assistant_only_loss` would fail): its labels train every token.
Wall times include interpreter start, imports and tokenizer loading for both.

    .venv/bin/python benchmarks/prepare_speed.py [--rows 100000]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import sys
import time
from pathlib import Path

from common import scratch_dir


MAX_LENGTH = 1024
WORDS = ("the of and to in is was for on that with as by at from his her it an were are which this be or has had "
         "not but first one their its new after who they have two been other all also time year she into more "
         "city river music film team school world system water energy data model train learn answer question "
         "explain history science market country people family government company problem reason result").split()


def generate(path: Path, rows: int, seed: int = 0) -> None:
    rng = random.Random(seed)

    def say(lo: int, hi: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi))).capitalize() + "."

    with path.open("w") as fh:
        for _ in range(rows):
            msgs = [{"role": "user", "content": say(8, 20)}, {"role": "assistant", "content": say(20, 50)},
                    {"role": "user", "content": say(5, 12)}, {"role": "assistant", "content": say(15, 40)}]
            fh.write(json.dumps({"messages": msgs}) + "\n")


def _peak() -> dict:
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return {"rss_mb": round(own), "worker_rss_mb": round(kids)}


def child_lmforge(cfg: str) -> dict:
    from lmforge.cli import main

    code = main(["prepare", cfg])
    assert code == 0, code
    return _peak()


def child_trl(data: str, procs: int) -> dict:
    from types import SimpleNamespace

    from datasets import load_dataset
    from transformers import AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from lmforge.models import resolve_model_path

    tok = AutoTokenizer.from_pretrained(resolve_model_path("smollm2-135m-instruct"))
    t0 = time.perf_counter()
    ds = load_dataset("json", data_files=data, split="train")
    args = SFTConfig(output_dir=str(scratch_dir("prepare-trl-")), max_length=MAX_LENGTH, packing=True, dataset_num_proc=procs,
                     report_to="none", use_cpu=True)
    # What SFTTrainer.__init__ runs on a train dataset, without loading a model: the trainer state it reads.
    state = SimpleNamespace(_tokenizer=tok, completion_only_loss=None, chat_template=None)
    out = SFTTrainer._prepare_dataset(state, ds, tok, args, True, None, "train")
    tokens = sum(sum(x) for x in out["seq_lengths"])
    return {"prep_s": time.perf_counter() - t0, "packed_rows": len(out), "tokens": tokens, **_peak()}


def _run(cmd: list[str], env: dict) -> tuple[dict, float, str]:
    # Imported here, in the parent only: common.py imports transformers' Trainer, which would add about 4 s of
    # imports to the children's wall times (the cached re-run is timed whole).
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from common import child_result

    t = time.perf_counter()
    res, proc = child_result(cmd, env)
    wall = time.perf_counter() - t
    if res is None:
        sys.exit(f"child failed: {' '.join(cmd)}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return res, wall, proc.stdout


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=100_000, help="generated chat rows (the issue's target is 1,000,000)")
    ap.add_argument("--child", choices=["lmforge", "trl"], help=argparse.SUPPRESS)
    ap.add_argument("--arg", help=argparse.SUPPRESS)
    ap.add_argument("--procs", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child == "lmforge":
        print("RESULT " + json.dumps(child_lmforge(args.arg)), flush=True)
        return
    if args.child == "trl":
        print("RESULT " + json.dumps(child_trl(args.arg, args.procs)), flush=True)
        return

    import yaml

    from lmforge.data.prepare import tokenising_processes
    from lmforge.training.flops import cpu_kind

    work = scratch_dir("prepare-speed-")
    data = work / "chat.jsonl"
    generate(data, args.rows)
    procs = tokenising_processes(args.rows)
    cfg = work / "c.yaml"
    cfg.write_text(yaml.safe_dump({
        "method": "sft", "model": {"name_or_path": "smollm2-135m-instruct"},
        "data": {"train": [{"path": str(data)}], "max_length": MAX_LENGTH, "packing": True,
                 "cache_dir": str(work / "cache")},
        "train": {"output_dir": str(work / "out")},
    }))
    env = dict(os.environ, HF_DATASETS_CACHE=str(work / "hf-cache"), HF_HUB_OFFLINE="1")
    me = [sys.executable, __file__]
    print(f"CPU: {cpu_kind()}; cores: {len(os.sched_getaffinity(0))}; load before: {os.getloadavg()[0]:.2f}")
    print(f"rows: {args.rows:,} two-turn chats ({data.stat().st_size / 1e6:.0f} MB JSONL); max_length {MAX_LENGTH}, "
          f"packing on; {procs} tokenising process(es) for both")
    lm, lm_wall, out = _run(me + ["--child", "lmforge", "--arg", str(cfg)], env)
    print("lmforge prepare:\n" + "\n".join("  " + x for x in out.splitlines() if not x.startswith("RESULT")))
    _, cached_wall, _ = _run(me + ["--child", "lmforge", "--arg", str(cfg)], env)
    trl, trl_wall, _ = _run(me + ["--child", "trl", "--arg", str(data), "--procs", str(procs)], env)
    print(f"{'':28}{'wall s':>9}{'rows/s':>10}{'peak RSS MB (main/worker)':>28}")
    print(f"{'lmforge (masks + packing)':28}{lm_wall:9.1f}{args.rows / lm_wall:10,.0f}"
          f"{lm['rss_mb']:>20}/{lm['worker_rss_mb']}")
    print(f"{'TRL SFT (no masks), packing':28}{trl_wall:9.1f}{args.rows / trl_wall:10,.0f}"
          f"{trl['rss_mb']:>20}/{trl['worker_rss_mb']}   (data part {trl['prep_s']:.1f} s, {trl['tokens']:,} tokens)")
    print(f"lmforge cached re-run (whole command): {cached_wall:.1f} s wall")
    print(f"ratio TRL wall / lmforge wall: {trl_wall / lm_wall:.2f}x; load after: {os.getloadavg()[0]:.2f}")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
