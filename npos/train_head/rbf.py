"""The RBF head's logit with a hand-written backward: :func:`rbf_logsumexp`.

``logsumexp_j(-max(‖x_i - μ_j‖², 0) / (2 w²))`` over M centres costs two (N, D) x (D, M)
products, which autograd runs fast, and a dozen elementwise passes over the (N, M)
distance matrix (the squared norms, the clamp, the division, logsumexp's max and exp, and
each of their backward passes), which on a CPU cost more than the products. The forward
here builds the scaled distances in place and keeps them and the exponentials for the
backward, which needs one pass for the masked softmax, then the products. Same values as the
plain autograd expression (tested against it in float64), also where exponents underflow.
"""

from __future__ import annotations

import torch
from torch.autograd.function import FunctionCtx, once_differentiable


def _scaled_neg_d2(x: torch.Tensor, centres: torch.Tensor,
                   log_width: torch.Tensor) -> torch.Tensor:
    """(N, M) ``a = -max(d², 0) / (2 w²)``, ``d² = ‖x‖² + ‖μ‖² - 2 x·μ``, ``w = e^log_width``."""
    scale = 0.5 * torch.exp(-2 * log_width)
    # The centres' term rides in the product's epilogue and the scale on the (N, D) factor:
    # two fewer passes over the (N, M) result (the scale stays a tensor: no GPU sync).
    a = torch.addmm(centres.pow(2).sum(-1).mul(-scale), x.mul(2 * scale), centres.T)
    return a.sub_(x.pow(2).sum(-1, keepdim=True).mul(scale)).clamp_max_(0)


#: Exponents below this are raised to it before ``exp``. On x86 CPUs ``exp`` of an argument
#: below ~-88 (a float32 underflow) takes a slow path, ~50x slower for the whole (N, M)
#: matrix (measured: 23 vs 0.4 ms), and its denormal results slow every later pass: a head
#: whose width shrinks in training made late epochs 6x slower. ``e^-40 ≈ 4e-18`` next to the
#: row's largest term 1 is far below float32's resolution, so sums and logs are unchanged.
EXP_FLOOR = -40.0


def _softmax_parts(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(lse, e, s)`` of the rows of ``a``: ``e = exp(max(a - m, floor))`` with ``m`` the row
    maxima, ``s = Σ e``, ``lse = m + log s`` (``e / s`` is the softmax)."""
    m = a.amax(dim=-1, keepdim=True)
    e = (a - m).clamp_min_(EXP_FLOOR).exp_()
    s = e.sum(dim=-1)
    return m.squeeze(-1) + s.log(), e, s


class _RbfLogsumexp(torch.autograd.Function):
    @staticmethod
    def forward(ctx: FunctionCtx, x: torch.Tensor, centres: torch.Tensor,
                log_width: torch.Tensor) -> torch.Tensor:
        a = _scaled_neg_d2(x, centres, log_width)
        lse, e, s = _softmax_parts(a)
        ctx.save_for_backward(x, centres, log_width, a, e, s)
        return lse

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, grad: torch.Tensor):
        x, centres, log_width, a, e, s = ctx.saved_tensors  # type: ignore[attr-defined]
        needs_x, needs_centres, needs_width = ctx.needs_input_grad  # type: ignore[attr-defined]
        # dL/da = grad * softmax(a) = e * grad / s, zero where d² was clamped (there a == 0:
        # the clamp passes no gradient). Masked entries have a == 0, so they add nothing to
        # the width's gradient either.
        ga = torch.where(a < 0, e, 0).mul_((grad / s).unsqueeze(1))
        # a = -d² e^(-2 log_width) / 2, so da/dlog_width = -2a.
        grad_width = -2 * torch.dot(ga.view(-1), a.view(-1)) if needs_width else None
        # dL/dd² = -scale * dL/da; the factor 2 * -scale is applied to the (N, D) and (M, D)
        # results, not to the (N, M) matrix.
        factor = -torch.exp(-2 * log_width)
        grad_x = grad_centres = None
        if needs_x:  # d(d²_ij)/dx_i = 2 (x_i - μ_j)
            grad_x = (x * ga.sum(1, keepdim=True) - ga @ centres).mul_(factor)
        if needs_centres:  # d(d²_ij)/dμ_j = 2 (μ_j - x_i)
            grad_centres = (centres * ga.sum(0).unsqueeze(1) - ga.T @ x).mul_(factor)
        return grad_x, grad_centres, grad_width


def rbf_logsumexp(x: torch.Tensor, centres: torch.Tensor,
                  log_width: torch.Tensor) -> torch.Tensor:
    """``logsumexp_j(-max(‖x_i - μ_j‖², 0) / (2 e^(2 log_width)))``, shape (N,).

    Parameters
    ----------
    x : Tensor of shape (N, D)
    centres : Tensor of shape (M, D)
    log_width : 0-dim Tensor
        All three float32 or float64, on one device; any of them may require grad.
    """
    if torch.is_grad_enabled() and (x.requires_grad or centres.requires_grad
                                    or log_width.requires_grad):
        out = _RbfLogsumexp.apply(x, centres, log_width)
        assert isinstance(out, torch.Tensor)
        return out
    # Scoring: nothing to keep for a backward pass.
    return _softmax_parts(_scaled_neg_d2(x, centres, log_width))[0]
