"""One checkpoint, many levels: nested compression levels in a single safetensors file.

The file holds the weights once plus, per unit (a weight, a filter = a row of the (out, in·kh·kw)
matrix, or a singular triplet), the highest level at which it survives as a uint8 `level id`.
Levels j = 1 … L keep the fractions keeps[0] > keeps[1] > … of the units; level 0 is the dense
model. Level j keeps exactly the units with id ≥ j, and the sets are nested, so extraction is a
mask (no retraining):

    <name>              every state_dict entry, dense, as is (for structure="rank" the compressed
                        weights are stored as their SVD instead: <name>.U (m, q), <name>.S (q,),
                        <name>.Vh (q, n), q = min(m, n), and W = U·diag(S)·Vh)
    <name>.level        uint8 level ids: weight's shape ("weight"), (out,) ("filter"), (q,) ("rank")
    __metadata__["lccompress.multilevel"]   JSON: format, version, structure, scope, the levels
                        [{"level": j, "keep": keeps[j−1]}], per parameter its shape, the number of
                        other (dense) tensors, a BLAKE2b-64 digest of every tensor, sealed by a
                        digest of the JSON itself (as the compressed artifact's manifest;
                        version 1 files, unsealed, still read), and, when the model ties weights,
                        "aliases": {alias: name} (as the artifact's manifest: `container.tied`)

A state_dict entry that is the same tensor as another (an output layer tied to the embedding) is
stored once, under the leveled parameter's name when one of them is leveled, and its alias is
recorded; `extract` returns the alias as that very tensor, so a tied model loads the level's
weights whichever of the two names it copies last. Files without "aliases" read as before.

Reading validates everything before use: the seal and digests, the metadata's types, every
parameter's tensors and their shapes against the metadata (so no decode allocates more than the
file's tensors imply), that no level or factor tensor is left that no parameter names (the
count of dense tensors), and that each of at most MAX_ALIASES aliases names a parameter or dense
tensor and is none itself; every failure is an `ArtifactError`.

Within a scope (all parameters together, "global", or each alone, "layer") the units are ranked
by score (|w|, row ℓ2 norm, σ), ties by position; level j keeps the first κⱼ = max(1, round(keepⱼ·N)).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Sequence

import safetensors.torch
import torch
from safetensors import safe_open
from torch import Tensor, nn

from ..errors import ConfigError
from ..util import as_matrix, atomic_write, kappa
from .container import ArtifactError, digest, seal, tied, unseal

FORMAT = "lccompress.multilevel"
FORMAT_VERSION = 2
META_KEY = "lccompress.multilevel"
STRUCTURES = ("weight", "filter", "rank")
SUFFIXES = (".level", ".U", ".S", ".Vh")
MAX_ALIASES = 65536  # tied state_dict entries a file may record (real models tie a handful)


@dataclass(frozen=True)
class Levels:
    """Nested levels: per parameter, the uint8 id of the last level each unit survives."""

    keeps: tuple[float, ...]
    ids: dict[str, Tensor]
    structure: str = "weight"
    scope: str = "global"

    def mask(self, name: str, level: int) -> Tensor:
        """Boolean mask of the units of `name` kept at `level` (all of them at level 0)."""
        _check_level(level, len(self.keeps))
        return self.ids[name] >= level


def _check_level(level: Any, n: int) -> None:
    if isinstance(level, bool) or not isinstance(level, int) or not 0 <= level <= n:
        raise ConfigError(f"level={level!r} must be an integer in 0…{n} (0 = dense)")


def _scores(w: Tensor, structure: str) -> Tensor:
    """One score per unit, in the unit order of the level ids."""
    w = w.detach().double()
    if structure == "weight":
        return w.abs().reshape(-1)
    if structure == "filter":
        return as_matrix(w, "structure 'filter' / 'rank'").norm(dim=1)
    return torch.linalg.svdvals(as_matrix(w, "structure 'filter' / 'rank'"))


def _ids(scores: Tensor, kappas: Sequence[int]) -> Tensor:
    """uint8 id per unit: the number of levels whose top-κ (by score, ties by position) holds it."""
    order = torch.sort(scores, descending=True, stable=True).indices
    pos = torch.empty_like(order)
    pos[order] = torch.arange(order.numel(), device=order.device)
    ids = torch.zeros(order.numel(), dtype=torch.uint8, device=order.device)
    for k in kappas:
        ids += (pos < k).to(torch.uint8)
    return ids


def build_levels(
    model: nn.Module,
    params: str | Sequence[str],
    keeps: Sequence[float] = (0.5, 0.2, 0.1, 0.05),
    *,
    scope: str = "global",
    structure: str = "weight",
) -> Levels:
    """Nested magnitude levels: level j keeps the fraction keeps[j−1] of the units of `params`,
    ranked over all of them ("global") or per tensor ("layer"); keeps strictly decreasing."""
    if structure not in STRUCTURES:
        raise ConfigError(f"structure={structure!r} must be one of {', '.join(STRUCTURES)}")
    if scope not in ("global", "layer"):
        raise ConfigError(f"scope={scope!r} must be 'global' or 'layer'")
    keeps = tuple(keeps)
    if not keeps or len(keeps) > 255:
        raise ConfigError(f"keeps={list(keeps)!r} must hold 1 to 255 fractions")
    for a in keeps:
        if isinstance(a, bool) or not isinstance(a, (int, float)) or not 0 < a <= 1:
            raise ConfigError(f"keep {a!r} in keeps must be a fraction in (0, 1]")
    if any(b >= a for a, b in zip(keeps, keeps[1:])):
        raise ConfigError(f"keeps={list(keeps)!r} must be strictly decreasing (nested levels)")
    named = dict(model.named_parameters())
    names = [params] if isinstance(params, str) else list(params)
    every = dict(model.named_parameters(remove_duplicate=False))
    for n in names:
        if n not in named and n in every:  # tied: named_parameters lists the first name only
            first = next(k for k, p in named.items() if p is every[n])
            raise ConfigError(f"{n!r} is tied to {first!r} (one parameter); name {first!r}")
        if n not in named:
            raise ConfigError(f"{n!r} is not a parameter; parameters are: {', '.join(named)}")
    if len(set(names)) != len(names) or not names:
        raise ConfigError(f"params={names!r} must name distinct parameters")
    scores = {n: _scores(named[n], structure) for n in names}
    kappas = lambda N: [kappa(N, keep=a) for a in keeps]  # noqa: E731
    if scope == "layer":
        flat = {n: _ids(s, kappas(s.numel())) for n, s in scores.items()}
    else:
        allv = torch.cat([scores[n] for n in names])
        split = torch.split(_ids(allv, kappas(allv.numel())), [scores[n].numel() for n in names])
        flat = dict(zip(names, split))
    ids = {n: (t.reshape(named[n].shape) if structure == "weight" else t).cpu() for n, t in flat.items()}
    return Levels(keeps, ids, structure, scope)


def save_multilevel(path: str | os.PathLike, model: nn.Module, levels: Levels) -> int:
    """Write the model's state_dict once plus the level ids (atomically: temp file + os.replace);
    returns the bytes written. Tied entries (one tensor under two names) are stored once, as the
    leveled parameter where one of them is, and recorded as aliases."""
    state = model.state_dict()
    aliases = tied(state, first=[*levels.ids, *state])
    if len(aliases) > MAX_ALIASES:
        raise ConfigError(f"the model ties {len(aliases)} state_dict entries to others; a multi-level file "
                          f"records at most {MAX_ALIASES}")
    sd = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in state.items() if k not in aliases}
    tensors: dict[str, Tensor] = {}
    shapes = {}
    for n, ids in levels.ids.items():
        if n in aliases:
            raise ConfigError(f"levels name {n!r} and {aliases[n]!r}, which are one tensor (tied weights); "
                              "name it once")
        if n not in sd:
            raise ConfigError(f"levels name {n!r}, which is not in the model's state_dict")
        for s in SUFFIXES:
            if n + s in state:
                raise ConfigError(f"state_dict entry {n + s!r} clashes with the level tensors of {n!r}")
        w = sd[n]
        shapes[n] = list(w.shape)
        if levels.structure == "rank":
            U, S, Vh = torch.linalg.svd(as_matrix(w, "structure 'filter' / 'rank'"), full_matrices=False)
            tensors.update({f"{n}.U": U.contiguous(), f"{n}.S": S.contiguous(), f"{n}.Vh": Vh.contiguous()})
            del sd[n]
            want = (S.numel(),)
        else:
            want = tuple(w.shape) if levels.structure == "weight" else (w.shape[0],)
        if tuple(ids.shape) != want:
            raise ConfigError(f"level ids of {n!r} have shape {tuple(ids.shape)}, the model needs {want}")
        tensors[f"{n}.level"] = ids.to(torch.uint8).contiguous()
    dense = len(sd) - sum(n in sd for n in levels.ids)  # rank factors replaced their weights already
    tensors.update(sd)
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "structure": levels.structure,
            "scope": levels.scope, "levels": [{"level": j + 1, "keep": a} for j, a in enumerate(levels.keeps)],
            "params": shapes, "dense": dense, "digests": {k: digest(v) for k, v in tensors.items()}}
    if aliases:
        meta["aliases"] = aliases
    data = safetensors.torch.save(tensors, metadata={META_KEY: seal(json.dumps(meta, separators=(",", ":")))})
    atomic_write(path, data)
    return len(data)


def read_meta(path: str | os.PathLike) -> dict[str, Any]:
    """The validated metadata of a multi-level file (levels, structure, scope, parameter shapes)."""
    return read(path)[0]


def _bad(path: Any, what: str) -> ArtifactError:
    return ArtifactError(f"{os.fspath(path)}: {what}")


def read(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """(metadata, tensors) of a multi-level file, everything checked: the seal and every digest
    (version 2), the metadata's types, and each parameter's tensors against its shape."""
    try:
        with safe_open(os.fspath(path), framework="pt") as f:
            text = (f.metadata() or {}).get(META_KEY)
            if text is None:
                raise _bad(path, f"not a multi-level file (no {META_KEY!r} metadata)")
            raw = {k: f.get_tensor(k) for k in f.keys()}
    except (FileNotFoundError, ArtifactError):
        raise
    except Exception as e:  # noqa: BLE001 - safetensors' own errors, OSError, …
        raise _bad(path, f"not a readable safetensors file ({type(e).__name__})") from None
    sealed = unseal(text)
    try:
        meta = json.loads(sealed if sealed is not None else text)
    except json.JSONDecodeError:
        raise _bad(path, "the multi-level metadata is not valid JSON") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or meta.get("format_version") not in (1, 2):
        got = (meta.get("format"), meta.get("format_version")) if isinstance(meta, dict) else meta
        raise _bad(path, f"format {got!r}; this reads {FORMAT!r} versions 1–{FORMAT_VERSION}")
    if meta["format_version"] >= 2:
        if sealed is None:
            raise _bad(path, "the metadata fails its checksum; the file is corrupted or was changed")
        digests = meta.get("digests")
        if not isinstance(digests, dict) or set(digests) != set(raw):
            raise _bad(path, "the metadata's digests do not name the file's tensors")
        for k, t in raw.items():
            if digest(t.contiguous()) != digests[k]:
                raise _bad(path, f"tensor {k!r} fails its checksum; the file is corrupted or was changed")
    _validate(path, meta, raw)
    return meta, raw


def _validate(path: Any, meta: dict[str, Any], raw: dict[str, Tensor]) -> None:
    structure, levels, params = meta.get("structure"), meta.get("levels"), meta.get("params")
    if structure not in STRUCTURES or meta.get("scope") not in ("global", "layer"):
        raise _bad(path, f"structure {structure!r} / scope {meta.get('scope')!r} unknown")
    if not isinstance(levels, list) or not 1 <= len(levels) <= 255 or not all(
            isinstance(lv, dict) and lv.get("level") == j + 1 and isinstance(lv.get("keep"), (int, float))
            and not isinstance(lv.get("keep"), bool) and 0 < lv["keep"] <= 1 for j, lv in enumerate(levels)):
        raise _bad(path, "the levels are malformed")
    if not isinstance(params, dict) or not params:
        raise _bad(path, "the metadata names no parameters")
    for n, shape in params.items():
        if not (isinstance(shape, list) and shape and all(isinstance(d, int) and not isinstance(d, bool) and d > 0
                                                          for d in shape)):
            raise _bad(path, f"parameter {n!r} has a malformed shape {shape!r}")
        numel = 1
        for d in shape:
            numel *= d
        ids = raw.get(f"{n}.level")
        if ids is None or ids.dtype != torch.uint8:
            raise _bad(path, f"parameter {n!r} has no uint8 level ids")
        if structure == "rank":
            parts = [raw.get(f"{n}.{s}") for s in ("U", "S", "Vh")]
            if any(t is None or not t.is_floating_point() for t in parts) or len(shape) < 2:
                raise _bad(path, f"parameter {n!r} lacks its SVD factors")
            U, S, Vh = parts
            m, k = shape[0], numel // shape[0]
            q = min(m, k)
            if U.shape != (m, q) or S.shape != (q,) or Vh.shape != (q, k) or ids.shape != (q,):
                raise _bad(path, f"parameter {n!r}: factor shapes do not fit its shape {shape}")
        else:
            w = raw.get(n)
            want = tuple(shape) if structure == "weight" else (shape[0],)
            if w is None or list(w.shape) != shape or tuple(ids.shape) != want:
                raise _bad(path, f"parameter {n!r}: tensors do not fit its shape {shape}")
    own = {n + s for n in params for s in SUFFIXES}  # level and factor tensors of the parameters
    dense = meta.get("dense")  # absent in version 1 files
    if dense is not None:
        unclaimed = sorted(k for k in raw if k not in own and k not in params)
        if isinstance(dense, bool) or not isinstance(dense, int) or dense != len(unclaimed):
            shown = ", ".join(unclaimed[:4]) + (", …" if len(unclaimed) > 4 else "")
            raise _bad(path, f"{len(unclaimed)} tensors belong to no parameter of the metadata, which counts "
                             f"{dense!r} dense ones (a parameter's entry was removed or changed; {shown})")
    aliases = meta.get("aliases", {})  # absent in files written before ties were recorded
    if not isinstance(aliases, dict) or len(aliases) > MAX_ALIASES or not all(
            isinstance(a, str) and isinstance(b, str) for a, b in aliases.items()):
        raise _bad(path, f"the aliases are malformed (not an object of at most {MAX_ALIASES} names)")
    entries = set(params) | {k for k in raw if k not in own}  # the names `extract` returns
    for alias, name in aliases.items():
        if name not in entries or alias in entries or alias in raw:
            raise _bad(path, f"alias {alias!r} of {name!r} does not name one stored tensor")
    top = max(int(raw[f"{n}.level"].max()) if raw[f"{n}.level"].numel() else 0 for n in params)
    if top != len(levels):  # every level keeps a unit, and no unit claims a level that is not there
        raise _bad(path, f"the level ids reach level {top}, the metadata lists {len(levels)} levels")


def extract(path: str | os.PathLike, level: int) -> dict[str, Tensor]:
    """The state_dict at `level` (0 = dense): units with level id < level are zero (weights,
    rows) or dropped (singular triplets); everything else as stored, and each alias of a tied
    entry the same tensor as the entry."""
    return read_level(path, level)[1]


def read_level(path: str | os.PathLike, level: int) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """(metadata, state_dict at `level`): `read_meta` and `extract` from one read of the file."""
    meta, raw = read(path)
    _check_level(level, len(meta["levels"]))
    out: dict[str, Tensor] = {}
    keys = set(raw)
    for n, shape in meta["params"].items():
        keep = raw[f"{n}.level"] >= level
        if meta["structure"] == "rank":
            U, S, Vh = (raw[f"{n}.{s}"] for s in ("U", "S", "Vh"))
            out[n] = ((U[:, keep] * S[keep]) @ Vh[keep]).reshape(shape)
        else:
            w = raw[n]
            m = keep if meta["structure"] == "weight" else keep.reshape(-1, *[1] * (w.dim() - 1))
            out[n] = w * m
        keys -= {n + s for s in SUFFIXES} | {n}
    for k in keys:
        out[k] = raw[k]
    for alias, name in meta.get("aliases", {}).items():
        out[alias] = out[name]  # tied: the same tensor, so a tied model keeps this level's weights
    return meta, out


def tie_(module: nn.Module, aliases: dict[str, str]) -> nn.Module:
    """Make each `alias` of `module` the very parameter (or buffer) `name` is, adding the submodules
    its path needs: a state_dict's ties on a module built from it (`api.state_module`)."""
    for alias, name in aliases.items():
        *path, leaf = alias.split(".")
        try:
            mod = module
            for p in path:
                if p not in mod._modules:
                    mod.add_module(p, nn.Module())
                mod = mod._modules[p]
            mod._parameters.pop(leaf, None)
            mod._buffers.pop(leaf, None)
            try:
                param = module.get_parameter(name)
            except AttributeError:  # not a parameter: a buffer
                mod.register_buffer(leaf, module.get_buffer(name))
            else:
                mod.register_parameter(leaf, param)
        except (AttributeError, KeyError, TypeError) as e:
            raise ArtifactError(f"cannot tie {alias!r} to {name!r} ({type(e).__name__}: {e})") from None
    return module


def untied(module: nn.Module, sd: dict[str, Tensor], params: Sequence[str]) -> dict[str, Tensor]:
    """`sd` with every entry that `module` ties to one of `params` (the leveled parameters) given
    that parameter's tensor: a file without aliases (written before they were recorded) holds a
    dense copy of the tie, which would otherwise overwrite the level when loaded last."""
    own = module.state_dict()
    out = dict(sd)
    for alias, name in tied(own, first=[*params, *own]).items():
        if name in params and name in out and alias in out:
            out[alias] = out[name]
    return out


def levels_summary(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Per level: its keep fraction and the units it keeps, from the stored level ids."""
    meta, raw = read(path)
    ids = torch.cat([raw[f"{n}.level"].reshape(-1) for n in meta["params"]])
    return [{"level": 0, "keep": 1.0, "units": ids.numel()}] + [
        {**lv, "units": int((ids >= lv["level"]).sum())} for lv in meta["levels"]]


__all__ = ["Levels", "build_levels", "extract", "levels_summary", "read_level", "read_meta", "save_multilevel",
           "tie_", "untied"]
