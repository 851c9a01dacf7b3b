"""Every adapter kind end to end through the CLI: trains, saves an adapter plain PEFT reloads, and only the
intended parameters change (the frozen base is bit-identical after training; every adapter tensor moved)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import base_config, chat_rows, write_config, write_jsonl
from safetensors.torch import load_file

from lmforge.cli import main

KINDS = {
    "lora": {"kind": "lora", "r": 4, "alpha": 8},
    "dora": {"kind": "dora", "r": 4, "alpha": 8},
    "qlora4": {"kind": "qlora", "bits": 4, "r": 4, "alpha": 8},
    "qlora8": {"kind": "qlora", "bits": 8, "r": 4, "alpha": 8},
    "prompt_random": {"kind": "prompt_tuning", "num_virtual_tokens": 4},
    "prompt_text": {"kind": "prompt_tuning", "num_virtual_tokens": 4, "prompt_tuning_init": "text",
                    "prompt_tuning_init_text": "extract the record as json"},
}


def _train(tmp_path: Path, model_dir, peft: dict, **sections) -> Path:
    data = write_jsonl(tmp_path / "train.jsonl", chat_rows(16))
    out = tmp_path / "run"
    tree = base_config(model_dir, data, out, peft=peft, **sections)
    assert main(["train", str(write_config(tmp_path / "cfg.yaml", tree))]) == 0
    return out


def _base_state(model_dir) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return {k: v.clone() for k, v in model.state_dict().items()}


def _check_adapter_run(out: Path, model_dir, saved_modules: tuple[str, ...] = ()) -> None:
    """The adapter reloads with plain PEFT; base weights equal the original; every adapter tensor moved."""
    from peft import AutoPeftModelForCausalLM

    final = load_file(out / "adapter_model.safetensors")
    mid = load_file(out / "checkpoint-2" / "adapter_model.safetensors")
    assert final and final.keys() == mid.keys()
    for k in final:  # trained between step 2 and step 4
        assert not torch.equal(final[k], mid[k]), f"adapter tensor {k} did not change"
    base_keys = [k for k in final if not any(m in k for m in saved_modules)]
    assert all("lora_" in k or "prompt_embeddings" in k for k in base_keys), base_keys

    reloaded = AutoPeftModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    original = _base_state(model_dir)
    base = reloaded.get_base_model().state_dict()
    for name, value in original.items():
        if any(name.startswith(m + ".") for m in saved_modules):
            # PEFT keeps the original beside a trained copy: the copy moved, the original did not
            copy = name.replace(".weight", ".modules_to_save.default.weight")
            assert not torch.equal(base[copy], value), f"{copy} did not change"
            name_in_base = name.replace(".weight", ".original_module.weight")
        elif name not in base:  # LoRA wraps a Linear: its frozen weight lives at .base_layer.weight
            name_in_base = name.replace(".weight", ".base_layer.weight")
        else:
            name_in_base = name
        assert torch.equal(base[name_in_base], value), f"frozen {name} changed"

    ids = torch.tensor([[5, 6, 7]])
    with torch.no_grad():
        gen = reloaded.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False)
    assert gen.shape[1] >= 4


@pytest.mark.parametrize("kind", list(KINDS))
def test_adapter_kind_trains_saves_reloads(kind, tmp_path, tiny_model_dir, lmforge_cache):
    out = _train(tmp_path, tiny_model_dir, KINDS[kind])
    _check_adapter_run(out, tiny_model_dir)
    cfg = (out / "adapter_config.json").read_text()
    if kind.startswith("qlora") or kind in ("lora", "dora"):
        assert '"use_dora": ' + ("true" if kind == "dora" else "false") in cfg
    else:
        assert '"peft_type": "PROMPT_TUNING"' in cfg


def test_lora_modules_to_save_trains_those_in_full(tmp_path, tiny_model_dir, lmforge_cache):
    peft = {"kind": "lora", "r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"], "modules_to_save": ["lm_head"]}
    out = _train(tmp_path, tiny_model_dir, peft)
    final = load_file(out / "adapter_model.safetensors")
    assert any("lm_head" in k for k in final)
    assert not any("k_proj" in k or "mlp" in k for k in final)  # only the named targets got adapters
    _check_adapter_run(out, tiny_model_dir, saved_modules=("lm_head",))


def test_trainable_patterns_freeze_everything_else(tmp_path, tiny_model_dir, lmforge_cache):
    from transformers import AutoModelForCausalLM

    out = _train(tmp_path, tiny_model_dir, {"kind": "none"}, train={"trainable": ["*.layers.1.mlp.*", "lm_head.*"]})
    original = _base_state(tiny_model_dir)
    trained = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).state_dict()
    for name, value in original.items():
        expect_change = name.startswith(("model.layers.1.mlp.", "lm_head."))
        assert (not torch.equal(trained[name], value)) == expect_change, name


def test_trainable_pattern_matching_nothing_is_a_config_error(tmp_path, tiny_model_dir, lmforge_cache, capsys):
    data = write_jsonl(tmp_path / "train.jsonl", chat_rows(4))
    tree = base_config(tiny_model_dir, data, tmp_path / "run", train={"trainable": ["*.no_such_module.*"]})
    assert main(["train", str(write_config(tmp_path / "cfg.yaml", tree))]) == 2
    assert "train.trainable" in capsys.readouterr().err


def test_unknown_target_module_is_a_config_error(tmp_path, tiny_model_dir, lmforge_cache, capsys):
    data = write_jsonl(tmp_path / "train.jsonl", chat_rows(4))
    tree = base_config(tiny_model_dir, data, tmp_path / "run", peft={"kind": "lora", "target_modules": ["nope_proj"]})
    assert main(["train", str(write_config(tmp_path / "cfg.yaml", tree))]) == 2
    assert "peft.target_modules" in capsys.readouterr().err
