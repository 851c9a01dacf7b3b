"""Distributed training on CPU: 2 processes over gloo with the tiny model.

Fast tests cover the config rules, the torchrun command line, the DeepSpeed presets and the post-set-up
check. Slow tests (marked) start real processes: DDP 2 x 4 == 1 x 8, FSDP2 / ZeRO-2 / ZeRO-3-offload train,
resume and consolidate with DDP's loss trajectory, both launch styles, DPO with LoRA under DDP, and the MFU
of a DDP run against the matmul peak its estimate uses.
The DeepSpeed presets use the torch optimizer (zero_force_ds_cpu_optimizer: false), so nothing compiles.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import base_config, chat_rows, write_config, write_jsonl

from lmforge.cli import main
from lmforge.config import load_config
from lmforge.distributed import launch, strategy, zero
from lmforge.errors import ConfigError, UnsupportedError

STEPS = 4


# ------------------------------------------------------------------------------------------- helpers
def _tree(model_dir: Path, data: Path, out: Path, **train) -> dict:
    # a constant learning rate lets a run stopped at step 2 be resumed with max_steps 4 and still match
    return base_config(model_dir, data, out, train={"max_steps": STEPS, "save_steps": 2,
                                                    "lr_scheduler_type": "constant", **train})


def _env(cache: Path) -> dict:
    # DeepSpeed compiles a small communication op on first use (about a minute): keep it across test runs
    ext = os.environ.get("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "lmforge" / "torch_extensions"))
    return {**os.environ, "LMFORGE_CACHE": str(cache), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
            "TORCH_EXTENSIONS_DIR": ext}


def _run(cmd: list[str], cache: Path) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, env=_env(cache), capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


def _lmforge(*args: str) -> list[str]:
    return [sys.executable, "-m", "lmforge", *args]


def _torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
            "-m", "lmforge", *args]


def _losses(out: Path) -> dict[int, float]:
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def _grad_norms(out: Path) -> list[float]:
    """Adam's update barely depends on the gradients' scale: a run whose gradients were averaged where they
    should be summed would train alike. The logged norms show it."""
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["grad_norm"] for r in rows if "grad_norm" in r]


def _weights(path: Path) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path).state_dict()


def _assert_close_losses(a: dict, b: dict, rel: float) -> None:
    assert sorted(a) == sorted(b) == list(range(1, STEPS + 1)), (a, b)
    for step in a:
        assert abs(a[step] - b[step]) <= rel * abs(b[step]), (step, a[step], b[step])


def _assert_close_weights(a: dict, b: dict, atol: float) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=atol, msg=k)


# ------------------------------------------------------------------------------------------- fast
@pytest.fixture()
def data(tmp_path) -> Path:
    return write_jsonl(tmp_path / "data" / "train.jsonl", chat_rows(64))


@pytest.mark.parametrize("overrides, message", [
    (["train.distributed=deepspeed", "train.deepspeed=zero3", "peft.kind=qlora"], "ZeRO-3 cannot partition"),
    (["train.distributed=fsdp", "peft.kind=qlora"], "qlora cannot be sharded"),
    (["train.distributed=deepspeed"], "train.deepspeed: required"),
    (["train.distributed=deepspeed", "train.deepspeed=zero4"], "neither a preset"),
    (["train.deepspeed=zero2"], "set train.distributed: deepspeed"),
    (["train.fsdp_sharding=hybrid"], "applies only to train.distributed: fsdp"),
])
def test_impossible_combinations_exit_2(tmp_path, tiny_model_dir, data, capsys, overrides, message):
    cfg = write_config(tmp_path / "cfg.yaml", _tree(tiny_model_dir, data, tmp_path / "out"))
    assert main(["train", str(cfg), *overrides]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_strategy_that_cannot_run_is_an_error_not_a_switch(tmp_path, tiny_model_dir, data, capsys, monkeypatch):
    cfg = write_config(tmp_path / "cfg.yaml", _tree(tiny_model_dir, data, tmp_path / "out"))
    # ddp in a single process would silently train alone
    assert main(["train", str(cfg), "train.distributed=ddp"]) == 2
    assert "needs several processes" in capsys.readouterr().err
    # several processes without a strategy
    assert main(["train", str(cfg), "--nproc-per-node", "2"]) == 2
    assert "train.distributed: set ddp, fsdp or deepspeed" in capsys.readouterr().err
    # the launcher asked for 2 processes, but only one came up
    monkeypatch.setenv(strategy.EXPECTED_WORLD_ENV, "2")
    with pytest.raises(UnsupportedError, match="asked for 2 processes but WORLD_SIZE is 1"):
        strategy.setup(load_config(cfg))


def test_verify_names_every_difference(monkeypatch):
    cfg = SimpleNamespace(train=SimpleNamespace(distributed="fsdp", fsdp_sharding="full", deepspeed=None))
    ddp_like = {"world_size": 1, "backend": "gloo", "distributed_type": "MULTI_CPU", "wrapper": "DistributedDataParallel",
                "model": torch.nn.Linear(2, 2)}
    problems = strategy.mismatches(cfg, ddp_like)
    assert any("distributed type MULTI_CPU (expected FSDP)" in p for p in problems)
    assert any("model wrapper DistributedDataParallel" in p for p in problems)
    fake = SimpleNamespace(model_wrapped=torch.nn.Linear(2, 2),
                           accelerator=SimpleNamespace(distributed_type=SimpleNamespace(value="MULTI_CPU")))
    with pytest.raises(UnsupportedError, match="fsdp was asked for.*Stopping rather than training"):
        strategy.verify(cfg, fake)
    hybrid = SimpleNamespace(train=SimpleNamespace(distributed="fsdp", fsdp_sharding="hybrid", deepspeed=None))
    flat = {"world_size": 1, "backend": "gloo", "distributed_type": "FSDP", "wrapper": "FSDPLlamaForCausalLM",
            "mesh": {"shard": 2}, "model": torch.nn.Linear(2, 2)}
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # two nodes
    assert "device mesh {'shard': 2} (expected hybrid sharding)" in strategy.mismatches(hybrid, flat)
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    zero3 = SimpleNamespace(train=SimpleNamespace(distributed="deepspeed", deepspeed="zero3"))
    engine = {"world_size": 1, "backend": "gloo", "distributed_type": "DEEPSPEED", "wrapper": "DeepSpeedEngine",
              "zero_stage": 2, "model": type("DeepSpeedEngine", (), {})()}
    assert strategy.mismatches(zero3, engine) == ["ZeRO stage 2 (expected 3)"]


@pytest.mark.parametrize("no_split", [None, []])
def test_native_fsdp_on_a_model_without_decoder_layer_classes_is_a_clear_error(no_split):
    """The native engine shards per decoder layer, found through ``_no_split_modules``: a model class that names
    none is refused with what to use instead, before any process-group work (no processes needed here)."""
    from transformers import PretrainedConfig, PreTrainedModel

    from lmforge.training.sharding import Sharded

    class TinyNoSplitLM(PreTrainedModel):  # (transformers 5 also collects the children's _no_split_modules)
        config_class = PretrainedConfig
        _no_split_modules = no_split

        def __init__(self, config):
            super().__init__(config)
            self.layers = torch.nn.ModuleList([torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)])
            self.post_init()

    with pytest.raises(UnsupportedError) as e:
        Sharded(TinyNoSplitLM(PretrainedConfig()), objective=None, compute=torch.float32)
    message = str(e.value)
    assert "train.distributed: fsdp" in message and "TinyNoSplitLM" in message and "_no_split_modules" in message
    assert "train.distributed: ddp" in message  # what to use instead
    assert not torch.distributed.is_initialized()


def test_torchrun_command_line():
    args = SimpleNamespace(nproc_per_node=2, nnodes=1, node_rank=0, master_addr="127.0.0.1", master_port=None)
    cmd = launch.torchrun_command(args, ["cfg.yaml", "train.seed=1"])
    assert cmd[1:] == ["-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone",
                       "-m", "lmforge", "train", "cfg.yaml", "train.seed=1"]
    args = SimpleNamespace(nproc_per_node=8, nnodes=2, node_rank=1, master_addr="10.0.0.1", master_port=29501)
    cmd = launch.torchrun_command(args, ["cfg.yaml"])
    assert cmd[3:13] == ["--nproc-per-node", "8", "--nnodes", "2", "--node-rank", "1", "--master-addr", "10.0.0.1",
                         "--master-port", "29501"]


def test_launch_flags_under_torchrun_must_match(monkeypatch):
    args = SimpleNamespace(nproc_per_node=2, nnodes=1, node_rank=0)
    assert launch.wants_launch(args)  # not under torchrun yet: launch
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert not launch.wants_launch(args)  # a torchrun worker: train
    monkeypatch.setenv("WORLD_SIZE", "4")
    with pytest.raises(ConfigError, match="does not match the 4 processes"):
        launch.wants_launch(args)


def test_deepspeed_presets_and_json(tmp_path):
    assert [zero.stage(zero.preset(p)) for p in zero.PRESETS] == [1, 2, 3, 3]
    assert zero.offloads(zero.preset("zero3_offload")) and not zero.offloads(zero.preset("zero3"))
    assert zero.preset("zero3")["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    assert zero.load(str(path))["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
    path.write_text('{"zero_optimization":\n {"stage": 3,}}')
    with pytest.raises(ConfigError, match=r"ds.json:2: invalid JSON"):
        zero.load(str(path))


# ------------------------------------------------------------------------------------------- slow
@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory, tiny_model_dir):
    """The reference: DDP, 2 processes x batch 4, started as `lmforge train --nproc-per-node 2`."""
    root = tmp_path_factory.mktemp("dist")
    data = write_jsonl(root / "data" / "train.jsonl", chat_rows(64))
    cfg = write_config(root / "cfg.yaml", _tree(tiny_model_dir, data, root / "ddp", distributed="ddp",
                                                 per_device_train_batch_size=4, engine="hf"))
    proc = _run(_lmforge("train", "--nproc-per-node", "2", str(cfg)), root / "cache")
    return SimpleNamespace(root=root, data=data, out=root / "ddp", log=proc.stdout)


@pytest.mark.slow
def test_ddp_two_processes_equal_one_process_with_double_batch(ddp_run, tiny_model_dir, lmforge_cache):
    assert "distributed: ddp on 2 processes, backend gloo, model in DistributedDataParallel" in ddp_run.log
    root = ddp_run.root
    cfg = write_config(root / "one.yaml", _tree(tiny_model_dir, ddp_run.data, root / "one",
                                                per_device_train_batch_size=8, engine="hf"))
    assert main(["train", str(cfg)]) == 0  # one process, in this one
    _assert_close_losses(_losses(ddp_run.out), _losses(root / "one"), rel=1e-5)
    _assert_close_weights(_weights(ddp_run.out), _weights(root / "one"), atol=1e-5)
    rows = [json.loads(x) for x in (ddp_run.out / "metrics.jsonl").read_text().splitlines()]
    one = [json.loads(x) for x in (root / "one" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-2]["tokens_seen"] == one[-2]["tokens_seen"]  # tokens counted over both ranks ...
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, STEPS + 1))  # ... and written by rank 0 only


@pytest.mark.slow
def test_native_ddp_two_processes_equal_one_process_and_the_hf_engine(ddp_run, tiny_model_dir, lmforge_cache):
    """The native engine: 2 processes x 4 == 1 process x 8, and the same trajectory as the HF engine's DDP."""
    root = ddp_run.root
    two = write_config(root / "native2.yaml", _tree(tiny_model_dir, ddp_run.data, root / "native2", distributed="ddp",
                                                    per_device_train_batch_size=4, engine="native"))
    proc = _run(_lmforge("train", "--nproc-per-node", "2", str(two)), root / "cache")
    assert "distributed: ddp on 2 processes, backend gloo, native engine" in proc.stdout
    one = write_config(root / "native1.yaml", _tree(tiny_model_dir, ddp_run.data, root / "native1",
                                                    per_device_train_batch_size=8, engine="native"))
    assert main(["train", str(one)]) == 0
    _assert_close_losses(_losses(root / "native2"), _losses(root / "native1"), rel=1e-5)
    _assert_close_weights(_weights(root / "native2"), _weights(root / "native1"), atol=1e-5)
    _assert_close_losses(_losses(root / "native2"), _losses(ddp_run.out), rel=1e-4)
    _assert_close_weights(_weights(root / "native2"), _weights(ddp_run.out), atol=1e-4)
    assert sorted(p.name for p in (root / "native2" / "checkpoint-2").glob("rng_state_*.pth")) == \
        ["rng_state_0.pth", "rng_state_1.pth"]


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["native", "hf"])
def test_ddp_mfu_is_measured_against_the_estimates_peak(tmp_path, tiny_model_dir, engine):
    """Each of 2 workers has one thread (the env); its MFU counts every rank's tokens/s against its share of the
    node's matmul peak, the peak estimate.json holds (taken at the node's 2 threads), not against its own 1-thread
    peak measured apart. The cache is seeded with peaks that grow as threads^2, so the two disagree."""
    from transformers import AutoConfig

    from lmforge.training.flops import linear_shapes, peak_key

    cache = tmp_path / "cache"
    cache.mkdir()
    shapes = linear_shapes(AutoConfig.from_pretrained(tiny_model_dir))  # the peak at the model's shapes
    (cache / "peak_flops.json").write_text(json.dumps(
        {peak_key(torch.float32, t, shapes): 1e8 * t * t for t in range(1, (os.cpu_count() or 1) + 1)}))
    data = write_jsonl(tmp_path / "train.jsonl", chat_rows(32))
    cfg = write_config(tmp_path / "cfg.yaml", _tree(tiny_model_dir, data, tmp_path / "out", distributed="ddp",
                                                    per_device_train_batch_size=2, engine=engine))
    _run(_lmforge("train", "--nproc-per-node", "2", str(cfg)), cache)
    est = json.loads((tmp_path / "out" / "estimate.json").read_text())
    assert est["world"] == 2 and est["machine"]["peak_flops"] == 1e8 * min(os.cpu_count() or 1, 2) ** 2
    rows = [json.loads(x) for x in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "mfu" in r]
    assert rows
    for r in rows:
        expected = r["flops_per_token"] * r["tokens_per_second"] / est["machine"]["peak_flops"]
        assert r["mfu"] == pytest.approx(expected, rel=0.01)


@pytest.mark.slow
def test_two_nodes_one_command_each_with_hybrid_fsdp(ddp_run, tiny_model_dir):
    """Two 'nodes' of two processes on this machine, one `lmforge train` per node as on a cluster; hybrid FSDP
    shards within a node and replicates across nodes. Global batch 2 x 4 = DDP's 4 x 2: the same losses."""
    import socket

    root = ddp_run.root
    cfg = write_config(root / "nodes.yaml", _tree(tiny_model_dir, ddp_run.data, root / "nodes", distributed="fsdp",
                                                  fsdp_sharding="hybrid", per_device_train_batch_size=2, engine="hf"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [subprocess.Popen(_lmforge("train", "--nproc-per-node", "2", "--nnodes", "2", "--node-rank", str(rank),
                                       "--master-addr", "127.0.0.1", "--master-port", str(port), str(cfg)),
                              env=_env(root / "cache"), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for rank in (0, 1)]
    outs = [p.communicate(timeout=500) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][1][-3000:] + outs[1][1][-3000:]
    assert "distributed: fsdp on 4 processes" in outs[0][0]
    assert "mesh {'dp_replicate': 2, 'dp_shard_cp': 2}" in outs[0][0]
    _assert_close_losses(_losses(root / "nodes"), _losses(ddp_run.out), rel=1e-4)
    _assert_close_weights(_weights(root / "nodes"), _weights(ddp_run.out), atol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("name, overrides, marker", [
    ("fsdp", ["train.distributed=fsdp", "train.engine=hf"], "pytorch_model_fsdp_0"),
    ("fsdp-native", ["train.distributed=fsdp", "train.engine=native"], "optimizer/.metadata"),
    ("zero2", ["train.distributed=deepspeed", "train.deepspeed=zero2"], "global_step4"),
    ("zero3_offload", ["train.distributed=deepspeed", "train.deepspeed=zero3_offload"], "global_step4"),
])
def test_sharded_strategy_trains_resumes_and_consolidates(ddp_run, tiny_model_dir, name, overrides, marker):
    root, out = ddp_run.root, ddp_run.root / name
    cfg = write_config(root / f"{name}.yaml", _tree(tiny_model_dir, ddp_run.data, out, per_device_train_batch_size=4))
    # FSDP under the user's own torchrun; DeepSpeed through lmforge's launcher
    cmd = _torchrun("train", str(cfg), *overrides) if name.startswith("fsdp") else \
        _lmforge("train", "--nproc-per-node", "2", str(cfg), *overrides)
    kind = overrides[0].split("=")[1]
    # a run that stops after step 2 (its checkpoint is sharded), then is resumed to step 4
    proc = _run(cmd + ["train.max_steps=2"], root / "cache")
    assert f"distributed: {kind} on 2 processes, backend gloo" in proc.stdout
    assert (out / "checkpoint-2" / marker.replace("4", "2")).exists()
    if name == "fsdp-native":  # the weights are gathered into a plain model; the optimizer state stays sharded
        assert "mesh {'shard': 2}" in proc.stdout and (out / "checkpoint-2" / "model.safetensors").exists()
    proc = _run(cmd, root / "cache")
    assert "resuming from" in proc.stdout and "checkpoint-2" in proc.stdout
    assert (out / "checkpoint-4" / marker).exists()
    # same trajectory as DDP; the final model is a plain HF model
    _assert_close_losses(_losses(out), _losses(ddp_run.out), rel=1e-4)
    torch.testing.assert_close(_grad_norms(out), _grad_norms(ddp_run.out), rtol=1e-4, atol=0)
    final = _weights(out)
    _assert_close_weights(final, _weights(ddp_run.out), atol=1e-4)

    # a checkpoint from an interrupted run becomes a plain model
    assert main(["consolidate", str(out / "checkpoint-4"), "--output", str(root / f"{name}-plain")]) == 0
    _assert_close_weights(_weights(root / f"{name}-plain"), final, atol=1e-6)
    assert (root / f"{name}-plain" / "tokenizer_config.json").exists()


def test_a_build_lock_left_by_a_killed_process_does_not_hang_the_next_run(tmp_path):
    """torch's build lock is a bare file; a process killed while holding it made every later DeepSpeed run wait
    forever (a CI run hung so). lmforge builds under a lock the kernel drops, and removes the stale file."""
    env = _env(tmp_path / "cache")
    lock = Path(env["TORCH_EXTENSIONS_DIR"]) / "deepspeed_shm_comm" / "lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    lock.touch()  # what a process killed mid-build leaves
    code = "from lmforge.distributed import extensions; extensions.load_ops(); print('loaded')"
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "loaded" in proc.stdout, proc.stderr[-3000:]
    assert not lock.exists()


@pytest.mark.slow
def test_native_fsdp_lora_in_bf16_equals_one_process_and_resumes_bitwise(ddp_run, tiny_model_dir, lmforge_cache):
    """FSDP2 on the native engine with a LoRA adapter in bf16 (FSDP casts the fp32 adapter shards as it gathers
    them): 2 processes x 2 rows x 2 micro-batches follow 1 process x 8 rows; a run stopped at step 2 and
    resumed ends bitwise equal to an uninterrupted one; the final adapter loads with PEFT."""
    from peft import AutoPeftModelForCausalLM
    from safetensors.torch import load_file

    root = ddp_run.root
    # Adam's first step moves each weight by +-lr whatever its gradient's size, so a gradient near zero takes its
    # sign from bf16 rounding, which the summation order changes (seen: one lora_B element of 128 moved the other
    # way, its first gradient far below its second, by its Adam state); epsilon 1e-5 keeps such updates
    # proportional to the gradient
    fsdp = dict(distributed="fsdp", per_device_train_batch_size=2, gradient_accumulation_steps=2, adam_epsilon=1e-5)
    for name, train in (("lora-one", dict(per_device_train_batch_size=8, adam_epsilon=1e-5)), ("lora-fsdp", fsdp),
                        ("lora-fsdp-stop", fsdp)):
        tree = _tree(tiny_model_dir, ddp_run.data, root / name, engine="native", **train)
        tree.update(model={**tree["model"], "dtype": "bfloat16"}, peft={"kind": "lora", "r": 4, "alpha": 8,
                                                                         "dropout": 0.0})
        cfg = write_config(root / f"{name}.yaml", tree)
        if name == "lora-one":
            assert main(["train", str(cfg)]) == 0
        elif name == "lora-fsdp-stop":
            _run(_torchrun("train", str(cfg), "train.max_steps=2"), root / "cache")
            _run(_torchrun("train", str(cfg)), root / "cache")
        else:
            proc = _run(_torchrun("train", str(cfg)), root / "cache")
            assert "distributed: fsdp on 2 processes, backend gloo, native engine" in proc.stdout
    _assert_close_losses(_losses(root / "lora-fsdp"), _losses(root / "lora-one"), rel=1e-4)
    torch.testing.assert_close(_grad_norms(root / "lora-fsdp"), _grad_norms(root / "lora-one"), rtol=2e-2, atol=0)
    adapters = {n: load_file(root / n / "adapter_model.safetensors") for n in ("lora-one", "lora-fsdp", "lora-fsdp-stop")}
    assert adapters["lora-fsdp"].keys() == adapters["lora-one"].keys()
    for k, one in adapters["lora-one"].items():
        fsdp = adapters["lora-fsdp"][k]
        assert fsdp.dtype == torch.float32  # the fp32 shards, not their bf16 casts
        assert (fsdp - one).abs().max() <= 5e-2 * one.abs().max(), k  # bf16 sums in another order
        assert torch.equal(fsdp, adapters["lora-fsdp-stop"][k]), k
    assert _losses(root / "lora-fsdp") == _losses(root / "lora-fsdp-stop")
    model = AutoPeftModelForCausalLM.from_pretrained(root / "lora-fsdp")
    assert any(p.abs().sum() > 0 for n, p in model.named_parameters() if "lora_B" in n)


@pytest.mark.slow
def test_dpo_with_lora_under_ddp(ddp_run, tiny_model_dir):
    from lmforge.synthetic import preference_rows

    root = ddp_run.root
    data = write_jsonl(root / "pref" / "train.jsonl", preference_rows(32, 0))
    tree = _tree(tiny_model_dir, data, root / "dpo", distributed="ddp", per_device_train_batch_size=2)
    tree.update(method="dpo", peft={"kind": "lora", "r": 4, "alpha": 8})
    cfg = write_config(root / "dpo.yaml", tree)
    proc = _run(_lmforge("train", str(cfg), "--nproc-per-node", "2"), root / "cache")
    assert "distributed: ddp on 2 processes" in proc.stdout
    losses = _losses(root / "dpo")
    assert len(losses) == STEPS and all(v == v for v in losses.values())
    from peft import AutoPeftModelForCausalLM

    model = AutoPeftModelForCausalLM.from_pretrained(root / "dpo")
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_b and any(p.abs().sum() > 0 for p in lora_b)  # B starts at zero: the adapter trained


@pytest.mark.parametrize("peft_kind", ["none", "lora"])
def test_consolidate_fsdp_checkpoint(tmp_path, tiny_model_dir, data, lmforge_cache, peft_kind):
    """A DCP checkpoint laid out as accelerate's FSDP2 writes it -> a plain model / adapter with those weights."""
    import torch.distributed.checkpoint as dcp
    from peft import get_peft_model_state_dict
    from safetensors.torch import load_file

    from lmforge.training.run import load_model_and_tokenizer

    tree = _tree(tiny_model_dir, data, tmp_path / "out", distributed="fsdp")
    tree["peft"] = {"kind": peft_kind, "r": 4}
    cfg = load_config(write_config(tmp_path / "cfg.yaml", tree))
    model, _, _ = load_model_and_tokenizer(cfg)
    torch.manual_seed(1)
    for p in model.parameters():
        if p.requires_grad:
            p.data.add_(torch.randn_like(p))  # "trained" weights, different from a fresh load
    # FSDP saves a PEFT model's adapter alone (names without ".default"), a full model's whole state dict
    state = get_peft_model_state_dict(model) if peft_kind == "lora" else model.state_dict()
    ckpt = tmp_path / "out" / "checkpoint-4"
    dcp.save({"model": {k: v.clone() for k, v in state.items()}}, checkpoint_id=str(ckpt / "pytorch_model_fsdp_0"))
    (ckpt / "config.yaml").write_text((tmp_path / "cfg.yaml").read_text())

    assert main(["consolidate", str(ckpt), "--output", str(tmp_path / "plain")]) == 0
    if peft_kind == "lora":
        saved = load_file(tmp_path / "plain" / "adapter_model.safetensors")
        assert saved.keys() == state.keys()
        _assert_close_weights(saved, state, atol=0)
    else:
        _assert_close_weights(_weights(tmp_path / "plain"), state, atol=0)
    assert (tmp_path / "plain" / "tokenizer_config.json").exists()


def test_consolidate_rejects_a_checkpoint_of_another_model(tmp_path, tiny_model_dir, data, lmforge_cache):
    import torch.distributed.checkpoint as dcp

    cfg = write_config(tmp_path / "cfg.yaml", _tree(tiny_model_dir, data, tmp_path / "out"))
    ckpt = tmp_path / "ckpt"
    dcp.save({"model": {"other.weight": torch.zeros(2, 2)}}, checkpoint_id=str(ckpt / "pytorch_model_fsdp_0"))
    (ckpt / "config.yaml").write_text(cfg.read_text())
    with pytest.raises(ConfigError, match="does not match the model"):
        main(["consolidate", str(ckpt), "--output", str(tmp_path / "plain"), "--debug"])


_ORDER_SCRIPT = """
import sys, time
import torch.distributed as dist
from lmforge.distributed.ranks import main_process_first

dist.init_process_group("gloo")
rank = dist.get_rank()

@main_process_first
def build(path):
    with open(path, "a") as fh:
        fh.write(f"start {rank}\\n")
    time.sleep(1.0 if rank == 0 else 0.0)  # rank 0 is slow: the others must still wait for it
    with open(path, "a") as fh:
        fh.write(f"end {rank}\\n")
    return rank

assert build(sys.argv[1]) == rank
dist.barrier()  # nobody tears the group down while another rank still uses it
dist.destroy_process_group()
"""


@pytest.mark.slow
def test_data_preparation_runs_on_rank_0_first(tmp_path):
    script = tmp_path / "order.py"
    script.write_text(_ORDER_SCRIPT)
    events = tmp_path / "events.txt"
    _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(script),
          str(events)], tmp_path / "cache")
    assert events.read_text().split("\n")[:4] == ["start 0", "end 0", "start 1", "end 1"]


@pytest.mark.slow
def test_native_dpo_ddp_two_processes_equal_one_process(tmp_path, tiny_model_dir, lmforge_cache):
    """DPO on the native engine: 2 processes x 2 pairs == 1 process x 4 pairs (each rank scores the reference
    of its own rows before the first step and keeps them in its checkpoint)."""
    from lmforge.synthetic import preference_rows

    data = write_jsonl(tmp_path / "data" / "train.jsonl", preference_rows(32, 0))

    def tree(out, **train):
        return base_config(tiny_model_dir, data, tmp_path / out, method="dpo",
                           train={"max_steps": STEPS, "save_steps": 2, "lr_scheduler_type": "constant",
                                  "engine": "native", **train})

    two = write_config(tmp_path / "two.yaml", tree("two", distributed="ddp", per_device_train_batch_size=2))
    proc = _run(_lmforge("train", "--nproc-per-node", "2", str(two)), tmp_path / "cache")
    assert "distributed: ddp on 2 processes, backend gloo, native engine" in proc.stdout
    one = write_config(tmp_path / "one.yaml", tree("one", per_device_train_batch_size=4))
    assert main(["train", str(one)]) == 0
    _assert_close_losses(_losses(tmp_path / "two"), _losses(tmp_path / "one"), rel=1e-5)
    _assert_close_weights(_weights(tmp_path / "two"), _weights(tmp_path / "one"), atol=1e-5)
    assert sorted(p.name for p in (tmp_path / "two" / "checkpoint-2").glob("objective_*.pt")) == \
        ["objective_0.pt", "objective_1.pt"]
