"""`lmforge merge` and adapter loading for inference: merged logits equal the adapter's, within 1e-3."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import write_jsonl

from lmforge.cli import main


@pytest.fixture(scope="module", params=["lora", "dora"])
def adapter_dir(request, tiny_model_dir, tmp_path_factory):
    """An adapter with non-zero deltas (random B), saved as lmforge saves one: adapter + tokenizer."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False,
                     use_dora=request.param == "dora", task_type="CAUSAL_LM")
    torch.manual_seed(1)
    model = get_peft_model(base, cfg)
    out = tmp_path_factory.mktemp(f"adapter-{request.param}")
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(out)
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == str(tiny_model_dir)
    return out


def _adapter_logits(tiny_model_dir, adapter_dir, ids):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(adapter_dir)).eval()
    with torch.no_grad():
        return model(ids).logits, base


def test_merge_gives_a_plain_model_with_equal_logits(adapter_dir, tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "merged"
    assert main(["merge", "--model", str(adapter_dir), "--output", str(out)]) == 0
    assert (out / "config.json").exists() and not (out / "adapter_config.json").exists()
    tok = AutoTokenizer.from_pretrained(out)
    ids = tok("the quick brown fox jumps over a lazy dog", return_tensors="pt").input_ids
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    assert merged.dtype == torch.float32  # the base model's dtype
    with torch.no_grad():
        got = merged(ids).logits
    want, _ = _adapter_logits(tiny_model_dir, adapter_dir, ids)
    plain = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    with torch.no_grad():
        base_logits = plain(ids).logits
    assert (want - base_logits).abs().max() > 1e-2  # the adapter really changes the model
    assert (got - want).abs().max() < 1e-3


def test_generate_with_adapter_dir_equals_merged_model(adapter_dir, tmp_path):
    inp = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "the quick brown"}, {"prompt": "alpha beta gamma"}])
    merged = tmp_path / "merged"
    assert main(["merge", "--model", str(adapter_dir), "--output", str(merged)]) == 0
    outs = []
    for model in (adapter_dir, merged):
        out = tmp_path / f"out-{model.name}.jsonl"
        assert main(["generate", "--model", str(model), "--input", str(inp), "--output", str(out),
                     "--max-new-tokens", "8", "--dtype", "float32", "--no-progress"]) == 0
        outs.append([json.loads(line)["completion"] for line in out.read_text().splitlines()])
    assert outs[0] == outs[1]


def test_merge_refuses_a_full_model(tiny_model_dir, tmp_path, capsys):
    assert main(["merge", "--model", str(tiny_model_dir), "--output", str(tmp_path / "m")]) == 2
    assert "not a PEFT adapter directory" in capsys.readouterr().err


def test_qlora_run_merges_onto_the_full_precision_base(tmp_path, tiny_model_dir, lmforge_cache):
    """A 4-bit QLoRA run, then `merge`: the plain model equals the adapter applied to the unquantised base."""
    pytest.importorskip("bitsandbytes")
    from conftest import base_config, chat_rows, write_config
    from transformers import AutoModelForCausalLM, AutoTokenizer

    data = write_jsonl(tmp_path / "train.jsonl", chat_rows(16))
    tree = base_config(tiny_model_dir, data, tmp_path / "qlora", peft={"kind": "qlora", "bits": 4, "r": 4, "alpha": 8},
                       train={"max_steps": 3, "learning_rate": 5e-2})
    assert main(["train", str(write_config(tmp_path / "cfg.yaml", tree))]) == 0
    out = tmp_path / "merged"
    assert main(["merge", "--model", str(tmp_path / "qlora"), "--output", str(out)]) == 0
    ids = AutoTokenizer.from_pretrained(out)("record 7: name ana, age 31", return_tensors="pt").input_ids
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    assert merged.dtype == torch.float32 and not getattr(merged.config, "quantization_config", None)
    with torch.no_grad():
        got = merged(ids).logits
    want, base = _adapter_logits(tiny_model_dir, tmp_path / "qlora", ids)
    with torch.no_grad():
        base_logits = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()(ids).logits
    assert (want - base_logits).abs().max() > 1e-3  # training moved the adapter
    assert (got - want).abs().max() < 1e-3


def _prompt_tuning_adapter(model_dir, out):
    """A prompt-tuning adapter with random virtual tokens over ``model_dir``, saved with its tokenizer."""
    from peft import PromptTuningConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(2)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    get_peft_model(base, PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)).save_pretrained(out)
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(out)
    return out


def _alone_with_peft(model_dir, adapter, prompts: list[str], max_new_tokens: int) -> list[list[int]]:
    """Each prompt generated alone (no padding) by PEFT's own generate, without a KV cache: the reference (with one,
    PEFT 0.21 under transformers 5 prepends the virtual tokens again at every step: test_generate.py)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(adapter)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32),
                                      str(adapter)).eval()
    out = []
    for prompt in prompts:
        ids = tok(prompt, return_tensors="pt").input_ids
        new = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=tok.pad_token_id, use_cache=False)[0, ids.shape[1]:]
        out.append(new.tolist())
    return out


def _generate_cli(adapter, rows, tmp_path, *extra) -> list[dict]:
    out = tmp_path / "out.jsonl"
    assert main(["generate", "--model", str(adapter), "--input", str(write_jsonl(tmp_path / "in.jsonl", rows)),
                 "--output", str(out), "--max-new-tokens", "8", "--dtype", "float32", "--no-progress", *extra]) == 0
    return [json.loads(line) for line in out.read_text().splitlines()]


def test_generate_with_a_prompt_tuning_adapter_equals_peft_generate(tiny_model_dir, tmp_path):
    """Prompt-tuning adapters stay wrapped (nothing to merge) and generate through PEFT's own generate."""
    from transformers import AutoTokenizer

    adapter = _prompt_tuning_adapter(tiny_model_dir, tmp_path / "prompt")
    rows = [{"prompt": "the quick brown"}, {"prompt": "alpha beta gamma delta"}]
    got = [r["completion"] for r in _generate_cli(adapter, rows, tmp_path)]
    tok = AutoTokenizer.from_pretrained(adapter)
    want = _alone_with_peft(tiny_model_dir, adapter, [r["prompt"] for r in rows], 8)
    assert got == [tok.decode(ids, skip_special_tokens=True) for ids in want]


def test_prompt_tuning_answer_does_not_depend_on_the_batch(sharp_model_dir, tmp_path):
    """Issue 14: with left padding PEFT puts the virtual tokens before the pads, so a padded row saw them at
    another distance. On a model with peaked attention that changes tokens on any CPU; batched generation
    must give each prompt exactly the tokens it gets alone."""
    adapter = _prompt_tuning_adapter(sharp_model_dir, tmp_path / "prompt")
    prompts = ["x", "the quick brown", "alpha beta gamma delta", "json", "record 12 name age city",
               "the lazy dog sleeps under a tree in the warm afternoon sun", "one two three"]
    rows = [{"prompt": p} for p in prompts]
    from transformers import AutoTokenizer

    got = _generate_cli(adapter, rows, tmp_path, "--batch-size", "8")
    want = _alone_with_peft(sharp_model_dir, adapter, prompts, 8)
    tok = AutoTokenizer.from_pretrained(adapter)
    assert [(r["completion"], r["completion_tokens"]) for r in got] == \
        [(tok.decode(w, skip_special_tokens=True), len(w)) for w in want]


def test_length_batches_never_mix_lengths_when_asked():
    from lmforge.inference.generate import length_batches

    lengths = [3, 5, 3, 1, 5, 5, 3]
    assert length_batches(lengths, 2) == [[1, 4], [5, 0], [2, 6], [3]]  # longest first, mixed lengths allowed
    assert length_batches(lengths, 2, equal_lengths=True) == [[1, 4], [5], [0, 2], [6], [3]]


def test_serve_engine_batches_prompt_tuning_requests_by_length(sharp_model_dir, tmp_path):
    """The server's engine gathers concurrent requests into one batch: each must still get its alone answer."""
    import asyncio

    from lmforge.inference.engine import Engine, Job
    from lmforge.inference.generate import GenerationOptions, Generator
    from lmforge.inference.loading import load_for_inference

    adapter = _prompt_tuning_adapter(sharp_model_dir, tmp_path / "prompt")
    prompts = ["x", "the quick brown", "alpha beta gamma delta", "json", "delta gamma beta alpha",
               "one two three four five six"]
    loaded = load_for_inference(str(adapter), dtype="float32")
    ids = [loaded.tokenizer(p).input_ids for p in prompts]
    assert len(ids[2]) == len(ids[4]) and len({len(i) for i in ids}) > 2  # some lengths shared, some not
    engine = Engine(Generator(loaded), max_batch_size=8, gather_seconds=0.5)

    async def ask_all():
        loop, events = asyncio.get_running_loop(), asyncio.Queue()
        for i, p in enumerate(ids):  # queued before the engine starts: one gathered group of 5 requests
            engine.submit(Job(p, GenerationOptions(max_new_tokens=8), loop, events, index=i))
        engine.start()
        got = {}
        while len(got) < len(ids):
            index, kind, value = await events.get()
            assert kind == "done", value
            got[index] = value.token_ids
        return [got[i] for i in range(len(ids))]

    try:
        got = asyncio.run(ask_all())
    finally:
        engine.stop()
    assert got == _alone_with_peft(sharp_model_dir, adapter, prompts, 8)
    assert sorted(engine.batches) == [1, 1, 1, 1, 2]  # gathered together, then run as one batch per length
