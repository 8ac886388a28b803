"""How θ's parts are stored and rebuilt: part codecs for the container, decoders for ONNX graphs.

A scheme names a codec for each part of θ (`Scheme.codecs`); parts it does not name are stored
raw. The container asks the codec to encode a part and records the encoding's name in the
manifest; reading goes by that name (`decode_part`), so files describe themselves.

    raw      as is (kept values, codebooks, factors, scales)
    mask     sorted positions i ∈ [0, n) as a bit mask: ⌈n/8⌉ bytes, bit i mod 8 of byte ⌊i/8⌋
    delta    positions as gaps g₀ = i₀, gⱼ = iⱼ − iⱼ₋₁ − 1 in uint8/16/32; a gap g ≥ M = 2ᵇ − 1 is
             written as ⌊g/M⌋ escapes M followed by g mod M, so iⱼ = Σ_{t≤j}(gₜ + 1) − 1
    bitpack  codes z ∈ [0, 2ᵇ) at b = ⌈log₂ k⌉ bits each, least significant bit first, ⌈n·b/8⌉ bytes

For ONNX a scheme builds Δ(θ) from constants through a `GraphBuilder` (the exporter's; schemes
never import onnx). The helpers here are the shared decoders: bit-unpacking, code tables, sparse.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, Mapping, Protocol, Sequence

import numpy as np
import torch
from torch import Tensor

from .base import code_bits

_CHUNK = 1 << 20  # elements per bit-packing chunk, a multiple of 8 so chunks end on whole bytes
_UINTS = (np.uint8, np.uint16, np.uint32)


# ----------------------------------------------------------------------------- bit packing, gaps
def pack_bits(z: np.ndarray, b: int) -> np.ndarray:
    """Codes z (n,) with 0 ≤ z < 2ᵇ, b ≤ 16, as a little-endian bit stream (⌈n·b/8⌉,) uint8."""
    z = np.asarray(z).reshape(-1)
    out = []
    for s in range(0, z.size, _CHUNK):
        c = z[s:s + _CHUNK].astype("<u2")
        bits = np.unpackbits(c.view(np.uint8).reshape(-1, 2), axis=1, bitorder="little")[:, :b]  # (c, b)
        out.append(np.packbits(bits.reshape(-1), bitorder="little"))
    return np.concatenate(out) if out else np.zeros(0, np.uint8)


def unpack_bits(p: np.ndarray, n: int, b: int) -> np.ndarray:
    """Inverse of `pack_bits`: n codes (n,) uint16 from the stream p."""
    out = []
    for s in range(0, n, _CHUNK):
        c = min(_CHUNK, n - s)
        bits = np.unpackbits(p[s * b // 8:], count=c * b, bitorder="little").reshape(c, b)  # (c, b)
        bits = np.pad(bits, ((0, 0), (0, 16 - b)))
        out.append(np.packbits(bits, axis=1, bitorder="little").view("<u2").reshape(c))
    return np.concatenate(out) if out else np.zeros(0, np.uint16)


def _escaped_len(g: np.ndarray, dt: type) -> int:
    return int((g // np.iinfo(dt).max).sum()) + g.size


def delta_encode(idx: np.ndarray, dt: type) -> np.ndarray:
    """Strictly increasing positions (nnz,) as escaped gaps in the unsigned dtype dt."""
    g = np.diff(idx.astype(np.int64), prepend=-1) - 1  # (nnz,) ≥ 0
    M = np.iinfo(dt).max
    q = g // M
    out = np.full(int(q.sum()) + g.size, M, dtype=dt)
    out[np.cumsum(q + 1) - 1] = g % M
    return out


def delta_decode(x: np.ndarray) -> np.ndarray:
    """Positions (nnz,) int64 from escaped gaps: a gap is the sum of a run of escapes and its terminator."""
    if x.size and x[-1] == np.iinfo(x.dtype).max:
        raise ValueError("the gap stream ends in an escape")
    term = x != np.iinfo(x.dtype).max
    g = np.diff(np.cumsum(x, dtype=np.int64)[term], prepend=0)
    return np.cumsum(g + 1) - 1


def dtype_name(dt: torch.dtype) -> str:
    return str(dt).removeprefix("torch.")


def dtype_of(name: Any) -> torch.dtype:
    """The torch dtype named `name` ("float32"); ValueError for anything else."""
    dt = getattr(torch, name, None) if isinstance(name, str) else None
    if not isinstance(dt, torch.dtype):
        raise ValueError(f"unknown dtype {name!r} in the manifest")
    return dt


def _np_dtype(dt: torch.dtype) -> np.dtype:
    return torch.empty(0, dtype=dt).numpy().dtype


# ----------------------------------------------------------------------------- part codecs
class Codec:
    """Stores one θ part. `encode` picks one of `encodings`; `decode` reverses any of them."""

    encodings: ClassVar[tuple[str, ...]] = ("raw",)

    def encode(self, t: Tensor, n: int) -> tuple[Tensor, dict[str, Any]]:
        """(stored tensor, manifest entry) for part t (on the CPU, contiguous) of a group of n elements."""
        return t, {"enc": "raw", "dtype": dtype_name(t.dtype), "shape": list(t.shape)}

    def decode(self, s: Tensor, info: Mapping[str, Any], n: int) -> Tensor:
        """The part from its stored tensor `s`; ValueError naming what does not fit."""
        dt, shape = dtype_of(info.get("dtype")), tuple(info.get("shape", ()))
        if s.dtype != dt or tuple(s.shape) != shape:
            raise ValueError(f"is {dtype_name(s.dtype)} {tuple(s.shape)}, the manifest says {dtype_name(dt)} {shape}")
        return s


RAW = Codec()


def _plain(t: Tensor) -> bool:
    """Parts that no integer coding applies to: floating point, complex, bool, empty."""
    return t.is_floating_point() or t.is_complex() or t.dtype == torch.bool or t.numel() == 0


def _finish(out: np.ndarray, info: Mapping[str, Any]) -> Tensor:
    shape = tuple(info.get("shape", ()))
    if out.size != math.prod(shape):
        raise ValueError(f"decodes to {out.size} elements, the manifest says shape {shape}")
    return torch.from_numpy(out.astype(_np_dtype(dtype_of(info.get("dtype"))))).reshape(shape)


class Positions(Codec):
    """Sorted distinct positions in [0, n): a bit mask or escaped gaps, whichever is smaller."""

    encodings = ("mask", "delta")

    def encode(self, t: Tensor, n: int) -> tuple[Tensor, dict[str, Any]]:
        stored, info = RAW.encode(t, n)
        if _plain(t):
            return stored, info
        a = t.numpy().reshape(-1)
        if not (t.dim() == 1 and a[0] >= 0 and a[-1] < n and bool((np.diff(a) > 0).all())):
            return stored, info
        g = np.diff(a.astype(np.int64), prepend=-1) - 1
        sizes = {dt: _escaped_len(g, dt) * np.dtype(dt).itemsize for dt in _UINTS}
        best = min(sizes, key=sizes.get)
        if math.ceil(n / 8) <= sizes[best]:
            m = np.zeros(n, np.uint8)
            m[a] = 1
            return torch.from_numpy(np.packbits(m, bitorder="little")), {**info, "enc": "mask"}
        return torch.from_numpy(delta_encode(a, best)), {**info, "enc": "delta"}

    def decode(self, s: Tensor, info: Mapping[str, Any], n: int) -> Tensor:
        a = s.numpy()
        if info.get("enc") == "mask":
            if s.dtype != torch.uint8 or a.shape != (math.ceil(n / 8),):
                raise ValueError(f"is a {tuple(s.shape)} {dtype_name(s.dtype)} mask, expected ({math.ceil(n / 8)},) uint8")
            return _finish(np.flatnonzero(np.unpackbits(a, count=n, bitorder="little")), info)
        if a.dtype not in _UINTS or a.ndim != 1:
            raise ValueError(f"is {dtype_name(s.dtype)} {tuple(s.shape)}, expected 1-D uint8/16/32 gaps")
        out = delta_decode(a)
        if out.size and out[-1] >= n:
            raise ValueError(f"has position {out[-1]} beyond the group's {n} elements")
        return _finish(out, info)


class Codes(Codec):
    """Integer codes of a k-entry table, bit-packed at ⌈log₂ k⌉ bits (more if a code needs it)."""

    encodings = ("bitpack",)

    def __init__(self, k: int | None) -> None:
        self.k = k

    def encode(self, t: Tensor, n: int) -> tuple[Tensor, dict[str, Any]]:
        stored, info = RAW.encode(t, n)
        if t.dtype == torch.bool and t.numel():
            t = t.to(torch.uint8)  # bool codes pack at one bit; the manifest keeps the dtype
        if _plain(t):
            return stored, info
        a = t.numpy().reshape(-1)
        if not (a.min() >= 0 and a.max() < 1 << 16):
            return stored, info
        b = max(code_bits(self.k) if self.k else 1, int(a.max()).bit_length())
        return torch.from_numpy(pack_bits(a, b)), {**info, "enc": "bitpack", "bits": b}

    def decode(self, s: Tensor, info: Mapping[str, Any], n: int) -> Tensor:
        count, b = math.prod(info.get("shape", ())), info.get("bits")
        if not isinstance(b, int) or not 1 <= b <= 16 or s.dtype != torch.uint8 or tuple(s.shape) != (math.ceil(count * b / 8),):
            raise ValueError(f"is {dtype_name(s.dtype)} {tuple(s.shape)}, expected ({math.ceil(count * b / 8)},) "
                             f"uint8 for {count} codes of {b} bits" if isinstance(b, int) else f"has bits={b!r}")
        return _finish(unpack_bits(s.numpy(), count, b), info)


#: encoding name → a codec that reads it
DECODERS: dict[str, Codec] = {"raw": RAW, "mask": Positions(), "delta": Positions(), "bitpack": Codes(None)}


def decode_part(s: Tensor, info: Mapping[str, Any], n: int) -> Tensor:
    """A stored part back as θ's tensor, by the encoding its manifest entry names."""
    dtype_of(info.get("dtype"))
    enc = info.get("enc")
    if not isinstance(enc, str) or enc not in DECODERS:
        raise ValueError(f"has unknown encoding {enc!r}")
    try:
        return DECODERS[enc].decode(s, info, n)
    except ValueError:
        raise
    except (TypeError, KeyError, AttributeError, IndexError, RuntimeError, OverflowError) as e:
        raise ValueError(f"has a malformed {enc!r} entry ({type(e).__name__}: {e})") from None


# ----------------------------------------------------------------------------- ONNX decoders
class GraphBuilder(Protocol):
    """What a scheme's ONNX decoder may call (implemented by the exporter; ops by name, numpy data)."""

    def fresh(self, hint: str) -> str: ...
    def const(self, a: Any, hint: str = "c") -> str: ...
    def op(self, op_type: str, inputs: Sequence[str], out: str | None = None, **attrs: Any) -> str: ...
    def i64(self, *v: int) -> str: ...
    def initializer(self, name: str, a: np.ndarray) -> None: ...


def _np(t: Tensor) -> np.ndarray:
    return t.detach().cpu().numpy()


def onnx_unpack(b: GraphBuilder, stream: np.ndarray, n: int, w: int) -> str:
    """Decoder of n codes packed at w ∈ {1, 2, 4, 8, 16} bits → (n,) int64."""
    if w >= 8:
        return b.op("Cast", [b.const(stream.astype(np.uint8 if w == 8 else np.uint16), "codes")], to=np.int64)
    per = 8 // w
    x = b.op("Unsqueeze", [b.const(pack_bits(stream, w), "codes"), b.i64(1)])  # (bytes, 1)
    x = b.op("BitShift", [x, b.const(np.arange(per, dtype=np.uint8) * w, "shifts")], direction="RIGHT")  # (bytes, per)
    x = b.op("BitwiseAnd", [x, b.const(np.array((1 << w) - 1, np.uint8), "mask")])
    x = b.op("Slice", [b.op("Reshape", [x, b.i64(-1)]), b.i64(0), b.i64(n)])  # (n,)
    return b.op("Cast", [x], to=np.int64)


def onnx_codes(b: GraphBuilder, table: Tensor, codes: Tensor, shape: tuple[int, ...], out: str) -> str:
    """W = reshape(T[z]): the codes z unpacked from the narrowest width of 1/2/4/8/16 bits that
    holds them, T (k,) the value of each code."""
    k = table.numel()
    w = next(w for w in (1, 2, 4, 8, 16) if w >= code_bits(k))
    idx = onnx_unpack(b, _np(codes).reshape(-1), math.prod(shape), w)
    b.op("Reshape", [b.op("Gather", [b.const(_np(table), "table"), idx]), b.i64(*shape)], out)
    return f"codes/{w}bit"


def onnx_sparse(b: GraphBuilder, indices: Tensor, values: Tensor, shape: tuple[int, ...], out: str) -> str:
    """W from kept values and their sorted positions: gaps and W = ScatterElements(0, CumSum(gaps), v),
    or a bit mask m and W = Where(m, v[CumSum(m) − 1], 0), whichever is smaller."""
    n = math.prod(shape)
    idx, v = _np(indices).astype(np.int64), _np(values)
    if idx.size == 0:
        b.op("ConstantOfShape", [b.i64(*shape)], out, value=np.zeros(1, v.dtype))
        return "sparse/empty"
    gaps = np.diff(idx, prepend=0)  # (nnz,): i₀, then iⱼ − iⱼ₋₁ ≥ 1
    dt = next((d for d in (np.uint8, np.uint16, np.uint32) if gaps.max() <= np.iinfo(d).max), np.int64)
    vals = b.const(v, "values")
    if idx.size * np.dtype(dt).itemsize <= (n + 7) // 8:
        pos = b.op("CumSum", [b.op("Cast", [b.const(gaps.astype(dt), "gaps")], to=np.int64), b.i64(0)])
        zeros = b.op("ConstantOfShape", [b.i64(n)], value=np.zeros(1, v.dtype))
        b.op("Reshape", [b.op("ScatterElements", [zeros, pos, vals]), b.i64(*shape)], out)
        return f"sparse/delta-{np.dtype(dt).name}"
    m = np.zeros(n, np.uint8)
    m[idx] = 1
    m64 = onnx_unpack(b, m, n, 1)  # (n,) int64 ∈ {0, 1}
    rank = b.op("Max", [b.op("Sub", [b.op("CumSum", [m64, b.i64(0)]), b.i64(1)]), b.i64(0)])  # slot of each kept weight
    kept = b.op("Gather", [vals, rank])
    full = b.op("Where", [b.op("Cast", [m64], to=np.bool_), kept, b.const(np.zeros((), v.dtype), "zero")])
    b.op("Reshape", [full, b.i64(*shape)], out)
    return "sparse/mask"
