"""Checkpoints: atomic writes, resume resolution, and the seeded sampler that makes resume exact.

``LmforgeTrainerMixin`` goes in front of any HF ``Trainer`` subclass (ours or TRL's) and changes three
things the stock Trainer gets wrong for us:
  * checkpoints are written into ``output_dir/.staging`` and renamed into place, so a crash mid-write
    never replaces (or masquerades as) the last good checkpoint;
  * the training order comes from a seeded per-epoch permutation (``EpochSampler``), so a resumed run
    replays exactly the batches an uninterrupted run would have seen;
  * the resolved config is written beside every checkpoint.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import torch

from lmforge.errors import ConfigError

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
STAGING = ".staging"


class EpochSampler(torch.utils.data.Sampler):
    """A seeded permutation per epoch (seed + epoch); independent of the global RNG, so resume is exact."""

    def __init__(self, n: int, seed: int, shuffle: bool = True):
        self.n, self.seed, self.shuffle, self.epoch = n, seed, shuffle, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        if not self.shuffle:
            return iter(range(self.n))
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())


def complete_checkpoints(output_dir: str | Path) -> list[Path]:
    """Checkpoints in step order. Only fully written ones exist under this name (see the mixin)."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := CHECKPOINT_RE.match(p.name)) and p.is_dir()
             and (p / "trainer_state.json").exists()]
    return [p for _, p in sorted(found)]


def resolve_resume(resume: str, output_dir: str) -> str | None:
    if resume == "never":
        return None
    if resume == "auto":
        ckpts = complete_checkpoints(output_dir)
        return str(ckpts[-1]) if ckpts else None
    path = Path(resume)
    if not (path / "trainer_state.json").exists():
        raise ConfigError(f"train.resume: {resume} is not a complete checkpoint directory (no trainer_state.json)")
    return str(path)


def publish(staged: Path, final: Path) -> None:
    """Rename a whole staged checkpoint into place; re-saving a step moves the old one aside only then."""
    if final.exists():
        old = staged.with_name(staged.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(staged, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staged, final)


def write_checkpoint_atomically(root: Path, name: str, write, barrier, is_main: bool,
                                save_total_limit: int | None = None) -> Path:
    """Write checkpoint ``name`` through ``write(staging_dir)`` (called on every rank), then rename it into
    ``root/name`` only once every rank is done: a crash or a full disk mid-write leaves the previous
    checkpoints as they were and no half-written one under a checkpoint name. Used by the native engine;
    ``LmforgeTrainerMixin`` does the same around the Trainer's own writer."""
    staged, final = root / STAGING / name, root / name
    if is_main:
        shutil.rmtree(staged, ignore_errors=True)  # left over from a crash
        staged.mkdir(parents=True)
    barrier()
    try:
        write(staged)
    except BaseException:
        if is_main:
            shutil.rmtree(staged, ignore_errors=True)
        raise
    barrier()  # every rank has written its part
    if is_main:
        publish(staged, final)
        if save_total_limit:
            for stale in complete_checkpoints(root)[:-save_total_limit]:
                shutil.rmtree(stale, ignore_errors=True)
    barrier()
    return final


class LmforgeTrainerMixin:
    """Atomic checkpoints + exact-resume sampler for any transformers.Trainer subclass."""

    lmforge_config_yaml: str | None = None  # the resolved config, written into each checkpoint
    lmforge_optim: str | None = None  # train.optim; lmforge's own optimizers (lamb) are built here, see optim.py
    lmforge_guard = None  # stopping.StepGuard: sees every micro-batch loss (train.on_nan) and adds to the logs
    _staging = False

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        if self.lmforge_guard is not None:
            self.lmforge_guard.add_loss(loss)
        return loss

    def log(self, logs, *args, **kwargs):
        if self.lmforge_guard is not None:
            self.lmforge_guard.add_to_log(logs)
        super().log(logs, *args, **kwargs)

    def _get_output_dir(self, trial):
        out = super()._get_output_dir(trial)
        return os.path.join(out, STAGING) if self._staging else out

    def _save_checkpoint(self, model, trial):
        root = super()._get_output_dir(trial)
        name = f"checkpoint-{self.state.global_step}"
        staged, final = os.path.join(root, STAGING, name), os.path.join(root, name)
        if self.args.should_save and os.path.exists(staged):
            shutil.rmtree(staged)  # left over from a crash
        self.accelerator.wait_for_everyone()
        self._staging = True
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._staging = False
        self.accelerator.wait_for_everyone()  # every rank has written its shards
        if self.args.should_save:
            if self.lmforge_config_yaml:
                Path(staged, "config.yaml").write_text(self.lmforge_config_yaml)
            publish(Path(staged), Path(final))
            from transformers.trainer_utils import rotate_checkpoints

            rotate_checkpoints(output_dir=root, save_total_limit=self.args.save_total_limit,
                               best_model_checkpoint=self.state.best_model_checkpoint, use_mtime=False)
        self.accelerator.wait_for_everyone()

    def create_optimizer(self, model=None):
        from lmforge.training.optim import optimizer_cls_and_kwargs

        if self.optimizer is None and getattr(self, "optimizer_cls_and_kwargs", None) is None:
            self.optimizer_cls_and_kwargs = optimizer_cls_and_kwargs(self.lmforge_optim, self.args)
        return super().create_optimizer(model)

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        """The HF schedules by name, with the defaults they lack (see optim.scheduler_kwargs)."""
        from lmforge.training.optim import build_scheduler

        if self.lr_scheduler is None:
            self.lr_scheduler = build_scheduler(self.args, optimizer or self.optimizer, num_training_steps)
        return self.lr_scheduler

    def _get_train_sampler(self, train_dataset=None):
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        return EpochSampler(len(dataset), self.args.seed)
