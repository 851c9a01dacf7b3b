"""KTO on the tiny model: unpaired labelled rows, what trains, KL pairs built like TRL's."""

from __future__ import annotations

import json

import torch
from conftest import base_config, write_jsonl
from datasets import Dataset

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
