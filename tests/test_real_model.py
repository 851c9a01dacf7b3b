"""End to end with the real SmolLM2-135M-Instruct (the built-in alias, imported from its GGUF): a few steps."""

import json

import pytest
import torch
from peft import AutoPeftModelForCausalLM
from safetensors.torch import load_file

from conftest import base_config, chat_rows, write_config, write_jsonl
from lmforge.cli import main
from lmforge.models import resolve_model_path

pytestmark = pytest.mark.slow


def test_lora_sft_on_the_real_model(tmp_path, lmforge_cache, monkeypatch):
    monkeypatch.delenv("LMFORGE_CACHE")  # share the imported model with other runs (~/.cache/lmforge)
    data = write_jsonl(tmp_path / "d.jsonl", chat_rows(16))
    tree = base_config("smollm2-135m-instruct", data, tmp_path / "out",
                       model={"dtype": "auto"}, peft={"kind": "lora", "r": 8, "alpha": 16},
                       data={"max_length": 160, "cache_dir": str(tmp_path / "cache")},
                       train={"max_steps": 3, "per_device_train_batch_size": 2, "save_steps": 3})
    assert main(["train", str(write_config(tmp_path / "c.yaml", tree))]) == 0
    out = tmp_path / "out"
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3]
    assert all(0 < r["loss"] < 20 for r in rows if "loss" in r)
    adapter = load_file(out / "adapter_model.safetensors")
    assert any(v.abs().sum() > 0 for k, v in adapter.items() if "lora_B" in k)  # B starts at zero: it trained
    # PEFT's record of the base is this machine's import of the GGUF: plain PEFT loads the output directory
    # as CONTRACT.md promises, and lmforge reads that path as the alias on a machine without it (models.py)
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == \
        str(resolve_model_path("smollm2-135m-instruct"))
    model = AutoPeftModelForCausalLM.from_pretrained(out)
    assert model.get_base_model().config.vocab_size == 49152
    ids = torch.tensor([[1, 2, 3]])
    assert model(input_ids=ids).logits.shape == (1, 3, 49152)
