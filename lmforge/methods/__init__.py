"""The recipes: one module per training method (its objective, its defaults, how it builds its trainer).

Which module trains a config is the plan's decision (``lmforge.plan``, from the registry in
``lmforge.registry``); each module exposes ``train(cfg) -> output_dir``. The library (config, data, models,
training, inference) never imports this package: recipes import the library, never the reverse.
"""

from __future__ import annotations

import importlib


def get_method(module: str):
    """``train(cfg)`` of ``lmforge.methods.<module>`` (``RunPlan.module``)."""
    return importlib.import_module(f"lmforge.methods.{module}").train
