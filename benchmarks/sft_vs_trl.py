"""SFT throughput: lmforge vs TRL's SFTTrainer on SmolLM2-135M, same rows, batch size, epoch and precision.

Both train one epoch over the same generated chat rows (record -> JSON extraction) with batch size 8 in
bf16 (when the CPU runs bf16 fast). Throughput is non-padding tokens of that epoch divided by the summed
duration of the training steps (model loading and data preparation excluded for both). Each run is a
subprocess, so peak RSS is measured per run too. TRL runs with its defaults (no packing).

    .venv/bin/python benchmarks/sft_vs_trl.py [--rows 200] [--peft none|lora] [--engines native,hf]

An engine may name lmforge's compute dtype, e.g. ``--engines native,native:float32``: the issue's check that bf16
is never slower than lmforge's own fp32 on a CPU with native bf16 (``model.dtype: auto`` picks bf16 there).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import StepTimer, cache_measuring_peak, child_result, measured_peaks, scratch_dir  # noqa: E402


def _rows_tokens(tokenizer, rows) -> int:
    return sum(len(tokenizer.apply_chat_template(r["messages"], tokenize=True, return_dict=True)["input_ids"])
               for r in rows)


def run_trl(data: Path, peft: str, out: Path) -> dict:
    import torch
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from lmforge.models import pick_dtype, resolve_model_path

    model_dir = resolve_model_path("smollm2-135m-instruct")
    tok = AutoTokenizer.from_pretrained(model_dir)
    ds = load_dataset("json", data_files=str(data), split="train")
    bf16 = pick_dtype("auto") == torch.bfloat16
    # TRL's default loading: the checkpoint's dtype (bf16 here), so a full fine-tune runs with bf16 weights and
    # bf16 Adam updates; lmforge keeps fp32 master weights under bf16 autocast (slower, but updates are not lost).
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype="auto")
    peft_config = None
    if peft == "lora":
        from peft import LoraConfig

        peft_config = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear", task_type="CAUSAL_LM")
    args = SFTConfig(output_dir=str(out), per_device_train_batch_size=8, num_train_epochs=1, bf16=bf16,
                     learning_rate=2e-4 if peft == "lora" else 2e-5, logging_steps=5, save_strategy="no",
                     report_to="none", use_cpu=True, max_length=256, seed=0, disable_tqdm=True)
    timer = StepTimer()
    trainer = SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tok, peft_config=peft_config,
                         callbacks=[timer])
    trainer.train()
    rows = [json.loads(x) for x in data.read_text().splitlines()]
    return {"tokens": _rows_tokens(tok, rows), "seconds": timer.seconds, "steps": timer.steps,
            "weights": str(model.dtype)}


def run_lmforge(data: Path, peft: str, out: Path, engine: str, dtype: str = "auto") -> dict:
    import time

    from lmforge.config import load_config
    from lmforge.methods import sft
    from lmforge.training import native

    timer = StepTimer()
    tree = {
        "method": "sft", "model": {"name_or_path": "smollm2-135m-instruct", "dtype": dtype}, "peft": {"kind": peft},
        "data": {"train": [{"path": str(data)}], "max_length": 256},
        "train": {"output_dir": str(out), "num_train_epochs": 1, "per_device_train_batch_size": 8, "engine": engine,
                  "logging_steps": 5, "save_steps": 10_000, "report_to": ["none"], "seed": 0, "resume": "never"},
    }
    cfg = load_config(None, tree=tree)
    stats = {}
    real_train, real_step = sft.CausalLMTrainer.train, native.NativeTrainer.train_step

    def timed_train(self, *a, **kw):  # attach the same step timer the TRL run uses
        self.add_callback(timer)
        stats["tokens"] = int(sum(len(x) for x in self.train_dataset["input_ids"]))
        return real_train(self, *a, **kw)

    def timed_step(self):  # the native engine: the same span, one optimizer step
        stats.setdefault("tokens", int(sum(len(x) for x in self.train_ds["input_ids"])))
        t0 = time.perf_counter()
        result = real_step(self)
        timer.seconds += time.perf_counter() - t0
        timer.steps += 1
        return result

    sft.CausalLMTrainer.train, native.NativeTrainer.train_step = timed_train, timed_step
    sft.train(cfg)
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    mfu = [r["mfu"] for r in metrics if "mfu" in r]
    weights = "torch.float32" if peft == "none" or dtype == "float32" else "torch.bfloat16"
    return {"tokens": stats["tokens"], "seconds": timer.seconds, "steps": timer.steps, "weights": weights,
            "mfu": sorted(mfu)[len(mfu) // 2] if mfu else None}


def child(which: str, data: str, peft: str, out: str) -> None:
    if which == "trl":
        result = run_trl(Path(data), peft, Path(out))
    else:  # lmforge-native, lmforge-hf, lmforge-native:float32
        engine, _, dtype = which.split("-", 1)[1].partition(":")
        result = run_lmforge(Path(data), peft, Path(out), engine, dtype or "auto")
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps(result), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=200)
    ap.add_argument("--peft", default="none", choices=["none", "lora"])
    ap.add_argument("--engines", default="native",
                    help="lmforge engines to run, comma-separated, each with an optional :dtype (native,hf,native:float32)")
    ap.add_argument("--child", nargs=4, metavar=("WHICH", "DATA", "PEFT", "OUT"))
    args = ap.parse_args()
    if args.child:
        return child(*args.child)
    from lmforge.synthetic import extraction_rows, write_jsonl

    tmp = scratch_dir("bench-sft-")
    data = write_jsonl(extraction_rows(args.rows, seed=0), tmp / "train.jsonl")
    cache = cache_measuring_peak(tmp)  # MFU against the peak measured at lmforge's start, not one stored earlier
    env = dict(os.environ, LMFORGE_CACHE=str(cache))
    from lmforge.models import pick_dtype
    from lmforge.training.flops import cpu_kind

    results = {}
    for which in [f"lmforge-{e}" for e in args.engines.split(",")] + ["trl"]:
        results[which], proc = child_result([sys.executable, __file__, "--child", which, str(data), args.peft,
                                             str(tmp / which.replace(":", "-"))], env)
        if results[which] is None:
            sys.exit(f"{which} run failed:\n{proc.stderr[-3000:]}")
    print(f"\nSFT, SmolLM2-135M, {args.rows} rows, batch 8, one epoch, peft={args.peft}")
    print(f"CPU: {cpu_kind()}; compute dtype (auto): {pick_dtype('auto')}")
    print(f"{'':22}{'steps':>7}{'tokens':>9}{'train s':>10}{'tokens/s':>10}{'MFU':>7}{'peak RSS MB':>13}  base weights")
    for which, r in results.items():
        r["tps"] = r["tokens"] / r["seconds"]
        mfu = f"{100 * r['mfu']:.0f}%" if r.get("mfu") is not None else "-"
        print(f"{which:22}{r['steps']:>7}{r['tokens']:>9}{r['seconds']:>10.1f}{r['tps']:>10.1f}{mfu:>7}"
              f"{r['peak_rss_mb']:>13.0f}  {r['weights']}")
    for key, peak in measured_peaks(cache).items():
        print(f"MFU against the matmul peak lmforge measured at its start in this run: {peak / 1e12:.3f} TFLOP/s ({key})")
    for which in results:
        if which != "trl":
            print(f"ratio {which} / TRL tokens/s: {results[which]['tps'] / results['trl']['tps']:.2f}x")


if __name__ == "__main__":
    main()
