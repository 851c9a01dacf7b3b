"""`lmforge export`: GGUF files that transformers (and llama.cpp, where installed) read back as the same model."""

from __future__ import annotations

import pytest
import torch

from lmforge.cli import main
from lmforge.errors import UnsupportedError

TEXTS = ["the quick brown fox jumps over a lazy dog", "  alpha beta\n\ngamma 12345 delta!",
         "<|im_start|>user\nextract json<|im_end|>", "caf\u00e9 na\u00efve \u2603 wizards"]
MESSAGES = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "name the fox"},
            {"role": "assistant", "content": "quick brown"}]
# (quant, max |logit difference| to the source model); the tiny model's logits reach about 0.5
TOLERANCES = {"f16": 1e-3, "bf16": 1e-2, "q8_0": 5e-2, "q4_0": 0.1}


def export(model, out, *extra) -> int:
    return main(["export", "--model", str(model), "--format", "gguf", "--output", str(out), *extra])


def gguf_model(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.fixture(scope="module")
def ids(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)(TEXTS[0] + " " + TEXTS[1], return_tensors="pt").input_ids


@pytest.fixture(scope="module")
def source_logits(sharp_model_dir, ids):
    from transformers import AutoModelForCausalLM

    return logits(AutoModelForCausalLM.from_pretrained(sharp_model_dir, dtype=torch.float32).eval(), ids)


@pytest.mark.parametrize("quant", list(TOLERANCES))
def test_gguf_reloads_through_transformers_with_close_logits(quant, sharp_model_dir, ids, source_logits, tmp_path):
    """The sharp model (peaked attention): a q/k layout that disagrees with the loader's would show."""
    from gguf import GGUFReader

    out = tmp_path / f"tiny-{quant}.gguf"
    assert export(sharp_model_dir, out, "--quant", quant) == 0
    types = {t.name: t.tensor_type.name for t in GGUFReader(out).tensors}
    assert types["blk.0.attn_q.weight"] == quant.upper() and types["blk.0.attn_norm.weight"] == "F32"
    assert types["output.weight"] == ("Q8_0" if quant == "q4_0" else quant.upper())
    diff = (logits(gguf_model(out), ids) - source_logits).abs().max().item()
    assert diff < TOLERANCES[quant], diff


def test_q_and_k_are_permuted_for_llama_cpp(sharp_model_dir, ids, source_logits, tmp_path, monkeypatch):
    """Written without llama.cpp's q/k permutation, transformers' loader (which undoes it) gets another model:
    the round trip above would catch a missing or wrong permutation."""
    import gguf

    from lmforge.inference import export as export_module

    monkeypatch.setitem(export_module.ARCHITECTURES, "llama", (gguf.MODEL_ARCH.LLAMA, False))
    out = tmp_path / "unpermuted.gguf"
    assert export(sharp_model_dir, out) == 0
    assert (logits(gguf_model(out), ids) - source_logits).abs().max() > 1e-2


def test_gguf_tokenizer_encodes_and_templates_as_the_source(tiny_model_dir, tmp_path):
    from transformers import AutoTokenizer

    out = tmp_path / "tiny.gguf"
    assert export(tiny_model_dir, out) == 0
    want = AutoTokenizer.from_pretrained(tiny_model_dir)
    got = AutoTokenizer.from_pretrained(tmp_path, gguf_file=out.name)
    for text in TEXTS:
        assert got(text).input_ids == want(text).input_ids, text
        assert got.decode(got(text).input_ids) == want.decode(want(text).input_ids)
    assert got.chat_template == want.chat_template
    assert got.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True) == \
        want.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert (got.eos_token_id, got.pad_token_id, got.bos_token_id) == \
        (want.eos_token_id, want.pad_token_id, want.bos_token_id)
    assert len(got) == len(want)


@pytest.fixture(scope="module")
def adapter_dir(tiny_model_dir, tmp_path_factory):
    """A LoRA adapter with non-zero deltas (random B), saved as lmforge saves one: adapter + tokenizer."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False, task_type="CAUSAL_LM")
    torch.manual_seed(1)
    out = tmp_path_factory.mktemp("adapter")
    get_peft_model(base, cfg).save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(out)
    return out


def test_adapter_export_equals_merge_then_export(adapter_dir, tiny_model_dir, ids, tmp_path):
    assert export(adapter_dir, tmp_path / "adapter.gguf") == 0
    assert main(["merge", "--model", str(adapter_dir), "--output", str(tmp_path / "merged")]) == 0
    assert export(tmp_path / "merged", tmp_path / "merged.gguf") == 0
    assert export(tiny_model_dir, tmp_path / "base.gguf") == 0
    direct, merged, base = (logits(gguf_model(tmp_path / f"{n}.gguf"), ids) for n in ("adapter", "merged", "base"))
    assert (direct - base).abs().max() > 1e-2  # the adapter really is in the file
    assert (direct - merged).abs().max() < 1e-5


def test_safetensors_format_merges_an_adapter(adapter_dir, tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "plain"
    assert main(["export", "--model", str(adapter_dir), "--output", str(out)]) == 0
    assert (out / "config.json").exists() and not (out / "adapter_config.json").exists()
    assert main(["export", "--model", str(tiny_model_dir), "--output", str(tmp_path / "again")]) == 2
    assert "already a plain model" in capsys.readouterr().err
    assert main(["export", "--model", str(adapter_dir), "--output", str(tmp_path / "q"), "--quant", "q8_0"]) == 2
    assert "--quant: only --format gguf" in capsys.readouterr().err


def test_export_refuses_to_overwrite_a_file(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "model.gguf"
    out.write_text("precious")
    assert export(tiny_model_dir, out) == 2
    err = capsys.readouterr().err
    assert f"--output: {out} exists" in err and "--overwrite" in err and err.count("\n") == 1
    assert out.read_text() == "precious"
    assert export(tiny_model_dir, tmp_path / "model.bin") == 2
    assert "must end in .gguf" in capsys.readouterr().err
    assert export(tiny_model_dir, out, "--overwrite") == 0
    assert out.read_bytes()[:4] == b"GGUF"
    assert [p.name for p in tmp_path.iterdir()] == ["model.gguf"]  # no temporary file left beside it


def test_a_failed_export_leaves_the_old_file_and_no_partial_one(tiny_model_dir, tmp_path, monkeypatch):
    from lmforge.inference import export as export_module

    out = tmp_path / "model.gguf"
    out.write_text("previous export")

    def fail(name, data, quant):
        raise KeyboardInterrupt  # as a user's Ctrl-C while the tensors are written

    monkeypatch.setattr(export_module, "_encode", fail)
    assert export(tiny_model_dir, out, "--overwrite") == 130
    assert out.read_text() == "previous export"
    assert [p.name for p in tmp_path.iterdir()] == ["model.gguf"]


@pytest.fixture(scope="module")
def tiny_gpt2_dir(tiny_tokenizer_dir, tmp_path_factory):
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    out = tmp_path_factory.mktemp("tiny-gpt2")
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=1, n_head=2)).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def test_unsupported_architecture_is_one_clear_error(tiny_gpt2_dir, tmp_path, capsys):
    assert export(tiny_gpt2_dir, tmp_path / "gpt2.gguf") == 2
    err = capsys.readouterr().err
    assert err.startswith("lmforge: error: --model: GGUF export supports the architectures llama, mistral, qwen2")
    assert "'gpt2'" in err and "Traceback" not in err
    assert not (tmp_path / "gpt2.gguf").exists()


def test_qwen2_keeps_its_rope_layout_and_biases(tiny_tokenizer_dir, tmp_path):
    """Qwen2: q/k/v biases, tied embeddings, no permutation (neox rope in llama.cpp and in transformers)."""
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    cfg = Qwen2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=True, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(cfg).eval()
    with torch.no_grad():
        for layer in model.model.layers:  # peaked attention and non-zero biases, so a wrong layout shows
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj):
                proj.weight.mul_(12)
                proj.bias.normal_()
    src = tmp_path / "qwen2"
    model.save_pretrained(src)
    tok.save_pretrained(src)
    assert export(src, tmp_path / "qwen2.gguf") == 0
    ids = tok(TEXTS[0], return_tensors="pt").input_ids
    reloaded = gguf_model(tmp_path / "qwen2.gguf")
    assert reloaded.config.model_type == "qwen2" and reloaded.config.tie_word_embeddings
    assert (logits(reloaded, ids) - logits(model, ids)).abs().max() < 1e-3


@pytest.mark.parametrize("pre,name", [
    ({"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}, "gpt-2"),
    ({"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True},
                                            {"type": "ByteLevel", "use_regex": True}]}, "smollm"),
    ({"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|"
                                               "\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|"
                                               "\\s+(?!\\S)|\\s+"}, "behavior": "Isolated"},
        {"type": "ByteLevel", "use_regex": False}]}, "llama-bpe"),
])
def test_pre_tokenizer_names_are_llama_cpps(pre, name):
    from lmforge.inference.export import _pre_tokenizer_name

    assert _pre_tokenizer_name(pre) == name


def test_an_unknown_pre_tokenizer_is_refused():
    from lmforge.inference.export import _pre_tokenizer_name

    with pytest.raises(UnsupportedError, match="pre-tokenizers of GPT-2, SmolLM2"):
        _pre_tokenizer_name({"type": "Whitespace"})


PROMPTS = ["What is the capital of France?", "Name three colours.", "What is 2 + 2?",
           "Write a haiku about the sea.", "Who wrote Romeo and Juliet?"]


def _greedy(model, tok, prompt: str) -> str:
    text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
    ids = tok(text, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=12, do_sample=False, eos_token_id=tok.eos_token_id,
                             pad_token_id=tok.pad_token_id)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


@pytest.mark.slow
def test_real_smollm2_answers_the_same_after_export(tmp_path, monkeypatch):
    """SmolLM2-135M-Instruct (the built-in alias) exported as f16 and read back by transformers answers 5
    greedy prompts as before export."""
    from transformers import AutoTokenizer

    from lmforge.inference.loading import load_for_inference

    monkeypatch.delenv("LMFORGE_CACHE", raising=False)  # share the imported model with other runs
    before = load_for_inference("smollm2-135m-instruct", dtype="float32")
    out = tmp_path / "smollm2.gguf"
    assert export("smollm2-135m-instruct", out) == 0
    tok = AutoTokenizer.from_pretrained(tmp_path, gguf_file=out.name)
    after = gguf_model(out)
    want = [_greedy(before.model, before.tokenizer, p) for p in PROMPTS]
    assert [_greedy(after, tok, p) for p in PROMPTS] == want
    assert len(set(want)) == len(PROMPTS) and all(want)  # real, distinct answers


@pytest.mark.slow
def test_llama_cpp_loads_the_file_and_agrees(tiny_model_dir, tmp_path):
    """llama.cpp itself (llama-cpp-python) reads the tiny model's file: same tokens, close logits."""
    llama_cpp = pytest.importorskip("llama_cpp")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "tiny.gguf"
    assert export(tiny_model_dir, out) == 0
    llm = llama_cpp.Llama(model_path=str(out), n_ctx=128, logits_all=True, verbose=False)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    for text in TEXTS[:2]:
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == tok(text).input_ids
    ids = tok(TEXTS[0]).input_ids
    llm.eval(ids)
    got = torch.tensor(llm.scores[:len(ids)])
    want = logits(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval(),
                  torch.tensor([ids]))[0]
    assert (got - want).abs().max() < 1e-2
    assert llm.metadata["tokenizer.ggml.pre"] == "gpt-2"
