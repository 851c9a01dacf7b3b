"""The native engine's own promises (the shared invariances are parametrized over both engines in
test_train.py and test_distributed.py): FLOPs equal a hand count, the profiler trace loads, SIGTERM and
kill -9 mid-run resume bitwise, step rows are independent of the process/accumulation split, and one
engine's checkpoint is refused by the other with a clear message."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import base_config, chat_rows, write_config, write_jsonl
from safetensors.torch import load_file

from lmforge.cli import main
from lmforge.training import flops
from lmforge.training.native import StepRows


def test_flop_count_equals_a_hand_count(tiny_model_dir):
    """Forward + backward of a pretraining batch: 3 x (2 x linear weights x tokens + LM head on loss positions
    + attention 4 x T^2 x hidden per layer); FlopCounterMode's count must be within 5% of it."""
    from transformers import AutoModelForCausalLM

    from lmforge.training.losses import token_loss_sum

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    cfg = model.config
    B, T = 3, 64
    ids = torch.randint(0, cfg.vocab_size, (B, T))
    batch = {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)}
    with flops.Counter(active=True) as counter:
        loss, n = token_loss_sum(model, batch)
        loss.backward()
    d, L = cfg.hidden_size, cfg.num_hidden_layers
    kv = cfg.num_key_value_heads * (d // cfg.num_attention_heads)
    linear = L * (2 * d * d + 2 * d * kv + 3 * d * cfg.intermediate_size)  # q, o, k, v, gate, up, down
    forward = 2 * linear * B * T + 2 * d * cfg.vocab_size * n + L * B * 4 * T * T * d
    assert n == B * (T - 1)
    assert counter.total == pytest.approx(3 * forward, rel=0.05)


def test_step_rows_do_not_depend_on_the_split():
    """The rows of a step are the same for 1 x 8, 8 x 1 with accumulation, and 2 processes x 4."""
    def step_rows(per_device, accumulation, world, step):
        rows = StepRows(21, seed=3, per_device=per_device, accumulation=accumulation, world=world)
        return sorted(i for r in range(world) for micro in rows.for_step(step, r) for i in micro)

    for step in range(6):  # 3 steps per epoch (the last one short), then the next epoch's order
        assert step_rows(8, 1, 1, step) == step_rows(1, 8, 1, step) == step_rows(4, 1, 2, step)
    first_epoch = [i for s in range(3) for i in step_rows(8, 1, 1, s)]
    assert sorted(first_epoch) == list(range(21))
    assert step_rows(8, 1, 1, 3) != step_rows(8, 1, 1, 0)


def test_profile_writes_a_trace_that_loads(tmp_path, tiny_model_dir, lmforge_cache):
    data = write_jsonl(tmp_path / "d.jsonl", chat_rows(16))
    tree = base_config(tiny_model_dir, data, tmp_path / "out", train={"engine": "native", "max_steps": 3,
                                                                       "profile": {"start_step": 2, "steps": 1}})
    assert main(["train", str(write_config(tmp_path / "c.yaml", tree))]) == 0
    traces = list((tmp_path / "out" / "profiler").glob("*.pt.trace.json"))
    assert len(traces) == 1
    events = json.loads(traces[0].read_text())["traceEvents"]
    assert any("aten::mm" in str(e.get("name")) for e in events)


def test_a_checkpoint_resumes_only_in_its_own_engine(tmp_path, tiny_model_dir, lmforge_cache, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", chat_rows(16))
    tree = base_config(tiny_model_dir, data, tmp_path / "out", train={"engine": "native", "max_steps": 2})
    cfg = write_config(tmp_path / "c.yaml", tree)
    assert main(["train", str(cfg)]) == 0
    assert main(["train", str(cfg), "train.engine=hf", "train.max_steps=4"]) == 2
    err = capsys.readouterr().err
    assert "was written by the native engine; resume it with train.engine: native" in err
    # consolidate reads a native checkpoint (a plain model directory) as it is
    assert main(["consolidate", str(tmp_path / "out" / "checkpoint-2"), "--output", str(tmp_path / "plain")]) == 0
    a, b = load_file(tmp_path / "plain" / "model.safetensors"), load_file(tmp_path / "out" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("overrides, message", [
    (["method=orpo", "peft.kind=prompt_tuning"], "peft.kind: prompt_tuning with orpo runs on train.engine: hf"),
    (["method=dpo", "dpo.loss_type=aot"], "dpo.loss_type: aot runs on train.engine: hf"),
    (["train.torch_compile=true"], "train.torch_compile: runs on train.engine: hf"),
    (["train.distributed=deepspeed", "train.deepspeed=zero2"], "runs on train.engine: hf"),
    (["method=dpo", "train.distributed=fsdp"], "train.distributed: fsdp with method dpo runs on train.engine: hf"),
    (["train.optim=adamw_bnb_8bit"], "the native engine has adamw_torch"),
    (["train.report_to=[comet_ml]"], "reports to tensorboard"),
])
def test_what_native_cannot_run_is_refused(tmp_path, tiny_model_dir, capsys, overrides, message):
    data = write_jsonl(tmp_path / "d.jsonl", chat_rows(4))
    cfg = write_config(tmp_path / "c.yaml", base_config(tiny_model_dir, data, tmp_path / "out",
                                                        train={"engine": "native"}))
    assert main(["train", str(cfg), *overrides]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_default_engine_falls_back_to_hf_with_a_reason(tmp_path, tiny_model_dir, lmforge_cache, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", chat_rows(8))
    cfg = write_config(tmp_path / "c.yaml", base_config(tiny_model_dir, data, tmp_path / "out",
                                                        train={"max_steps": 1, "optim": "adafactor"}))
    assert main(["train", str(cfg)]) == 0
    assert "plan: engine: hf (train.optim: adafactor runs on train.engine: hf" in capsys.readouterr().out
    import yaml

    assert yaml.safe_load((tmp_path / "out" / "config.yaml").read_text())["train"]["engine"] == "hf"


@pytest.mark.slow
def test_kill_9_mid_run_then_resume_equals_uninterrupted(tmp_path, sharp_model_dir):
    """kill -9: the last periodic checkpoint survives, and `resume: auto` continues to the same bits as a run never
    stopped (LoRA dropout on, so the RNG state is restored too). SIGTERM on this engine: tests/test_signals.py."""
    env = {**os.environ, "LMFORGE_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    data = write_jsonl(tmp_path / "d.jsonl", chat_rows(120))
    sections = dict(train={"engine": "native", "max_steps": 40, "save_steps": 5, "logging_steps": 1,
                           "per_device_train_batch_size": 2}, peft={"kind": "lora", "r": 4, "dropout": 0.1})
    full = write_config(tmp_path / "full.yaml", base_config(sharp_model_dir, data, tmp_path / "full", **sections))
    stopped = write_config(tmp_path / "stop.yaml", base_config(sharp_model_dir, data, tmp_path / "stop", **sections))
    cmd = [sys.executable, "-m", "lmforge", "train"]
    proc = subprocess.Popen(cmd + [str(stopped)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "stop" / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:  # wait for step 7: one checkpoint behind it
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 7:
            break
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=120)
    last = max(int(line.split('"step": ')[1].split(",")[0]) for line in metrics.read_text().splitlines())
    assert last < 40, "the run ended before the signal; nothing was tested"
    assert proc.returncode == -signal.SIGKILL
    subprocess.run(cmd + [str(stopped)], env=env, check=True, capture_output=True)
    subprocess.run(cmd + [str(full)], env=env, check=True, capture_output=True)
    a = load_file(tmp_path / "full" / "adapter_model.safetensors")
    b = load_file(tmp_path / "stop" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    def losses(run):
        rows = [json.loads(x) for x in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
        return [(r["step"], r["loss"]) for r in rows if "loss" in r]

    assert losses("full") == losses("stop")


@pytest.mark.parametrize("peft", ["none", "lora"])
def test_bf16_updates_fp32_master_weights_and_resumes_bitwise(tmp_path, tiny_model_dir, lmforge_cache, peft):
    """In bf16 the model computes in bf16 and the optimizer updates fp32 masters: updates far below bf16's
    resolution still land, the saved weights are fp32 (config.json says so), and resume stays bitwise."""
    import shutil

    data = write_jsonl(tmp_path / "d.jsonl", chat_rows(24))
    sections = dict(model={"name_or_path": str(tiny_model_dir), "dtype": "bfloat16"}, peft={"kind": peft, "r": 4},
                    train={"engine": "native", "max_steps": 4, "save_steps": 2, "learning_rate": 1e-6,
                           "per_device_train_batch_size": 2, "gradient_accumulation_steps": 2})
    full = tmp_path / "full"
    assert main(["train", str(write_config(tmp_path / "a.yaml", base_config(tiny_model_dir, data, full, **sections)))]) == 0
    fname = "model.safetensors" if peft == "none" else "adapter_model.safetensors"
    after = load_file(full / fname)
    assert all(t.dtype == torch.float32 for t in after.values())
    if peft == "none":
        assert json.loads((full / "config.json").read_text())["dtype"] == "float32"
        w0 = load_file(tiny_model_dir / "model.safetensors")["model.layers.0.self_attn.q_proj.weight"]
        w1 = after["model.layers.0.self_attn.q_proj.weight"]
        assert (w0 != w1).float().mean() > 0.9  # ~4e-6 moves: rounded away in bf16 weights, kept in fp32 masters
        assert (w1.to(torch.bfloat16).float() == w0.to(torch.bfloat16).float()).float().mean() > 0.9
    else:
        assert any(t.abs().sum() > 0 for k, t in after.items() if "lora_B" in k)
    crashed = tmp_path / "crashed"
    crashed.mkdir()
    shutil.copytree(full / "checkpoint-2", crashed / "checkpoint-2")
    assert main(["train", str(write_config(tmp_path / "b.yaml", base_config(tiny_model_dir, data, crashed, **sections)))]) == 0
    resumed = load_file(crashed / fname)
    assert after.keys() == resumed.keys() and all(torch.equal(after[k], resumed[k]) for k in after)


def test_gradient_checkpointing_recomputes_and_changes_nothing(tmp_path, tiny_model_dir, lmforge_cache, monkeypatch):
    import transformers.modeling_utils as modeling_utils

    calls = []
    real = modeling_utils.checkpoint  # what gradient_checkpointing_enable binds the layers to
    monkeypatch.setattr(modeling_utils, "checkpoint", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    data = write_jsonl(tmp_path / "d.jsonl", chat_rows(16))
    losses = {}
    for gc in (False, True):
        cfg = write_config(tmp_path / f"{gc}.yaml", base_config(
            tiny_model_dir, data, tmp_path / f"out-{gc}",
            train={"engine": "native", "max_steps": 2, "gradient_checkpointing": gc}))
        assert main(["train", str(cfg)]) == 0
        losses[gc] = [json.loads(x)["loss"] for x in (tmp_path / f"out-{gc}" / "metrics.jsonl").read_text().splitlines()
                      if "loss" in json.loads(x)]
        assert bool(calls) == gc  # the decoder layers were checkpointed only when asked
    assert losses[True] == pytest.approx(losses[False], rel=1e-6)


def test_fast_dropout_drops_p_and_keeps_the_mean():
    from lmforge.training.dropout import FastDropout, use_fast_lora_dropout

    torch.manual_seed(0)
    d = FastDropout(0.1)
    x = torch.ones(1000, 1000, requires_grad=True)
    y = d(x)
    dropped = (y == 0).float().mean().item()
    assert abs(dropped - 0.1) < 0.002  # 1e6 draws: the standard error is 3e-4
    assert y.mean().item() == pytest.approx(1.0, abs=0.005)  # kept inputs are scaled by 1 / keep-probability
    assert torch.allclose(y[y != 0], torch.tensor(32768 / (32768 - round(0.1 * 32768))))
    y.sum().backward()
    assert torch.equal(x.grad, y.detach())  # the gradient is the same mask and scale
    d.eval()
    assert d(x) is x
    torch.manual_seed(1)
    a = FastDropout(0.5)(torch.ones(7, 9))
    torch.manual_seed(1)
    assert torch.equal(a, FastDropout(0.5)(torch.ones(7, 9)))  # seeded: resume stays bitwise
    assert FastDropout(1.0)(torch.ones(3)).eq(0).all()

    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    model = get_peft_model(LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32,
                                                        num_hidden_layers=1, num_attention_heads=2)),
                           LoraConfig(r=2, lora_dropout=0.1, target_modules="all-linear"))
    assert use_fast_lora_dropout(model) == 7  # q, k, v, o, gate, up, down
    assert not any(type(m) is torch.nn.Dropout and m.p > 0 for m in model.modules())



@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_fused_lora_linear_equals_peft(dropout):
    """The fused LoRA layer's output and gradients (input, A, B; a trainable bias too) against PEFT's own forward on
    the same dropout draws, in float64; adapters disabled or several active fall back to PEFT's forward."""
    from peft import LoraConfig, get_peft_model

    from lmforge.training.dropout import use_fast_lora_dropout
    from lmforge.training.lora_linear import use_fused_lora

    def build():
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Linear(12, 20), torch.nn.ReLU(), torch.nn.Linear(20, 6, bias=False))
        model = get_peft_model(net, LoraConfig(r=3, lora_alpha=5, lora_dropout=dropout, target_modules=["0", "2"],
                                               modules_to_save=None, init_lora_weights=False)).double()
        model.base_model.model[0].base_layer.bias.requires_grad_(True)
        use_fast_lora_dropout(model)
        return model

    x = torch.randn(4, 5, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    results = []
    for fused in (False, True):
        model = build()
        if fused:
            assert use_fused_lora(model) == 2
        xi = x.clone().requires_grad_()
        torch.manual_seed(2)  # the same dropout draws for both
        out = model(xi)
        out.pow(2).sum().backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
        assert len(grads) == 5  # A and B of both layers, and the bias
        results.append((out.detach(), xi.grad, grads))
    (out0, gx0, g0), (out1, gx1, g1) = results
    torch.testing.assert_close(out1, out0, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gx1, gx0, rtol=1e-12, atol=1e-12)
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], rtol=1e-12, atol=1e-12, msg=name)
    with model.disable_adapter():  # PEFT's own path: the base alone
        torch.testing.assert_close(model(x), model.base_model.model[2].base_layer(
            torch.relu(model.base_model.model[0].base_layer(x))))

_FRAGMENTED_HEAP = """
import json
from lmforge.training.memory import HeapTrim, rss_bytes
trim = HeapTrim(slack=16 * 2 ** 20, fraction=0)
share = HeapTrim(slack=16 * 2 ** 20, fraction=100.0)  # the same slack, but a share of RSS never reached
trim.after_step(); share.after_step()  # the references
blocks = [bytearray(b"x" * 100_000) for _ in range(800)]  # 80 MB in the C heap (below the mmap threshold)
pin = bytearray(b"x" * 100_000)  # a live block above them: the heap's top cannot shrink on free
del blocks  # free, but the pages stay with the process
before = rss_bytes()
small = HeapTrim(slack=2 ** 40)
small.after_step(); small.after_step()  # a slack never reached: no trim
share.after_step()
trim.after_step()
print(json.dumps({"before": before, "after": rss_bytes(), "trims": trim.trims, "untrimmed": small.trims + share.trims}))
"""


def test_heap_trim_returns_freed_pages_once_rss_grew_past_the_slack():
    """A step's freed activations stay in glibc's heap and fragment it (RSS grew ~30 MB a step in a streaming run);
    the engines call HeapTrim after each step."""
    from lmforge.training.memory import _malloc_trim

    if _malloc_trim() is None:
        pytest.skip("not glibc: no malloc_trim")
    proc = subprocess.run([sys.executable, "-c", _FRAGMENTED_HEAP], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout)
    assert got["trims"] == 1 and got["untrimmed"] == 0
    assert got["before"] - got["after"] > 60 * 2 ** 20, got  # most of the 80 MB went back to the OS


def _saved_activation_bytes(model, ids, outputs=None) -> int:
    """Bytes autograd keeps for the backward of ``model``'s loss on ``ids``, each storage once, parameters left out;
    inside ``outputs`` (a recompute.NormOutputs) what it keeps as a recipe is not counted."""
    import contextlib

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        packed = outputs.pack(t) if outputs is not None else t
        storage = t.untyped_storage()
        if packed is t and storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return packed

    with outputs if outputs is not None else contextlib.nullcontext(), \
            torch.autograd.graph.saved_tensors_hooks(pack, outputs.unpack if outputs is not None else lambda t: t):
        loss = model(input_ids=ids, labels=ids).loss
    return loss, sum(seen.values())


def test_recompute_layers_equal_the_modules_and_keep_less():
    """RMSNorm and the SwiGLU MLP as hand-written nodes (training/recompute.py): loss and every gradient equal the
    transformers modules' (bf16 bitwise here; float64 to fp32's rounding), and the saved
    activations shrink by exactly the hand count: per token, 4 C bytes per norm (its fp32 input copy and bf16
    normalised output, against a bf16 input) and 4 I bytes per MLP (SiLU output and product, bf16); inside
    ``NormOutputs`` 2 C more per norm (its output, the next linears' saved input, remade in the backward)."""
    import copy

    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.utils import is_kernels_available

    from lmforge.training.recompute import NormOutputs, use_recompute_layers

    C, I, L, B, T = 32, 48, 2, 2, 9
    conf = LlamaConfig(vocab_size=64, hidden_size=C, intermediate_size=I, num_hidden_layers=L, num_attention_heads=4,
                       num_key_value_heads=2)
    ids = torch.randint(0, 64, (B, T), generator=torch.Generator().manual_seed(0))
    for dtype in (torch.float64, torch.bfloat16):
        torch.manual_seed(0)
        ref = LlamaForCausalLM(conf).to(dtype)
        with torch.no_grad():
            for p in ref.parameters():  # norms away from 1, so their weight gradient is tested too
                p.add_(torch.randn_like(p) * 0.1)
        new = copy.deepcopy(ref)
        if is_kernels_available():  # as from_pretrained leaves a model then: each train()/eval() re-kernelizes it
            new.use_kernels = True
        assert use_recompute_layers(new) == 2 * L + 1 + L  # two norms per layer and the final one; the MLPs
        assert use_recompute_layers(new) == 0  # already done
        new.eval(), new.train()  # the engine switches modes (evaluation, generation) between steps
        results = []
        for model, outputs in ((ref, None), (new, NormOutputs())):
            loss, saved = _saved_activation_bytes(model, ids, outputs)
            loss.backward()
            results.append((loss.detach(), saved, {n: p.grad for n, p in model.named_parameters()}))
        (loss0, saved0, g0), (loss1, saved1, g1) = results
        # float64: both take the norm's statistics in fp32 (as transformers does), so they agree to fp32's rounding
        tol = dict(rtol=0, atol=0) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(loss1, loss0, **tol)
        for name in g0:
            torch.testing.assert_close(g1[name], g0[name], **tol, msg=name)
        if dtype == torch.bfloat16:
            assert saved0 - saved1 == B * T * (L * (2 * 6 * C + 4 * I) + 6 * C)


def test_split_masters_are_exact_and_step_as_whole_fp32_masters(monkeypatch):
    """bf16 masters are the model's bf16 weight plus an int16 remainder (training/precision.py): the split gives
    back the exact fp32 bits (negative, subnormal, huge, inf, NaN), its bf16 half is torch's rounding except on
    exact ties, and AdamW on split masters (in chunks, or whole for other optimizers) gives bitwise the fp32
    weights and optimizer state of AdamW on whole fp32 masters."""
    from lmforge.training import precision

    torch.manual_seed(0)
    x = torch.cat([torch.randn(4000) * 0.02, torch.randn(1000) * 1e30, torch.randn(1000) * 1e-41,  # subnormals
                   torch.tensor([0.0, -0.0, float("inf"), -float("inf"), float("nan"), 3.4028235e38, -1e-45])])
    x = x.view(torch.int32)
    ties = torch.tensor([0x3C808000, 0x3C818000, -0x437F8000, 0x00008000], dtype=torch.int32)  # low 16 bits 0x8000
    x = torch.cat([x, torch.randint(-2 ** 31, 2 ** 31 - 1, (4000,), dtype=torch.int32), ties]).view(torch.float32)
    hi, lo = torch.empty(x.shape, dtype=torch.bfloat16), torch.empty(x.shape, dtype=torch.int16)
    precision.split(x.clone(), hi, lo)
    assert torch.equal(precision.join(hi, lo, torch.empty(x.shape)).view(torch.int32), x.view(torch.int32))
    tie = (x.view(torch.int32) & 0xFFFF) == 0x8000
    assert torch.equal(hi[tie].view(torch.int16), ((x[tie].view(torch.int32) >> 16) + 1).short())  # up, in bits
    finite = torch.isfinite(x) & ~tie
    assert torch.equal(hi[finite].view(torch.int16), x[finite].to(torch.bfloat16).view(torch.int16))

    monkeypatch.setattr(precision, "CHUNK", 1000)  # chunk boundaries inside the tensors (each 1001+ elements)
    shapes = [(13, 77), (1001,), (40, 31)]
    for fused in (True, False):  # chunked fused AdamW; foreach AdamW on whole rebuilt tensors
        torch.manual_seed(1)
        model = torch.nn.ParameterList([torch.nn.Parameter(torch.randn(s) * 0.02) for s in shapes])
        ref = [torch.nn.Parameter(p.detach().clone()) for p in model]
        master = precision.MasterWeights(model, torch.bfloat16)
        masters = [m for _, m in master.named_trainable()]
        opts = [torch.optim.AdamW([{"params": ps[:2], "weight_decay": 0.1}, {"params": ps[2:], "weight_decay": 0.0}],
                                  lr=1e-3, fused=fused, foreach=not fused) for ps in (masters, ref)]
        for _ in range(3):
            for m, r in zip(masters, ref):
                m.grad = torch.randn(m.shape)
                r.grad = m.grad.clone()
            master.step(opts[0])
            opts[1].step()
        state = master.state_dict()
        for k, r in zip(state, ref):
            assert torch.equal(state[k].view(torch.int32), r.detach().view(torch.int32))
        a, b = opts[0].state_dict()["state"], opts[1].state_dict()["state"]
        assert all(torch.equal(a[i][k], b[i][k]) and a[i][k].dtype == b[i][k].dtype for i in b for k in b[i])
        for (_, p, _, _), r in zip(master.pairs, ref):  # the model computes with the fp32 weights' rounding
            assert (p.view(torch.int16) != r.detach().to(torch.bfloat16).view(torch.int16)).sum() <= 2  # ties


@pytest.mark.parametrize("max_norm", [0.05, float("inf")])
def test_masters_stepping_the_models_bf16_grads_equal_fp32_master_grads(monkeypatch, max_norm):
    """One micro-batch in one process (``model_grads``): the step reads the model's bf16 gradients, widened a chunk at
    a time, and gives bitwise the grad norm, fp32 weights and optimizer state of collecting them into fp32 master
    gradients first, clipped (0.05: the factor applied) or not, for chunked fused AdamW and whole-tensor AdamW; the
    norm is torch's ``clip_grad_norm_``'s to fp32's rounding. Fused AdamW's states made before the first step
    (``init_state``) step as those made at it."""
    from lmforge.training import precision

    monkeypatch.setattr(precision, "CHUNK", 1000)  # chunk boundaries inside the tensors
    shapes = [(13, 77), (1001,), (40, 31), (7,)]
    for fused in (True, False):
        runs = []
        for model_grads in (False, True):
            torch.manual_seed(1)
            model = torch.nn.ParameterList([torch.nn.Parameter(torch.randn(s) * 0.02) for s in shapes])
            master = precision.MasterWeights(model, torch.bfloat16, model_grads=model_grads)
            opt = torch.optim.AdamW([m for _, m in master.named_trainable()], lr=1e-3, fused=fused, foreach=not fused)
            if model_grads:  # the engine makes fused AdamW's states before the first step: the same as made at it
                master.init_state(opt)
                assert sum("exp_avg" in st for st in opt.state.values()) == (len(shapes) if fused else 0)
            norms = []
            for step in range(3):
                for i, (_, p, _, _) in enumerate(master.pairs):
                    p.grad = None if (step, i) == (1, 3) else (torch.randn(p.shape) * 0.01).to(torch.bfloat16)
                master.collect_grads()
                grads = [m.grad for _, _, m, _ in master.pairs if m.grad is not None]
                torch_norm = torch.nn.utils.get_total_norm(grads) if grads else None
                norms.append(master.clip_grad_norm_(max_norm))
                if torch_norm is not None:  # torch's norm, summed in another order
                    torch.testing.assert_close(norms[-1], torch_norm, rtol=1e-6, atol=0)
                master.step(opt)
                opt.zero_grad(set_to_none=True)
                assert all(p.grad is None for _, p, _, _ in master.pairs)
            runs.append((norms, master.state_dict(), opt.state_dict()["state"]))
        (n0, w0, s0), (n1, w1, s1) = runs
        assert all(torch.equal(a, b) for a, b in zip(n0, n1))
        assert max(float(n) for n in n0) > 0.05 or max_norm == float("inf")  # the clip factor is used
        assert all(torch.equal(w0[k].view(torch.int32), w1[k].view(torch.int32)) for k in w0)
        assert all(torch.equal(s0[i][k], s1[i][k]) for i in s0 for k in s0[i])
