"""ORPO on the tiny model: what trains, no reference model, TRL's metric keys in metrics.jsonl."""

from __future__ import annotations

import json

import torch
from conftest import base_config, write_jsonl

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
