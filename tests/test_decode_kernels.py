"""The decode loop's fused kernels (decode_kernels.py, decode_kernels.cpp): the one-token attention with the arithmetic
of decode_attention.attend_matmul within rounding, reading only the attended positions; llama_step's fused elementwise
work close to its torch ops; the decode loop on them still choosing plain transformers' greedy tokens."""

from __future__ import annotations

import pytest
import torch
from conftest import save_sharpened
from test_decode import ROWS, _run, left_padded_batch
from test_generate import assert_greedy

from lmforge.inference import decode, decode_attention, decode_kernels, llama_step
from lmforge.inference.generate import GenerationOptions, encode_prompt
from lmforge.inference.loading import load_for_inference


@pytest.fixture(scope="module")
def kernel(measured_peaks):
    import os

    before = os.environ.get("LMFORGE_CACHE")
    os.environ["LMFORGE_CACHE"] = str(measured_peaks)  # the session's build (conftest's lmforge_cache)
    try:
        op = decode_kernels.load()
    finally:
        os.environ.pop("LMFORGE_CACHE") if before is None else os.environ.__setitem__("LMFORGE_CACHE", before)
    if op is None:
        pytest.skip("the kernels could not be built here (no C++ compiler): the decode loop runs torch's ops")
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
    for dim in decode_kernels.DIMS:
        for group in (1, 3, decode_kernels.MAX_GROUP):
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


def test_kernel_reads_a_shared_prefix_from_its_one_copy(kernel):
    # rows flagged read their first L attended positions from shared_k/shared_v: with NaN in their own copies the
    # result is the one of rows holding the prefix; an unflagged row reads its own positions
    q, k, v, bias = _case(torch.bfloat16, 4, 3, 3, 40, 64, seed=5)
    bias[:, ..., :3] = float("-inf")  # left padding: the prefix starts at each row's first attended position
    bias[:, ..., 3:13] = 0.0
    shared_k, shared_v = torch.randn(2, 3, 10, 64).to(torch.bfloat16)
    k[:, :, 3:13], v[:, :, 3:13] = shared_k, shared_v
    ref = decode_attention.attend(q, k, v, bias, 0.125)
    k2, v2 = k.clone(), v.clone()
    k2[:, :, 3:13], v2[:, :, 3:13] = float("nan"), float("nan")
    rows = torch.tensor([True, True, False, True])
    got = decode_attention.attend(q, k2, v2, bias, 0.125, shared=(shared_k, shared_v, rows))
    assert torch.equal(got[rows], ref[rows]) and got[2].isnan().all()


def test_calls_the_kernel_does_not_cover_take_the_batched_matmuls(kernel):
    q, k, v, bias = _case(torch.float16, 2, 2, 2, 9, 64)
    assert not decode_kernels.attention_applies(q, k, v, bias, q)  # fp16
    q, k, v, bias = _case(torch.float32, 2, 2, 2, 9, 8)
    assert not decode_kernels.attention_applies(q, k, v, bias, q)  # head dim 8
    assert not decode_kernels.attention_applies(q, k, v, None, q)
    q.requires_grad_(True)
    assert not decode_kernels.attention_applies(q, k, v, bias, q)  # a call autograd would need to differentiate
    with torch.no_grad():
        q, k, v, bias = _case(torch.float32, 2, 2, 2, 9, 64)
        assert decode_kernels.attention_applies(q, k, v, bias, q)


@pytest.fixture(scope="module")
def dim16_model_dir(tiny_model_dir, tmp_path_factory):
    """The sharp tiny model's shape with head dim 16 (the kernel's smallest), peaked attention."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    cfg = LlamaConfig.from_pretrained(tiny_model_dir)
    cfg.head_dim = 16
    torch.manual_seed(1)
    return save_sharpened(AutoModelForCausalLM.from_config(cfg), AutoTokenizer.from_pretrained(tiny_model_dir),
                          tmp_path_factory.mktemp("dim16-llama"))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_decode_loop_on_the_kernel_chooses_plain_transformers_tokens(kernel, dim16_model_dir, monkeypatch, dtype):
    loaded = load_for_inference(str(dim16_model_dir), dtype=dtype)
    system = {"role": "system", "content": "You are a careful assistant who extracts records as JSON."}
    prompts = [encode_prompt({"messages": [system, {"role": "user", "content": r["prompt"]}]}, loaded.tokenizer)
               for r in ROWS if "prompt" in r]  # a shared prompt prefix: the system turn
    calls = []

    class Counted:  # the kernels, counting the attention's calls
        def __getattr__(self, name):
            return getattr(kernel, name)

        def one_token_attention(self, *args):
            calls.append(1)
            return kernel.one_token_attention(*args)

    monkeypatch.setattr(decode_kernels, "load", Counted)
    shared = []
    rows = decode.Decoder._shared_rows
    monkeypatch.setattr(decode.Decoder, "_shared_rows", lambda self, live: shared.append(rows(self, live)) or shared[-1])
    ours, decoder, _ = _run(loaded, prompts, GenerationOptions(max_new_tokens=10), max_batch=4)
    assert calls and decoder.fast is not None and decoder.fast.kernels is not None  # fused steps, attention kernel
    assert any(s is not None and s[1].all() for s in shared)  # steps where every row read the prompts' shared prefix
    monkeypatch.setattr(decode.Decoder, "_shared_rows", lambda self, live: None)
    again, _, _ = _run(loaded, prompts, GenerationOptions(max_new_tokens=10), max_batch=4)
    assert [c.token_ids for c in again] == [c.token_ids for c in ours]  # the rows' own copies: the same values
    if dtype == "float32":
        assert_greedy(dim16_model_dir, prompts, [c.token_ids for c in ours])
    else:  # bf16: as torch's ops give, but for rows that part at a near-tie
        monkeypatch.setattr(decode_kernels, "load", lambda: None)
        ref, decoder, _ = _run(loaded, prompts, GenerationOptions(max_new_tokens=10), max_batch=4)
        assert decoder.fast.kernels is None
        same = sum(a.token_ids == b.token_ids for a, b in zip(ours, ref))
        assert same >= len(ref) - 2, same


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_fused_step_is_close_to_the_torch_ops_step(kernel, sharp_model_dir, dtype):
    # llama_step with its elementwise work in the kernels (residual add + norm, rotary, SiLU x up) against the same step
    # as torch ops, over a left-padded batch and a few steps: logits and the keys/values written agree within rounding
    import copy

    loaded = load_for_inference(str(sharp_model_dir), dtype=dtype)
    fused = llama_step.build(loaded.model, decode_attention.attend_matmul)
    plain = llama_step.build(loaded.model, decode_attention.attend_matmul, fused=False)
    assert fused.kernels is not None and plain.kernels is None
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == "float32" else dict(rtol=2 ** -6, atol=2 ** -6)
    with torch.inference_mode():
        _, seqs, (cache, mask, positions, last) = left_padded_batch(loaded)
        ours = copy.deepcopy(cache)
        for _ in range(3):
            mask = torch.cat([mask, mask.new_ones(len(seqs), 1)], dim=1)
            ref = plain(last, positions, mask, cache)
            got = fused(last, positions, mask, ours)
            torch.testing.assert_close(got.float(), ref.float(), **tol)
            assert got.argmax(-1).tolist() == ref.argmax(-1).tolist()
            positions, last = positions + 1, ref.max(-1).indices
        for a, b in zip(ours.layers, cache.layers):
            torch.testing.assert_close(a.keys.float(), b.keys.float(), **tol)
            torch.testing.assert_close(a.values.float(), b.values.float(), **tol)


def test_fused_elementwise_kernels_equal_their_torch_ops(kernel):
    # each kernel against the torch ops it replaces (llama_step's unfused arithmetic), on sizes no vector width divides
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.bfloat16, torch.float32):
        x = torch.randn(7, 70, generator=g).to(dtype)
        res, w = torch.randn(7, 70, generator=g).to(dtype), torch.rand(70, generator=g).to(dtype) + 0.5
        summed = x + res
        ref = w * torch.rms_norm(summed.float(), [70], None, 1e-5).to(dtype)
        xx, out = x.clone(), torch.empty_like(x)
        kernel.add_rms_norm(xx, res, w, 1e-5, out)
        assert torch.equal(xx, summed)  # the residual stream updated in place, exactly
        tol = dict(rtol=2 ** -7, atol=1e-5) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(out, ref, **tol)
        gate_up = torch.randn(5, 2 * 36, generator=g).to(dtype) * 4
        got = kernel.silu_mul(gate_up, gate_up.new_empty(5, 36))
        torch.testing.assert_close(got, torch.nn.functional.silu(gate_up[:, :36]) * gate_up[:, 36:], **tol)
        qk = torch.randn(3, 5, 24, generator=g).to(dtype)
        cos, sin = torch.randn(2, 3, 24, generator=g).to(dtype)
        ref = qk * cos[:, None] + torch.cat((qk[..., 12:], qk[..., :12]), dim=-1) * sin[:, None]
        wide = torch.zeros(3, 7, 24, dtype=dtype)  # qk a strided view, as llama_step's slice of the joint projection
        wide[:, :5] = qk
        kernel.rotary(wide[:, :5], cos, sin)
        assert torch.equal(wide[:, :5], ref) and not wide[:, 5:].any()  # bitwise: each product and the sum rounded
