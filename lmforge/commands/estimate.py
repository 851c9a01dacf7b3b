"""`lmforge estimate CONFIG [key=value ...] [--nproc-per-node N] [--json]`: memory, speed and run time before
anything heavy loads (lmforge/training/estimate.py)."""

from __future__ import annotations

from lmforge.config import load_config


def add_parser(sub, formatter):
    p = sub.add_parser("estimate", formatter_class=formatter,
                       help="predict peak memory per process, tokens/s, step and run time; say what to change "
                            "when it will not fit")
    p.add_argument("config", help="YAML config file")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.gradient_checkpointing=true")
    p.add_argument("--nproc-per-node", type=int, default=1, help="processes the run will use (as for train)")
    p.add_argument("--json", action="store_true", help="print one JSON object (for scripts)")
    return p


def run(args) -> int:
    from lmforge.errors import ConfigError
    from lmforge.training.estimate import run_estimate
    from lmforge.training.estimate_report import render

    if args.nproc_per_node < 1:
        raise ConfigError("--nproc-per-node must be >= 1")
    cfg = load_config(args.config, args.overrides)
    est = run_estimate(cfg, args.nproc_per_node, args.config)
    print(est.to_json() if args.json else render(est))
    return 0
