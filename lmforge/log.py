"""One line of progress for the user, from the main process only: ``[lmforge] ...`` on stdout.

Its own module, at the bottom of the import graph, so that models, data and the training library can all say
what they do without importing each other."""

from __future__ import annotations

import os


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def log(msg: str) -> None:
    if is_main_process():
        print(f"[lmforge] {msg}", flush=True)
