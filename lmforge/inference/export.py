"""`lmforge export`: write a model, or an adapter merged on the fly, as one GGUF file for llama.cpp-family
runtimes (llama.cpp, Ollama, LM Studio), or as a merged safetensors model (``lmforge merge``'s code).

The GGUF layout is llama.cpp's (its ``convert_hf_to_gguf.py``), which every GGUF reader expects:
- tensors named by gguf's ``TensorNameMap``; 1-D tensors (norms, biases) stay float32, matrices take the
  requested type (a matrix whose rows do not split into whole quantisation blocks falls back to f16);
- for the ``llama`` arch the rows of q_proj/k_proj are permuted: llama.cpp's rope rotates dimension pairs
  (2i, 2i+1), Hugging Face's ``rotate_half`` pairs (i, i + d/2). transformers' GGUF loader undoes it. Qwen2 is
  written with neox-style rope (HF's own pairing), so nothing is permuted there;
- the tokenizer as llama.cpp's ``gpt2`` (byte-level BPE) vocabulary: tokens, token types, merges, the special
  token ids, whether BOS/EOS are added, the chat template, and the pre-tokenizer by the name llama.cpp knows.
The model is loaded (and an adapter merged) in float32 through ``load_for_inference``, like ``lmforge merge``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import gguf
import numpy as np
import torch

from lmforge.errors import ConfigError, UnsupportedError
from lmforge.inference.loading import load_for_inference
from lmforge.inference.merge import merge_adapter_to_dir
from lmforge.models import adapter_base, is_adapter_dir, resolve_model_path

FORMATS = ("safetensors", "gguf")

# Hugging Face model_type -> (GGUF arch, permute q/k for llama.cpp's rope). Mistral is the llama arch in
# llama.cpp (as in its converter); transformers reads it back as a LlamaForCausalLM, numerically the same.
ARCHITECTURES = {
    "llama": (gguf.MODEL_ARCH.LLAMA, True),
    "mistral": (gguf.MODEL_ARCH.LLAMA, True),
    "qwen2": (gguf.MODEL_ARCH.QWEN2, False),
}

QType = gguf.GGMLQuantizationType
# --quant -> (type of the weight matrices, general.file_type)
QUANTS = {
    "f16": (QType.F16, gguf.LlamaFileType.MOSTLY_F16),
    "bf16": (QType.BF16, gguf.LlamaFileType.MOSTLY_BF16),
    "q8_0": (QType.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
    "q4_0": (QType.Q4_0, gguf.LlamaFileType.MOSTLY_Q4_0),
}
# Under q4_0 the embeddings and the output head keep 8 bits, as llama.cpp's quantize keeps them above 4 bits:
# they are the layers most hurt by 4-bit rounding.
Q4_KEPT_AT_Q8 = ("token_embd.weight", "output.weight")

# The Split regexes of the byte-level BPE tokenizers llama.cpp knows by name (from their tokenizer.json).
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
SPLIT_PRE_TOKENIZERS = {_LLAMA3_SPLIT: "llama-bpe", _QWEN2_SPLIT: "qwen2"}


def export_model(model: str, output: str | Path, fmt: str = "safetensors", quant: str | None = None,
                 overwrite: bool = False) -> Path:
    """Export ``model`` (a model dir, adapter dir, .gguf file or alias) to ``output`` in ``fmt``."""
    if fmt == "gguf":
        return export_gguf(model, output, quant or "f16", overwrite)
    if fmt != "safetensors":
        raise ConfigError(f"--format: {fmt!r} is not one of {', '.join(FORMATS)}")
    if quant is not None:
        raise ConfigError("--quant: only --format gguf is quantised; safetensors keeps the base model's dtype")
    if not is_adapter_dir(resolve_model_path(model)):
        raise ConfigError(f"--model: {model} is already a plain model; --format safetensors merges an adapter "
                          "into its base (use --format gguf to convert a full model)")
    return merge_adapter_to_dir(model, output, overwrite=overwrite)


def export_gguf(model: str, output: str | Path, quant: str = "f16", overwrite: bool = False) -> Path:
    """Write ``model`` (merged first if it is an adapter) as one GGUF file at ``output``, atomically."""
    if quant not in QUANTS:
        raise ConfigError(f"--quant: {quant!r} is not one of {', '.join(QUANTS)}")
    out = _check_output_file(Path(output), overwrite)
    arch, permute = _check_architecture(model)  # before the (slow) load
    loaded = load_for_inference(model, dtype="float32")
    if hasattr(loaded.model, "peft_config"):
        raise UnsupportedError(f"--model: {model} is a prompt-tuning adapter; its virtual tokens cannot be merged "
                               "into weights, so it has no GGUF form")
    name = Path(model).name.removesuffix(".gguf")  # general.name: what the user called it
    tmp = out.with_name(f".{out.name}.{os.getpid()}.exporting")  # created by the writer, with the umask's mode
    try:
        writer = gguf.GGUFWriter(tmp, gguf.MODEL_ARCH_NAMES[arch])
        _add_hparams(writer, loaded.model.config, name, QUANTS[quant][1])
        _add_tokenizer(writer, loaded.tokenizer, loaded.model.get_input_embeddings().weight.shape[0])
        for tensor_name, data in _gguf_tensors(loaded.model, arch, permute):
            data, qtype = _encode(tensor_name, data, quant)
            writer.add_tensor(tensor_name, data, raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return out


def _check_output_file(out: Path, overwrite: bool) -> Path:
    """Refuse an ``--output`` that is not a .gguf file name, is a directory, or exists (unless ``overwrite``)."""
    if out.suffix != ".gguf":
        raise ConfigError(f"--output: {out} must end in .gguf (the name llama.cpp, Ollama and lmforge recognise)")
    if out.is_dir():
        raise ConfigError(f"--output: {out} is a directory; give a file name ending in .gguf")
    if out.exists() and not overwrite:
        raise ConfigError(f"--output: {out} exists; choose another file name, or pass --overwrite to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    return out


def _check_architecture(model: str):
    """The (GGUF arch, permute) of ``model``'s architecture, from its config alone; refuse what GGUF export
    cannot write faithfully."""
    from transformers import AutoConfig

    path = resolve_model_path(model)
    if is_adapter_dir(path):
        path = resolve_model_path(adapter_base(path))
    config = AutoConfig.from_pretrained(path)
    if config.model_type not in ARCHITECTURES:
        raise UnsupportedError(f"--model: GGUF export supports the architectures {', '.join(ARCHITECTURES)}; "
                               f"{model} is {config.model_type!r}")
    rope = getattr(config, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") != "default":
        raise UnsupportedError(f"--model: {model} uses rope scaling {rope['rope_type']!r}; GGUF export writes "
                               "only plain rope so far (transformers would read the file back without the scaling)")
    return ARCHITECTURES[config.model_type]


def _add_hparams(writer, config, name: str, file_type) -> None:
    """The architecture keys llama.cpp reads (and transformers maps back to a config)."""
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    writer.add_name(name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_head_count(heads)
    writer.add_head_count_kv(config.num_key_value_heads or heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_rope_dimension_count(head_dim)
    if head_dim != config.hidden_size // heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _add_tokenizer(writer, tok, vocab_size: int) -> None:
    """The tokenizer as llama.cpp's gpt2-style BPE vocabulary, padded to the embedding's ``vocab_size`` rows
    (llama.cpp needs one token per row) with unused ``[PADi]`` tokens, as its converter does."""
    spec = json.loads(tok.backend_tokenizer.to_str())
    if spec["model"]["type"] != "BPE" or spec["model"].get("byte_fallback"):
        kind = "sentencepiece-style BPE (byte fallback)" if spec["model"].get("byte_fallback") else spec["model"]["type"]
        raise UnsupportedError("--model: GGUF export supports byte-level BPE tokenizers (GPT-2, SmolLM2, Llama 3, "
                               f"Qwen2 style); this tokenizer is {kind}")
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(_pre_tokenizer_name(spec.get("pre_tokenizer")))
    tokens, types = _tokens_and_types(tok, vocab_size)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]])
    for role, add in (("bos", writer.add_bos_token_id), ("eos", writer.add_eos_token_id),
                      ("unk", writer.add_unk_token_id), ("pad", writer.add_pad_token_id)):
        if getattr(tok, f"{role}_token_id") is not None:
            add(getattr(tok, f"{role}_token_id"))
    ids = tok("a")["input_ids"]  # what the tokenizer adds around a text, as llama.cpp must do too
    writer.add_add_bos_token(tok.bos_token_id is not None and ids[0] == tok.bos_token_id)
    writer.add_add_eos_token(tok.eos_token_id is not None and ids[-1] == tok.eos_token_id)
    if tok.chat_template:
        writer.add_chat_template(tok.chat_template)


def _pre_tokenizer_name(pre: dict | None) -> str:
    """llama.cpp's name for a tokenizer.json pre-tokenizer (how text is split before the merges)."""
    steps = pre.get("pretokenizers", [pre]) if pre else []
    kinds = [s["type"] for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "smollm"  # SmolLM's: each digit alone, then GPT-2's split
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        name = SPLIT_PRE_TOKENIZERS.get(steps[0].get("pattern", {}).get("Regex"))
        if name:
            return name
    raise UnsupportedError(f"--model: GGUF export knows the pre-tokenizers of GPT-2, SmolLM2, Llama 3 and Qwen2; "
                           f"this tokenizer splits text with {json.dumps(pre)[:300]}")


def _tokens_and_types(tok, vocab_size: int) -> tuple[list[str], list[int]]:
    """Every token by id, and its llama.cpp type: special added tokens are CONTROL, other added tokens
    USER_DEFINED, ids with no token (embedding rows past the tokenizer) UNUSED."""
    by_id = {i: t for t, i in tok.backend_tokenizer.get_vocab(with_added_tokens=True).items()}
    if max(by_id) >= vocab_size:
        raise ConfigError(f"--model: the tokenizer has {max(by_id) + 1} tokens, the model only {vocab_size} "
                          "embedding rows")
    added = tok.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
    return tokens, [int(t) for t in types]


def _gguf_tensors(model, arch, permute: bool):
    """(GGUF name, float32 array) for every weight, q/k permuted for llama.cpp's rope where ``permute``."""
    config = model.config
    names = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
    heads = config.num_attention_heads
    kv_heads = config.num_key_value_heads or heads
    for hf_name, tensor in model.state_dict().items():
        if hf_name == "lm_head.weight" and config.tie_word_embeddings:
            continue  # tied: the file has no output.weight, and readers reuse token_embd
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise UnsupportedError(f"--model: the weight {hf_name} has no GGUF name for the "
                                   f"{gguf.MODEL_ARCH_NAMES[arch]} arch")
        data = tensor.detach().to("cpu", torch.float32).numpy()
        if permute and ".attn_q." in name:
            data = _permute(data, heads)
        elif permute and ".attn_k." in name:
            data = _permute(data, kv_heads)
        yield name, data


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's rope layout for a q/k projection: within each head, rows (i, i + d/2) become (2i, 2i+1).
    w: (n_head * head_dim, ...)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _encode(name: str, data: np.ndarray, quant: str) -> tuple[np.ndarray, object]:
    """(bytes, GGML type) of one tensor: 1-D stays float32, matrices take ``quant`` (f16 if their rows do not
    split into whole blocks, as llama.cpp's converter does)."""
    if data.ndim == 1:
        return data, QType.F32
    qtype = QUANTS[quant][0]
    if quant == "q4_0" and name in Q4_KEPT_AT_Q8:
        qtype = QType.Q8_0
    try:
        return gguf.quants.quantize(data, qtype), qtype
    except gguf.quants.QuantError:
        return gguf.quants.quantize(data, QType.F16), QType.F16
