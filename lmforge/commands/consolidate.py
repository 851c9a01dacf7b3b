"""`lmforge consolidate CHECKPOINT --output DIR`"""

from __future__ import annotations

from lmforge.errors import ConfigError


def add_parser(sub, formatter):
    p = sub.add_parser("consolidate", formatter_class=formatter,
                       help="turn a sharded (FSDP / DeepSpeed ZeRO) checkpoint into a plain HF model or adapter")
    p.add_argument("checkpoint", help="a checkpoint-STEP directory written by lmforge train, or its URL in the "
                                      "output_dir's bucket (s3://..., any fsspec URL)")
    p.add_argument("--output", required=True, help="directory for the model (or adapter) and its tokenizer")
    return p


def run(args) -> int:
    from pathlib import Path

    from lmforge.distributed.consolidate import checkpoint_kind, consolidate

    from lmforge import cloud

    if cloud.is_remote(args.checkpoint) and not cloud.is_complete(args.checkpoint):
        raise ConfigError(f"CHECKPOINT: {args.checkpoint} has no {cloud.MARKER}: its upload was cut off (or a "
                          "node's part is missing), so it is not a complete checkpoint; take an earlier one")
    checkpoint = cloud.local_input(args.checkpoint, "CHECKPOINT")  # a URL: downloaded into the cache once
    kind = checkpoint_kind(Path(checkpoint))
    with cloud.local_output(args.output, "--output", directory=True) as target:
        consolidate(checkpoint, target)
    print(f"[lmforge] {kind} checkpoint {args.checkpoint} -> {args.output}")
    return 0
