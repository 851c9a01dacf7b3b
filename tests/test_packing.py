"""Packing: packed loss == unpacked loss, no attention across sample boundaries, bins are valid."""

import random

import pytest
import torch
from transformers import AutoModelForCausalLM

from lmforge.data.packing import CausalCollator, block_causal_mask, pack
from lmforge.data.tokenize import IGNORE
from lmforge.training.losses import token_loss_sum


def _samples(n=10, seed=0, vocab=300):
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        L = rng.randint(5, 40)
        ids = [rng.randrange(5, vocab) for _ in range(L)]
        k = rng.randint(1, L - 1)
        labels = [IGNORE] * k + ids[k:]
        labels[0] = IGNORE
        out.append((ids, labels))
    return out


def test_pack_bins_respect_max_length_and_keep_every_sample():
    samples = _samples(50)
    rows = pack(samples, 64, seed=1)
    assert all(len(r["input_ids"]) <= 64 for r in rows)
    assert sum(len(r["seq_lens"]) for r in rows) == 50
    got = sorted(tuple(r["input_ids"][s - n:s]) for r in rows
                 for s, n in zip(torch.tensor(r["seq_lens"]).cumsum(0).tolist(), r["seq_lens"]))
    assert got == sorted(tuple(ids) for ids, _ in samples)
    assert len(rows) < 50  # it actually packed


def test_block_causal_mask_by_hand():
    seg = torch.tensor([[0, 0, 1, 1, 1, -6]])
    m = block_causal_mask(seg, None)[0, 0].int().tolist()
    assert m == [
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [0, 0, 1, 0, 0, 0],
        [0, 0, 1, 1, 0, 0],
        [0, 0, 1, 1, 1, 0],
        [0, 0, 0, 0, 0, 1],  # a pad token sees only itself
    ]


def _model(model_dir, attn):
    """The tiny model with ``attn``: sdpa, eager, or lmforge's per-sample attention for packed rows."""
    from lmforge.training.attention import NAME, use_packed_attention

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32,
                                                 attn_implementation="sdpa" if attn == NAME else attn)
    if attn == NAME:
        assert use_packed_attention(model)
    return model


@pytest.mark.parametrize("attn", ["sdpa", "eager", "lmforge_packed_sdpa"])
def test_packed_loss_and_gradients_equal_unpacked(sharp_model_dir, attn):
    samples = _samples(12)
    packed_rows = pack(samples, 128, seed=0)
    assert any(len(r["seq_lens"]) > 1 for r in packed_rows)
    packed = CausalCollator(0, packed=True, attn_implementation=attn)(packed_rows)
    unpacked = CausalCollator(0, packed=False, attn_implementation=attn)(
        [{"input_ids": i, "labels": l} for i, l in samples])
    results = []
    for batch in (packed, unpacked):
        model = _model(sharp_model_dir, attn)  # peaked attention: a sample seeing another would show
        loss, n = token_loss_sum(model, batch)
        (loss / n).backward()
        results.append((loss.item() / n, n, {k: p.grad for k, p in model.named_parameters()}))
    (lp, np_, gp), (lu, nu, gu) = results
    assert np_ == nu
    assert lp == pytest.approx(lu, rel=1e-5)
    for k in gp:
        torch.testing.assert_close(gp[k], gu[k], rtol=1e-4, atol=1e-6, msg=k)


@pytest.mark.parametrize("attn", ["sdpa", "lmforge_packed_sdpa"])
def test_no_attention_across_boundaries(tiny_model_dir, attn):
    """Changing the tokens of one packed sample leaves the logits of the other samples unchanged."""
    model = _model(tiny_model_dir, attn)
    samples = _samples(3, seed=3)
    row = pack(samples, 200, seed=0)
    assert len(row) == 1 and len(row[0]["seq_lens"]) == 3
    batch = CausalCollator(0, packed=True, attn_implementation=attn)(row)
    first = row[0]["seq_lens"][0]
    altered = {k: v.clone() if torch.is_tensor(v) else v for k, v in batch.items()}
    altered["input_ids"][0, :first] = (altered["input_ids"][0, :first] + 7) % 300
    with torch.no_grad():
        a = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
        b = model(**{k: v for k, v in altered.items() if k != "labels"}).logits
    assert not torch.allclose(a[0, :first], b[0, :first])
    assert torch.equal(a[0, first:], b[0, first:])


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_per_sample_attention_backward_equals_autograd(dtype):
    """The hand-written backward of packed attention (grouped-query heads, a prompt shared by two answers, right
    padding) against autograd through the reference: float64 to rounding, bf16 within bf16's."""
    from lmforge.training.attention import PerSampleAttention, _row_samples, reference_attention

    g = torch.Generator().manual_seed(0)
    B, H, Hkv, T, D = 2, 4, 2, 12, 8
    query, key, value = (torch.randn(B, h, T, D, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
                         for h in (H, Hkv, Hkv))
    samples = [_row_samples([5, 4, 3], torch.device("cpu")), _row_samples([(3, 2, 4), 2], torch.device("cpu"))]
    grad = torch.randn(B, H, T, D, generator=g, dtype=torch.float64).to(dtype)
    results = []
    for fn in (PerSampleAttention.apply, reference_attention):
        out = fn(query, key, value, samples, 0.3)
        out.backward(grad)
        results.append((out.detach(), *(t.grad.clone() for t in (query, key, value))))
        query.grad = key.grad = value.grad = None
    tol = {"rtol": 1e-10, "atol": 1e-12} if dtype == torch.float64 else {"rtol": 2e-2, "atol": 2e-2}
    for got, want, name in zip(results[0], results[1], ("output", "query grad", "key grad", "value grad")):
        torch.testing.assert_close(got, want, **tol, msg=name)
    assert results[0][0][1, :, 11:].abs().sum() == 0 and results[0][1][1, :, 11:].abs().sum() == 0  # padding
