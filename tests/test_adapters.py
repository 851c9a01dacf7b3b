"""Every adapter kind end to end through the CLI: trains, saves an adapter plain PEFT reloads, and only the
intended parameters change (the frozen base is bit-identical after training; every adapter tensor moved)."""

from __future__ import annotations

import functools
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


def _train(tmp_path: Path, model_dir, peft: dict, rows=None, **sections) -> Path:
    data = write_jsonl(tmp_path / "train.jsonl", rows or chat_rows(16))
    out = tmp_path / "run"
    tree = base_config(model_dir, data, out, peft=peft, **sections)
    assert main(["train", str(write_config(tmp_path / "cfg.yaml", tree))]) == 0
    return out


@functools.lru_cache(maxsize=2)
def _base_state(model_dir) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return {k: v.clone() for k, v in model.state_dict().items()}


def _check_adapter_run(out: Path, model_dir, saved_modules: tuple[str, ...] = (), mid_step: int = 2) -> None:
    """The adapter reloads with plain PEFT; base weights equal the original; every adapter tensor moved."""
    from peft import AutoPeftModelForCausalLM

    final = load_file(out / "adapter_model.safetensors")
    mid = load_file(out / f"checkpoint-{mid_step}" / "adapter_model.safetensors")
    assert final and final.keys() == mid.keys()
    for k in final:  # trained between the mid checkpoint and the end
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


@pytest.mark.slow
@pytest.mark.parametrize("kind", list(KINDS))
def test_adapter_kind_on_the_real_model(kind, tmp_path):
    """The same on SmolLM2-135M: 2 steps on short rows in bf16. The model cache is the user's (imported once),
    the data cache is per test."""
    from lmforge.models import resolve_model_path

    rows = [{"messages": [{"role": "user", "content": f"Name color number {i}."},
                          {"role": "assistant", "content": f"Color {i} is blue."}]} for i in range(4)]
    peft = dict(KINDS[kind], r=8, alpha=16) if "r" in KINDS[kind] else KINDS[kind]
    out = _train(tmp_path, "smollm2-135m-instruct", peft, rows=rows, model={"dtype": "bfloat16"},
                 data={"cache_dir": str(tmp_path / "data-cache"), "max_length": 64, "packing": False},
                 train={"max_steps": 2, "save_steps": 1, "per_device_train_batch_size": 2, "learning_rate": 1e-3})
    _check_adapter_run(out, resolve_model_path("smollm2-135m-instruct"), mid_step=1)


def test_prompt_tuning_text_init_starts_from_the_text_embeddings(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lmforge.adapters import apply_peft
    from lmforge.config import PeftConfig

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    emb = base.get_input_embeddings().weight.detach().clone()
    text = "extract the record as json"
    ids = AutoTokenizer.from_pretrained(tiny_model_dir)(text).input_ids
    peft = PeftConfig(kind="prompt_tuning", num_virtual_tokens=len(ids), prompt_tuning_init="text",
                      prompt_tuning_init_text=text)
    model = apply_peft(base, peft, tokenizer_path=str(tiny_model_dir))
    virtual = model.prompt_encoder["default"].embedding.weight.detach()
    assert torch.equal(virtual, emb[ids])
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable == ["prompt_encoder.default.embedding.weight"]
