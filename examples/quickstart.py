"""`make demo`: teach SmolLM2-135M-Instruct to turn a sentence about a person into compact JSON.

1. generates a small instruction dataset (data/quickstart/{train,val}.jsonl; no third-party text),
2. asks the built-in model a few held-out questions (before),
3. runs `lmforge train configs/quickstart.yaml` (LoRA, CPU, a few minutes),
4. asks the trained adapter the same questions (after) and prints both side by side with exact-match counts.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "quickstart.yaml"
DATA = ROOT / "data" / "quickstart"
OUT = ROOT / "runs" / "quickstart"
N_SHOW, N_SCORE = 4, 16


def answers(model_dir: Path, prompts: list[list[dict]], adapter: Path | None = None) -> list[str]:
    """Greedy answers, batched, from the base model or the base model plus a LoRA adapter."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lmforge.models import pick_dtype

    tok = AutoTokenizer.from_pretrained(adapter or model_dir)
    tok.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=pick_dtype("auto"))
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter))
    texts = [tok.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p in prompts]
    batch = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=48, do_sample=False, pad_token_id=tok.pad_token_id)
    return [tok.decode(o[batch["input_ids"].shape[1]:], skip_special_tokens=True).strip() for o in out]


def main() -> int:
    from lmforge.models import resolve_model_path
    from lmforge.synthetic import write_extraction_dataset

    write_extraction_dataset(DATA, n_train=400, n_val=32, seed=0)
    val = [json.loads(x) for x in (DATA / "val.jsonl").read_text().splitlines()][:N_SCORE]
    prompts = [r["messages"][:1] for r in val]
    refs = [r["messages"][1]["content"] for r in val]
    print("== loading the built-in model smollm2-135m-instruct (the first time it is imported from GGUF)", flush=True)
    base_dir = resolve_model_path("smollm2-135m-instruct")
    before = answers(base_dir, prompts)

    print(f"== lmforge train {CONFIG.relative_to(ROOT)}", flush=True)
    cmd = [sys.executable, "-m", "lmforge", "train", str(CONFIG), f"train.output_dir={OUT}", f"data.train=[{{path: {DATA}}}]",
           "train.resume=never"]
    if subprocess.run(cmd, cwd=ROOT).returncode != 0:
        return 1
    after = answers(base_dir, prompts, adapter=OUT)

    print("\n== before / after on held-out rows")
    for p, b, a in list(zip(prompts, before, after))[:N_SHOW]:
        print(f"\nQ: {p[0]['content'].splitlines()[-1]}")
        print(f"  before: {b[:160]!r}")
        print(f"  after:  {a[:160]!r}")
    exact_b = sum(b == r for b, r in zip(before, refs))
    exact_a = sum(a == r for a, r in zip(after, refs))
    print(f"\nexact JSON match on {len(refs)} held-out rows: before {exact_b}/{len(refs)}, after {exact_a}/{len(refs)}")
    print(f"run outputs: {OUT} (metrics.jsonl, plots/loss.png, report.md, adapter)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
