"""Constraint sets for Frank-Wolfe and their linear minimization oracles (LMOs).

Each LMO is a frozen dataclass with the constraint's `radius` r (None: `slack` × the reference
weights' norm in the constraint's norm, so the reference itself is feasible when slack ≥ 1).
`k` is a count (int) or a fraction of the entries, groups or singular values (float in (0, 1]).
"""

from __future__ import annotations

import dataclasses
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from ..errors import ConfigError
from ..schemes.lowrank import top_singular
from ..util import as_matrix, kappa

_TINY = 1e-30


# ----------------------------------------------------------------------------- helpers
def k_of(k: int | float, n: int, what: str) -> int:
    """κ from a count (int ≥ 1, at most n) or a fraction in (0, 1] (κ = round(k·n), at least 1)."""
    if isinstance(k, bool) or not isinstance(k, (int, float)):
        raise ConfigError(f"k={k!r} must be a count (int ≥ 1) or a fraction in (0, 1]")
    if isinstance(k, int):
        if not 1 <= k <= n:
            raise ConfigError(f"k={k} must be between 1 and the {n} {what} it applies to")
        return kappa(n, count=k, what=what)
    if not 0 < k <= 1:
        raise ConfigError(f"k={k!r} as a fraction must be in (0, 1]")
    return kappa(n, keep=k)


def _matrix(x: Tensor) -> Tensor:
    return as_matrix(x, "a matrix constraint")


def k_support_norm(x: Tensor, k: int) -> float:
    """k-support norm (Argyriou et al. 2012), the gauge of conv{v : ‖v‖₀ ≤ k, ‖v‖₂ ≤ 1}.

    With z = |x| sorted decreasingly and T_s = Σ_{i ≥ s} zᵢ,
        ‖x‖²_sp = min over s ∈ {0 … k−1} with T_s ≥ (k − s)·z_s of  Σ_{i < s} zᵢ² + T_s² / (k − s),
    the variational form min_{0<θ≤1, Σθ=k} Σ xᵢ²/θᵢ restricted to θ = 1 on the s largest entries
    (each admissible s is feasible, so an upper bound; the optimum is one of them; s = k−1 always is).
    """
    z = torch.sort(x.detach().abs().reshape(-1).double(), descending=True).values  # (n,)
    k = min(k, z.numel())
    tail = torch.flip(torch.cumsum(torch.flip(z, [0]), 0), [0])  # (n,) tail[s] = T_s
    head = torch.cat([z.new_zeros(1), torch.cumsum(z ** 2, 0)])  # (n+1,) head[s] = Σ_{i<s} zᵢ²
    s = torch.arange(k, device=z.device)  # candidate head sizes
    c = (k - s).double()
    ok = tail[s] >= c * z[s] * (1 - 1e-12)
    val = torch.where(ok, head[s] + tail[s] ** 2 / c, torch.full_like(c, math.inf))
    return float(val.min().clamp(min=0).sqrt())


# ----------------------------------------------------------------------------- LMOs
class LMO(ABC):
    """A constraint set C = {x : norm(x) ≤ radius} and its linear minimization oracle."""

    #: False for constraints that need the tensor's own shape (rows, singular vectors)
    joinable: ClassVar[bool] = True
    radius: float | None

    @abstractmethod
    def lmo(self, g: Tensor) -> Tensor:
        """v = argmin_{v ∈ C} ⟨g, v⟩, of g's shape."""

    @abstractmethod
    def norm(self, x: Tensor) -> float:
        """The gauge of C at radius 1; C = {x : norm(x) ≤ radius}."""

    def diameter(self, x: Tensor) -> float:
        """ℓ2 diameter of C in the space of x (for rescale="diameter")."""
        return 2 * self._r()

    def radius_from(self, w_ref: Tensor, slack: float = 1.0) -> float:
        """r = slack·norm(w_ref): the reference is feasible for slack ≥ 1 (on the boundary at 1)."""
        return float(slack) * self.norm(w_ref)

    def at(self, radius: float) -> "LMO":
        return dataclasses.replace(self, radius=float(radius))

    def _r(self) -> float:
        if self.radius is None:
            raise ConfigError(f"{type(self).__name__} has no radius: set radius= or use radius_from / sfw_refine")
        return self.radius

    def __post_init__(self) -> None:
        r = self.radius
        if r is not None and (isinstance(r, bool) or not isinstance(r, (int, float)) or not 0 < r < math.inf):
            raise ConfigError(f"radius={r!r} must be a positive number")
        k = getattr(self, "k", 1)
        if isinstance(k, bool) or not isinstance(k, (int, float)) or not k > 0 or (isinstance(k, float) and k > 1):
            raise ConfigError(f"k={k!r} must be a count (int ≥ 1) or a fraction in (0, 1]")


@dataclass(frozen=True)
class L2Ball(LMO):
    """C = {‖x‖₂ ≤ r}: v = argmin_{‖v‖₂≤r} ⟨g, v⟩ = −r·g/‖g‖₂."""

    radius: float | None = None

    def lmo(self, g: Tensor) -> Tensor:
        return -self._r() * g / g.norm().clamp(min=_TINY)

    def norm(self, x: Tensor) -> float:
        return float(x.detach().double().norm())


def _top_entries(g: Tensor, k: int | float) -> tuple[Tensor, Tensor]:
    """g flattened (n,) and the indices of its k largest |gᵢ|."""
    flat = g.reshape(-1)
    return flat, torch.topk(flat.abs(), k_of(k, flat.numel(), "entries"), sorted=False).indices


@dataclass(frozen=True)
class KSparsePolytope(LMO):
    """C = conv{v ∈ {0, ±r}ⁿ : ‖v‖₀ ≤ k} = {‖x‖∞ ≤ r, ‖x‖₁ ≤ k·r}.

    v = argmin_{v ∈ C} ⟨g, v⟩ = −r·sign(g) on the k largest |gᵢ|, 0 elsewhere;
    norm(x) = max(‖x‖∞, ‖x‖₁/k).
    """

    k: int | float = 1
    radius: float | None = None

    def lmo(self, g: Tensor) -> Tensor:
        flat, top = _top_entries(g, self.k)
        v = torch.zeros_like(flat)
        v[top] = -self._r() * torch.sign(flat[top])
        return v.reshape(g.shape)

    def norm(self, x: Tensor) -> float:
        a = x.detach().abs().reshape(-1).double()
        return float(torch.maximum(a.max(), a.sum() / k_of(self.k, a.numel(), "entries")))

    def diameter(self, x: Tensor) -> float:
        return 2 * self._r() * math.sqrt(k_of(self.k, x.numel(), "entries"))


@dataclass(frozen=True)
class KSupportBall(LMO):
    """k-support norm ball C = conv{v : ‖v‖₀ ≤ k, ‖v‖₂ ≤ r}.

    v = argmin_{v ∈ C} ⟨g, v⟩ = −r·g_K/‖g_K‖₂, g_K = g on its k largest |gᵢ| (0 elsewhere).
    """

    k: int | float = 1
    radius: float | None = None

    def lmo(self, g: Tensor) -> Tensor:
        flat, top = _top_entries(g, self.k)
        v = torch.zeros_like(flat)
        v[top] = flat[top]
        return (-self._r() * v / v.norm().clamp(min=_TINY)).reshape(g.shape)

    def norm(self, x: Tensor) -> float:
        return k_support_norm(x, k_of(self.k, x.numel(), "entries"))


@dataclass(frozen=True)
class GroupKSupport(LMO):
    """Group k-support ball over rows (filters): C = conv{V : ≤ k non-zero rows, ‖V‖_F ≤ r}.

    Rows are the output units of a weight (out, *rest). v = −r·G_K/‖G_K‖_F with G_K = g on the
    k rows of largest ℓ2 norm; norm(x) = k-support norm of the vector of row norms.
    """

    k: int | float = 1
    radius: float | None = None
    joinable = False

    def lmo(self, g: Tensor) -> Tensor:
        G = _matrix(g)  # (out, rest)
        top = torch.topk(G.norm(dim=1), k_of(self.k, G.shape[0], "rows"), sorted=False).indices
        v = torch.zeros_like(G)
        v[top] = G[top]
        return (-self._r() * v / v.norm().clamp(min=_TINY)).reshape(g.shape)

    def norm(self, x: Tensor) -> float:
        rows = _matrix(x.detach()).double().norm(dim=1)
        return k_support_norm(rows, k_of(self.k, rows.numel(), "rows"))


@dataclass(frozen=True)
class SpectralKSupport(LMO):
    """Spectral k-support ball C = conv{V : rank V ≤ k, ‖V‖_F ≤ r} (conv kernels as (out, in·kh·kw)).

    v = argmin_{v ∈ C} ⟨g, v⟩ = −r·U_k diag(σ_k) V_kᵀ / ‖σ_k‖₂ from the k leading singular
    triplets of g (block power iteration, seeded); ⟨g, v⟩ = −r‖σ_k‖₂. norm(x) = k-support norm of σ(x).
    """

    k: int | float = 1
    radius: float | None = None
    iters: int = 16
    seed: int = 0
    joinable = False

    def _triplets(self, g: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        G = _matrix(g)
        return top_singular(G, k_of(self.k, min(G.shape), "singular values"), iters=self.iters, oversample=8,
                            seed=self.seed, tol=None)

    def lmo(self, g: Tensor) -> Tensor:
        U, S, Vh = self._triplets(g)  # (m, k), (k,), (k, n)
        return (-self._r() * (U * (S / S.norm().clamp(min=_TINY))) @ Vh).reshape(g.shape)

    def norm(self, x: Tensor) -> float:
        s = torch.linalg.svdvals(_matrix(x.detach()).double())
        return k_support_norm(s, k_of(self.k, s.numel(), "singular values"))


@dataclass(frozen=True)
class SpectralKSparse(SpectralKSupport):
    """Spectral k-sparse polytope C = {σ₁(x) ≤ r, ‖x‖_* ≤ k·r}, the spectral analogue of
    `KSparsePolytope`: v = −r·U_k V_kᵀ (all k singular values at r); norm = max(σ₁, Σσ/k).
    Its vertices have Frobenius norm r√k; the ball of radius r/√k has the LMO −r·U_kV_kᵀ/√k."""

    def lmo(self, g: Tensor) -> Tensor:
        U, _, Vh = self._triplets(g)
        return (-self._r() * U @ Vh).reshape(g.shape)

    def norm(self, x: Tensor) -> float:
        s = torch.linalg.svdvals(_matrix(x.detach()).double())
        return float(torch.maximum(s.max(), s.sum() / k_of(self.k, s.numel(), "singular values")))

    def diameter(self, x: Tensor) -> float:
        return 2 * self._r() * math.sqrt(k_of(self.k, min(_matrix(x).shape), "singular values"))


@dataclass(frozen=True)
class NuclearBall(SpectralKSupport):
    """Nuclear-norm ball C = {‖x‖_* ≤ r}: v = −r·u₁v₁ᵀ (leading singular pair of g)."""

    k: int | float = 1

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.k != 1 or not isinstance(self.k, int):
            raise ConfigError(f"k={self.k!r}: the nuclear ball has k = 1; use SpectralKSupport for k > 1")

    def norm(self, x: Tensor) -> float:
        return float(torch.linalg.svdvals(_matrix(x.detach()).double()).sum())


