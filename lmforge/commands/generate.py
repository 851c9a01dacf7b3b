"""`lmforge generate --model M --input IN.jsonl --output OUT.jsonl [options]`: batch inference."""

from __future__ import annotations

from lmforge.inference.generate import GenerationOptions


def add_generation_options(p) -> None:
    """Sampling options shared by `generate` and `eval`."""
    p.add_argument("--max-new-tokens", type=int, default=256, help="tokens generated at most per row")
    p.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (0 = greedy)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling: keep the smallest set with this mass")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0 = all)")
    p.add_argument("--num-beams", type=int, default=1, help="beam search width (1 = no beam search)")
    p.add_argument("--stop", action="append", default=[], metavar="TEXT",
                   help="stop string (repeatable); the completion ends before it")
    p.add_argument("--eos-token-id", action="append", type=int, default=[], metavar="ID",
                   help="extra token id that ends a completion (repeatable), beside the model's EOS")
    p.add_argument("--seed", type=int, default=0,
                   help="seed for sampling; reproducible (continuous batching: row i samples with seed + i at any --batch-size)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="rows decoding at once (larger amortises weight reads, costs KV-cache memory); default: as "
                        "many as fit a 2 GiB KV cache, at most 256 (static batching and beam search: 32)")
    p.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float32", "float16"],
                   help="weights dtype; auto = bfloat16 where the CPU/GPU runs it fast, else float32")


def options_from_args(args) -> GenerationOptions:
    opts = GenerationOptions(max_new_tokens=args.max_new_tokens, do_sample=args.do_sample,
                             temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                             num_beams=args.num_beams, stop=args.stop, eos_token_ids=args.eos_token_id, seed=args.seed)
    opts.check()
    return opts


def add_parser(sub, formatter):
    p = sub.add_parser("generate", help="batch inference: JSONL prompts in, JSONL completions out (resumable)",
                       formatter_class=formatter,
                       description="Input rows: {\"prompt\": ...} or {\"messages\": [...]}. Output rows: the input "
                                   "row plus completion, finish_reason (stop|length), completion_tokens. Re-running "
                                   "with the same --output skips the rows already written.")
    p.add_argument("--model", required=True, help="model dir, adapter dir (merged on load), .gguf file or alias")
    p.add_argument("--input", required=True, help="JSONL (or .json/.csv/.parquet) file of prompt rows")
    p.add_argument("--output", required=True, help="JSONL file to write (appended to when resuming)")
    p.add_argument("--backend", choices=["hf", "vllm"], default="hf",
                   help="hf = transformers models in lmforge's decode loop; vllm = vLLM where it is installed")
    p.add_argument("--batching", choices=["static", "continuous"], default="continuous",
                   help="hf backend: continuous = finished rows leave the batch and waiting rows join at once; "
                        "static = transformers generate on length-sorted padded batches (beam search and "
                        "encoder-decoder models always use static)")
    add_generation_options(p)
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return p


def run(args) -> int:
    from pathlib import Path

    from lmforge.errors import ConfigError
    from lmforge.inference.batch import completed_rows, generate_file, read_prompt_rows
    from lmforge.inference.backends import load_backend

    opts = options_from_args(args)
    if args.batch_size is not None and args.batch_size < 1:
        raise ConfigError("--batch-size: must be >= 1")
    rows = read_prompt_rows(args.input)  # bad rows fail before the model is loaded
    if completed_rows(Path(args.output)) == len(rows):
        print(f"nothing to do: {args.output} already holds all {len(rows)} rows")
        return 0
    backend = load_backend(args.backend, args.model, args.dtype, args.batching, args.batch_size)
    # rows are read, generated and written in windows of 16 batches (of 128 rows when the size is automatic)
    skipped, generated = generate_file(args.input, args.output, opts, args.batch_size or 128, backend.encode,
                                       backend.generate, progress=not args.no_progress)
    resumed = f" (resumed: {skipped} rows were already done)" if skipped else ""
    print(f"wrote {generated} completions to {args.output}{resumed}")
    return 0
