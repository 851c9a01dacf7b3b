"""ORPO on the tiny model: what trains, no reference model, TRL's metric keys in metrics.jsonl; the native
engine's loss against TRL's, its CLI run, accumulation, DDP and bitwise resume."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import base_config, write_config, write_jsonl
from safetensors.torch import load_file

from lmforge.config import load_config
from lmforge.methods import orpo
from lmforge.synthetic import preference_rows
from lmforge.training.preference import setup


def test_orpo_lora_trains_adapter_only_and_logs_odds_ratio(tmp_path, tiny_model_dir, lmforge_cache):
    write_jsonl(tmp_path / "data" / "train.jsonl", preference_rows(16, 0))
    write_jsonl(tmp_path / "data" / "val.jsonl", preference_rows(4, 1))
    tree = base_config(tiny_model_dir, tmp_path / "data", tmp_path / "run", method="orpo",
                       peft={"kind": "lora", "r": 4, "alpha": 8}, orpo={"beta": 0.2})
    cfg = load_config(None, tree=tree)
    run = setup(cfg)
    trainer = orpo.build_trainer(cfg, run)
    assert trainer.beta == 0.2 and not hasattr(trainer, "ref_model")
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    after = dict(trainer.model.named_parameters())
    assert any(p.requires_grad for p in after.values())
    for n, p in after.items():
        assert torch.equal(before[n], p.detach()) != p.requires_grad, n
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "loss" in r]
    for key in ("nll_loss", "log_odds_ratio", "rewards/accuracies", "rewards/margins", "tokens_per_second"):
        assert key in train_rows[-1], key
    assert any("eval_log_odds_ratio" in r for r in rows)
    assert (tmp_path / "run" / "checkpoint-4" / "adapter_model.safetensors").exists()


def test_orpo_cli_full_finetune_changes_weights(tmp_path, tiny_model_dir, lmforge_cache):
    from safetensors.torch import load_file

    write_jsonl(tmp_path / "d.jsonl", preference_rows(8, 0))
    tree = base_config(tiny_model_dir, tmp_path / "d.jsonl", tmp_path / "run", method="orpo")
    tree["train"].update(max_steps=2, save_steps=2)
    orpo.train(load_config(None, tree=tree))
    start = load_file(tiny_model_dir / "model.safetensors")
    end = load_file(tmp_path / "run" / "model.safetensors")
    assert all(not torch.equal(start[k], end[k]) for k in start if k.endswith(("q_proj.weight", "lm_head.weight")))


# ------------------------------------------------------------------------------------------ native engine
def _data(tmp_path, n=16):
    write_jsonl(tmp_path / "data" / "train.jsonl", preference_rows(n, 0))
    write_jsonl(tmp_path / "data" / "val.jsonl", preference_rows(4, 1))
    return tmp_path / "data"


def _tree(tmp_path, tiny_model_dir, out="run", **sections):
    return base_config(tiny_model_dir, _data(tmp_path), tmp_path / out, method="orpo", **sections)


def _metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _train_rows(out):
    return [r for r in _metrics(out) if "loss" in r]


def test_orpo_loss_by_hand():
    # average log-probs -1 (chosen), -2 (rejected): log odds = log(p / (1 - p)) of each, their difference
    logps = torch.tensor([[-1.0, -2.0]], dtype=torch.float64)
    odds = (-1 - math.log(1 - math.exp(-1))) - (-2 - math.log(1 - math.exp(-2)))
    assert math.isclose(orpo.log_odds_ratio(logps).item(), odds, rel_tol=1e-12)
    # NLL 6 over 4 tokens, beta 0.5: 1.5 - 0.5 * log(sigmoid(odds))
    expected = 1.5 + 0.5 * math.log1p(math.exp(-odds))
    assert math.isclose(orpo.orpo_loss(logps, torch.tensor(6.0, dtype=torch.float64), 4, 0.5).item(), expected,
                        rel_tol=1e-12)


def test_orpo_loss_equals_trl_odds_ratio_loss(tmp_path, tiny_model_dir, lmforge_cache):
    cfg = load_config(None, tree=_tree(tmp_path, tiny_model_dir, train={"engine": "hf"}, orpo={"beta": 0.3}))
    trainer = orpo.build_trainer(cfg, setup(cfg))
    torch.manual_seed(0)
    logps = -torch.rand(6, 2) * 3  # average log-probs in (-3, 0], some above and some below TRL's -ln 2 branch
    nll = torch.tensor(2.5)
    losses, *_, log_odds = trainer.odds_ratio_loss(logps[:, 0], logps[:, 1])
    trl = nll - losses.mean()  # ORPOTrainer.get_batch_loss_metrics
    assert math.isclose(orpo.orpo_loss(logps, nll * 7, 7, 0.3).item(), trl.item(), rel_tol=1e-6, abs_tol=1e-6)
    assert torch.allclose(orpo.log_odds_ratio(logps).mean(), log_odds, rtol=1e-6, atol=1e-6)


def test_native_loss_and_metrics_equal_trl_on_the_same_batch(tmp_path, tiny_model_dir, lmforge_cache):
    """The native objective (prompt computed once, pairs packed in one row, per-pair attention or a dense mask of
    that layout, the NLL over prompt + chosen) gives TRL's ORPOTrainer loss and metrics on the same pairs."""
    from lmforge.data.preference import SharedPromptCollator
    from lmforge.training.attention import NAME, use_packed_attention

    cfg = load_config(None, tree=_tree(tmp_path, tiny_model_dir, train={"engine": "hf"}, orpo={"beta": 0.2}))
    run = setup(cfg)
    trainer = orpo.build_trainer(cfg, run)
    trainer.model.double()  # compare the computations, not fp32 rounding
    torch.manual_seed(1)
    with torch.no_grad():  # away from the random start, where every log-prob is about the same
        for p in trainer.model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    records = [run.train_ds[i] for i in range(4)]
    assert len({len(r["prompt_ids"]) + len(r["chosen_ids"]) for r in records}) > 1  # the token mean matters
    trainer.model.train()
    batch = trainer._prepare_inputs(trainer.data_collator([orpo.orpo_columns(r) for r in records]))
    trl_loss, trl_metrics = trainer.get_batch_loss_metrics(trainer.model, batch)
    for attn in ("sdpa", NAME):
        if attn == NAME:
            assert use_packed_attention(trainer.model)
        objective = orpo.ORPOObjective(cfg, SharedPromptCollator(attn, prompt_loss=True))
        ours = objective.batch("train", list(range(4)), records)
        pairs, tokens = objective.count(ours)
        assert pairs == 4 and tokens == sum(len(r["prompt_ids"]) + len(r["chosen_ids"]) - 1 for r in records)
        terms, stats = objective.loss(trainer.model, ours)
        loss = terms[0] / pairs + terms[1] / tokens  # one micro-batch: the step's loss
        # TRL casts the average log-probs to fp32 for the odds ratio: agreement to its rounding
        assert math.isclose(loss.item(), trl_loss.item(), rel_tol=1e-6, abs_tol=1e-6), (attn, loss, trl_loss)
        assert math.isclose(stats["nll_loss"] / tokens, trl_metrics["nll_loss"], rel_tol=1e-6), attn
        for key in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
                    "logps/rejected", "log_odds_ratio", "log_odds_chosen"):
            assert math.isclose(stats[key] / pairs, trl_metrics[key], rel_tol=1e-5, abs_tol=1e-6), (attn, key)
    # the pure function on the same numbers
    n = len(ours["pred_index"])
    with torch.no_grad():
        from lmforge.training.preference import answer_logps

        average = (answer_logps(trainer.model, ours) / ours["answer_lengths"]).view(-1, 2)
        pure = orpo.orpo_loss(average, torch.tensor(stats["nll_loss"], dtype=torch.float64), tokens, 0.2)
    assert n == int(ours["answer_lengths"].sum())  # every answer token is predicted (the prompts are not empty)
    assert math.isclose(pure.item(), trl_loss.item(), rel_tol=1e-6, abs_tol=1e-6)


def test_native_orpo_cli_end_to_end_is_the_default_engine(tmp_path, tiny_model_dir, lmforge_cache):
    cfg = write_config(tmp_path / "cfg.yaml", _tree(tmp_path, tiny_model_dir))
    env = {**os.environ, "LMFORGE_CACHE": str(lmforge_cache)}
    res = subprocess.run([sys.executable, "-m", "lmforge", "train", str(cfg)], capture_output=True, text=True, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    out = tmp_path / "run"
    assert "engine: native" in (out / "config.yaml").read_text()
    for name in ("metrics.jsonl", "plots/loss.png", "report.md", "checkpoint-2", "checkpoint-4", "model.safetensors",
                 "tokenizer.json"):
        assert (out / name).exists(), name
    rows = _metrics(out)
    train_rows = [r for r in rows if "loss" in r]
    for key in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
                "logps/rejected", "nll_loss", "log_odds_ratio", "log_odds_chosen", "tokens_per_second"):
        assert key in train_rows[-1], key
    assert all(r["loss"] > r["nll_loss"] for r in train_rows)  # -beta * logsigmoid(...) > 0
    assert any("eval_log_odds_ratio" in r and "eval_nll_loss" in r for r in rows)
    from transformers import AutoModelForCausalLM

    start = load_file(tiny_model_dir / "model.safetensors")
    trained = AutoModelForCausalLM.from_pretrained(out).state_dict()
    assert all(not torch.equal(start[k], trained[k]) for k in start if k.endswith(("q_proj.weight", "lm_head.weight")))


def test_native_orpo_lora_trains_the_adapter_only(tmp_path, tiny_model_dir, lmforge_cache):
    cfg = load_config(None, tree=_tree(tmp_path, tiny_model_dir, peft={"kind": "lora", "r": 4, "alpha": 8}))
    run = setup(cfg)
    assert run.plan.engine == "native" and run.cfg.train.engine == "native"
    before = {n: p.detach().clone() for n, p in run.model.named_parameters()}
    orpo.train_native(run.cfg, run)
    after = dict(run.model.named_parameters())
    trainable = [n for n, p in after.items() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    for n, p in after.items():
        assert torch.equal(before[n], p.detach()) != p.requires_grad, n
    out = tmp_path / "run"
    assert (out / "adapter_model.safetensors").exists() and not (out / "model.safetensors").exists()


def test_native_orpo_follows_trl_and_accumulation_equals_a_large_batch(tmp_path, tiny_model_dir, lmforge_cache):
    """The whole native loop against TRL's ORPOTrainer (same rows per step, same optimizer): the same losses and
    weights; and 1 x 4 pairs per step == 4 x 1 with gradient accumulation, though the pairs' token counts differ
    (each term is averaged over the whole step's units)."""
    from transformers import AutoModelForCausalLM

    runs = {"trl": {"engine": "hf"}, "native": {"engine": "native"},
            "accumulated": {"engine": "native", "per_device_train_batch_size": 1, "gradient_accumulation_steps": 4}}
    for name, train in runs.items():
        tree = _tree(tmp_path, tiny_model_dir, out=name, train={"lr_scheduler_type": "constant", **train})
        orpo.train(load_config(None, tree=tree))
    assert "engine: hf" in (tmp_path / "trl" / "config.yaml").read_text()
    weights = {name: AutoModelForCausalLM.from_pretrained(tmp_path / name).state_dict() for name in runs}
    trl = _train_rows(tmp_path / "trl")
    assert len(trl) == 4
    for name in ("native", "accumulated"):
        rows = _train_rows(tmp_path / name)
        for key in ("loss", "nll_loss", "log_odds_ratio"):
            assert [r[key] for r in rows] == pytest.approx([r[key] for r in trl], rel=1e-4), (name, key)
        for k, v in weights["trl"].items():
            torch.testing.assert_close(weights[name][k], v, rtol=0, atol=1e-4, msg=f"{name} {k}")
    # accumulation == large batch at float64's level: in fp32 the two differ by summation order, which AdamW
    # amplifies (a near-zero gradient element's first step is +-lr whatever its size) unevenly across CPU kinds
    for name, train in {"native64": {}, "accumulated64": runs["accumulated"]}.items():
        tree = _tree(tmp_path, tiny_model_dir, out=name, model={"dtype": "float64"},
                     train={"lr_scheduler_type": "constant", "engine": "native", **train})
        orpo.train(load_config(None, tree=tree))
    a = load_file(tmp_path / "native64" / "model.safetensors")
    b = load_file(tmp_path / "accumulated64" / "model.safetensors")
    assert all(v.dtype == torch.float64 for v in a.values())
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-10, msg=k)
    start = load_file(tiny_model_dir / "model.safetensors")
    assert not torch.allclose(weights["native"]["model.layers.0.self_attn.q_proj.weight"],
                              start["model.layers.0.self_attn.q_proj.weight"])


def test_native_orpo_resume_is_bitwise(tmp_path, tiny_model_dir, lmforge_cache):
    orpo.train(load_config(None, tree=_tree(tmp_path, tiny_model_dir, out="full")))
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(tmp_path / "full" / "checkpoint-2", resumed / "checkpoint-2")
    orpo.train(load_config(None, tree=_tree(tmp_path, tiny_model_dir, out="resumed")))
    a, b = load_file(tmp_path / "full" / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [r["step"] for r in _train_rows(resumed)] == [3, 4]  # only steps after the checkpoint
    assert [r["loss"] for r in _train_rows(resumed)] == [r["loss"] for r in _train_rows(tmp_path / "full")][2:]


@pytest.mark.slow
def test_native_orpo_ddp_two_processes_equal_one_process(tmp_path, tiny_model_dir, lmforge_cache):
    """2 processes x 2 pairs == 1 process x 4 pairs: both terms' units are summed over the ranks."""
    from transformers import AutoModelForCausalLM

    data = _data(tmp_path, 32)

    def tree(out, **train):
        return base_config(tiny_model_dir, data, tmp_path / out, method="orpo",
                           train={"save_steps": 2, "lr_scheduler_type": "constant", "engine": "native", **train})

    two = write_config(tmp_path / "two.yaml", tree("two", distributed="ddp", per_device_train_batch_size=2))
    env = {**os.environ, "LMFORGE_CACHE": str(lmforge_cache), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "lmforge", "train", "--nproc-per-node", "2", str(two)],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-5000:]
    assert "distributed: ddp on 2 processes, backend gloo, native engine" in proc.stdout
    orpo.train(load_config(None, tree=tree("one", per_device_train_batch_size=4)))
    a, b = _train_rows(tmp_path / "two"), _train_rows(tmp_path / "one")
    for key in ("loss", "nll_loss", "log_odds_chosen", "grad_norm"):
        assert [r[key] for r in a] == pytest.approx([r[key] for r in b], rel=1e-5), key
    wa = AutoModelForCausalLM.from_pretrained(tmp_path / "two").state_dict()
    wb = AutoModelForCausalLM.from_pretrained(tmp_path / "one").state_dict()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=1e-5, msg=k)
