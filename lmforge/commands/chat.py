"""`lmforge chat --model M [--backend hf|vllm] [--system TEXT] [options]`: interactive terminal chat."""

from __future__ import annotations


def add_parser(sub, formatter):
    p = sub.add_parser("chat", help="interactive terminal chat with a model (streamed answers, history)",
                       formatter_class=formatter,
                       description="Type a message and press Enter; the answer streams as it is generated and the "
                                   "conversation is kept (rendered with the model's chat template). Commands: "
                                   "/system TEXT sets the system prompt (/system alone clears it), /reset clears "
                                   "the conversation (the system prompt stays), /exit or Ctrl-D quits, Ctrl-C "
                                   "stops the answer being generated.")
    p.add_argument("--model", required=True, help="model dir, adapter dir (merged on load), .gguf file or alias")
    p.add_argument("--backend", choices=["hf", "vllm"], default="hf",
                   help="hf = transformers models in lmforge's decode loop; vllm = vLLM where it is installed")
    p.add_argument("--adapter", action="append", default=[], metavar="NAME=DIR",
                   help="a LoRA, DoRA or prompt-tuning adapter over --model (unmerged, hf backend), answered with "
                        "after /model NAME; repeatable, to compare adapters in one conversation on one loaded base")
    p.add_argument("--system", default=None, help="system prompt to start with")
    p.add_argument("--max-new-tokens", type=int, default=512,
                   help="tokens per answer at most (fewer when the conversation nears the model's context)")
    # defaults as llama.cpp's: varied but coherent answers; as in `lmforge serve`, temperature 0 means greedy
    p.add_argument("--temperature", type=float, default=0.8, help="sampling temperature (0 = greedy)")
    p.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling: keep the smallest set with this mass")
    p.add_argument("--top-k", type=int, default=40, help="sample among the k most likely tokens (0 = all)")
    p.add_argument("--stop", action="append", default=[], metavar="TEXT",
                   help="stop string (repeatable); the answer ends before it")
    p.add_argument("--seed", type=int, default=None,
                   help="sampling seed (answer k uses seed + k, so a replayed session repeats); none = a fresh "
                        "seed per answer")
    p.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float32", "float16"],
                   help="weights dtype; auto = bfloat16 where the CPU/GPU runs it fast, else float32")
    return p


def run(args) -> int:
    import signal
    import sys
    import warnings

    # ^C stops an answer (KeyboardInterrupt). Python raises it only if SIGINT was not ignored when it started, and
    # an ignored SIGINT is inherited from whatever launched the chat (a test runner, a script): take it back.
    signal.signal(signal.SIGINT, signal.default_int_handler)

    from lmforge.errors import ConfigError
    from lmforge.inference.adapter_set import parse_adapter_flags
    from lmforge.inference.backends import load_backend
    from lmforge.inference.chat import HELP, Chat, open_answers
    from lmforge.inference.generate import GenerationOptions

    opts = GenerationOptions(max_new_tokens=args.max_new_tokens, do_sample=args.temperature > 0,
                             temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, stop=args.stop)
    opts.check()
    if not args.debug:  # the libraries' deprecation notices would land in the middle of the conversation
        warnings.simplefilter("ignore", FutureWarning)
    if sys.stdin.isatty():
        import readline  # noqa: F401  (input() then edits lines and recalls earlier ones with the arrow keys)
    adapters = parse_adapter_flags(args.adapter)
    if adapters and args.backend != "hf":
        raise ConfigError("--adapter: with --backend hf only")
    answers = open_answers(load_backend(args.backend, args.model, args.dtype), adapters)
    try:
        chat = Chat(answers, opts, system=args.system, seed=args.seed)
        print(f"lmforge chat with {args.model} ({args.backend}). {HELP}.", flush=True)
        return chat.run()
    finally:
        answers.close()
