"""The RBF head's logit with a hand-written backward: :func:`rbf_logsumexp`.

``logsumexp_j(-max(‖x_i - μ_j‖², 0) / (2 w²))`` over M centres costs one (N, D) x (D, M)
product forward and one or two backward, which run fast, and elementwise passes over the
(N, M) distance matrix, which on a CPU cost as much as the products when autograd runs the
plain expression (a dozen passes, each into a fresh 5 MB matrix at 856 x 1,600). Here the
forward turns the product's output into the exponentials in place and keeps only them for
the backward, which scales them into the gradient of the exponents in place and gets every
other sum it needs from the products (``Σ_j softmax_ij = 1``, and the width's gradient
``Σ ga·d²`` from the centres' product): one (N, M) matrix per step, reused from a
:class:`RbfWorkspace`. Same values as the plain autograd expression (tested against it in
float64), also where exponents underflow.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch.autograd.function import FunctionCtx, once_differentiable

from npos.device import cpu_matmul_precision

#: Exponents below this are raised to it before ``exp``. On x86 CPUs ``exp`` of an argument
#: below ~-88 (a float32 underflow) takes a slow path, ~50x slower for the whole (N, M)
#: matrix (measured: 23 vs 0.4 ms), and its denormal results slow every later pass: a head
#: whose width shrinks in training made late epochs 6x slower. ``e^-40 ≈ 4e-18`` next to the
#: row's largest term 1 is far below float32's resolution, so sums and logs are unchanged.
EXP_FLOOR = -40.0


class RbfWorkspace:
    """One (N, M) matrix lent to :func:`rbf_logsumexp`'s training graph, step after step.

    A fresh matrix of that size (5 MB at 856 x 1,600) comes from ``mmap`` under glibc and
    faults in every page when first written: measured ~360 page faults and ~0.3 ms per
    training step for this kernel without a workspace, none with it (the kernel before, with
    four such matrices, took 940–2,200). The matrix is lent to one graph at a
    time, from its forward until its backward ran (or the graph was dropped); a forward while
    it is lent (two graphs alive) allocates its own, as without a workspace. Not shared
    between threads.
    """

    def __init__(self) -> None:
        self._flat: torch.Tensor | None = None
        self._holder: weakref.ref | None = None

    def __reduce__(self):  # copies and pickles of a head start with an empty workspace
        return (RbfWorkspace, ())

    def take(self, ctx: FunctionCtx, rows: int, cols: int, like: torch.Tensor) -> torch.Tensor:
        """An uninitialized (rows, cols) matrix of ``like``'s dtype and device for ``ctx``."""
        if self._holder is not None and self._holder() is not None:
            return like.new_empty((rows, cols))
        flat = self._flat
        if (flat is None or flat.numel() < rows * cols or flat.dtype != like.dtype
                or flat.device != like.device):
            flat = self._flat = like.new_empty(rows * cols)  # the largest batch so far
        self._holder = weakref.ref(ctx)
        return flat[:rows * cols].view(rows, cols)

    def give_back(self, ctx: FunctionCtx) -> None:
        """``ctx``'s backward ran: the matrix is free for the next forward."""
        if self._holder is not None and self._holder() is ctx:
            self._holder = None


def _exponentials(x: torch.Tensor, centres: torch.Tensor, log_width: torch.Tensor,
                  out: torch.Tensor | None = None):
    """``(e, m, s, x², μ²)`` of ``a = -max(d², 0) / (2 w²)``, ``d² = ‖x‖² + ‖μ‖² - 2 x·μ``:
    ``e = exp(max(a - m, floor))`` (in ``out`` when given) with ``m`` the row maxima and
    ``s = Σ_j e`` (``lse = m + log s``; ``e / s`` is the softmax)."""
    scale = 0.5 * torch.exp(-2 * log_width)
    # Squared norms without an (M, D) temporary (4x faster than pow(2).sum at 1,600 x 512).
    x2 = torch.linalg.vector_norm(x, dim=-1).square_()
    c2 = torch.linalg.vector_norm(centres, dim=-1).square_()
    # The centres' term rides in the product's epilogue and the scale on the (N, D) factor:
    # two fewer passes over the (N, M) result (the scale stays a tensor: no GPU sync).
    a = torch.addmm(c2.mul(-scale), x.mul(2 * scale), centres.T,
                    **({} if out is None else {"out": out}))
    a.sub_(x2.mul(scale).unsqueeze(1)).clamp_max_(0)
    m = a.amax(dim=-1, keepdim=True)
    e = a.sub_(m).clamp_min_(EXP_FLOOR).exp_()
    return e, m.squeeze(-1), e.sum(dim=-1), x2, c2


class _RbfLogsumexp(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, centres: torch.Tensor, log_width: torch.Tensor,
                workspace: RbfWorkspace | None) -> torch.Tensor:
        out = (None if workspace is None
               else workspace.take(ctx, x.shape[0], centres.shape[0], x))
        e, m, s, x2, c2 = _exponentials(x, centres, log_width, out)
        ctx.save_for_backward(x, centres, log_width, e, s, x2, c2)
        ctx.workspace, ctx.used = workspace, False
        return m + s.log()

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: torch.Tensor):
        if ctx.used:  # the exponentials were turned into gradients in place
            raise RuntimeError("rbf_logsumexp: a graph made with a workspace can be "
                               "back-propagated once")
        x, centres, log_width, e, s, x2, c2 = ctx.saved_tensors
        needs_x, needs_centres, needs_width, _ = ctx.needs_input_grad
        # dL/da = grad * softmax(a): in the workspace's matrix in place (a training step's
        # one backward), else a copy (gradcheck and retain_graph back-propagate again). The
        # clamp of d² at 0 passes gradient here (autograd would pass none where the computed
        # d² is negative): there x ≈ μ, and the gradient's factor 2 (x - μ) vanishes with it.
        weight = (grad / s).unsqueeze(1)
        ga = e.mul_(weight) if ctx.workspace is not None else e * weight
        ctx.used = ctx.workspace is not None
        f = torch.exp(-2 * log_width)  # dL/dd² = -f/2 · dL/da
        grad_x = grad_centres = grad_width = None
        # Σ_j ga_ij μ_j (N, D) and Σ_i ga_ij x_i (M, D): the gradients' products, and (one
        # of them) the width's cross term.
        by_x = ga @ centres if needs_x or (needs_width and not needs_centres) else None
        by_centres = ga.T @ x if needs_centres else None
        if by_x is not None and needs_x:  # d(d²_ij)/dx_i = 2 (x_i - μ_j); Σ_j ga_ij = grad_i
            grad_x = torch.addcmul(by_x, x, grad.unsqueeze(1), value=-1).mul_(f)
        col = ga.sum(0)
        if needs_width:
            # da/dlog_width = -2a = f·d², and Σ_ij ga_ij d²_ij from the products' results:
            # Σ_i x²_i grad_i + Σ_j μ²_j col_j - 2 Σ_ij ga_ij x_i·μ_j, no (N, M) pass. The
            # CPU's --amp setting would send torch.dot down a 4x slower path (same values).
            with cpu_matmul_precision(bf16=False):
                if by_centres is not None:
                    cross = torch.dot(centres.reshape(-1), by_centres.reshape(-1))
                else:
                    assert by_x is not None  # made for the width when μ needs no gradient
                    cross = torch.dot(x.reshape(-1), by_x.reshape(-1))
                grad_width = f * (torch.dot(x2, grad) + torch.dot(c2, col) - 2 * cross)
        if by_centres is not None:  # d(d²_ij)/dμ_j = 2 (μ_j - x_i)
            grad_centres = by_centres.addcmul_(centres, col.unsqueeze(1), value=-1).mul_(f)
        if ctx.workspace is not None:
            ctx.workspace.give_back(ctx)
        return grad_x, grad_centres, grad_width, None


def rbf_logsumexp(x: torch.Tensor, centres: torch.Tensor, log_width: torch.Tensor, *,
                  workspace: RbfWorkspace | None = None) -> torch.Tensor:
    """``logsumexp_j(-max(‖x_i - μ_j‖², 0) / (2 e^(2 log_width)))``, shape (N,).

    Parameters
    ----------
    x : Tensor of shape (N, D)
    centres : Tensor of shape (M, D)
    log_width : 0-dim Tensor
        All three float32 or float64, on one device; any of them may require grad.
    workspace : RbfWorkspace, optional
        Where a training step's (N, M) matrix lives (the head's own, reused every step).
    """
    if torch.is_grad_enabled() and (x.requires_grad or centres.requires_grad
                                    or log_width.requires_grad):
        out = _RbfLogsumexp.apply(x, centres, log_width, workspace)
        assert isinstance(out, torch.Tensor)
        return out
    # Scoring: nothing to keep for a backward pass.
    _, m, s, _, _ = _exponentials(x, centres, log_width)
    return m + s.log()
