"""Compressed safetensors container: a plain .safetensors file any reader opens.

    <name>           dense tensors (parameters no rule compresses, buffers), unchanged
    <group>.<part>   one tensor per θ part, encoded by the codec its scheme names for it
                     (`Scheme.codecs`; raw, mask, delta, bitpack: see `schemes.codecs`)
    __metadata__["lccompress"]   JSON manifest: format and versions, the recipe, per group the
                                 scheme, params, shapes, dtype, bits and part encodings, the
                                 number of dense tensors ("dense"), and a BLAKE2b-64 digest of
                                 every tensor's dtype, shape and bytes;
                                 its last field "manifest_digest" is BLAKE2b-64 of the rest
The digests detect corruption and inconsistent edits; they are not a signature (whoever can
write the file can recompute them).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping

import safetensors.torch
import torch
from safetensors import safe_open
from torch import Tensor, nn

from ..errors import LCError
from ..recipe import Group, Recipe, UnitGroup, units_from_dict, units_to_dict
from ..schemes.base import Theta, scheme_from_dict
from ..schemes.codecs import RAW, decode_part, dtype_name, dtype_of
from ..util import atomic_write
from ..version import __version__

FORMAT = "lccompress.artifact"
FORMAT_VERSION = 1
META_KEY = "lccompress"
DIGEST_FIELD = ',"manifest_digest":"'
# Decoded weights per stored byte that `load` accepts. Real θs stay far below: a 1-bit codebook
# decodes 8 weights per byte, a mask 8, pruning at 0.1 % about 100–200, a rank-1 4096² layer 512.
MAX_EXPANSION = 4096
MIN_BUDGET = 256  # bytes: tiny files may still decode tiny models


class ArtifactError(LCError, ValueError):
    """An artifact cannot be written or read: unreadable, tampered, inconsistent or unfit."""


# ----------------------------------------------------------------------------- θ part encodings
def encode_theta(group: Group, theta: Theta, dtype: torch.dtype | None = None) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """θ of a group as stored tensors {"<group>.<part>": tensor} and the group's manifest entry;
    `dtype` is the parameters' (default: that of θ's first floating-point part, else float32)."""
    n = group.shape.numel()
    codecs = group.scheme.codecs(theta)
    stored, parts = {}, {}
    for key, t in theta.items():
        stored[f"{group.name}.{key}"], parts[key] = codecs.get(key, RAW).encode(t.detach().cpu().contiguous(), n)
    dtype = dtype or next((t.dtype for t in theta.values() if t.is_floating_point()), torch.float32)
    entry = {
        "scheme": group.scheme.to_dict(), "params": list(group.params), "shapes": [list(s) for s in group.shapes],
        "dtype": dtype_name(dtype),
        "bits": sum(t.numel() * t.element_size() * 8 for t in stored.values()),
        "scheme_bits": int(group.bits(theta)), "parts": parts,
    }
    if isinstance(group, UnitGroup):
        entry["units"] = [units_to_dict(u) for u in group.units]
    return stored, entry


# ----------------------------------------------------------------------------- save
def tied(sd: Mapping[str, Tensor], first: list[str] | None = None) -> dict[str, str]:
    """{alias: name} for state_dict entries that are the same tensor as another (tied weights, such
    as an output layer sharing the embedding's); the name kept is the first in `first` (default:
    state_dict order). Aliases are stored once and restored as views on load."""
    order = list(dict.fromkeys([*(first or []), *sd]))
    seen: dict[tuple, str] = {}
    out = {}
    for k in order:
        v = sd[k]
        if v.numel() == 0:
            continue
        key = (v.device, v.data_ptr(), tuple(v.shape), tuple(v.stride()), v.dtype)
        if key in seen:
            out[k] = seen[key]
        else:
            seen[key] = k
    return out


def cast_(model: nn.Module, thetas: Mapping[str, Theta], groups: list[Group],
          dtypes: Mapping[str, torch.dtype]) -> dict[str, Theta]:
    """Cast state_dict entries to `dtypes` (name → floating dtype, e.g. the checkpoint's fp16) in
    place; θ's floating parts take their group's dtype, and the compressed parameters are
    rebuilt from the cast θ exactly as `load` rebuilds them. Returns the cast θ."""
    own = dict(model.named_parameters(remove_duplicate=False))
    own.update(dict(model.named_buffers(remove_duplicate=False)))
    with torch.no_grad():
        for k, dt in dtypes.items():
            if k in own and own[k].is_floating_point() and own[k].dtype != dt:
                own[k].data = own[k].data.to(dt)
        out = {}
        for g in groups:
            dt = own[g.params[0]].dtype
            th = {k: (v.detach().to(dt) if v.is_floating_point() else v) for k, v in thetas[g.name].items()}
            for p, t in g.scatter(g.scheme.decompress(th, g.shape)).items():
                own[p].data = t.to(dt).clone().to(own[p].device)
            out[g.name] = th
    return out


def digest(t: Tensor) -> str:
    """BLAKE2b-64 of a tensor's dtype, shape and bytes: a change to any of them changes it."""
    h = hashlib.blake2b(f"{dtype_name(t.dtype)}{list(t.shape)}".encode(), digest_size=8)
    h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def _text_digest(s: str) -> str:
    return hashlib.blake2b(s.encode(), digest_size=8).hexdigest()


def save(path: str | os.PathLike, source: nn.Module | Mapping[str, Tensor], thetas: Mapping[str, Theta],
         groups: list[Group], *, recipe: Recipe | None = None) -> int:
    """Write a compressed artifact; returns the bytes written.

    `source` is the model (or its state_dict), `thetas` θ per group. Parameters in groups are
    stored as θ only; every other state_dict entry dense.
    """
    sd = source.state_dict() if isinstance(source, nn.Module) else dict(source)
    compressed = {p for g in groups for p in g.params}
    if compressed - sd.keys():
        raise ArtifactError(f"compressed parameters {sorted(compressed - sd.keys())} are not in the model")
    aliases = tied(sd, first=[*compressed, *sd])
    tensors = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in sd.items()
               if k not in compressed and k not in aliases}
    entries, dense = {}, len(tensors)
    for g in groups:
        if g.name not in thetas:
            raise ArtifactError(f"no θ for group {g.name!r}")
        stored, entries[g.name] = encode_theta(g, thetas[g.name], sd[g.params[0]].dtype)
        for name in stored.keys() & tensors.keys():
            raise ArtifactError(f"tensor name {name!r} of group {g.name!r} clashes with another tensor")
        tensors.update(stored)
    manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, "lccompress_version": __version__,
                "recipe": recipe.to_dict() if recipe is not None else None, "groups": entries,
                "dense": dense, "digests": {k: digest(v) for k, v in tensors.items()}}
    if aliases:
        manifest["aliases"] = aliases
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
    if not isinstance(e.get("params"), list) or not isinstance(e.get("shapes"), list):
        raise ArtifactError(f"{where}: params {e.get('params')!r} and shapes {e.get('shapes')!r} are not lists")
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
    if "units" in e:
        try:
            units = tuple(units_from_dict(u) for u in e["units"])
            g = UnitGroup(name, params, shapes, scheme, units)
            sizes = dict(zip(params, shapes))
            for u in units:
                for sl in u.producers:
                    if sl.name not in sizes or sl.dim >= len(sizes[sl.name]) or \
                            sl.offset + u.channels * sl.per > sizes[sl.name][sl.dim]:
                        raise ValueError(f"slice {sl} does not fit the group's parameters")
            g.shape  # noqa: B018 - the slices fit the shapes
        except (LCError, TypeError, ValueError, KeyError, IndexError, RuntimeError) as err:
            raise ArtifactError(f"{where}: malformed structured units ({err})") from None
        return g
    return Group(name, params, shapes, scheme)


#: encodings of integer parts: positions (< the group's size) and codes (< 2^bits)
_INTEGER_ENCODINGS = ("mask", "delta", "bitpack")
_INTEGER_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.uint16, torch.uint32,
                   torch.uint64)


def _decode(s: Tensor, info: Any, n: int, where: str) -> Tensor:
    """`decode_part`, and a part whose manifest dtype is not one its codec writes is refused: the
    integer encodings hold integer parts (codes also bool), in a dtype that holds every value."""
    if not isinstance(info, dict) or "enc" not in info or "dtype" not in info:
        raise ArtifactError(f"{where} has manifest entry {info!r}, without the encoding and dtype it needs")
    enc = info["enc"]
    try:
        dt = dtype_of(info["dtype"])
    except ValueError:
        raise ArtifactError(f"{where} has dtype {info['dtype']!r} in the manifest, which is not a dtype") from None
    try:
        if enc not in _INTEGER_ENCODINGS:
            return decode_part(s, info, n)
        if dt == torch.bool and enc == "bitpack":
            lo, hi = 0, 1
        elif dt in _INTEGER_DTYPES:
            lo, hi = torch.iinfo(dt).min, torch.iinfo(dt).max
        else:  # floating point, complex, quantized, …: never what these encodings hold
            raise ValueError(f"is {enc}-encoded, which holds integers, but the manifest gives it dtype {dtype_name(dt)}")
        bits = info.get("bits")
        top = n - 1 if enc != "bitpack" else (1 << bits) - 1 if isinstance(bits, int) and 0 < bits <= 16 else None
        if top is None or top <= hi:  # every value the encoding can hold fits (bad bits: decode_part's error)
            return decode_part(s, info, n)
        wide = decode_part(s, {**info, "dtype": "int64"}, n)  # only where a value could wrap around
        if wide.numel() and (int(wide.min()) < lo or int(wide.max()) > hi):
            raise ValueError(f"holds values up to {int(wide.max())}, which its manifest dtype {dtype_name(dt)} "
                             "cannot hold")
        return wide.to(dt)
    except ValueError as err:
        raise ArtifactError(f"{where} {err}") from None


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
        if digest(t.contiguous()) != digests[k]:
            raise ArtifactError(f"{path}: tensor {k!r} fails its checksum; the file is corrupted or was changed")
    thetas, groups, sd = {}, [], {}
    claimed: set[str] = set()
    parsed = {name: _group(name, e, path) for name, e in m["groups"].items()}
    stored = sum(t.numel() * t.element_size() for t in raw.values())
    claim = sum(g.shape.numel() for g in parsed.values())
    if claim > MAX_EXPANSION * max(stored, MIN_BUDGET):  # before anything is decoded or allocated
        raise ArtifactError(f"{path}: the manifest claims {claim:,} weights from {stored:,} stored bytes, more than "
                            f"{MAX_EXPANSION:,} per byte; the manifest is corrupted or forged")
    for name, e in m["groups"].items():
        g = parsed[name]
        parts = e.get("parts")
        if not isinstance(parts, dict):
            raise ArtifactError(f"{path}: group {name!r} has no parts in the manifest")
        th = {}
        for key, info in parts.items():
            tname = f"{name}.{key}"
            if tname not in raw:
                raise ArtifactError(f"{path}: the manifest names tensor {tname!r}, which is not in the file")
            th[key] = _decode(raw[tname], info, g.shape.numel(), f"{path}: tensor {tname!r}")
            claimed.add(tname)
        try:
            dt = dtype_of(e.get("dtype"))
        except ValueError as err:
            raise ArtifactError(f"{path}: group {name!r}: {err}") from None
        if not dt.is_floating_point:  # recipes compress floating-point parameters only
            raise ArtifactError(f"{path}: group {name!r} has dtype {dtype_name(dt)}; compressed parameters are "
                                "floating point, so the manifest is corrupted or was changed")
        try:
            full = g.scheme.decompress(th, g.shape)
            if tuple(full.shape) != tuple(g.shape):
                raise ValueError(f"Δ(θ) has shape {tuple(full.shape)}")
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
    dense = m.get("dense")  # absent in files written before it was recorded
    if dense is not None:
        unclaimed = sorted(k for k in raw if k not in claimed)
        if isinstance(dense, bool) or not isinstance(dense, int) or dense != len(unclaimed):
            raise ArtifactError(f"{path}: {len(unclaimed)} tensors are not part of any group, the manifest counts "
                                f"{dense!r} dense ones (a group's entry was removed or changed; unclaimed: "
                                f"{', '.join(unclaimed[:4])}{', …' if len(unclaimed) > 4 else ''})")
    aliases = m.get("aliases", {})
    if not isinstance(aliases, dict) or not all(isinstance(a, str) and isinstance(b, str) for a, b in aliases.items()):
        raise ArtifactError(f"{path}: the manifest's aliases are malformed")
    for alias, name in aliases.items():
        if name not in sd or alias in sd:
            raise ArtifactError(f"{path}: alias {alias!r} of {name!r} does not name one stored tensor")
        sd[alias] = sd[name]
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
    second. Only where r(m + n) < mn (fewer weights and multiply-adds) and r ≥ 1, for schemes
    whose Δ(θ) is such a product (`Scheme.factors`). Outputs equal the unsplit layer's up to
    float rounding. Returns the names of the groups split.
    """
    done = []
    for g in groups:
        uv = g.scheme.factors(thetas[g.name]) if g.name in thetas else None
        if len(g.params) != 1 or uv is None:
            continue
        mod_name, _, leaf = g.params[0].rpartition(".")
        if leaf != "weight" or not mod_name:
            continue
        mod = model.get_submodule(mod_name)
        U, V = (t.detach() for t in uv)  # (m, r), (r, n)
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
