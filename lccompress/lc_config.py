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


#: The default budget's bound: without --budget or explicit epochs, a run takes at most this many
#: optimizer steps in all, whatever the loader's size.
DEFAULT_CAP = 5000

#: Learning rates by optimizer when none is given.
DEFAULT_LR = {"sgd": 0.05, "adamw": 1e-3}


@dataclass(frozen=True)
class LCConfig:
    """Schedule, budget and optimizer of the LC family of methods.

    μₖ = mu0·mu_growthᵏ. L step k trains `first_epochs` (k = 0) or `epochs` epochs (fractions
    allowed: passes continue from one L step to the next) — or, with `budget`, that many optimizer
    steps in all, split over the L steps in the same proportions (the first takes
    first_epochs/epochs shares) — at learning rate lr·lr_decayᵏ. `cap` bounds the total when no
    budget is given (the epochs are scaled down to fit). The optimizer is SGD (momentum, Nesterov;
    its learning rate for the compressed weights clipped to lr_clip/μₖ, the pull in the gradient)
    or AdamW (the pull as an exact proximal step, `train.Pull`). mu0, mu_growth and weight_decay
    left as None are taken from the schemes' `lc_defaults` (1e-3, ×1.15, 0 for pruning and
    quantization; 1e-2, ×1.1, 5e-4 for low rank); growth and lr_decay are rescaled to the number
    of steps so that μ and the learning rate always end where 40 steps would take them.

    `tail` is LC's last share of the budget in optimizer steps (None: 0.2, or 0.5 with low rank):
    after the LC steps, θ itself (kept values, codebook entries, factors) and the dense parameters
    train from the LC point, the learning rate from lr down a cosine, like fine-tuning (an LC run
    that becomes feasible early gives the tail what it leaves). It needs the budget in steps: a
    `budget`, or a training loader with a len().
    """

    steps: int = 40
    epochs: float = 5
    first_epochs: float | None = 10
    budget: int | None = None
    cap: int | None = None
    mu0: float | None = None
    mu_growth: float | None = None
    penalty: str = "al"
    tol: float = 1e-7
    optimizer: str = "adamw"
    lr: float | None = None
    lr_decay: float = 0.98
    lr_clip: float = 1.0
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float | None = None
    amp: str = "off"
    #: how the L step applies the pull: "grad" (in the gradient, SGD's lr clipped to lr_clip/μ),
    #: "prox" (an exact proximal step after each optimizer step), "auto" (prox for AdamW, grad for SGD)
    pull: str = "auto"
    #: LC's last share of the budget, training θ itself (see above); None: the schemes' default
    tail: float | None = None
    #: AC/DC's compressed / decompressed phase pairs before its final compressed phase (`acdc`)
    cycles: int = 4

    def __post_init__(self) -> None:
        def pos(name: str, integer: bool = False, zero: bool = False) -> None:
            v = getattr(self, name)
            ok = isinstance(v, int) if integer else isinstance(v, (int, float)) and math.isfinite(v)
            if isinstance(v, bool) or not ok or v < 0 or (v == 0 and not zero):
                raise ConfigError(f"{name}={v!r} must be a {'whole' if integer else ''} number "
                                  f"{'≥ 0' if zero else '> 0'}".replace("  ", " "))
        pos("steps", True), pos("epochs", zero=True), pos("cycles", True)
        pos("lr_decay"), pos("lr_clip"), pos("tol", zero=True), pos("momentum", zero=True)
        for name, zero in (("mu0", False), ("mu_growth", False), ("weight_decay", True), ("lr", False),
                           ("first_epochs", True)):
            if getattr(self, name) is not None:
                pos(name, zero=zero)
        for name in ("budget", "cap"):
            if getattr(self, name) is not None:
                pos(name, True)
        if self.budget is not None and self.budget < self.steps:
            raise ConfigError(f"budget={self.budget} optimizer steps is less than one per LC step ({self.steps}); "
                              "lower the steps or raise the budget")
        if self.tail is not None and (isinstance(self.tail, bool) or not isinstance(self.tail, (int, float))
                                      or not 0 <= self.tail < 1):
            raise ConfigError(f"tail={self.tail!r} must be a share of the budget in [0, 1)")
        if self.penalty not in ("al", "qp"):
            raise ConfigError(f"penalty={self.penalty!r} must be 'al' (augmented Lagrangian) or 'qp' (quadratic penalty)")
        if self.momentum >= 1:
            raise ConfigError(f"momentum={self.momentum!r} must be in [0, 1)")
        if self.optimizer not in DEFAULT_LR:
            raise ConfigError(f"optimizer={self.optimizer!r} must be one of {', '.join(DEFAULT_LR)}")
        if self.pull not in ("auto", "grad", "prox"):
            raise ConfigError(f"pull={self.pull!r} must be auto, grad or prox")
        if self.amp not in ("off", "bf16", "fp16"):
            raise ConfigError(f"amp={self.amp!r} must be off, bf16 or fp16")

    def resolve(self, groups: list[Group]) -> "LCConfig":
        """This config with every None filled from the schemes' and the optimizer's defaults. The
        family's growth is for 40 steps; with another number of steps it is rescaled so that μ ends
        where 40 steps would have taken it: growth = a^(39/(steps − 1)); so is lr_decay."""
        d = merge_lc_defaults([g.scheme for g in groups])
        d.pop("curvature_scale")
        d["lr"] = DEFAULT_LR[self.optimizer]
        out = replace(self, **{k: v for k, v in d.items() if getattr(self, k) is None})
        if self.steps > 1:
            if self.mu_growth is None:
                out = replace(out, mu_growth=out.mu_growth ** (39 / (self.steps - 1)))
            out = replace(out, lr_decay=self.lr_decay ** (39 / (self.steps - 1)))
        return out

    def mu(self, k: int) -> float:
        return self.mu0 * self.mu_growth ** k

    def epochs_at(self, k: int) -> float:
        return self.first_epochs if k == 0 and self.first_epochs is not None else self.epochs

    @property
    def total_epochs(self) -> float:
        return sum(self.epochs_at(k) for k in range(self.steps))

    def plan(self, length: int | None) -> list[int] | None:
        """Optimizer steps of each L step, given the training loader's batches per pass (None when
        it has no len()); None means whole epochs (integer epochs, no budget, unknown length)."""
        weights = [self.epochs_at(k) for k in range(self.steps)]
        total = self.budget
        if total is None:
            if length is not None:
                each = [round(w * length) for w in weights]
                if self.cap is None or sum(each) <= self.cap:
                    return each
                total = self.cap
            elif any(w != int(w) for w in weights):
                raise ConfigError("fractional epochs need a training loader with a len(); give a budget in "
                                  "optimizer steps instead (--budget)")
            else:
                return None
        return split(total, weights)

    def limits(self, length: int | None) -> list[int] | None:
        """With whole epochs of a loader without len() (`plan` is None), the cap's share of each L
        step: it stops there if its epochs take longer (an endless stream stays bounded)."""
        if length is not None or self.budget is not None or self.cap is None:
            return None
        return split(self.cap, [self.epochs_at(k) for k in range(self.steps)])


def split(total: int, weights: list[float]) -> list[int]:
    """`total` as whole numbers in proportion to `weights` (largest remainders), each ≥ 1 where its
    weight is > 0 and the total allows."""
    s = sum(weights)
    if s <= 0:
        weights, s = [1.0] * len(weights), float(len(weights))
    raw = [total * w / s for w in weights]
    out = [int(r) for r in raw]
    for i in sorted(range(len(raw)), key=lambda i: (out[i] - raw[i], i))[: total - sum(out)]:
        out[i] += 1
    for i in range(len(out)):
        while out[i] == 0 and weights[i] > 0:
            j = max(range(len(out)), key=lambda j: out[j])
            if out[j] <= 1:
                break
            out[j] -= 1
            out[i] += 1
    return out


@dataclass
class StepRecord:
    """One LC / iDC step: μ, mean task loss of the L step's last epoch, relative feasibility
    gap ‖w − Δ(θ)‖²/‖w‖², the metric of the feasible model Δ(θ) (None without eval data).
    `phase` is "lc" (or "idc"), "tail" for LC's tail and "finetune" for fine-tuning, which train θ
    itself (μ and the gap 0)."""

    step: int
    mu: float
    lr: float
    loss: float
    gap: float
    metric: float | None
    seconds: float
    phase: str = "lc"


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
    #: what training took: {"steps": optimizer steps, "samples": rows seen, "epochs": steps per pass}
    budget: dict[str, Any] = field(default_factory=dict)

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
    epochs: float
    device: torch.device
    data: Mapping[str, Any]
    guard: Guard


#: A user L step: lstep(model, penalty, ctx) trains `model` in place on its task loss + penalty(),
#: where penalty() is μ/2‖w − Δ(θ) − λ/μ‖² as a differentiable scalar; returns the task loss or None.
LStep = Callable[[nn.Module, Callable[[], Tensor], LStepContext], Any]
