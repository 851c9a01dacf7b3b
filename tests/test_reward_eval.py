"""`lmforge eval --metrics reward_accuracy` on a tiny trained reward model (full and LoRA): the accuracy and margin
equal scoring the held-out pairs by hand with plain transformers/PEFT; the metric/model/data mismatches exit 2."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import base_config, write_jsonl
from test_reward import _marked_rows

from lmforge.cli import main
from lmforge.config import load_config
from lmforge.data.preference import encode_side
from lmforge.data.tokenize import Encoder
from lmforge.methods import reward


def _fox_rows(n: int, seed: int) -> list[dict]:
    """An easy preference: the answers differ in one word, "fox" in chosen, "dog" in rejected."""
    return _marked_rows(n, seed, "fox", "dog")


def _held_out() -> list[dict]:
    rows = _fox_rows(14, 1)
    for r in rows[:4]:  # message lists too: rendered through the chat template, as training renders them
        r["prompt"] = [{"role": "user", "content": r["prompt"]}]
        r["chosen"] = [{"role": "assistant", "content": r["chosen"]}]
        r["rejected"] = [{"role": "assistant", "content": r["rejected"]}]
    rows[5]["rejected"] = rows[5]["chosen"]  # a tie: scored equal, so not a win (a `>=` would count it)
    rows[6]["chosen"], rows[6]["rejected"] = rows[6]["rejected"], rows[6]["chosen"]  # a pair the model should lose
    return rows


@pytest.fixture(scope="module", params=["none", "lora"])
def reward_model(request, tmp_path_factory, tiny_model_dir):
    tmp = tmp_path_factory.mktemp(f"rm-{request.param}")
    data = write_jsonl(tmp / "train.jsonl", _fox_rows(64, 0))
    peft = {"kind": "lora", "r": 4, "alpha": 8} if request.param == "lora" else {"kind": "none"}
    tree = base_config(tiny_model_dir, data, tmp / "run", method="reward", peft=peft,
                       train={"max_steps": 20, "learning_rate": 3e-3, "save_steps": 100, "logging_steps": 10})
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LMFORGE_CACHE", str(tmp / "cache"))
        return request.param, reward.train(load_config(None, tree=tree))


def _by_hand(kind: str, out, rows) -> tuple[float, float]:
    """Each sequence scored alone (no padding) by the model as plain transformers / PEFT load it."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    if kind == "none":
        model = AutoModelForSequenceClassification.from_pretrained(out).eval()
    else:
        from peft import AutoPeftModelForSequenceClassification

        model = AutoPeftModelForSequenceClassification.from_pretrained(out, num_labels=1).eval()
    enc = Encoder(AutoTokenizer.from_pretrained(out))

    def score(prompt, answer) -> float:
        ids = sum(encode_side(enc, prompt, answer), [])  # prompt + answer, as data/preference.py renders them
        return model(input_ids=torch.tensor([ids])).logits[0, 0].item()

    with torch.no_grad():
        margins = [score(r["prompt"], r["chosen"]) - score(r["prompt"], r["rejected"]) for r in rows]
    return sum(m > 0 for m in margins) / len(rows), sum(margins) / len(rows)


def test_cli_reward_accuracy_equals_hand_scoring(reward_model, tmp_path, capsys):
    kind, out = reward_model
    rows = _held_out()
    data = write_jsonl(tmp_path / "pairs.jsonl", rows)
    report = tmp_path / "r.json"
    # 4 pairs a batch: padded, several batches; float32 as the hand scoring
    assert main(["eval", "--model", str(out), "--data", str(data), "--metrics", "reward_accuracy",
                 "--batch-size", "4", "--dtype", "float32", "--output", str(report)]) == 0
    printed = capsys.readouterr().out
    assert "reward_accuracy" in printed and "reward_margin" in printed
    metrics = json.loads(report.read_text())["metrics"]
    accuracy, margin = _by_hand(kind, out, rows)
    assert metrics["pairs"] == len(rows)
    assert metrics["reward_accuracy"] == accuracy, (metrics, accuracy)
    assert metrics["reward_margin"] == pytest.approx(margin, abs=1e-4)
    assert 0.6 <= accuracy < 1  # learned the easy preference; the tie and the swapped pair are misses


def test_reward_metric_mismatches_exit_2(reward_model, tiny_model_dir, tmp_path, capsys):
    _, out = reward_model
    pairs = write_jsonl(tmp_path / "pairs.jsonl", _fox_rows(3, 2))
    texts = write_jsonl(tmp_path / "pc.jsonl", [{"prompt": "a", "completion": "b"}])
    report = str(tmp_path / "r.json")
    assert main(["eval", "--model", str(tiny_model_dir), "--data", str(pairs), "--metrics", "reward_accuracy",
                 "--output", report]) == 2
    err = capsys.readouterr().err
    assert "--metrics reward_accuracy" in err and "not a reward model" in err, err
    assert main(["eval", "--model", str(out), "--data", str(pairs), "--metrics", "perplexity", "--output", report]) == 2
    err = capsys.readouterr().err
    assert "--metrics perplexity" in err and "is a reward model" in err, err
    assert main(["eval", "--model", str(out), "--data", str(texts), "--metrics", "reward_accuracy",
                 "--output", report]) == 2
    err = capsys.readouterr().err
    assert "--metrics reward_accuracy" in err and "preference rows" in err, err
    prompts = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "alpha"}])
    assert main(["generate", "--model", str(out), "--input", str(prompts), "--output", str(tmp_path / "o.jsonl")]) == 2
    assert "is a reward model" in capsys.readouterr().err  # not a traceback from inside transformers
