"""s3:// paths against an S3-compatible server started here on 127.0.0.1 (moto's server mode): data, the base
model and output_dir in a bucket; checkpoints uploaded with a marker written last; resume from the bucket on
a machine that has nothing local, bitwise; a partial upload is never resumed from. A run killed with kill -9
and resumed from the bucket alone: tests/test_multinode.py."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import base_config, chat_rows, write_config, write_jsonl
from safetensors.torch import load_file

from lmforge import cloud
from lmforge.cli import main

pytest.importorskip("s3fs")
moto_server = pytest.importorskip("moto.server")


@pytest.fixture(scope="module")
def s3_server():
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def bucket(s3_server, monkeypatch, tmp_path):
    """A fresh bucket; the AWS variables point every client (boto3, s3fs) at the loopback server."""
    import uuid

    import boto3

    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    name = f"b{uuid.uuid4().hex[:12]}"
    boto3.client("s3").create_bucket(Bucket=name)
    return name


def _machine(monkeypatch, tmp_path, name: str):
    """A machine of its own: nothing in its lmforge cache (downloads, mirrors, prepared data)."""
    monkeypatch.setenv("LMFORGE_CACHE", str(tmp_path / f"cache-{name}"))


def _keys(bucket: str, prefix: str) -> list[str]:
    import boto3

    pages = boto3.client("s3").get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return sorted(o["Key"][len(prefix):] for page in pages for o in page.get("Contents", []))


def _upload_dir(local, url: str) -> None:
    fs, path = cloud.filesystem(url)
    fs.put(str(local) + "/", path + "/", recursive=True)


def _config(tmp_path, model: str, data: str, out: str, **train) -> dict:
    tree = base_config(model, data, out, train={"max_steps": 4, "save_steps": 2, "lr_scheduler_type": "constant",
                                                **train})
    tree["peft"] = {"kind": "lora", "r": 4, "dropout": 0.1}
    return tree


def test_train_with_data_model_and_output_in_s3_resumes_from_the_bucket_bitwise(bucket, tiny_model_dir, tmp_path,
                                                                                 monkeypatch, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", chat_rows(32))
    cloud.upload_file(data, f"s3://{bucket}/data/train.jsonl")
    _upload_dir(tiny_model_dir, f"s3://{bucket}/models/tiny")
    model, source, out = f"s3://{bucket}/models/tiny", f"s3://{bucket}/data/train.jsonl", f"s3://{bucket}/runs/a"

    # the reference: one uninterrupted run, all local
    _machine(monkeypatch, tmp_path, "ref")
    ref = write_config(tmp_path / "ref.yaml", _config(tmp_path, str(tiny_model_dir), str(data), str(tmp_path / "ref")))
    assert main(["train", str(ref)]) == 0

    # machine 1 stops after step 2 (its checkpoint is in the bucket) ...
    _machine(monkeypatch, tmp_path, "one")
    cfg = write_config(tmp_path / "s3.yaml", _config(tmp_path, model, source, out))
    assert main(["train", str(cfg), "train.max_steps=2"]) == 0
    keys = _keys(bucket, "runs/a/")
    assert "checkpoint-2/.lmforge-complete" in keys and "checkpoint-2/adapter_model.safetensors" in keys
    assert "adapter_model.safetensors" in keys and ".lmforge-complete" in keys and "metrics.jsonl" in keys
    assert "output_dir: s3://" in cloud.filesystem(out)[0].cat(f"{bucket}/runs/a/config.yaml").decode()

    # ... machine 2 has nothing local: it downloads the base model, the data and checkpoint-2, and continues
    _machine(monkeypatch, tmp_path, "two")
    capsys.readouterr()
    assert main(["train", str(cfg)]) == 0
    assert "resuming from" in capsys.readouterr().out
    fs, _ = cloud.filesystem(out)
    fs.get(f"{bucket}/runs/a/adapter_model.safetensors", str(tmp_path / "final.safetensors"))
    a, b = load_file(tmp_path / "final.safetensors"), load_file(tmp_path / "ref" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    metrics = [json.loads(x) for x in fs.cat(f"{bucket}/runs/a/metrics.jsonl").decode().splitlines()]
    ref_metrics = [json.loads(x) for x in (tmp_path / "ref" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["loss"]) for r in metrics if "loss" in r] == \
        [(r["step"], r["loss"]) for r in ref_metrics if "loss" in r]  # one continuous curve, steps 1-4
    assert "checkpoint-4/.lmforge-complete" in _keys(bucket, "runs/a/")


def test_a_partial_upload_is_never_resumed_from(bucket, tiny_model_dir, tmp_path, monkeypatch, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", chat_rows(16))
    out = f"s3://{bucket}/runs/b"
    _machine(monkeypatch, tmp_path, "one")
    cfg = write_config(tmp_path / "s3.yaml", _config(tmp_path, str(tiny_model_dir), str(data), out))
    assert main(["train", str(cfg), "train.max_steps=2"]) == 0
    # an upload of checkpoint-4 that died before its marker: every file but that one
    fs, _ = cloud.filesystem(out)
    for key in _keys(bucket, "runs/b/checkpoint-2/"):
        if key != ".lmforge-complete":
            fs.copy(f"{bucket}/runs/b/checkpoint-2/{key}", f"{bucket}/runs/b/checkpoint-4/{key}")
    fs.pipe(f"{bucket}/runs/b/checkpoint-4/trainer_state.json", json.dumps({"global_step": 4}).encode())
    _machine(monkeypatch, tmp_path, "two")
    capsys.readouterr()
    assert main(["train", str(cfg), "train.max_steps=3"]) == 0
    assert "resuming from" in (text := capsys.readouterr().out) and "(step 2)" in text


def test_resume_never_moves_the_buckets_checkpoints_aside(bucket, tiny_model_dir, tmp_path, monkeypatch):
    data = write_jsonl(tmp_path / "d.jsonl", chat_rows(16))
    out = f"s3://{bucket}/runs/c"
    _machine(monkeypatch, tmp_path, "one")
    cfg = write_config(tmp_path / "s3.yaml", _config(tmp_path, str(tiny_model_dir), str(data), out))
    assert main(["train", str(cfg), "train.max_steps=2"]) == 0
    _machine(monkeypatch, tmp_path, "two")
    assert main(["train", str(cfg), "train.max_steps=2", "train.resume=never"]) == 0
    keys = _keys(bucket, "runs/c/")
    assert any(k.startswith("previous-run-") and k.endswith("checkpoint-2/.lmforge-complete") for k in keys)
    assert "checkpoint-2/.lmforge-complete" in keys  # the new run's own


def test_a_missing_object_is_a_clear_error(bucket, tiny_model_dir, tmp_path, monkeypatch, capsys):
    _machine(monkeypatch, tmp_path, "one")
    cfg = write_config(tmp_path / "c.yaml", base_config(tiny_model_dir, f"s3://{bucket}/nothing.jsonl",
                                                        tmp_path / "out"))
    assert main(["train", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert f"s3://{bucket}/nothing.jsonl names no file" in err and "Traceback" not in err


def test_eval_merge_and_consolidate_read_and_write_s3(bucket, tiny_model_dir, tmp_path, monkeypatch, capsys):
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM

    _machine(monkeypatch, tmp_path, "one")
    data = write_jsonl(tmp_path / "d.jsonl", chat_rows(8))
    cfg = write_config(tmp_path / "c.yaml", _config(tmp_path, str(tiny_model_dir), str(data), str(tmp_path / "run"),
                                                    max_steps=2))
    assert main(["train", str(cfg)]) == 0
    _upload_dir(tmp_path / "run" / "checkpoint-2", f"s3://{bucket}/ckpt/checkpoint-2")
    cloud.upload_file(data, f"s3://{bucket}/eval.jsonl")

    assert main(["eval", "--model", str(tmp_path / "run"), "--data", f"s3://{bucket}/eval.jsonl",
                 "--metrics", "perplexity", "--output", f"s3://{bucket}/reports/eval.json"]) == 0
    report = json.loads(cloud.filesystem(f"s3://{bucket}")[0].cat(f"{bucket}/reports/eval.json"))
    assert report["rows"] == 8 and report["metrics"]["perplexity"] > 1

    assert main(["merge", "--model", str(tmp_path / "run"), "--output", f"s3://{bucket}/merged"]) == 0
    assert main(["merge", "--model", str(tmp_path / "run"), "--output", f"s3://{bucket}/merged"]) == 2  # exists
    assert main(["consolidate", f"s3://{bucket}/ckpt/checkpoint-2", "--output", f"s3://{bucket}/plain"]) == 2
    assert "has no .lmforge-complete" in capsys.readouterr().err  # as uploaded: no marker, maybe a part missing
    cloud.filesystem(f"s3://{bucket}")[0].pipe(f"{bucket}/ckpt/checkpoint-2/.lmforge-complete", b"complete\n")
    assert main(["consolidate", f"s3://{bucket}/ckpt/checkpoint-2", "--output", f"s3://{bucket}/plain"]) == 0
    assert ".lmforge-complete" in _keys(bucket, "merged/") and ".lmforge-complete" in _keys(bucket, "plain/")

    merged = AutoModelForCausalLM.from_pretrained(cloud.fetch(f"s3://{bucket}/merged", "test"))
    reference = AutoPeftModelForCausalLM.from_pretrained(tmp_path / "run").merge_and_unload()
    ids = torch.tensor([[1, 5, 9, 3]])
    torch.testing.assert_close(merged(ids).logits, reference(ids).logits, rtol=1e-5, atol=1e-5)
    adapter = load_file(cloud.fetch(f"s3://{bucket}/plain", "test") / "adapter_model.safetensors")
    saved = load_file(tmp_path / "run" / "checkpoint-2" / "adapter_model.safetensors")
    assert adapter.keys() == saved.keys() and all(torch.equal(adapter[k], saved[k]) for k in saved)


def test_generate_reads_and_writes_s3(bucket, tiny_model_dir, tmp_path, monkeypatch, capsys):
    _machine(monkeypatch, tmp_path, "one")
    prompts = [{"prompt": f"row {i}"} for i in range(3)]
    cloud.upload_file(write_jsonl(tmp_path / "in.jsonl", prompts), f"s3://{bucket}/in.jsonl")
    args = ["generate", "--model", str(tiny_model_dir), "--max-new-tokens", "4", "--no-progress"]
    assert main(args + ["--input", str(tmp_path / "in.jsonl"), "--output", str(tmp_path / "local.jsonl")]) == 0
    assert main(args + ["--input", f"s3://{bucket}/in.jsonl", "--output", f"s3://{bucket}/out/gen.jsonl"]) == 0
    remote = cloud.filesystem(f"s3://{bucket}")[0].cat(f"{bucket}/out/gen.jsonl").decode()
    assert remote == (tmp_path / "local.jsonl").read_text()  # the same rows, greedy
    _machine(monkeypatch, tmp_path, "two")  # a rerun elsewhere finds the bucket's output complete
    capsys.readouterr()
    assert main(args + ["--input", f"s3://{bucket}/in.jsonl", "--output", f"s3://{bucket}/out/gen.jsonl"]) == 0
    assert "nothing to do" in capsys.readouterr().out


@pytest.mark.parametrize("url, package", [("gs://b/ckpt", "gcsfs"), ("az://c/ckpt", "adlfs"), ("abfs://c/ckpt", "adlfs"),
                                          ("hdfs://namenode:8020/ckpt", "pyarrow")])
def test_a_missing_protocol_package_is_named(tmp_path, monkeypatch, capsys, url, package):
    import sys

    for name in [m for m in sys.modules if m == package or m.startswith(package + ".")] or [package]:
        monkeypatch.setitem(sys.modules, name, None)  # as if not installed: importing it (or a part) fails
    assert main(["consolidate", url, "--output", str(tmp_path / "plain")]) == 2
    err = capsys.readouterr().err
    assert f"the {url.split(':')[0]}:// protocol needs the package {package}, which is not installed" in err
    assert "pip install 'lmforge[" in err and "Traceback" not in err
    assert main(["consolidate", "nosuchproto://x/ckpt", "--output", str(tmp_path / "plain")]) == 2
    assert "no fsspec filesystem knows the protocol nosuchproto://" in capsys.readouterr().err


def test_a_file_url_output_dir_goes_through_the_mirror_and_resumes_bitwise(tiny_model_dir, tmp_path, monkeypatch,
                                                                           capsys):
    """A second fsspec protocol, file://, takes the s3:// code paths: data and model fetched into the cache, the
    output_dir trained in a mirror and uploaded with markers, resume from the 'bucket' on an empty machine."""
    store = tmp_path / "store"
    data = write_jsonl(store / "data" / "train.jsonl", chat_rows(16))
    url = f"file://{store}/runs/f"
    _machine(monkeypatch, tmp_path, "ref")
    ref = write_config(tmp_path / "ref.yaml", _config(tmp_path, str(tiny_model_dir), str(data), str(tmp_path / "ref")))
    assert main(["train", str(ref)]) == 0
    _machine(monkeypatch, tmp_path, "one")
    cfg = write_config(tmp_path / "f.yaml", _config(tmp_path, f"file://{tiny_model_dir}", f"file://{data}", url))
    assert main(["train", str(cfg), "train.max_steps=2"]) == 0
    assert (store / "runs" / "f" / "checkpoint-2" / ".lmforge-complete").exists()
    assert (tmp_path / "cache-one" / "outputs").is_dir()  # trained in the mirror, not in the store
    _machine(monkeypatch, tmp_path, "two")
    capsys.readouterr()
    assert main(["train", str(cfg)]) == 0
    assert "resuming from" in capsys.readouterr().out
    a = load_file(store / "runs" / "f" / "adapter_model.safetensors")
    b = load_file(tmp_path / "ref" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (store / "runs" / "f" / ".lmforge-complete").exists()
