"""CLI commands: each module adds its subparser and runs by calling the library.

The library imports inside each command's functions are deliberate: ``cli.py`` imports every command module to
build the parser, so whatever one of them imports at its top, ``lmforge --help`` and every command would pay for.
Kept inside, ``--help`` loads neither torch nor transformers, and each command loads only what it runs.
"""
