"""Low rank by truncated SVD. θ = {"U": (m, r), "V": (r, n)} with Δ(θ) = U V reshaped.

The C step takes the r leading singular triplets by randomized subspace iteration when
r ≪ min(m, n) (`top_singular`), by the exact SVD otherwise; rank selection needs only the
singular values (`torch.linalg.svdvals`) to choose r.

A weight of shape (out, *rest) — a conv kernel (out, in, kh, kw) — is handled as the matrix
(out, in·kh·kw). The singular values are split evenly, U = U_r √S_r and V = √S_r V_rᵀ.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..errors import ConfigError
from ..util import as_matrix
from .base import Scheme, Theta, dtype_bits


def _factors(r: int, U: Tensor, S: Tensor, Vh: Tensor) -> Theta:
    s = S[:r].sqrt()  # (r,)
    return {"U": (U[:, :r] * s).contiguous(), "V": (s[:, None] * Vh[:r]).contiguous()}  # (m, r), (r, n)


def singular_values(w: Tensor) -> Tensor:
    """σ (min(m, n),) descending, float64: the square roots of the eigenvalues of the smaller Gram
    matrix W Wᵀ or Wᵀ W, formed in float64 (about twice as fast as svdvals; the small σ lose
    relative precision, which the rank choice, a sum of σ², does not feel)."""
    a = w if w.shape[0] <= w.shape[1] else w.T  # (m, n), m ≤ n
    g = torch.zeros(a.shape[0], a.shape[0], dtype=torch.float64, device=w.device)  # (m, m)
    for j in range(0, a.shape[1], 1024):  # float64 copies of 1024 columns at a time
        b = a[:, j:j + 1024].double()
        g.addmm_(b, b.T)
    return torch.linalg.eigvalsh(g).clamp(min=0).sqrt().flip(0)


def top_singular(g: Tensor, k: int, *, iters: int = 4, oversample: int | None = None, seed: int = 0,
                 tol: float | None = 3e-4, max_iters: int = 40) -> tuple[Tensor, Tensor, Tensor]:
    """U (m, k), σ (k,), Vh (k, n): the k leading singular triplets of g (m, n).

    Randomized: block power (subspace) iteration from a seeded Gaussian start of k + p columns
    (p = `oversample`, default max(8, k/2)), re-orthonormalized by QR at every half step, then
    the exact SVD of the small projection Qᵀg (Halko, Martinsson & Tropp 2011). `iters`
    iterations, then, with `tol`, more (up to `max_iters`) while the energy the k triplets
    capture, Σσ², still grows by more than tol × the energy left out (flat spectra converge
    slowly). When the block would not be much smaller than g, or g is small (min(m, n) ≤ 256,
    where the exact SVD takes milliseconds), the exact SVD instead. Runs on g's device; same
    seed, same bytes.
    """
    m, n = g.shape
    q = min(k + (oversample if oversample is not None else max(8, k // 2)), m, n)
    if 4 * q > min(m, n) or min(m, n) <= 256:
        U, S, Vh = torch.linalg.svd(g, full_matrices=False)  # (m, r), (r,), (r, n)
        return U[:, :k], S[:k], Vh[:k]
    gen = torch.Generator(device=g.device).manual_seed(seed)
    Q = torch.linalg.qr(g @ torch.randn(n, q, generator=gen, device=g.device, dtype=g.dtype)).Q  # (m, q)
    total = float(torch.linalg.vector_norm(g)) ** 2 if tol is not None else 0.0
    captured = -1.0
    for it in range(max_iters if tol is not None else iters):
        Q = torch.linalg.qr(g @ torch.linalg.qr(g.T @ Q).Q).Q
        if tol is not None and it + 1 >= iters:
            now = float(torch.linalg.svdvals(Q.T @ g)[:k].double().pow(2).sum())
            if now - captured <= tol * max(total - now, 0.0):
                break
            captured = now
    Ub, S, Vh = torch.linalg.svd(Q.T @ g, full_matrices=False)  # (q, q), (q,), (q, n)
    return Q @ Ub[:, :k], S[:k], Vh[:k]


class _LowRankBase(Scheme):
    joinable = False
    # low rank starts closer to its reference in loss terms: a stronger first pull, slower growth,
    # and a light weight decay (it shrinks the tail singular values the C step will cut); half the
    # budget trains the factors themselves from the LC point (the subspace moves slowly under LC)
    lc_defaults = {"mu0": 1e-2, "mu_growth": 1.1, "weight_decay": 5e-4, "curvature_scale": 9.0, "tail": 0.5}

    def decompress(self, theta: Theta, shape) -> Tensor:
        U, V = theta["U"], theta["V"]  # (m, r), (r, n)
        if U.dim() == 2 and len(shape) and U.shape[0] != shape[0]:
            raise ValueError(f"U has {U.shape[0]} rows for {shape[0]} outputs")
        return (U @ V).reshape(shape)

    def factors(self, theta: Theta) -> tuple[Tensor, Tensor]:
        return theta["U"], theta["V"]

    def onnx_decode(self, b: Any, theta: Theta, shape: tuple[int, ...], out: str, **options: Any) -> str:
        """W = reshape(U V) (layers that can be split are split before, by the exporter)."""
        U, V = (t.detach().cpu().numpy() for t in (theta["U"], theta["V"]))
        b.op("Reshape", [b.op("MatMul", [b.const(U, "U"), b.const(V, "V")]), b.i64(*shape)], out)
        return "lowrank/matmul"

    def bits(self, theta: Theta, shape) -> int:
        return (theta["U"].numel() + theta["V"].numel()) * dtype_bits(theta["U"])

    def summary(self, theta: Theta, shape) -> dict[str, Any]:
        return {"rank": theta["U"].shape[1]}


@dataclass(frozen=True)
class LowRank(_LowRankBase):
    """θ = argmin ‖W − UV‖² s.t. rank ≤ r: the r leading singular triplets (Eckart–Young)."""

    rank: int
    name = "lowrank"

    def __post_init__(self) -> None:
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ConfigError(f"rank={self.rank!r} must be an integer ≥ 1")

    def compress(self, w: Tensor, init: Theta | None = None, *, mu: float | None = None) -> Theta:
        w2 = as_matrix(w.detach(), "low rank")
        r = min(self.rank, *w2.shape)
        return _factors(r, *top_singular(w2, r))


@dataclass(frozen=True)
class RankSelection(_LowRankBase):
    """Rank chosen per C step: r = argmin α·cost(r) + μ/2·Σ_{i>r} σᵢ², then truncated SVD.

    cost(r) counts the factors' weights, r·(m + n) ("storage"), or their multiply-adds per
    output position times `positions` (the output's spatial size for a conv, "flops"). cost is
    linear in r and σ decreasing, so the objective's steps α·cost(1) − μ/2·σᵣ² increase and
    r = #{i : σᵢ² > 2α·cost(1)/μ}: the leading triplets are computed 16, 32, 64, … at a time
    until one falls below that threshold; only a rank near min(m, n) needs every σ.
    """

    alpha: float
    cost: str = "storage"
    positions: int = 1
    name = "rank_selection"
    needs_mu = True

    def __post_init__(self) -> None:
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not self.alpha > 0:
            raise ConfigError(f"alpha={self.alpha!r} must be a positive number")
        if self.cost not in ("storage", "flops"):
            raise ConfigError(f"cost={self.cost!r} must be 'storage' or 'flops'")
        if not isinstance(self.positions, int) or self.positions < 1:
            raise ConfigError(f"positions={self.positions!r} must be an integer ≥ 1")

    def rank_for(self, S: Tensor, m: int, n: int, mu: float) -> int:
        tail = torch.flip(torch.cumsum(torch.flip(S.double() ** 2, [0]), 0), [0])  # tail[i] = Σ_{j≥i} σⱼ²
        tail = torch.cat([tail, tail.new_zeros(1)])  # (q+1,): error left at rank r = tail[r]
        r = torch.arange(tail.numel(), device=S.device, dtype=torch.float64)
        per_rank = (m + n) * (self.positions if self.cost == "flops" else 1)
        obj = self.alpha * per_rank * r + mu / 2 * tail
        return int(torch.argmin(obj))

    def compress(self, w: Tensor, init: Theta | None = None, *, mu: float | None = None) -> Theta:
        if mu is None or not mu > 0:
            raise ConfigError(f"the rank_selection C step needs μ > 0, got mu={mu!r}")
        w2 = as_matrix(w.detach(), "low rank")
        (m, n), q = w2.shape, min(w2.shape)
        per_rank = (m + n) * (self.positions if self.cost == "flops" else 1)
        threshold = 2 * self.alpha * per_rank / float(mu)  # σᵣ² above it: rank r pays for itself
        k = 16
        while 4 * (k + k // 2) <= q and q > 1024:  # randomized while the block is small next to W
            U, S, Vh = top_singular(w2, k)
            if float(S[-1].double() ** 2) <= threshold:
                r = int((S.double() ** 2 > threshold).sum())
                return _factors(r, U, S, Vh) if r else self._empty(w2)
            k *= 2
        r = self.rank_for(singular_values(w2), m, n, float(mu))  # every σ: eigenvalues of the Gram matrix
        return _factors(r, *top_singular(w2, r)) if r else self._empty(w2)

    @staticmethod
    def _empty(w2: Tensor) -> Theta:
        return {"U": w2.new_zeros(w2.shape[0], 0), "V": w2.new_zeros(0, w2.shape[1])}
