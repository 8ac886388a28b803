"""Well-posedness of implicit layers: x = relu(A x + B u) has a unique solution when
‖A‖∞ = max_i Σ_j |A_ij| < 1. As schemes, exact Euclidean projections (C steps):

    RowL1Ball(κ)             θ = argmin ‖W − θ‖² s.t. ‖θ_i‖₁ ≤ κ for every row i (‖θ‖∞ ≤ κ)
    SparseRowL1Ball(κ, ...)  the same, and at most s non-zeros per row (or in all)

Rows are the first axis (a weight (out, *rest) is the matrix (out, prod(rest))). θ is the sparse
format of pruning ({"indices", "values"}), so storage, the container and ONNX are `Sparse`'s.

Exactness. The row constraints are independent, so the projection is one per row: onto the ℓ1
ball a soft threshold at the τ where the row's ℓ1 norm is κ (found from the sorted magnitudes).
With at most s non-zeros too, keeping the s largest magnitudes and projecting those onto the ℓ1
ball is exact (Kyrillidis, Becker, Cevher, Koch 2013, "Sparse projections onto the simplex"):
the soft threshold keeps the order of magnitudes, so the top-s support is optimal.

A budget of K non-zeros over the whole matrix (per_row=False) splits into min Σ_i f_i(s_i)
s.t. Σ s_i ≤ K, f_i(s) the best error of row i with s non-zeros. Each f_i is convex in s: by
duality (Slater: θ = 0), with a the sorted magnitudes of the row,
    f_i(s) = max_{λ ≥ 0} ‖a‖² − Σ_{j ≤ s} (a_j − λ)₊² − 2λκ,
for each λ a sequence in s whose decrements (a_{s+1} − λ)₊² do not increase, and a maximum of
convex sequences is convex. So taking the K largest marginal decreases f_i(s) − f_i(s + 1) over
all rows (greedy allocation) is exact.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..errors import ConfigError
from ..util import kappa as _count
from .base import Theta
from .prune import Sparse, sparse_theta, check_keep_count


def _rows(w: Tensor) -> Tensor:
    """w as the matrix (rows, D): rows the first axis; a scalar is one row of one."""
    return w.reshape(w.shape[0], -1) if w.dim() >= 1 else w.reshape(1, 1)


def _check_kappa(k: Any) -> None:
    if isinstance(k, bool) or not isinstance(k, (int, float)) or not k > 0 or not math.isfinite(k):
        raise ConfigError(f"kappa={k!r} must be a positive finite number")


def _sorted(W: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Each row's magnitudes sorted descending (equal magnitudes: the first position first):
    (u (m, D), order (m, D), cumulative sums of u in float64 (m, D), j = 1..D in float64)."""
    u, order = torch.sort(W.abs(), dim=1, descending=True, stable=True)
    css = torch.cumsum(u.double(), 1)
    j = torch.arange(1, W.shape[1] + 1, device=W.device, dtype=torch.float64)
    return u, order, css, j


def project_rows(w: Tensor, kappa: float, s: Tensor | None = None) -> Tensor:
    """argmin ‖W − θ‖² s.t. every row ‖θ_i‖₁ ≤ κ and, with `s` ((rows,) int), at most s_i
    non-zeros in row i; W = w as the matrix (rows, D), returned in w's shape. Vectorized over rows."""
    W = _rows(w.detach())
    m, D = W.shape
    if m == 0 or D == 0:
        return w.detach().clone()
    u, order, css, j = _sorted(W)
    inside = torch.ones_like(u, dtype=torch.bool) if s is None else j[None] <= s.to(W.device)[:, None]
    # the threshold of the first s_i sorted magnitudes: ρ the last j ≤ s_i with u_j > (c_j − κ)/j
    cond = (u.double() - (css - kappa) / j > 0) & inside
    rho = (cond * j).amax(1).long()  # (m,) 0 only where s_i = 0
    r = rho.clamp(min=1)
    tau = ((css.gather(1, (r - 1)[:, None])[:, 0] - kappa) / r).clamp(min=0)  # (m,) 0 where the row fits
    vals = torch.where(inside, torch.clamp(u - tau.to(u.dtype)[:, None], min=0), torch.zeros_like(u))
    mags = torch.zeros_like(u).scatter(1, order, vals)
    return (torch.sign(W) * mags).reshape(w.shape)


def row_errors(w: Tensor, kappa: float) -> Tensor:
    """f (rows, D + 1) float64: f[i, s] = min ‖W_i − θ_i‖² s.t. ‖θ_i‖₁ ≤ κ, ‖θ_i‖₀ ≤ s.

    With a the sorted magnitudes and ρ_s the last j ≤ s with a_j > (c_j − κ)/j (c the cumulative
    sums), τ_s = max(0, (c_ρ − κ)/ρ) and f(s) = ρ τ² + Σ_{j > ρ} a_j²: the ρ largest shrink to
    a_j − τ, the rest are zero."""
    W = _rows(w.detach())
    m, D = W.shape
    u, _, css, j = _sorted(W)
    a = u.double()
    tail = torch.flip(torch.cumsum(torch.flip(a * a, [1]), 1), [1])  # tail[:, r] = Σ_{j ≥ r+1} a_j² (0-based r)
    tail = torch.cat([tail, torch.zeros(m, 1, dtype=torch.float64, device=W.device)], 1)  # (m, D + 1): T_r
    cond = a - (css - kappa) / j > 0
    rho = torch.cummax((cond * j).long(), 1).values.clamp(min=1)  # (m, D): ρ_s for s = 1..D
    tau = ((css.gather(1, rho - 1) - kappa) / rho).clamp(min=0)
    f = rho * tau * tau + tail.gather(1, rho)
    return torch.cat([tail[:, :1], f], 1)


def allocate(w: Tensor, kappa: float, total: int) -> Tensor:
    """(rows,) int64 non-zeros per row minimizing Σ_i f_i(s_i) s.t. Σ s_i ≤ total: the `total`
    largest marginal decreases over all rows (exact: each f_i is convex in s; see the module)."""
    f = row_errors(w, kappa)
    m, D = f.shape[0], f.shape[1] - 1
    dec = (f[:, :-1] - f[:, 1:]).clamp(min=0)  # (m, D) marginal decreases
    dec = torch.cummin(dec, 1).values  # non-increasing in exact arithmetic; this only removes rounding
    pick = torch.sort(dec.reshape(-1), descending=True, stable=True).indices[:total]
    return torch.bincount(pick // D, minlength=m)


def _max_row_l1(d: Tensor) -> float:
    """‖d‖∞ of d as the matrix (rows, D): the largest row ℓ1 norm."""
    return float(_rows(d).double().abs().sum(1).max()) if d.numel() else 0.0


class _RowBalls(Sparse):
    """What both row-ball schemes share: fixed values in fine-tuning, ‖θ‖∞ in the summary."""

    kappa: float
    joinable = False

    def trainable(self, theta: Theta) -> list[str]:
        return []  # the row balls bound the values themselves: training them would leave them

    def summary(self, theta: Theta, shape) -> dict[str, Any]:
        return {**super().summary(theta, shape), "max_row_l1": _max_row_l1(self.decompress(theta, shape)),
                "kappa": self.kappa}


@dataclass(frozen=True)
class RowL1Ball(_RowBalls):
    """‖θ‖∞ ≤ κ: θ = argmin ‖W − θ‖² s.t. every row's ℓ1 norm ‖θ_i‖₁ ≤ κ (rows: the first axis).
    A per-row soft threshold; κ < 1 makes an implicit layer x = relu(θ x + B u) well-posed."""

    kappa: float
    name = "row_l1_ball"

    def __post_init__(self) -> None:
        _check_kappa(self.kappa)

    def compress(self, w: Tensor, init: Theta | None = None, *, mu: float | None = None) -> Theta:
        p = project_rows(w, float(self.kappa))
        return sparse_theta(p, p != 0)


@dataclass(frozen=True)
class SparseRowL1Ball(_RowBalls):
    """‖θ‖∞ ≤ κ and sparsity: θ = argmin ‖W − θ‖² s.t. every row ‖θ_i‖₁ ≤ κ and at most s
    non-zeros per row (per_row: s = count, or round(keep·row length)), or, with per_row=False,
    at most count (or round(keep·numel)) non-zeros over the whole weight."""

    kappa: float
    keep: float | None = None
    count: int | None = None
    per_row: bool = True
    name = "sparse_row_l1_ball"

    def __post_init__(self) -> None:
        _check_kappa(self.kappa)
        check_keep_count(self.keep, self.count, "sparse_row_l1_ball")
        if not isinstance(self.per_row, bool):
            raise ConfigError(f"per_row={self.per_row!r} must be true or false")

    def compress(self, w: Tensor, init: Theta | None = None, *, mu: float | None = None) -> Theta:
        W = _rows(w.detach())
        m, D = W.shape
        k = float(self.kappa)
        if self.per_row:
            s = torch.full((m,), _count(D, keep=self.keep, count=self.count, what="weights per row") if D else 0,
                           dtype=torch.long, device=W.device)
        else:
            s = allocate(W, k, _count(W.numel(), keep=self.keep, count=self.count)) if W.numel() else None
        p = project_rows(w, k, s)
        return sparse_theta(p, p != 0)


__all__ = ["RowL1Ball", "SparseRowL1Ball", "allocate", "project_rows", "row_errors"]
