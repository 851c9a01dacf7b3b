"""Two "nodes" on this machine that share no disk, only a bucket (moto's S3 server on 127.0.0.1): each is one
`lmforge train --nnodes 2 --node-rank R --nproc-per-node 1` with its own HOME, lmforge cache and working
directory; data, base model and output_dir are in the bucket. Every rank writes its part of a sharded
checkpoint into its node's mirror, each node uploads its part, rank 0 writes the marker last (cloud.py).

The run is killed (kill -9, both nodes) once a checkpoint is complete in the bucket; a newer checkpoint with one
rank's part missing is put beside it; two fresh nodes resume from the bucket alone, skip the half-written one,
and end equal to an uninterrupted 2-process run on one node; `lmforge consolidate s3://.../checkpoint-N` gives a
model that loads in plain transformers."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import base_config, chat_rows, write_config, write_jsonl
from safetensors.torch import load_file
from test_cloud import _keys, _upload_dir, bucket, s3_server  # noqa: F401  (fixtures)
from test_distributed import _env, _run

from lmforge import cloud
from lmforge.cli import main

psutil = pytest.importorskip("psutil")

STEPS = 8  # the first checkpoint at 2, a half-written one put at the next (4), the end at 8
# one rank's part of a checkpoint: its RNG state, its DCP optimizer shard, its ZeRO partitions
RANK_1_PART = re.compile(r"(^|/)(rng_state_1\.pth|__1_\d+\.distcp|zero_pp_rank_1_\w+\.pt)$")


def _tree(model: str, data: str, out: str, **train) -> dict:
    return base_config(model, data, out, train={"max_steps": STEPS, "save_steps": 2, "per_device_train_batch_size": 2,
                                                "lr_scheduler_type": "constant", **train})


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_nodes(cfg: Path, root: Path, port: int) -> list[tuple[subprocess.Popen, Path]]:
    """Both nodes' `lmforge train`, each in a directory of its own (HOME, cache, cwd, logs)."""
    nodes = []
    for rank in (0, 1):
        home = root / f"node{rank}"
        (home / "work").mkdir(parents=True)
        env = {**_env(home / "cache"), "HOME": str(home)}
        log = home / "log.txt"
        cmd = [sys.executable, "-m", "lmforge", "train", str(cfg), "--nnodes", "2", "--node-rank", str(rank),
               "--nproc-per-node", "1", "--master-addr", "127.0.0.1", "--master-port", str(port)]
        with open(log, "w") as fh:
            nodes.append((subprocess.Popen(cmd, env=env, cwd=home / "work", stdout=fh, stderr=subprocess.STDOUT),
                          log))
    return nodes


def _kill_9(proc: subprocess.Popen) -> None:
    """SIGKILL the node's whole tree: the launcher, torchrun (a session of its own) and the worker."""
    family = psutil.Process(proc.pid).children(recursive=True) + [psutil.Process(proc.pid)]
    for p in family:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    proc.wait(timeout=60)


def _complete(bucket: str, prefix: str) -> list[int]:
    keys = _keys(bucket, prefix)
    return sorted(int(m.group(1)) for k in keys if (m := re.fullmatch(r"checkpoint-(\d+)/\.lmforge-complete", k)))


def _half_written(bucket: str, prefix: str, step: int, new: int) -> None:
    """checkpoint-NEW: every file of checkpoint-STEP but rank 1's part, and no marker: a cut-off upload."""
    fs, _ = cloud.filesystem(f"s3://{bucket}")
    if fs.exists(f"{bucket}/{prefix}checkpoint-{new}"):
        fs.rm(f"{bucket}/{prefix}checkpoint-{new}", recursive=True)  # the killed run's own partial upload
    for key in _keys(bucket, f"{prefix}checkpoint-{step}/"):
        if key != ".lmforge-complete" and not RANK_1_PART.search(key):
            fs.copy(f"{bucket}/{prefix}checkpoint-{step}/{key}", f"{bucket}/{prefix}checkpoint-{new}/{key}")


def _losses(rows: list[dict]) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in rows if "loss" in r]


@pytest.mark.slow
@pytest.mark.parametrize("name, train", [
    ("fsdp-native", {"distributed": "fsdp", "engine": "native"}),
    ("zero3-hf", {"distributed": "deepspeed", "deepspeed": "zero3", "engine": "hf"}),
])
def test_two_nodes_without_a_shared_disk_resume_from_the_bucket_after_kill_9(bucket, tiny_model_dir, tmp_path,  # noqa: F811
                                                                            monkeypatch, name, train):
    data = write_jsonl(tmp_path / "d.jsonl", chat_rows(48))
    cloud.upload_file(data, f"s3://{bucket}/data/train.jsonl")
    _upload_dir(tiny_model_dir, f"s3://{bucket}/models/tiny")
    prefix = "runs/x/"
    tree = _tree(f"s3://{bucket}/models/tiny", f"s3://{bucket}/data/train.jsonl", f"s3://{bucket}/{prefix}", **train)
    cfg = write_config(tmp_path / "nodes.yaml", tree)

    # the killed run: both nodes die (kill -9) once a checkpoint is complete in the bucket
    nodes = _start_nodes(cfg, tmp_path / "first", _free_port())
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and all(p.poll() is None for p, _ in nodes) and not _complete(bucket, prefix):
        time.sleep(0.05)
    alive = all(p.poll() is None for p, _ in nodes)
    for p, _ in nodes:
        _kill_9(p)
    assert alive, "a node ended before the kill:\n" + "\n".join(log.read_text()[-3000:] for _, log in nodes)
    assert ".lmforge-complete" not in _keys(bucket, prefix)  # no final model: killed mid-run
    step = _complete(bucket, prefix)[-1]
    assert step < STEPS
    assert any(RANK_1_PART.search(k) for k in _keys(bucket, f"{prefix}checkpoint-{step}/"))  # node 1's part is there
    _half_written(bucket, prefix, step, step + 2)

    # the reference: the same 2 processes on one node, uninterrupted, all local (run alone: a DeepSpeed job beside
    # the two nodes once left them waiting before their first step)
    ref = tmp_path / "ref"
    ref_cfg = write_config(tmp_path / "ref.yaml", _tree(str(tiny_model_dir), str(data), str(ref), **train))
    _run([sys.executable, "-m", "lmforge", "train", "--nproc-per-node", "2", str(ref_cfg)], tmp_path / "ref-cache")

    # two fresh nodes, nothing local: they resume from the bucket's newest complete checkpoint
    nodes = _start_nodes(cfg, tmp_path / "second", _free_port())
    for p, _ in nodes:
        p.wait(timeout=400)
    logs = [log.read_text() for _, log in nodes]
    assert [p.returncode for p, _ in nodes] == [0, 0], logs[0][-3000:] + logs[1][-3000:]
    assert re.search(rf"resuming from \S*/checkpoint-{step} \(step {step}\)", logs[0]), logs[0][-3000:]

    fs, _ = cloud.filesystem(f"s3://{bucket}")
    fs.get(f"{bucket}/{prefix}model.safetensors", str(tmp_path / "final.safetensors"))
    a, b = load_file(tmp_path / "final.safetensors"), load_file(ref / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    metrics = [json.loads(x) for x in fs.cat(f"{bucket}/{prefix}metrics.jsonl").decode().splitlines()]
    ref_metrics = [json.loads(x) for x in (ref / "metrics.jsonl").read_text().splitlines()]
    assert _losses(metrics) == _losses(ref_metrics) and len(_losses(metrics)) == STEPS
    assert f"checkpoint-{STEPS}" in [f"checkpoint-{s}" for s in _complete(bucket, prefix)]

    # a checkpoint of the interrupted run, from the bucket, becomes a plain model transformers loads
    from transformers import AutoModelForCausalLM

    monkeypatch.setenv("LMFORGE_CACHE", str(tmp_path / "consolidate-cache"))
    assert main(["consolidate", f"s3://{bucket}/{prefix}checkpoint-{step}", "--output", str(tmp_path / "plain")]) == 0
    assert main(["consolidate", str(ref / f"checkpoint-{step}"), "--output", str(tmp_path / "ref-plain")]) == 0
    got = AutoModelForCausalLM.from_pretrained(tmp_path / "plain").state_dict()
    want = AutoModelForCausalLM.from_pretrained(tmp_path / "ref-plain").state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)
