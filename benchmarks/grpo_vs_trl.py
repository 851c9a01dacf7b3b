"""Online RL throughput and memory: lmforge's ``method: grpo`` vs TRL's GRPOTrainer on SmolLM2-135M with LoRA.

Both train on the same generated arithmetic questions ("What is 17 + 25? Answer with a number." as a chat user
turn, with an ``answer`` column) with the same reward function: a small module this script writes to a temp dir,
1.0 when the completion contains the right number, else 0.0, passed unchanged to TRL (``reward_funcs=[fn]``) and to
lmforge (``grpo.rewards: [{function: "rewards.py:fn"}]``). Same knobs on both sides: LoRA r 16, alpha 32,
dropout 0.05, all-linear; ``num_generations`` completions of each prompt, at most ``max_completion_length`` tokens,
temperature 1.0, beta 0 (no reference), loss_type dapo, learning rate, steps, and ``--prompts`` prompts per
optimizer step. lmforge's ``per_device_train_batch_size`` counts prompts, TRL's counts completions: TRL gets
prompts x num_generations (and the same generation batch), so each side samples and trains the same number of
completions per step, in one micro-batch. Gradient checkpointing is off for both (TRL's default is on: it only
saves memory). Precision: the best this CPU runs fast (lmforge's ``model.dtype: auto``; TRL ``bf16=True`` with a
bf16 base under LoRA where the CPU has bf16, fp32 otherwise). Dropout as each side defaults: lmforge turns it off
for GRPO (TRL's ``disable_dropout``), TRL leaves it on (``disable_dropout=False``), i.e. LoRA dropout 0.05.

TRL generates with transformers ``generate`` (its CPU path: ``use_vllm=False``, no continuous batching); lmforge
with its in-process continuous-batching decode loop on the live LoRA weights. Throughput is completions generated
divided by the summed wall time of the optimizer steps (model loading and data preparation excluded for both);
each step's rollout (sampling, without scoring) and the rest of the step (scoring, advantages, forward, backward,
optimizer: "train") are reported apart: lmforge's from its metrics.jsonl (``rollout_s``, ``train_s``), TRL's by
timing ``GRPOTrainer._generate`` in the child, train = step time - rollout. Each run is a subprocess, so peak RSS
is per run, and so is "cores busy" (CPU time / wall time of its steps, of torch's threads: on a shared machine
another process can slow one run many times over; a run well below its thread count is not a measurement).
Completions are sampled, so their lengths differ between the sides (an EOS ends one early): the mean
completion length is printed beside the rate. The mean reward of the first and last step of each side is printed
as a sanity check only.

    .venv/bin/python benchmarks/grpo_vs_trl.py [--steps 8] [--prompts 4] [--generations 8]
                                               [--max-completion-length 64] [--sides lmforge,trl]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import StepTimer, child_result, scratch_dir  # noqa: E402

LR, SEED, LORA = 1e-4, 0, {"r": 16, "alpha": 32, "dropout": 0.05}


class CpuStepTimer(StepTimer):
    """StepTimer that also sums this process's CPU time (all threads) over the steps: CPU s / wall s near torch's
    thread count means the run had the cores to itself; well below it, other processes took them."""

    def __init__(self):
        super().__init__()
        self.cpu, self._c = 0.0, None

    def on_step_begin(self, args, state, control, **kw):
        super().on_step_begin(args, state, control, **kw)
        self._c = time.process_time()

    def on_step_end(self, args, state, control, **kw):
        super().on_step_end(args, state, control, **kw)
        self.cpu += time.process_time() - self._c

REWARDS = '''
import re


def correct(prompts, completions, answer, **kwargs):
    """1.0 when the completion contains the right number (as a whole number), else 0.0. TRL's signature: a
    conversational completion is [{"role": "assistant", "content": text}]."""
    texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
    return [1.0 if a in re.findall(r"-?\\d+", t) else 0.0 for t, a in zip(texts, answer)]
'''


def _questions(n: int, seed: int) -> list[dict]:
    """Chat prompts of two-digit additions and subtractions, each with its answer."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        op = rng.choice("+-")
        a, b = (a, b) if op == "+" or a >= b else (b, a)
        answer = a + b if op == "+" else a - b
        rows.append({"prompt": [{"role": "user", "content": f"What is {a} {op} {b}? Answer with a number."}],
                     "answer": str(answer)})
    return rows


def run_trl(data: Path, rewards: Path, k: dict, out: Path) -> dict:
    import importlib.util

    import torch
    from datasets import load_dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    from lmforge.models import pick_dtype, resolve_model_path

    spec = importlib.util.spec_from_file_location("bench_rewards", rewards)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    class TimedGRPOTrainer(GRPOTrainer):
        """Sums the time of the rollouts (``_generate``: TRL 1.16's sampling step, a private method; its public
        hooks have no callback around generation)."""
        rollout_s = 0.0

        def _generate(self, prompts):
            t0 = time.perf_counter()
            try:
                return super()._generate(prompts)
            finally:
                self.rollout_s += time.perf_counter() - t0

    model_dir = resolve_model_path("smollm2-135m-instruct")
    tok = AutoTokenizer.from_pretrained(model_dir)
    ds = load_dataset("json", data_files=str(data), split="train")
    bf16 = pick_dtype("auto") == torch.bfloat16
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16 if bf16 else torch.float32)
    peft_config = LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                             target_modules="all-linear", task_type="CAUSAL_LM")
    completions_per_step = k["prompts"] * k["generations"]  # TRL's batch counts completions
    args = GRPOConfig(output_dir=str(out), max_steps=k["steps"], per_device_train_batch_size=completions_per_step,
                      generation_batch_size=completions_per_step, gradient_accumulation_steps=1,
                      num_generations=k["generations"], max_completion_length=k["max_completion_length"],
                      temperature=1.0, beta=0.0, loss_type="dapo", learning_rate=LR, bf16=bf16, use_cpu=True,
                      use_vllm=False, gradient_checkpointing=False, logging_steps=1, save_strategy="no",
                      report_to="none", seed=SEED, disable_tqdm=True, log_completions=False)
    timer = CpuStepTimer()
    trainer = TimedGRPOTrainer(model=model, reward_funcs=[module.correct], args=args, train_dataset=ds,
                               processing_class=tok, peft_config=peft_config, callbacks=[timer])
    trainer.train()
    rows = [r for r in trainer.state.log_history if "reward" in r]  # one per step (logging_steps 1)
    return {"steps": timer.steps, "completions": timer.steps * completions_per_step, "seconds": timer.seconds,
            "cpu_s": timer.cpu, "rollout_s": trainer.rollout_s, "train_s": timer.seconds - trainer.rollout_s,
            "mean_length": sum(r["completions/mean_length"] for r in rows) / len(rows),
            "reward_first": rows[0]["reward"], "reward_last": rows[-1]["reward"]}


def run_lmforge(data: Path, rewards: Path, k: dict, out: Path) -> dict:
    from lmforge.config import load_config
    from lmforge.methods import grpo
    from lmforge.training import native
    from lmforge.training.outputs import read_metrics

    tree = {
        "method": "grpo", "model": {"name_or_path": "smollm2-135m-instruct", "dtype": "auto"},
        "peft": {"kind": "lora", **LORA, "target_modules": "all-linear"},
        "data": {"train": [{"path": str(data)}], "max_length": 512},
        "grpo": {"rewards": [{"function": f"{rewards}:correct"}], "num_generations": k["generations"],
                 "max_completion_length": k["max_completion_length"], "temperature": 1.0, "beta": 0.0,
                 "loss_type": "dapo", "log_completions": 0},
        "train": {"output_dir": str(out), "max_steps": k["steps"], "per_device_train_batch_size": k["prompts"],
                  "gradient_accumulation_steps": 1, "learning_rate": LR, "logging_steps": 1,
                  "save_strategy": "no", "report_to": ["none"], "seed": SEED, "gradient_checkpointing": False,
                  "engine": "native", "resume": "never"},
    }
    cfg = load_config(None, tree=tree)
    timer = CpuStepTimer()
    real_step = native.NativeTrainer.train_step

    def timed_step(self):  # one optimizer step, its rollout included (before_step runs inside train_step)
        t0, c0 = time.perf_counter(), time.process_time()
        result = real_step(self)
        timer.seconds += time.perf_counter() - t0
        timer.cpu += time.process_time() - c0
        timer.steps += 1
        return result

    native.NativeTrainer.train_step = timed_step
    grpo.train(cfg)
    rows = [r for r in read_metrics(out / "metrics.jsonl") if "loss" in r]
    return {"steps": timer.steps, "completions": timer.steps * k["prompts"] * k["generations"],
            "seconds": timer.seconds, "cpu_s": timer.cpu, "rollout_s": sum(r["rollout_s"] for r in rows),
            "train_s": sum(r["train_s"] for r in rows),
            "mean_length": sum(r["completions/mean_length"] for r in rows) / len(rows),
            "reward_first": rows[0]["reward"], "reward_last": rows[-1]["reward"]}


def child(which: str, data: str, rewards: str, knobs: str, out: str) -> None:
    import torch

    run = run_trl if which == "trl" else run_lmforge
    result = run(Path(data), Path(rewards), json.loads(knobs), Path(out))
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result["threads"] = torch.get_num_threads()
    print("RESULT " + json.dumps(result), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description="lmforge vs TRL: GRPO completions/s, rollout/train split, peak RSS")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--prompts", type=int, default=4,
                    help="prompts per optimizer step (each sampled --generations times)")
    ap.add_argument("--generations", type=int, default=8, help="num_generations: completions per prompt")
    ap.add_argument("--max-completion-length", type=int, default=64)
    ap.add_argument("--sides", default="lmforge,trl", help="runs, comma-separated: lmforge,trl")
    ap.add_argument("--child", nargs=5, metavar=("WHICH", "DATA", "REWARDS", "KNOBS", "OUT"))
    args = ap.parse_args()
    if args.child:
        return child(*args.child)
    from lmforge.models import pick_dtype
    from lmforge.synthetic import write_jsonl
    from lmforge.training.flops import cpu_kind

    sides = args.sides.split(",")
    if set(sides) - {"lmforge", "trl"}:
        sys.exit(f"--sides: lmforge and/or trl, not {args.sides!r}")
    knobs = {"steps": args.steps, "prompts": args.prompts, "generations": args.generations,
             "max_completion_length": args.max_completion_length}
    tmp = scratch_dir("bench-grpo-")
    data = write_jsonl(_questions(max(64, args.steps * args.prompts), seed=SEED), tmp / "train.jsonl")
    rewards = tmp / "rewards.py"
    rewards.write_text(REWARDS)
    env = dict(os.environ, LMFORGE_CACHE=os.environ.get("LMFORGE_CACHE", str(Path.home() / ".cache" / "lmforge")))
    results = {}
    for which in sides:
        results[which], proc = child_result([sys.executable, __file__, "--child", which, str(data), str(rewards),
                                             json.dumps(knobs), str(tmp / which)], env)
        if results[which] is None:
            sys.exit(f"{which} run failed:\n{proc.stderr[-3000:]}")
    print(f"\nCPU: {cpu_kind()}; compute dtype (auto): {pick_dtype('auto')}")
    print(f"GRPO, SmolLM2-135M, LoRA r16 all-linear, {args.steps} steps x {args.prompts} prompts x "
          f"{args.generations} generations, max_completion_length {args.max_completion_length}, temperature 1.0, "
          f"beta 0, loss dapo, lr {LR}, gradient checkpointing off; TRL generates with transformers generate")
    print(f"{'':10}{'steps':>6}{'compl.':>8}{'mean len':>10}{'step s':>9}{'compl./s':>10}{'rollout s':>11}"
          f"{'train s':>9}{'peak RSS MB':>13}{'cores busy':>12}{'reward first':>14}{'last':>7}")
    for which, r in results.items():
        r["rate"] = r["completions"] / r["seconds"]
        print(f"{which:10}{r['steps']:>6}{r['completions']:>8}{r['mean_length']:>10.1f}{r['seconds']:>9.1f}"
              f"{r['rate']:>10.2f}{r['rollout_s']:>11.1f}{r['train_s']:>9.1f}{r['peak_rss_mb']:>13.0f}"
              f"{r['cpu_s'] / r['seconds']:>8.1f}/{r['threads']:<3}"
              f"{r['reward_first']:>14.3f}{r['reward_last']:>7.3f}")
    print("cores busy: CPU time / wall time of the steps, of torch's threads; well below them, other processes "
          "took the cores during that run: re-run on an idle machine before comparing")
    if {"lmforge", "trl"} <= results.keys():
        a, b = results["lmforge"], results["trl"]
        print(f"ratio lmforge / TRL: completions/s {a['rate'] / b['rate']:.2f}x; rollout s "
              f"{a['rollout_s'] / b['rollout_s']:.2f}x; train s {a['train_s'] / b['train_s']:.2f}x; "
              f"peak RSS {a['peak_rss_mb'] / b['peak_rss_mb']:.2f}x")
        crowded = [w for w, r in results.items() if r["cpu_s"] / r["seconds"] < 0.75 * r["threads"]]
        if crowded:
            print(f"WARNING: {', '.join(crowded)} had under 3/4 of its cores: these ratios are not a measurement")


if __name__ == "__main__":
    main()
