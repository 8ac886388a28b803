"""Additive combinations: Δ(θ) = Σᵢ Δᵢ(θᵢ), e.g. a codebook plus a sparse correction.

C step by alternation: θᵢ ← Cᵢ(w − Σ_{j≠i} Δⱼ(θⱼ)); each update is an exact projection of the
residual, so ‖w − Δ(θ)‖² never increases. θ keys are prefixed with the term index, "0.codebook".
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..errors import ConfigError
from .base import Scheme, Theta, merge_lc_defaults


def _split(theta: Theta, i: int) -> Theta:
    pre = f"{i}."
    return {k[len(pre):]: v for k, v in theta.items() if k.startswith(pre)}


@dataclass(frozen=True)
class Additive(Scheme):
    """Sum of schemes, fitted by alternating C steps (`rounds` at most, stops when stalled)."""

    terms: tuple[Scheme, ...]
    rounds: int = 20
    name = "additive"

    def __post_init__(self) -> None:
        terms = tuple(self.terms) if isinstance(self.terms, (list, tuple)) else ()
        if len(terms) < 2 or not all(isinstance(t, Scheme) for t in terms):
            raise ConfigError(f"additive needs at least two schemes, got {self.terms!r}")
        object.__setattr__(self, "terms", terms)

    @property
    def needs_mu(self) -> bool:  # type: ignore[override]
        return any(t.needs_mu for t in self.terms)

    @property
    def joinable(self) -> bool:  # type: ignore[override]
        return all(t.joinable for t in self.terms)

    @property
    def lc_defaults(self) -> dict[str, float]:  # type: ignore[override]
        return merge_lc_defaults(self.terms)

    def compress(self, w: Tensor, init: Theta | None = None, *, mu: float | None = None) -> Theta:
        w = w.detach()
        parts = [_split(init, i) if init else None for i in range(len(self.terms))]
        deltas = [t.decompress(p, w.shape) if p else torch.zeros_like(w) for t, p in zip(self.terms, parts)]
        prev = None
        for _ in range(self.rounds):
            for i, t in enumerate(self.terms):
                rest = sum(d for j, d in enumerate(deltas) if j != i)
                parts[i] = t.compress(w - rest, parts[i], mu=mu)
                deltas[i] = t.decompress(parts[i], w.shape)
            err = float(((w - sum(deltas)) ** 2).sum())
            if prev is not None and err >= prev * (1 - 1e-9):
                break
            prev = err
        return {f"{i}.{k}": v for i, p in enumerate(parts) for k, v in p.items()}

    def decompress(self, theta: Theta, shape) -> Tensor:
        return sum(t.decompress(_split(theta, i), shape) for i, t in enumerate(self.terms))

    def bits(self, theta: Theta, shape) -> int:
        return sum(t.bits(_split(theta, i), shape) for i, t in enumerate(self.terms))

    def summary(self, theta: Theta, shape) -> dict[str, Any]:
        return {"terms": [dict(scheme=t.name, **t.summary(_split(theta, i), shape)) for i, t in enumerate(self.terms)]}

    def fanout(self, theta: Theta) -> dict[str, Tensor]:
        return {f"{i}.{k}": v for i, t in enumerate(self.terms) for k, v in t.fanout(_split(theta, i)).items()}

    def codecs(self, theta: Theta) -> dict[str, Any]:
        return {f"{i}.{k}": c for i, t in enumerate(self.terms) for k, c in t.codecs(_split(theta, i)).items()}

    def onnx_decode(self, b: Any, theta: Theta, shape: tuple[int, ...], out: str, **options: Any) -> str:
        """The sum of the terms' decoders."""
        names = [b.fresh("term") for _ in self.terms]
        descs = [t.onnx_decode(b, _split(theta, i), shape, names[i], **options) for i, t in enumerate(self.terms)]
        acc = names[0]
        for i, nm in enumerate(names[1:], 1):
            acc = b.op("Add", [acc, nm], out if i == len(names) - 1 else None)
        return "+".join(descs)

    def trainable(self, theta: Theta) -> list[str]:
        return [f"{i}.{k}" for i, t in enumerate(self.terms) for k in t.trainable(_split(theta, i))]
