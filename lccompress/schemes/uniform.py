"""Uniform integer grids: per-channel or blocked scales (and zero points), the format runtimes execute.

A weight (out, *rest) is seen as the matrix W (out, K), K = prod(rest); each row is split into
blocks of `group_size` columns along K (the last one shorter when group_size does not divide K),
or is one block when group_size = 0 (per output channel). Each block g has a scale s_g > 0 and an
integer zero point z_g ∈ [0, 2ᵇ − 1] (z_g = 2ᵇ⁻¹ when symmetric), and every weight in it is

    Δ = s_g · (q − z_g),   q ∈ {0, …, 2ᵇ − 1}

θ = {"codes": uint8 (out, K), "scale": (out, blocks), "zero": uint8 (out, blocks)} (no "zero"
when symmetric). This is ONNX Runtime's MatMulNBits and ONNX DequantizeLinear (blocked, int4 /
int8) layout, so the exporter maps θ onto them without re-quantizing.

The C step projects each block onto its grid family. With z fixed, the best codes round to the
nearest level and the error is piecewise quadratic in s, with a break wherever a weight's code
changes level; `_Sweep` walks those breaks in order and takes the exact best s within a window
around the min–max scale (or, warm, the last scale). Zero points are tried outward from
min–max's (or the last) while the error falls, and min–max rounding (the range including zero)
is always a candidate, so the result is never worse than it. Blocks are processed 2¹⁴ weights at
a time, vectorized. `axis=1` is for weights stored (in, out) (GPT-2's Conv1D): θ is then the
grid of the transpose, output channels first, as for every other layer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..errors import ConfigError
from .base import Scheme, Theta, dtype_bits, numel
from .codecs import Codes, onnx_unpack

GROUP_SIZES = (0, 16, 32, 64, 128, 256)
_ROWS = 1 << 14  # weights per chunk of the C step (its events: weights × (2ᵇ − 1))


def _blocks(w: Tensor, g: int) -> tuple[Tensor, int]:
    """W (out, K) as zero-padded blocks (out, nb, g) and the block length; g = 0: one block per row."""
    m, k = w.shape
    g = g or k
    nb = -(-k // g)
    if nb * g != k:
        w = torch.nn.functional.pad(w, (0, nb * g - k))  # padded zeros sit on the grid (q = z): no error, no pull
    return w.reshape(m, nb, g), g


def _minmax(x: Tensor, bits: int, symmetric: bool) -> tuple[Tensor, Tensor]:
    """Min–max (scale (G,), zero (G,)) of blocks x (G, g): the range including 0 spread over the
    levels; symmetric: the largest magnitude at level 2ᵇ⁻¹ − 1 (or −2ᵇ⁻¹ when it is negative)."""
    top = float(2 ** bits - 1)
    lo, hi = x.amin(1).clamp(max=0), x.amax(1).clamp(min=0)
    tiny = torch.finfo(torch.float32).tiny
    if symmetric:
        half = float(2 ** (bits - 1))
        amax = torch.maximum(-lo, hi)
        return torch.where(-lo >= hi, amax / half, amax / max(half - 1, 1.0)).clamp(min=tiny), torch.full_like(lo, half)
    s = ((hi - lo) / top).clamp(min=tiny)
    return s, torch.clamp(torch.round(-lo / s), 0, top)


class _Sweep:
    """For blocks x (G, g) and a window of scales [lo, hi] (G,) each: `best(z)` is the exact best
    scale in the window for zero points z (G,), and its error.

    With z fixed, as s falls each weight's offset d = q − z steps away from 0 by one level at
    s = |x|/(m − ½), m = 1, 2, …, until it reaches the grid's end (2ᵇ − 1 − z levels above z, z
    below). Between two consecutive steps the codes are fixed and the error Σx² − 2sA + s²B
    (A = Σ x d, B = Σ d²) is a parabola in s: its minimum over the interval is at A/B clamped to
    it. The codes at s = hi give the first A and B; one sort of the steps inside the window serves
    every z; each step adds |x| to A and 2m − 1 to B, or nothing when it is past z's end."""

    def __init__(self, x: Tensor, bits: int, lo: Tensor, hi: Tensor) -> None:
        self.x, self.top, self.lo, self.hi = x, 2 ** bits - 1, lo, hi
        self._steps()

    def _steps(self) -> None:
        x, top, lo, hi = self.x, self.top, self.lo, self.hi
        G, g = x.shape
        a = x.abs()
        self.m0 = m0 = torch.floor(a / hi[:, None] + 0.5)  # (G, g) steps already taken at s = hi
        m1 = torch.clamp(torch.floor(a / lo[:, None] + 0.5), max=top)  # the last step inside the window
        width = int(torch.clamp(m1 - m0, min=0).max()) if x.numel() else 0
        m = m0[:, :, None] + torch.arange(1, width + 1, dtype=x.dtype, device=x.device)  # (G, g, T) step numbers
        inside = m <= m1[:, :, None]
        steps = torch.where(inside, a[:, :, None] / (m - 0.5), lo[:, None, None]).reshape(G, -1)
        order = torch.argsort(steps, dim=1, descending=True)
        real = int(inside.reshape(G, -1).sum(1).max()) if x.numel() else 0
        order = order[:, :real]  # the padding sorts last (at s = lo): dropped
        self.s = torch.cat([hi[:, None], torch.gather(steps, 1, order)], 1)  # (G, 1 + steps), a no-op first
        del steps
        self.m = torch.cat([m.new_full((G, 1), top + 1),
                            torch.gather(torch.where(inside, m, top + 1).reshape(G, -1), 1, order)], 1)
        elem = torch.cat([order.new_zeros(G, 1), order // max(width, 1)], 1)  # the weight of each step
        self.a = torch.gather(a, 1, elem)
        self.pos = torch.gather(x > 0, 1, elem)
        self.nxt = torch.cat([self.s[:, 1:], lo[:, None]], 1)  # each interval: [nxt, s]
        self.x2 = x.pow(2).sum(1, keepdim=True)  # (G, 1)

    def best(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """(scale (G,), error (G,)) for zero points z (G,)."""
        x, top = self.x, self.top
        d0 = torch.where(x > 0, torch.minimum(self.m0, top - z[:, None]), -torch.minimum(self.m0, z[:, None]))  # offsets at hi
        A0, B0 = (x * d0).sum(1, keepdim=True), d0.pow(2).sum(1, keepdim=True)
        live = (self.m <= torch.where(self.pos, top - z[:, None], z[:, None])) & (self.a > 0)
        A = A0 + torch.cumsum(torch.where(live, self.a, 0.0), 1)
        B = B0 + torch.cumsum(torch.where(live, 2.0 * self.m - 1.0, 0.0), 1)
        sc = torch.minimum(torch.maximum(A / B.clamp(min=1e-300), self.nxt), self.s)
        e = torch.where(B > 0, self.x2 - 2 * sc * A + sc * sc * B, self.x2)
        k = torch.argmin(e, 1, keepdim=True)
        return torch.gather(sc, 1, k)[:, 0], torch.gather(e, 1, k)[:, 0]


def _fit(x: Tensor, bits: int, symmetric: bool, init: tuple[Tensor, Tensor] | None = None
         ) -> tuple[Tensor, Tensor, Tensor]:
    """(scale (G,), zero (G,) float of integers, error (G,)) for blocks x (G, g) float64.

    Cold: scales in [0.1, 2]·s₀ (s₀ the min–max scale; from 0.3·s₀ at 4 bits, [0.9, 1.6]·s₀ above, where the
    steps are many and clipping never pays), the exact best for each zero point, the zero points
    searched outward from min–max's while the error falls. Warm (`init`: the previous scale and
    zero point): scales in [0.7, 1.4] times the previous one, zero points from the previous one.
    Min–max rounding is always a candidate, so the result is never worse than it."""
    top = 2 ** bits - 1
    s0, z0 = _minmax(x, bits, symmetric)
    if init is not None:
        sp, zp = init[0].to(x.dtype), init[1].to(x.dtype)
        lo, hi = 0.7 * sp, 1.4 * sp
    else:
        zp = z0
        lo, hi = (0.1 * s0, 2.0 * s0) if bits <= 3 else (0.3 * s0, 2.0 * s0) if bits == 4 else (0.9 * s0, 1.6 * s0)
    tiny = torch.finfo(torch.float32).tiny
    lo, hi = lo.clamp(min=tiny), hi.clamp(min=2 * tiny)
    q0 = torch.clamp(torch.round(x / s0[:, None] + z0[:, None]), 0, top)
    best_s, best_z = s0, z0
    best = (x - s0[:, None] * (q0 - z0[:, None])).pow(2).sum(1)  # min–max rounding
    if symmetric:
        rounds = [z0]
    else:
        rounds = [torch.clamp(zp + d, 0, top) for d in (-1, 0, 1)]
    direction = torch.zeros_like(zp)
    sweep = _Sweep(x, bits, lo, hi)
    for _ in range(top + 1):
        moved = torch.zeros_like(best, dtype=torch.bool)
        for zc in rounds:
            sc, ec = sweep.best(zc)
            better = ec < best * (1 - 1e-12)
            direction = torch.where(better, torch.sign(zc - best_z), direction)
            moved |= better & (zc != best_z)
            best, best_s, best_z = torch.where(better, ec, best), torch.where(better, sc, best_s), torch.where(better, zc, best_z)
        if symmetric or not bool(moved.any()):
            break
        nz = torch.clamp(best_z + direction, 0, top)  # one more zero point in the direction that paid
        if bool((nz == best_z).all()):
            break
        rounds = [nz]
    return best_s, best_z, best


@dataclass(frozen=True, init=False)
class Uniform(Scheme):
    """Uniform b-bit grid per output channel (group_size 0) or per block of `group_size` weights
    along the input dimension, with a scale and (unless `symmetric`) an integer zero point each.

    Made as Uniform(bits=4, group_size=32, symmetric=False, axis=0); the width is kept as `.width`,
    since `Scheme.bits(θ, shape)` is the storage cost. `axis` is the output axis of a 2-D weight:
    0 for (out, in) (Linear), 1 for (in, out) (GPT-2's Conv1D)."""

    width: int
    group_size: int
    symmetric: bool
    axis: int
    name = "uniform"
    joinable = False
    onnx_opset = 21
    # with the general μ₀ = 0.07·κ (about 1e-3 on B2) LC ended 2–7 % away from the set after 30
    # steps; starting 50× higher (and the general growth) ends feasible and more accurate
    lc_defaults = {**Scheme.lc_defaults, "mu0": 0.05, "curvature_scale": 3.5}

    def __init__(self, bits: int = 4, group_size: int = 0, symmetric: bool = False, axis: int = 0) -> None:
        object.__setattr__(self, "width", bits)
        object.__setattr__(self, "group_size", group_size)
        object.__setattr__(self, "symmetric", symmetric)
        object.__setattr__(self, "axis", axis)
        self.__post_init__()

    def __post_init__(self) -> None:
        if isinstance(self.width, bool) or not isinstance(self.width, int) or not 2 <= self.width <= 8:
            raise ConfigError(f"bits={self.width!r} must be an integer in [2, 8]")
        if isinstance(self.group_size, bool) or self.group_size not in GROUP_SIZES:
            raise ConfigError(f"group_size={self.group_size!r} must be one of {', '.join(map(str, GROUP_SIZES))} "
                              "(0: per output channel)")
        if not isinstance(self.symmetric, bool):
            raise ConfigError(f"symmetric={self.symmetric!r} must be true or false")
        if self.axis not in (0, 1) or isinstance(self.axis, bool):
            raise ConfigError(f"axis={self.axis!r} must be 0 (weights stored (out, in)) or 1 ((in, out), "
                              "GPT-2's Conv1D)")

    def to_dict(self) -> dict[str, Any]:
        return {"scheme": self.name, "bits": self.width, "group_size": self.group_size, "symmetric": self.symmetric,
                **({"axis": self.axis} if self.axis else {})}

    def _out_first(self, w: Tensor) -> Tensor:
        """The weight with its output axis first: as is, or a 2-D (in, out) weight transposed (axis 1)."""
        if self.axis == 1:
            if w.dim() != 2:
                raise ConfigError(f"axis=1 applies to 2-D weights, got shape {tuple(w.shape)}")
            return w.T
        return w

    def _matrix(self, shape) -> tuple[int, int]:
        shape = tuple(shape)
        if self.axis == 1 and len(shape) == 2:
            return shape[1], shape[0]
        return (shape[0], math.prod(shape[1:])) if len(shape) >= 2 else (1, math.prod(shape))

    def blocks(self, shape) -> tuple[int, int]:
        """(blocks per row, weights per block) of a weight of this shape."""
        k = self._matrix(shape)[1]
        g = self.group_size or k
        return -(-k // g), g

    def compress(self, w: Tensor, init: Theta | None = None, *, mu: float | None = None) -> Theta:
        m, k = self._matrix(w.shape)
        x, g = _blocks(self._out_first(w.detach()).reshape(m, k), self.group_size)  # (m, nb, g)
        nb = x.shape[1]
        xs = x.reshape(m * nb, g)
        dt = w.dtype if w.is_floating_point() else torch.float32
        scale = torch.empty(m * nb, dtype=dt, device=w.device)
        zero = torch.empty(m * nb, dtype=torch.uint8, device=w.device)
        codes = torch.empty(m * nb, g, dtype=torch.uint8, device=w.device)
        warm = None
        if init and "scale" in init and init["scale"].shape == (m, nb):
            warm = (init["scale"].reshape(-1), self.zero_points(init).reshape(-1))
        step = max(1, _ROWS // g)
        for a in range(0, m * nb, step):
            xa = xs[a:a + step].double()
            s, z, _ = _fit(xa, self.width, self.symmetric, None if warm is None else (warm[0][a:a + step], warm[1][a:a + step]))
            s = s.to(dt)
            s = torch.where(s > 0, s, torch.finfo(dt).tiny)  # a scale that rounds to 0 in fp16
            q = torch.round(xa / s.double()[:, None] + z[:, None])
            scale[a:a + step], zero[a:a + step] = s, z.to(torch.uint8)
            codes[a:a + step] = torch.clamp(q, 0, 2 ** self.width - 1).to(torch.uint8)
        theta = {"codes": codes.reshape(m, nb * g)[:, :k].contiguous(),
                 "scale": scale.reshape(m, nb)}
        if not self.symmetric:
            theta["zero"] = zero.reshape(m, nb)
        return theta

    def zero_points(self, theta: Theta) -> Tensor:
        """z (out, blocks) as uint8: θ's, or 2ᵇ⁻¹ when symmetric."""
        if self.symmetric:
            return torch.full(theta["scale"].shape, 2 ** (self.width - 1), dtype=torch.uint8, device=theta["scale"].device)
        return theta["zero"]

    def decompress(self, theta: Theta, shape) -> Tensor:
        q, s = theta["codes"], theta["scale"]
        m, k = q.shape
        g = self.group_size or k
        col = torch.arange(k, device=q.device) // g  # block of each column
        z = self.zero_points(theta).to(s.dtype)
        w = s[:, col] * (q.to(s.dtype) - z[:, col])  # (out, K)
        return (w.T if self.axis == 1 and len(shape) == 2 else w).reshape(shape)

    def bits_of(self, shape, scale_bits: int) -> int:
        """Bits of θ for a weight of this shape with scales of `scale_bits`."""
        m, _ = self._matrix(shape)
        nb, _ = self.blocks(shape)
        return numel(shape) * self.width + m * nb * (scale_bits + (0 if self.symmetric else self.width))

    def bits(self, theta: Theta, shape) -> int:
        return self.bits_of(shape, dtype_bits(theta["scale"]))

    def summary(self, theta: Theta, shape) -> dict[str, Any]:
        return {"bits_per_weight": self.bits_of(shape, dtype_bits(theta["scale"])) / max(1, numel(shape)),
                "group_size": self.group_size, "symmetric": self.symmetric}

    def fanout(self, theta: Theta) -> dict[str, Tensor]:
        m, k = theta["codes"].shape
        g = self.group_size or k
        nb = theta["scale"].shape[1]
        per = torch.full((m, nb), g, dtype=torch.int64, device=theta["scale"].device)
        per[:, -1] = k - (nb - 1) * g
        return {"scale": per}

    def trainable(self, theta: Theta) -> list[str]:
        return ["scale"]

    def codecs(self, theta: Theta) -> dict[str, Any]:
        return {"codes": Codes(2 ** self.width), "zero": Codes(2 ** self.width)}

    def onnx_decode(self, b: Any, theta: Theta, shape: tuple[int, ...], out: str, *, dequantize: str = "qdq",
                    **options: Any) -> str:
        """W by DequantizeLinear (opset 21, `dequantize="qdq"`): codes as uint4 (b ≤ 4) or uint8,
        blocked along K (or per row), reshaped to the weight's shape; or ("fold") by arithmetic
        on constants, W = (codes − z)·s with the codes bit-packed at b bits, which onnxruntime
        folds into a dense weight at load. Linear / MatMul weights of 4 bits go to MatMulNBits
        instead (see `matmul_nbits`), chosen by the exporter."""
        q = theta["codes"].detach().cpu().numpy()
        s = theta["scale"].detach().cpu().numpy()
        z = self.zero_points(theta).cpu().numpy()
        m, k = q.shape
        nb = s.shape[1]
        g = self.group_size or k
        if dequantize == "fold":  # blocks (m, nb, g), the last padded with its zero point (decodes to 0)
            w = next(w for w in (1, 2, 4, 8) if w >= self.width)
            qp = np.repeat(z[:, :, None], g, axis=2).reshape(m, nb * g)
            qp[:, :k] = q
            codes = b.op("Cast", [onnx_unpack(b, qp.reshape(-1), m * nb * g, w)], to=s.dtype.type)
            zs = b.op("Cast", [b.const(z.reshape(m, nb, 1), "zero")], to=s.dtype.type)
            x = b.op("Mul", [b.op("Sub", [b.op("Reshape", [codes, b.i64(m, nb, g)]), zs]),
                             b.const(s.reshape(m, nb, 1), "scale")])
            x = b.op("Slice", [b.op("Reshape", [x, b.i64(m, nb * g)]), b.i64(0), b.i64(k), b.i64(1)])
            self._onnx_out(b, x, shape, out)
            return f"codes/{w}bit-uniform"
        kind = "uint4" if self.width <= 4 else "uint8"
        qs = b.qconst(q, kind, "codes")
        if nb == 1:  # per output channel: per-axis
            x = b.op("DequantizeLinear", [qs, b.const(s.reshape(m), "scale"), b.qconst(z.reshape(m), kind, "zero")], axis=0)
        else:
            x = b.op("DequantizeLinear", [qs, b.const(s, "scale"), b.qconst(z, kind, "zero")], axis=1, block_size=g)
        self._onnx_out(b, x, shape, out)
        return f"dequantize/{kind}" + (f"/g{g}" if nb > 1 else "/channel")

    def _onnx_out(self, b: Any, x: str, shape: tuple[int, ...], out: str) -> None:
        """The (out, K) matrix x as the weight of `shape`: transposed back for axis 1, reshaped otherwise."""
        if self.axis == 1 and len(shape) == 2:
            b.op("Transpose", [x], out, perm=[1, 0])
        else:
            b.op("Reshape", [x, b.i64(*shape)], out)

    def matmul_nbits(self, theta: Theta) -> dict[str, Any]:
        """θ in ONNX Runtime's MatMulNBits layout (weight (N, K) = (out, in)): B (N, blocks,
        block·bits/8) uint8, scales (N·blocks,), zero points packed per row, and the attributes.
        Per channel (group_size 0) becomes one block of K rounded up to a power of two ≥ 16."""
        q = theta["codes"].detach().cpu().numpy()
        s = theta["scale"].detach().cpu().numpy()
        z = self.zero_points(theta).cpu().numpy()
        n, k = q.shape
        bs = self.group_size or max(16, 1 << (k - 1).bit_length())
        nb = -(-k // bs)
        if s.shape[1] != nb:
            raise ValueError(f"{s.shape[1]} scales per row for {nb} blocks")
        qp = np.zeros((n, nb * bs), np.uint8)
        qp[:, :k] = q
        qp[:, k:] = z[:, -1:]  # padding decodes to 0
        per = 8 // self.width
        packed = _pack_rows(qp.reshape(n * nb, bs), self.width).reshape(n, nb, bs // per)
        zp = _pack_rows(z, self.width).reshape(-1)
        return {"B": packed, "scales": s.reshape(-1), "zero_points": zp,
                "attrs": {"K": k, "N": n, "bits": self.width, "block_size": bs}}


def _pack_rows(a: np.ndarray, bits: int) -> np.ndarray:
    """Rows of codes (r, c) at `bits` ∈ {2, 4, 8} per value, lowest bits first, each row padded
    to whole bytes: (r, ⌈c·bits/8⌉) uint8."""
    per = 8 // bits
    r, c = a.shape
    pad = (-c) % per
    a = np.pad(a.astype(np.uint8), ((0, 0), (0, pad))).reshape(r, -1, per)
    out = np.zeros(a.shape[:2], np.uint8)
    for i in range(per):
        out |= (a[:, :, i] << (bits * i)).astype(np.uint8)
    return out
