"""KTO on the tiny model: unpaired labelled rows, what trains, KL pairs built like TRL's; the native engine's
loss against TRL's, its CLI run, accumulation and bitwise resume."""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from conftest import base_config, write_config, write_jsonl
from datasets import Dataset
from safetensors.torch import load_file

from lmforge.config import load_config
from lmforge.methods import kto
from lmforge.synthetic import preference_rows
from lmforge.training.preference import setup


def _unpaired(n, seed):
    rows = []
    for i, r in enumerate(preference_rows(n, seed)):
        good = i % 2 == 0
        rows.append({"prompt": r["prompt"], "completion": r["chosen"] if good else r["rejected"], "label": good})
    return rows


def test_kl_completions_rotate_within_each_batch():
    ds = Dataset.from_list([{"completion_ids": [i]} for i in range(5)])
    out = kto.add_kl_completions(ds, batch_size=2)
    assert out["KL_completion_ids"] == [[1], [0], [3], [2], [4]]


def test_kto_lora_trains_adapter_only(tmp_path, tiny_model_dir, lmforge_cache):
    write_jsonl(tmp_path / "data" / "train.jsonl", _unpaired(16, 0))
    write_jsonl(tmp_path / "data" / "val.jsonl", _unpaired(4, 1))
    tree = base_config(tiny_model_dir, tmp_path / "data", tmp_path / "run", method="kto",
                       peft={"kind": "lora", "r": 4, "alpha": 8})
    cfg = load_config(None, tree=tree)
    run = setup(cfg)
    assert sorted(run.train_ds.column_names) == ["completion_ids", "label", "prompt_ids"]
    trainer = kto.build_trainer(cfg, run)
    assert trainer.ref_model is None and list(trainer.model.peft_config) == ["default"]
    assert "KL_completion_ids" in trainer.train_dataset.column_names
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    after = dict(trainer.model.named_parameters())
    assert any(p.requires_grad for p in after.values())
    for n, p in after.items():
        assert torch.equal(before[n], p.detach()) != p.requires_grad, n
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any("kl" in r for r in rows if "loss" in r)
    assert any("eval_rewards/chosen" in r for r in rows)


def test_kto_from_preference_rows_full_finetune(tmp_path, tiny_model_dir, lmforge_cache):
    from safetensors.torch import load_file

    write_jsonl(tmp_path / "d.jsonl", preference_rows(8, 0))
    tree = base_config(tiny_model_dir, tmp_path / "d.jsonl", tmp_path / "run", method="kto")
    tree["train"].update(max_steps=2, save_steps=2)
    kto.train(load_config(None, tree=tree))
    start = load_file(tiny_model_dir / "model.safetensors")
    end = load_file(tmp_path / "run" / "model.safetensors")
    assert all(not torch.equal(start[k], end[k]) for k in start if k.endswith("q_proj.weight"))


# ------------------------------------------------------------------------------------------ native engine
def _data(tmp_path):
    write_jsonl(tmp_path / "data" / "train.jsonl", _unpaired(16, 0))
    write_jsonl(tmp_path / "data" / "val.jsonl", _unpaired(4, 1))
    return tmp_path / "data"


def _tree(tmp_path, tiny_model_dir, out="run", **sections):
    return base_config(tiny_model_dir, _data(tmp_path), tmp_path / out, method="kto", **sections)


def _train_rows(out):
    return [r for r in (json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def test_kto_loss_by_hand():
    ratios, desirable = torch.tensor([0.5, -1.0], dtype=torch.float64), torch.tensor([True, False])
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    # beta 0.1, z 0.2: desirable 1 - sig(0.1 * (0.5 - 0.2)), undesirable 1 - sig(0.1 * (0.2 + 1)), weights 2 and 3
    losses = kto.kto_loss(ratios, desirable, 0.2, 0.1, "kto", 2.0, 3.0).tolist()
    assert losses == pytest.approx([2 * (1 - sig(0.03)), 3 * (1 - sig(0.12))], rel=1e-12)
    apo = kto.kto_loss(ratios, desirable, 0.2, 0.1, "apo_zero_unpaired").tolist()
    assert apo == pytest.approx([1 - sig(0.05), sig(-0.1)], rel=1e-12)


def test_kl_partners_are_a_rotation_of_a_seeded_permutation():
    partner = kto.kl_partners(7, 0)
    assert sorted(partner) == list(range(7)) and all(p != i for i, p in enumerate(partner))
    assert partner == kto.kl_partners(7, 0) != kto.kl_partners(7, 1)


@pytest.mark.parametrize("loss_type", ["kto", "apo_zero_unpaired"])
def test_native_loss_and_metrics_equal_trl_on_the_same_batch(loss_type, tmp_path, tiny_model_dir, lmforge_cache):
    """The native objective (each example packed with its mismatched answer behind a shared prompt, the KL
    estimate from a forward before the loss) gives TRL's KTOTrainer loss and metrics on the same examples,
    with TRL's mismatched pairs, policy and reference."""
    from lmforge.data.preference import SharedPromptCollator
    from lmforge.training.attention import NAME, use_packed_attention
    from lmforge.training.preference import ReferenceLogps

    cfg = load_config(None, tree=_tree(tmp_path, tiny_model_dir, train={"engine": "hf"},
                                       kto={"loss_type": loss_type, "desirable_weight": 1.5}))
    trainer = kto.build_trainer(cfg, setup(cfg))  # full fine-tune: TRL keeps a frozen reference copy
    trainer.model.double(), trainer.ref_model.double()
    torch.manual_seed(1)
    with torch.no_grad():  # make the policy differ from the reference, and noise the reference (not the policy) so
        for p in trainer.ref_model.parameters():  # the policy scores answers higher: a KL estimate above the clamp
            p.add_(torch.randn_like(p) * 0.05)
    ds = trainer.train_dataset  # seeded shuffle, KL answers rotated within each batch of 4
    records = [ds[i] for i in range(4)]
    assert 0 < sum(r["label"] for r in records) < 4
    trainer.model.train()
    trl_loss = trainer.compute_loss(trainer.model, trainer._prepare_inputs(trainer.data_collator(records))).item()
    trl = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    partners = list(range(len(ds)))
    partners[:4] = [3, 0, 1, 2]  # TRL's: (x1, y4), (x2, y1), (x3, y2), (x4, y3)
    loop = SimpleNamespace(model=trainer.model, autocast=contextlib.nullcontext, all_reduce=lambda t: t)
    for attn in ("sdpa", NAME):
        if attn == NAME:  # the models attend per packed sample from here on
            assert use_packed_attention(trainer.model) and use_packed_attention(trainer.ref_model)
        reference = ReferenceLogps({"train": len(ds)}, by_disabling=False)
        objective = kto.KTOObjective(cfg, SharedPromptCollator(attn), reference, {"train": ds}, {"train": partners})
        batch = objective.batch("train", list(range(4)), records)
        if loss_type == "kto":  # apo_zero_unpaired has no KL term, and TRL builds no mismatched answers for it
            assert [r["KL_completion_ids"] for r in records] == [ds[p]["completion_ids"] for p in partners[:4]]
        reference.precompute(trainer.ref_model, [batch])
        objective.before_step(loop, [batch])
        loss, stats = objective.loss(trainer.model, batch)
        n, chosen, rejected = objective.count(batch)
        assert math.isclose(loss.item() / n, trl_loss, rel_tol=5e-6, abs_tol=1e-7), (attn, loss.item() / n, trl_loss)
        assert math.isclose(stats["kl"] / n, trl["kl"], rel_tol=1e-5, abs_tol=1e-7), attn
        for key, units in (("rewards/chosen", chosen), ("logps/chosen", chosen), ("rewards/rejected", rejected),
                           ("logps/rejected", rejected)):
            # TRL's log-probs are fp32: a reward (beta x a difference of two sums near -60) carries about 1e-6
            assert math.isclose(stats[key] / units, trl[key], rel_tol=1e-5, abs_tol=2e-6), (attn, key)
    if loss_type == "kto":
        assert trl["kl"] > 0  # the clamp did not hide the estimate


def test_native_kto_cli_end_to_end_is_the_default_engine(tmp_path, tiny_model_dir, lmforge_cache):
    cfg = write_config(tmp_path / "cfg.yaml", _tree(tmp_path, tiny_model_dir))
    env = {**os.environ, "LMFORGE_CACHE": str(lmforge_cache)}
    res = subprocess.run([sys.executable, "-m", "lmforge", "train", str(cfg)], capture_output=True, text=True, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    out = tmp_path / "run"
    assert "engine: native" in (out / "config.yaml").read_text()
    for name in ("metrics.jsonl", "plots/loss.png", "report.md", "checkpoint-2", "checkpoint-4", "model.safetensors"):
        assert (out / name).exists(), name
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "loss" in r]
    assert math.isclose(train_rows[0]["loss"], 0.5, rel_tol=1e-5)  # policy == reference: 1 - sigmoid(0) each
    assert train_rows[0]["kl"] == 0.0 and train_rows[0]["rewards/chosen"] == 0.0
    for key in ("kl", "rewards/chosen", "logps/chosen", "rewards/rejected", "logps/rejected", "tokens_per_second"):
        assert key in train_rows[-1], key
    assert train_rows[-1]["rewards/chosen"] != 0.0
    assert any("eval_kl" in r and "eval_rewards/rejected" in r for r in rows)
    start = load_file(tiny_model_dir / "model.safetensors")
    end = load_file(out / "model.safetensors")
    assert all(not torch.equal(start[k], end[k]) for k in start if k.endswith("q_proj.weight"))


@pytest.mark.parametrize("peft", ["none", "lora"])
def test_native_kto_accumulation_equals_a_large_batch(peft, tmp_path, tiny_model_dir, lmforge_cache):
    """1 x 4 examples per step == 4 x 1 with accumulation: the loss and the KL estimate belong to the step.

    In float64, so the invariance is checked at float64's level: the two runs differ only in summation order
    (~1e-16 relative per operation, amplified by three AdamW updates to well under 1e-10). In fp32 the same
    order differences move a near-zero gradient element's first Adam step (+-lr whatever its size) by its
    sign, and how they fall depends on the CPU's kernels (issue 20)."""
    runs = {"large": {}, "accumulated": {"per_device_train_batch_size": 1, "gradient_accumulation_steps": 4}}
    for name, train in runs.items():
        tree = _tree(tmp_path, tiny_model_dir, out=name, peft={"kind": peft, "r": 4, "alpha": 8},
                     model={"dtype": "float64"}, train={"lr_scheduler_type": "constant", **train})
        kto.train(load_config(None, tree=tree))
    large, accumulated = _train_rows(tmp_path / "large"), _train_rows(tmp_path / "accumulated")
    assert len(large) == 4 and any(r["kl"] > 0 for r in large)
    for key in ("loss", "kl", "rewards/chosen", "logps/rejected", "grad_norm"):
        # metrics.jsonl rounds to 6 decimals: equal values may round apart by one unit in the last place
        assert [r[key] for r in accumulated] == pytest.approx([r[key] for r in large], rel=0, abs=1.01e-6), key
    name = "adapter_model.safetensors" if peft == "lora" else "model.safetensors"
    a, b = load_file(tmp_path / "large" / name), load_file(tmp_path / "accumulated" / name)
    assert all(v.dtype == torch.float64 for v in a.values())
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-10, msg=k)


def test_native_kto_resume_is_bitwise(tmp_path, tiny_model_dir, lmforge_cache):
    kto.train(load_config(None, tree=_tree(tmp_path, tiny_model_dir, out="full")))
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(tmp_path / "full" / "checkpoint-2", resumed / "checkpoint-2")
    kto.train(load_config(None, tree=_tree(tmp_path, tiny_model_dir, out="resumed")))
    a, b = load_file(tmp_path / "full" / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [r["step"] for r in _train_rows(resumed)] == [3, 4]
    assert [r["loss"] for r in _train_rows(resumed)] == [r["loss"] for r in _train_rows(tmp_path / "full")][2:]


@pytest.mark.slow
def test_native_kto_ddp_two_processes_equal_one_process(tmp_path, tiny_model_dir, lmforge_cache):
    """2 processes x 2 examples == 1 process x 4: the KL estimate and the loss's units span both ranks."""
    data = _data(tmp_path)

    def tree(out, **train):
        return base_config(tiny_model_dir, data, tmp_path / out, method="kto",
                           train={"save_steps": 2, "lr_scheduler_type": "constant", "engine": "native", **train})

    two = write_config(tmp_path / "two.yaml", tree("two", distributed="ddp", per_device_train_batch_size=2))
    env = {**os.environ, "LMFORGE_CACHE": str(lmforge_cache), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "lmforge", "train", "--nproc-per-node", "2", str(two)],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-5000:]
    assert "distributed: ddp on 2 processes, backend gloo, native engine" in proc.stdout
    kto.train(load_config(None, tree=tree("one", per_device_train_batch_size=4)))
    a, b = _train_rows(tmp_path / "two"), _train_rows(tmp_path / "one")
    assert any(r["kl"] > 0 for r in b)
    for key in ("loss", "kl", "grad_norm"):
        assert [r[key] for r in a] == pytest.approx([r[key] for r in b], rel=1e-5, abs=1e-7), key
    # a reward is beta x a difference of two log-prob sums: it shows the ranks' summation order at 1e-5
    assert [r["rewards/chosen"] for r in a] == pytest.approx([r["rewards/chosen"] for r in b], abs=1e-5)
    wa, wb = load_file(tmp_path / "two" / "model.safetensors"), load_file(tmp_path / "one" / "model.safetensors")
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=1e-5, msg=k)
