"""Runs that stop on purpose lose nothing (issue 12): SIGTERM/SIGINT checkpoint at the current step and exit 1
with how to resume, and the resumed run equals an uninterrupted one bitwise; a second signal leaves at once with
the last checkpoint; a NaN loss stops before its update (the last checkpoint stays the last good state), or with
``train.on_nan: skip_batch`` that step makes no update and the skips are counted in metrics.jsonl.

The single-process tests run the HF engine in this process: a hooked ``compute_loss`` sends the signal (a real
``os.kill``) or poisons the loss in the middle of a chosen step. The native engine's own single-process SIGTERM
and kill -9 tests are in test_native.py; the 2-process test (slow) runs both engines under torchrun.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import base_config, chat_rows, write_config, write_jsonl
from safetensors.torch import load_file

from lmforge.cli import main
from lmforge.config import load_config


# ------------------------------------------------------------------------------------------- helpers
@pytest.fixture()
def at_step(monkeypatch):
    """``at_step[k] = action`` runs ``action(loss)`` in training step k's loss (either engine, no accumulation);
    it returns the loss to use. Any SIGTERM that nothing else handles fails the test instead of killing pytest."""
    from lmforge.methods.sft import CausalLMObjective, CausalLMTrainer

    actions = StepActions()
    real, real_native = CausalLMTrainer.compute_loss, CausalLMObjective.loss

    def act(model, loss):
        if model.training:  # a training step (evaluation runs in eval mode)
            actions.calls += 1
            if actions.calls in actions:
                loss = actions[actions.calls](loss)
        return loss

    def hooked(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        return act(model, real(self, model, inputs, return_outputs, num_items_in_batch))

    def hooked_native(self, model, batch):
        loss, stats = real_native(self, model, batch)
        return act(model, loss), stats

    def unhandled(signum, frame):
        raise AssertionError(f"{signal.Signals(signum).name} reached no lmforge handler")

    monkeypatch.setattr(CausalLMTrainer, "compute_loss", hooked)
    monkeypatch.setattr(CausalLMObjective, "loss", hooked_native)
    old = signal.signal(signal.SIGTERM, unhandled)
    yield actions
    signal.signal(signal.SIGTERM, old)


class StepActions(dict):
    calls = 0

    def reset(self) -> None:
        """Nothing more happens; step counting starts again (for the next run in this process)."""
        self.clear()
        self.calls = 0


def _kill(*signals):
    def action(loss):
        for s in signals:
            os.kill(os.getpid(), s)
        return loss

    return action


def _nan(loss):
    return loss * float("nan")


def _metrics(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def _checkpoints(out: Path) -> list[str]:
    return sorted(p.name for p in out.glob("checkpoint-*"))


def _equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _step_origins(cfg_path: Path, model_dir: Path, step: int) -> list[str]:
    """The source lines a step trains on, worked out apart from either engine: both take step k's rows from the
    seeded permutation of the prepared rows (``EpochSampler``), per_device_train_batch_size at a time (1 process,
    no accumulation); ``of_rows`` turns them into file:line (its own test is in test_prepare_scale.py)."""
    from lmforge.data.origins import of_rows
    from lmforge.data.split import prepare_split
    from lmforge.models import load_tokenizer
    from lmforge.training.checkpoint import EpochSampler

    cfg = load_config(cfg_path)
    ds, _, _ = prepare_split(cfg, load_tokenizer(cfg.model, model_dir), "train", packed=True)
    B = cfg.train.per_device_train_batch_size
    return of_rows(ds, sorted(list(EpochSampler(len(ds), cfg.train.seed))[(step - 1) * B:step * B]))


def _sections(engine="hf", **train) -> dict:
    # LoRA dropout: the RNG state must survive the stop too
    return dict(train={"engine": engine, "max_steps": 6, "save_steps": 4, "per_device_train_batch_size": 2, **train},
                peft={"kind": "lora", "r": 4, "dropout": 0.1})


# ------------------------------------------------------------------------------------------- signals
def test_sigterm_checkpoints_the_current_step_and_resumes_bitwise(tmp_path, tiny_model_dir, lmforge_cache,
                                                                  at_step, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", chat_rows(24))
    stop = write_config(tmp_path / "stop.yaml", base_config(tiny_model_dir, data, tmp_path / "stop", **_sections()))
    full = write_config(tmp_path / "full.yaml", base_config(tiny_model_dir, data, tmp_path / "full", **_sections()))
    at_step[3] = _kill(signal.SIGTERM)  # arrives during step 3's forward
    assert main(["train", str(stop)]) == 1
    err = capsys.readouterr().err
    assert err.count("lmforge: error:") == 1 and "Traceback" not in err
    assert "stopped by SIGTERM at step 3 of 6; checkpoint-3 is in" in err and "train.resume: auto" in err
    out = tmp_path / "stop"
    assert _checkpoints(out) == ["checkpoint-3"]  # at the step it stopped, not only at save_steps
    assert not (out / "adapter_model.safetensors").exists()  # no final model from a stopped run
    at_step.reset()
    assert main(["train", str(stop)]) == 0  # resume: auto
    assert main(["train", str(full)]) == 0
    assert _equal(load_file(tmp_path / "full" / "adapter_model.safetensors"),
                  load_file(out / "adapter_model.safetensors"))
    losses = [[(r["step"], r["loss"]) for r in _metrics(tmp_path / run) if "loss" in r] for run in ("full", "stop")]
    assert losses[0] == losses[1] and len(losses[0]) == 6


def test_a_second_signal_exits_at_once_leaving_the_last_checkpoint(tmp_path, tiny_model_dir, lmforge_cache,
                                                                   at_step, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", chat_rows(24))
    cfg = write_config(tmp_path / "c.yaml", base_config(tiny_model_dir, data, tmp_path / "out",
                                                        **_sections(save_steps=2)))
    at_step[3] = _kill(signal.SIGTERM, signal.SIGINT)
    assert main(["train", str(cfg)]) == 130
    assert "lmforge: interrupted" in capsys.readouterr().err
    out = tmp_path / "out"
    assert _checkpoints(out) == ["checkpoint-2"]  # step 3 never finished, nothing half-written took a name
    assert (out / "checkpoint-2" / "adapter_model.safetensors").exists()
    assert max(r["step"] for r in _metrics(out)) == 2


def test_a_signal_acts_only_once_every_rank_knows_it(tmp_path):
    """A signal that lands after the step's all-reduce waits for the next step: acting on it at once would send
    this rank alone into the checkpoint's barriers (a deadlock under DDP)."""
    from types import SimpleNamespace

    from transformers import TrainerControl

    from lmforge.training.stopping import StepGuard

    guard = StepGuard("stop", str(tmp_path))
    args, state = SimpleNamespace(device="cpu", output_dir=str(tmp_path)), SimpleNamespace(global_step=4, max_steps=9)
    with guard.signals():
        guard.on_pre_optimizer_step(args, state, TrainerControl())  # step 5's all-reduce: nothing pending
        os.kill(os.getpid(), signal.SIGTERM)  # then the signal, during the optimizer step
        control = TrainerControl()
        guard.on_step_end(args, state, control)
        assert not control.should_save and not control.should_training_stop
        guard.on_pre_optimizer_step(args, state, TrainerControl())  # step 6's all-reduce carries it
        guard.on_step_end(args, state, control)
        assert control.should_save and control.should_training_stop


# ------------------------------------------------------------------------------------------- NaN
@pytest.mark.parametrize("engine", ["hf", "native"])
def test_nan_loss_stops_naming_the_step_and_keeps_the_last_checkpoint(engine, tmp_path, tiny_model_dir, lmforge_cache,
                                                                      at_step, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", chat_rows(24))
    cfg = write_config(tmp_path / "c.yaml", base_config(tiny_model_dir, data, tmp_path / "out",
                                                        **_sections(engine, save_steps=2)))
    at_step[3] = _nan
    assert main(["train", str(cfg)]) == 1
    err = capsys.readouterr().err
    assert err.count("lmforge: error:") == 1 and "Traceback" not in err
    assert "step 3: the loss is not finite" in err and "train.on_nan: skip_batch" in err
    # the step's rows by the source lines of their samples (per_device_train_batch_size 2: two packed rows)
    named = re.search(r"on rows from (.*?); stopping before the update", err)[1].split(", ")
    assert named == _step_origins(cfg, tiny_model_dir, step=3)
    assert len(named) >= 2 and all(re.fullmatch(rf"{re.escape(str(data))}:([1-9]|1\d|2[0-4])", o) for o in named)
    out = tmp_path / "out"
    assert _checkpoints(out) == ["checkpoint-2"]  # nothing written after the NaN
    assert not (out / "adapter_model.safetensors").exists()
    assert max(r["step"] for r in _metrics(out)) == 2


@pytest.mark.parametrize("engine", ["hf", "native"])
def test_skip_batch_makes_no_update_and_counts_the_skips(engine, tmp_path, tiny_model_dir, lmforge_cache, at_step):
    data = write_jsonl(tmp_path / "d.jsonl", chat_rows(24))
    cfg = write_config(tmp_path / "c.yaml", base_config(tiny_model_dir, data, tmp_path / "out",
                                                        **_sections(engine, max_steps=5, save_steps=1,
                                                                    on_nan="skip_batch")))
    at_step[3] = _nan
    assert main(["train", str(cfg)]) == 0
    out = tmp_path / "out"
    rows = {r["step"]: r for r in _metrics(out) if "skipped_batches" in r}
    assert [rows[s]["skipped_batches"] for s in range(1, 6)] == [0, 0, 1, 1, 1]
    w = {s: load_file(out / f"checkpoint-{s}" / "adapter_model.safetensors") for s in (2, 3, 4)}
    assert _equal(w[2], w[3])  # step 3 changed nothing ...
    assert not _equal(w[3], w[4])  # ... and training went on
    opt = {s: torch.load(out / f"checkpoint-{s}" / "optimizer.pt", weights_only=True)["state"] for s in (2, 3)}
    assert all(_equal(opt[2][i], opt[3][i]) for i in opt[2])  # nor the optimizer's moments and step count
    # the count survives a resume
    at_step.reset()
    assert main(["train", str(cfg), "train.max_steps=6"]) == 0
    assert {r["step"]: r for r in _metrics(out) if "skipped_batches" in r}[6]["skipped_batches"] == 1


def test_skip_batch_is_refused_with_deepspeed(tmp_path, tiny_model_dir, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", chat_rows(4))
    cfg = write_config(tmp_path / "c.yaml", base_config(tiny_model_dir, data, tmp_path / "out"))
    assert main(["train", str(cfg), "train.on_nan=skip_batch", "train.distributed=deepspeed",
                 "train.deepspeed=zero2"]) == 2
    assert "train.on_nan: skip_batch cannot run with train.distributed: deepspeed" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------- 2 processes
@pytest.mark.slow
@pytest.mark.parametrize("engine, launcher", [("hf", "lmforge"), ("native", "torchrun")])
def test_sigterm_to_a_two_process_run_checkpoints_every_rank_and_resumes_bitwise(tmp_path, tiny_model_dir, engine,
                                                                                 launcher):
    """The SIGTERM goes to the launcher (`lmforge train --nproc-per-node 2`, or a user's own torchrun), which
    passes it to both workers; they agree on the step through their all-reduce, both write their part of the
    checkpoint, both exit 1 saying how to resume, and the resumed run equals an uninterrupted one bitwise."""
    env = {**os.environ, "LMFORGE_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    data = write_jsonl(tmp_path / "d.jsonl", chat_rows(96))
    sections = dict(train={"engine": engine, "distributed": "ddp", "max_steps": 40, "save_steps": 100,
                           "logging_steps": 1, "per_device_train_batch_size": 1},
                    peft={"kind": "lora", "r": 4, "dropout": 0.1})
    stop = write_config(tmp_path / "stop.yaml", base_config(tiny_model_dir, data, tmp_path / "stop", **sections))
    full = write_config(tmp_path / "full.yaml", base_config(tiny_model_dir, data, tmp_path / "full", **sections))
    cmd = ([sys.executable, "-m", "lmforge", "train", "--nproc-per-node", "2"] if launcher == "lmforge" else
           [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "lmforge",
            "train"])
    proc = subprocess.Popen(cmd + [str(stop)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "stop" / "metrics.jsonl"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and proc.poll() is None:  # mid-epoch: some steps done, most to go
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 3:
            break
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode != 0, err[-3000:]
    stopped = [int(n) for n in re.findall(r"lmforge: error: stopped by SIGTERM at step (\d+)", err)]
    assert len(stopped) == 2 and stopped[0] == stopped[1], err[-3000:]  # both ranks, at the same step
    step = stopped[0]
    assert 3 <= step < 40, "the run ended before the signal; nothing was tested"
    ckpt = tmp_path / "stop" / f"checkpoint-{step}"
    assert sorted(p.name for p in ckpt.glob("rng_state_*.pth")) == ["rng_state_0.pth", "rng_state_1.pth"]
    assert not (tmp_path / "stop" / "adapter_model.safetensors").exists()
    for cfg in (stop, full):
        done = subprocess.run(cmd + [str(cfg)], env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
    assert _equal(load_file(tmp_path / "full" / "adapter_model.safetensors"),
                  load_file(tmp_path / "stop" / "adapter_model.safetensors"))
    losses = [[(r["step"], r["loss"]) for r in _metrics(tmp_path / run) if "loss" in r] for run in ("full", "stop")]
    assert losses[0] == losses[1] and len(losses[0]) == 40
