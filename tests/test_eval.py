"""Evaluation: metrics against hand-computed values, perplexity against a hand loop, the eval CLI."""

from __future__ import annotations

import math

import pytest

from lmforge.errors import ConfigError
from lmforge.evaluation.metrics import compute_metrics

PREDS = ["the cat sat on the mat", " the cat\n"]
REFS = ["the cat sat on the mat", "the cat sat"]


def test_rouge_matches_hand_computed():
    # pair 1 is identical (all 1.0). Pair 2 "the cat" vs "the cat sat":
    #   rouge1: P = 2/2, R = 2/3 -> F = 0.8;  rouge2: bigrams {the cat} vs {the cat, cat sat} -> F = 2/3;
    #   rougeL: LCS = 2 -> F = 0.8.
    m = compute_metrics(["rouge"], PREDS, REFS)
    assert m["rouge1"] == pytest.approx((1 + 0.8) / 2)
    assert m["rouge2"] == pytest.approx((1 + 2 / 3) / 2)
    assert m["rougeL"] == pytest.approx((1 + 0.8) / 2)
    assert m["rouge"] == m["rougeL"]


def test_bleu_matches_hand_computed():
    # every n-gram precision is 1 (8/8, 6/6, 4/4, 3/3); hypothesis length 8, reference length 9,
    # so BLEU = 100 * brevity penalty = 100 * exp(1 - 9/8).
    m = compute_metrics(["bleu"], PREDS, REFS)
    assert m["bleu"] == pytest.approx(100 * math.exp(1 - 9 / 8), abs=1e-4)


def test_exact_match_strips_whitespace():
    assert compute_metrics(["exact_match"], PREDS, REFS) == {"exact_match": 0.5}
    assert compute_metrics(["exact_match"], [" a\n", "b"], ["a", "b"]) == {"exact_match": 1.0}


def test_perplexity_is_left_to_evaluate_and_unknown_names_fail():
    assert compute_metrics(["perplexity"], PREDS, REFS) == {}
    with pytest.raises(ConfigError, match="rogue.*valid: perplexity, reward_accuracy, rouge, bleu, exact_match"):
        compute_metrics(["rogue"], PREDS, REFS)


# ------------------------------------------------------------------------------------------ with the tiny model
import json  # noqa: E402

import torch  # noqa: E402
from conftest import write_jsonl  # noqa: E402

from lmforge.cli import main  # noqa: E402

PC_ROWS = [{"prompt": "the quick brown", "completion": " fox jumps"},
           {"prompt": "alpha beta", "completion": " gamma delta over a lazy dog"},
           {"prompt": "name", "completion": " json"}]


def _hand_perplexity(model_dir, rows) -> tuple[float, int]:
    """Completion tokens (and the EOS after them) only, one row at a time, written out by hand."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    nll, count = 0.0, 0
    for row in rows:
        p = tok(row["prompt"], add_special_tokens=False).input_ids
        c = tok(row["completion"], add_special_tokens=False).input_ids + [tok.eos_token_id]
        ids = torch.tensor([p + c])
        with torch.no_grad():
            logp = torch.log_softmax(model(ids).logits[0].float(), -1)
        for t in range(len(p), len(p) + len(c)):
            nll -= logp[t - 1, ids[0, t]].item()
            count += 1
    return math.exp(nll / count), count


def test_cli_perplexity_counts_completion_tokens_only(tmp_path, tiny_model_dir, capsys):
    data = write_jsonl(tmp_path / "val.jsonl", PC_ROWS)
    report = tmp_path / "report.json"
    assert main(["eval", "--model", str(tiny_model_dir), "--data", str(data), "--dtype", "float32",
                 "--batch-size", "2", "--output", str(report)]) == 0
    got = json.loads(report.read_text())["metrics"]
    ppl, count = _hand_perplexity(tiny_model_dir, PC_ROWS)
    assert got["tokens"] == count
    assert got["perplexity"] == pytest.approx(ppl, rel=1e-4)
    assert "perplexity" in capsys.readouterr().out


def test_cli_generation_metrics_against_known_predictions(tmp_path, tiny_model_dir):
    from lmforge.inference.generate import GenerationOptions, Generator, encode_prompt
    from lmforge.inference.loading import load_for_inference

    loaded = load_for_inference(str(tiny_model_dir), dtype="float32")
    prompts = ["the quick brown", "alpha beta", "name", "seven wizards"]
    preds = [c.text for c in Generator(loaded).generate(
        [encode_prompt({"prompt": p}, loaded.tokenizer) for p in prompts], GenerationOptions(max_new_tokens=6))]
    # two rows whose reference is exactly what the model says, two it cannot match
    refs = [preds[0], preds[1], "zzz unmatched", "qqq unmatched"]
    data = write_jsonl(tmp_path / "val.jsonl", [{"prompt": p, "completion": r} for p, r in zip(prompts, refs)])
    report = tmp_path / "r.json"
    assert main(["eval", "--model", str(tiny_model_dir), "--data", str(data), "--dtype", "float32",
                 "--metrics", "exact_match,rouge,bleu", "--max-new-tokens", "6", "--output", str(report)]) == 0
    out = json.loads(report.read_text())
    assert [s["prediction"] for s in out["samples"]] == preds
    assert out["metrics"]["exact_match"] == 0.5
    assert out["metrics"] == pytest.approx(compute_metrics(["exact_match", "rouge", "bleu"], preds, refs))


def test_cli_eval_errors(tmp_path, tiny_model_dir, capsys):
    data = write_jsonl(tmp_path / "val.jsonl", [PC_ROWS[0], {"prompt": "x"}])
    assert main(["eval", "--model", str(tiny_model_dir), "--data", str(data)]) == 2
    assert "val.jsonl:2: missing key 'completion'" in capsys.readouterr().err
    assert main(["eval", "--model", str(tiny_model_dir), "--data", str(data), "--metrics", "perplexity,blue"]) == 2
    assert "--metrics: unknown metric(s) 'blue'" in capsys.readouterr().err
    import importlib.util

    if importlib.util.find_spec("lm_eval") is None:
        assert main(["eval", "--model", str(tiny_model_dir), "--tasks", "hellaswag"]) == 2
        assert "lm-eval-harness is not installed" in capsys.readouterr().err


LM_EVAL_TASK = """task: lmforge_toy_choice
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
"""


def test_cli_lm_eval_task_from_a_local_yaml_equals_hand_scoring(tmp_path, tiny_model_dir, capsys):
    """An lm-eval multiple-choice task on local data: accuracy equals picking, by hand, the choice with the
    highest log-likelihood after the question (lm-eval's rule: continuation tokens after the context's)."""
    pytest.importorskip("lm_eval")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    docs = [{"question": q, "choices": c, "answer": a} for q, c, a in [
        ("the quick brown", ["fox", "table", "seven"], 0), ("alpha beta", ["gamma", "dog"], 1),
        ("record 12 name", ["ana", "json", "zebra crossing"], 2), ("one two three", ["four", "five"], 0),
        ("extract the", ["name", "age", "record"], 1), ("lazy", ["dog", "cat"], 1)]]
    data = write_jsonl(tmp_path / "toy.jsonl", docs)
    task = tmp_path / "tasks" / "toy.yaml"
    task.parent.mkdir()
    task.write_text(LM_EVAL_TASK.format(data=data))
    report = tmp_path / "report.json"
    assert main(["eval", "--model", str(tiny_model_dir), "--tasks", str(task), "--dtype", "float32",
                 "--output", str(report)]) == 0
    acc = json.loads(report.read_text())["metrics"]["lmforge_toy_choice/acc"]

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()

    def loglikelihood(context: str, continuation: str) -> float:
        whole, ctx = tok(context + continuation).input_ids, tok(context).input_ids
        with torch.no_grad():
            logp = model(torch.tensor([whole])).logits[0].log_softmax(-1)
        return sum(logp[i - 1, whole[i]].item() for i in range(len(ctx), len(whole)))

    right = [max(range(len(d["choices"])), key=lambda i: loglikelihood(d["question"], " " + d["choices"][i]))
             == d["answer"] for d in docs]
    assert acc == pytest.approx(sum(right) / len(docs))
    assert 0 < sum(right) < len(docs)  # the random model gets some right and some wrong: the match means something
    assert main(["eval", "--model", str(tiny_model_dir), "--tasks", str(tmp_path / "missing.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err
