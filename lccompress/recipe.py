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
from typing import Iterable, Mapping

import torch
from torch import Tensor, nn

from .errors import ConfigError
from .schemes.base import Scheme, Theta, scheme_from_dict


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

    def __post_init__(self) -> None:
        p = (self.params,) if isinstance(self.params, str) else tuple(self.params)
        if not p or not all(isinstance(x, str) and x for x in p):
            raise ConfigError(f"params={self.params!r} must be parameter names or globs")
        if not isinstance(self.scheme, Scheme):
            raise ConfigError(f"scheme={self.scheme!r} is not a Scheme")
        if self.joint and not self.scheme.joinable:
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
            if rule.joint:
                groups.append(Group("+".join(names), tuple(names), tuple(named[n].shape for n in names), rule.scheme))
            else:
                groups += [Group(n, (n,), (named[n].shape,), rule.scheme) for n in names]
        for g in groups:
            if not g.scheme.joinable and len(g.params) > 1:
                raise ConfigError(f"scheme {g.scheme.name!r} cannot span several tensors")
        return groups

    def to_dict(self) -> dict:
        return {"rules": [{"params": list(r.params), "joint": r.joint, **r.scheme.to_dict()} for r in self.rules]}

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
                rules.append(Rule(tuple([params] if isinstance(params, str) else params), scheme_from_dict(r), joint))
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise ConfigError(f"a recipe needs rules with params and scheme: {e}") from None
        return cls(tuple(rules))
