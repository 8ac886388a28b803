"""Sparsity: ℓ0 / ℓ1 constraints and penalties. θ = {"indices": (nnz,) int64 sorted, "values": (nnz,)}."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..errors import ConfigError
from ..util import kappa
from .base import Scheme, Theta, dtype_bits, index_bits, numel
from .codecs import Positions, onnx_sparse


def sparse_theta(w: Tensor, mask: Tensor) -> Theta:
    flat = w.reshape(-1)
    idx = mask.reshape(-1).nonzero().reshape(-1)  # (nnz,) ascending
    return {"indices": idx, "values": flat[idx].clone()}


class Sparse(Scheme):
    """Base of the schemes whose θ is a sparse tensor {"indices", "values"} (`sparse_theta`): they
    share Δ(θ), the storage cost, the container's encoding and the ONNX decoder."""

    def decompress(self, theta: Theta, shape) -> Tensor:
        v, i = theta["values"], theta["indices"]
        out = torch.zeros(numel(shape), dtype=v.dtype, device=v.device)
        return out.scatter(0, i, v).reshape(shape)

    def bits(self, theta: Theta, shape) -> int:
        n, nnz = numel(shape), theta["values"].numel()
        # values + positions: a bit mask or one index per kept weight, whichever is smaller
        return nnz * dtype_bits(theta["values"]) + min(n, nnz * index_bits(n))

    def summary(self, theta: Theta, shape) -> dict[str, Any]:
        nnz = theta["values"].numel()
        return {"kept": nnz, "density": nnz / max(1, numel(shape))}

    def codecs(self, theta: Theta) -> dict[str, Any]:
        return {"indices": Positions()}

    def onnx_decode(self, b: Any, theta: Theta, shape: tuple[int, ...], out: str, *, sparse: str = "packed",
                    **options: Any) -> str:
        """"packed": values plus positions (gaps or a bit mask); "dense": Δ(θ) with its zeros."""
        if sparse != "packed":
            return super().onnx_decode(b, theta, shape, out)
        return onnx_sparse(b, theta["indices"], theta["values"], shape, out)


@dataclass(frozen=True)
class Prune(Sparse):
    """ℓ0 constraint: θ = argmin ‖w − θ‖² s.t. ‖θ‖₀ ≤ κ, i.e. keep the κ largest |w|.

    Give `keep` (fraction in (0, 1], κ = round(keep·n), at least 1) or `count` (κ itself).
    """

    keep: float | None = None
    count: int | None = None
    name = "prune"

    def __post_init__(self) -> None:
        check_keep_count(self.keep, self.count, "prune")

    def kappa(self, n: int) -> int:
        return kappa(n, keep=self.keep, count=self.count)

    def compress(self, w: Tensor, init: Theta | None = None, *, mu: float | None = None) -> Theta:
        flat = w.detach().reshape(-1)
        idx = top_magnitude(flat, self.kappa(flat.numel()))
        return {"indices": idx, "values": flat[idx].clone()}


def check_keep_count(keep: float | None, count: int | None, what: str) -> None:
    """ConfigError unless exactly one of keep (a fraction in (0, 1]) or count (an integer ≥ 1) is given."""
    if (keep is None) == (count is None):
        raise ConfigError(f"{what} needs exactly one of keep (a fraction) or count")
    if keep is not None and (isinstance(keep, bool) or not isinstance(keep, (int, float)) or not 0 < keep <= 1):
        raise ConfigError(f"keep={keep!r} must be a fraction in (0, 1]")
    if count is not None and (isinstance(count, bool) or not isinstance(count, int) or count < 1):
        raise ConfigError(f"count={count!r} must be an integer ≥ 1")


def top_magnitude(flat: Tensor, k: int) -> Tensor:
    """Sorted positions (k,) of the k largest |flat|; of equal magnitudes at the threshold, the
    first. On the CPU by selection (numpy's in-place introselect of |flat|: O(n), one copy);
    elsewhere by torch.topk."""
    n = flat.numel()
    if flat.device.type != "cpu" or flat.dtype not in (torch.float32, torch.float64) or k >= n:
        return torch.sort(torch.topk(flat.abs(), k, sorted=False).indices).values
    x = flat.numpy()
    a = np.abs(x)  # (n,) the one copy
    a.partition(n - k)
    t = a[n - k]  # the k-th largest magnitude
    del a
    step = max(1 << 16, min(1 << 20, n // 16))  # |x| a slice at a time: nothing else of size n
    above = np.concatenate([np.flatnonzero(np.abs(x[i:i + step]) > t) + i for i in range(0, n, step)])
    if above.size < k:  # equal magnitudes at the threshold, the first ones
        ties = np.concatenate([np.flatnonzero(np.abs(x[i:i + step]) == t) + i for i in range(0, n, step)])
        above = np.sort(np.concatenate([above, ties[: k - above.size]]))
    return torch.from_numpy(above.astype(np.int64, copy=False))


@dataclass(frozen=True)
class L1Ball(Sparse):
    """ℓ1 constraint: θ = argmin ‖w − θ‖² s.t. ‖θ‖₁ ≤ radius (exact Euclidean projection)."""

    radius: float
    name = "l1_ball"

    def __post_init__(self) -> None:
        if not isinstance(self.radius, (int, float)) or not self.radius > 0 or not math.isfinite(self.radius):
            raise ConfigError(f"radius={self.radius!r} must be a positive number")

    def compress(self, w: Tensor, init: Theta | None = None, *, mu: float | None = None) -> Theta:
        p = project_l1_ball(w, self.radius)
        return sparse_theta(p, p != 0)

    def trainable(self, theta: Theta) -> list[str]:
        return []  # the ball bounds the values themselves: training them would leave it


def project_l1_ball(w: Tensor, radius: float) -> Tensor:
    """argmin_θ ‖w − θ‖² s.t. ‖θ‖₁ ≤ radius: soft threshold at the τ where ‖θ‖₁ = radius."""
    a = w.abs().reshape(-1)
    if a.sum() <= radius:
        return w.clone()
    u = torch.sort(a, descending=True).values  # (n,)
    css = torch.cumsum(u.double(), 0)
    j = torch.arange(1, u.numel() + 1, device=w.device, dtype=torch.float64)
    rho = int(((u.double() - (css - radius) / j) > 0).nonzero().max()) + 1
    tau = (css[rho - 1] - radius) / rho
    return torch.sign(w) * torch.clamp(w.abs() - tau.to(w.dtype), min=0)


@dataclass(frozen=True)
class _Penalty(Sparse):
    """θ = argmin α·penalty(θ) + μ/2‖w − θ‖², separable: a threshold of w at a level set by α/μ."""

    alpha: float
    needs_mu = True

    def __post_init__(self) -> None:
        a = self.alpha
        if isinstance(a, bool) or not isinstance(a, (int, float)) or not a > 0 or not math.isfinite(a):
            raise ConfigError(f"alpha={a!r} must be a positive number")

    def compress(self, w: Tensor, init: Theta | None = None, *, mu: float | None = None) -> Theta:
        if mu is None or not mu > 0:
            raise ConfigError(f"the {self.name} C step needs μ > 0, got mu={mu!r}")
        p = self.threshold(w, float(mu))
        return sparse_theta(p, p != 0)

    def threshold(self, w: Tensor, mu: float) -> Tensor:
        raise NotImplementedError


@dataclass(frozen=True)
class L0Penalty(_Penalty):
    """ℓ0 penalty: θ = argmin α‖θ‖₀ + μ/2‖w − θ‖², a hard threshold at √(2α/μ)."""

    name = "l0_penalty"

    def threshold(self, w: Tensor, mu: float) -> Tensor:
        return torch.where(w.abs() > math.sqrt(2 * self.alpha / mu), w, 0.0)


@dataclass(frozen=True)
class L1Penalty(_Penalty):
    """ℓ1 penalty: θ = argmin α‖θ‖₁ + μ/2‖w − θ‖², a soft threshold at α/μ."""

    name = "l1_penalty"

    def threshold(self, w: Tensor, mu: float) -> Tensor:
        return torch.sign(w) * torch.clamp(w.abs() - self.alpha / mu, min=0)
