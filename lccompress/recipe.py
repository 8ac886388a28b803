"""Which parameters get which scheme.

A recipe is a list of rules; a rule names parameters (exact names or fnmatch globs) and a
scheme, applied jointly (one constraint over all of them: global pruning, a shared codebook)
or to each alone. Parameters no rule names stay dense and keep training.
"""

from __future__ import annotations

import fnmatch
import os
import tomllib
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

import torch
from torch import Tensor, nn

from .errors import ConfigError
from .schemes.base import Scheme, Theta, scheme_from_dict
from .structure import ChannelGroup, Slice


def match(patterns: Iterable[str], names: Iterable[str]) -> list[str]:
    """The names matching any of the patterns (exact names or fnmatch globs), in the names' order
    per pattern, without repeats; a pattern matching nothing is an error."""
    names = list(names)
    out: list[str] = []
    for pat in patterns:
        hit = [n for n in names if n == pat or fnmatch.fnmatchcase(n, pat)]
        if not hit:
            raise ConfigError(f"{pat!r} matches no parameter; parameters are: {', '.join(names)}")
        out += [n for n in hit if n not in out]
    return out


@dataclass(frozen=True)
class Rule:
    """`params`: names or globs; `joint`: one constraint over all matched parameters."""

    params: tuple[str, ...]
    scheme: Scheme
    joint: bool = False
    #: structured units: each entry the channel groups of one constraint (`unit_groups`)
    units: tuple[tuple[ChannelGroup, ...], ...] = ()

    def __post_init__(self) -> None:
        p = (self.params,) if isinstance(self.params, str) else tuple(self.params)
        if not p or not all(isinstance(x, str) and x for x in p):
            raise ConfigError(f"params={self.params!r} must be parameter names or globs")
        if not isinstance(self.scheme, Scheme):
            raise ConfigError(f"scheme={self.scheme!r} is not a Scheme")
        if self.joint and not self.scheme.joinable and not self.units:
            raise ConfigError(f"scheme {self.scheme.name!r} applies to one tensor at a time; use joint=False")
        object.__setattr__(self, "params", p)


@dataclass(frozen=True)
class Span:
    """Named parameters seen as one tensor: the parameter itself, or several flattened and
    concatenated (a joint constraint)."""

    name: str
    params: tuple[str, ...]
    shapes: tuple[torch.Size, ...]

    @property
    def shape(self) -> torch.Size:
        """Shape of the tensor the scheme sees: the parameter's own, or (total,) when joint."""
        if len(self.params) == 1:
            return self.shapes[0]
        return torch.Size([sum(s.numel() for s in self.shapes)])

    def gather(self, tensors: Mapping[str, Tensor]) -> Tensor:
        if len(self.params) == 1:
            return tensors[self.params[0]]
        return torch.cat([tensors[p].reshape(-1) for p in self.params])

    def scatter(self, w: Tensor) -> dict[str, Tensor]:
        if len(self.params) == 1:
            return {self.params[0]: w.reshape(self.shapes[0])}
        sizes = [s.numel() for s in self.shapes]
        return {p: t.reshape(s) for p, t, s in zip(self.params, torch.split(w.reshape(-1), sizes), self.shapes)}


@dataclass(frozen=True)
class Group(Span):
    """One constraint: a scheme over a span of parameters."""

    scheme: Scheme

    # convenience over the scheme
    def compress(self, tensors: Mapping[str, Tensor], init: Theta | None = None, mu: float | None = None) -> Theta:
        return self.scheme.compress(self.gather(tensors).detach(), init, mu=mu)

    def decompress(self, theta: Theta) -> dict[str, Tensor]:
        return self.scatter(self.scheme.decompress(theta, self.shape))

    def bits(self, theta: Theta) -> int:
        return self.scheme.bits(theta, self.shape)


@dataclass(frozen=True)
class UnitGroup(Group):
    """A constraint over units that span several parameters: the channels of coupled layers
    (`structure.ChannelGroup`s: a conv's filters with their bias and BatchNorm entries, the
    layers a residual add joins). The scheme sees the matrix (channels, D): row c holds every
    producer entry of channel c (rows of the channel groups stacked; shorter rows zero-padded).
    Every producer parameter is covered entirely by the units, so `scatter` rebuilds them whole."""

    units: tuple[ChannelGroup, ...] = ()

    def _widths(self, shapes: Mapping[str, torch.Size]) -> list[list[int]]:
        return [[shapes[s.name].numel() // shapes[s.name][s.dim] * s.per for s in u.producers] for u in self.units]

    @property
    def shape(self) -> torch.Size:
        sizes = dict(zip(self.params, self.shapes))
        width = max(sum(w) for w in self._widths(sizes))
        return torch.Size([sum(u.channels for u in self.units), width])

    def gather(self, tensors: Mapping[str, Tensor]) -> Tensor:
        width = self.shape[1]
        rows = []
        for u in self.units:
            cols = [tensors[s.name].narrow(s.dim, s.offset, u.channels * s.per).movedim(s.dim, 0).reshape(u.channels, -1)
                    for s in u.producers]
            m = torch.cat(cols, 1)
            rows.append(torch.nn.functional.pad(m, (0, width - m.shape[1])))
        return torch.cat(rows, 0)

    def scatter(self, w: Tensor) -> dict[str, Tensor]:
        sizes = dict(zip(self.params, self.shapes))
        out = {p: w.new_zeros(sizes[p]) for p in self.params}
        w = w.reshape(self.shape)
        start = 0
        for u, widths in zip(self.units, self._widths(sizes)):
            block, col = w[start:start + u.channels], 0
            for s, width in zip(u.producers, widths):
                rest = [d for i, d in enumerate(sizes[s.name]) if i != s.dim]
                piece = block[:, col:col + width].reshape([u.channels * s.per] + rest).movedim(0, s.dim)
                out[s.name].narrow(s.dim, s.offset, u.channels * s.per).copy_(piece)
                col += width
            start += u.channels
        return out


def unit_groups(model: nn.Module, example: Any) -> tuple[list[tuple[ChannelGroup, ...]], list[str]]:
    """The model's channel groups (`structure.channel_groups`) joined where they share a producer
    parameter (a BatchNorm behind a concatenation), keeping only those whose producer parameters
    they cover entirely; and one-line reasons for the channels left out."""
    from .structure import channel_groups

    groups, why = channel_groups(model, tuple(example) if isinstance(example, (tuple, list)) else (example,))
    parent = list(range(len(groups)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    owner: dict[str, int] = {}
    for i, g in enumerate(groups):
        for s in g.producers:
            if s.name in owner:
                parent[find(i)] = find(owner[s.name])
            owner[s.name] = i
    comps: dict[int, list[ChannelGroup]] = {}
    for i, g in enumerate(groups):
        comps.setdefault(find(i), []).append(g)
    shapes = {**{n: p.shape for n, p in model.named_parameters()}}
    out = []
    for members in comps.values():
        cover: dict[str, list[tuple[int, int, int]]] = {}
        for g in members:
            for s in g.producers:
                cover.setdefault(s.name, []).append((s.dim, s.offset, s.offset + g.channels * s.per))
        whole = all(len({d for d, _, _ in iv}) == 1 and sum(b - a for _, a, b in iv) == shapes[n][iv[0][0]]
                    for n, iv in cover.items())
        if whole:
            out.append(tuple(members))
        else:
            names = ", ".join(sorted(m for g in members for m in g.modules))
            why.append(f"{names}: shares a parameter with channels that cannot be removed")
    return out, why


@dataclass(frozen=True)
class Recipe:
    rules: tuple[Rule, ...]

    def __post_init__(self) -> None:
        rules = tuple(self.rules)
        if not rules or not all(isinstance(r, Rule) for r in rules):
            raise ConfigError("a recipe needs at least one Rule")
        object.__setattr__(self, "rules", rules)

    @classmethod
    def single(cls, params: str | Iterable[str], scheme: Scheme, joint: bool = False) -> "Recipe":
        return cls((Rule(tuple([params] if isinstance(params, str) else params), scheme, joint),))

    def groups(self, model: nn.Module | Mapping[str, Tensor]) -> list[Group]:
        """Resolve names and globs against a model's parameters (or a state_dict)."""
        named = dict(model.named_parameters()) if isinstance(model, nn.Module) else dict(model)
        taken: dict[str, int] = {}
        groups: list[Group] = []
        for ri, rule in enumerate(self.rules):
            names = match(rule.params, named)
            for n in names:
                if n in taken:
                    raise ConfigError(f"parameter {n!r} is named by rules {taken[n] + 1} and {ri + 1}")
                taken[n] = ri
                if not named[n].is_floating_point():
                    raise ConfigError(f"parameter {n!r} is not floating point")
            if rule.units:
                for comp in rule.units:
                    ps = tuple(dict.fromkeys(sl.name for u in comp for sl in u.producers))
                    missing = [p for p in ps if p not in names]
                    if missing:
                        raise ConfigError(f"structured units name {', '.join(missing)}, not among the rule's parameters")
                    groups.append(UnitGroup("+".join(ps), ps, tuple(named[p].shape for p in ps), rule.scheme, comp))
            elif rule.joint:
                groups.append(Group("+".join(names), tuple(names), tuple(named[n].shape for n in names), rule.scheme))
            else:
                groups += [Group(n, (n,), (named[n].shape,), rule.scheme) for n in names]
        for g in groups:
            if not g.scheme.joinable and len(g.params) > 1 and not isinstance(g, UnitGroup):
                raise ConfigError(f"scheme {g.scheme.name!r} cannot span several tensors")
        return groups

    @classmethod
    def structured(cls, model: nn.Module, example: Any, scheme: Scheme, include: Iterable[str] = (),
                   joint: bool = False) -> "Recipe":
        """One rule of `scheme` (StructuredPrune) over the model's prunable channel groups
        (`unit_groups`: coupled layers together), found by tracing the model on `example` (a
        tensor or a tuple of positional inputs): one constraint per group, or with `joint` one
        over all their channels (keep the largest over all layers). `include` globs restrict it
        to the groups with a matching producer parameter."""
        comps, why = unit_groups(model, example)
        pats = list(include)
        if pats:
            comps = [c for c in comps if any(fnmatch.fnmatchcase(sl.name, p) for u in c for sl in u.producers for p in pats)]
        if not comps:
            raise ConfigError("no channels can be removed from this model" + (f" ({why[0]})" if why else ""))
        params = tuple(dict.fromkeys(sl.name for c in comps for u in c for sl in u.producers))
        if joint:
            comps = [tuple(u for c in comps for u in c)]
        return cls((Rule(params, scheme, units=tuple(comps)),))

    def to_dict(self) -> dict:
        return {"rules": [{"params": list(r.params), "joint": r.joint, **r.scheme.to_dict(),
                           **({"units": [[units_to_dict(u) for u in c] for c in r.units]} if r.units else {})}
                          for r in self.rules]}

    @classmethod
    def from_toml(cls, path: str | os.PathLike) -> "Recipe":
        """A recipe in TOML: one [[rule]] table per rule, with params, scheme, its
        hyperparameters, and optionally joint (additive terms as inline tables)."""
        try:
            with open(path, "rb") as f:
                d = tomllib.load(f)
        except FileNotFoundError:
            raise ConfigError(f"{path}: no such recipe file") from None
        except IsADirectoryError:
            raise ConfigError(f"{path}: is a directory, not a recipe file") from None
        except OSError as e:
            raise ConfigError(f"{path}: cannot read the recipe ({e.strerror or e})") from None
        except UnicodeDecodeError:
            raise ConfigError(f"{path}: not valid TOML (not UTF-8 text)") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path}: not valid TOML ({e})") from None
        return cls.from_dict({"rules": d.get("rule", d.get("rules", []))})

    @classmethod
    def from_dict(cls, d: Mapping) -> "Recipe":
        try:
            rules = []
            for r in d["rules"]:
                r = dict(r)
                params, joint = r.pop("params"), bool(r.pop("joint", False))
                units = tuple(tuple(units_from_dict(u) for u in c) for c in r.pop("units", ()))
                rules.append(Rule(tuple([params] if isinstance(params, str) else params), scheme_from_dict(r), joint, units))
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise ConfigError(f"a recipe needs rules with params and scheme: {e}") from None
        return cls(tuple(rules))


def units_to_dict(u: ChannelGroup) -> dict:
    """A channel group as plain JSON: slices as [name, dim, per, offset]."""
    sl = lambda xs: [[x.name, x.dim, x.per, x.offset] for x in xs]  # noqa: E731
    return {"channels": u.channels, "producers": sl(u.producers), "buffers": sl(u.buffers),
            "consumers": sl(u.consumers), "modules": list(u.modules)}


def units_from_dict(d: Any) -> ChannelGroup:
    """Inverse of `units_to_dict`; ConfigError naming what is malformed."""
    def sl(xs: Any) -> tuple[Slice, ...]:
        out = []
        for x in xs:
            name, dim, per, offset = x
            if not isinstance(name, str) or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0
                                                    for v in (dim, per, offset)) or per < 1:
                raise ValueError(f"bad slice {x!r}")
            out.append(Slice(name, dim, per, offset))
        return tuple(out)
    try:
        ch = d["channels"]
        if not isinstance(ch, int) or isinstance(ch, bool) or ch < 1:
            raise ValueError(f"channels={ch!r}")
        return ChannelGroup(ch, sl(d["producers"]), sl(d.get("buffers", [])), sl(d.get("consumers", [])),
                            tuple(str(m) for m in d.get("modules", [])))
    except (KeyError, TypeError, ValueError) as e:
        raise ConfigError(f"malformed structured unit ({type(e).__name__}: {e})") from None
