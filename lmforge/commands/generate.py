"""`lmforge generate --model M --input IN.jsonl --output OUT.jsonl [options]`: batch inference.

With ``--nproc-per-node N`` (or under a user's own torchrun) the rows are shared out between processes and
merged into one output (lmforge/inference/sharded.py); ``--zero-inference`` / ``--kernel-inject`` run the
model through DeepSpeed (lmforge/inference/zero.py).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from lmforge.distributed import launch


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


def options_from_args(args):
    from lmforge.inference.generate import GenerationOptions  # torch and transformers: not at `lmforge --help`

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
    ds = p.add_argument_group("DeepSpeed (hf backend)")
    ds.add_argument("--zero-inference", action="store_true",
                    help="run the model as a ZeRO-3 engine with its parameters offloaded to CPU memory (or to "
                         "--offload-dir), fetched layer by layer: for models larger than GPU/CPU memory (with "
                         "--nproc-per-node the processes share one model, partitioned over them)")
    ds.add_argument("--offload-dir", default=None, metavar="DIR",
                    help="with --zero-inference: offload the parameters to files in DIR (DeepSpeed NVMe offload; "
                         "needs libaio) instead of CPU memory")
    ds.add_argument("--kernel-inject", action="store_true",
                    help="DeepSpeed-Inference fused kernels (CUDA GPUs only; static batching)")
    launch.add_arguments(p)
    return p


def run(args) -> int:
    from pathlib import Path

    from lmforge.distributed.ranks import world_size
    from lmforge.errors import ConfigError, UnsupportedError
    from lmforge.inference import zero
    from lmforge.inference.batch import completed_rows, generate_file, read_prompt_rows

    opts = options_from_args(args)
    if args.batch_size is not None and args.batch_size < 1:
        raise ConfigError("--batch-size: must be >= 1")
    relaunch = launch.wants_launch(args)
    world = args.nproc_per_node * args.nnodes if relaunch else world_size()
    zero.check(args.zero_inference, args.kernel_inject, args.offload_dir, args.backend)
    if world > 1 and args.backend == "vllm":
        raise UnsupportedError("--backend vllm: vLLM schedules all rows itself in one engine (with its own tensor "
                               "parallelism); run it in one process, or use --backend hf with --nproc-per-node")
    remote_output = _local_paths(args)  # s3:// (any fsspec URL) input and output: local copies (cloud.py)
    rows = read_prompt_rows(args.input)  # bad rows fail before the model is loaded or processes start
    if (relaunch or world == 1) and completed_rows(Path(args.output)) == len(rows):
        print(f"nothing to do: {args.output} already holds all {len(rows)} rows")
        return 0
    if relaunch:  # --nproc-per-node: run this command again under torchrun, one worker per process
        return _uploaded(_relaunch(args), args.output, remote_output)
    batch_size = args.batch_size or 128  # rows are generated and written in windows of 16 batches
    if world > 1:
        code = _run_sharded(args, rows, opts, batch_size)
        return _uploaded(code, args.output, remote_output) if os.environ.get("RANK", "0") == "0" else code
    try:
        backend = _load(args)
        skipped, generated = generate_file(args.input, args.output, opts, batch_size, backend.encode,
                                           backend.generate, not args.no_progress, _max_prompt_tokens(backend))
    finally:
        zero.close()
    _report(args.output, skipped, generated)
    return _uploaded(0, args.output, remote_output)


def _local_paths(args) -> str | None:
    """A URL --input is read from its cached copy; a URL --output is written to a local file (the bucket's
    earlier output first comes down, so a rerun continues it) and uploaded when done. Returns that URL."""
    from lmforge import cloud

    if cloud.is_remote(args.input):
        args.input = cloud.local_input(args.input, "--input")
    if not cloud.is_remote(args.output):
        return None
    url, local = args.output, cloud.local_mirror(args.output) / "output.jsonl"
    fs, path = cloud.filesystem(url)
    if not local.exists() and fs.exists(path):
        local.parent.mkdir(parents=True, exist_ok=True)
        fs.get(path, str(local))
    local.parent.mkdir(parents=True, exist_ok=True)
    args.output = str(local)
    return url


def _uploaded(code: int, local: str, url: str | None) -> int:
    if code == 0 and url:
        from lmforge import cloud

        cloud.upload_file(Path(local), url)
        print(f"uploaded to {url}")
    return code


def _load(args):
    """The backend the flags ask for."""
    from lmforge.inference import zero
    from lmforge.inference.backends import load_backend

    if args.zero_inference:
        return zero.ZeroBackend(args.model, args.dtype, args.batching, args.batch_size, args.offload_dir)
    if args.kernel_inject:
        return zero.KernelInjectBackend(args.model, args.dtype, args.batch_size)
    return load_backend(args.backend, args.model, args.dtype, args.batching, args.batch_size)


def _max_prompt_tokens(backend) -> int | None:
    """The model's context for the hf backends (vLLM checks prompt lengths itself)."""
    from lmforge.inference.backends import HfBackend
    from lmforge.inference.generate import context_length

    return context_length(backend.loaded.model) if isinstance(backend, HfBackend) else None


def _run_sharded(args, rows, opts, batch_size: int) -> int:
    """This process's part of a multi-process run (a torchrun worker)."""
    from pathlib import Path

    from lmforge.inference import sharded, zero

    def load() -> sharded.Worker:
        backend = _load(args)
        lockstep = backend.lockstep if isinstance(backend, zero.ZeroBackend) else None
        return sharded.Worker(backend.encode, backend.generate, _max_prompt_tokens(backend),
                              lockstep.drain if lockstep else None)

    try:
        skipped, generated = sharded.run(rows, Path(args.output), opts, batch_size, load, not args.no_progress)
    except sharded.RankFailed:
        return 2  # rank 0 has printed every rank's error
    if os.environ.get("RANK", "0") == "0":
        _report(args.output, skipped, generated)
    sharded.finish()
    return 0


def _relaunch(args) -> int:
    import sys

    code = launch.run_torchrun(args, _argv(args), "generate")
    if code:
        sys.stderr.write(f"lmforge: error: generate on {args.nproc_per_node * args.nnodes} processes failed (torchrun "
                         f"exit code {code}; each process's error is above); {args.output} was not changed\n")
        return code
    return 0


def _argv(args) -> list[str]:
    """The command line that parsed into ``args``, for the torchrun workers (the launcher flags included: a
    worker checks them against the processes torchrun started)."""
    parser = add_parser(argparse.ArgumentParser().add_subparsers(), argparse.HelpFormatter)
    argv = []
    for action in parser._actions:  # argparse has no public list of a parser's options
        value = getattr(args, action.dest, None)
        if not action.option_strings or value is None or value is False or value == action.default:
            continue
        flag = action.option_strings[-1]
        if isinstance(action, argparse._StoreTrueAction):
            argv.append(flag)
        elif isinstance(action, argparse._AppendAction):
            for v in value:
                argv += [flag, str(v)]
        else:
            argv += [flag, str(value)]
    return argv + (["--debug"] if args.debug else [])


def _report(output: str, skipped: int, generated: int) -> None:
    resumed = f" (resumed: {skipped} rows were already done)" if skipped else ""
    print(f"wrote {generated} completions to {output}{resumed}")
