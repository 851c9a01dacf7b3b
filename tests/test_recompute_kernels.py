"""The recompute nodes' elementwise work fused (training/recompute.py ``Kernels``, training/train_kernels.cpp): each
kernel the torch ops' arithmetic within a bf16 step, as accurate as autograd's modules in a model, the norm output
remade in the backward bitwise the forward's, a training run with them resumes bitwise, and without a working C++
compiler the run keeps torch's ops and says so. Real models use them from a hidden size of ``FUSE_FROM``; these tests
lower it to 0 to run them on a tiny model."""

from __future__ import annotations

import contextlib
import copy
import json
import shutil

import pytest
import torch
from conftest import base_config, chat_rows, write_config, write_jsonl
from safetensors.torch import load_file

from lmforge.cli import main
from lmforge.training import recompute


def _loss_and_grads(model, ids, outputs=None):
    model.zero_grad(set_to_none=True)
    with outputs if outputs is not None else contextlib.nullcontext():
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach().double(), {n: p.grad.double() for n, p in model.named_parameters()}


@pytest.fixture()
def fused(lmforge_cache) -> recompute.Kernels:
    """The fused kernels (built into the session's cache, once a session); the test is skipped where they cannot be."""
    kernels = recompute._fused()
    if not kernels.fused:
        pytest.skip("the kernels could not be built here (no C++ compiler): training runs torch's ops")
    return kernels


def _within_a_bf16_step(got, want):
    got, want = got.float(), want.float()
    assert got.shape == want.shape
    assert bool(((got - want).abs() <= want.abs() * 2**-8 + 1e-6).all()), float((got - want).abs().max())


@pytest.mark.parametrize("rows, width, inner", [(300, 576, 1536), (7, 40, 24), (70, 19, 5)])
def test_each_fused_kernel_is_the_torch_ops_arithmetic(rows, width, inner, fused):
    kernels, torch_ops = fused, recompute._EAGER
    rng = torch.Generator().manual_seed(rows)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=rng) * scale).to(torch.bfloat16)

    x, grad, weight = randn(2, rows, width, scale=3), randn(2, rows, width), (1 + randn(width, scale=0.1).float()).bfloat16()
    out, rstd = kernels.norm(x, weight, 1e-5)
    out_ops, rstd_ops = torch_ops.norm(x, weight, 1e-5)
    _within_a_bf16_step(out, out_ops)
    assert torch.allclose(rstd, rstd_ops, rtol=1e-6)
    assert torch.equal(kernels.norm_output(x, weight, rstd), out)  # remade bitwise
    for need in ((True, True), (True, False), (False, True)):
        got, want = kernels.norm_grads(grad, x, weight, rstd, *need), torch_ops.norm_grads(grad, x, weight, rstd, *need)
        for g, w in zip(got, want):
            assert (g is None) == (w is None)
            if g is not None:
                _within_a_bf16_step(g, w)
    # gate and up as the two halves of one projection's rows (strided), the gradient expanded (stride 0)
    joint = randn(rows, 2 * inner, scale=4)
    gate, up, grad_h = joint[:, :inner], joint[:, inner:], randn(1, inner).expand(rows, inner)
    _within_a_bf16_step(kernels.swiglu(gate, up), torch_ops.swiglu(gate, up))
    got, want = kernels.swiglu_grads_and_product(grad_h, gate, up), torch_ops.swiglu_grads_and_product(grad_h, gate, up)
    for g, w in zip(got, want):
        _within_a_bf16_step(g, w)
    assert torch.equal(got[2], kernels.swiglu(gate, up))  # the product remade bitwise the forward's
    assert all(torch.equal(a, b) for a, b in zip(kernels.swiglu_grads(grad_h, gate, up), got[:2]))


def test_the_norm_weight_gradient_has_the_same_bits_on_any_number_of_threads(fused):
    kernels = fused
    rng = torch.Generator().manual_seed(0)
    x, grad = (torch.randn(2, 333, 576, generator=rng).bfloat16() for _ in range(2))
    weight = torch.ones(576, dtype=torch.bfloat16)
    _, rstd = kernels.norm(x, weight, 1e-5)
    threads = torch.get_num_threads()
    try:
        grads = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            grads.append(kernels.norm_grads(grad, x, weight, rstd, True, True))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for g in grads[1:] for a, b in zip(g, grads[0]))


def test_fused_kernels_are_as_accurate_as_autograd_and_remake_bitwise(monkeypatch, fused):
    from transformers import LlamaConfig, LlamaForCausalLM

    monkeypatch.setattr(recompute, "FUSE_FROM", 0)
    conf = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2)
    ids = torch.randint(0, 64, (3, 40), generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    ref = LlamaForCausalLM(conf).to(torch.bfloat16)
    with torch.no_grad():
        for p in ref.parameters():  # norms away from 1, so their weight gradient is tested too
            p.add_(torch.randn_like(p) * 0.1)
    new = copy.deepcopy(ref)
    assert recompute.use_recompute_layers(new) == 2 * 2 + 1 + 2
    assert new.model.norm._lmforge_kernels.fused
    truth = _loss_and_grads(copy.deepcopy(ref).double(), ids)
    modules = _loss_and_grads(ref, ids)
    fused = _loss_and_grads(new, ids)

    def error(result, name):
        return float((result[1][name] - truth[1][name]).norm() / truth[1][name].norm())

    # bf16 rounding makes both miss float64 by a few percent; the fused kernels round where the modules' ops do, so
    # they miss it by about as much (measured here: 0.02-0.11 for both), never by more than a half again
    assert abs(fused[0] - truth[0]) <= 1.5 * abs(modules[0] - truth[0]) + 1e-3
    for name in truth[1]:
        assert error(fused, name) <= 1.5 * error(modules, name) + 1e-3, name
    # inside NormOutputs the norms' outputs the next linears saved are remade in the backward: bitwise the same
    kernels, calls = new.model.norm._lmforge_kernels, []
    monkeypatch.setattr(kernels, "norm_output", lambda *a: calls.append(1) or type(kernels).norm_output(kernels, *a))
    remade = _loss_and_grads(new, ids, recompute.NormOutputs())
    assert len(calls) == 2 * 2 + 1  # each norm's output, saved by the next linears, was remade once
    assert torch.equal(remade[0], fused[0])
    assert all(torch.equal(remade[1][n], fused[1][n]) for n in truth[1])


def _run(tmp_path, model_dir, out, data, name):
    sections = dict(model={"name_or_path": str(model_dir), "dtype": "bfloat16"},
                    train={"engine": "native", "max_steps": 4, "save_steps": 2, "learning_rate": 1e-3,
                           "per_device_train_batch_size": 2, "gradient_accumulation_steps": 2})
    return main(["train", str(write_config(tmp_path / name, base_config(model_dir, data, out, **sections)))])


def test_a_run_on_fused_kernels_resumes_bitwise(tmp_path, tiny_model_dir, fused, monkeypatch, capsys):
    monkeypatch.setattr(recompute, "FUSE_FROM", 0)
    recompute._fused.cache_clear()  # so that this run loads them (and logs it)
    data = write_jsonl(tmp_path / "d.jsonl", chat_rows(24))
    full = tmp_path / "full"
    assert _run(tmp_path, tiny_model_dir, full, data, "a.yaml") == 0
    assert "training kernels: RMSNorm and SwiGLU fused" in capsys.readouterr().out
    crashed = tmp_path / "crashed"
    crashed.mkdir()
    shutil.copytree(full / "checkpoint-2", crashed / "checkpoint-2")
    assert _run(tmp_path, tiny_model_dir, crashed, data, "b.yaml") == 0
    after, resumed = load_file(full / "model.safetensors"), load_file(crashed / "model.safetensors")
    assert after.keys() == resumed.keys() and all(torch.equal(after[k], resumed[k]) for k in after)
    losses = [json.loads(x).get("loss") for x in (full / "metrics.jsonl").read_text().splitlines()]
    assert all(v is None or v == v for v in losses)  # finite where logged


def test_without_a_compiler_the_kernels_stay_torch_ops_and_say_so(monkeypatch, capsys):
    from transformers import LlamaConfig, LlamaForCausalLM

    from lmforge import kernels

    monkeypatch.setattr(recompute, "FUSE_FROM", 0)
    monkeypatch.setenv("CXX", "/nonexistent/c++")
    recompute._fused.cache_clear()
    kernels.load.cache_clear()
    try:
        conf = LlamaConfig(vocab_size=64, hidden_size=24, intermediate_size=40, num_hidden_layers=1,
                           num_attention_heads=4, num_key_value_heads=2)
        model = LlamaForCausalLM(conf).to(torch.bfloat16)
        assert recompute.use_recompute_layers(model) == 4
        assert model.model.norm._lmforge_kernels is recompute._EAGER
        said = capsys.readouterr()
        assert "training kernels: no C++ compiler" in said.err
        assert "training kernels: torch's ops one by one" in said.out
        loss = model(input_ids=torch.randint(0, 64, (2, 8)), labels=torch.randint(0, 64, (2, 8))).loss
        loss.backward()  # the eager nodes train
        assert model.model.norm.weight.grad is not None
    finally:
        recompute._fused.cache_clear()  # the next test loads them with the real compiler
        kernels.load.cache_clear()


def test_a_process_loads_the_kernels_once_when_the_cache_directory_changes(tmp_path, fused, lmforge_cache):
    """A second build of a kernel library (another $LMFORGE_CACHE) registers its ops' namespace twice, which aborts
    the process: ``kernels.load`` hands back the loaded ops instead, and builds nothing."""
    import subprocess
    import sys

    code = """
import os, sys
from lmforge import kernels
from lmforge.training import recompute
first = kernels.load(recompute.SOURCE, "lmforge_train", "training kernels", "-")
os.environ["LMFORGE_CACHE"] = sys.argv[1]
kernels.load.cache_clear()
second = kernels.load(recompute.SOURCE, "lmforge_train", "training kernels", "-")
print(first is second and first is not None)
"""
    other = tmp_path / "other-cache"
    done = subprocess.run([sys.executable, "-c", code, str(other)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "True"
    assert not (other / "kernels").exists()  # nothing built for the second directory
