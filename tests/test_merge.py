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


def test_generate_with_a_prompt_tuning_adapter_equals_peft_generate(tiny_model_dir, tmp_path):
    """Prompt-tuning adapters stay wrapped (nothing to merge) and generate through PEFT's own generate."""
    from peft import PeftModel, PromptTuningConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(2)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    adapter = tmp_path / "prompt"
    get_peft_model(base, PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)).save_pretrained(adapter)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tok.save_pretrained(adapter)
    rows = [{"prompt": "the quick brown"}, {"prompt": "alpha beta gamma delta"}]
    out = tmp_path / "out.jsonl"
    assert main(["generate", "--model", str(adapter), "--input", str(write_jsonl(tmp_path / "in.jsonl", rows)),
                 "--output", str(out), "--max-new-tokens", "8", "--dtype", "float32", "--no-progress"]) == 0
    got = [json.loads(line)["completion"] for line in out.read_text().splitlines()]
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32),
                                      str(adapter)).eval()
    for row, text in zip(rows, got):
        ids = tok(row["prompt"], return_tensors="pt").input_ids
        new = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                             pad_token_id=tok.pad_token_id)[0, ids.shape[1]:]
        assert text == tok.decode(new, skip_special_tokens=True)
