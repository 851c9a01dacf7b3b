"""`lmforge eval --model M --data FILE [--metrics perplexity,rouge,bleu,exact_match,reward_accuracy] [--tasks T]`."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

from lmforge.commands.generate import add_generation_options, options_from_args


def add_parser(sub, formatter):
    p = sub.add_parser("eval", help="score a model on a dataset (perplexity, ROUGE, BLEU, exact match, reward "
                                    "accuracy, lm-eval tasks)",
                       formatter_class=formatter,
                       description="Perplexity counts the tokens training would put loss on (completion/assistant "
                                   "tokens for prompt/completion and chat rows). Generation metrics generate from the "
                                   "prompt and compare with the completion (or the last assistant turn). "
                                   "reward_accuracy scores a reward model (method: reward) on preference rows: the "
                                   "fraction of pairs with chosen scored above rejected, and the mean margin. Prints "
                                   "a table and writes a JSON report.")
    p.add_argument("--model", required=True, help="model dir, adapter dir (merged on load), .gguf file or alias")
    p.add_argument("--adapter", action="append", default=[], metavar="NAME=DIR",
                   help="also score the LoRA/DoRA adapter DIR over --model (the base is loaded once; adapters stay "
                        "unmerged), reported under NAME; repeatable, to compare adapters on one base")
    p.add_argument("--data", help="a .jsonl/.json/.csv/.parquet file or directory of text, prompt/completion or chat "
                                   "rows (preference rows for reward_accuracy)")
    p.add_argument("--metrics", default="perplexity",
                   help="comma-separated: perplexity, rouge, bleu, exact_match; reward_accuracy for a reward model")
    p.add_argument("--tasks", default=None,
                   help="comma-separated lm-eval-harness task names or task YAML files (needs lm-eval; data must be local)")
    p.add_argument("--limit", type=int, default=None, help="use at most N rows of --data (and N examples per task)")
    p.add_argument("--max-length", type=int, default=1024, help="perplexity: tokens per row at most (truncated)")
    p.add_argument("--output", default="eval_report.json", help="where the JSON report is written")
    add_generation_options(p)
    # no --batch-size: 8 rows per perplexity/lm-eval batch, and generation picks its own (as `generate` does)
    p.set_defaults(max_new_tokens=64)
    return p


def _table(results: dict) -> str:
    width = max((len(k) for k in results), default=6)
    lines = [f"{'metric':<{width}}  value", f"{'-' * width}  ----------"]
    for key, value in results.items():
        shown = f"{value:.4f}" if isinstance(value, float) else str(value)
        lines.append(f"{key:<{width}}  {shown}")
    return "\n".join(lines)


def run(args) -> int:
    from lmforge.errors import ConfigError, UnsupportedError
    from lmforge.evaluation.evaluate import evaluate, lm_eval_tasks, read_eval_data
    from lmforge.evaluation.metrics import check_metric_names
    from lmforge.inference.adapter_set import AdapterSet, parse_adapter_flags
    from lmforge.inference.loading import load_for_inference

    metrics = check_metric_names([m.strip() for m in args.metrics.split(",") if m.strip()], "--metrics")
    tasks = [t.strip() for t in (args.tasks or "").split(",") if t.strip()]
    if not args.data and not tasks:
        raise ConfigError("--data or --tasks: give a dataset to score, lm-eval tasks, or both")
    if (args.batch_size is not None and args.batch_size < 1) or (args.limit is not None and args.limit < 1):
        raise ConfigError("--batch-size and --limit: must be >= 1")
    opts = options_from_args(args)
    from lmforge import cloud

    source = cloud.local_input(args.data, "--data") if args.data else None  # a URL: copied into the cache once
    data = read_eval_data(source, args.limit) if source else None  # bad rows fail before loading the model
    named = parse_adapter_flags(args.adapter)
    loaded = load_for_inference(args.model, args.dtype, reward_model_ok=True)
    if tasks and loaded.is_reward_model:
        raise UnsupportedError(f"--tasks: {args.model} is a reward model; lm-eval tasks need a language model")
    adapters = AdapterSet(loaded) if named else None
    for name, root in named.items():
        adapters.add(name, root)

    def score(name: str | None) -> tuple[dict, list]:
        with adapters.rows.applied(adapters.get(name) if name else None) if adapters else contextlib.nullcontext():
            results, samples = evaluate(loaded, data, metrics if data else [], opts, args.batch_size, args.max_length)
            if tasks:
                results.update(lm_eval_tasks(loaded, tasks, args.batch_size or 8, args.limit))
        return results, samples

    results, samples = score(None)
    report = {"model": args.model, "data": args.data, "format": data.fmt if data else None,
              "rows": len(data.rows) if data else 0, "metrics": results, "samples": samples}
    by_adapter = {name: score(name) for name in named}
    if by_adapter:
        report["adapters"] = {name: {"root": named[name], "metrics": r, "samples": s}
                              for name, (r, s) in by_adapter.items()}
    with cloud.local_output(args.output, "--output") as target:
        out = Path(target)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    print(_table(results))
    for name, (r, _) in by_adapter.items():
        print(f"\nadapter {name} ({named[name]}):\n{_table(r)}")
    print(f"report written to {args.output}")
    return 0
