"""method: grpo on the tiny model: what a run writes, the decode loop's log-probs against the training forward's,
split invariance (accumulation), tied groups, resume; the loss itself is checked against TRL in test_rl.py."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import base_config, write_config, write_jsonl
from safetensors.torch import load_file

from lmforge.config import load_config
from lmforge.errors import DataError
from lmforge.methods import grpo

REWARDS = '''
def even_tokens(prompts, completions, completion_ids, **kwargs):
    """The fraction of even token ids: varies between samples, so groups have a spread."""
    return [sum(1 for t in ids if t % 2 == 0) / max(len(ids), 1) for ids in completion_ids]

def constant(prompts, completions, **kwargs):
    return [1.0] * len(completions)

def broken(prompts, completions, **kwargs):
    raise KeyError("answer")
'''


def _rows(n: int, seed: int = 0) -> list[dict]:
    words = "the quick brown fox jumps over a lazy dog while seven wizards judge".split()
    return [{"prompt": " ".join(words[(i * 3 + seed + k) % len(words)] for k in range(4)), "answer": str(i)}
            for i in range(n)]


def _tree(tmp_path, model_dir, out="run", grpo_keys=None, **sections):
    write_jsonl(tmp_path / "data" / "train.jsonl", _rows(8))
    (tmp_path / "rewards.py").write_text(REWARDS)
    g = {"rewards": [{"function": f"{tmp_path / 'rewards.py'}:even_tokens"}], "num_generations": 4,
         "max_completion_length": 6, "temperature": 0.7, **(grpo_keys or {})}
    tree = base_config(model_dir, tmp_path / "data" / "train.jsonl", tmp_path / out, method="grpo", grpo=g,
                       peft={"kind": "lora", "r": 4, "alpha": 8})
    tree["train"].update(per_device_train_batch_size=2, max_steps=3, save_steps=2, learning_rate=5e-2)
    for name, values in sections.items():
        tree.setdefault(name, {}).update(values)
    return tree


def _train_rows(out) -> list[dict]:
    return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def test_grpo_cli_run_writes_rewards_rollouts_and_an_adapter(tmp_path, tiny_model_dir, lmforge_cache):
    """Through the CLI: the metrics a user watches, rollouts.jsonl, the plan; loss ~0 (grpo, one iteration,
    beta 0) while the weights change; the decode loop's log-probs equal the training forward's at temperature
    0.7 (trl#4159: a forward that forgot the temperature would differ by far more than 1e-4)."""
    tree = _tree(tmp_path, tiny_model_dir, grpo_keys={"loss_type": "grpo"})
    r = subprocess.run([sys.executable, "-m", "lmforge", "train", str(write_config(tmp_path / "c.yaml", tree))],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    out = tmp_path / "run"
    rows = _train_rows(out)
    assert [row["step"] for row in rows] == [1, 2, 3]
    for key in ("reward", "reward_std", "frac_reward_zero_std", "rewards/even_tokens/mean", "completions/mean_length",
                "completions/max_length", "completions/clipped_ratio", "clip_ratio/region_mean", "entropy",
                "rollout_s", "train_s", "completions_per_second", "logp_mismatch"):
        assert key in rows[0], key
    assert all(abs(row["loss"]) < 1e-5 for row in rows)  # sum of group-centred advantages: 0 in each group
    assert all(row["logp_mismatch"] < 1e-4 for row in rows)
    assert all(0 <= row["reward"] <= 1 for row in rows)
    rollouts = [json.loads(x) for x in (out / ROLLOUTS).read_text().splitlines()]
    assert {x["step"] for x in rollouts} == {1, 2, 3}
    assert all(len(x["completions"]) == len(x["rewards"]) == 4 and x["origin"].endswith(tuple("0123456789"))
               for x in rollouts)
    start = load_file(out / "checkpoint-2" / "adapter_model.safetensors")
    end = load_file(out / "adapter_model.safetensors")
    assert any(not torch.equal(start[k], end[k]) for k in start)
    assert "# plan: method: grpo" in (out / "config.yaml").read_text()
    assert (out / "plots" / "loss.png").exists()


ROLLOUTS = grpo.ROLLOUTS


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "dapo", "bnpo"])
def test_accumulation_equals_a_large_batch(loss_type, tmp_path, tiny_model_dir, lmforge_cache):
    """2 prompts x 4 completions per step == 1 prompt per micro-batch x 2 accumulation: the rollout is the step's
    and the loss's normaliser is counted over the whole step (trl#3021), for every loss type. float64: the runs
    differ only in summation order (see test_kto.py's accumulation test)."""
    runs = {"large": {}, "accumulated": {"per_device_train_batch_size": 1, "gradient_accumulation_steps": 2}}
    for name, train in runs.items():
        tree = _tree(tmp_path, tiny_model_dir, out=name, grpo_keys={"loss_type": loss_type},
                     model={"dtype": "float64"}, train={"lr_scheduler_type": "constant", "save_strategy": "no",
                                                        **train})
        grpo.train(load_config(None, tree=tree))
    large, accumulated = _train_rows(tmp_path / "large"), _train_rows(tmp_path / "accumulated")
    for key in ("loss", "reward", "grad_norm", "entropy", "completions/mean_length"):
        assert [r[key] for r in accumulated] == pytest.approx([r[key] for r in large], rel=0, abs=1.01e-6), key
    a = load_file(tmp_path / "large" / "adapter_model.safetensors")
    b = load_file(tmp_path / "accumulated" / "adapter_model.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-10, msg=k)


def test_tied_groups_give_no_gradient(tmp_path, tiny_model_dir, lmforge_cache):
    """A reward every completion ties on: every group counts in frac_reward_zero_std and nothing moves."""
    tree = _tree(tmp_path, tiny_model_dir, grpo_keys={"rewards": [{"function": f"{tmp_path / 'rewards.py'}:constant"}]},
                 train={"save_strategy": "no", "weight_decay": 0.0})
    grpo.train(load_config(None, tree=tree))
    rows = _train_rows(tmp_path / "run")
    assert all(r["frac_reward_zero_std"] == 1.0 and r["grad_norm"] == 0.0 for r in rows)
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), tmp_path / "run")
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_b and all(torch.count_nonzero(p) == 0 for p in lora_b)  # still LoRA's zero init


@pytest.mark.parametrize("peft", ["lora", "none"])
def test_beta_measures_kl_to_the_starting_model(peft, tmp_path, tiny_model_dir, lmforge_cache):
    """beta > 0: the reference is the adapter disabled (LoRA) or a frozen copy (full fine-tune). Before the first
    update the policy is the reference (kl exactly 0); after it, kl > 0."""
    tree = _tree(tmp_path, tiny_model_dir, grpo_keys={"beta": 0.1}, peft={"kind": peft},
                 train={"save_strategy": "no"})
    grpo.train(load_config(None, tree=tree))
    rows = _train_rows(tmp_path / "run")
    assert rows[0]["kl"] == 0.0 and all(r["kl"] > 0 for r in rows[1:])


def test_a_reward_model_as_a_reward(tmp_path, tiny_model_dir, lmforge_cache):
    """{model: DIR} beside a function: the run logs each reward's mean, and the total is their weighted sum."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    rm = tmp_path / "rm"
    torch.manual_seed(0)
    AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1).save_pretrained(rm)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(rm)
    rewards = [{"function": f"{tmp_path / 'rewards.py'}:constant", "weight": 1.0}, {"model": str(rm), "weight": 0.5}]
    tree = _tree(tmp_path, tiny_model_dir, grpo_keys={"rewards": rewards}, train={"save_strategy": "no"})
    grpo.train(load_config(None, tree=tree))
    for r in _train_rows(tmp_path / "run"):
        assert r["rewards/constant/mean"] == 1.0
        assert r["reward"] == pytest.approx(1.0 + 0.5 * r["rewards/rm_rm/mean"], abs=2e-6)
        assert r["frac_reward_zero_std"] < 1.0  # the model's scores differ between completions


def test_a_reward_that_raises_names_the_function_and_the_row(tmp_path, tiny_model_dir, lmforge_cache):
    tree = _tree(tmp_path, tiny_model_dir, grpo_keys={"rewards": [{"function": f"{tmp_path / 'rewards.py'}:broken"}]})
    with pytest.raises(DataError) as e:
        grpo.train(load_config(None, tree=tree))
    assert "broken" in str(e.value) and "train.jsonl:" in str(e.value) and "KeyError" in str(e.value)


@pytest.mark.parametrize("iterations", [1, 2])
def test_resume_is_bitwise(iterations, tmp_path, tiny_model_dir, lmforge_cache):
    """Resumed from checkpoint-2 (with num_iterations 2 also checkpoint-3, mid-way through a reused rollout), the
    run regenerates the same completions (their seeds are the step's) and ends on the same weights."""
    keys = {"num_iterations": iterations}
    save = 2 if iterations == 1 else 3
    tree = _tree(tmp_path, tiny_model_dir, out="full", grpo_keys=keys, train={"max_steps": 4, "save_steps": save})
    grpo.train(load_config(None, tree=tree))
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(tmp_path / "full" / f"checkpoint-{save}", resumed / f"checkpoint-{save}")
    tree = _tree(tmp_path, tiny_model_dir, out="resumed", grpo_keys=keys, train={"max_steps": 4, "save_steps": save})
    grpo.train(load_config(None, tree=tree))
    a = load_file(tmp_path / "full" / "adapter_model.safetensors")
    b = load_file(resumed / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    full, again = _train_rows(tmp_path / "full"), _train_rows(resumed)
    assert [r["step"] for r in again] == list(range(save + 1, 5))
    # (a step that reuses a rollout logs no reward: nothing was sampled)
    assert [(r["loss"], r.get("reward")) for r in again] == [(r["loss"], r.get("reward")) for r in full][save:]


def test_rollouts_after_an_update_use_the_updated_weights_for_a_shared_prompt_prefix(tmp_path, tiny_model_dir,
                                                                                        lmforge_cache):
    """Prompts sharing a long prefix: the decode loop keeps the prefix's keys/values between runs, so after an update
    they must be computed anew (else the uninterrupted run samples from stale ones). Resumed (a fresh decode loop)
    from checkpoint-2 equals uninterrupted."""
    rows = [{**r, "prompt": "Judge each phrase below by its words alone, then answer: " + r["prompt"]} for r in _rows(8)]
    runs = {}
    for out in ("full", "resumed"):
        tree = _tree(tmp_path, tiny_model_dir, out=out, train={"max_steps": 4, "save_steps": 2})
        write_jsonl(tmp_path / "data" / "train.jsonl", rows)
        if out == "resumed":
            (tmp_path / out).mkdir()
            shutil.copytree(tmp_path / "full" / "checkpoint-2", tmp_path / out / "checkpoint-2")
        grpo.train(load_config(None, tree=tree))
        runs[out] = _train_rows(tmp_path / out)
    assert [(r["loss"], r["reward"]) for r in runs["resumed"]] == [(r["loss"], r["reward"]) for r in runs["full"]][2:]


@pytest.mark.slow
@pytest.mark.parametrize("loss_type, scale", [("grpo", "group"), ("dapo", "batch")])
def test_ddp_two_processes_equal_one_process(loss_type, scale, tmp_path, tiny_model_dir, lmforge_cache):
    """2 processes x 1 prompt == 1 process x 2 prompts: each rank samples its own prompts' groups, the loss's units
    and (scale_rewards: batch) the rewards' std span both ranks. float64, as the accumulation test."""
    keys = {"loss_type": loss_type, "scale_rewards": scale}
    common = {"lr_scheduler_type": "constant", "save_strategy": "no"}
    two = _tree(tmp_path, tiny_model_dir, out="two", grpo_keys=keys, model={"dtype": "float64"},
                train={**common, "distributed": "ddp", "per_device_train_batch_size": 1})
    env = {**os.environ, "LMFORGE_CACHE": str(lmforge_cache), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "lmforge", "train", "--nproc-per-node", "2",
                           str(write_config(tmp_path / "two.yaml", two))], capture_output=True, text=True, env=env,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-5000:]
    assert "distributed: ddp on 2 processes" in proc.stdout
    grpo.train(load_config(None, tree=_tree(tmp_path, tiny_model_dir, out="one", grpo_keys=keys,
                                            model={"dtype": "float64"}, train=common)))
    a, b = _train_rows(tmp_path / "two"), _train_rows(tmp_path / "one")
    for key in ("loss", "reward", "reward_std", "grad_norm", "completions/mean_length"):
        assert [r[key] for r in a] == pytest.approx([r[key] for r in b], rel=0, abs=1.01e-6), key
    wa = load_file(tmp_path / "two" / "adapter_model.safetensors")
    wb = load_file(tmp_path / "one" / "adapter_model.safetensors")
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=1e-10, msg=k)


@pytest.mark.slow
def test_kill_9_then_resume_auto_is_bitwise(tmp_path, tiny_model_dir, lmforge_cache):
    """kill -9 once a checkpoint is written; `resume: auto` continues from it and ends on the uninterrupted run's
    weights, sampling what it would have sampled (no RNG state to lose: each completion's seed is its step's)."""
    keys = {"num_iterations": 2}
    tree = _tree(tmp_path, tiny_model_dir, out="killed", grpo_keys=keys, train={"max_steps": 8, "save_steps": 3})
    config = write_config(tmp_path / "killed.yaml", tree)
    env = {**os.environ, "LMFORGE_CACHE": str(lmforge_cache)}
    proc = subprocess.Popen([sys.executable, "-m", "lmforge", "train", str(config)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not (tmp_path / "killed" / "checkpoint-3").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (tmp_path / "killed" / "checkpoint-3").exists() and not (tmp_path / "killed" / "adapter_model.safetensors").exists()
    r = subprocess.run([sys.executable, "-m", "lmforge", "train", str(config)], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "checkpoint-" in r.stdout + r.stderr and "resum" in (r.stdout + r.stderr).lower()
    grpo.train(load_config(None, tree=_tree(tmp_path, tiny_model_dir, out="whole", grpo_keys=keys,
                                            train={"max_steps": 8, "save_steps": 3})))
    a = load_file(tmp_path / "killed" / "adapter_model.safetensors")
    b = load_file(tmp_path / "whole" / "adapter_model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    rows = _train_rows(tmp_path / "killed")
    assert [r["step"] for r in rows] == list(range(1, 9))  # the killed run's rows after its checkpoint are dropped
