"""The RBF head's hand-written backward equals autograd on the plain expression."""

from __future__ import annotations

import pytest
import torch

from npos.train_head.rbf import rbf_logsumexp


def reference(x, centres, log_width):
    d2 = (x.pow(2).sum(-1, keepdim=True) + centres.pow(2).sum(-1)
          - 2 * x @ centres.T).clamp_min(0)
    return torch.logsumexp(-d2 / (2 * torch.exp(2 * log_width)), dim=-1)


def _inputs(dtype, *, requires_grad=(True, True, True)):
    g = torch.Generator().manual_seed(0)
    x = torch.nn.functional.normalize(torch.randn(37, 16, generator=g, dtype=dtype), dim=-1)
    centres = torch.randn(23, 16, generator=g, dtype=dtype) * 0.3
    centres[:5] = x[:5]  # rows sitting on a centre: d² is clamped at 0 there
    log_width = torch.tensor(-0.7, dtype=dtype)
    return [t.clone().requires_grad_(r) for t, r in zip((x, centres, log_width), requires_grad)]


@pytest.mark.parametrize("needs", [(True, True, True), (False, True, True), (True, False, False)])
def test_values_and_gradients_equal_autograd_in_float64(needs):
    ours, ref = _inputs(torch.float64, requires_grad=needs), _inputs(torch.float64,
                                                                     requires_grad=needs)
    weights = torch.linspace(-1, 2, 37, dtype=torch.float64)
    out, expected = rbf_logsumexp(*ours), reference(*ref)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    (out * weights).sum().backward()
    (expected * weights).sum().backward()
    for a, b, need in zip(ours, ref, needs):
        if need:
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-10, atol=1e-12)
        else:
            assert a.grad is None


def test_gradcheck():
    x, centres, log_width = _inputs(torch.float64)
    with torch.no_grad():
        centres[:5] += 0.05  # gradcheck's finite differences need d² away from the clamp
    assert torch.autograd.gradcheck(rbf_logsumexp, (x, centres, log_width))


def test_no_grad_path_equals_the_graph_path_in_float32():
    x, centres, log_width = _inputs(torch.float32)
    with torch.no_grad():
        plain = rbf_logsumexp(x, centres, log_width)
    assert plain.grad_fn is None
    torch.testing.assert_close(rbf_logsumexp(x, centres, log_width).detach(), plain,
                               rtol=0, atol=0)
    torch.testing.assert_close(plain, reference(x, centres, log_width).detach(),
                               rtol=1e-5, atol=1e-5)


def test_far_points_whose_exponents_underflow_keep_the_reference_values():
    """A narrow width puts most exponents far below float32's exp range (the floor that
    keeps exp off its slow path must not change the result)."""
    x, centres, log_width = _inputs(torch.float32)
    with torch.no_grad():
        log_width.fill_(-3.0)  # w² = e^-6: far centres give exponents of -800
    ours = rbf_logsumexp(x, centres, log_width)
    expected = reference(x.double(), centres.double(), log_width.double())
    torch.testing.assert_close(ours.double(), expected, rtol=1e-5, atol=1e-4)
    assert (expected < -100).any()  # rows far from every centre are in the data
    weights = torch.linspace(-1, 2, 37)
    (ours * weights).sum().backward()
    refs = [t.detach().double().requires_grad_() for t in (x, centres, log_width)]
    (reference(*refs) * weights.double()).sum().backward()
    for a, b in zip((x, centres, log_width), refs, strict=True):
        # float32 against float64 at gradients of ~1e3 (w² = e^-6): what float32 autograd
        # on the plain expression also gets (measured 1e-5 of the largest, both)
        torch.testing.assert_close(a.grad.double(), b.grad, rtol=0,
                                   atol=2e-5 * b.grad.abs().max().item())
