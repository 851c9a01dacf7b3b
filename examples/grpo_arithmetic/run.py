"""GRPO with verifiable rewards on the default model: sums of two small numbers, answered with just the number.

    .venv/bin/python examples/grpo_arithmetic/run.py [key=value overrides]

Writes data/train.jsonl and data/val.jsonl (questions "What is 13 + 14? Answer with just the number." with their
answer), runs `lmforge train grpo.yaml` (rewards in rewards.py), then prints the mean reward of the first and the
last fifth of the steps. A few minutes on 2 CPU cores; runs/grpo has the adapter, metrics.jsonl, rollouts.jsonl
(sampled answers with their rewards), plots/loss.png (the reward curve) and report.md (before/after answers).
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

from lmforge.synthetic import write_jsonl

HERE = Path(__file__).resolve().parent


def questions(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(1, 20), rng.randint(1, 20)
        rows.append({"prompt": [{"role": "user", "content": f"What is {a} + {b}? Answer with just the number."}],
                     "answer": str(a + b)})
    return rows


def main() -> None:
    write_jsonl(questions(400, seed=0), HERE / "data/train.jsonl")
    write_jsonl(questions(16, seed=1), HERE / "data/val.jsonl")
    exe = Path(sys.executable).with_name("lmforge")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "lmforge"]
    subprocess.run(cmd + ["train", "grpo.yaml", "train.resume=never", *sys.argv[1:]], cwd=HERE, check=True)
    rows = [json.loads(x) for x in (HERE / "runs/grpo/metrics.jsonl").read_text().splitlines()]
    rewards = [r["reward"] for r in rows if "reward" in r and "loss" in r]
    fifth = max(1, len(rewards) // 5)
    first, last = sum(rewards[:fifth]) / fifth, sum(rewards[-fifth:]) / fifth
    print(f"mean reward: first {fifth} steps {first:.3f}, last {fifth} steps {last:.3f} (of 1.5: correct + 0.5 x "
          f"just the number)")
    print(f"adapter, rollouts.jsonl, plots and report.md: {HERE / 'runs/grpo'}")


if __name__ == "__main__":
    main()
