"""`lmforge export --model DIR --format gguf [--quant Q] --output FILE.gguf`: write a model for other runtimes."""

from __future__ import annotations


def add_parser(sub, formatter):
    p = sub.add_parser("export", help="write a model (or an adapter merged on the fly) as GGUF or merged safetensors",
                       formatter_class=formatter,
                       description="--format gguf writes one file for llama.cpp-family runtimes (llama.cpp, Ollama, "
                                   "LM Studio) with the tokenizer and chat template inside; Llama, SmolLM2, Mistral "
                                   "and Qwen2 models. --format safetensors merges an adapter into a plain model "
                                   "directory, as `lmforge merge` does.")
    p.add_argument("--model", required=True, help="model directory, adapter directory, .gguf file or model alias")
    p.add_argument("--format", default="safetensors", choices=["safetensors", "gguf"], help="what to write")
    p.add_argument("--quant", default=None, choices=["f16", "bf16", "q8_0", "q4_0"],
                   help="GGUF weight type (default f16); norms stay float32, and q4_0 keeps the embeddings and "
                        "output head at q8_0")
    p.add_argument("--output", required=True,
                   help="FILE.gguf for gguf, a directory for safetensors; an existing one is refused unless --overwrite")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    return p


def run(args) -> int:
    from lmforge.inference.export import export_model

    out = export_model(args.model, args.output, args.format, args.quant, overwrite=args.overwrite)
    print(f"exported {args.model} as {args.format}{' ' + (args.quant or 'f16') if args.format == 'gguf' else ''} "
          f"to {out}")
    return 0
