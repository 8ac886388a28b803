"""Stochastic Frank-Wolfe (SFW) refinement of a trained model inside compression-friendly balls,
and sparse models grown from zero by Frank-Wolfe.

Zimmer, Spiegel & Pokutta (arXiv 2205.11921): train in a convex set C whose extreme points are
compressed (sparse, few filters, low rank), so that the iterates, convex combinations of few
extreme points, lose little when compressed one-shot afterwards. One SFW step on a block x:

    m ← β·m + (1 − β)·g                      m₀ = g, g the stochastic gradient of x
    v = LMO(m) = argmin_{v ∈ C} ⟨m, v⟩
    η = clamp(lr·‖m‖₂ / ‖x − v‖₂, 0, 1)       rescale="gradient" (None: η = lr; "diameter": lr/diam C)
    x ← (1 − η)·x + η·v                      a convex combination: x never leaves C

    sfw_refine(model, data, constraints, ...)   SFW from the reference → a compression-robust model
    fw_grow(model, reference, data, count=...)  FW from zero on a distillation loss → ≤ count non-zeros
    prune_filters(model, params, keep)          structured: zero the rows (filters) of smallest ℓ2 norm

Both train through the one training loop (`train.train_loop`, its NaN guard included) with the
SFW step as its stepper. This module never imports the LC algorithm: "sfw" and "fw-grow" followed
by direct compression are composed in `lccompress.api`.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from ..recipe import Recipe, Span, match
from ..schemes import LowRank, Prune
from ..modelio import as_loss, prediction
from ..train import (Guard, LossFn, as_data, cosine, distill_loss, resolve_device, seeded,
                     train_loop)
from ..util import as_matrix, kappa
from .lmo import LMO, KSparsePolytope, L2Ball, SpectralKSupport


@dataclass
class _Block:
    """One constraint over a span of the model's parameters (one tensor, or several joint)."""

    span: Span
    params: Mapping[str, Tensor]
    lmo: LMO

    @property
    def tensors(self) -> list[Tensor]:
        return [self.params[n] for n in self.span.params]

    def get(self) -> Tensor:
        return self.span.gather({n: self.params[n].detach() for n in self.span.params})

    def grad(self) -> Tensor:
        return self.span.gather({n: self.params[n].grad if self.params[n].grad is not None
                                 else torch.zeros_like(self.params[n]) for n in self.span.params})

    def put(self, x: Tensor) -> None:
        for n, t in self.span.scatter(x).items():
            self.params[n].copy_(t)


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
            b = _Block(Span("+".join(g), tuple(g), tuple(params[n].shape for n in g)), params, lmo)
            if lmo.radius is None:
                r = lmo.radius_from(b.get(), slack)
                if not r > 0:
                    raise ConfigError(f"the weights of {g} are all zero: give the constraint a radius")
                b.lmo = lmo.at(r)
            out.append(b)
    return out


class _SFWStepper:
    """The SFW step on each block, plain SGD with momentum on every other trainable parameter
    (`train.Stepper`); `state` are extra tensors the LMOs change (snapshotted with the weights)."""

    def __init__(self, blocks: list[_Block], dense: list[Tensor], *, lr: float, momentum: float,
                 rescale: str | None, dense_lr: float, lmo_fn: Callable[[_Block, Tensor], Tensor] | None = None,
                 state: Sequence[Tensor] = ()) -> None:
        if rescale not in ("gradient", "diameter", None):
            raise ConfigError(f"rescale={rescale!r} must be 'gradient', 'diameter' or None")
        self.blocks, self.lr, self.beta, self.rescale = blocks, lr, momentum, rescale
        self.lmo_fn = lmo_fn or (lambda b, m: b.lmo.lmo(m))
        self.m: list[Tensor | None] = [None] * len(blocks)
        self.dense_lr, self.factor, self.state = dense_lr, 1.0, list(state)
        self.opt = torch.optim.SGD(dense, lr=dense_lr, momentum=momentum) if dense else None
        self.params = [p for b in blocks for p in b.tensors] + dense

    def set_lr(self, factor: float) -> None:
        self.factor = factor
        if self.opt is not None:
            for pg in self.opt.param_groups:
                pg["lr"] = self.dense_lr * factor

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    def step(self) -> None:
        self._sfw_step()
        if self.opt is not None:
            self.opt.step()

    @torch.no_grad()
    def _sfw_step(self) -> None:
        for i, b in enumerate(self.blocks):
            if all(p.grad is None for p in b.tensors):
                continue
            g = b.grad()
            if not bool(torch.isfinite(g).all()):
                continue  # the NaN guard restores the epoch; no LMO on non-finite gradients
            m = self.m[i] = g.clone() if self.m[i] is None else self.m[i].mul_(self.beta).add_(g, alpha=1 - self.beta)
            x = b.get()
            v = self.lmo_fn(b, m)
            lr = self.lr * self.factor
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

    def snapshot(self) -> list[Tensor]:
        return [t.detach().clone() for t in self.params + self.state]

    def restore(self, snap: list[Tensor]) -> None:
        with torch.no_grad():
            for t, s in zip(self.params + self.state, snap):
                t.copy_(s)
        self.m = [None] * len(self.blocks)
        if self.opt is not None:
            self.opt.state.clear()


def _loader(data: Any) -> Iterable:
    d = as_data(data)
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
              lmo_fn: Callable[[_Block, Tensor], Tensor] | None = None, state: Sequence[Tensor] = (),
              callback: Callable[[int, nn.Module], None] | None = None) -> None:
    """SFW on the blocks, SGD with momentum at dense_lr on every other trainable parameter."""
    _positive("epochs", epochs, integer=True), _positive("lr", lr)
    if not 0 <= momentum < 1:
        raise ConfigError(f"momentum={momentum!r} must be in [0, 1)")
    if schedule not in ("constant", "cosine"):
        raise ConfigError(f"schedule={schedule!r} must be 'constant' or 'cosine'")
    _positive("dense_lr", dense_lr)
    constrained = {id(p) for b in blocks for p in b.tensors}
    dense = [p for p in model.parameters() if p.requires_grad and id(p) not in constrained]
    stepper = _SFWStepper(blocks, dense, lr=lr, momentum=momentum, rescale=rescale, dense_lr=dense_lr,
                          lmo_fn=lmo_fn, state=state)

    def step_objective(x: Any, y: Any) -> tuple[Tensor, Tensor]:
        obj = objective(x, y)
        return obj, obj

    with seeded(seed, device):
        model.train()
        train_loop(step_objective, loader, stepper, epochs=epochs, device=device, guard=Guard(), where="Frank-Wolfe",
                   lr_factor=(lambda e: 1.0) if schedule == "constant" else (lambda e: cosine(e, epochs)),
                   on_step=None if callback is None else (lambda step: callback(step, model)))


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
            x = b.get()
            n = b.lmo.norm(x)
            if n > b.lmo.radius:
                b.put(x * (b.lmo.radius / n))
    task = as_loss(loss)
    _fw_train(model, loader, blocks, epochs=epochs, lr=lr, momentum=momentum, rescale=rescale,
              objective=lambda x, y: task.on(model, x, y)[0], device=dev, seed=seed, schedule=schedule,
              dense_lr=dense_lr, callback=callback)
    return model


def compressible(model: nn.Module) -> list[str]:
    """Names of the parameters with ≥ 2 dimensions (linear and conv weights)."""
    return [n for n, p in model.named_parameters() if p.dim() >= 2]


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
    span = Span("+".join(names), tuple(names), tuple(named[n].shape for n in names))
    block = _Block(span, named, L2Ball(1.0))  # its LMO is lmo() below

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
            t = prediction(x(teacher))
        return kd(prediction(x(model)), t)

    _fw_train(model, loader, [block], epochs=epochs, lr=lr, momentum=momentum, rescale="gradient",
              objective=objective, device=dev, seed=seed, schedule=schedule, dense_lr=dense_lr, lmo_fn=lmo,
              state=[support])
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


# ----------------------------------------------------------------------------- structured one-shot
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
            norms = as_matrix(w, "filter pruning").norm(dim=1)  # (out,)
            top = torch.topk(norms, kappa(norms.numel(), keep=keep), sorted=False).indices
            mask = torch.zeros_like(norms)
            mask[top] = 1
            w.mul_(mask.reshape(-1, *[1] * (w.dim() - 1)))
    return model


__all__ = ["GROW_DEFAULTS", "SFW_DEFAULTS", "compressible", "constraints_for", "fw_grow", "prune_filters",
           "sfw_refine"]
