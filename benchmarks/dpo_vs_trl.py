"""Preference-tuning throughput and memory: lmforge vs TRL on SmolLM2-135M, same rows, steps and settings.

``--method dpo`` (the default) compares with TRL's DPOTrainer, ``orpo`` with ``trl.experimental.orpo``'s
ORPOTrainer, ``kto`` with KTOTrainer. All train the same generated preference pairs (record -> JSON
extraction; chosen = the right JSON, rejected = a corrupted one) for the same number of steps, batch size,
LoRA (or full fine-tune), beta, max_length and precision; for KTO both sides unpair each pair into a
desirable and an undesirable example, and a batch holds that many examples. Throughput is rows trained
(pairs, or KTO examples) divided by the summed duration of the training steps (model loading and data
preparation excluded for both). DPO and KTO on lmforge's native engine score the reference once per row:
inside the steps with an adapter (the adapter disabled), before the first step for a full fine-tune; that
scoring time is added to its step time, so both sides pay for their reference forwards. ORPO has no
reference. Each run is a subprocess, so peak RSS is measured per run: with LoRA both should hold one copy of
the base weights (the reference is the adapter disabled); with --peft none TRL keeps a frozen reference copy
(DPO, KTO) and lmforge's native engine none. TRL's configs turn gradient checkpointing on by default and
lmforge's do not; the benchmark sets it explicitly for both (off unless --gradient-checkpointing), so the
comparison is like for like.

    .venv/bin/python benchmarks/dpo_vs_trl.py [--method dpo|orpo|kto] [--pairs 32] [--steps 8] [--peft lora|none]
                                              [--gradient-checkpointing] [--engines native,hf]
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import StepTimer, child_result, scratch_dir  # noqa: E402

BATCH, MAX_LENGTH, BETA, SEED = 4, 192, 0.1, 0


def _lr(peft: str) -> float:
    return 2e-4 if peft == "lora" else 2e-5


def _trl_trainer(method: str):
    """(config class, trainer class, extra config keys) of TRL's trainer for ``method``."""
    if method == "orpo":
        os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
        from trl.experimental.orpo import ORPOConfig, ORPOTrainer

        return ORPOConfig, ORPOTrainer, {}
    if method == "kto":
        from trl import KTOConfig, KTOTrainer

        return KTOConfig, KTOTrainer, {"train_sampling_strategy": "sequential"}  # TRL's KL pairs need it
    from trl import DPOConfig, DPOTrainer

    return DPOConfig, DPOTrainer, {}


def run_trl(method: str, data: Path, peft: str, steps: int, gc: bool, out: Path) -> dict:
    import torch
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lmforge.models import pick_dtype, resolve_model_path

    model_dir = resolve_model_path("smollm2-135m-instruct")
    tok = AutoTokenizer.from_pretrained(model_dir)
    ds = load_dataset("json", data_files=str(data), split="train")
    bf16 = pick_dtype("auto") == torch.bfloat16
    # fp32 master weights + bf16 autocast for full fine-tuning, bf16 frozen base with LoRA: lmforge's policy
    weights = torch.float32 if peft == "none" or not bf16 else torch.bfloat16
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=weights)
    peft_config = None
    if peft == "lora":
        from peft import LoraConfig

        peft_config = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear", task_type="CAUSAL_LM")
    config_cls, trainer_cls, extra = _trl_trainer(method)
    args = config_cls(output_dir=str(out), per_device_train_batch_size=BATCH, max_steps=steps, bf16=bf16,
                      learning_rate=_lr(peft), beta=BETA, max_length=MAX_LENGTH, logging_steps=5, save_strategy="no",
                      report_to="none", use_cpu=True, seed=SEED, disable_tqdm=True, gradient_checkpointing=gc, **extra)
    timer = StepTimer()
    trainer = trainer_cls(model=model, args=args, train_dataset=ds, processing_class=tok, peft_config=peft_config,
                          callbacks=[timer])
    trainer.train()
    return {"rows": timer.steps * BATCH, "seconds": timer.seconds, "steps": timer.steps,
            "ref_model_copy": getattr(trainer, "ref_model", None) is not None}  # ORPOTrainer has none


def run_lmforge(method: str, data: Path, peft: str, steps: int, gc: bool, out: Path, engine: str) -> dict:
    from lmforge.config import load_config
    from lmforge.training import native

    module = importlib.import_module(f"lmforge.methods.{method}")
    timer = StepTimer()
    tree = {
        "method": method, "model": {"name_or_path": "smollm2-135m-instruct"},
        "peft": {"kind": peft, "r": 16, "alpha": 32, "dropout": 0.05},
        "data": {"train": [{"path": str(data)}], "max_length": MAX_LENGTH}, method: {"beta": BETA},
        "train": {"output_dir": str(out), "max_steps": steps, "per_device_train_batch_size": BATCH,
                  "learning_rate": _lr(peft), "logging_steps": 5, "save_steps": 10_000, "report_to": ["none"],
                  "seed": SEED, "gradient_checkpointing": gc, "engine": engine, "resume": "never"},
    }
    cfg = load_config(None, tree=tree)
    found = {"ref": False}
    real_build, real_step = module.build_trainer, native.NativeTrainer.train_step

    def timed_build(cfg, run):  # the hf engine: attach the same step timer the TRL run uses
        trainer = real_build(cfg, run)
        trainer.add_callback(timer)
        found["ref"] = getattr(trainer, "ref_model", None) is not None
        return trainer

    def timed(real, count_step):  # the native engine: one optimizer step, or the reference scoring before it
        def run(self, *a):
            t0 = time.perf_counter()
            result = real(self, *a)
            timer.seconds += time.perf_counter() - t0
            timer.steps += count_step
            return result
        return run

    module.build_trainer = timed_build
    native.NativeTrainer.train_step = timed(real_step, 1)
    objective = {"dpo": "DPOObjective", "kto": "KTOObjective"}.get(method)
    if objective:  # the reference scoring before the first step (full fine-tune)
        cls = getattr(module, objective)
        cls.start = timed(cls.start, 0)
    module.train(cfg)
    return {"rows": timer.steps * BATCH, "seconds": timer.seconds, "steps": timer.steps,
            "ref_model_copy": found["ref"]}


def child(method: str, which: str, data: str, peft: str, steps: str, gc: str, out: str) -> None:
    if which == "trl":
        result = run_trl(method, Path(data), peft, int(steps), gc == "1", Path(out))
    else:  # lmforge-native, lmforge-hf
        result = run_lmforge(method, Path(data), peft, int(steps), gc == "1", Path(out), which.split("-")[1])
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps(result), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description="lmforge vs TRL: preference-tuning rows/s and peak RSS")
    ap.add_argument("--method", default="dpo", choices=["dpo", "orpo", "kto"],
                    help="peer: TRL's DPOTrainer, ORPOTrainer (trl.experimental.orpo) or KTOTrainer")
    ap.add_argument("--pairs", type=int, default=32, help="generated preference pairs (KTO: twice as many examples)")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--peft", default="lora", choices=["none", "lora"])
    ap.add_argument("--gradient-checkpointing", action="store_true", help="on for both runs")
    ap.add_argument("--engines", default=None,
                    help="lmforge engines to run, comma-separated: native,hf (default: native where the method has "
                         "it, else hf)")
    ap.add_argument("--child", nargs=7, metavar=("METHOD", "WHICH", "DATA", "PEFT", "STEPS", "GC", "OUT"))
    args = ap.parse_args()
    if args.child:
        return child(*args.child)
    from lmforge.models import pick_dtype
    from lmforge.plan import NATIVE_METHODS
    from lmforge.synthetic import preference_rows, write_jsonl
    from lmforge.training.flops import cpu_kind

    native_runs = args.method in NATIVE_METHODS
    engines = (args.engines or ("native" if native_runs else "hf")).split(",")
    if "native" in engines and not native_runs:
        sys.exit(f"{args.method} runs on train.engine: hf only; use --engines hf")
    unit = "examples" if args.method == "kto" else "pairs"
    tmp = scratch_dir(f"bench-{args.method}-")
    data = write_jsonl(preference_rows(args.pairs, seed=0), tmp / "train.jsonl")
    env = dict(os.environ, LMFORGE_CACHE=os.environ.get("LMFORGE_CACHE", str(Path.home() / ".cache" / "lmforge")))
    results = {}
    for which in [f"lmforge-{e}" for e in engines] + ["trl"]:
        gc = "1" if args.gradient_checkpointing else "0"
        results[which], proc = child_result([sys.executable, __file__, "--child", args.method, which, str(data),
                                             args.peft, str(args.steps), gc, str(tmp / which)], env)
        if results[which] is None:
            sys.exit(f"{which} run failed:\n{proc.stderr[-3000:]}")
    print(f"\nCPU: {cpu_kind()}; compute dtype (auto): {pick_dtype('auto')}")
    print(f"{args.method.upper()}, SmolLM2-135M, {args.pairs} pairs, {args.steps} steps, batch {BATCH} {unit}, "
          f"max_length {MAX_LENGTH}, peft={args.peft}, gradient checkpointing "
          f"{'on' if args.gradient_checkpointing else 'off'}")
    print(f"{'':16}{'steps':>7}{unit:>9}{'train s':>10}{unit + '/s':>12}{'peak RSS MB':>13}{'ref copy':>10}")
    for which, r in results.items():
        r["rate"] = r["rows"] / r["seconds"]
        print(f"{which:16}{r['steps']:>7}{r['rows']:>9}{r['seconds']:>10.1f}{r['rate']:>12.2f}"
              f"{r['peak_rss_mb']:>13.0f}{str(r['ref_model_copy']):>10}")
    for which, r in results.items():
        if which != "trl":
            print(f"ratio {which} / TRL {unit}/s: {r['rate'] / results['trl']['rate']:.2f}x; "
                  f"peak RSS {which} / TRL: {r['peak_rss_mb'] / results['trl']['peak_rss_mb']:.2f}x")


if __name__ == "__main__":
    main()
