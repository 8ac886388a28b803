"""The LC family's value objects: the schedule (`LCConfig`), a step's record, the result, and
what a user L step is told."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Mapping

import torch
from torch import Tensor, nn

from .errors import ConfigError
from .recipe import Group
from .schemes.base import Theta, merge_lc_defaults
from .train import Guard


@dataclass(frozen=True)
class LCConfig:
    """Schedule and optimizer of the LC family of methods.

    μₖ = mu0·mu_growthᵏ; L step k trains `first_epochs` (k = 0) or `epochs` epochs of SGD at
    learning rate lr·lr_decayᵏ, clipped to lr_clip/μₖ for the compressed weights.
    mu0, mu_growth and weight_decay left as None are taken from the schemes' `lc_defaults`
    (1e-3, ×1.15, 0 for pruning and quantization; 1e-2, ×1.1, 5e-4 for low rank), the growth
    rescaled to the number of steps so that μ always ends where 40 steps would take it.
    """

    steps: int = 40
    epochs: int = 5
    first_epochs: int | None = 10
    mu0: float | None = None
    mu_growth: float | None = None
    penalty: str = "al"
    tol: float = 1e-7
    lr: float = 0.05
    lr_decay: float = 0.98
    lr_clip: float = 1.0
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float | None = None

    def __post_init__(self) -> None:
        def pos(name: str, integer: bool = False, zero: bool = False) -> None:
            v = getattr(self, name)
            ok = isinstance(v, int) if integer else isinstance(v, (int, float)) and math.isfinite(v)
            if isinstance(v, bool) or not ok or v < 0 or (v == 0 and not zero):
                raise ConfigError(f"{name}={v!r} must be a {'whole' if integer else ''} number "
                                  f"{'≥ 0' if zero else '> 0'}".replace("  ", " "))
        pos("steps", True), pos("epochs", True, True), pos("lr")
        pos("lr_decay"), pos("lr_clip"), pos("tol", zero=True), pos("momentum", zero=True)
        for name, zero in (("mu0", False), ("mu_growth", False), ("weight_decay", True)):
            if getattr(self, name) is not None:
                pos(name, zero=zero)
        if self.first_epochs is not None:
            pos("first_epochs", True, True)
        if self.penalty not in ("al", "qp"):
            raise ConfigError(f"penalty={self.penalty!r} must be 'al' (augmented Lagrangian) or 'qp' (quadratic penalty)")
        if self.momentum >= 1:
            raise ConfigError(f"momentum={self.momentum!r} must be in [0, 1)")

    def resolve(self, groups: list[Group]) -> "LCConfig":
        """This config with every None filled from the schemes' defaults. The family's growth is
        for 40 steps; with another number of steps it is rescaled so that μ ends where 40 steps
        would have taken it: growth = a^(39/(steps − 1))."""
        d = merge_lc_defaults([g.scheme for g in groups])
        if self.steps > 1:
            d["mu_growth"] = d["mu_growth"] ** (39 / (self.steps - 1))
        return replace(self, **{k: v for k, v in d.items() if getattr(self, k) is None})

    def mu(self, k: int) -> float:
        return self.mu0 * self.mu_growth ** k

    def epochs_at(self, k: int) -> int:
        return self.first_epochs if k == 0 and self.first_epochs is not None else self.epochs

    @property
    def total_epochs(self) -> int:
        return sum(self.epochs_at(k) for k in range(self.steps))


@dataclass
class StepRecord:
    """One LC / iDC step: μ, mean task loss of the L step's last epoch, relative feasibility
    gap ‖w − Δ(θ)‖²/‖w‖², the metric of the feasible model Δ(θ) (None without eval data)."""

    step: int
    mu: float
    lr: float
    loss: float
    gap: float
    metric: float | None
    seconds: float


@dataclass
class Result:
    """The feasible compressed model (weights = Δ(θ)), θ per group, and the run's history."""

    model: nn.Module
    thetas: dict[str, Theta]
    groups: list[Group]
    method: str
    history: list[StepRecord] = field(default_factory=list)
    metric: float | None = None
    timings: dict[str, float] = field(default_factory=dict)
    #: times a non-finite loss or weight made training restore its last good state
    recoveries: int = 0
    #: the schedule that ran, with the schemes' defaults filled in
    config: LCConfig | None = None

    def bits(self) -> int:
        """Bits of θ over all groups (the compressed parameters only)."""
        return sum(g.bits(self.thetas[g.name]) for g in self.groups)

    def dense_bits(self) -> int:
        """Bits of the compressed parameters stored dense."""
        params = dict(self.model.named_parameters())
        return sum(params[p].numel() * params[p].element_size() * 8 for g in self.groups for p in g.params)

    @property
    def ratio(self) -> float:
        """Compression ratio of the compressed parameters, dense bits / θ bits."""
        return self.dense_bits() / max(1, self.bits())


@dataclass
class LStepContext:
    """What a user L-step function is told: the step, μ, the learning-rate cap and the data."""

    step: int
    mu: float
    lr: float
    epochs: int
    device: torch.device
    data: Mapping[str, Any]
    guard: Guard


#: A user L step: lstep(model, penalty, ctx) trains `model` in place on its task loss + penalty(),
#: where penalty() is μ/2‖w − Δ(θ) − λ/μ‖² as a differentiable scalar; returns the task loss or None.
LStep = Callable[[nn.Module, Callable[[], Tensor], LStepContext], Any]
