"""`lmforge merge --model ADAPTER_DIR --output DIR`: fold a LoRA/DoRA adapter into its base model."""

from __future__ import annotations


def add_parser(sub, formatter):
    p = sub.add_parser("merge", help="merge a LoRA/DoRA adapter into its base and save a plain model",
                       formatter_class=formatter,
                       description="The result loads with transformers.AutoModelForCausalLM.from_pretrained(DIR) and "
                                   "holds the tokenizer too. A QLoRA adapter is merged onto the dequantised base.")
    p.add_argument("--model", required=True, help="adapter directory (with adapter_config.json)")
    p.add_argument("--output", required=True,
                   help="directory for the merged model; an existing one is replaced only if it is empty or an "
                        "earlier lmforge merge output (see --overwrite)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace --output even if it holds something else (everything in it is deleted)")
    p.add_argument("--dtype", default=None, choices=["bfloat16", "float32", "float16"],
                   help="dtype of the saved weights (default: the base model's)")
    return p


def run(args) -> int:
    from lmforge import cloud
    from lmforge.inference.merge import merge_adapter_to_dir

    with cloud.local_output(args.output, "--output", directory=True, overwrite=args.overwrite) as target:
        merge_adapter_to_dir(args.model, target, args.dtype, overwrite=args.overwrite)
    print(f"merged {args.model} into a plain model at {args.output}")
    return 0
