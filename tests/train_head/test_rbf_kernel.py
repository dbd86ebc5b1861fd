"""The RBF head's hand-written backward equals autograd on the plain expression."""

from __future__ import annotations

import pytest
import torch

from npos.train_head.rbf import RbfWorkspace, rbf_logsumexp


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


@pytest.mark.parametrize("workspace", [False, True])
@pytest.mark.parametrize("needs", [(True, True, True), (False, True, True), (True, False, False),
                                   (False, False, True), (True, False, True)])
def test_values_and_gradients_equal_autograd_in_float64(needs, workspace):
    ours, ref = _inputs(torch.float64, requires_grad=needs), _inputs(torch.float64,
                                                                     requires_grad=needs)
    weights = torch.linspace(-1, 2, 37, dtype=torch.float64)
    out = rbf_logsumexp(*ours, workspace=RbfWorkspace() if workspace else None)
    expected = reference(*ref)
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


def _grads(x, centres, log_width, workspace, weights):
    for t in (x, centres, log_width):
        t.grad = None
    (rbf_logsumexp(x, centres, log_width, workspace=workspace) * weights).sum().backward()
    return [t.grad.clone() for t in (x, centres, log_width)]


def test_workspace_matrix_is_reused_across_steps_and_not_shared_by_live_graphs():
    x, centres, log_width = _inputs(torch.float64)
    weights = torch.linspace(-1, 2, 37, dtype=torch.float64)
    expected = _grads(x, centres, log_width, None, weights)
    workspace = RbfWorkspace()
    for _ in range(3):  # training steps: forward, backward, forward, ...
        for got, want in zip(_grads(x, centres, log_width, workspace, weights), expected):
            torch.testing.assert_close(got, want, rtol=0, atol=0)
    matrix = workspace._flat
    assert matrix is not None and matrix.numel() == 37 * 23
    # a smaller batch (an epoch's last) reuses the same memory
    _grads(x[:10].detach().requires_grad_(), centres, log_width, workspace, weights[:10])
    assert workspace._flat is matrix
    # two graphs alive at once: the second gets its own matrix, both gradients are right
    for t in (x, centres, log_width):
        t.grad = None
    first = rbf_logsumexp(x, centres, log_width, workspace=workspace)
    second = rbf_logsumexp(x, centres, log_width, workspace=workspace)
    (second * weights).sum().backward()
    from_second = [t.grad.clone() for t in (x, centres, log_width)]
    for t in (x, centres, log_width):
        t.grad = None
    (first * weights).sum().backward()
    for got, want in zip([t.grad for t in (x, centres, log_width)], expected):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    for got, want in zip(from_second, expected):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_workspace_is_free_again_when_a_graph_is_dropped_without_backward():
    x, centres, log_width = _inputs(torch.float64)
    workspace = RbfWorkspace()
    out = rbf_logsumexp(x, centres, log_width, workspace=workspace)
    lent = workspace._flat
    del out  # e.g. a step that raised before its backward
    again = rbf_logsumexp(x, centres, log_width, workspace=workspace)
    assert workspace._flat is lent and again.grad_fn is not None


def test_second_backward_through_a_workspace_graph_is_refused():
    x, centres, log_width = _inputs(torch.float64)
    out = rbf_logsumexp(x, centres, log_width, workspace=RbfWorkspace()).sum()
    out.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="once"):
        out.backward()


def test_head_copies_start_with_their_own_workspace():
    import copy

    from npos.train_head.model import RbfHead

    head = RbfHead(16, 2, centres_per_class=3)
    x = torch.randn(5, 16)
    alive = head(x)  # the workspace is lent to this graph
    clone = copy.deepcopy(head)
    assert clone.workspace is not head.workspace and clone.workspace._flat is None
    torch.testing.assert_close(clone(x), alive)


def test_amp_gradients_stay_close_to_float64():
    """Under the CPU's --amp (bfloat16 product inputs) the gradients stay close to float64,
    also the width's, which the backward gets as a difference of sums that cancel."""
    from npos.device import cpu_matmul_precision

    g = torch.Generator().manual_seed(0)
    normalize = torch.nn.functional.normalize
    base = normalize(torch.randn(20, 64, generator=g), dim=-1)
    x = normalize(base.repeat(20, 1) + 0.3 * torch.randn(400, 64, generator=g), dim=-1)
    centres = normalize(base.repeat(3, 1) + 0.2 * torch.randn(60, 64, generator=g), dim=-1)
    weights = torch.randn(400, generator=g)

    def grads(dtype, workspace=None):
        c = centres.to(dtype).clone().requires_grad_()
        w = torch.tensor(-1.2, dtype=dtype, requires_grad=True)
        out = rbf_logsumexp(x.to(dtype), c, w, workspace=workspace)
        (out * weights.to(dtype)).sum().backward()
        return c.grad.double(), w.grad.double()

    ref_centres, ref_width = grads(torch.float64)
    with cpu_matmul_precision(bf16=True):
        got_centres, got_width = grads(torch.float32, RbfWorkspace())
    # measured on an AMX CPU: 3.5e-3 and 2e-4 (plain float32 elsewhere: ~5e-7 and 6e-8)
    assert (got_centres - ref_centres).norm() / ref_centres.norm() < 1e-2
    assert abs(got_width - ref_width) / abs(ref_width) < 2e-3


def test_rbf_head_benchmark_runs_and_reports_every_variant(capsys, monkeypatch):
    import sys

    from benchmarks import rbf_head

    monkeypatch.setattr(sys, "argv", ["rbf_head", "--rows", "12", "--centres", "6", "--dim",
                                      "8", "--rounds", "1", "--steps", "2", "--grad-x"])
    rbf_head.main()
    out = capsys.readouterr().out
    for name in ("autograd", "kernel", "workspace"):
        assert out.count(f"  {name} ") == 2  # float32 and --amp products
    assert " 1.00x" in out and "rows with gradient" in out
