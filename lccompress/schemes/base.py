"""The scheme contract: hyperparameters in a frozen dataclass, state in θ (a flat tensor dict).

A scheme defines a compressed set {Δ(θ)} and three functions:

    compress(w)   θ = argmin_θ ‖w − Δ(θ)‖²      (the C step: exact projection; penalty forms
                                                 add their penalty and need μ)
    decompress(θ) Δ(θ), differentiable in θ's floating-point parts
    bits(θ)       storage cost of everything needed to rebuild the tensor

and owns its formats: `codecs` says how each part of θ is stored in the container,
`onnx_decode` how Δ(θ) is rebuilt in an ONNX graph, `factors` whether Δ(θ) = U V can run as
two smaller layers. The formats ask; they never branch on a scheme's type or θ's key names.
"""

from __future__ import annotations

import dataclasses
import math
from abc import ABC, abstractmethod
from typing import Any, ClassVar

import torch
from torch import Tensor

from ..errors import ConfigError

Theta = dict[str, Tensor]

_REGISTRY: dict[str, type["Scheme"]] = {}


class Scheme(ABC):
    """Base class of compression schemes. Subclasses are frozen dataclasses with a unique `name`."""

    name: ClassVar[str]
    #: True when the C step depends on μ (penalty forms, rank selection).
    needs_mu: ClassVar[bool] = False
    #: False for schemes whose C step needs the tensor's own shape (low rank).
    joinable: ClassVar[bool] = True
    #: LC schedule this family works best with, used where the LCConfig leaves a field as None.
    #: mu0: the first μ when it cannot be measured (no training data); curvature_scale c: with
    #: training data μ₀ = c·κ, κ the loss's curvature along the DC move (`lc.dc_curvature`)
    lc_defaults: ClassVar[dict[str, float]] = {"mu0": 1e-3, "mu_growth": 1.15, "weight_decay": 0.0,
                                               "curvature_scale": 0.07, "tail": 0.2}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        name = cls.__dict__.get("name")
        if isinstance(name, str):
            if name in _REGISTRY:
                raise TypeError(f"scheme name {name!r} is registered twice")
            _REGISTRY[name] = cls

    @abstractmethod
    def compress(self, w: Tensor, init: Theta | None = None, *, mu: float | None = None) -> Theta:
        """C step: θ minimizing ‖w − Δ(θ)‖² (+ penalty); `init` is the previous θ (warm start)."""

    @abstractmethod
    def decompress(self, theta: Theta, shape: torch.Size | tuple[int, ...]) -> Tensor:
        """Δ(θ) with the given shape; differentiable in θ's floating-point tensors."""

    @abstractmethod
    def bits(self, theta: Theta, shape: torch.Size | tuple[int, ...]) -> int:
        """Storage cost in bits of everything needed to rebuild the tensor from θ."""

    def summary(self, theta: Theta, shape: torch.Size | tuple[int, ...]) -> dict[str, Any]:
        """A few human-readable facts about θ (kept weights, codebook size, rank)."""
        return {}

    def trainable(self, theta: Theta) -> list[str]:
        """Parts of θ that fine-tuning with the compression held fixed may train."""
        return [k for k, v in theta.items() if v.is_floating_point()]

    def fanout(self, theta: Theta) -> dict[str, Tensor]:
        """For shared parts of θ, how many weights each element feeds (codebook entries, scales).

        Fine-tuning divides those gradients by it, so a shared entry moves by the mean of the
        gradients of the weights it stands for rather than their sum.
        """
        return {}

    # -- formats: how θ is stored and rebuilt (the container and the ONNX exporter ask) --
    def codecs(self, theta: Theta) -> dict[str, Any]:
        """A `codecs.Codec` per part of θ that is stored other than raw (positions, codes)."""
        return {}

    def onnx_decode(self, b: Any, theta: Theta, shape: tuple[int, ...], out: str, **options: Any) -> str:
        """Add nodes computing Δ(θ) of `shape` into tensor `out` to the graph builder `b`
        (`codecs.GraphBuilder`); return a short name of the form used. By default Δ(θ) is
        stored dense as an initializer."""
        b.initializer(out, self.decompress(theta, shape).detach().cpu().numpy())
        return "dense"

    #: the lowest ONNX opset (default domain) that `onnx_decode` needs
    onnx_opset: ClassVar[int] = 18

    def factors(self, theta: Theta) -> tuple[Tensor, Tensor] | None:
        """(U (m, r), V (r, n)) when Δ(θ) is the product U V of the weight as a matrix, else None."""
        return None

    # -- serialization of hyperparameters (recipes, manifests) --
    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"scheme": self.name}
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            v = getattr(self, f.name)
            if isinstance(v, Scheme):
                v = v.to_dict()
            elif isinstance(v, tuple) and v and isinstance(v[0], Scheme):
                v = [t.to_dict() for t in v]
            elif isinstance(v, tuple):
                v = list(v)
            out[f.name] = v
        return out


def scheme_from_dict(d: dict[str, Any]) -> Scheme:
    """Inverse of `Scheme.to_dict`."""
    d = dict(d)
    name = d.pop("scheme", None)
    if name not in _REGISTRY:
        raise ConfigError(f"unknown scheme {name!r}; known: {', '.join(sorted(_REGISTRY))}")
    cls = _REGISTRY[name]
    for k, v in list(d.items()):
        if isinstance(v, dict) and "scheme" in v:
            d[k] = scheme_from_dict(v)
        elif isinstance(v, list):
            d[k] = tuple(scheme_from_dict(x) if isinstance(x, dict) else x for x in v)
    try:
        return cls(**d)
    except TypeError as e:
        raise ConfigError(f"bad hyperparameters for scheme {name!r}: {e}") from None


def merge_lc_defaults(schemes) -> dict[str, float]:
    """One schedule for several schemes: the gentlest start and growth, the largest weight decay
    and the longest tail."""
    ds = [s.lc_defaults for s in schemes]
    return {"mu0": min(d["mu0"] for d in ds), "mu_growth": min(d["mu_growth"] for d in ds),
            "weight_decay": max(d["weight_decay"] for d in ds),
            "curvature_scale": min(d.get("curvature_scale", 0.07) for d in ds),
            "tail": max(d.get("tail", 0.2) for d in ds)}


def registry() -> dict[str, type[Scheme]]:
    """Name → scheme class, for every registered scheme."""
    return dict(_REGISTRY)


def index_bits(n: int) -> int:
    """Bits of one position in a tensor of n elements."""
    return max(1, math.ceil(math.log2(n))) if n > 1 else 1


def code_bits(k: int) -> int:
    """Bits of one code of a k-entry codebook, ⌈log₂ k⌉ (at least 1)."""
    return max(1, math.ceil(math.log2(k))) if k > 1 else 1


def dtype_bits(t: Tensor) -> int:
    return t.element_size() * 8


def numel(shape: torch.Size | tuple[int, ...]) -> int:
    return math.prod(shape)
