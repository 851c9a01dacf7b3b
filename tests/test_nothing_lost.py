"""Nothing lost (issue 12): a full disk, a stale checkpoint, `merge --output`, concurrent GGUF imports,
and an adapter's base on another machine. Each test fails on the code before these fixes."""

from __future__ import annotations

import errno
import json
import shutil
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch
import yaml

from conftest import base_config, chat_rows, write_config, write_jsonl
from lmforge.cli import main


@pytest.fixture(params=["native", "hf"])
def engine(request):
    return request.param


def _enospc(directory) -> None:
    """What a full disk does mid-save: part of a file is written, then the write fails."""
    Path(directory).mkdir(parents=True, exist_ok=True)
    (Path(directory) / "model.safetensors").write_bytes(b"\0" * 1000)
    raise OSError(errno.ENOSPC, "No space left on device")


def _config(tmp_path, tiny_model_dir, **train):
    data = write_jsonl(tmp_path / "d.jsonl", chat_rows(16))
    tree = base_config(tiny_model_dir, data, tmp_path / "out", train={"max_steps": 4, "save_steps": 2, **train})
    return write_config(tmp_path / "c.yaml", tree), tmp_path / "out"


def _fail_writes(monkeypatch, engine, when) -> None:
    """Make the engine's own weight writer hit a full disk when ``when(directory, step)`` is true."""
    if engine == "native":
        from lmforge.training.native import NativeTrainer

        real = NativeTrainer.save_model

        def save_model(self, directory, weights=None):
            return _enospc(directory) if when(Path(directory), self.step) else real(self, directory, weights)

        monkeypatch.setattr(NativeTrainer, "save_model", save_model)
    else:
        from transformers import Trainer

        real = Trainer._save

        def _save(self, output_dir=None, state_dict=None):
            if when(Path(output_dir), self.state.global_step):
                _enospc(output_dir)
            return real(self, output_dir, state_dict)

        monkeypatch.setattr(Trainer, "_save", _save)


# ------------------------------------------------------------------------------------------ disk full
def test_disk_full_during_a_checkpoint_keeps_the_previous_one(tmp_path, tiny_model_dir, lmforge_cache, engine,
                                                              monkeypatch, capsys):
    cfg, out = _config(tmp_path, tiny_model_dir, engine=engine)
    _fail_writes(monkeypatch, engine, lambda d, step: d.name == "checkpoint-4")
    assert main(["train", str(cfg)]) == 1
    err = capsys.readouterr().err
    assert "disk full while writing checkpoint-4" in err and "it needs about" in err, err
    assert "checkpoint-2 is intact" in err and "Traceback" not in err
    assert (out / "checkpoint-2" / "trainer_state.json").exists()
    assert not (out / "checkpoint-4").exists() and not (out / ".staging" / "checkpoint-4").exists()
    monkeypatch.undo()
    assert main(["train", str(cfg)]) == 0  # resume: auto continues from checkpoint-2
    assert (out / "checkpoint-4").exists()


def test_disk_full_during_the_final_save_keeps_the_earlier_final_model(tmp_path, tiny_model_dir, lmforge_cache,
                                                                       engine, monkeypatch, capsys):
    cfg, out = _config(tmp_path, tiny_model_dir, engine=engine, max_steps=2)
    out.mkdir()
    for f in tiny_model_dir.iterdir():  # an earlier run's final model
        shutil.copy(f, out / f.name)
    earlier = (out / "model.safetensors").read_bytes()
    _fail_writes(monkeypatch, engine, lambda d, step: d.name == "final")
    assert main(["train", str(cfg)]) == 1
    err = capsys.readouterr().err
    assert "disk full while writing the final model" in err and "the newest checkpoint is checkpoint-2" in err, err
    assert (out / "model.safetensors").read_bytes() == earlier  # not half-overwritten
    assert not (out / ".staging").exists()
    assert (out / "checkpoint-2" / "trainer_state.json").exists()


def test_final_save_is_staged_and_replaces_an_earlier_model_whole(tmp_path, tiny_model_dir, lmforge_cache):
    """A LoRA run into a directory holding a full model: the full model's weights must not stay beside the
    adapter (AutoModelForCausalLM would load the stale model)."""
    cfg, out = _config(tmp_path, tiny_model_dir, engine="native", max_steps=2)
    out.mkdir()
    for f in tiny_model_dir.iterdir():
        shutil.copy(f, out / f.name)
    tree = yaml.safe_load(cfg.read_text())
    tree["peft"] = {"kind": "lora", "r": 4}
    assert main(["train", str(write_config(cfg, tree))]) == 0
    assert (out / "adapter_model.safetensors").exists() and (out / "tokenizer.json").exists()
    assert not (out / "model.safetensors").exists() and not (out / "config.json").exists()
    assert not (out / ".staging").exists()


def _can_mount_tmpfs() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt"],
                           capture_output=True)
    return probe.returncode == 0


REAL_DISK_FULL = textwrap.dedent("""
    import json, sys, torch
    from pathlib import Path
    from safetensors.torch import save_file
    from lmforge.errors import TrainingError
    from lmforge.training.checkpoint import save_final_atomically, write_checkpoint_atomically

    root, result = Path(sys.argv[1]), {}
    def checkpoint(n):
        def write(d):
            torch.save({"w": torch.ones(n)}, d / "optimizer.pt")  # torch.save: no errno on a full disk
            (d / "trainer_state.json").write_text("{}")
        return write
    write_checkpoint_atomically(root, "checkpoint-1", checkpoint(10_000), lambda: None, True)
    try:
        write_checkpoint_atomically(root, "checkpoint-2", checkpoint(1_000_000), lambda: None, True)
    except TrainingError as e:
        result["checkpoint"] = str(e)
    try:
        save_final_atomically(root, lambda d: save_file({"w": torch.ones(1_000_000)}, str(d / "model.safetensors")),
                              lambda: None, True, expected_bytes=4_000_000)
    except TrainingError as e:
        result["final"] = str(e)
    result["left"] = sorted(p.name for p in root.iterdir())
    result["kept"] = torch.load(root / "checkpoint-1" / "optimizer.pt")["w"].shape[0]
    print(json.dumps(result))
""")


@pytest.mark.skipif(not _can_mount_tmpfs(), reason="needs unshare -rm to mount a small tmpfs")
def test_a_really_full_disk(tmp_path):
    """The real thing: a 1 MiB tmpfs (in a private mount namespace) fills up under torch.save and safetensors."""
    script = tmp_path / "full.py"
    script.write_text(REAL_DISK_FULL)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    cmd = f"mount -t tmpfs -o size=1m tmpfs {mnt} && exec {sys.executable} {script} {mnt}"
    run = subprocess.run(["unshare", "-rm", "sh", "-c", cmd], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert "disk full while writing checkpoint-2" in result["checkpoint"]
    assert "checkpoint-1 is intact" in result["checkpoint"]
    assert "disk full while writing the final model" in result["final"] and "about 3.8 MiB" in result["final"]
    assert result["left"] == ["checkpoint-1"]  # no staging dir, no half-written checkpoint or model
    assert result["kept"] == 10_000


# ------------------------------------------------------------------------------------------ resume: never
def test_resume_never_moves_an_older_runs_checkpoints_aside(tmp_path, tiny_model_dir, lmforge_cache):
    from lmforge.training.checkpoint import resolve_resume

    cfg, out = _config(tmp_path, tiny_model_dir, engine="native")
    assert main(["train", str(cfg)]) == 0  # checkpoint-2, checkpoint-4
    assert main(["train", str(cfg), "train.resume=never", "train.max_steps=2"]) == 0
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2"]
    aside = list(out.glob("previous-run-*"))
    assert len(aside) == 1
    assert sorted(p.name for p in aside[0].iterdir()) == ["checkpoint-2", "checkpoint-4", "metrics.jsonl"]
    resumed = resolve_resume("auto", str(out))  # what a later resume: auto would pick: this run's, not step 4
    assert json.loads(Path(resumed, "trainer_state.json").read_text())["max_steps"] == 2


# ------------------------------------------------------------------------------------------ merge --output
@pytest.fixture(scope="module")
def lora_adapter(tiny_model_dir, tmp_path_factory):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32),
                           LoraConfig(r=2, target_modules=["q_proj"], task_type="CAUSAL_LM"))
    out = tmp_path_factory.mktemp("lora")
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(out)
    return out


def test_merge_refuses_to_replace_a_directory_it_did_not_write(lora_adapter, tmp_path, capsys):
    runs = tmp_path / "runs"
    (runs / "run-a").mkdir(parents=True)
    (runs / "run-a" / "metrics.jsonl").write_text("{}\n")
    assert main(["merge", "--model", str(lora_adapter), "--output", str(runs)]) == 2
    assert "is not empty and is not a model lmforge merge wrote" in capsys.readouterr().err
    assert (runs / "run-a" / "metrics.jsonl").exists()
    # an earlier merge output is replaced without asking; --overwrite replaces anything else
    merged = tmp_path / "merged"
    assert main(["merge", "--model", str(lora_adapter), "--output", str(merged)]) == 0
    assert main(["merge", "--model", str(lora_adapter), "--output", str(merged)]) == 0
    assert main(["merge", "--model", str(lora_adapter), "--output", str(runs), "--overwrite"]) == 0
    assert (runs / "config.json").exists() and not (runs / "run-a").exists()


def test_merge_never_replaces_the_directory_holding_the_adapter(lora_adapter, tmp_path, capsys):
    parent = tmp_path / "runs"
    shutil.copytree(lora_adapter, parent / "lora")
    assert main(["merge", "--model", str(parent / "lora"), "--output", str(parent), "--overwrite"]) == 2
    assert "holds the adapter being merged" in capsys.readouterr().err
    assert (parent / "lora" / "adapter_config.json").exists()


# ------------------------------------------------------------------------------------------ GGUF import
@pytest.fixture()
def fake_gguf(tmp_path, tiny_model_dir, monkeypatch, lmforge_cache):
    """A .gguf file whose "dequantisation" copies the tiny model (slowly), counting the imports."""
    from lmforge import models

    gguf = tmp_path / "tiny.gguf"
    gguf.write_bytes(b"GGUF")
    calls = []

    def dequantise(src, out):
        calls.append(src)
        time.sleep(0.3)  # long enough for the other process to arrive mid-import
        for f in tiny_model_dir.iterdir():
            shutil.copy(f, out / f.name)

    monkeypatch.setattr(models, "_dequantise_gguf", dequantise)
    return gguf, calls


def test_concurrent_gguf_imports_import_once(fake_gguf):
    from lmforge.models import import_gguf

    gguf, calls = fake_gguf
    results, errors = [], []

    def one():
        try:
            results.append(import_gguf(gguf))
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=one) for _ in range(3)]  # flock excludes separate opens in one process too
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(set(results)) == 1 and len(calls) == 1
    assert (results[0] / "model.safetensors").exists()


def test_the_same_gguf_file_in_two_places_is_imported_once(fake_gguf, tmp_path):
    from lmforge import models

    gguf, calls = fake_gguf  # every fresh virtual environment has its own copy of the alias's file
    copy = tmp_path / "venv2" / gguf.name
    copy.parent.mkdir()
    shutil.copy(gguf, copy)
    assert models.import_gguf(gguf) == models.import_gguf(copy) and len(calls) == 1
    copy.write_bytes(b"GGUF other")  # other content: its own entry
    assert models.import_gguf(copy) != models.import_gguf(gguf) and len(calls) == 2


def test_a_crashed_gguf_import_is_never_used(fake_gguf, monkeypatch):
    from lmforge import models

    gguf, calls = fake_gguf
    good = models._dequantise_gguf

    def killed(src, out):
        (out / "config.json").write_text("{}")  # half-way
        raise KeyboardInterrupt

    monkeypatch.setattr(models, "_dequantise_gguf", killed)
    with pytest.raises(KeyboardInterrupt):
        models.import_gguf(gguf)
    root = models.cache_root() / "models"
    assert [p.name for p in root.iterdir() if not p.name.endswith(".lock") and not p.name.startswith(".digest-")] == []
    # an entry that was half written by some other means (no completion marker) is rebuilt, not used
    monkeypatch.setattr(models, "_dequantise_gguf", good)
    first = models.import_gguf(gguf)
    (first / models.IMPORTED).unlink()
    (first / "model.safetensors").write_bytes(b"truncated")
    assert models.import_gguf(gguf) == first and len(calls) == 2
    assert (first / "model.safetensors").stat().st_size > 1000


# ------------------------------------------------------------------------------------------ portable base
def test_an_adapter_trained_from_the_alias_loads_on_another_machine(tmp_path, tiny_model_dir, fake_gguf,
                                                                   monkeypatch):
    from lmforge import models

    gguf, calls = fake_gguf
    monkeypatch.setitem(models.ALIASES, "tiny-alias", ("tiny_pkg", gguf.name))
    monkeypatch.setattr(models, "_alias_file", lambda alias: gguf)
    data = write_jsonl(tmp_path / "d.jsonl", chat_rows(8))
    tree = base_config("tiny-alias", data, tmp_path / "out", peft={"kind": "lora", "r": 4},
                       train={"max_steps": 2, "save_steps": 2, "engine": "native"})
    assert main(["train", str(write_config(tmp_path / "c.yaml", tree))]) == 0
    out = tmp_path / "out"
    for d in (out, out / "checkpoint-2"):  # PEFT's own record: plain PEFT loads it on this machine (CONTRACT.md)
        recorded = json.loads((d / "adapter_config.json").read_text())["base_model_name_or_path"]
        assert Path(recorded).parent == models.cache_root() / "models" and Path(recorded).is_dir()
        assert models.adapter_base(d) == recorded
    # another machine: a different cache, this one's import gone; lmforge finds the base from the alias
    shutil.rmtree(models.cache_root())
    monkeypatch.setenv("LMFORGE_CACHE", str(tmp_path / "other-machine-cache"))
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "the quick"}])
    assert main(["generate", "--model", str(out), "--input", str(prompts), "--output", str(tmp_path / "g.jsonl"),
                 "--max-new-tokens", "2", "--no-progress"]) == 0
    assert len(calls) == 2  # imported again on the "other machine"
    assert models.adapter_base(out) == "tiny-alias"  # the missing import-cache path is read as the alias
