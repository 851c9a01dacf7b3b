"""`lmforge estimate`: the memory arithmetic on the tiny Llama against counts worked out by hand, that nothing
heavy is loaded (no weights read or dequantised), --json, the cheapest change that fits, and errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from conftest import base_config, chat_rows, write_config, write_jsonl
from lmforge.cli import main
from lmforge.config import load_config
from lmforge.training import estimate as est_mod
from lmforge.training import estimate_report
from lmforge.training import estimate_inputs, estimate_probe
from lmforge.training.estimate import GB, Estimator
from lmforge.training.estimate_inputs import Machine

# The tiny Llama of conftest.py: hidden 32, intermediate 64, 2 layers, 4 heads of 8 (2 key/value heads), untied.
H, I, L, KV = 32, 64, 2, 16  # KV: 2 kv heads x head_dim 8
PER_LAYER = (H * H + H * KV + H * KV + H * H  # q, k, v, o
             + H * I + H * I + I * H  # gate, up, down
             + 2 * H)  # two RMSNorms
assert PER_LAYER == 9280


def vocab(model_dir) -> int:
    return json.loads((model_dir / "config.json").read_text())["vocab_size"]


def hand_total(V: int) -> int:
    return V * H + L * PER_LAYER + H + V * H  # embeddings, layers, final norm, untied LM head


def machine(available=20 * GB) -> Machine:
    return Machine(cpu="test cpu", available=int(available), gpu_memory=None, peak_flops=1e11)


@pytest.fixture()
def setup(tmp_path, tiny_model_dir, lmforge_cache):
    data = write_jsonl(tmp_path / "d.jsonl", chat_rows(40))

    def make(**sections):
        tree = base_config(tiny_model_dir, data, tmp_path / "out", **sections)
        return load_config(None, tree=tree)

    return make


def estimator(cfg, world=1, available=20 * GB) -> Estimator:
    return Estimator(cfg, world, machine=machine(available))


def test_parameters_match_a_hand_count_and_transformers(setup, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    e = estimator(setup())
    V = vocab(tiny_model_dir)
    assert e.shape.total == hand_total(V)
    assert e.shape.total == sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(tiny_model_dir).parameters())
    est = e.estimate()
    assert est.parameters == est.trainable == hand_total(V)  # full fine-tune


@pytest.mark.parametrize("peft, expected", [
    # r x (in + out) per adapted linear, per layer, times 2 layers
    ({"kind": "lora", "r": 4}, L * 4 * ((H + H) + (H + KV) + (H + KV) + (H + H) + (H + I) + (H + I) + (I + H))),
    ({"kind": "lora", "r": 8, "target_modules": ["q_proj", "v_proj"]}, L * 8 * ((H + H) + (H + KV))),
    # DoRA: + a magnitude vector of out_features per adapted linear
    ({"kind": "dora", "r": 4}, L * (4 * ((H + H) + (H + KV) + (H + KV) + (H + H) + (H + I) + (H + I) + (I + H))
                                    + (H + KV + KV + H + I + I + H))),
    ({"kind": "prompt_tuning", "num_virtual_tokens": 10}, 10 * H),
])
def test_trainable_parameters_by_hand(setup, tiny_model_dir, peft, expected):
    cfg = setup(peft=peft, data={"packing": False} if peft["kind"] == "prompt_tuning" else {})
    est = estimator(cfg).estimate()
    assert est.trainable == expected
    # and PEFT itself agrees on the real model
    from transformers import AutoModelForCausalLM

    from lmforge.adapters import apply_peft, count_parameters

    model = apply_peft(AutoModelForCausalLM.from_pretrained(tiny_model_dir), cfg.peft)
    assert count_parameters(model)[0] == expected


def test_train_trainable_globs(setup, tiny_model_dir):
    est = estimator(setup(train={"trainable": ["*.mlp.*"]})).estimate()
    assert est.trainable == L * 3 * H * I


def test_memory_full_finetune_fp32_and_sharding_by_hand(setup, tiny_model_dir):
    N = hand_total(vocab(tiny_model_dir))
    est = estimator(setup(train={"distributed": "ddp"}), world=2).estimate()
    m = est.memory
    none = m["none"]
    assert (none["weights"], none["masters"], none["gradients"], none["optimizer"]) == (4 * N, 0, 4 * N, 8 * N)
    assert m["ddp"]["optimizer"] == 8 * N and m["ddp"]["buffers"] == 4 * N  # the flat all-reduce buffer
    # FSDP2: fp32 shards, gradients and AdamW's two fp32 states split over the 2 processes
    assert m["fsdp"]["optimizer"] == 8 * N // 2
    assert m["fsdp"]["gradients"] == 4 * N // 2 + 4 * PER_LAYER  # + one layer's unsharded gradients
    root = N - L * PER_LAYER  # embeddings, final norm, head: gathered for the whole step
    assert m["fsdp"]["weights"] == 4 * N // 2 + 4 * (root + 2 * PER_LAYER)
    # ZeRO: stage 1 shards the optimizer, 2 also the gradients, 3 also the weights
    assert m["zero1"]["optimizer"] == m["zero2"]["optimizer"] == m["zero3"]["optimizer"] == 8 * N // 2
    assert m["zero1"]["gradients"] == 4 * N and m["zero2"]["gradients"] == 4 * N // 2
    assert m["zero1"]["weights"] == m["zero2"]["weights"] == 4 * N and m["zero3"]["weights"] == 4 * N // 2
    assert m["zero3_offload"]["optimizer"] == 0 and m["zero3_offload"]["offloaded"] >= 8 * N // 2


def test_memory_bf16_master_weights_and_lora_by_hand(setup, tiny_model_dir):
    N = hand_total(vocab(tiny_model_dir))
    full = estimator(setup(model={"dtype": "bfloat16"})).estimate().memory["none"]
    # native engine: the model in bf16, fp32 masters as its bf16 weights + 2-byte remainders, fused AdamW; one
    # micro-batch in one process: the bf16 gradients only (the step widens them a chunk at a time)
    assert (full["weights"], full["masters"], full["gradients"], full["optimizer"]) == (2 * N, 2 * N, 2 * N, 8 * N)
    accumulated = estimator(setup(model={"dtype": "bfloat16"}, train={"gradient_accumulation_steps": 2}))
    assert accumulated.estimate().memory["none"]["gradients"] == 6 * N  # bf16, then fp32 master gradients
    lora = estimator(setup(model={"dtype": "bfloat16"}, peft={"kind": "lora", "r": 4})).estimate()
    T = lora.trainable
    m = lora.memory["none"]
    assert (m["weights"], m["masters"], m["gradients"], m["optimizer"]) == (2 * N + 2 * T, 2 * T, 2 * T, 8 * T)
    sgd = estimator(setup(model={"dtype": "bfloat16"}, train={"optim": "sgd"})).estimate().memory["none"]
    assert sgd["optimizer"] == 0 and sgd["buffers"] == 4 * N  # its step rebuilds every fp32 master at once
    assert sgd["gradients"] == 6 * N  # ... and gets fp32 gradients


def test_qlora_base_is_four_bit(setup, tiny_model_dir):
    V = vocab(tiny_model_dir)
    est = estimator(setup(peft={"kind": "qlora", "r": 4})).estimate()
    linear = L * (PER_LAYER - 2 * H)  # every linear weight but the LM head is quantised
    rest = hand_total(V) - linear  # embeddings, norms, head: fp32 after prepare_model_for_kbit_training
    expected = linear * est_mod.NF4_BYTES + rest * 4 + est.trainable * 4
    assert est.memory["none"]["weights"] == int(expected)
    assert "fsdp" not in est.memory  # refused with qlora (distributed/checks.py)


def test_peak_by_hand_with_the_heap_kept(setup):
    """peak = runtime + weights + masters + optimizer + the larger of 1.2 x activations and gradients + buffers,
    + the heap the engines let RSS keep (HeapTrim's slack), + for QLoRA in bf16 0.3 x the activations as counted
    without checkpointing (its casts' holes in the heap), with checkpointing too."""
    def parts(**sections):
        est = estimator(setup(**sections)).estimate()
        return est.memory["none"], est.peak

    lora, peak = parts(model={"dtype": "bfloat16"}, peft={"kind": "lora", "r": 4})
    assert lora["heap"] == est_mod.HEAP_SLACK == 256 * 2 ** 20  # memory.SLACK
    static = lora["weights"] + lora["masters"] + lora["optimizer"]
    assert peak == lora["peak"] == est_mod.BASELINE_BYTES + static + max(
        int(1.2 * lora["activations"]), lora["gradients"] + lora["buffers"]) + lora["heap"]
    for gc in (False, True):
        qlora, peak = parts(model={"dtype": "bfloat16"}, peft={"kind": "qlora", "r": 4},
                            train={"gradient_checkpointing": gc})
        assert qlora["heap"] == est_mod.HEAP_SLACK + int(0.3 * qlora["activations"])
        used = qlora["activations_checkpointed"] if gc else qlora["activations"]
        assert peak == est_mod.BASELINE_BYTES + qlora["weights"] + qlora["optimizer"] + max(
            int(1.2 * used), qlora["gradients"] + qlora["buffers"]) + qlora["heap"]
    fp32, _ = parts(peft={"kind": "qlora", "r": 4})  # no bf16 casts: nothing more than the slack
    assert fp32["heap"] == est_mod.HEAP_SLACK


@pytest.mark.parametrize("peft", ["none", "lora"])
def test_activations_track_saved_tensors_and_checkpointing(setup, tiny_model_dir, peft):
    """The activation count against the bytes autograd really saves on the tiny model (fp32, one row; LoRA with
    the native engine's dropout)."""
    from transformers import AutoModelForCausalLM

    from lmforge.adapters import apply_peft
    from lmforge.data.packing import CausalCollator
    from lmforge.training.losses import token_loss_sum
    from lmforge.training.dropout import use_fast_lora_dropout
    from lmforge.training.estimate import MicroBatch, activation_bytes

    cfg = setup(data={"packing": False}, peft={"kind": peft, "r": 4, "dropout": 0.1},
                train={"per_device_train_batch_size": 1})
    e = estimator(cfg)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, attn_implementation="sdpa")
    model = apply_peft(model, cfg.peft)
    use_fast_lora_dropout(model)
    model.train()
    ids = list(range(5, 105))
    row = {"input_ids": ids, "labels": [-100] * 50 + ids[50:]}
    batch = CausalCollator(0, packed=False)([row])
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen, total = set(), 0

    def pack(t):
        nonlocal total
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype)
        if key not in seen and key[0] not in weights:
            seen.add(key)
            total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        token_loss_sum(model, batch)
    loss_tokens = 49
    total += head_transient(e.shape.vocab, e.shape.hidden, loss_tokens, 4, trained=peft == "none")
    mb = MicroBatch(positions=100, tokens=100, loss_tokens=loss_tokens, attention=100 * 100)
    adapters = e._adapter_activations(trainable_of(e, cfg), cfg, "native", 4)
    predicted = activation_bytes(e.shape, mb, 4, False, **adapters)
    assert 0.85 * total < predicted < 1.2 * total, (predicted, total)  # measured 1.01 (full), 1.09 (LoRA)
    checkpointed = activation_bytes(e.shape, mb, 4, True, **adapters)
    assert checkpointed < predicted


def test_activations_of_the_native_recompute_nodes_track_saved_tensors(setup, tiny_model_dir):
    """A bf16 full fine-tune on the native engine's nodes (training/recompute.py: norms keep their inputs, their
    outputs remade, SwiGLU keeps gate and up): the count with ``recompute`` against the bytes autograd saves."""
    from transformers import AutoModelForCausalLM

    from lmforge.data.packing import CausalCollator
    from lmforge.training.estimate import RECOMPUTED_MODELS, MicroBatch, activation_bytes
    from lmforge.training.losses import token_loss_sum
    from lmforge.training.recompute import NormOutputs, use_recompute_layers

    cfg = setup(data={"packing": False}, model={"dtype": "bfloat16"}, train={"per_device_train_batch_size": 1})
    e = estimator(cfg)
    assert e.shape.model_type in RECOMPUTED_MODELS
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16, attn_implementation="sdpa")
    assert use_recompute_layers(model) > 0
    model.train()
    ids = list(range(5, 105))
    batch = CausalCollator(0, packed=False)([{"input_ids": ids, "labels": [-100] * 50 + ids[50:]}])
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen, total = set(), 0
    outputs = NormOutputs()

    def pack(t):
        nonlocal total
        packed = outputs.pack(t)  # a norm output the next linears save is kept as its recipe: not counted
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype)
        if packed is t and key not in seen and key[0] not in weights:
            seen.add(key)
            total += t.numel() * t.element_size()
        return packed

    with outputs, torch.autograd.graph.saved_tensors_hooks(pack, outputs.unpack):
        token_loss_sum(model, batch)
    total += head_transient(e.shape.vocab, e.shape.hidden, 49, 2, trained=True)
    mb = MicroBatch(positions=100, tokens=100, loss_tokens=49, attention=100 * 100)
    predicted = activation_bytes(e.shape, mb, 2, False, recompute=True)
    assert 0.85 * total < predicted < 1.2 * total, (predicted, total)
    assert predicted < 0.75 * activation_bytes(e.shape, mb, 2, False)  # autograd's modules keep more


def head_transient(V: int, H: int, loss_tokens: int, b: int, trained: bool) -> int:
    """What the chunked LM head (training/cross_entropy.py) holds at its last chunk besides what it saves: the
    chunk's fp32 logits and their gradient cast to the compute dtype, and a trained head's fp32 gradient sum."""
    from lmforge.training.cross_entropy import rows_per_chunk

    return min(loss_tokens, rows_per_chunk(V)) * V * (4 + b) + (V * H * 4 if trained else 0)


def trainable_of(e, cfg):
    return estimate_inputs.trainable(e.shape, cfg)


def _saved_bytes_bf16(cfg) -> tuple[int, object]:
    """Bytes autograd saves in one forward of two packed rows (padded to the longer) on the tiny model, set up in
    bf16 as the native engine sets it up (native.py): LoRA's adapters in bf16 with fp32 masters, QLoRA's fp32
    adapters and 4-bit base under autocast, FastDropout. Returns (bytes, the micro-batch)."""
    import contextlib

    from lmforge.methods.sft import CountingCollator
    from lmforge.training.losses import token_loss_sum
    from lmforge.training.attention import NAME, use_packed_attention
    from lmforge.training.dropout import use_fast_lora_dropout
    from lmforge.training.estimate import MicroBatch
    from lmforge.training.precision import MasterWeights
    from lmforge.training.run import load_model_and_tokenizer

    model, _, prec = load_model_and_tokenizer(cfg)
    if cfg.peft.kind == "lora":
        MasterWeights(model, prec.compute, trainable_only=True)
    use_fast_lora_dropout(model)
    assert use_packed_attention(model)
    model.train()
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if cfg.peft.kind == "qlora" else contextlib.nullcontext()
    rows = [{"input_ids": list(range(5, 105)), "labels": [-100] * 40 + list(range(45, 105)), "seq_lens": [30, 50, 20]},
            {"input_ids": list(range(7, 82)), "labels": [-100] * 35 + list(range(42, 82)), "seq_lens": [40, 35]}]
    batch = CountingCollator(0, packed=True, attn_implementation=NAME)(rows)
    batch.pop("num_tokens")
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen, total, kept = set(), 0, []

    def pack(t):
        nonlocal total
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype)
        # not the causal masks: attention.py's cache, shared by every layer and every step
        if key not in seen and key[0] not in params and t.dtype != torch.bool:
            seen.add(key)
            total += t.numel() * t.element_size()
            kept.append(t)  # alive until counted: no later tensor at its address is taken for it
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast:
        token_loss_sum(model, batch)
    loss_tokens = sum(1 for r in rows for x in r["labels"][1:] if x != -100)  # where the LM head runs
    mb = MicroBatch(positions=2 * 100, tokens=175, loss_tokens=loss_tokens, attention=30**2 + 50**2 + 20**2 + 40**2
                    + 35**2)
    V, H = vocab(Path(cfg.model.name_or_path)), model.config.hidden_size
    return total + head_transient(V, H, loss_tokens, 2, trained=False), mb  # + the head's transients (see above)


@pytest.mark.parametrize("peft", ["lora", "qlora"])
def test_adapter_activations_in_bf16_by_hand_and_against_saved_tensors(setup, tiny_model_dir, peft):
    """bf16 LoRA and QLoRA as the native engine runs them. By hand, per position and layer of the tiny model:
    LoRA's dropout (``FastDropout``) keeps its mask as a multiplier in its input's dtype, and LoRA's A keeps the
    dropped input, 2 + 2 bytes per element of the 7 adapted modules' inputs (d = 5H + q + I = 256 elements);
    without dropout LoRA's A keeps the shared inputs only (2H + q + I). QLoRA's residual stream is fp32
    (prepare_model_for_kbit_training, Linear4bit's output in its input's dtype): a 4-byte mask and a bf16 cast
    per element with dropout, the bf16 cast without. Then the whole count against what autograd saves."""
    if peft == "qlora":
        pytest.importorskip("bitsandbytes")
    from lmforge.training.estimate import activation_bytes

    d, q = 5 * H + 32 + I, 32
    per_element = {"lora": 2 + 2, "qlora": 4 + 2}[peft]
    without = {"lora": 2 * (2 * H + q + I), "qlora": 2 * d}[peft]
    counted = {}
    for dropout in (0.1, 0.0):
        cfg = setup(model={"dtype": "bfloat16"}, peft={"kind": peft, "r": 4, "dropout": dropout})
        e = estimator(cfg)
        saved, mb = _saved_bytes_bf16(cfg)
        adapters = e._adapter_activations(trainable_of(e, cfg), cfg, "native", 2)
        counted[dropout] = (saved, activation_bytes(e.shape, mb, 2, False, **adapters))
        # measured 1.12-1.13 (LoRA), 1.09-1.12 (QLoRA): the tiny vocabulary's logits weigh more than on SmolLM2
        assert 0.85 * saved < counted[dropout][1] < 1.2 * saved, (peft, dropout, counted[dropout])
    by_hand = L * mb.positions * (per_element * d - without)
    assert counted[0.1][1] - counted[0.0][1] == by_hand
    # what autograd saves for dropout, exactly, but for the first layer's q/k/v masks (not counted by the estimate):
    # their input comes from the frozen embedding and needs no gradient
    first_layer = mb.positions * 3 * H * {"lora": 2, "qlora": 4}[peft]
    assert counted[0.1][0] - counted[0.0][0] == by_hand - first_layer


def test_never_loads_weights(tmp_path, tiny_model_dir, lmforge_cache, monkeypatch, capsys):
    """A model directory whose weights file is garbage, and from_pretrained made to fail: estimate still works."""
    from transformers import PreTrainedModel

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    (model / "model.safetensors").write_bytes(b"not a safetensors file")

    def refuse(*a, **k):
        raise AssertionError("estimate loaded weights")

    monkeypatch.setattr(PreTrainedModel, "from_pretrained", classmethod(refuse))
    data = write_jsonl(tmp_path / "d.jsonl", chat_rows(20))
    cfg = write_config(tmp_path / "c.yaml", base_config(model, data, tmp_path / "out"))
    assert main(["estimate", str(cfg), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["parameters"] == hand_total(vocab(tiny_model_dir))
    assert {"weights", "gradients", "optimizer", "activations", "activations_checkpointed", "peak"} <= set(
        out["memory"]["none"])
    assert out["time"]["tokens_per_second"] > 0 and out["step"]["steps"] == 4
    assert out["fits"] is True
    assert not (tmp_path / "out").exists()  # nothing written


def test_gguf_read_from_metadata_without_dequantising(tmp_path, tiny_model_dir, lmforge_cache, monkeypatch):
    from lmforge import models

    gguf = tmp_path / "tiny.gguf"
    assert main(["export", "--model", str(tiny_model_dir), "--format", "gguf", "--output", str(gguf)]) == 0

    def refuse(*a, **k):
        raise AssertionError("estimate dequantised the GGUF file")

    monkeypatch.setattr(models, "_dequantise_gguf", refuse)
    data = write_jsonl(tmp_path / "d.jsonl", chat_rows(20))
    cfg = load_config(None, tree=base_config(gguf, data, tmp_path / "out"))
    est = estimator(cfg).estimate()
    assert est.parameters == hand_total(vocab(tiny_model_dir))
    assert "GGUF metadata" in est.model["source"]
    assert not (lmforge_cache / "models").exists()  # no import cache entry was made


def test_text_output_and_train_logs_the_one_line(tmp_path, tiny_model_dir, lmforge_cache, capsys, monkeypatch):
    from lmforge.training import flops

    monkeypatch.setattr(estimate_probe, "BUSY", float("inf"))  # the speed probe and the matmul peak are cached even
    monkeypatch.setattr(flops, "BUSY", float("inf"))  # on a shared machine, so `train` reads what `estimate` measured
    data = write_jsonl(tmp_path / "d.jsonl", chat_rows(20))
    cfg = write_config(tmp_path / "c.yaml", base_config(tiny_model_dir, data, tmp_path / "out",
                                                          train={"max_steps": 1, "save_steps": 1}))
    assert main(["estimate", str(cfg), "train.distributed=ddp", "--nproc-per-node", "2"]) == 0
    text = capsys.readouterr().out
    for word in ("parameters", "trainable", "memory per process", "zero3_offload", "tokens/s", "fits"):
        assert word in text
    assert main(["estimate", str(cfg), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert main(["train", str(cfg)]) == 0
    assert "[lmforge] estimate: peak" in capsys.readouterr().out
    # train wrote the estimate it logged into output_dir: the same as `estimate --json` (but the RAM free now)
    written = json.loads((tmp_path / "out" / "estimate.json").read_text())
    for d in (printed, written):
        d["machine"].pop("available")
        d.pop("fit_note")
    assert written == printed


def test_a_failing_estimate_never_stops_training(tmp_path, tiny_model_dir, lmforge_cache, monkeypatch, capsys):
    """The estimate fails: train says why in one line and goes on, and an earlier run's estimate.json goes, so the
    report does not set it beside this run's figures."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "estimate.json").write_text('{"peak": 1}')

    def fail(self, *a, **k):
        raise RuntimeError("no estimate today")

    monkeypatch.setattr(Estimator, "estimate", fail)
    data = write_jsonl(tmp_path / "d.jsonl", chat_rows(12))
    cfg = write_config(tmp_path / "c.yaml", base_config(tiny_model_dir, data, out, train={"max_steps": 1}))
    assert main(["train", str(cfg)]) == 0
    assert "[lmforge] estimate: unavailable (RuntimeError: no estimate today)" in capsys.readouterr().out
    assert not (out / "estimate.json").exists()
    assert "no estimate.json in output_dir" in (out / "report.md").read_text()


def test_does_not_fit_names_the_cheapest_change(setup):
    cfg = setup(train={"per_device_train_batch_size": 8})
    roomy = estimator(cfg).estimate()
    gc = estimator(setup(train={"per_device_train_batch_size": 8, "gradient_checkpointing": True})).estimate()
    assert gc.peak < roomy.peak
    available = (gc.peak + roomy.peak) / 2 / 0.9  # gradient checkpointing fits, the config as given does not
    tight = estimator(cfg, available=available).estimate()
    assert not tight.fits
    assert tight.change["overrides"] == ["train.gradient_checkpointing=true"]
    assert tight.change["peak"] == gc.peak
    assert "cheapest change that fits: gradient checkpointing" in estimate_report.render(tight)
    nothing = estimator(cfg, available=1).estimate()
    assert not nothing.fits and nothing.change["change"] is None and nothing.change["tried"]


def test_smaller_batch_when_checkpointing_is_on(setup):
    cfg = setup(train={"per_device_train_batch_size": 8, "gradient_checkpointing": True})
    now = estimator(cfg).estimate()
    half = estimator(setup(train={"per_device_train_batch_size": 4, "gradient_accumulation_steps": 2,
                                  "gradient_checkpointing": True})).estimate()
    assert half.peak < now.peak
    tight = estimator(cfg, available=(half.peak + now.peak) / 2 / 0.9).estimate()
    assert tight.change["overrides"][-2:] == ["train.per_device_train_batch_size=4",
                                              "train.gradient_accumulation_steps=2"]


def test_bad_config_key_exits_2(tmp_path, tiny_model_dir, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", chat_rows(4))
    cfg = write_config(tmp_path / "c.yaml", base_config(tiny_model_dir, data, tmp_path / "out"))
    assert main(["estimate", str(cfg), "train.learning_rat=1e-4"]) == 2
    assert "train.learning_rat" in capsys.readouterr().err


def test_prepared_data_gives_the_same_counts(tmp_path, tiny_model_dir, lmforge_cache):
    """Tokenising every row here (a small data set) and reading `lmforge prepare`'s cache agree exactly."""
    data = write_jsonl(tmp_path / "d.jsonl", chat_rows(40))
    tree = base_config(tiny_model_dir, data, tmp_path / "out")
    cfg = load_config(None, tree=tree)
    sampled = estimator(cfg).estimate()
    assert sampled.data["prepared"] is None and sampled.data["sampled"] == 40
    assert main(["prepare", str(write_config(tmp_path / "c.yaml", tree))]) == 0
    stats = json.loads(next((lmforge_cache / "data").glob("*/stats.json")).read_text())
    cached = estimator(cfg).estimate()
    assert cached.data["prepared"] is not None
    assert cached.data["rows"] == sampled.data["rows"] == stats["packed_rows"]
    assert cached.data["tokens"] == sampled.data["tokens"] == stats["tokens"]
    assert cached.step == sampled.step and cached.peak == sampled.peak


@pytest.mark.parametrize("case", ["dpo", "dpo_hf", "kto", "prompt_tuning", "from_scratch", "fsdp", "zero3"])
def test_every_kind_of_run_is_estimated(case, tmp_path, tiny_model_dir, lmforge_cache):
    """Preference methods (pairs), prompt tuning, a from-scratch model with a tokenizer trained on the data, and
    the sharded strategies all give an estimate without reading weights."""
    from lmforge.synthetic import preference_rows

    rows = preference_rows(12, 0) if case.startswith(("dpo", "kto")) else chat_rows(12)
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    tree = base_config(tiny_model_dir, data, tmp_path / "out")
    world = 1
    if case.startswith("dpo"):
        tree["method"] = "dpo"
        tree["train"]["engine"] = "hf" if case == "dpo_hf" else None
    elif case == "kto":
        tree["method"] = "kto"
    elif case == "prompt_tuning":
        tree["peft"] = {"kind": "prompt_tuning", "num_virtual_tokens": 4}
    elif case == "from_scratch":
        tree["method"] = "pretrain"
        write_jsonl(data, [{"text": t} for t in __import__("conftest").corpus(60)])
        tree["model"] = {"config": {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64,
                                    "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2},
                         "train_tokenizer": {"vocab_size": 300}, "dtype": "float32"}
    else:
        world = 2
        tree["train"].update(distributed="fsdp") if case == "fsdp" else tree["train"].update(
            distributed="deepspeed", deepspeed="zero3")
    est = estimator(load_config(None, tree=tree), world=world).estimate()
    assert est.parameters > 0 and est.peak > est_mod.BASELINE_BYTES and est.time["tokens_per_second"] > 0
    if case == "from_scratch":
        assert est.parameters == 300 * H * 2 + L * PER_LAYER + H  # vocab 300, untied head
    if case == "dpo_hf":  # TRL keeps a reference copy of the model for a full fine-tune
        assert est.memory["none"]["weights"] == 4 * est.parameters + 4 * est.parameters
    if case == "prompt_tuning":
        assert est.trainable == 4 * H
    assert est.strategy == {"fsdp": "fsdp", "zero3": "zero3"}.get(case, "none")


def test_qlora_weights_against_bitsandbytes(setup, tiny_model_dir):
    """The 4-bit base as bitsandbytes holds it: nf4 bytes + double-quantised scales per linear weight, everything
    else fp32 after prepare_model_for_kbit_training, adapters fp32."""
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM

    from lmforge.adapters import apply_peft, quantization_kwargs

    cfg = setup(peft={"kind": "qlora", "r": 4})
    est = estimator(cfg).estimate()
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16,
                                                 **quantization_kwargs(cfg.peft, torch.bfloat16))
    model = apply_peft(model, cfg.peft)
    quantised = other = 0
    for p in model.parameters():
        qs = getattr(p, "quant_state", None)
        if qs is None:
            other += p.numel() * p.element_size()
            continue
        quantised += p.numel() * p.element_size() + qs.absmax.numel() * qs.absmax.element_size()
        if qs.nested:  # the code tables are shared by every layer: not counted
            quantised += qs.state2.absmax.numel() * qs.state2.absmax.element_size() + qs.offset.element_size()
    linear = L * (PER_LAYER - 2 * H)
    assert other == (hand_total(vocab(tiny_model_dir)) - linear) * 4 + est.trainable * 4
    assert abs(quantised - linear * est_mod.NF4_BYTES) < 0.02 * quantised
    assert est.memory["none"]["weights"] == int(linear * est_mod.NF4_BYTES + other)


def test_continued_adapter_counts_its_own_config(tmp_path, tiny_model_dir, lmforge_cache):
    """model.name_or_path = an adapter directory: its adapter_config.json (r, targets) decides what trains."""
    data = write_jsonl(tmp_path / "d.jsonl", chat_rows(12))
    tree = base_config(tiny_model_dir, data, tmp_path / "adapter",
                       peft={"kind": "lora", "r": 2, "target_modules": ["q_proj"]}, train={"max_steps": 1})
    assert main(["train", str(write_config(tmp_path / "c.yaml", tree))]) == 0
    cont = base_config(tmp_path / "adapter", data, tmp_path / "out")  # peft section left at its default (none)
    est = estimator(load_config(None, tree=cont)).estimate()
    assert est.trainable == L * 2 * (H + H)
    assert est.parameters == hand_total(vocab(tiny_model_dir))


@pytest.mark.parametrize("peft", ["none", "lora", "qlora"])
def test_flops_match_the_counter_of_flops_py(setup, tiny_model_dir, peft):
    """The FLOPs the time estimate uses against torch's FLOP counter over a real forward + backward
    (``flops.per_token``, what the engines log as flops_per_token) on one packed row of the tiny model. QLoRA: the
    counter sees bitsandbytes' 4-bit matmul as one op, whose matmul inside it does not see (flops.py)."""
    from transformers import AutoModelForCausalLM

    from lmforge.adapters import apply_peft, quantization_kwargs
    from lmforge.methods.sft import CountingCollator
    from lmforge.training import flops
    from lmforge.training.attention import NAME, use_packed_attention
    from lmforge.training.estimate import MicroBatch, flops_per_micro_batch

    if peft == "qlora":
        pytest.importorskip("bitsandbytes")
    cfg = setup(peft={"kind": peft, "r": 4})
    e = estimator(cfg)
    model = apply_peft(AutoModelForCausalLM.from_pretrained(
        tiny_model_dir, dtype=torch.float32, **quantization_kwargs(cfg.peft, torch.float32)), cfg.peft)
    model.train()  # as the engines count (in eval mode bitsandbytes repacks 4-bit weights for inference)
    assert use_packed_attention(model)
    lens = [30, 50, 20]
    ids = list(range(5, 105))
    labels = [-100 if i % 4 == 0 else x for i, x in enumerate(ids)]
    row = {"input_ids": ids, "labels": labels, "seq_lens": lens}
    counted = flops.per_token(model, CountingCollator(0, packed=True, attn_implementation=NAME)([row])) * 100
    loss_tokens = sum(1 for x in labels[1:] if x != -100)  # the LM head runs where the next label carries loss
    mb = MicroBatch(positions=100, tokens=100, loss_tokens=loss_tokens, attention=sum(n * n for n in lens))
    predicted = flops_per_micro_batch(e.shape, mb, estimate_inputs.trainable(e.shape, cfg))
    # measured: 1.00 (full), 1.03 (LoRA and QLoRA: with a frozen embedding no gradient flows below the first layer)
    assert abs(predicted - counted) < 0.05 * counted, (predicted, counted)


def test_accumulation_keeps_the_master_gradients_through_the_next_forward(setup, tiny_model_dir):
    N = hand_total(vocab(tiny_model_dir))
    one = estimator(setup(model={"dtype": "bfloat16"})).estimate().memory["none"]
    two = estimator(setup(model={"dtype": "bfloat16"}, train={"gradient_accumulation_steps": 2})).estimate()
    two = two.memory["none"]
    assert one["activations"] * est_mod.ACTIVATION_OVERHEAD > one["gradients"]  # the forward's end is the peak
    assert two["peak"] - one["peak"] == 4 * N  # fp32 master gradients (the bf16 ones are moved each micro-batch)


def test_streaming_data_is_sampled_from_the_stream(tmp_path, tiny_model_dir, lmforge_cache, capsys):
    """data.streaming: the estimate reads the first rows of the stream (no totals: steps are train.max_steps)."""
    data = write_jsonl(tmp_path / "d.jsonl", chat_rows(30))
    tree = base_config(tiny_model_dir, data, tmp_path / "out", data={"streaming": True, "shuffle_buffer": 8},
                       train={"max_steps": 7})
    cfg_path = write_config(tmp_path / "c.yaml", tree)
    assert main(["estimate", str(cfg_path)]) == 0
    text = capsys.readouterr().out
    assert "streamed (data.streaming)" in text and "7 steps (train.max_steps)" in text
    est = estimator(load_config(None, tree=tree)).estimate()
    assert est.data["streamed"] and est.step["steps"] == 7 and est.step["epochs"] is None
    assert 0 < est.data["mean_row_tokens"] <= 128


def test_a_checkpointed_full_fine_tune_is_timed_at_its_own_measured_efficiency(setup):
    """Gradient checkpointing ran a native full fine-tune at a higher MFU than without (docs/estimate.md); adapters
    keep their efficiency."""
    plain = estimator(setup()).estimate().time
    gc = estimator(setup(train={"gradient_checkpointing": True})).estimate().time
    lora_gc = estimator(setup(peft={"kind": "lora", "r": 4}, train={"gradient_checkpointing": True})).estimate().time
    assert plain["efficiency"] == est_mod.EFFICIENCY[("native", "full")]
    assert gc["efficiency"] == est_mod.EFFICIENCY_CHECKPOINTED[("native", "full")] > plain["efficiency"]
    assert lora_gc["efficiency"] == est_mod.EFFICIENCY[("native", "adapter")]
    assert gc["flops_per_step"] > plain["flops_per_step"]  # the recomputed forward is still counted
