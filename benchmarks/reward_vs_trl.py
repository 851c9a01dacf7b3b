"""Reward-model training throughput and memory: lmforge vs TRL's RewardTrainer on SmolLM2-135M, same pairs and steps.

Both train a Bradley-Terry reward model (``AutoModelForSequenceClassification``, one output) on the same
generated preference pairs (record -> JSON extraction; chosen = the right JSON, rejected = a corrupted one) for
the same number of steps, batch size, LoRA (or full fine-tune), learning rate and max_length. Throughput is
pairs trained divided by the summed duration of the training steps (model loading and data preparation
excluded for both). Pairs, not tokens: lmforge's native engine runs a pair's prompt once (``[prompt, chosen,
rejected]`` packed in one row) where TRL runs it twice, so their token counts differ for the same work.

The peer runs at its best CPU setting, measured in the same run: TRL's RewardConfig turns gradient checkpointing
on by default, which only saves memory, so it is off here (for lmforge too: its default); and TRL is run in
every precision that can be fastest on this CPU (fp32, and bf16 where the CPU runs bf16 fast: fp32 weights
under bf16 autocast for a full fine-tune, a bf16 base with LoRA), the faster of them being the peer in the
ratio. lmforge runs with its default ``model.dtype: auto``. Each run is a subprocess, so peak RSS is per run.

    .venv/bin/python benchmarks/reward_vs_trl.py [--pairs 64] [--steps 12] [--peft lora|none] [--engines native,hf]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import StepTimer, child_result, scratch_dir  # noqa: E402

BATCH, MAX_LENGTH, SEED = 4, 192, 0


def _lr(peft: str) -> float:
    return 2e-4 if peft == "lora" else 2e-5


def run_trl(data: Path, peft: str, steps: int, dtype: str, out: Path) -> dict:
    import torch
    from datasets import load_dataset
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from trl import RewardConfig, RewardTrainer

    from lmforge.models import resolve_model_path

    model_dir = resolve_model_path("smollm2-135m-instruct")
    tok = AutoTokenizer.from_pretrained(model_dir)
    if tok.pad_token is None:  # as lmforge's tokenizer loading: pad with EOS where the tokenizer names no pad
        tok.pad_token = tok.eos_token
    ds = load_dataset("json", data_files=str(data), split="train")
    bf16 = dtype == "bfloat16"
    # fp32 master weights + bf16 autocast for full fine-tuning, bf16 frozen base with LoRA: lmforge's policy
    weights = torch.float32 if peft == "none" or not bf16 else torch.bfloat16
    torch.manual_seed(SEED)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=1, dtype=weights)
    model.config.pad_token_id = tok.pad_token_id
    peft_config = None
    if peft == "lora":
        from peft import LoraConfig

        peft_config = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear",
                                 task_type="SEQ_CLS")  # SEQ_CLS: the score head is trained and saved too
    args = RewardConfig(output_dir=str(out), per_device_train_batch_size=BATCH, max_steps=steps, bf16=bf16,
                        learning_rate=_lr(peft), max_length=MAX_LENGTH, logging_steps=5, save_strategy="no",
                        report_to="none", use_cpu=True, seed=SEED, disable_tqdm=True, gradient_checkpointing=False)
    timer = StepTimer()
    trainer = RewardTrainer(model=model, args=args, train_dataset=ds, processing_class=tok, peft_config=peft_config,
                            callbacks=[timer])
    trainer.train()
    return {"pairs": timer.steps * BATCH, "seconds": timer.seconds, "steps": timer.steps}


def run_lmforge(data: Path, peft: str, steps: int, out: Path, engine: str) -> dict:
    from lmforge.config import load_config
    from lmforge.methods import reward
    from lmforge.training import native

    timer = StepTimer()
    tree = {
        "method": "reward", "model": {"name_or_path": "smollm2-135m-instruct"},
        "peft": {"kind": peft, "r": 16, "alpha": 32, "dropout": 0.05},
        "data": {"train": [{"path": str(data)}], "max_length": MAX_LENGTH},
        "train": {"output_dir": str(out), "max_steps": steps, "per_device_train_batch_size": BATCH,
                  "learning_rate": _lr(peft), "logging_steps": 5, "save_steps": 10_000, "report_to": ["none"],
                  "seed": SEED, "engine": engine, "resume": "never"},
    }
    cfg = load_config(None, tree=tree)
    real_build, real_step = reward.build_trainer, native.NativeTrainer.train_step

    def timed_build(cfg, run):  # the hf engine: attach the same step timer the TRL run uses
        trainer = real_build(cfg, run)
        trainer.add_callback(timer)
        return trainer

    def timed_step(self):  # the native engine: one optimizer step
        t0 = time.perf_counter()
        result = real_step(self)
        timer.seconds += time.perf_counter() - t0
        timer.steps += 1
        return result

    reward.build_trainer = timed_build
    native.NativeTrainer.train_step = timed_step
    reward.train(cfg)
    return {"pairs": timer.steps * BATCH, "seconds": timer.seconds, "steps": timer.steps}


def child(which: str, data: str, peft: str, steps: str, out: str) -> None:
    if which.startswith("trl"):  # trl:float32, trl:bfloat16
        result = run_trl(Path(data), peft, int(steps), which.split(":")[1], Path(out))
    else:  # lmforge-native, lmforge-hf
        result = run_lmforge(Path(data), peft, int(steps), Path(out), which.split("-")[1])
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps(result), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description="lmforge vs TRL's RewardTrainer: reward-model pairs/s and peak RSS")
    ap.add_argument("--pairs", type=int, default=64, help="generated preference pairs")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--peft", default="lora", choices=["none", "lora"])
    ap.add_argument("--engines", default="native", help="lmforge engines to run, comma-separated: native,hf")
    ap.add_argument("--child", nargs=5, metavar=("WHICH", "DATA", "PEFT", "STEPS", "OUT"))
    args = ap.parse_args()
    if args.child:
        return child(*args.child)
    import torch

    from lmforge.models import pick_dtype
    from lmforge.synthetic import preference_rows, write_jsonl
    from lmforge.training.flops import cpu_kind

    auto = pick_dtype("auto")
    peers = ["trl:float32"] + (["trl:bfloat16"] if auto == torch.bfloat16 else [])  # TRL's candidate settings
    tmp = scratch_dir("bench-reward-")
    data = write_jsonl(preference_rows(args.pairs, seed=0), tmp / "train.jsonl")
    env = dict(os.environ, LMFORGE_CACHE=os.environ.get("LMFORGE_CACHE", str(Path.home() / ".cache" / "lmforge")))
    results = {}
    for which in [f"lmforge-{e}" for e in args.engines.split(",")] + peers:
        results[which], proc = child_result([sys.executable, __file__, "--child", which, str(data), args.peft,
                                             str(args.steps), str(tmp / which.replace(":", "-"))], env)
        if results[which] is None:
            sys.exit(f"{which} run failed:\n{proc.stderr[-3000:]}")
    print(f"\nCPU: {cpu_kind()}; lmforge compute dtype (auto): {auto}")
    print(f"reward model, SmolLM2-135M, {args.pairs} pairs, {args.steps} steps, batch {BATCH} pairs, "
          f"max_length {MAX_LENGTH}, peft={args.peft}, gradient checkpointing off")
    print(f"{'':16}{'steps':>7}{'pairs':>9}{'train s':>10}{'pairs/s':>12}{'peak RSS MB':>13}")
    for which, r in results.items():
        r["rate"] = r["pairs"] / r["seconds"]
        print(f"{which:16}{r['steps']:>7}{r['pairs']:>9}{r['seconds']:>10.1f}{r['rate']:>12.2f}"
              f"{r['peak_rss_mb']:>13.0f}")
    best = max(peers, key=lambda p: results[p]["rate"])
    print(f"TRL's best setting here: {best}")
    for which, r in results.items():
        if which.startswith("lmforge"):
            print(f"ratio {which} / {best} pairs/s: {r['rate'] / results[best]['rate']:.2f}x on {cpu_kind()}; "
                  f"peak RSS: {r['peak_rss_mb'] / results[best]['peak_rss_mb']:.2f}x")


if __name__ == "__main__":
    main()
