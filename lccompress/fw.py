"""Stochastic Frank-Wolfe (SFW) refinement of a trained model inside compression-friendly balls.

Zimmer, Spiegel & Pokutta (arXiv 2205.11921): train in a convex set C whose extreme points are
compressed (sparse, few filters, low rank), so that the iterates, convex combinations of few
extreme points, lose little when compressed one-shot afterwards. One SFW step on a block x:

    m ← β·m + (1 − β)·g                      m₀ = g, g the stochastic gradient of x
    v = LMO(m) = argmin_{v ∈ C} ⟨m, v⟩
    η = clamp(lr·‖m‖₂ / ‖x − v‖₂, 0, 1)       rescale="gradient" (None: η = lr; "diameter": lr/diam C)
    x ← (1 − η)·x + η·v                      a convex combination: x never leaves C

Each LMO is a frozen dataclass with the constraint's `radius` r (None: `slack` × the reference
weights' norm in the constraint's norm, so the reference itself is feasible when slack ≥ 1).
`k` is a count (int) or a fraction of the entries, groups or singular values (float in (0, 1]).

    sfw_refine(model, data, constraints, ...)   SFW from the reference → a compression-robust model
    fw_grow(model, reference, data, count=...)  FW from zero on a distillation loss → ≤ count non-zeros
    one_shot(model, params, keep= | rank=)      magnitude pruning or SVD truncation (DC, no training)
    prune_filters(model, params, keep)          structured: zero the rows (filters) of smallest ℓ2 norm
"""

from __future__ import annotations

import copy
import dataclasses
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import ConfigError, DivergenceError
from .lc import LCConfig, Result, _data, compress, resolve_device
from .recipe import Recipe, match
from .schemes import LowRank, Prune
from .train import LossFn, cross_entropy, split_batch

_TINY = 1e-30


# ----------------------------------------------------------------------------- helpers
def _k_of(k: int | float, n: int, what: str) -> int:
    """κ from a count (int ≥ 1, at most n) or a fraction in (0, 1] (κ = round(k·n), at least 1)."""
    if isinstance(k, bool) or not isinstance(k, (int, float)):
        raise ConfigError(f"k={k!r} must be a count (int ≥ 1) or a fraction in (0, 1]")
    if isinstance(k, int):
        if not 1 <= k <= n:
            raise ConfigError(f"k={k} must be between 1 and the {n} {what} it applies to")
        return k
    if not 0 < k <= 1:
        raise ConfigError(f"k={k!r} as a fraction must be in (0, 1]")
    return max(1, min(n, round(k * n)))


def _matrix(x: Tensor) -> Tensor:
    """A weight (out, *rest) as the matrix (out, prod(rest)); conv kernels become (out, in·kh·kw)."""
    if x.dim() < 2:
        raise ConfigError(f"a matrix constraint needs a weight with ≥ 2 dimensions, got shape {tuple(x.shape)}")
    return x.reshape(x.shape[0], -1)


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


def _top_singular(g: Tensor, k: int, iters: int, seed: int) -> tuple[Tensor, Tensor, Tensor]:
    """U (m, k), σ (k,), Vh (k, n) of the k leading singular triplets of g (m, n).

    Block power (subspace) iteration from a seeded Gaussian start, oversampled by 8 columns,
    then an exact SVD of the small projection Qᵀg; a full SVD when that block would cover g.
    """
    m, n = g.shape
    q = min(k + 8, m, n)
    if q == min(m, n):
        U, S, Vh = torch.linalg.svd(g, full_matrices=False)
        return U[:, :k], S[:k], Vh[:k]
    gen = torch.Generator(device=g.device).manual_seed(seed)
    Q = torch.linalg.qr(g @ torch.randn(n, q, generator=gen, device=g.device, dtype=g.dtype)).Q  # (m, q)
    for _ in range(iters):
        Q = torch.linalg.qr(g @ torch.linalg.qr(g.T @ Q).Q).Q
    Ub, S, Vh = torch.linalg.svd(Q.T @ g, full_matrices=False)  # (q, q), (q,), (q, n)
    return Q @ Ub[:, :k], S[:k], Vh[:k]


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
    return flat, torch.topk(flat.abs(), _k_of(k, flat.numel(), "entries"), sorted=False).indices


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
        return float(torch.maximum(a.max(), a.sum() / _k_of(self.k, a.numel(), "entries")))

    def diameter(self, x: Tensor) -> float:
        return 2 * self._r() * math.sqrt(_k_of(self.k, x.numel(), "entries"))


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
        return k_support_norm(x, _k_of(self.k, x.numel(), "entries"))


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
        top = torch.topk(G.norm(dim=1), _k_of(self.k, G.shape[0], "rows"), sorted=False).indices
        v = torch.zeros_like(G)
        v[top] = G[top]
        return (-self._r() * v / v.norm().clamp(min=_TINY)).reshape(g.shape)

    def norm(self, x: Tensor) -> float:
        rows = _matrix(x.detach()).double().norm(dim=1)
        return k_support_norm(rows, _k_of(self.k, rows.numel(), "rows"))


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
        return _top_singular(G, _k_of(self.k, min(G.shape), "singular values"), self.iters, self.seed)

    def lmo(self, g: Tensor) -> Tensor:
        U, S, Vh = self._triplets(g)  # (m, k), (k,), (k, n)
        return (-self._r() * (U * (S / S.norm().clamp(min=_TINY))) @ Vh).reshape(g.shape)

    def norm(self, x: Tensor) -> float:
        s = torch.linalg.svdvals(_matrix(x.detach()).double())
        return k_support_norm(s, _k_of(self.k, s.numel(), "singular values"))


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
        return float(torch.maximum(s.max(), s.sum() / _k_of(self.k, s.numel(), "singular values")))

    def diameter(self, x: Tensor) -> float:
        return 2 * self._r() * math.sqrt(_k_of(self.k, min(_matrix(x).shape), "singular values"))


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


# ----------------------------------------------------------------------------- SFW
@dataclass
class _Block:
    """One constraint over one parameter, or over several flattened and concatenated (joint)."""

    names: tuple[str, ...]
    params: list[Tensor]
    lmo: LMO

    def get(self, ts: Sequence[Tensor]) -> Tensor:
        return ts[0] if len(ts) == 1 else torch.cat([t.reshape(-1) for t in ts])

    def put(self, x: Tensor) -> None:
        if len(self.params) == 1:
            self.params[0].copy_(x)
            return
        for p, t in zip(self.params, torch.split(x, [p.numel() for p in self.params])):
            p.copy_(t.reshape(p.shape))


def _blocks(constraints: Mapping[Any, LMO], params: Mapping[str, Tensor], slack: float) -> list[_Block]:
    """Resolve keys (a name or glob: one constraint per matched parameter; a tuple: one joint
    constraint over all matched) and fix each radius from the starting weights."""
    if not isinstance(slack, (int, float)) or isinstance(slack, bool) or not 0 < slack < math.inf:
        raise ConfigError(f"slack={slack!r} must be a positive number")
    taken: dict[str, Any] = {}
    out: list[_Block] = []
    for key, lmo in constraints.items():
        if not isinstance(lmo, LMO):
            raise ConfigError(f"constraint for {key!r} is {lmo!r}, not an LMO")
        pats = (key,) if isinstance(key, str) else tuple(key)
        names = match(pats, params)
        for n in names:
            if n in taken:
                raise ConfigError(f"parameter {n!r} is constrained by both {taken[n]!r} and {key!r}")
            taken[n] = key
        groups = [names] if not isinstance(key, str) else [[n] for n in names]
        for g in groups:
            if len(g) > 1 and not lmo.joinable:
                raise ConfigError(f"{type(lmo).__name__} needs each tensor's own shape; constrain {g} one by one")
            b = _Block(tuple(g), [params[n] for n in g], lmo)
            x = b.get([p.detach() for p in b.params])
            if lmo.radius is None:
                r = lmo.radius_from(x, slack)
                if not r > 0:
                    raise ConfigError(f"the weights of {g} are all zero: give the constraint a radius")
                b.lmo = lmo.at(r)
            out.append(b)
    return out


class _SFW:
    """The SFW step over blocks; `lmo_fn(block, m)` may replace the block's LMO (fw_grow)."""

    def __init__(self, blocks: list[_Block], lr: float, momentum: float, rescale: str | None,
                 lmo_fn: Callable[[_Block, Tensor], Tensor] | None = None) -> None:
        if rescale not in ("gradient", "diameter", None):
            raise ConfigError(f"rescale={rescale!r} must be 'gradient', 'diameter' or None")
        self.blocks, self.lr, self.beta, self.rescale = blocks, lr, momentum, rescale
        self.lmo_fn = lmo_fn or (lambda b, m: b.lmo.lmo(m))
        self.m: list[Tensor | None] = [None] * len(blocks)

    @torch.no_grad()
    def step(self, lr_factor: float = 1.0) -> None:
        for i, b in enumerate(self.blocks):
            if all(p.grad is None for p in b.params):
                continue
            g = b.get([p.grad if p.grad is not None else torch.zeros_like(p) for p in b.params])
            m = self.m[i] = g.clone() if self.m[i] is None else self.m[i].mul_(self.beta).add_(g, alpha=1 - self.beta)
            x = b.get([p.detach() for p in b.params])
            v = self.lmo_fn(b, m)
            lr = self.lr * lr_factor
            if self.rescale == "gradient":
                d = float((x - v).norm())
                eta = lr * float(m.norm()) / d if d > 0 else 0.0
            elif self.rescale == "diameter":
                eta = lr / b.lmo.diameter(x)
            else:
                eta = lr
            eta = min(max(eta, 0.0), 1.0)
            if eta > 0:
                b.put(torch.lerp(x, v, eta))  # (1 − η)·x + η·v


def _loader(data: Any) -> Iterable:
    d = _data(data)
    if "train" not in d:
        raise ConfigError("this method trains: pass a training DataLoader or {'train': ...}")
    return d["train"]


def _positive(name: str, v: Any, integer: bool = False) -> None:
    ok = isinstance(v, int) if integer else isinstance(v, (int, float)) and math.isfinite(v)
    if isinstance(v, bool) or not ok or v <= 0:
        raise ConfigError(f"{name}={v!r} must be a positive {'integer' if integer else 'number'}")


def _fw_train(model: nn.Module, loader: Iterable, blocks: list[_Block], *, epochs: int, lr: float,
              momentum: float, rescale: str | None, objective: Callable[[Any, Any], Tensor],
              device: torch.device, seed: int, schedule: str, dense_lr: float,
              lmo_fn: Callable[[_Block, Tensor], Tensor] | None = None,
              callback: Callable[[int, nn.Module], None] | None = None) -> None:
    """SFW on the blocks, SGD with momentum at dense_lr on every other trainable parameter."""
    _positive("epochs", epochs, integer=True), _positive("lr", lr)
    if not 0 <= momentum < 1:
        raise ConfigError(f"momentum={momentum!r} must be in [0, 1)")
    if schedule not in ("constant", "cosine"):
        raise ConfigError(f"schedule={schedule!r} must be 'constant' or 'cosine'")
    sfw = _SFW(blocks, lr, momentum, rescale, lmo_fn)
    constrained = {id(p) for b in blocks for p in b.params}
    dense = [p for p in model.parameters() if p.requires_grad and id(p) not in constrained]
    _positive("dense_lr", dense_lr)
    opt = torch.optim.SGD(dense, lr=dense_lr, momentum=momentum) if dense else None
    devices = [device.index or 0] if device.type == "cuda" else []
    step = 0
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        model.train()
        for e in range(epochs):
            f = 1.0 if schedule == "constant" else 0.5 * (1 + math.cos(math.pi * e / epochs))
            if opt is not None:
                for pg in opt.param_groups:
                    pg["lr"] = dense_lr * f
            for batch in loader:
                x, y = split_batch(batch, device)
                obj = objective(x, y)
                if not torch.isfinite(obj):
                    raise DivergenceError(f"non-finite loss at epoch {e}; lower lr={lr}")
                model.zero_grad(set_to_none=True)
                obj.backward()
                sfw.step(f)
                if opt is not None:
                    opt.step()
                step += 1
                if callback is not None:
                    callback(step, model)


def sfw_refine(
    model: nn.Module,
    data: Any,
    constraints: Mapping[Any, LMO],
    *,
    epochs: int,
    lr: float,
    momentum: float = 0.9,
    rescale: str | None = "gradient",
    slack: float = 1.0,
    dense_lr: float = 0.01,
    schedule: str = "constant",
    loss: LossFn | None = None,
    device: str | torch.device = "cpu",
    seed: int = 0,
    callback: Callable[[int, nn.Module], None] | None = None,
) -> nn.Module:
    """SFW from the reference weights; returns a new model (the input is not changed).

    `constraints` maps a parameter name or glob (one constraint per matched tensor) or a tuple of
    them (one joint constraint over the concatenation; vector LMOs only) to an LMO. An LMO without
    a radius gets r = slack·norm(w_ref); with slack < 1 the reference is first scaled onto the
    ball, x₀ = w_ref·r/norm(w_ref). Every other trainable parameter (biases, norm layers) takes
    plain SGD steps at `dense_lr` with the same momentum. `schedule="cosine"` anneals both
    learning rates per epoch; `callback(step, model)` runs after every step. Same seed → same bytes.

    rescale="gradient" (η = lr·‖m‖/‖x − v‖) moves a converged reference very little, since its
    gradients are near zero, and overshoots once lr is raised enough to move it; rescale=None, a
    fixed fraction η = lr per step, is what works for refinement on benchmark B1 (lr 0.015, cosine,
    40 epochs, one joint KSparsePolytope(k=0.03): see benchmarks/fw_digits.py).
    """
    dev = resolve_device(device)
    loader = _loader(data)
    model = copy.deepcopy(model).to(dev)
    blocks = _blocks(constraints, dict(model.named_parameters()), slack)
    with torch.no_grad():
        for b in blocks:
            x = b.get([p.detach() for p in b.params])
            n = b.lmo.norm(x)
            if n > b.lmo.radius:
                b.put(x * (b.lmo.radius / n))
    loss = loss or cross_entropy
    _fw_train(model, loader, blocks, epochs=epochs, lr=lr, momentum=momentum, rescale=rescale,
              objective=lambda x, y: loss(model(x), y), device=dev, seed=seed, schedule=schedule,
              dense_lr=dense_lr, callback=callback)
    return model


def compressible(model: nn.Module) -> list[str]:
    """Names of the parameters with ≥ 2 dimensions (linear and conv weights)."""
    return [n for n, p in model.named_parameters() if p.dim() >= 2]


def distill_loss(kind: str = "kl", temperature: float = 1.0) -> Callable[[Tensor, Tensor], Tensor]:
    """Distillation loss of student logits against the teacher's: T²·KL(softmax(t/T) ‖ softmax(s/T))
    ("kl") or the mean squared difference of the logits ("mse")."""
    _positive("temperature", temperature)
    if kind == "kl":
        T = float(temperature)
        return lambda s, t: F.kl_div(F.log_softmax(s / T, -1), F.log_softmax(t / T, -1),
                                     reduction="batchmean", log_target=True) * T * T
    if kind == "mse":
        return lambda s, t: F.mse_loss(s, t)
    raise ConfigError(f"distill={kind!r} must be 'kl' or 'mse'")


def fw_grow(
    model: nn.Module,
    reference: nn.Module,
    data: Any,
    *,
    count: int,
    epochs: int,
    lr: float,
    params: Sequence[str] | None = None,
    grow_epochs: int | None = None,
    momentum: float = 0.9,
    slack: float = 1.0,
    dense_lr: float = 0.01,
    distill: str = "kl",
    temperature: float = 1.0,
    schedule: str = "cosine",
    device: str | torch.device = "cpu",
    seed: int = 0,
) -> nn.Module:
    """Grow a sparse model from zero by Frank-Wolfe on the distillation loss against `reference`.

    The weights `params` (default: every ≥ 2-D weight) of a copy of `model` start at zero; the other
    parameters keep `model`'s values and take SGD steps. Labels are not used: the loss compares
    the student's logits with the reference's. The constraint is one joint k-sparse polytope, with
    k = count, in coordinates scaled per tensor: C = {x : |xᵢ| ≤ r_l, Σᵢ |xᵢ|/r_l ≤ count},
    r_l = slack·‖w_l‖∞ of `model`'s tensor l. Its LMO is restricted to the face of vertices supported on the candidate set
    S ∪ N, where S is the support grown so far and N the ≤ b coordinates outside S with the largest
    |mᵢ|·r_l, b = min(count − |S|, ⌈count / (grow_epochs·batches)⌉):

        v = −r_l·sign(mᵢ) on S ∪ N,  0 elsewhere;   S ← S ∪ {i : vᵢ ≠ 0}

    so |S| ≤ count at every step and the result has at most `count` non-zeros by construction
    (the support fills during the first `grow_epochs`, default epochs // 2, then only its values move).
    """
    dev = resolve_device(device)
    loader = _loader(data)
    model = copy.deepcopy(model).to(dev)
    teacher = copy.deepcopy(reference).to(dev).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    named = dict(model.named_parameters())
    names = list(params) if params is not None else compressible(model)
    unknown = [n for n in names if n not in named]
    if unknown or not names:
        raise ConfigError(f"params={unknown or names!r} name no parameter; parameters are: {', '.join(named)}")
    total = sum(named[n].numel() for n in names)
    if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= total:
        raise ConfigError(f"count={count!r} must be an integer between 1 and {total}, the weights it applies to")
    _positive("epochs", epochs, integer=True), _positive("slack", slack)
    grow_epochs = max(1, epochs // 2) if grow_epochs is None else grow_epochs
    _positive("grow_epochs", grow_epochs, integer=True)
    try:
        batches = len(loader)  # type: ignore[arg-type]
    except TypeError:
        raise ConfigError("fw_grow needs a training loader with a length (to spread the growth)") from None
    per_step = math.ceil(count / (grow_epochs * max(1, batches)))
    with torch.no_grad():
        r = torch.cat([torch.full((named[n].numel(),), slack * float(named[n].abs().max()), device=dev) for n in names])
        if not bool((r > 0).all()):
            raise ConfigError("a weight to grow is all zero in `model`, so it gives no radius")
        for n in names:
            named[n].zero_()
    support = torch.zeros(total, dtype=torch.bool, device=dev)
    block = _Block(tuple(names), [named[n] for n in names], L2Ball(1.0))  # lmo replaced below

    def lmo(b: _Block, m: Tensor) -> Tensor:  # m (total,)
        score = m.abs() * r
        left = count - int(support.sum())
        cand = support.clone()
        if left > 0:
            outside = torch.where(support | (score == 0), torch.zeros_like(score), score)
            k = min(left, per_step, int((outside > 0).sum()))
            if k > 0:
                cand[torch.topk(outside, k, sorted=False).indices] = True
        v = torch.where(cand, -r * torch.sign(m), torch.zeros_like(m))
        support.logical_or_(v != 0)
        return v

    kd = distill_loss(distill, temperature)

    def objective(x: Any, y: Any) -> Tensor:
        with torch.no_grad():
            t = teacher(x)
        return kd(model(x), t)

    _fw_train(model, loader, [block], epochs=epochs, lr=lr, momentum=momentum, rescale="gradient",
              objective=objective, device=dev, seed=seed, schedule=schedule, dense_lr=dense_lr, lmo_fn=lmo)
    return model


#: sfw_refine options for refinement before one-shot compression, tuned on benchmark B1's digits
#: MLP (benchmarks/fw_digits.py); used by sweep(methods=["sfw"])
SFW_DEFAULTS: dict[str, Any] = {"epochs": 40, "lr": 0.015, "rescale": None, "schedule": "cosine", "dense_lr": 0.01}
#: fw_grow's defaults: gradient-rescaled steps from zero, as measured in benchmarks/fw_digits.py
GROW_DEFAULTS: dict[str, Any] = {"epochs": 40, "lr": 5.0, "dense_lr": 0.01}


def constraints_for(recipe: Recipe, model: nn.Module) -> dict[Any, LMO]:
    """The SFW ball matching each group of a recipe: Prune(keep | count) → KSparsePolytope with the
    same k (one joint polytope for a joint group), LowRank(r) → SpectralKSupport(k = r), anything
    else → an L2Ball (a norm bound without a compression prior)."""
    out: dict[Any, LMO] = {}
    for g in recipe.groups(model):
        key: Any = g.params[0] if len(g.params) == 1 else tuple(g.params)
        s = g.scheme
        if isinstance(s, Prune):
            out[key] = KSparsePolytope(k=s.keep if s.keep is not None else s.count)
        elif isinstance(s, LowRank):
            out[key] = SpectralKSupport(k=min(s.rank, g.shape[0], g.shape.numel() // g.shape[0]))
        else:
            out[key] = L2Ball()
    return out


# ----------------------------------------------------------------------------- one-shot compression
def one_shot(
    model: nn.Module,
    params: str | Sequence[str],
    *,
    keep: float | None = None,
    count: int | None = None,
    rank: int | None = None,
    joint: bool = True,
    device: str | torch.device = "cpu",
) -> Result:
    """One-shot compression without training, by direct compression (`lccompress.compress`, "dc"):
    magnitude pruning Prune(keep | count), one global top-κ over `params` when `joint`, or
    truncated SVD LowRank(rank) per tensor. Returns the `Result` (model = Δ(θ), θ, bits)."""
    if (rank is None) == (keep is None and count is None):
        raise ConfigError("one_shot needs either keep / count (pruning) or rank (low rank)")
    params = [params] if isinstance(params, str) else list(params)
    if rank is not None:
        recipe = Recipe.single(params, LowRank(rank))
    else:
        recipe = Recipe.single(params, Prune(keep=keep, count=count), joint=joint)
    return compress(model, recipe, method="dc", config=LCConfig(), device=device)


def prune_filters(model: nn.Module, params: str | Sequence[str], keep: float) -> nn.Module:
    """Structured one-shot pruning: a copy of `model` with, in each tensor, all but the
    κ = max(1, round(keep·rows)) rows (output units, conv filters) of largest ℓ2 norm set to zero."""
    if isinstance(keep, bool) or not isinstance(keep, (int, float)) or not 0 < keep <= 1:
        raise ConfigError(f"keep={keep!r} must be a fraction in (0, 1]")
    model = copy.deepcopy(model)
    named = dict(model.named_parameters())
    with torch.no_grad():
        for n in [params] if isinstance(params, str) else params:
            if n not in named:
                raise ConfigError(f"{n!r} is not a parameter; parameters are: {', '.join(named)}")
            w = named[n]
            norms = _matrix(w).norm(dim=1)  # (out,)
            top = torch.topk(norms, max(1, round(keep * norms.numel())), sorted=False).indices
            mask = torch.zeros_like(norms)
            mask[top] = 1
            w.mul_(mask.reshape(-1, *[1] * (w.dim() - 1)))
    return model


__all__ = [
    "GROW_DEFAULTS", "GroupKSupport", "KSparsePolytope", "KSupportBall", "L2Ball", "LMO", "NuclearBall", "SFW_DEFAULTS",
    "SpectralKSparse", "SpectralKSupport", "compressible", "constraints_for", "distill_loss", "fw_grow",
    "k_support_norm", "one_shot", "prune_filters", "sfw_refine",
]
