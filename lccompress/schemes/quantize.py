"""Quantization: adaptive codebooks (1-D k-means) and fixed codebooks.

θ = {"codebook": (k,), "codes": uint8 of w's shape} for an adaptive codebook; fixed codebooks
store only the codes (plus a scale for the scaled ones).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..errors import ConfigError
from .base import Scheme, Theta, code_bits, dtype_bits, numel
from .codecs import Codes, onnx_codes


def _codes_dtype(k: int) -> torch.dtype:
    return torch.uint8 if k <= 256 else torch.int32


# ----------------------------------------------------------------------------- 1-D k-means
def _lloyd(xs: Tensor, s1: Tensor, c: Tensor, max_iter: int) -> tuple[Tensor, Tensor]:
    """Lloyd iterations on sorted data xs (n,) float64 with prefix sums s1 (n+1,).

    In 1-D each cluster is a contiguous run of xs, so an iteration costs O(k log n):
    split points p (k+1,) from the midpoints, centroids from prefix sums.
    Returns sorted centroids (k,) and split points (k+1,).
    """
    n = xs.numel()
    ends = xs.new_tensor([0, n], dtype=torch.long)
    prev = None
    for _ in range(max_iter):
        c = torch.sort(c).values
        p = torch.cat([ends[:1], torch.searchsorted(xs, (c[:-1] + c[1:]) / 2), ends[1:]])  # (k+1,)
        if prev is not None and torch.equal(p, prev):
            break
        cnt = p[1:] - p[:-1]
        mean = (s1[p[1:]] - s1[p[:-1]]) / cnt.clamp(min=1)
        c = torch.where(cnt > 0, mean, c)
        if bool((cnt == 0).any()):
            c = _reseed_empty(xs, s1, c, p, cnt)
        prev = p
    return c, p


def _reseed_empty(xs: Tensor, s1: Tensor, c: Tensor, p: Tensor, cnt: Tensor) -> Tensor:
    """Move each empty cluster's centroid to the point farthest from its centroid."""
    c = c.clone()
    err = (xs - c.repeat_interleave(cnt)) ** 2  # (n,)
    for j in (cnt == 0).nonzero().reshape(-1).tolist():
        i = int(err.argmax())
        if float(err[i]) == 0.0:
            break  # fewer distinct values than clusters
        c[j] = xs[i]
        err[i] = 0.0
    return c


def _seg(s1: Tensor, s2: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """SSE of each run xs[a:b] about its mean (0 for an empty run)."""
    m = (b - a).clamp(min=1)
    d = s1[b] - s1[a]
    return s2[b] - s2[a] - d * d / m


def _refine(s1: Tensor, s2: Tensor, p: Tensor, sweeps: int = 200) -> Tensor:
    """Coordinate descent on the split points: each split moves to its best place between its
    neighbours (exact, by prefix sums), with cluster means following. Never worse than Lloyd's
    fixed point it starts from, and escapes many of its local minima."""
    p = p.clone()
    k = p.numel() - 1
    for _ in range(sweeps):
        moved = False
        for j in range(1, k):
            a, b = int(p[j - 1]), int(p[j + 1])
            if b - a < 2:
                continue
            q = torch.arange(a + 1, b, device=p.device)  # keep both clusters non-empty
            cost = _seg(s1, s2, p[j - 1].expand_as(q), q) + _seg(s1, s2, q, p[j + 1].expand_as(q))
            i = int(torch.argmin(cost))
            cur = p[j : j + 1]
            now = float(_seg(s1, s2, p[j - 1 : j], cur) + _seg(s1, s2, cur, p[j + 1 : j + 2]))
            if float(cost[i]) < now - 1e-12 * abs(now):
                p[j] = a + 1 + i
                moved = True
        if not moved:
            break
    return p


def _sse(xs: Tensor, s1: Tensor, s2: Tensor, p: Tensor) -> float:
    cnt = (p[1:] - p[:-1]).clamp(min=1)
    sums = s1[p[1:]] - s1[p[:-1]]
    return float((s2[p[1:]] - s2[p[:-1]] - sums * sums / cnt).sum())


def _dp_splits(s1: Tensor, s2: Tensor, k: int) -> Tensor:
    """Exact 1-D k-means: optimal split points (k+1,) of sorted data by dynamic programming.

    D_c(j) = min_{i<j} D_{c−1}(i) + SSE(i, j); the best i is non-decreasing in j (the SSE is a
    Monge cost), so each layer is solved by divide and conquer, all subproblems of a recursion
    level batched into one tensor operation: O(k·n·log n). Layer 1 is closed form and layer k
    is needed at j = n only, so k = 2 costs O(n).
    """
    n = s1.numel() - 1
    dev = s1.device
    ar = lambda m: torch.arange(m, device=dev)  # noqa: E731
    D = _seg(s1, s2, torch.zeros(n + 1, dtype=torch.long, device=dev), ar(n + 1))  # D_1(j) = SSE(0, j)
    args: list[Tensor] = []
    for c in range(2, k):
        Dn = torch.full_like(D, math.inf)
        A = torch.zeros(n + 1, dtype=torch.long, device=dev)
        t = lambda v: torch.tensor([v], device=dev)  # noqa: E731
        jlo, jhi, ilo, ihi = t(c), t(n), t(c - 1), t(n - 1)
        while jlo.numel():
            jm = (jlo + jhi) // 2
            ln = torch.minimum(ihi, jm - 1) - ilo + 1  # candidates per subproblem, ≥ 1
            seg = torch.repeat_interleave(ar(jm.numel()), ln)
            i = ilo[seg] + ar(seg.numel()) - (torch.cumsum(ln, 0) - ln)[seg]
            v = D[i] + _seg(s1, s2, i, jm[seg])
            mn = torch.full(jm.shape, math.inf, dtype=v.dtype, device=dev).scatter_reduce(0, seg, v, "amin")
            am = torch.full(jm.shape, n, dtype=torch.long, device=dev).scatter_reduce(
                0, seg, torch.where(v <= mn[seg], i, n), "amin")
            Dn[jm], A[jm] = mn, am
            lf, rt = jlo <= jm - 1, jm + 1 <= jhi
            jlo, jhi, ilo, ihi = (torch.cat([jlo[lf], (jm + 1)[rt]]), torch.cat([(jm - 1)[lf], jhi[rt]]),
                                  torch.cat([ilo[lf], am[rt]]), torch.cat([am[lf], ihi[rt]]))
        D = Dn
        args.append(A)
    i = ar(n - k + 1) + k - 1  # last layer at j = n only
    p = [n, int(i[torch.argmin(D[i] + _seg(s1, s2, i, torch.full_like(i, n)))])] if k > 1 else [n]
    for A in reversed(args):
        p.append(int(A[p[-1]]))
    p.append(0)
    return torch.tensor(p[::-1], device=dev)


def kmeans_1d(x: Tensor, k: int, init: Tensor | None = None, *, exact_limit: int = 2_000_000,
              max_iter: int = 500) -> Tensor:
    """Codebook (k,) sorted, minimizing Σᵢ minⱼ (xᵢ − cⱼ)² over a flat tensor x.

    Exact by dynamic programming from a cold start, and from a warm start `init` when
    n·(k − 2) ≤ exact_limit (always for k ≤ 2). Otherwise (a warm start on a large tensor, as in
    the LC C steps) Lloyd's algorithm and coordinate descent on the split points, from `init`
    and from evenly spaced quantiles; the lower distortion wins.
    """
    xs = torch.sort(x.detach().reshape(-1).double()).values  # (n,)
    n = xs.numel()
    zero = xs.new_zeros(1)
    s1 = torch.cat([zero, torch.cumsum(xs, 0)])  # (n+1,)
    s2 = torch.cat([zero, torch.cumsum(xs * xs, 0)])
    if n <= k:
        best = torch.cat([torch.arange(n + 1, device=xs.device), torch.full((k - n,), n, device=xs.device)])
    elif init is None or init.numel() != k or n * max(k - 2, 0) <= exact_limit:
        best = _dp_splits(s1, s2, k)
    else:
        q = ((torch.arange(k, device=xs.device, dtype=torch.float64) + 0.5) * n / k).long().clamp(max=n - 1)
        best, best_sse = None, math.inf
        for c0 in (init.detach().double().to(xs.device), xs[q]):
            p = _refine(s1, s2, _lloyd(xs, s1, c0, max_iter)[1])
            e = _sse(xs, s1, s2, p)
            if e < best_sse:
                best, best_sse = p, e
    cnt = best[1:] - best[:-1]
    mean = (s1[best[1:]] - s1[best[:-1]]) / cnt.clamp(min=1)  # (k,) the means of the partition
    return torch.where(cnt > 0, mean, xs[best[:-1].clamp(max=n - 1)])


def assign(w: Tensor, codebook: Tensor) -> Tensor:
    """Index of the nearest entry of a sorted codebook, for each element of w (same shape)."""
    mid = (codebook[:-1] + codebook[1:]) / 2
    return torch.bucketize(w, mid.to(w.dtype), right=True)


class _Coded(Scheme):
    """Schemes whose θ holds integer "codes" into a table of `levels` values: the codes are
    stored bit-packed, and ONNX rebuilds W = T[z] from the table T of each code's value."""

    @property
    def levels(self) -> int:
        raise NotImplementedError

    def codecs(self, theta: Theta) -> dict[str, Any]:
        return {"codes": Codes(self.levels)}

    def onnx_decode(self, b: Any, theta: Theta, shape: tuple[int, ...], out: str, **options: Any) -> str:
        codes = theta["codes"]
        k = max(self.levels, int(codes.max()) + 1 if codes.numel() else 1)
        table = self.decompress({**theta, "codes": torch.arange(k, dtype=codes.dtype)}, (k,))  # (k,) Δ of each code
        return onnx_codes(b, table, codes, shape, out)


# ----------------------------------------------------------------------------- adaptive
@dataclass(frozen=True)
class Codebook(_Coded):
    """Adaptive codebook: θ = argmin ‖w − C[z]‖² over a k-entry codebook C and codes z (1-D k-means,
    exact up to n·(k − 2) ≤ exact_limit, else Lloyd + split refinement warm-started from `init`)."""

    k: int
    exact_limit: int = 2_000_000
    name = "codebook"

    def __post_init__(self) -> None:
        if isinstance(self.k, bool) or not isinstance(self.k, int) or not (1 <= self.k <= 65536):
            raise ConfigError(f"k={self.k!r} must be an integer in [1, 65536]")

    def compress(self, w: Tensor, init: Theta | None = None, *, mu: float | None = None) -> Theta:
        if w.numel() < self.k:
            raise ConfigError(f"codebook k={self.k} is more than the {w.numel()} weights it applies to")
        warm = init.get("codebook") if init else None
        c = kmeans_1d(w, self.k, warm, exact_limit=self.exact_limit)
        codes = assign(w.detach().double(), c).to(_codes_dtype(self.k))
        return {"codebook": c.to(w.dtype), "codes": codes}

    def decompress(self, theta: Theta, shape) -> Tensor:
        return theta["codebook"][theta["codes"].long()].reshape(shape)

    def bits(self, theta: Theta, shape) -> int:
        return self.k * dtype_bits(theta["codebook"]) + numel(shape) * code_bits(self.k)

    def summary(self, theta: Theta, shape) -> dict[str, Any]:
        return {"k": self.k, "bits_per_weight": code_bits(self.k)}

    def fanout(self, theta: Theta) -> dict[str, Tensor]:
        return {"codebook": torch.bincount(theta["codes"].reshape(-1).long(), minlength=self.k)}

    @property
    def levels(self) -> int:
        return self.k


# ----------------------------------------------------------------------------- fixed
@dataclass(frozen=True)
class FixedCodebook(_Coded):
    """Fixed codebook: θ = argmin ‖w − C[z]‖² over codes z, C given (nearest entry)."""

    values: tuple[float, ...]
    name = "fixed_codebook"

    def __post_init__(self) -> None:
        vals = tuple(self.values) if isinstance(self.values, (list, tuple)) else None
        if not vals or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in vals):
            raise ConfigError(f"values={self.values!r} must be a non-empty list of finite numbers")
        if len(set(vals)) != len(vals):
            raise ConfigError(f"values={self.values!r} has repeated entries")
        object.__setattr__(self, "values", tuple(sorted(float(v) for v in vals)))

    def _table(self, like: Tensor) -> Tensor:
        return torch.tensor(self.values, dtype=like.dtype if like.is_floating_point() else torch.float32,
                            device=like.device)

    def compress(self, w: Tensor, init: Theta | None = None, *, mu: float | None = None) -> Theta:
        codes = assign(w.detach(), self._table(w)).to(_codes_dtype(len(self.values)))
        return {"codes": codes}

    def decompress(self, theta: Theta, shape) -> Tensor:
        return self._table(theta["codes"])[theta["codes"].long()].reshape(shape)

    def bits(self, theta: Theta, shape) -> int:
        return numel(shape) * code_bits(len(self.values))

    def summary(self, theta: Theta, shape) -> dict[str, Any]:
        return {"k": len(self.values), "bits_per_weight": code_bits(len(self.values))}

    @property
    def levels(self) -> int:
        return len(self.values)


@dataclass(frozen=True)
class Binarize(FixedCodebook):
    """Binarization: θ = sign(w) ∈ {−1, 1} (zero goes to 1)."""

    values: tuple[float, ...] = (-1.0, 1.0)
    name = "binarize"


class _Scaled(_Coded):
    """Codes into a scaled fixed table c·T; θ = {"scale": (1,), "codes"}."""

    table: tuple[float, ...] = ()

    @property
    def levels(self) -> int:
        return len(self.table)

    def decompress(self, theta: Theta, shape) -> Tensor:
        s = theta["scale"]
        t = torch.tensor(self.table, dtype=s.dtype, device=s.device)
        return (s * t[theta["codes"].long()]).reshape(shape)

    def bits(self, theta: Theta, shape) -> int:
        return dtype_bits(theta["scale"]) + numel(shape) * code_bits(len(self.table))

    def summary(self, theta: Theta, shape) -> dict[str, Any]:
        return {"k": len(self.table), "scale": float(theta["scale"])}

    def fanout(self, theta: Theta) -> dict[str, Tensor]:
        zero = self.table.index(0.0) if 0.0 in self.table else -1
        return {"scale": (theta["codes"] != zero).sum().reshape(1)}


@dataclass(frozen=True)
class ScaledBinarize(_Scaled):
    """Scaled binarization: θ = argmin ‖w − c·z‖², z ∈ {−1, 1}: z = sign(w), c = mean |w|."""

    name = "scaled_binarize"
    table = (-1.0, 1.0)

    def compress(self, w: Tensor, init: Theta | None = None, *, mu: float | None = None) -> Theta:
        w = w.detach()
        return {"scale": w.abs().mean().reshape(1), "codes": (w >= 0).to(torch.uint8)}


@dataclass(frozen=True)
class ScaledTernary(_Scaled):
    """Scaled ternarization: θ = argmin ‖w − c·z‖², z ∈ {−1, 0, 1}, exact.

    With t nonzeros the best are the t largest |w| and c = their mean, leaving
    ‖w‖² − (Σ_top-t |w|)²/t; t is chosen to maximize (Σ_top-t |w|)²/t.
    """

    name = "scaled_ternary"
    table = (-1.0, 0.0, 1.0)

    def compress(self, w: Tensor, init: Theta | None = None, *, mu: float | None = None) -> Theta:
        w = w.detach()
        a = w.abs().reshape(-1)
        u, order = torch.sort(a, descending=True)  # (n,)
        cs = torch.cumsum(u.double(), 0)
        t = torch.arange(1, a.numel() + 1, device=w.device, dtype=torch.float64)
        best = int(torch.argmax(cs * cs / t))
        scale = (cs[best] / (best + 1)).to(w.dtype).reshape(1)
        nz = torch.zeros(a.numel(), dtype=torch.bool, device=w.device)
        nz[order[: best + 1]] = True
        codes = torch.where(nz, torch.where(w.reshape(-1) >= 0, 2, 0), 1).to(torch.uint8)
        return {"scale": scale, "codes": codes.reshape(w.shape)}
