"""`lmforge train CONFIG [key=value ...]`"""

from __future__ import annotations

from lmforge.config import iter_fields, load_config
from lmforge.distributed import launch


def config_reference() -> str:
    lines = ["config keys (YAML sections; override any with dotted.key=value):"]
    for key, tp, default, help in iter_fields():
        lines.append(f"  {key:<38} {help} [default: {default!r}]")
    return "\n".join(lines)


def add_parser(sub, formatter):
    p = sub.add_parser("train", help="train with the method named in the config", formatter_class=formatter,
                       epilog=config_reference())
    p.add_argument("config", help="YAML config file")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.learning_rate=1e-5")
    launch.add_arguments(p)
    return p


def run(args) -> int:
    cfg = load_config(args.config, args.overrides)
    if launch.wants_launch(args):  # --nproc-per-node: run this command again under torchrun
        return launch.relaunch(args, cfg)
    from lmforge.distributed import strategy  # torch and transformers load here, not for --help
    from lmforge.methods import get_method
    from lmforge.training.estimate_report import log_at_start
    from lmforge.training.run import planned

    _, run_plan = planned(cfg)  # method x architecture x engine x layout (plan.py); the method logs it at start
    log_at_start(cfg, args.config)  # one line: predicted peak memory, tokens/s, run time; output_dir/estimate.json
    get_method(run_plan.module)(cfg)
    strategy.teardown()
    return 0
