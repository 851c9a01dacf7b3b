"""LAMB against a step worked out by hand; schedules against their formulas; every optimizer name through the CLI."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import base_config, chat_rows, write_config, write_jsonl

from lmforge.cli import main
from lmforge.training.optim import Lamb, hf_scheduler


@pytest.mark.parametrize("wd", [0.0, 0.1])
def test_lamb_first_step_matches_hand_computation(wd):
    w = torch.nn.Parameter(torch.tensor([3.0, 4.0]))  # ||w|| = 5
    w.grad = torch.tensor([1.0, -2.0])
    Lamb([w], lr=0.1, eps=1e-6, weight_decay=wd).step()
    # step 1: bias-corrected m_hat = g, v_hat = g^2, so the Adam direction is sign(g) = [1, -1]
    r = [1.0 + wd * 3.0, -1.0 + wd * 4.0]
    ratio = 5.0 / math.hypot(*r)  # trust ratio ||w|| / ||r||
    expected = [3.0 - 0.1 * ratio * r[0], 4.0 - 0.1 * ratio * r[1]]
    assert w.detach().tolist() == pytest.approx(expected, abs=1e-5)


def test_lamb_moves_zero_initialised_tensors():
    """A zero tensor (LoRA's B, biases) gets trust ratio 1, not 0 (bitsandbytes' LAMB leaves it at 0)."""
    p = torch.nn.Parameter(torch.zeros(4, 4))
    opt = Lamb([p], lr=0.01)
    for _ in range(3):
        opt.zero_grad()
        ((p - 1) ** 2).sum().backward()
        opt.step()
    assert p.min() > 0.009  # step 1 moves every entry by lr (ratio 1); later steps scale by ||w|| / ||r||


def _lrs(name: str, warmup: int, total: int = 10, **kwargs) -> list[float]:
    from transformers import TrainingArguments

    args = TrainingArguments(output_dir="/tmp/unused", learning_rate=1.0, lr_scheduler_type=name,
                             warmup_steps=warmup, lr_scheduler_kwargs=kwargs, use_cpu=True, report_to="none")
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = hf_scheduler(args, opt, total)
    out = []
    for _ in range(total):
        out.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    return out


def test_schedules_follow_their_formulas():
    warm = [0.0, 0.5]  # linear warmup over 2 steps, then the peak at step 2
    assert _lrs("linear", 2) == pytest.approx(warm + [(10 - s) / 8 for s in range(2, 10)])
    cosine = [0.5 * (1 + math.cos(math.pi * (s - 2) / 8)) for s in range(2, 10)]
    assert _lrs("cosine", 2) == pytest.approx(warm + cosine)
    assert _lrs("constant", 2) == pytest.approx(warm + [1.0] * 8)  # warmup honoured (HF's constant drops it)
    assert _lrs("constant", 0) == pytest.approx([1.0] * 10)
    poly = [(1 - 1e-7) * (1 - (s - 2) / 8) ** 2 + 1e-7 for s in range(2, 10)]
    assert _lrs("polynomial", 2, power=2.0) == pytest.approx(warm + poly)
    # warmup 2, stable, then cosine decay over the last 10% (1 step) by default
    assert _lrs("warmup_stable_decay", 2) == pytest.approx(warm + [1.0] * 7 + [1.0])
    wsd = _lrs("warmup_stable_decay", 2, num_decay_steps=4)
    decay = [0.5 * (1 + math.cos(math.pi * k / 4)) for k in range(4)]
    assert wsd == pytest.approx(warm + [1.0] * 4 + decay)


@pytest.mark.parametrize("optim", ["lamb", "adamw_torch", "adafactor", "adamw_bnb_8bit"])
def test_optimizer_names_train_through_the_cli(optim, tmp_path, tiny_model_dir, lmforge_cache):
    data = write_jsonl(tmp_path / "train.jsonl", chat_rows(16))
    out = tmp_path / "run"
    tree = base_config(tiny_model_dir, data, out, train={"optim": optim, "lr_scheduler_type": "warmup_stable_decay",
                                                         "warmup_steps": 1, "max_steps": 4, "save_steps": 4})
    assert main(["train", str(write_config(tmp_path / "cfg.yaml", tree))]) == 0
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 4 and all(math.isfinite(x) for x in losses)
    groups = torch.load(out / "checkpoint-4" / "optimizer.pt", weights_only=False)["param_groups"]
    is_lamb = set(groups[0]) == {"lr", "betas", "eps", "weight_decay", "params", "initial_lr"}
    assert is_lamb == (optim == "lamb")
    if optim == "lamb":  # resuming restores LAMB's state and continues
        assert main(["train", str(write_config(tmp_path / "cfg.yaml", tree)), "train.max_steps=6"]) == 0
        rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows if "loss" in r][-2:] == [5, 6]


def test_unknown_optimizer_is_a_config_error(tmp_path, tiny_model_dir, lmforge_cache, capsys):
    data = write_jsonl(tmp_path / "train.jsonl", chat_rows(4))
    tree = base_config(tiny_model_dir, data, tmp_path / "run", train={"optim": "lambb"})
    assert main(["train", str(write_config(tmp_path / "cfg.yaml", tree))]) == 2
    assert "lambb" in capsys.readouterr().err
