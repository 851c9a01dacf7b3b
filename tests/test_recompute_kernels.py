"""The recompute nodes' elementwise work compiled by Inductor (training/recompute.py ``Kernels``): as accurate as
autograd's modules, the norm output remade in the backward bitwise the forward's, a training run with them resumes
bitwise, and without a working C++ compiler the run keeps torch's ops and says so. Real models use them from a hidden
size of ``COMPILE_FROM``; these tests lower it to 0 to run them on a tiny model."""

from __future__ import annotations

import contextlib
import copy
import json
import shutil

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


def test_compiled_kernels_are_as_accurate_as_autograd_and_remake_bitwise(monkeypatch):
    from transformers import LlamaConfig, LlamaForCausalLM

    monkeypatch.setattr(recompute, "COMPILE_FROM", 0)
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
    assert new.model.norm._lmforge_kernels.compiled
    truth = _loss_and_grads(copy.deepcopy(ref).double(), ids)
    modules = _loss_and_grads(ref, ids)
    compiled = _loss_and_grads(new, ids)

    def error(result, name):
        return float((result[1][name] - truth[1][name]).norm() / truth[1][name].norm())

    # bf16 rounding makes both miss float64 by a few percent; the compiled kernels keep fp32 between their ops, so
    # they miss it by about as much or less (measured here: 0.02-0.11 for both), never by more than a half again
    assert abs(compiled[0] - truth[0]) <= 1.5 * abs(modules[0] - truth[0]) + 1e-3
    for name in truth[1]:
        assert error(compiled, name) <= 1.5 * error(modules, name) + 1e-3, name
    # inside NormOutputs the norms' outputs the next linears saved are remade in the backward: bitwise the same
    kernels, calls = new.model.norm._lmforge_kernels, []
    monkeypatch.setattr(kernels, "norm_output", lambda *a: calls.append(1) or type(kernels).norm_output(kernels, *a))
    remade = _loss_and_grads(new, ids, recompute.NormOutputs())
    assert len(calls) == 2 * 2 + 1  # each norm's output, saved by the next linears, was remade once
    assert torch.equal(remade[0], compiled[0])
    assert all(torch.equal(remade[1][n], compiled[1][n]) for n in truth[1])


def _run(tmp_path, model_dir, out, data, name):
    sections = dict(model={"name_or_path": str(model_dir), "dtype": "bfloat16"},
                    train={"engine": "native", "max_steps": 4, "save_steps": 2, "learning_rate": 1e-3,
                           "per_device_train_batch_size": 2, "gradient_accumulation_steps": 2})
    return main(["train", str(write_config(tmp_path / name, base_config(model_dir, data, out, **sections)))])


def test_a_run_on_compiled_kernels_resumes_bitwise(tmp_path, tiny_model_dir, lmforge_cache, monkeypatch, capsys):
    monkeypatch.setattr(recompute, "COMPILE_FROM", 0)
    recompute._compiled.cache_clear()  # so that this run compiles (and logs it)
    data = write_jsonl(tmp_path / "d.jsonl", chat_rows(24))
    full = tmp_path / "full"
    assert _run(tmp_path, tiny_model_dir, full, data, "a.yaml") == 0
    assert "RMSNorm and SwiGLU compiled by Inductor" in capsys.readouterr().out
    crashed = tmp_path / "crashed"
    crashed.mkdir()
    shutil.copytree(full / "checkpoint-2", crashed / "checkpoint-2")
    assert _run(tmp_path, tiny_model_dir, crashed, data, "b.yaml") == 0
    after, resumed = load_file(full / "model.safetensors"), load_file(crashed / "model.safetensors")
    assert after.keys() == resumed.keys() and all(torch.equal(after[k], resumed[k]) for k in after)
    losses = [json.loads(x).get("loss") for x in (full / "metrics.jsonl").read_text().splitlines()]
    assert all(v is None or v == v for v in losses)  # finite where logged


def test_without_a_compiler_the_kernels_stay_torch_ops_and_say_so(monkeypatch, capsys):
    import torch._inductor.config as inductor
    from transformers import LlamaConfig, LlamaForCausalLM

    monkeypatch.setattr(recompute, "COMPILE_FROM", 0)
    monkeypatch.setattr(inductor.cpp, "cxx", ("/nonexistent/c++",))
    recompute._compiled.cache_clear()
    try:
        conf = LlamaConfig(vocab_size=64, hidden_size=24, intermediate_size=40, num_hidden_layers=1,
                           num_attention_heads=4, num_key_value_heads=2)
        model = LlamaForCausalLM(conf).to(torch.bfloat16)
        assert recompute.use_recompute_layers(model) == 4
        assert model.model.norm._lmforge_kernels is recompute._EAGER
        assert "torch's ops one by one (torch.compile failed" in capsys.readouterr().out
        loss = model(input_ids=torch.randint(0, 64, (2, 8)), labels=torch.randint(0, 64, (2, 8))).loss
        loss.backward()  # the eager nodes train
        assert model.model.norm.weight.grad is not None
    finally:
        recompute._compiled.cache_clear()  # the next test compiles with the real compiler
