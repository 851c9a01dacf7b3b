"""SFT then DPO from the SFT output, on data lmforge generates itself (record -> JSON extraction).

    .venv/bin/python examples/sft_then_dpo/run.py [--sft-model DIR] [key=value overrides applied to both runs]

Writes data/sft (chat rows) and data/dpo (preference pairs: the right JSON vs a corrupted one), runs
`lmforge train sft.yaml`, then `lmforge train dpo.yaml` whose model is runs/sft, and prints the held-out
reward accuracy DPO reached. About 10 minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from lmforge.synthetic import extraction_rows, preference_rows, write_jsonl

HERE = Path(__file__).resolve().parent


def lmforge(*args: str) -> None:
    exe = Path(sys.executable).with_name("lmforge")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "lmforge"]
    subprocess.run(cmd + list(args), cwd=HERE, check=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sft-model", default=None, help="starting model of the SFT run (default: sft.yaml's)")
    ap.add_argument("overrides", nargs="*", help="dotted key=value overrides for both runs")
    args = ap.parse_args()
    overrides = args.overrides
    sft_model = [f"model.name_or_path={args.sft_model}"] if args.sft_model else []
    write_jsonl(extraction_rows(240, seed=0), HERE / "data/sft/train.jsonl")
    write_jsonl(extraction_rows(16, seed=1), HERE / "data/sft/val.jsonl")
    write_jsonl(preference_rows(160, seed=2), HERE / "data/dpo/train.jsonl")
    write_jsonl(preference_rows(32, seed=3), HERE / "data/dpo/val.jsonl")
    lmforge("train", "sft.yaml", "train.resume=never", *sft_model, *overrides)
    lmforge("train", "dpo.yaml", "train.resume=never", *overrides)
    rows = [json.loads(x) for x in (HERE / "runs/dpo/metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "eval_rewards/accuracies" in r]
    for r in evals:
        print(f"step {r['step']}: held-out reward accuracy {r['eval_rewards/accuracies']:.3f}, "
              f"margin {r['eval_rewards/margins']:.3f}")
    print(f"SFT adapter: {HERE / 'runs/sft'}; DPO adapter: {HERE / 'runs/dpo'} (plots/loss.png beside it)")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
