"""Quantization: adaptive codebooks (1-D k-means) and fixed codebooks.

θ = {"codebook": (k,), "codes": uint8 of w's shape} for an adaptive codebook; fixed codebooks
store only the codes (plus a scale for the scaled ones).
"""

from __future__ import annotations

import math
from dataclasses import InitVar, dataclass
from typing import Any, Callable

import numpy as np
import torch
from torch import Tensor

from ..errors import ConfigError
from .base import Scheme, Theta, code_bits, dtype_bits, numel
from .codecs import Codes, onnx_codes


def _codes_dtype(k: int) -> torch.dtype:
    return torch.uint8 if k <= 256 else torch.int32


# ----------------------------------------------------------------------------- 1-D k-means
# In 1-D the clusters of an optimal k-means are contiguous runs of the sorted data, so everything
# works on the sorted values xs: a cluster is a run xs[a:b], its mean and SSE come from prefix
# sums (`_Prefix`: exact, from float64 sums of blocks of 32). The C step is
#   1. sort (numpy's SIMD sort on the CPU, values only; torch.sort on a device);
#   2. summarize xs as m points (`summary_size`): its distinct values (then the summary is exact)
#      or runs of balanced squared error, each with its count, sum and sum of squares;
#   3. the exact DP over the m summary points (`_dp_splits`; optimal when they are the distinct
#      values, and then the answer) — or, warm, the partition of the last codebook;
#   4. Lloyd on the full data, O(k log n) per iteration by binary search of the midpoints (in
#      numpy on the CPU, where torch's per-call overhead would dominate);
#   5. the banded DP (`_banded`): all splits move jointly, coarse to fine, within bands; then fine
#      bands and Lloyd again while they lower the SSE (`_polish`);
#   6. codes by a table of cells (`assign`).
# Extra memory: the sorted copy, n/32 float64 block sums, temporaries of at most n/32 float64
# each (`_scratch`), and the codes.

_BLOCK = 32  # elements per block of the exact prefix sums (blocks of 1 up to 4,096 elements)
_DENSE_DP = 1024  # up to this many summary points the DP layers may be dense (m × m) tensor ops


def _scratch(n: int) -> int:
    """How many float64 values one temporary may hold: n/32 (a sixteenth of a float32 tensor's
    bytes), at least 2¹⁶; the few live at once keep the C step's extra memory a fraction of the
    tensor whatever k, the summary size or the band."""
    return max(n // 32, 1 << 16)


def _sorted_flat(x: Tensor) -> Tensor:
    """x flattened and sorted ascending, float32 (float64 stays), on x's device; values only."""
    v = x.detach().reshape(-1)
    if v.dtype != torch.float64:
        v = v.float()
    if v.device.type == "cpu":
        return torch.from_numpy(np.sort(v.numpy()))
    return torch.sort(v).values


class _Prefix:
    """Exact prefix sums Σ_{i<p} xs_i and Σ_{i<p} xs_i² at any positions p, from float64 sums of
    blocks of 32 values and the partial block read at each position (blocks of 1, plain prefix
    sums, for n ≤ 4,096). Extra memory: n/32 float64 pairs, an eighth of a float32 tensor."""

    def __init__(self, xs: Tensor) -> None:
        n = xs.numel()
        self.xs, self.n = xs, n
        self.block = b = 1 if n <= 1 << 12 else _BLOCK
        nb, self.full = -(-n // b), n // b
        s1 = torch.zeros(nb + 1, dtype=torch.float64, device=xs.device)  # filled in place: the
        s2 = torch.zeros(nb + 1, dtype=torch.float64, device=xs.device)  # allocator keeps no debris
        step = max(b, min(1 << 16, _scratch(n) // 4) // b * b)  # float64 copies of this many values at a time
        for a in range(0, n, step):
            c = xs[a:a + step].double()
            pad = (-c.numel()) % b
            if pad:
                c = torch.cat([c, c.new_zeros(pad)])
            c = c.view(-1, b)
            i = a // b + 1
            s1[i:i + c.shape[0]] = c.sum(1)
            s2[i:i + c.shape[0]] = torch.square(c).sum(1)  # c may be a view of xs (float64)
        self.S1, self.S2 = s1.cumsum_(0), s2.cumsum_(0)  # (nb+1,)
        self.offs = torch.arange(b, device=xs.device)
        self.rows = xs[:self.full * b].view(self.full, b)  # the full blocks, a view
        self.tail = None  # the last, partial block, zero-padded
        if n % b:
            self.tail = xs.new_zeros(b)
            self.tail[:n % b] = xs[self.full * b:]
        self.chunk = max(64, _scratch(n) // (2 * b))  # partial blocks read at a time

    def at(self, p: Tensor) -> tuple[Tensor, Tensor]:
        blk = torch.div(p, self.block, rounding_mode="floor")
        off = p - blk * self.block
        s1, s2 = self.S1[blk], self.S2[blk]
        if self.block == 1:
            return s1, s2
        inner = torch.nonzero(off).reshape(-1)  # positions inside a block add its first `off` values
        for a in range(0, inner.numel(), self.chunk):
            part = inner[a:a + self.chunk]
            bp = blk[part]
            v = self.rows.index_select(0, bp.clamp(max=max(self.full - 1, 0)))  # (≤chunk, block), a copy
            if self.tail is not None:
                v = torch.where((bp >= self.full)[:, None], self.tail, v)
            v = v.double().masked_fill_(self.offs >= off[part, None], 0.0)
            s1.index_add_(0, part, v.sum(1))
            s2.index_add_(0, part, v.square_().sum(1))
        return s1, s2


def _seg(s0: Tensor, s1: Tensor, s2: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """SSE about its mean of each run of summary points [a, b) (0 for an empty run); s0, s1, s2
    are the prefix counts, sums and sums of squares."""
    m = (s0[b] - s0[a]).clamp(min=1)
    d = s1[b] - s1[a]
    return s2[b] - s2[a] - d * d / m


def _backtrack(args: list[Tensor], p: list[int], device: torch.device,
               start: Callable[[int, int], int] = lambda a, j: a) -> Tensor:
    """Split points (k+1,) from the DP's argmins per layer, read on the host in one transfer: p
    holds the last splits found ([m, …]); start(arg, j) is where the cluster ending at j begins."""
    A = torch.stack(args).cpu() if args else None
    for c in range(len(args) - 1, -1, -1):
        p.append(start(int(A[c, p[-1]]), p[-1]))
    p.append(0)
    return torch.tensor(p[::-1], device=device)


def _dp_dense(s0: Tensor, s1: Tensor, s2: Tensor, k: int) -> Tensor:
    """Exact k-segmentation of m summary points, each DP layer one (m+1) × (m+1) min."""
    m = s0.numel() - 1
    i = torch.arange(m + 1, device=s0.device)
    cost = _seg(s0, s1, s2, i[:, None], i[None, :])  # cost[a, b] = SSE of [a, b)
    cost = torch.where(i[:, None] < i[None, :], cost, math.inf)  # non-empty runs only
    D, args = cost[0], []  # D_1(j) = SSE(0, j)
    for _ in range(2, k):
        D, A = (D[:, None] + cost).min(0)
        args.append(A)
    return _backtrack(args, [m, int(torch.argmin(D + cost[:, m]))] if k > 1 else [m], s0.device)


def _dp_short(s0: Tensor, s1: Tensor, s2: Tensor, k: int, B: int) -> Tensor | None:
    """The exact DP restricted to clusters of at most B summary points. Layer c (c clusters
    covering points [0, j)) is needed only at c ≤ j ≤ c·B with the m − j points left coverable
    by the other k − c clusters, a window of about k·B − m points; each layer is one add of a
    sliding window of the last (a view) to a slice of the (m+1) × B cost, and its min. Returns the
    split points, or None when a cluster of the answer has B points (then the restriction may
    have bitten, and the caller solves without it)."""
    m = s0.numel() - 1
    if k * B < m:
        return None
    dev = s0.device
    j = torch.arange(m + 1, device=dev)
    t = torch.arange(B, device=dev) - B
    cost = s1.new_empty(m + 1, B)  # cost[j, t] = SSE of [j − B + t, j), filled a slice of rows at a time
    rows = max(1, (1 << 13) // B)
    for a in range(0, m + 1, rows):
        jj = j[a:a + rows, None]
        i = jj + t  # starts of the last cluster, j−B … j−1
        cost[a:a + rows] = _seg(s0, s1, s2, i.clamp(min=0), jj.expand_as(i)).masked_fill_(i < 0, math.inf)
    D = torch.where(j <= B, _seg(s0, s1, s2, torch.zeros_like(j), j), math.inf)  # D_1(j): one cluster [0, j)
    D[0] = math.inf
    Dp = torch.cat([D.new_full((B,), math.inf), D])  # Dp[j + t] = D[j − B + t]
    args, los = [], []
    for c in range(2, k + 1):
        lo, hi = max(c, m - (k - c) * B), min(c * B, m - (k - c))  # the j that layer c needs
        v, a = (Dp[lo:hi + B].unfold(0, B, 1) + cost[lo:hi + 1]).min(1)
        Dp = torch.full_like(Dp, math.inf)
        Dp[B + lo:B + hi + 1] = v
        args.append(a.to(torch.uint8 if B <= 256 else torch.int16 if B < 1 << 15 else torch.int32))
        los.append(lo)
    if not math.isfinite(float(Dp[B + m])):
        return None
    A = torch.cat(args).cpu()  # one transfer
    offs = [0]
    for a in args:
        offs.append(offs[-1] + a.numel())
    p = [m]
    for c in range(k - 2, -1, -1):  # layer c+2 ended at p[-1]; its last cluster starts at j − B + arg
        p.append(p[-1] - B + int(A[offs[c] + p[-1] - los[c]]))
    p.append(0)
    p = torch.tensor(p[::-1], device=dev)
    return None if bool(((p[1:] - p[:-1]) >= B).any()) else p


def _dp_splits(s0: Tensor, s1: Tensor, s2: Tensor, k: int, scratch: int = 1 << 20) -> Tensor:
    """Exact 1-D k-means over m summary points: optimal split points (k+1,) by dynamic programming.

    D_c(j) = min_{i<j} D_{c−1}(i) + SSE(i, j); the best i is non-decreasing in j (the SSE is a
    Monge cost), so each layer is solved by divide and conquer, all subproblems of a recursion
    level batched into one tensor operation: O(k·m·log m). Layer 1 is closed form and layer k
    is needed at j = m only, so k = 2 costs O(m). Small m use dense layers (`_dp_dense`).
    """
    n = s1.numel() - 1
    if 2 < k and 8 * n <= k * 256:  # few points per cluster: clusters of ≤ 1.5×, 2×, 4× the mean length first
        for B in sorted({max(16, f * n // (2 * k) + 1) for f in (3, 4, 8)}):
            p = _dp_short(s0, s1, s2, k, B)
            if p is not None:
                return p
    if 2 < k and n <= _DENSE_DP and (n + 1) ** 2 <= scratch:  # dense layers: (m+1)² float64 each
        return _dp_dense(s0, s1, s2, k)
    dev = s1.device
    ar = lambda m: torch.arange(m, device=dev)  # noqa: E731
    D = _seg(s0, s1, s2, torch.zeros(n + 1, dtype=torch.long, device=dev), ar(n + 1))  # D_1(j) = SSE(0, j)
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
            v = D[i] + _seg(s0, s1, s2, i, jm[seg])
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
    last = int(i[torch.argmin(D[i] + _seg(s0, s1, s2, i, torch.full_like(i, n)))])
    return _backtrack(args, [n, last] if k > 1 else [n], dev)


def _dp_work(m: int, k: int, scratch: int) -> float:
    """Work of one DP layer over m summary points, in units of about 2 ns (measured, one thread)."""
    if 8 * m <= k * 256:  # clusters of at most B ≈ 1.5·m/k points, windows of k·B − m (`_dp_short`)
        B = max(16, 3 * m // (2 * k) + 1)
        return 1.5 * (min(m, k * B - m) + 1) * B + 25_000
    if m <= _DENSE_DP and (m + 1) ** 2 <= scratch:
        return m * m + 25_000
    return (m.bit_length() - 1) * (200_000 + 5 * m)  # divide and conquer


def summary_size(n: int, k: int) -> int:
    """How many summary points the DP gets: as many (up to 8192) as keep the DP's work within
    about a tenth of a torch.sort of n values (≈ 2.75·n·log₂n units; up to 65,536 values, tens of
    milliseconds whatever n), and at least 16 per cluster
    (at 16 the answer was within 1e-4 of the optimum on every distribution tried; at 8, 8e-4 at
    worst; at 4, a few 1e-3)."""
    if k <= 2:
        return min(n, 1 << 16)  # layer 1 is closed form, layer 2 one pass: O(m)
    budget = max(0.25 * n * n.bit_length(), (1 << 41) / n) / (k - 2)  # per layer
    m = 1 << 13
    while m > 16 * k and _dp_work(m, k, _scratch(n)) > budget:
        m //= 2
    return min(n, max(m, 16 * k))


def _summary(xs: Tensor, pre: _Prefix, m: int) -> tuple[bool, Tensor, Tensor, Tensor]:
    """xs as q ≤ m summary points: (exact, prefix counts, sums, sums of squares), each (q+1,).
    Exact: the runs of distinct values, when there are at most m. Else runs of balanced squared
    error: from m/4 runs of equal count, the eighth of the runs of largest SSE is halved (by
    count), again and again until there are m, so the sparse tails, whose few far values weigh most in a k-means, get as fine a
    summary as the dense middle does."""
    n = xs.numel()
    z = xs.new_zeros(1, dtype=torch.float64)
    step = max(1 << 16, _scratch(n) * 8)  # the changes counted a slice at a time: n/4 bools
    changes = sum(int(torch.count_nonzero(xs[a + 1:min(a + step, n - 1) + 1] != xs[a:min(a + step, n - 1)]))
                  for a in range(0, n - 1, step))
    if changes + 1 <= m:  # count first: the positions of n changes are 2n × 4 bytes
        change = torch.nonzero(xs[1:] != xs[:-1]).reshape(-1) + 1
        pos = torch.cat([change.new_zeros(1), change, change.new_full((1,), n)])
        v, cnt = xs[pos[:-1]].double(), (pos[1:] - pos[:-1]).double()  # a run's sum is value × count
        return True, pos.double(), torch.cat([z, torch.cumsum(v * cnt, 0)]), torch.cat([z, torch.cumsum(v * v * cnt, 0)])
    m = min(m, 8192)
    h, nb = max(1, m // 4), -(-n // pre.block)
    pos = (torch.div(torch.arange(h + 1, device=xs.device) * nb, h, rounding_mode="floor") * pre.block
           if h <= nb else torch.div(torch.arange(h + 1, device=xs.device) * n, h, rounding_mode="floor")).clamp(max=n)
    s1, s2 = pre.at(pos)
    while pos.numel() - 1 < m:
        cnt = (pos[1:] - pos[:-1]).double()
        d = s1[1:] - s1[:-1]
        sse = torch.where(cnt > 1, s2[1:] - s2[:-1] - d * d / cnt.clamp(min=1), -1.0)
        t = min(m - (pos.numel() - 1), int((sse > 0).sum()), max(1, (pos.numel() - 1) // 8))
        if t == 0:
            break
        top = torch.topk(sse, t).indices
        mid = (pos[top] + pos[top + 1]) // 2  # halve the runs of largest SSE
        m1, m2 = pre.at(mid)
        order = torch.argsort(torch.cat([pos, mid]), stable=True)
        pos, s1, s2 = torch.cat([pos, mid])[order], torch.cat([s1, m1])[order], torch.cat([s2, m2])[order]
    return False, pos.double(), s1, s2


def _lloyd(xs: Tensor, pre: _Prefix, c: Tensor, max_iter: int, tol: float = 1e-9) -> tuple[Tensor, float]:
    """Lloyd's algorithm on the full sorted data from centroids c (k,) float64: each iteration
    splits xs at the centroid midpoints (binary search) and moves each centroid to its run's mean,
    until the partition repeats or its SSE falls by less than `tol` (relative). Returns the split
    points (k+1,) of the final partition and its SSE. On the CPU the same iterations in numpy
    (`_lloyd_np`: a few µs each, where torch's per-call overhead makes them ten times slower)."""
    if xs.device.type == "cpu":
        return _lloyd_np(xs, pre, c.cpu().numpy(), max_iter, tol)
    n = xs.numel()
    ends = torch.tensor([0, n], device=xs.device)
    p, sse = None, math.inf
    for _ in range(max_iter):
        c = torch.sort(c).values
        mids = ((c[:-1] + c[1:]) / 2).to(xs.dtype)  # a value equal to a midpoint goes up, as in `assign`
        q = torch.cat([ends[:1], torch.searchsorted(xs, mids), ends[1:]])
        if p is not None and torch.equal(q, p):
            break
        s1, s2 = pre.at(q)
        cnt = (q[1:] - q[:-1]).double()
        d = s1[1:] - s1[:-1]
        new = float((s2[1:] - s2[:-1] - d * d / cnt.clamp(min=1)).sum())
        if new > sse:  # rounding at the last step: keep the better partition
            break
        p, done = q, sse - new <= tol * new
        sse = new
        c = torch.where(cnt > 0, d / cnt.clamp(min=1), c)
        if done:
            break
    return p, sse


def _at_np(pre: _Prefix, p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`_Prefix.at` in numpy, for a few positions p (int64) of a CPU tensor."""
    b = pre.block
    blk = p // b
    s1, s2 = pre.S1.numpy()[blk], pre.S2.numpy()[blk]
    if b > 1:
        v = pre.rows.numpy()[np.minimum(blk, max(pre.full - 1, 0))].astype(np.float64)  # (|p|, b)
        if pre.tail is not None:
            v[blk >= pre.full] = pre.tail.numpy()
        v[np.arange(b) >= (p - blk * b)[:, None]] = 0.0
        s1, s2 = s1 + v.sum(1), s2 + (v * v).sum(1)
    return s1, s2


def _lloyd_np(xs: Tensor, pre: _Prefix, c: np.ndarray, max_iter: int, tol: float) -> tuple[Tensor, float]:
    """`_lloyd` on a CPU tensor, in numpy; the same iterations and stopping rules."""
    x, n, k = xs.numpy(), xs.numel(), c.size
    q = np.zeros(k + 1, dtype=np.int64)
    q[-1] = n
    p, sse = None, math.inf
    for _ in range(max_iter):
        c = np.sort(c)
        q[1:-1] = np.searchsorted(x, ((c[:-1] + c[1:]) / 2).astype(x.dtype))  # a value at a midpoint goes up
        if p is not None and np.array_equal(q, p):
            break
        s1, s2 = _at_np(pre, q)
        cnt = np.diff(q).astype(np.float64)
        d = np.diff(s1)
        new = float((np.diff(s2) - d * d / np.maximum(cnt, 1)).sum())
        if new > sse:  # rounding at the last step: keep the better partition
            break
        p, done = q.copy(), sse - new <= tol * new
        sse = new
        c = np.where(cnt > 0, d / np.maximum(cnt, 1), c)
        if done:
            break
    return torch.from_numpy(p), sse


def _banded(xs: Tensor, pre: _Prefix, p: Tensor, width: int = 32, rounds: int = 12,
            fine: bool = False) -> tuple[Tensor, float]:
    """Polish split points p (k+1,) by the exact DP restricted to a band of `width` candidate
    positions around each inner split, coarse to fine: the first band of split c spans half way
    to its neighbours (`fine`: the `width` positions around it), each next one the last band's
    step around the new split, down to steps of one position (then the band held every position
    in it). Each round is the optimum over its bands, which hold the current splits, so the SSE
    never grows; Lloyd's local minima, where a split would have to move together with its
    neighbours, are left behind. Returns the split points and their SSE."""
    n, k = xs.numel(), p.numel() - 1
    if k < 2:
        return p, math.inf
    dev = xs.device
    if fine:
        span = torch.full((k - 1,), (width - 1) / 2, dtype=torch.float64, device=dev)
    else:
        span = torch.maximum(p[2:] - p[1:-1], p[1:-1] - p[:-2]).double() / 2  # (k−1,)
    lin = torch.linspace(-1, 1, width, dtype=torch.float64, device=dev)
    z, end = torch.zeros(1, device=dev, dtype=torch.long), torch.tensor([n], device=dev)
    e1, e2 = pre.at(torch.tensor([0, n], device=dev))

    def seg(pa, a1, a2, pb, b1, b2):  # SSE of runs [pa_i, pb_j) per layer: (L, |pa|, |pb|), in place
        d = b1[:, None, :] - a1[:, :, None]
        cnt = pb[:, None, :] - pa[:, :, None]
        v = b2[:, None, :] - a2[:, :, None]
        v.sub_(d.square_().div_(cnt.clamp(min=1))).clamp_(min=0)
        return v.masked_fill_(cnt < 0, math.inf)

    per = max(1, _scratch(n) // (width + 1) ** 2)  # layers of the chain whose costs are formed at once
    sse = math.inf
    for _ in range(rounds):
        cand = (p[1:-1, None].double() + span[:, None] * lin).round().long().clamp(0, n)  # (k−1, W)
        cand = torch.cat([cand, p[1:-1, None]], 1)  # the current split is always a candidate
        s1, s2 = pre.at(cand.reshape(-1))
        s1, s2 = s1.view(cand.shape), s2.view(cand.shape)
        D = seg(z[None], e1[None, :1], e2[None, :1], cand[:1], s1[:1], s2[:1])[0, 0]  # (W+1,) cost of the first cluster
        back = []
        for c0 in range(1, k - 1, per):  # costs of layers c0 … c0+per−1 in one batch
            c1 = min(k - 1, c0 + per)
            C = seg(cand[c0 - 1:c1 - 1], s1[c0 - 1:c1 - 1], s2[c0 - 1:c1 - 1], cand[c0:c1], s1[c0:c1], s2[c0:c1])
            for Cc in C:
                D, arg = (D[:, None] + Cc).min(0)
                back.append(arg)
            del C
        last = D + seg(cand[-1:], s1[-1:], s2[-1:], end[None], e1[None, 1:], e2[None, 1:])[0, :, 0]
        j = int(torch.argmin(last))
        new_sse = float(last[j])
        idx = _backtrack(back, [j], dev)[1:]  # the candidate chosen for each inner split
        q = torch.cat([z, cand[torch.arange(k - 1, device=dev), idx], end])
        step = span * 2 / (width - 1)
        if new_sse < sse:
            p, sse = q, new_sse
        if bool((step <= 1).all()):  # every position of every band was a candidate
            break
        span = torch.maximum(step, torch.ones_like(step))  # next band: ± one step of this one
    return p, sse


def kmeans_1d(x: Tensor, k: int, init: Tensor | None = None, *, bins: int | None = None,
              max_iter: int = 300) -> Tensor:
    """Codebook (k,) sorted, float64, minimizing Σᵢ minⱼ (xᵢ − cⱼ)² over a flat tensor x.

    Cold: the exact DP over a summary of the sorted data (its distinct values when there are at
    most `bins` of them — then the DP alone is the optimum — else runs of balanced squared error;
    default `summary_size(n, k)`), then `_polish` on the full data: Lloyd, the banded DP, fine
    bands and Lloyd again while the SSE falls. Warm (`init`, the last codebook (k,), k > 2):
    `_polish` from its partition, never worse than Lloyd from it. Runs on x's device.
    """
    xs = _sorted_flat(x)  # (n,)
    n = xs.numel()
    if n <= k:
        c = xs.double()
        return torch.cat([c, c[-1:].expand(k - n)]) if n else xs.new_zeros(k, dtype=torch.float64)
    pre = _Prefix(xs)
    warm = init is not None and init.numel() == k and k > 2  # k ≤ 2: the exact DP is as cheap as Lloyd
    if warm:  # a C step of LC: the partition of the last codebook (one Lloyd step), polished from there
        p, _ = _lloyd(xs, pre, init.detach().reshape(-1).to(xs.device, torch.float64), 1)
        p = _polish(xs, pre, p, max_iter)
    else:
        exact, s0, s1, s2 = _summary(xs, pre, bins or summary_size(n, k))
        q = s0.numel() - 1
        if exact and q <= k:  # at most k distinct values: one cluster each
            c = (s1[1:] - s1[:-1]) / (s0[1:] - s0[:-1])
            return torch.cat([c, c[-1:].expand(k - q)])
        sp = _dp_splits(s0, s1, s2, k, _scratch(n))  # (k+1,) in summary points
        p = s0[sp].round().long()  # the same splits, in positions of xs
        if not exact:  # a summary of runs: the DP's answer is near the optimum, polish it on the full data
            p = _polish(xs, pre, p, max_iter)
    return _means(xs, pre, p)


def _means(xs: Tensor, pre: _Prefix, p: Tensor) -> Tensor:
    """(k,) float64: the means of the runs xs[p_c : p_c+1] (an empty run: the value at p_c)."""
    t1, _ = pre.at(p)
    cnt = (p[1:] - p[:-1]).double()
    mean = (t1[1:] - t1[:-1]) / cnt.clamp(min=1)
    return torch.where(cnt > 0, mean, xs[p[:-1].clamp(max=xs.numel() - 1)].double())


def _polish(xs: Tensor, pre: _Prefix, p: Tensor, max_iter: int, passes: int = 16) -> Tensor:
    """Descend from split points p (k+1,): Lloyd from their means until its partition repeats,
    the banded DP coarse to fine, then fine passes (every position within 16 of each split, all
    splits jointly) and Lloyd again while they lower the SSE. Each step keeps the better
    partition, so the SSE never grows: never worse than Lloyd from p; the end is a fixed point of
    both."""
    p, _ = _lloyd(xs, pre, _means(xs, pre, p), max_iter)
    p, sse = _banded(xs, pre, p)
    for _ in range(passes):
        q, s = _banded(xs, pre, p, fine=True)
        if s < sse:
            p, sse = q, s
            continue
        q, s = _lloyd(xs, pre, _means(xs, pre, p), max_iter)
        if s < sse:
            p, sse = q, s
            continue
        break
    return p


def assign(w: Tensor, codebook: Tensor, dtype: torch.dtype = torch.int32) -> Tensor:
    """Index of the nearest entry of a sorted codebook, for each element of w (same shape), as
    `dtype` (a value at a midpoint goes up); computed a slice at a time, so nothing much wider
    than the result is held.

    For float32/64 weights by table: the midpoints' range is cut into 2¹⁶ equal cells, the cell
    of x is floor((x − lo)·s) (clamped), a monotone function of x computed the same way for the
    midpoints, so a midpoint in a lower cell is ≤ x and one in a higher cell > x: the code is the
    count of midpoints in lower cells (a table) plus those ≤ x in x's own cell, found by a few
    steps up. Exact, and several times faster than a binary search over 255 midpoints."""
    mid = ((codebook[:-1] + codebook[1:]) / 2).to(w.dtype)
    flat = w.reshape(-1)
    n = flat.numel()
    out = torch.empty(n, dtype=dtype, device=w.device)
    chunk = max(1 << 16, min(1 << 20, n // 16))
    table = _cell_table(mid) if w.dtype in (torch.float32, torch.float64) and n >= 1 << 14 else None
    for a in range(0, n, chunk):
        x = flat[a:a + chunk]
        if table is None:
            out[a:a + chunk] = torch.bucketize(x, mid, right=True, out_int32=True)
            continue
        cell, below, up, steps = table
        code = below[cell(x)]  # (chunk,) int32: midpoints in lower cells
        for _ in range(steps):  # the midpoints of x's own cell (at most `steps`), in order
            code += up[code] <= x
        out[a:a + chunk] = code
    return out.reshape(w.shape)


def _cell_table(mid: Tensor, cells: int = 1 << 16, max_steps: int = 6):
    """For `assign`: (cell function, midpoints below each cell (cells+2,) int32, midpoints padded
    with +inf, steps), or None when the midpoints crowd into few cells (then a binary search)."""
    if mid.numel() < 8 or not bool(torch.isfinite(mid).all()):  # a few midpoints: the binary search is as fast
        return None
    lo, hi = mid[0], mid[-1]
    if not bool(hi > lo):
        return None
    scale = torch.tensor(cells / (float(hi) - float(lo)), dtype=mid.dtype, device=mid.device)
    if not bool(torch.isfinite(scale)):
        return None

    def cell(x: Tensor) -> Tensor:  # monotone in x: rounding, floor and clamp all are
        return ((x - lo) * scale).floor_().clamp_(-1, cells).add_(1).int()

    cm = cell(mid)  # (k−1,) sorted, in 0 … cells+1
    steps = int(torch.bincount(cm.long(), minlength=cells + 2).max())
    if steps > max_steps:
        return None
    below = torch.searchsorted(cm, torch.arange(cells + 2, device=mid.device, dtype=cm.dtype), out_int32=True)
    up = torch.cat([mid, mid.new_full((1,), math.inf)])
    return cell, below, up, steps


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
    """Adaptive codebook: θ = argmin ‖w − C[z]‖² over a k-entry codebook C and codes z (1-D k-means
    by `kmeans_1d`: exact DP over a summary of the sorted weights, polished by Lloyd, warm-started
    from `init`). `bins` sets the summary size (0: automatic; exact when the weights have at
    most that many distinct values). `exact_limit` is accepted, and ignored, for old manifests."""

    k: int
    bins: int = 0
    exact_limit: InitVar[int | None] = None
    name = "codebook"

    def __post_init__(self, exact_limit: int | None = None) -> None:
        if isinstance(self.k, bool) or not isinstance(self.k, int) or not (1 <= self.k <= 65536):
            raise ConfigError(f"k={self.k!r} must be an integer in [1, 65536]")
        if isinstance(self.bins, bool) or not isinstance(self.bins, int) or self.bins < 0:
            raise ConfigError(f"bins={self.bins!r} must be an integer ≥ 0 (0: automatic)")

    def compress(self, w: Tensor, init: Theta | None = None, *, mu: float | None = None) -> Theta:
        if w.numel() < self.k:
            raise ConfigError(f"codebook k={self.k} is more than the {w.numel()} weights it applies to")
        warm = init.get("codebook") if init else None
        c = kmeans_1d(w, self.k, warm, bins=self.bins or None).to(w.dtype)
        return {"codebook": c, "codes": assign(w.detach(), c, _codes_dtype(self.k))}

    def decompress(self, theta: Theta, shape) -> Tensor:
        return theta["codebook"][theta["codes"].int()].reshape(shape)

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
