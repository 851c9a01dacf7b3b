"""The speed half of ``lmforge estimate`` on a CPU: the probe of the run's step (training/estimate_probe.py), cached
per machine, and the machine measurements it rests on (training/flops.py: the peak at the model's linear shapes,
this process's own CPU time for the busy check). The estimate's model of memory, FLOPs and time is test_estimate.py's."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from test_estimate import L, machine, setup  # noqa: F401 (setup: a fixture)

from lmforge.cache import cached_measurement
from lmforge.training import estimate as est_mod
from lmforge.training import estimate_probe, estimate_report
from lmforge.training.estimate import Estimator


def test_speed_is_the_probes_measure_cached_per_machine(setup, lmforge_cache, monkeypatch):
    """On a CPU the speed is the probe's (one decoder layer of the run's model timed on this machine, the rest of a
    micro-batch, the optimizer): measured once, then read from lmforge's cache, whose figures decide the estimate.
    A machine twice as slow in the cache (the real file, edited) halves tokens/s, by the hand formula."""
    # a probe measured while other processes keep the CPUs busy is not cached ...
    assert cached_measurement("m.json", "k", lambda: 1, "measuring", keep=lambda v: False) == (1, False)
    assert not (lmforge_cache / "m.json").exists()
    monkeypatch.setattr(estimate_probe, "BUSY", float("inf"))  # ... and this test's machine may be shared
    path = lmforge_cache / estimate_probe.CACHE_FILE
    path.unlink(missing_ok=True)  # not what other tests of the session measured (conftest.SESSION_MEASURED)
    cfg = setup(peft={"kind": "lora", "r": 4}, train={"gradient_accumulation_steps": 2})
    here = dataclasses.replace(machine(), probe=True, threads=1)
    first = Estimator(cfg, 1, machine=here).estimate()
    p = first.time["probe"]
    assert first.time["speed_from"] == "probe" and not p["cached"] and p["repeats"] >= 2
    assert p["layer_seconds"] > 0 and p["rest_seconds"] > 0 and p["optimizer_seconds"] > 0
    assert p["optimizer_params"] < first.trainable  # the adapters of one layer of two
    stored = json.loads(path.read_text())
    (key,) = stored
    assert "lora r=4" in key and "4 rows x" in key  # the method kind and the micro-batch are keyed
    slow = {**stored[key], "layer_seconds": 0.25, "rest_seconds": 0.5, "optimizer_seconds": 0.1,
            "optimizer_params": first.trainable // 4}
    path.write_text(json.dumps({key: slow}))
    second = Estimator(cfg, 1, machine=here).estimate()
    t = second.time
    assert t["probe"]["cached"] and t["probe"]["measured_at"] == p["measured_at"]  # not measured again
    by_hand = 2 * (L * 0.25 + 0.5) + 0.1 * 4  # accumulation x (layers x layer + rest) + the optimizer, scaled
    assert t["seconds_per_step"] == pytest.approx(by_hand, abs=1e-3)
    assert t["tokens_per_second"] == pytest.approx(second.step["tokens"] / by_hand, rel=2e-3)
    path.write_text(json.dumps({key: {**slow, **{k: 2 * slow[k] for k in ("layer_seconds", "rest_seconds",
                                                                           "optimizer_seconds")}}}))
    twice = Estimator(cfg, 1, machine=here).estimate()
    assert twice.time["tokens_per_second"] == pytest.approx(t["tokens_per_second"] / 2, rel=2e-3)
    assert "measured on this machine (cached" in estimate_report.render(twice)
    # a config that the probe does not time (QLoRA) keeps the fitted efficiency, and says so
    q = Estimator(setup(peft={"kind": "qlora", "r": 4}), 1, machine=here).estimate().time
    assert q["speed_from"] == "fitted" and q["efficiency"] == est_mod.EFFICIENCY[("native", "qlora")]
    # under torchrun (rank 0 beside the other ranks starting) the probe is only read from the cache
    other = setup(peft={"kind": "lora", "r": 4}, train={"per_device_train_batch_size": 2})
    late = Estimator(other, 1, machine=here, probe_now=False).estimate().time
    assert late["speed_from"] == "fitted" and late["fitted_because"].startswith("not probed")
    assert Estimator(cfg, 1, machine=here, probe_now=False).estimate().time["probe"]["cached"]
    path.unlink()  # the slow figures written here go to no other test


def test_the_probe_times_the_layer_alone_after_its_warm_up_even_past_its_budget(setup, lmforge_cache, monkeypatch):
    """The layer's time is the median of its passes alone after ``LAYER_WARMUP`` passes not kept, never of the
    one-layer model's first passes: a probe whose budget is spent (once a fresh process's build, compiling the
    recompute kernels, spent it) still times ``MIN_REPEATS`` of them (it kept none, and read 76-85 ms per layer of
    SmolLM2-135M against 55-58 in the real run)."""
    monkeypatch.setattr(estimate_probe, "BUSY", float("inf"))  # the machine may be shared
    monkeypatch.setattr(estimate_probe, "BUDGET_SECONDS", 0.0)
    monkeypatch.setattr(estimate_probe, "LAYER_BUDGET_SECONDS", 0.0)
    calls = []
    build = estimate_probe._one_layer_model

    def counted(*args, **kwargs):  # the layer's forwards: in the model's passes and alone
        model, master, packed = build(*args, **kwargs)
        layer = next(m for m in model.modules() if isinstance(m, torch.nn.ModuleList))[0]
        layer.register_forward_pre_hook(lambda *_: calls.append(1))
        return model, master, packed

    monkeypatch.setattr(estimate_probe, "_one_layer_model", counted)
    path = lmforge_cache / estimate_probe.CACHE_FILE
    path.unlink(missing_ok=True)
    here = dataclasses.replace(machine(), probe=True, threads=1)
    p = Estimator(setup(), 1, machine=here).estimate().time["probe"]
    assert not p["cached"] and p["repeats"] == p["layer_repeats"] == estimate_probe.MIN_REPEATS
    # the model's warm-up and timed passes, then the layer alone: its warm-up passes and the timed ones
    assert len(calls) == 1 + p["repeats"] + estimate_probe.LAYER_WARMUP + p["layer_repeats"]
    path.unlink()  # figures of a cut probe go to no other test


def test_the_peak_is_measured_at_the_models_linear_shapes():
    """mfu's and the estimate's peak (issue 23 item 6): the model's own linear layers, counted as the model has them."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from lmforge.training.flops import linear_shapes, measure_shape_peak

    cfg = LlamaConfig(hidden_size=64, intermediate_size=160, num_hidden_layers=3, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=1000)
    shapes = linear_shapes(cfg)
    assert shapes == ((6, 64, 32), (6, 64, 64), (6, 64, 160), (1, 64, 1000), (3, 160, 64))
    linears = [m for m in LlamaForCausalLM(cfg).modules() if isinstance(m, torch.nn.Linear)]
    assert sorted((m.in_features, m.out_features) for m in linears) == sorted(
        (k, n) for c, k, n in shapes for _ in range(c))
    assert linear_shapes(LlamaConfig(**{**cfg.to_dict(), "num_local_experts": 4})) == ()  # experts: the square peak
    assert 0 < measure_shape_peak(torch.float32, shapes, tokens=16, seconds=0.01) < 1e15


def test_own_cpu_time_counts_living_child_processes():
    # a probe's busy check must not count its own workers (Inductor's compile pool) as other processes: a child
    # that burns 0.5 s of CPU and then waits, still alive, counts as this process's time
    import subprocess
    import sys

    from lmforge.training import flops

    burn = "import sys, time\nwhile time.process_time() < 0.5: pass\nprint('done', flush=True)\ntime.sleep(60)"
    before = flops.own_cpu_seconds()
    child = subprocess.Popen([sys.executable, "-c", burn], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "done"
        assert flops.own_cpu_seconds() - before >= 0.45
    finally:
        child.kill()
        child.wait()
