"""The `lmforge` command: parses arguments and calls the library. Each command lives in lmforge/commands/."""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from lmforge import __version__
from lmforge.errors import LmforgeError

# Each module defines add_parser(subparsers) and run(args) -> int | None.
COMMAND_MODULES = [
    "lmforge.commands.train",
    "lmforge.commands.data",
    "lmforge.commands.generate",
    "lmforge.commands.serve",
    "lmforge.commands.chat",
    "lmforge.commands.eval",
    "lmforge.commands.merge",
    "lmforge.commands.consolidate",
    "lmforge.commands.export",
    "lmforge.commands.launch",
    "lmforge.commands.estimate",
]


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    pass


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lmforge", formatter_class=_Formatter,
        description="Pretrain, fine-tune and preference-tune language models from one config file.",
    )
    parser.add_argument("--version", action="version", version=f"lmforge {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name == name:
                continue
            raise
        p = module.add_parser(sub, _Formatter)
        p.add_argument("--debug", action="store_true", help="show full tracebacks")
        p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # lmforge shows its own progress (training, generation); the libraries' per-file bars are noise here
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    try:
        return int(args._run(args) or 0)
    except LmforgeError as e:
        if args.debug:
            raise
        # one write, not print's two: the ranks of a multi-process run share stderr, and their lines must not merge
        sys.stderr.write(f"lmforge: error: {e}\n")
        sys.stderr.flush()
        return e.exit_code
    except KeyboardInterrupt:
        print("lmforge: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
