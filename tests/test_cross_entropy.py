"""The chunked LM head + cross-entropy (training/cross_entropy.py) against autograd's unchunked one."""

import pytest
import torch
import torch.nn.functional as F

from lmforge.training import cross_entropy
from lmforge.training.cross_entropy import linear_cross_entropy


def _reference(hidden, weight, targets):
    return F.cross_entropy((hidden @ weight.T).float(), targets, reduction="sum")


def _case(dtype, n=150, c=24, v=300, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, c, generator=g).to(dtype)
    weight = (torch.randn(v, c, generator=g) * 0.5).to(dtype)
    targets = torch.randint(0, v, (n,), generator=g)
    return hidden, weight, targets


def _grads(fn, hidden, weight, targets, frozen=False):
    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_(not frozen)
    loss = fn(h, w, targets)
    (loss * 0.37).backward()  # a scale as the training loop's 1 / loss tokens, to check the backward applies it
    return loss.detach(), h.grad, w.grad


@pytest.fixture(params=[1, 7], ids=["one_chunk", "chunks_of_64"])
def chunks(request, monkeypatch):
    if request.param > 1:  # 64 positions a chunk (the floor): 150 positions -> 64 + 64 + 22
        monkeypatch.setattr(cross_entropy, "CHUNK_BYTES", 1)
    return request.param


def test_loss_and_gradients_equal_autograd_in_fp32(chunks):
    hidden, weight, targets = _case(torch.float32)
    loss, gh, gw = _grads(linear_cross_entropy, hidden, weight, targets)
    ref_loss, ref_gh, ref_gw = _grads(_reference, hidden, weight, targets)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(gh, ref_gh, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gw, ref_gw, rtol=1e-5, atol=1e-6)


def test_bf16_is_as_close_to_fp32_as_autograd_is(chunks):
    """In bf16 neither is exact: the chunked gradients are no further from the fp32 truth than autograd's."""
    hidden, weight, targets = _case(torch.bfloat16)
    truth = _grads(_reference, hidden.float(), weight.float(), targets)
    ours = _grads(linear_cross_entropy, hidden, weight, targets)
    theirs = _grads(_reference, hidden, weight, targets)
    torch.testing.assert_close(ours[0], theirs[0], rtol=1e-6, atol=1e-4)  # the same bf16 logits, fp32 after
    for k in (1, 2):
        assert ours[k].dtype == torch.bfloat16
        err_ours = (ours[k].float() - truth[k]).norm() / truth[k].norm()
        err_theirs = (theirs[k].float() - truth[k]).norm() / truth[k].norm()
        assert err_ours < max(1.5 * err_theirs, 1e-2), (k, err_ours, err_theirs)


def test_a_frozen_head_gets_no_gradient_and_no_grad_mode_gives_the_loss(chunks):
    hidden, weight, targets = _case(torch.float32)
    loss, gh, gw = _grads(linear_cross_entropy, hidden, weight, targets, frozen=True)
    assert gw is None
    torch.testing.assert_close(gh, _grads(_reference, hidden, weight, targets)[1], rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(linear_cross_entropy(hidden, weight, targets), loss, rtol=1e-6, atol=1e-5)


def test_under_autocast_it_computes_in_the_autocast_dtype():
    """QLoRA and prompt tuning run under autocast: the head's matmul is bf16 there, the gradients reach the fp32
    weight in fp32, as with the module call."""
    hidden, weight, targets = _case(torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = _grads(linear_cross_entropy, hidden, weight, targets)
        theirs = _grads(lambda h, w, t: F.cross_entropy(F.linear(h, w).float(), t, reduction="sum"),
                        hidden, weight, targets)
    assert ours[1].dtype == ours[2].dtype == torch.float32
    torch.testing.assert_close(ours[0], theirs[0], rtol=1e-6, atol=1e-4)
    for k in (1, 2):
        torch.testing.assert_close(ours[k], theirs[k], rtol=2e-2, atol=2e-3)


def test_no_positions_give_zero_loss_and_zero_gradients():
    hidden, weight, targets = _case(torch.float32, n=0)
    loss, gh, gw = _grads(linear_cross_entropy, hidden, weight, targets)
    assert loss.item() == 0.0 and gh.shape == (0, 24) and not gw.any()
