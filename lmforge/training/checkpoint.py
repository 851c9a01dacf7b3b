"""Checkpoints: atomic writes, resume resolution, and the seeded sampler that makes resume exact.

``LmforgeTrainerMixin`` goes in front of any HF ``Trainer`` subclass (ours or TRL's) and changes three
things the stock Trainer gets wrong for us:
  * checkpoints are written into ``output_dir/.staging`` and renamed into place, so a crash mid-write
    never replaces (or masquerades as) the last good checkpoint;
  * the training order comes from a seeded per-epoch permutation (``EpochSampler``), so a resumed run
    replays exactly the batches an uninterrupted run would have seen;
  * the resolved config is written beside every checkpoint.

The final model goes the same way (``save_final_atomically``), and a full disk while writing either becomes
a ``TrainingError`` that says how much space was needed, after removing the partial write.
"""

from __future__ import annotations

from dataclasses import dataclass

import contextlib
import errno
import os
import random
import re
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from lmforge import cloud
from lmforge.cloud import STAGING
from lmforge.data.origins import ROWS
from lmforge.distributed.ranks import local_rank
from lmforge.errors import ConfigError, TrainingError
from lmforge.training.optim import hf_scheduler, optimizer_cls_and_kwargs

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
FINAL = "final"  # output_dir/.staging/final: the final model while it is written
# A final model's own files: those of an earlier final model that the new one lacks are removed when it is
# published (a full model replaced by an adapter must not leave config.json + model.safetensors beside it).
MODEL_FILES = ("config.json", "generation_config.json", "model.safetensors", "model-*-of-*.safetensors",
               "model.safetensors.index.json", "pytorch_model*.bin", "adapter_config.json", "adapter_model.*")
_DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
_LOW_SPACE = 64 * 2**20  # bytes; less than this free right after a failed write means the disk filled up


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


def move_aside_old_run(output_dir: str | Path) -> Path | None:
    """``train.resume: never`` into a directory that holds checkpoints of an earlier run: move them (complete
    or not) and that run's metrics.jsonl into ``output_dir/previous-run-TIMESTAMP/``, where nothing reads
    them, so nothing is lost and a later ``train.resume: auto`` can never resume a stale checkpoint. Returns
    that directory, or None when there was nothing to move."""
    root = Path(output_dir)
    old = sorted(p for p in root.iterdir() if CHECKPOINT_RE.match(p.name) and p.is_dir()) if root.is_dir() else []
    if not old:
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S")
    aside, n = root / f"previous-run-{stamp}", 1
    while aside.exists():
        n += 1
        aside = root / f"previous-run-{stamp}-{n}"
    aside.mkdir()
    for p in old + [p for p in [root / "metrics.jsonl"] if p.exists()]:
        os.replace(p, aside / p.name)
    return aside


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


def node_main(root: Path, is_main: bool) -> bool:
    """Whether this process looks after its node's copy of output_dir ``root``: an output_dir URL trains in a
    mirror on each node (no shared disk), looked after by each node's local rank 0; a local output_dir is one
    directory, looked after by global rank 0 (several nodes must share it)."""
    return local_rank() == 0 if cloud.remote_of(root) else is_main


def _write_staged(staged: Path, write, barrier, is_main: bool, disk_full, mine: bool | None = None) -> None:
    """Empty ``staged`` and ``write`` into it on every rank. On a failure ``disk_full(e)`` raises its clear
    error if the disk is full; either way the partial write is removed and nothing takes a real name.
    ``mine``: this process makes ``staged`` on its node (``node_main``; default ``is_main``)."""
    mine = is_main if mine is None else mine
    if mine:
        shutil.rmtree(staged, ignore_errors=True)  # left over from a crash
        staged.mkdir(parents=True)
    barrier()
    try:
        write(staged)
    except BaseException as e:
        disk_full(e)
        if mine:
            shutil.rmtree(staged, ignore_errors=True)
        raise
    barrier()  # every rank has written its part


def write_checkpoint_atomically(root: Path, name: str, write, barrier, is_main: bool,
                                save_total_limit: int | None = None) -> Path:
    """Write checkpoint ``name`` through ``write(staging_dir)`` (called on every rank), then rename it into
    ``root/name`` only once every rank is done: a crash or a full disk mid-write leaves the previous
    checkpoints as they were and no half-written one under a checkpoint name. For an output_dir URL each
    node then uploads its ranks' part and global rank 0 writes the marker last (``publish_checkpoint``).
    Used by the native engine; ``LmforgeTrainerMixin`` does the same around the Trainer's own writer."""
    staged, final = root / STAGING / name, root / name

    def disk_full(e: BaseException) -> None:
        previous = complete_checkpoints(root)
        _raise_if_disk_full(e, f"{name} in {root}", root, staged, is_main,
                            expected=dir_size(previous[-1]) if previous else None,
                            kept=f"{previous[-1].name} is intact" if previous else "no earlier checkpoint exists")

    if is_main:
        cloud.clear_remote_checkpoint(root, name)  # a cut-off upload of this name: none of its parts may stay
    _write_staged(staged, write, barrier, is_main, disk_full, mine=node_main(root, is_main))

    def rotate() -> None:
        if save_total_limit:
            for stale in _checkpoint_dirs(root)[:-save_total_limit]:
                shutil.rmtree(stale, ignore_errors=True)

    publish_checkpoint(root, name, barrier, is_main, rotate)
    return final


def _checkpoint_dirs(root: Path) -> list[Path]:
    """Every ``checkpoint-N`` directory in step order: on a node other than the first, a mirror holds only
    its ranks' part of each (no trainer_state.json), and rotates them all the same."""
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := CHECKPOINT_RE.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def publish_checkpoint(root: Path, name: str, barrier, is_main: bool, rotate) -> None:
    """After every rank wrote its part of ``root/.staging/name``: rename it into place and ``rotate()`` older
    checkpoints (on each node that holds a copy); for an output_dir URL each node uploads its part, and once
    all have (a barrier), global rank 0 writes the marker (``cloud.py``). Every rank calls this."""
    if node_main(root, is_main):
        publish(root / STAGING / name, root / name)
        rotate()
        cloud.upload_checkpoint_part(root / name)
    barrier()  # every node's part is in the bucket
    if is_main:
        cloud.complete_checkpoint(root / name)
    barrier()


def save_final_atomically(root: Path, write, barrier, is_main: bool, expected_bytes: int | None = None) -> Path:
    """Write the final model (or adapter) and tokenizer through ``write(staging_dir)`` (called on every rank),
    then move the files to the top of ``root`` only once every rank is done. A crash or a full disk mid-write
    leaves an earlier final model in ``root`` (and every checkpoint) as it was. Used by both engines.

    Each file arrives by ``os.replace`` (atomic per file, and needs no new space); files of an earlier final
    model that this one lacks (``MODEL_FILES``) are removed afterwards."""
    root = Path(root)
    staged = root / STAGING / FINAL

    def disk_full(e: BaseException) -> None:
        ckpts = complete_checkpoints(root)
        kept = (f"the final model was not written (an earlier one in {root} is as it was); the newest checkpoint "
                f"is {ckpts[-1].name}" if ckpts else "the final model was not written and no checkpoint exists")
        _raise_if_disk_full(e, f"the final model in {root}", root, staged, is_main, expected_bytes, kept)

    _write_staged(staged, write, barrier, is_main, disk_full, mine=node_main(root, is_main))
    if is_main:
        new = {p.name for p in staged.iterdir()}
        for p in sorted(staged.iterdir()):
            if p.is_dir() and (root / p.name).is_dir():
                shutil.rmtree(root / p.name)
            os.replace(p, root / p.name)
        for pattern in MODEL_FILES:
            for old in root.glob(pattern):
                if old.name not in new and old.is_file():
                    old.unlink()
        shutil.rmtree(root / STAGING, ignore_errors=True)
    barrier()
    return root


def weights_bytes(model) -> int:
    """About what a final save of ``model`` writes: its trainable parameters (an adapter's) or all of them
    (a full model), in fp32 as both engines save them (fp32 masters, PEFT's fp32 adapter weights)."""
    from peft import PeftModel

    adapter = isinstance(model, PeftModel)
    return 4 * sum(p.numel() for p in model.parameters() if p.requires_grad or not adapter)


def dir_size(path: Path) -> int:
    total = 0
    for dirpath, _, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(dirpath, f)).st_size
            except OSError:
                pass
    return total


def _human(n: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def is_disk_full(exc: BaseException, where: Path) -> bool:
    """Whether ``exc`` (raised while writing under ``where``) means the disk or quota is full.

    A full disk reaches us in several shapes: ``OSError(ENOSPC)`` from Python, safetensors' SafetensorError
    "... No space left on device (os error 28)", and ``torch.save``'s RuntimeError "unexpected pos N vs M"
    with no errno at all (measured on a full tmpfs). So: an errno or its text anywhere in the exception chain,
    or a write error with (almost) no space left right after it."""
    e: BaseException | None = exc
    while e is not None:
        if getattr(e, "errno", None) in _DISK_FULL_ERRNOS or any(os.strerror(n) in str(e) for n in _DISK_FULL_ERRNOS):
            return True
        e = e.__cause__ or e.__context__
    if not isinstance(exc, (OSError, RuntimeError)):
        return False
    try:
        return shutil.disk_usage(where).free < _LOW_SPACE
    except OSError:
        return False


def _raise_if_disk_full(exc: BaseException, what: str, root: Path, staged: Path, is_main: bool,
                        expected: int | None, kept: str) -> None:
    """If ``exc`` is a full disk: remove the partial write and raise a TrainingError saying what it needs."""
    if not is_disk_full(exc, staged if staged.exists() else root):
        return
    written = dir_size(staged)
    if is_main:
        shutil.rmtree(staged, ignore_errors=True)
        with contextlib.suppress(OSError):
            staged.parent.rmdir()  # output_dir/.staging, when nothing else is in it
    try:
        free = shutil.disk_usage(root).free
    except OSError:
        free = 0
    needed = f"about {_human(max(expected, written))}" if expected else f"more than {_human(written)}"
    raise TrainingError(
        f"disk full while writing {what}: it needs {needed}, and {_human(free)} are free after removing the "
        f"partial write ({_human(written)} had been written); {kept}. Free some space (or lower "
        "train.save_total_limit), then run the same command again: train.resume: auto continues from the newest "
        "checkpoint") from None


@dataclass
class TrainerHooks:
    """What lmforge hands a Transformers/TRL trainer, in its constructor (``run.trainer_hooks`` builds it)."""

    config_yaml: str  # the resolved config, written into each checkpoint
    optim: str  # train.optim; lmforge's own optimizers (lamb) are built here, see optim.py
    guard: object  # stopping.StepGuard: sees every micro-batch loss (train.on_nan), stop signals, adds to the logs
    counter: object  # callbacks.TokenCounter: the trainer adds the tokens it trains on (tokens/s)
    callbacks: list  # OutputsCallback (metrics.jsonl, plots, progress) and the guard


class LmforgeTrainerMixin:
    """Atomic checkpoints + exact-resume sampler for any transformers.Trainer subclass; ``lmforge=`` (a
    ``TrainerHooks``) is a constructor argument, and its callbacks go before the caller's."""

    _staging = False

    def __init__(self, *args, lmforge: TrainerHooks, **kwargs):
        self.lmforge = lmforge
        kwargs["callbacks"] = [*lmforge.callbacks, *(kwargs.get("callbacks") or [])]
        super().__init__(*args, **kwargs)

    def training_step(self, model, inputs, num_items_in_batch=None):
        rows = inputs.pop(ROWS, None)  # the batch's dataset rows, where its collator names them: for the NaN stop
        loss = super().training_step(model, inputs, num_items_in_batch)
        self.lmforge.guard.add_loss(loss, rows)
        return loss

    def log(self, logs, *args, **kwargs):
        self.lmforge.guard.add_to_log(logs)
        super().log(logs, *args, **kwargs)

    def _get_output_dir(self, trial):
        out = super()._get_output_dir(trial)
        return os.path.join(out, STAGING) if self._staging else out

    def _save_checkpoint(self, model, trial):
        root = super()._get_output_dir(trial)
        name = f"checkpoint-{self.state.global_step}"
        staged = os.path.join(root, STAGING, name)
        is_main = self.args.should_save
        if is_main:
            cloud.clear_remote_checkpoint(Path(root), name)  # a cut-off upload of this name
        if node_main(Path(root), is_main):  # each node's mirror of an output_dir URL has its own staging
            shutil.rmtree(staged, ignore_errors=True)  # left over from a crash
            os.makedirs(staged)
        self.accelerator.wait_for_everyone()
        self._staging = True
        try:
            super()._save_checkpoint(model, trial)
        except BaseException as e:
            previous = complete_checkpoints(root)
            _raise_if_disk_full(e, f"{name} in {root}", Path(root), Path(staged), is_main,
                                expected=dir_size(previous[-1]) if previous else None,
                                kept=f"{previous[-1].name} is intact" if previous else "no earlier checkpoint exists")
            raise
        finally:
            self._staging = False
        self.accelerator.wait_for_everyone()  # every rank has written its shards
        if is_main:
            Path(staged, "config.yaml").write_text(self.lmforge.config_yaml)

        def rotate() -> None:
            from transformers.trainer_utils import rotate_checkpoints

            rotate_checkpoints(output_dir=root, save_total_limit=self.args.save_total_limit,
                               best_model_checkpoint=self.state.best_model_checkpoint, use_mtime=False)

        publish_checkpoint(Path(root), name, self.accelerator.wait_for_everyone, is_main, rotate)

    def create_optimizer(self, model=None):
        if self.optimizer is None and getattr(self, "optimizer_cls_and_kwargs", None) is None:
            self.optimizer_cls_and_kwargs = optimizer_cls_and_kwargs(self.lmforge.optim, self.args)
        return super().create_optimizer(model)

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        """The HF schedules by name, with the defaults they lack (see optim.scheduler_kwargs)."""
        if self.lr_scheduler is None:
            self.lr_scheduler = hf_scheduler(self.args, optimizer or self.optimizer, num_training_steps)
        return self.lr_scheduler

    def _get_train_sampler(self, train_dataset=None):
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        return EpochSampler(len(dataset), self.args.seed)


# ------------------------------------------------------------------------------ native engine checkpoints
def read_weights(model, ckpt: Path) -> dict[str, torch.Tensor]:
    """A checkpoint's saved tensors: a PEFT adapter's, or a full model's (all its safetensors shards)."""
    from peft import PeftModel
    from safetensors.torch import load_file

    files = [ckpt / "adapter_model.safetensors"] if isinstance(model, PeftModel) else \
        sorted(ckpt.glob("model*.safetensors"))
    state = {}
    for f in files:
        state.update(load_file(str(f)))
    return state


def load_weights(model, state: dict[str, torch.Tensor], ckpt: Path) -> None:
    """Load ``read_weights`` output into ``model`` in place; names that do not match are an error."""
    from peft import PeftModel, set_peft_model_state_dict

    if isinstance(model, PeftModel):
        set_peft_model_state_dict(model, state)
        return
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {k for k in missing if k.endswith("lm_head.weight")} if getattr(model.config, "tie_word_embeddings",
                                                                           False) else set()
    if set(missing) - tied or unexpected:
        raise TrainingError(f"{ckpt}: the checkpoint does not match the model (missing {sorted(missing)[:5]}, "
                            f"unexpected {sorted(unexpected)[:5]})")


def rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "cpu": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["cpu"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
