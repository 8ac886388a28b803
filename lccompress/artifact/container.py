"""Compressed safetensors container: a plain .safetensors file any reader opens.

    <name>           dense tensors (parameters no rule compresses, buffers), unchanged
    <group>.<part>   one tensor per θ part, in the smallest of these encodings:
      raw      as is (kept values, codebooks, factors, scales)
      mask     sorted positions i ∈ [0, n) as a bit mask: ⌈n/8⌉ bytes, bit i mod 8 of byte ⌊i/8⌋
      delta    positions as gaps g₀ = i₀, gⱼ = iⱼ − iⱼ₋₁ − 1 in uint8/16/32; a gap g ≥ M = 2ᵇ − 1 is
               written as ⌊g/M⌋ escapes M followed by g mod M, so iⱼ = Σ_{t≤j}(gₜ + 1) − 1
      bitpack  codes z ∈ [0, 2ᵇ) at b = ⌈log₂ k⌉ bits each, least significant bit first,
               ⌈n·b/8⌉ bytes
    __metadata__["lccompress"]   JSON manifest: format and versions, the recipe, per group the
                                 scheme, params, shapes, dtype, bits and part encodings, and a
                                 BLAKE2b-64 digest of every tensor's dtype, shape and bytes;
                                 its last field "manifest_digest" is BLAKE2b-64 of the rest
The digests detect corruption and inconsistent edits; they are not a signature (whoever can
write the file can recompute them).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import tempfile
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping

import numpy as np
import safetensors.torch
import torch
from safetensors import safe_open
from torch import Tensor, nn

from ..errors import LCError
from ..lc import Result
from ..recipe import Group, Recipe
from ..schemes.base import Scheme, Theta, code_bits, scheme_from_dict

FORMAT = "lccompress.artifact"
FORMAT_VERSION = 1
META_KEY = "lccompress"
DIGEST_FIELD = ',"manifest_digest":"'
_CHUNK = 1 << 20  # elements per bit-packing chunk, a multiple of 8 so chunks end on whole bytes
_UINTS = (np.uint8, np.uint16, np.uint32)


class ArtifactError(LCError, ValueError):
    """An artifact cannot be written or read: unreadable, tampered, inconsistent or unfit."""


# ----------------------------------------------------------------------------- bit packing
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


# ----------------------------------------------------------------------------- θ part encodings
def levels(scheme: Scheme, key: str) -> int | None:
    """Number k of distinct codes of θ part `key` ("codes", or "1.codes" of an additive term)."""
    head, _, rest = key.partition(".")
    if rest and head.isdigit() and isinstance(getattr(scheme, "terms", None), tuple):
        terms = scheme.terms
        return levels(terms[int(head)], rest) if int(head) < len(terms) else None
    for attr in ("k", "values", "table"):
        v = getattr(scheme, attr, None)
        if isinstance(v, int) and not isinstance(v, bool):
            return v
        if isinstance(v, tuple) and v:
            return len(v)
    return None


def _dtype_name(dt: torch.dtype) -> str:
    return str(dt).removeprefix("torch.")


def _dtype(name: Any) -> torch.dtype:
    dt = getattr(torch, name, None) if isinstance(name, str) else None
    if not isinstance(dt, torch.dtype):
        raise ArtifactError(f"unknown dtype {name!r} in the manifest")
    return dt


def _np_dtype(dt: torch.dtype) -> np.dtype:
    return torch.empty(0, dtype=dt).numpy().dtype


def encode_part(key: str, t: Tensor, n: int, k: int | None) -> tuple[Tensor, dict[str, Any]]:
    """One θ part as (stored tensor, manifest entry); n = numel of the group, k = code count."""
    t = t.detach().cpu().contiguous()
    info: dict[str, Any] = {"enc": "raw", "dtype": _dtype_name(t.dtype), "shape": list(t.shape)}
    last = key.rpartition(".")[2]
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool or t.numel() == 0:
        return t, info
    a = t.numpy().reshape(-1)
    if last == "indices" and t.dim() == 1 and a[0] >= 0 and a[-1] < n and bool((np.diff(a) > 0).all()):
        g = np.diff(a.astype(np.int64), prepend=-1) - 1
        sizes = {dt: _escaped_len(g, dt) * np.dtype(dt).itemsize for dt in _UINTS}
        best = min(sizes, key=sizes.get)
        if math.ceil(n / 8) <= sizes[best]:
            m = np.zeros(n, np.uint8)
            m[a] = 1
            return torch.from_numpy(np.packbits(m, bitorder="little")), {**info, "enc": "mask"}
        return torch.from_numpy(delta_encode(a, best)), {**info, "enc": "delta"}
    if last == "codes" and a.min() >= 0 and a.max() < 1 << 16:
        b = max(code_bits(k) if k else 1, int(a.max()).bit_length())
        return torch.from_numpy(pack_bits(a, b)), {**info, "enc": "bitpack", "bits": b}
    return t, info


def decode_part(s: Tensor, info: Mapping[str, Any], n: int) -> Tensor:
    """Inverse of `encode_part`; raises ValueError naming what does not fit."""
    enc, dt, shape = info.get("enc"), _dtype(info.get("dtype")), tuple(info.get("shape", ()))
    count = math.prod(shape)
    if enc == "raw":
        if s.dtype != dt or tuple(s.shape) != shape:
            raise ValueError(f"is {_dtype_name(s.dtype)} {tuple(s.shape)}, the manifest says {_dtype_name(dt)} {shape}")
        return s
    a = s.numpy()
    if enc == "mask":
        if s.dtype != torch.uint8 or a.shape != (math.ceil(n / 8),):
            raise ValueError(f"is a {tuple(s.shape)} {_dtype_name(s.dtype)} mask, expected ({math.ceil(n / 8)},) uint8")
        out = np.flatnonzero(np.unpackbits(a, count=n, bitorder="little"))
    elif enc == "delta":
        if a.dtype not in _UINTS or a.ndim != 1:
            raise ValueError(f"is {_dtype_name(s.dtype)} {tuple(s.shape)}, expected 1-D uint8/16/32 gaps")
        out = delta_decode(a)
        if out.size and out[-1] >= n:
            raise ValueError(f"has position {out[-1]} beyond the group's {n} elements")
    elif enc == "bitpack":
        b = info.get("bits")
        if not isinstance(b, int) or not 1 <= b <= 16 or s.dtype != torch.uint8 or a.shape != (math.ceil(count * b / 8),):
            raise ValueError(f"is {_dtype_name(s.dtype)} {tuple(s.shape)}, expected ({math.ceil(count * b / 8)},) "
                             f"uint8 for {count} codes of {b} bits" if isinstance(b, int) else f"has bits={b!r}")
        out = unpack_bits(a, count, b)
    else:
        raise ValueError(f"has unknown encoding {enc!r}")
    if out.size != count:
        raise ValueError(f"decodes to {out.size} elements, the manifest says shape {shape}")
    return torch.from_numpy(out.astype(_np_dtype(dt))).reshape(shape)


def encode_theta(group: Group, theta: Theta, dtype: torch.dtype | None = None) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """θ of a group as stored tensors {"<group>.<part>": tensor} and the group's manifest entry;
    `dtype` is the parameters' (default: that of θ's first floating-point part, else float32)."""
    n = group.shape.numel()
    stored, parts = {}, {}
    for key, t in theta.items():
        stored[f"{group.name}.{key}"], parts[key] = encode_part(key, t, n, levels(group.scheme, key))
    dtype = dtype or next((t.dtype for t in theta.values() if t.is_floating_point()), torch.float32)
    entry = {
        "scheme": group.scheme.to_dict(), "params": list(group.params), "shapes": [list(s) for s in group.shapes],
        "dtype": _dtype_name(dtype),
        "bits": sum(t.numel() * t.element_size() * 8 for t in stored.values()),
        "scheme_bits": int(group.bits(theta)), "parts": parts,
    }
    return stored, entry


# ----------------------------------------------------------------------------- save
def _digest(t: Tensor) -> str:
    """BLAKE2b-64 of a tensor's dtype, shape and bytes: a change to any of them changes it."""
    h = hashlib.blake2b(f"{_dtype_name(t.dtype)}{list(t.shape)}".encode(), digest_size=8)
    h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def _text_digest(s: str) -> str:
    return hashlib.blake2b(s.encode(), digest_size=8).hexdigest()


def atomic_write(path: str | os.PathLike, data: bytes) -> None:
    """Write a temp file in path's directory, fsync it, then os.replace: never a half-written file."""
    path = os.fspath(path)
    folder, base = os.path.split(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{base}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def save(path: str | os.PathLike, source: Any, thetas: Mapping[str, Theta] | None = None,
         groups: list[Group] | None = None, *, recipe: Recipe | None = None) -> int:
    """Write a compressed artifact; returns the bytes written.

    `source` is a `Result` (its model, θ and groups) or a model / state_dict with `thetas` and
    `groups`. Parameters in groups are stored as θ only; every other state_dict entry dense.
    """
    if isinstance(source, Result):
        thetas = source.thetas if thetas is None else thetas
        groups = source.groups if groups is None else groups
        source = source.model
    if thetas is None or groups is None:
        raise ArtifactError("save needs thetas and groups (or a Result)")
    sd = source.state_dict() if isinstance(source, nn.Module) else dict(source)
    compressed = {p for g in groups for p in g.params}
    if compressed - sd.keys():
        raise ArtifactError(f"compressed parameters {sorted(compressed - sd.keys())} are not in the model")
    tensors = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in sd.items() if k not in compressed}
    entries = {}
    for g in groups:
        if g.name not in thetas:
            raise ArtifactError(f"no θ for group {g.name!r}")
        stored, entries[g.name] = encode_theta(g, thetas[g.name], sd[g.params[0]].dtype)
        for name in stored.keys() & tensors.keys():
            raise ArtifactError(f"tensor name {name!r} of group {g.name!r} clashes with another tensor")
        tensors.update(stored)
    from .. import __version__  # late: the package may import this module before defining it

    manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, "lccompress_version": __version__,
                "recipe": recipe.to_dict() if recipe is not None else None, "groups": entries,
                "digests": {k: _digest(v) for k, v in tensors.items()}}
    text = json.dumps(manifest, separators=(",", ":"))
    data = safetensors.torch.save(tensors, metadata={META_KEY: seal(text)})
    atomic_write(path, data)
    return len(data)


# ----------------------------------------------------------------------------- load
@dataclass
class Artifact:
    """What `load` reads: θ and groups, the full state_dict (compressed params = Δ(θ)), the recipe.

    Unpacks as `thetas, groups, state_dict = load(path)`.
    """

    thetas: dict[str, Theta]
    groups: list[Group]
    state_dict: dict[str, Tensor]
    recipe: Recipe | None = None
    manifest: dict[str, Any] = field(default_factory=dict)

    def __iter__(self) -> Iterator[Any]:
        return iter((self.thetas, self.groups, self.state_dict))


def seal(text: str) -> str:
    """The manifest JSON with its own checksum appended as a last field. One metadata key only:
    safetensors writes its metadata from a hash map, so several keys come out in random order
    and the same artifact would not always be the same bytes."""
    return text[:-1] + f'{DIGEST_FIELD}{_text_digest(text)}"}}'


def unseal(value: str) -> str | None:
    """The manifest JSON without its checksum field, or None when the checksum does not match."""
    i = value.rfind(DIGEST_FIELD)
    if i < 0 or not value.endswith('"}'):
        return None
    text = value[:i] + "}"
    return text if value[i + len(DIGEST_FIELD):-2] == _text_digest(text) else None


def read_manifest(meta: Mapping[str, str] | None, path: Any) -> dict[str, Any]:
    """The manifest in safetensors metadata, checked for format and version."""
    if not meta or META_KEY not in meta:
        raise ArtifactError(f"{path} has no lccompress manifest (__metadata__[{META_KEY!r}]); it is not an lccompress artifact")
    text = unseal(meta[META_KEY])
    if text is None:
        raise ArtifactError(f"{path}: the manifest fails its checksum; the file is corrupted or was changed")
    try:
        m = json.loads(text)
    except json.JSONDecodeError as e:
        raise ArtifactError(f"{path}: the manifest is not valid JSON ({e})") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        got = m.get("format") if isinstance(m, dict) else m
        raise ArtifactError(f"{path}: the manifest's format is {got!r}, expected {FORMAT!r}")
    v = m.get("format_version")
    if not isinstance(v, int) or not 1 <= v <= FORMAT_VERSION:
        raise ArtifactError(f"{path}: format_version {v!r} is not supported (this lccompress reads 1..{FORMAT_VERSION})")
    if not isinstance(m.get("groups"), dict) or not isinstance(m.get("digests"), dict):
        raise ArtifactError(f"{path}: the manifest lacks its groups or digests")
    return m


def _group(name: str, e: Any, path: Any) -> Group:
    where = f"{path}: group {name!r}"
    if not isinstance(e, dict):
        raise ArtifactError(f"{where}: manifest entry is {e!r}, not an object")
    try:
        scheme = scheme_from_dict(e["scheme"])
        params = tuple(e["params"])
        shapes = tuple(torch.Size([int(d) for d in s]) for s in e["shapes"])
    except LCError as err:
        raise ArtifactError(f"{where}: {err}") from None
    except (KeyError, TypeError, ValueError) as err:
        raise ArtifactError(f"{where}: malformed manifest entry ({type(err).__name__}: {err})") from None
    if not params or len(params) != len(shapes) or not all(isinstance(p, str) for p in params):
        raise ArtifactError(f"{where}: params {list(params)} and shapes {[list(s) for s in shapes]} do not match")
    return Group(name, params, shapes, scheme)


def load(path: str | os.PathLike) -> Artifact:
    """Read and check an artifact written by `save`; every failure raises `ArtifactError`."""
    try:
        with safe_open(os.fspath(path), framework="pt") as f:
            meta = f.metadata()
            raw = {k: f.get_tensor(k) for k in f.keys()}
    except FileNotFoundError:
        raise
    except Exception as e:  # safetensors raises its own SafetensorError, OSError, ...
        raise ArtifactError(f"{path} is not a readable safetensors file: {e}") from None
    m = read_manifest(meta, path)
    digests = m["digests"]
    for k in digests:
        if k not in raw:
            raise ArtifactError(f"{path}: the manifest names tensor {k!r}, which is not in the file")
    for k, t in raw.items():
        if k not in digests:
            raise ArtifactError(f"{path}: tensor {k!r} is in the file but not in the manifest")
        if _digest(t.contiguous()) != digests[k]:
            raise ArtifactError(f"{path}: tensor {k!r} fails its checksum; the file is corrupted or was changed")
    thetas, groups, sd = {}, [], {}
    claimed: set[str] = set()
    for name, e in m["groups"].items():
        g = _group(name, e, path)
        parts = e.get("parts")
        if not isinstance(parts, dict):
            raise ArtifactError(f"{path}: group {name!r} has no parts in the manifest")
        th = {}
        for key, info in parts.items():
            tname = f"{name}.{key}"
            if tname not in raw:
                raise ArtifactError(f"{path}: the manifest names tensor {tname!r}, which is not in the file")
            try:
                th[key] = decode_part(raw[tname], info if isinstance(info, dict) else {}, g.shape.numel())
            except (ValueError, ArtifactError) as err:
                raise ArtifactError(f"{path}: tensor {tname!r} {err}") from None
            claimed.add(tname)
        try:
            dt = _dtype(e.get("dtype"))
            full = g.scheme.decompress(th, g.shape)
            if tuple(full.shape) != tuple(g.shape):
                raise ValueError(f"Δ(θ) has shape {tuple(full.shape)}")
            if "U" in th and th["U"].dim() == 2 and th["U"].shape[0] != g.shape[0]:
                raise ValueError(f"U has {th['U'].shape[0]} rows for {g.shape[0]} outputs")
        except Exception as err:
            raise ArtifactError(f"{path}: group {name!r} (scheme {g.scheme.name!r}) does not rebuild a tensor of "
                                f"shape {tuple(g.shape)}: {err}") from None
        for p, t in g.scatter(full).items():
            if p in sd:
                raise ArtifactError(f"{path}: parameter {p!r} is in two groups")
            sd[p] = t.to(dt).clone()
        thetas[name] = th
        groups.append(g)
    for k, t in raw.items():
        if k not in claimed:
            if k in sd:
                raise ArtifactError(f"{path}: parameter {k!r} is stored both dense and compressed")
            sd[k] = t
    recipe = None
    if m.get("recipe") is not None:
        try:
            recipe = Recipe.from_dict(m["recipe"])
        except LCError as err:
            raise ArtifactError(f"{path}: the manifest's recipe is invalid: {err}") from None
    return Artifact(thetas, groups, sd, recipe, m)


def load_into_(model: nn.Module, path: str | os.PathLike, *, split_lowrank: bool = False) -> nn.Module:
    """Fill `model` with an artifact's weights (compressed params = Δ(θ)); returns the model.

    With `split_lowrank`, low-rank Linear / Conv2d layers become two smaller layers
    (see `split_lowrank_`). The artifact must name exactly the model's state_dict entries.
    """
    art = load(path)
    own = model.state_dict()
    missing, extra = sorted(own.keys() - art.state_dict.keys()), sorted(art.state_dict.keys() - own.keys())
    if missing or extra:
        raise ArtifactError(f"{path} does not fit the model: missing {missing[:5]}{'…' if len(missing) > 5 else ''}, "
                            f"unexpected {extra[:5]}{'…' if len(extra) > 5 else ''}")
    for k, t in art.state_dict.items():
        if own[k].shape != t.shape:
            raise ArtifactError(f"{path}: tensor {k!r} has shape {tuple(t.shape)}, the model's is {tuple(own[k].shape)}")
    model.load_state_dict(art.state_dict)
    if split_lowrank:
        split_lowrank_(model, art.thetas, art.groups)
    return model


# ----------------------------------------------------------------------------- low rank layers
def split_lowrank_(model: nn.Module, thetas: Mapping[str, Theta], groups: list[Group]) -> list[str]:
    """Replace each low-rank nn.Linear / nn.Conv2d (groups=1) by two physically smaller layers.

    W = U V with U (out, r), V (r, in·kh·kw): Linear → Linear(in, r) + Linear(r, out);
    Conv2d → Conv2d(in, r, k, same stride/padding/dilation) + Conv2d(r, out, 1), bias on the
    second. Only where r(m + n) < mn (fewer weights and multiply-adds) and r ≥ 1. Outputs equal
    the unsplit layer's up to float rounding. Returns the names of the groups split.
    """
    done = []
    for g in groups:
        th = thetas.get(g.name, {})
        if len(g.params) != 1 or set(th) != {"U", "V"}:
            continue
        mod_name, _, leaf = g.params[0].rpartition(".")
        if leaf != "weight" or not mod_name:
            continue
        mod = model.get_submodule(mod_name)
        U, V = th["U"].detach(), th["V"].detach()  # (m, r), (r, n)
        (m, r), n = U.shape, V.shape[1]
        if r == 0 or r * (m + n) >= m * n:
            continue
        kw = {"device": mod.weight.device, "dtype": mod.weight.dtype}
        if type(mod) is nn.Linear:
            first = nn.Linear(mod.in_features, r, bias=False, **kw)
            second = nn.Linear(r, m, bias=mod.bias is not None, **kw)
        elif type(mod) is nn.Conv2d and mod.groups == 1:
            first = nn.Conv2d(mod.in_channels, r, mod.kernel_size, mod.stride, mod.padding, mod.dilation,
                              bias=False, padding_mode=mod.padding_mode, **kw)
            second = nn.Conv2d(r, m, 1, bias=mod.bias is not None, **kw)
        else:
            continue
        with torch.no_grad():
            first.weight.copy_(V.reshape(first.weight.shape))  # (r, in) or (r, in, kh, kw)
            second.weight.copy_(U.reshape(second.weight.shape))  # (out, r) or (out, r, 1, 1)
            if mod.bias is not None:
                second.bias.copy_(mod.bias)
        parent_name, _, child = mod_name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, nn.Sequential(first, second))
        done.append(g.name)
    return done
