"""DPO on the tiny model: CLI end to end, what trains, one copy of the base weights, references, bitwise resume."""

from __future__ import annotations

import gc
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import base_config, write_config, write_jsonl
from safetensors.torch import load_file

from lmforge.config import load_config
from lmforge.methods import dpo
from lmforge.synthetic import preference_rows
from lmforge.training.preference import setup


def _data(tmp_path):
    write_jsonl(tmp_path / "data" / "train.jsonl", preference_rows(24, 0))
    write_jsonl(tmp_path / "data" / "val.jsonl", preference_rows(8, 1))
    return tmp_path / "data"


def _tree(tmp_path, tiny_model_dir, out="run", **sections):
    return base_config(tiny_model_dir, _data(tmp_path), tmp_path / out, method="dpo", **sections)


def _metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _live_storages(shape=None) -> set[int]:
    """Storages of tensors alive in the process (of this shape, if given)."""
    gc.collect()
    return {p for o in gc.get_objects()
            if issubclass(type(o), torch.Tensor) and (shape is None or tuple(o.shape) == shape)
            for p in [_data_ptr(o)] if p is not None}


def _data_ptr(t: torch.Tensor) -> int | None:
    """The storage's address; None for a tensor without data (torch.compile keeps fake tensors alive)."""
    try:
        return t.untyped_storage().data_ptr()
    except RuntimeError:
        return None


def test_dpo_cli_end_to_end_full_finetune(tmp_path, tiny_model_dir, lmforge_cache):
    cfg = write_config(tmp_path / "cfg.yaml", _tree(tmp_path, tiny_model_dir))
    env = {**os.environ, "LMFORGE_CACHE": str(lmforge_cache)}
    res = subprocess.run([sys.executable, "-m", "lmforge", "train", str(cfg)], capture_output=True, text=True, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    out = tmp_path / "run"
    for name in ("config.yaml", "metrics.jsonl", "plots/loss.png", "report.md", "checkpoint-2", "checkpoint-4",
                 "model.safetensors", "tokenizer.json"):
        assert (out / name).exists(), name
    rows = _metrics(out)
    train_rows = [r for r in rows if "loss" in r]
    assert math.isclose(train_rows[0]["loss"], math.log(2), rel_tol=1e-5)  # policy == reference at step 1
    for key in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
                "tokens_per_second"):
        assert key in train_rows[-1], key
    assert any("eval_rewards/accuracies" in r for r in rows)
    from transformers import AutoModelForCausalLM

    start = load_file(tiny_model_dir / "model.safetensors")
    trained = AutoModelForCausalLM.from_pretrained(out).state_dict()
    assert all(not torch.equal(start[k], trained[k]) for k in start if k.endswith("q_proj.weight"))


@pytest.mark.parametrize("kind", ["lora", "qlora"])
def test_adapter_trains_alone_with_one_copy_of_base_weights(kind, tmp_path, tiny_model_dir, lmforge_cache):
    # train split only: bitsandbytes' CPU inference path (used by evaluation) cannot run layers narrower than its
    # 64-value quantisation block, which the tiny model's are
    tree = _tree(tmp_path, tiny_model_dir, peft={"kind": kind, "r": 4, "alpha": 8})
    tree["data"]["train"] = [{"path": str(tmp_path / "data" / "train.jsonl")}]
    cfg = load_config(None, tree=tree)
    already = _live_storages()  # what other tests left alive does not count
    run = setup(cfg)
    trainer = dpo.build_trainer(cfg, run)
    model = trainer.model
    assert trainer.ref_model is None and list(model.peft_config) == ["default"]  # reference = adapter disabled
    shape = tuple(model.get_base_model().model.layers[0].mlp.gate_proj.weight.shape)  # packed under qlora
    in_model = sum(1 for p in model.parameters() if tuple(p.shape) == shape)
    assert in_model > 0 and len(_live_storages(shape) - already) == in_model
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer.train()
    after = dict(model.named_parameters())
    trainable = [n for n, p in after.items() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    for n, p in after.items():
        assert torch.equal(before[n], p.detach()) != p.requires_grad, n


def test_full_finetune_keeps_a_frozen_reference_copy(tmp_path, tiny_model_dir, lmforge_cache):
    # the counterpart of the test above: the copy counter does see a second copy when there is one
    cfg = load_config(None, tree=_tree(tmp_path, tiny_model_dir))
    already = _live_storages()
    run = setup(cfg)
    trainer = dpo.build_trainer(cfg, run)
    shape = tuple(run.model.model.layers[0].mlp.gate_proj.weight.shape)
    in_model = sum(1 for p in run.model.parameters() if tuple(p.shape) == shape)
    assert trainer.ref_model is not None and not any(p.requires_grad for p in trainer.ref_model.parameters())
    assert len(_live_storages(shape) - already) == 2 * in_model


def test_precomputed_reference_matches_live_reference(tmp_path, tiny_model_dir, lmforge_cache):
    live = load_config(None, tree=_tree(tmp_path, tiny_model_dir, out="live"))
    pre = load_config(None, tree=_tree(tmp_path, tiny_model_dir, out="pre", dpo={"precompute_ref_log_probs": True}))
    run = setup(pre)
    trainer = dpo.build_trainer(pre, run)
    assert trainer.ref_model is None and "ref_chosen_logps" in trainer.train_dataset.column_names
    del trainer, run
    dpo.train(live)
    dpo.train(pre)
    a = [r for r in _metrics(tmp_path / "live") if "loss" in r]
    b = [r for r in _metrics(tmp_path / "pre") if "loss" in r]
    assert len(a) == len(b) == 4
    for ra, rb in zip(a, b):
        for key in ("loss", "rewards/chosen", "rewards/margins"):
            assert math.isclose(ra[key], rb[key], rel_tol=1e-4, abs_tol=1e-5), (key, ra[key], rb[key])


def test_starting_from_an_sft_adapter_uses_it_as_reference(tmp_path, tiny_model_dir, lmforge_cache):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    sft = tmp_path / "sft"
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    lora = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))
    lora.save_pretrained(sft)  # B != 0: this "SFT adapter" differs from the base
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(sft)
    tree = _tree(tmp_path, tiny_model_dir)
    tree["model"]["name_or_path"] = str(sft)
    dpo.train(load_config(None, tree=tree))
    first = next(r for r in _metrics(tmp_path / "run") if "loss" in r)
    # the reference is the SFT adapter (a frozen copy), not the bare base: no reward difference at step 1
    assert first["rewards/chosen"] == 0.0 and math.isclose(first["loss"], math.log(2), rel_tol=1e-6)
    out = tmp_path / "run"
    assert (out / "adapter_model.safetensors").exists() and not (out / "ref").exists()


def test_dpo_resume_is_bitwise(tmp_path, tiny_model_dir, lmforge_cache):
    full = load_config(None, tree=_tree(tmp_path, tiny_model_dir, out="full"))
    dpo.train(full)
    resumed_dir = tmp_path / "resumed"
    resumed_dir.mkdir()
    shutil.copytree(tmp_path / "full" / "checkpoint-2", resumed_dir / "checkpoint-2")
    dpo.train(load_config(None, tree=_tree(tmp_path, tiny_model_dir, out="resumed")))
    a = load_file(tmp_path / "full" / "model.safetensors")
    b = load_file(resumed_dir / "model.safetensors")
    start = load_file(tiny_model_dir / "model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], start[k]) for k in a)
    assert [r["step"] for r in _metrics(resumed_dir) if "loss" in r] == [3, 4]  # only steps after the checkpoint


def test_example_configs_load_through_the_schema():
    example = Path(__file__).resolve().parent.parent / "examples" / "sft_then_dpo"
    assert load_config(example / "sft.yaml").method == "sft"
    cfg = load_config(example / "dpo.yaml")
    assert cfg.method == "dpo" and cfg.model.name_or_path == "runs/sft" and cfg.data.max_prompt_length == 128


@pytest.mark.slow
def test_real_model_lora_dpo_raises_held_out_reward_accuracy(tmp_path):
    """SmolLM2-135M-Instruct + LoRA on generated pairs; evaluated on pairs it never trained on."""
    write_jsonl(tmp_path / "data" / "train.jsonl", preference_rows(64, 0))
    write_jsonl(tmp_path / "data" / "val.jsonl", preference_rows(16, 1))  # another seed: held out
    tree = {
        "method": "dpo", "model": {"name_or_path": "smollm2-135m-instruct"},
        "peft": {"kind": "lora", "r": 16, "alpha": 32, "dropout": 0.0},
        "data": {"train": [{"path": str(tmp_path / "data")}], "max_length": 160, "cache_dir": str(tmp_path / "c")},
        "dpo": {"beta": 0.1},
        "train": {"output_dir": str(tmp_path / "run"), "max_steps": 8, "per_device_train_batch_size": 2,
                  "per_device_eval_batch_size": 16, "learning_rate": 5e-4, "logging_steps": 2, "save_steps": 8,
                  "report_to": ["none"], "seed": 0},
    }
    dpo.train(load_config(None, tree=tree))
    rows = _metrics(tmp_path / "run")
    first = next(r for r in rows if "loss" in r)
    final_eval = [r for r in rows if "eval_rewards/accuracies" in r][-1]
    print(f"held-out reward accuracy after {final_eval['step']} steps: {final_eval['eval_rewards/accuracies']:.3f} "
          f"(margin {final_eval['eval_rewards/margins']:.3f}); at step 1 the train accuracy was "
          f"{first['rewards/accuracies']:.3f}")
    assert first["rewards/accuracies"] == 0.0  # policy == reference: no pair is preferred yet
    assert final_eval["eval_rewards/accuracies"] >= 0.75 and final_eval["eval_rewards/margins"] > 0


# ------------------------------------------------------------------------------------------ native engine
def test_dpo_loss_by_hand():
    # c = -1 - (-1.5) = 0.5, r = -2 - (-1.5) = -0.5: beta * (c - r) = 0.1
    logps, ref, lengths = torch.tensor([[-1.0, -2.0]]), torch.tensor([[-1.5, -1.5]]), torch.tensor([[4, 2]])
    assert math.isclose(dpo.dpo_loss(logps, ref, lengths, 0.1).item(), math.log1p(math.exp(-0.1)), rel_tol=1e-6)
    assert math.isclose(dpo.dpo_loss(logps, ref, lengths, 0.1, "hinge").item(), 0.9, rel_tol=1e-6)
    # ipo: (0.5 / 4 - (-0.5) / 2 - 1 / 0.2) ** 2
    assert math.isclose(dpo.dpo_loss(logps, ref, lengths, 0.1, "ipo").item(), (0.125 + 0.25 - 5) ** 2, rel_tol=1e-6)


def test_shared_prompt_mask_by_hand():
    from lmforge.data.packing import shared_prompt_mask

    # prompt p0 p1, chosen c0 c1, rejected r0: r0 sees the prompt and itself, not the chosen answer
    expected = torch.tensor([[1, 0, 0, 0, 0],
                             [1, 1, 0, 0, 0],
                             [1, 1, 1, 0, 0],
                             [1, 1, 1, 1, 0],
                             [1, 1, 0, 0, 1]], dtype=torch.bool)
    assert torch.equal(shared_prompt_mask(2, 2, 1), expected)


def _exact_log_probs(hidden, weight, bias, targets, temperature, chunk_size, softcap=None, logit_scale=1.0,
                     outputs=()):
    """TRL's ``ChunkedLogProbFunction`` (the fused LM head's kernel) computed whole in the inputs' dtype: the
    kernel keeps fp32 softmax accumulators whatever the weights (1e-5 on a summed log-prob here), which would hide
    anything below that. Same signature and outputs; forward only (the comparison runs no backward)."""
    z = hidden @ weight.T + (bias if bias is not None else 0)  # (N, V): the tiny vocabulary fits whole
    z = z * logit_scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    z = z / temperature
    logp = z.log_softmax(-1)
    return (logp.gather(-1, targets.clamp(min=0)[:, None]).squeeze(-1),
            -(logp.exp() * logp).sum(-1) if "entropy" in outputs else None,
            torch.logsumexp(2 * logp, -1) if "log_sum_sq_probs" in outputs else None,
            z.mean(-1) if "mean_logits" in outputs else None,
            z.argmax(-1) == targets if "is_top1" in outputs else None)


@pytest.mark.parametrize("loss_type", sorted(dpo.NATIVE_LOSSES))
def test_native_loss_equals_trl_on_the_same_batch(loss_type, tmp_path, tiny_model_dir, lmforge_cache, monkeypatch):
    """The native step's loss and log-probs (prompt computed once, pairs packed in one row, per-pair attention
    or a dense mask of the same layout) equal TRL's DPOTrainer on the same pairs, policy and reference, both in
    float64 (issue 9: within 1e-6; they agree to 3e-13, so the bound is 1e-9)."""
    from types import SimpleNamespace

    import trl.trainer.utils

    from lmforge.data.preference import SharedPromptCollator
    from lmforge.training.attention import NAME, use_packed_attention
    from lmforge.training.preference import ReferenceLogps

    monkeypatch.setattr(trl.trainer.utils, "_ChunkedLogProbFunction", SimpleNamespace(apply=_exact_log_probs))
    smoothing = 0.1 if loss_type in ("robust", "exo_pair") else 0.0
    cfg = load_config(None, tree=_tree(tmp_path, tiny_model_dir, model={"dtype": "float64"}, train={"engine": "hf"},
                                       dpo={"loss_type": loss_type, "label_smoothing": smoothing}))
    run = setup(cfg)
    trainer = dpo.build_trainer(cfg, run)  # full fine-tune: TRL keeps a frozen reference copy
    assert {p.dtype for m in (trainer.model, trainer.ref_model) for p in m.parameters()} == {torch.float64}
    torch.manual_seed(1)
    with torch.no_grad():  # make the policy differ from the reference
        for p in trainer.model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    records = [run.train_ds[i] for i in range(4)]
    trainer.model.train()
    torch.set_default_dtype(torch.float64)  # the constants TRL makes (exo_pair's epsilon tensor) in float64 too
    try:
        trl_loss = trainer.compute_loss(trainer.model, trainer._prepare_inputs(trainer.data_collator(records))).item()
    finally:
        torch.set_default_dtype(torch.float32)
    trl_logps = trainer._metrics["train"]["logps/chosen"][-1]
    for attn in ("sdpa", NAME):
        if attn == NAME:
            assert use_packed_attention(trainer.model) and use_packed_attention(trainer.ref_model)
        reference = ReferenceLogps({"train": len(run.train_ds)}, by_disabling=False)
        objective = dpo.DPOObjective(cfg, SharedPromptCollator(attn), reference)
        batch = objective.batch("train", list(range(4)), records)
        reference.precompute(trainer.ref_model, [batch])
        loss, stats = objective.loss(trainer.model, batch)
        assert loss.dtype == torch.float64
        # measured: at most 2.6e-13 (sppo_hard, a loss of 74); a layout error moves the loss by 1e-2 or more
        assert abs(loss.item() / 4 - trl_loss) <= 1e-9, (attn, loss.item() / 4, trl_loss)
        assert abs(stats["logps/chosen"] / 4 - trl_logps) <= 1e-9, (attn, stats["logps/chosen"] / 4, trl_logps)
    assert trl_loss != pytest.approx(dpo.dpo_loss(torch.zeros(1, 2), torch.zeros(1, 2), torch.ones(1, 2), 0.1,
                                                  loss_type, smoothing).item())  # policy != reference


@pytest.mark.parametrize("peft", ["none", "lora"])
def test_native_engine_is_the_default_and_trains(peft, tmp_path, tiny_model_dir, lmforge_cache):
    tree = _tree(tmp_path, tiny_model_dir, peft={"kind": peft, "r": 4, "alpha": 8})
    dpo.train(load_config(None, tree=tree))
    out = tmp_path / "run"
    assert "engine: native" in (out / "config.yaml").read_text()
    rows = _metrics(out)
    train_rows = [r for r in rows if "loss" in r]
    assert math.isclose(train_rows[0]["loss"], math.log(2), rel_tol=1e-5)  # policy == reference at step 1
    assert train_rows[0]["rewards/chosen"] == 0.0 and train_rows[-1]["rewards/chosen"] != 0.0
    for key in ("rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected",
                "tokens_per_second"):
        assert key in train_rows[-1], key
    assert any("eval_rewards/accuracies" in r for r in rows)
    assert (out / ("adapter_model.safetensors" if peft == "lora" else "model.safetensors")).exists()


def _losses(out):
    return [r["loss"] for r in _metrics(out) if "loss" in r]


def test_native_dpo_follows_trl_and_accumulation_equals_a_large_batch(tmp_path, tiny_model_dir, lmforge_cache):
    """The whole native loop against TRL's DPOTrainer (same rows per step, same reference, same optimizer):
    the same losses and weights; and 1 x 4 pairs per step == 4 x 1 with gradient accumulation."""
    from transformers import AutoModelForCausalLM

    runs = {"trl": {"engine": "hf"}, "native": {"engine": "native"},
            "accumulated": {"engine": "native", "per_device_train_batch_size": 1, "gradient_accumulation_steps": 4}}
    for name, train in runs.items():
        tree = _tree(tmp_path, tiny_model_dir, out=name, train={"lr_scheduler_type": "constant", **train})
        dpo.train(load_config(None, tree=tree))
    weights = {name: AutoModelForCausalLM.from_pretrained(tmp_path / name).state_dict() for name in runs}
    assert len(_losses(tmp_path / "trl")) == 4
    for name in ("native", "accumulated"):
        assert _losses(tmp_path / name) == pytest.approx(_losses(tmp_path / "trl"), rel=1e-4), name
        for k, v in weights["trl"].items():
            torch.testing.assert_close(weights[name][k], v, rtol=0, atol=1e-4, msg=f"{name} {k}")
    start = load_file(tiny_model_dir / "model.safetensors")
    assert not torch.allclose(weights["native"]["model.layers.0.self_attn.q_proj.weight"],
                              start["model.layers.0.self_attn.q_proj.weight"])
