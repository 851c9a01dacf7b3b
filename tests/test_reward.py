"""Reward models on the tiny model: the loss against a hand computation, the native engine's packed scores and
loss against TRL's RewardTrainer, native accumulation, CLI end to end on both engines (full and LoRA), the
margin column, and a trained model that ranks held-out pairs above chance."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import base_config, write_config, write_jsonl
from safetensors.torch import load_file

from lmforge.config import load_config
from lmforge.data.packing import PACKED_ATTENTION
from lmforge.data.preference import SharedPromptCollator, encode_side
from lmforge.data.tokenize import Encoder
from lmforge.errors import ConfigError
from lmforge.methods import reward
from lmforge.synthetic import preference_rows
from lmforge.training.attention import use_packed_attention
from lmforge.training.preference import setup


def _rows_with_margins(n: int, seed: int) -> list[dict]:
    rows = preference_rows(n, seed)
    for k, r in enumerate(rows):
        r["margin"] = [0.0, 0.5, 1.25, -0.75][k % 4]
    return rows


def _tree(tmp_path, model_dir, rows, out="run", **sections):
    data = write_jsonl(tmp_path / "data" / "train.jsonl", rows)
    return base_config(model_dir, data, tmp_path / out, method="reward", **sections)


def _metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _score(model, ids: list[int]) -> torch.Tensor:
    """The reward of one sequence, alone in its batch (no padding): the score head at its last token."""
    return model(input_ids=torch.tensor([ids])).logits[0, 0]


def _hand_loss(model, records, center: float | None, with_margin: bool = True) -> torch.Tensor:
    chosen = torch.stack([_score(model, r["prompt_ids"] + r["chosen_ids"]) for r in records])
    rejected = torch.stack([_score(model, r["prompt_ids"] + r["rejected_ids"]) for r in records])
    margin = torch.tensor([r["margin"] if with_margin else 0.0 for r in records], dtype=chosen.dtype)
    loss = -F.logsigmoid(chosen - rejected - margin).mean()
    if center is not None:
        loss = loss + center * ((chosen + rejected) ** 2).mean()
    return loss


@pytest.mark.parametrize("center", [None, 0.01])
def test_loss_equals_hand_computation_on_a_fixed_batch(center, tmp_path, tiny_model_dir, lmforge_cache):
    # float64 throughout; the batch pads sequences of different lengths, so the score must be read at each
    # sequence's last real token for the losses to agree
    tree = _tree(tmp_path, tiny_model_dir, _rows_with_margins(8, 0), model={"dtype": "float64"},
                 reward={"center_coefficient": center})
    cfg = load_config(None, tree=tree)
    run = setup(cfg, reward.load_reward_model)
    trainer = reward.build_trainer(run.cfg, run)
    model = trainer.model.eval()
    with torch.no_grad():  # a trained-looking head: the random init scores everything near 0
        model.score.weight.normal_(0, 3.0)
    records = [run.train_ds[i] for i in range(8)]
    batch = trainer.data_collator(records)
    assert batch["input_ids"].shape[0] == 16 and (batch["attention_mask"] == 0).any()  # padded
    with torch.no_grad():
        ours = trainer.compute_loss(model, dict(batch))
        hand = _hand_loss(model, records, center)
        no_margin = _hand_loss(model, records, center, with_margin=False)
    assert ours.dtype == torch.float64
    assert abs(ours.item() - hand.item()) < 1e-6, (ours.item(), hand.item())
    assert abs(hand.item() - no_margin.item()) > 1e-3  # the margins matter: dropping them would fail above


@pytest.mark.parametrize("attention", [PACKED_ATTENTION, "sdpa"])
@pytest.mark.parametrize("center, pad", [(None, "pad"), (0.01, "pad"), (0.01, "eos")])
def test_native_scores_and_loss_equal_trl_on_a_fixed_batch(center, pad, attention, tmp_path, sharp_model_dir,
                                                             lmforge_cache):
    # float64; TRL right-pads prompt + answer rows, the native batch packs [prompt, chosen, rejected] in one row
    # and reads the head at score_positions: each answer's reward must be the one transformers reads. "eos": a
    # tokenizer that pads with its EOS, where transformers reads the token before the answer's EOS
    tree = _tree(tmp_path, sharp_model_dir, _rows_with_margins(8, 0), model={"dtype": "float64"},
                 reward={"center_coefficient": center}, train={"engine": "hf"})
    run = setup(load_config(None, tree=tree), reward.load_reward_model)
    trainer = reward.build_trainer(run.cfg, run)
    model = trainer.model.eval()
    pad_id = run.tokenizer.eos_token_id if pad == "eos" else run.tokenizer.pad_token_id
    model.config.pad_token_id = pad_id
    with torch.no_grad():  # a trained-looking head: the random init scores everything near 0
        model.score.weight.normal_(0, 3.0)
    records = [run.train_ds[i] for i in range(8)]
    trl_batch = reward.RewardCollator(pad_id)(records)
    if attention == PACKED_ATTENTION:  # as train_native switches the model (pair_attention)
        assert use_packed_attention(model)
    objective = reward.RewardObjective(SharedPromptCollator(attention), pad_id, center)
    native_batch = objective.batch("train", list(range(8)), records)
    assert native_batch["input_ids"].shape[0] == 1 and objective.count(native_batch) == 8
    with torch.no_grad():
        trl_rewards = model(**trl_batch).logits[:, 0].view(2, 8).T  # (8, 2): chosen, rejected
        native_rewards = reward.pair_rewards(model, native_batch)
        trl_loss = trainer.compute_loss(model, dict(trl_batch))
        native_sum, stats = objective.loss(model, native_batch)
    assert native_rewards.dtype == torch.float64
    torch.testing.assert_close(native_rewards, trl_rewards, rtol=0, atol=1e-10)
    assert abs(native_sum.item() / 8 - trl_loss.item()) < 1e-10, (native_sum.item() / 8, trl_loss.item())
    logged = trainer._metrics["eval"]  # what TRL logs of this batch (the model is in eval mode)
    for key in ("accuracy", "margin", "mean_reward"):
        assert stats[key] / 8 == pytest.approx(logged[key][-1], rel=0, abs=1e-10), key
    if pad == "eos":  # the case differs from reading each answer's last token, so the test can tell them apart
        last = [p - 1 for p in _answer_ends(records)]
        assert native_batch["score_index"].tolist() != last


def _answer_ends(records) -> list[int]:
    """Each answer's end in a packed row (chosen, rejected of pair 0, ...): one past its last token."""
    ends, start = [], 0
    for r in records:
        P, C, R = (len(r[k]) for k in ("prompt_ids", "chosen_ids", "rejected_ids"))
        ends += [start + P + C, start + P + C + R]
        start += P + C + R
    return ends


def _train_rows(out) -> list[dict]:
    return [r for r in _metrics(out) if "loss" in r]


@pytest.mark.parametrize("peft", ["none", "lora"])
def test_native_accumulation_equals_a_large_batch(peft, tmp_path, tiny_model_dir, lmforge_cache):
    """1 x 4 pairs per step == 4 x 1 with accumulation: the loss and the metrics are averaged over the step's
    pairs. In float64, as tests/test_kto.py's check and for the same reason (fp32 summation order moves a
    near-zero gradient element's first Adam step by its sign)."""
    runs = {"large": {}, "accumulated": {"per_device_train_batch_size": 1, "gradient_accumulation_steps": 4}}
    for name, train in runs.items():
        tree = _tree(tmp_path, tiny_model_dir, _rows_with_margins(16, 0), out=name, model={"dtype": "float64"},
                     peft={"kind": peft, "r": 4, "alpha": 8} if peft != "none" else {"kind": "none"},
                     reward={"center_coefficient": 0.01},
                     train={"lr_scheduler_type": "constant", "save_steps": 100, **train})
        reward.train(load_config(None, tree=tree))
    large, accumulated = _train_rows(tmp_path / "large"), _train_rows(tmp_path / "accumulated")
    assert len(large) == 4
    for key in ("loss", "accuracy", "margin", "mean_reward", "grad_norm"):
        # metrics.jsonl rounds to 6 decimals: equal values may round apart by one unit in the last place
        assert [r[key] for r in accumulated] == pytest.approx([r[key] for r in large], rel=0, abs=1.01e-6), key
    name = "adapter_model.safetensors" if peft == "lora" else "model.safetensors"
    a, b = load_file(tmp_path / "large" / name), load_file(tmp_path / "accumulated" / name)
    assert all(v.dtype == torch.float64 for v in a.values()) and any("score" in k for k in a)
    assert any(v.abs().sum() > 0 for k, v in a.items() if "lora_B" in k or k.endswith("q_proj.weight"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-10, msg=k)


def test_margin_must_be_a_number(tmp_path, tiny_model_dir, lmforge_cache):
    rows = preference_rows(4, 0)
    rows[2]["margin"] = "big"
    cfg = write_config(tmp_path / "cfg.yaml", _tree(tmp_path, tiny_model_dir, rows))
    env = {**os.environ, "LMFORGE_CACHE": str(lmforge_cache)}
    res = subprocess.run([sys.executable, "-m", "lmforge", "prepare", str(cfg)], capture_output=True, text=True,
                         env=env)
    assert res.returncode == 2 and "margin" in res.stderr and "train.jsonl:3" in res.stderr, res.stderr[-2000:]


def test_reward_keys_only_for_method_reward(tmp_path, tiny_model_dir):
    tree = _tree(tmp_path, tiny_model_dir, preference_rows(4, 0), reward={"center_coefficient": 0.01})
    tree["method"] = "dpo"
    with pytest.raises(ConfigError, match="reward.center_coefficient"):
        load_config(None, tree=tree)


@pytest.mark.parametrize("engine", ["native", "hf"])
@pytest.mark.parametrize("kind", ["none", "lora"])
def test_cli_end_to_end(kind, engine, tmp_path, tiny_model_dir, lmforge_cache):
    rows = _rows_with_margins(24, 0)
    write_jsonl(tmp_path / "data" / "val.jsonl", preference_rows(8, 1))
    tree = _tree(tmp_path, tiny_model_dir, rows, peft={"kind": kind, "r": 4, "alpha": 8} if kind != "none"
                 else {"kind": "none"}, train={"engine": engine} if engine == "hf" else {})
    tree["data"]["train"] = [{"path": str(tmp_path / "data")}]  # train.jsonl + val.jsonl
    cfg = write_config(tmp_path / "cfg.yaml", tree)
    env = {**os.environ, "LMFORGE_CACHE": str(lmforge_cache)}
    res = subprocess.run([sys.executable, "-m", "lmforge", "train", str(cfg)], capture_output=True, text=True, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    out = tmp_path / "run"
    for name in ("config.yaml", "metrics.jsonl", "report.md", "checkpoint-2", "checkpoint-4", "tokenizer.json"):
        assert (out / name).exists(), name
    assert f"engine: {engine}" in (out / "config.yaml").read_text()  # native: the default engine
    rows_logged = _metrics(out)
    train_rows = [r for r in rows_logged if "loss" in r]
    for key in ("loss", "accuracy", "margin", "mean_reward", "tokens_per_second"):
        assert key in train_rows[-1], key
    assert any("eval_accuracy" in r and "eval_margin" in r for r in rows_logged)

    tok_ids = [[5, 6, 7, 8], [9, 10, 11, 12]]
    start = load_file(tiny_model_dir / "model.safetensors")
    if kind == "none":
        from transformers import AutoModelForSequenceClassification

        model = AutoModelForSequenceClassification.from_pretrained(out)
        trained = model.state_dict()
        assert all(not torch.equal(start[k], trained[k]) for k in start if k.endswith("q_proj.weight"))
    else:
        from peft import AutoPeftModelForSequenceClassification

        # the base is re-read from its own directory, a causal LM's config: one output is asked for
        model = AutoPeftModelForSequenceClassification.from_pretrained(out, num_labels=1)
        saved = load_file(out / "adapter_model.safetensors")
        assert any("score" in k for k in saved), list(saved)  # the head is saved with the adapter
        assert any("lora_B" in k and v.abs().sum() > 0 for k, v in saved.items())  # LoRA B starts at 0
        base = model.get_base_model().state_dict()
        frozen = [k for k in start if k.endswith("q_proj.weight")]
        assert frozen and all(torch.equal(start[k], base[k.replace("q_proj.weight", "q_proj.base_layer.weight")])
                              for k in frozen)
    assert model.config.num_labels == 1
    with torch.no_grad():
        scores = model(input_ids=torch.tensor(tok_ids)).logits
    assert scores.shape == (2, 1)  # one score per sequence


def _marked_rows(n: int, seed: int, good: str, bad: str) -> list[dict]:
    """An easy, learnable preference: the answers differ in one word, ``good`` in chosen, ``bad`` in rejected."""
    rng = random.Random(seed)
    words = "alpha beta gamma delta name age city job".split()
    rows = []
    for _ in range(n):
        prompt = " ".join(rng.choice(words) for _ in range(4))
        head, tail = (" ".join(rng.choice(words) for _ in range(rng.randint(1, 3))) for _ in range(2))
        rows.append({"prompt": prompt, "chosen": f"{head} {good} {tail}", "rejected": f"{head} {bad} {tail}"})
    return rows


def _held_out_accuracy(tmp_path, model_dir, good: str, bad: str) -> float:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tree = _tree(tmp_path / good, model_dir, _marked_rows(64, 0, good, bad),
                 train={"max_steps": 30, "learning_rate": 3e-3, "save_steps": 100, "logging_steps": 10})
    out = reward.train(load_config(None, tree=tree))
    model = AutoModelForSequenceClassification.from_pretrained(out).eval()
    enc = Encoder(AutoTokenizer.from_pretrained(out))  # the held-out pairs rendered as training renders rows

    def score(prompt, answer):
        return _score(model, sum(encode_side(enc, prompt, answer), []))

    held_out = _marked_rows(32, 1, good, bad)
    with torch.no_grad():
        wins = sum(bool(score(r["prompt"], r["chosen"]) > score(r["prompt"], r["rejected"])) for r in held_out)
    return wins / len(held_out)


def test_trained_reward_model_ranks_held_out_pairs_above_chance(tmp_path, tiny_model_dir, lmforge_cache):
    # both directions from the same initial weights: an untrained model that happens to prefer one word ranks
    # one direction right and the other wrong, so only learning passes both
    accuracy = {good: _held_out_accuracy(tmp_path, tiny_model_dir, good, bad)
                for good, bad in (("fox", "dog"), ("dog", "fox"))}
    assert min(accuracy.values()) >= 0.8, accuracy
