"""The decode loop's fused one-token attention kernel (attention_kernel.py, one_token_attention.cpp): the arithmetic of
decode_attention.attend_matmul within rounding, only the attended positions read, and the decode loop on it still
choosing plain transformers' greedy tokens."""

from __future__ import annotations

import pytest
import torch
from test_decode import ROWS, _run
from test_generate import assert_greedy

from lmforge.inference import attention_kernel, decode_attention
from lmforge.inference.generate import GenerationOptions, encode_prompt
from lmforge.inference.loading import load_for_inference


@pytest.fixture(scope="module")
def kernel(measured_peaks):
    import os

    before = os.environ.get("LMFORGE_CACHE")
    os.environ["LMFORGE_CACHE"] = str(measured_peaks)  # the session's build (conftest's lmforge_cache)
    try:
        op = attention_kernel.load()
    finally:
        os.environ.pop("LMFORGE_CACHE") if before is None else os.environ.__setitem__("LMFORGE_CACHE", before)
    if op is None:
        pytest.skip("the kernel could not be built here (no C++ compiler): the decode loop runs attend_matmul")
    return op


def _case(dtype, batch, kv, group, positions, dim, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, kv, group, dim, generator=g).to(dtype)
    k, v = torch.randn(2, batch, kv, positions, dim, generator=g).to(dtype)
    bias = torch.zeros(batch, 1, 1, positions).masked_fill_(torch.rand(batch, 1, 1, positions, generator=g) < 0.3,
                                                            float("-inf"))
    bias[..., -1] = 0.0  # every row attends to its newest position
    return q, k, v, bias


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_kernel_equals_the_batched_matmuls(kernel, dtype):
    # every head dim and group size it is built for, additive and boolean masks, a mask broadcast over rows, a strided
    # query (as llama_step's, a slice of the joint q/k projection) and an output written into a view
    for dim in attention_kernel.DIMS:
        for group in (1, 3, attention_kernel.MAX_GROUP):
            q, k, v, bias = _case(dtype, 5, 2, group, 37, dim, seed=dim + group)
            ref = decode_attention.attend_matmul(q, k, v, bias.clone(), 0.125)
            got = decode_attention.attend(q, k, v, bias, 0.125)
            if dtype == torch.float32:
                torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
            else:  # summation order and exp differ from oneDNN's: at most one bf16 step apart, mostly equal
                torch.testing.assert_close(got.float(), ref.float(), rtol=2 ** -7, atol=2 ** -12)
                assert (got == ref).float().mean() > 0.99
            assert torch.equal(decode_attention.attend(q, k, v, bias == 0, 0.125), got)  # a boolean mask: the same
    q, k, v, bias = _case(dtype, 4, 3, 3, 20, 64)
    one = bias[:1].clone()
    torch.testing.assert_close(decode_attention.attend(q, k, v, one, 0.3),
                               decode_attention.attend_matmul(q, k, v, one, 0.3), rtol=2 ** -7, atol=1e-3)
    joint = torch.randn(4, 3 * 3 + 3, 64).to(dtype)  # (rows, q heads + kv heads, dim): q is a strided view of it
    strided = joint[:, :9].reshape(4, 3, 3, 64)
    out = torch.zeros(6, 9 * 64, dtype=dtype)  # rows 4 and 5: padding that must stay untouched
    decode_attention.attend(strided, k, v, bias, 0.3, out=out[:4].view(4, 3, 3, 64))
    torch.testing.assert_close(out[:4].view(4, 3, 3, 64), decode_attention.attend_matmul(strided, k, v, bias, 0.3),
                               rtol=2 ** -7, atol=1e-3)
    assert not out[4:].any()


def test_kernel_reads_only_attended_positions(kernel):
    # masked positions (a cache's spare room, left padding) are never read: NaN there changes nothing, where the
    # batched matmuls (which read the whole buffer) give NaN
    q, k, v, bias = _case(torch.bfloat16, 6, 3, 3, 50, 64, seed=3)
    ref = decode_attention.attend(q, k, v, bias, 0.125)
    hidden = torch.isinf(bias[:, 0, 0, :])[:, None, :, None].expand_as(k)
    k2, v2 = k.masked_fill(hidden, float("nan")), v.masked_fill(hidden, float("nan"))
    assert torch.equal(decode_attention.attend(q, k2, v2, bias, 0.125), ref)
    assert decode_attention.attend_matmul(q, k2, v2, bias, 0.125).isnan().any()


def test_calls_the_kernel_does_not_cover_take_the_batched_matmuls(kernel):
    q, k, v, bias = _case(torch.float16, 2, 2, 2, 9, 64)
    assert not attention_kernel.applies(q, k, v, bias, q)  # fp16
    q, k, v, bias = _case(torch.float32, 2, 2, 2, 9, 8)
    assert not attention_kernel.applies(q, k, v, bias, q)  # head dim 8
    assert not attention_kernel.applies(q, k, v, None, q)
    q.requires_grad_(True)
    assert not attention_kernel.applies(q, k, v, bias, q)  # a call autograd would need to differentiate
    with torch.no_grad():
        q, k, v, bias = _case(torch.float32, 2, 2, 2, 9, 64)
        assert attention_kernel.applies(q, k, v, bias, q)


@pytest.fixture(scope="module")
def dim16_model_dir(tiny_model_dir, tmp_path_factory):
    """The sharp tiny model's shape with head dim 16 (the kernel's smallest), peaked attention."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    cfg = LlamaConfig.from_pretrained(tiny_model_dir)
    cfg.head_dim = 16
    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(12)
            layer.self_attn.k_proj.weight.mul_(12)
    out = tmp_path_factory.mktemp("dim16-llama")
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(out)
    return out


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_decode_loop_on_the_kernel_chooses_plain_transformers_tokens(kernel, dim16_model_dir, monkeypatch, dtype):
    loaded = load_for_inference(str(dim16_model_dir), dtype=dtype)
    prompts = [encode_prompt(r, loaded.tokenizer) for r in ROWS]
    calls = []
    monkeypatch.setattr(attention_kernel, "load", lambda: lambda *a: calls.append(1) or kernel(*a))
    ours, decoder, _ = _run(loaded, prompts, GenerationOptions(max_new_tokens=10), max_batch=4)
    assert calls and decoder.fast is not None  # llama_step's decode steps ran on the kernel
    if dtype == "float32":
        assert_greedy(dim16_model_dir, prompts, [c.token_ids for c in ours])
    else:  # bf16: as the batched matmuls give, but for rows that part at a near-tie
        monkeypatch.setattr(attention_kernel, "load", lambda: None)
        ref, _, _ = _run(loaded, prompts, GenerationOptions(max_new_tokens=10), max_batch=4)
        same = sum(a.token_ids == b.token_ids for a, b in zip(ours, ref))
        assert same >= len(ref) - 2, same
