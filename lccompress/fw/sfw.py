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
    fw_grow(model, reference, data, count=... | sets=[GrowSet, ...])
                                                FW from zero (distillation, or the task loss when
                                                reference=None) → ≤ count non-zeros per set, in a
                                                k-sparse polytope or, kappa given, in row ℓ1 balls
                                                (‖A‖∞ ≤ kappa: a well-posed implicit model)
    prune_filters(model, params, keep)          structured: zero the rows (filters) of smallest ℓ2 norm

Both train through the one training loop (`train.train_loop`, its NaN guard included) with the
SFW step as its stepper. This module never imports the LC algorithm: "sfw" and "fw-grow" followed
by direct compression are composed in `lccompress.api`.
"""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
from torch import Tensor, nn

from .. import distributed
from ..errors import ConfigError
from ..recipe import Recipe, Span, match
from ..schemes import LowRank, Prune
from ..modelio import as_loss, prediction
from ..train import (Guard, LossFn, as_data, cosine, distill_loss, resolve_device, seeded,
                     train_loop)
from ..util import as_matrix, kappa
from .lmo import LMO, KSparsePolytope, L2Ball, SpectralKSupport

log = logging.getLogger("lccompress")


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

    hooks = distributed.average_gradients(stepper.params)  # under torchrun: as DDP would
    try:
        with seeded(seed, device):
            model.train()
            train_loop(step_objective, loader, stepper, epochs=epochs, device=device, guard=Guard(),
                       where="Frank-Wolfe",
                       lr_factor=(lambda e: 1.0) if schedule == "constant" else (lambda e: cosine(e, epochs)),
                       on_step=None if callback is None else (lambda step: callback(step, model)))
    finally:
        for h in hooks:
            h.remove()


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


@dataclass(frozen=True)
class GrowSet:
    """One constraint of `fw_grow`, over weights that start at zero.

    kappa=None: the listed weights jointly in the box-scaled k-sparse polytope with k = count,
    C = {x : |xᵢ| ≤ r_l, Σᵢ |xᵢ|/r_l ≤ count}, r_l = slack·‖w_l‖∞ of the starting model's tensor l.
    kappa > 0: exactly one weight W, seen as the matrix (rows, D) (rows the first axis, the rest
    flattened), in the product of row ℓ1 balls C = {X : ‖X_i‖₁ ≤ kappa for every row i}, grown to
    at most `count` non-zeros in all and at most `row_count` in each row (None: no per-row cap;
    row_count needs kappa). For the state matrix A of an `ImplicitNet`, kappa < 1 keeps
    ‖A‖∞ ≤ kappa < 1 (well-posed) at every iterate. `count` is checked against the weights' size
    by `fw_grow`.
    """

    params: tuple[str, ...]
    count: int
    kappa: float | None = None
    row_count: int | None = None

    def __post_init__(self) -> None:
        ps = self.params
        if isinstance(ps, str) or not isinstance(ps, (tuple, list)) or not ps or \
                not all(isinstance(n, str) for n in ps):
            raise ConfigError(f"GrowSet params={ps!r} must be a non-empty tuple of parameter names")
        if len(set(ps)) != len(ps):
            raise ConfigError(f"GrowSet params={ps!r} names a parameter twice")
        object.__setattr__(self, "params", tuple(ps))
        _positive("GrowSet count", self.count, integer=True)
        if self.kappa is not None:
            _positive("GrowSet kappa", self.kappa)
            if len(ps) != 1:
                raise ConfigError(f"GrowSet kappa={self.kappa!r} constrains the rows of one weight; params={ps!r}")
        if self.row_count is not None:
            if self.kappa is None:
                raise ConfigError("GrowSet row_count applies only to a row-ball set (give kappa)")
            _positive("GrowSet row_count", self.row_count, integer=True)


def _as_rows(shape: torch.Size) -> tuple[int, int]:
    """(rows, D): a weight's first axis, the rest flattened; a scalar is one row of one."""
    return (shape[0], math.prod(shape[1:])) if len(shape) >= 1 else (1, 1)


@torch.no_grad()
def polytope_vertex(m: Tensor, r: Tensor, support: Tensor, per_step: int, count: int) -> Tensor:
    """fw_grow's LMO of the box-scaled k-sparse polytope {x : |xᵢ| ≤ rᵢ, Σᵢ |xᵢ|/rᵢ ≤ count},
    restricted to the candidates S ∪ N: S = `support` (bool, m.numel() entries, updated in place),
    N the ≤ min(count − |S|, per_step) coordinates outside S with the largest non-zero |mᵢ|·rᵢ.
    Returns v = −rᵢ·sign(mᵢ) on S ∪ N, 0 elsewhere (m's shape); then S ← S ∪ supp(v)."""
    shape, m = m.shape, m.reshape(-1)
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
    return v.reshape(shape)


@torch.no_grad()
def row_ball_vertex(m: Tensor, kappa: float, support: Tensor, per_step: int, count: int,
                    row_count: int | None = None) -> Tensor:
    """The LMO of the row ℓ1 balls {X : ‖X_i‖₁ ≤ kappa} restricted to a candidate set.

    M = m as the matrix (rows, D); S = `support` (bool, m.numel() entries, updated in place) the
    support so far; N the ≤ min(count − |S|, per_step) coordinates outside S with the largest
    |M_ij| > 0, in rows with |S_i| < row_count (any row when row_count is None); cand = S ∪ N.
    Over the face {X : ‖X_i‖₁ ≤ kappa, supp X_i ⊆ cand_i} the minimiser of ⟨M, V⟩ is, row by row,

        V_i = −kappa·sign(M_ij*)·e_j*,   j* = argmax_{j ∈ cand_i} |M_ij|   (0 if cand_i = ∅ or the max is 0)

    (ties: the first j). Then S ← S ∪ supp(V): each call adds at most one coordinate per row, only
    to rows below row_count, and only coordinates of N, so |S| ≤ count and |S_i| ≤ row_count
    hold at every step, and every convex combination of such V and 0 has ‖X_i‖₁ ≤ kappa."""
    rows, D = _as_rows(m.shape)
    M, S = m.reshape(rows, D), support.view(rows, D)
    score = M.abs()
    left = count - int(S.sum())
    cand = S.clone()
    if left > 0 and per_step > 0:
        blocked = S | (score == 0)
        if row_count is not None:
            blocked |= (S.sum(1) >= row_count)[:, None]
        outside = torch.where(blocked, torch.zeros_like(score), score).reshape(-1)
        k = min(left, per_step, int((outside > 0).sum()))
        if k > 0:
            cand.view(-1)[torch.topk(outside, k, sorted=False).indices] = True
    masked = torch.where(cand, score, torch.zeros_like(score))
    best, j = masked.max(1)  # (rows,): the first maximiser
    hit = best > 0
    V = torch.zeros_like(M)
    idx = torch.arange(rows, device=M.device)[hit]
    V[idx, j[hit]] = -kappa * torch.sign(M[idx, j[hit]])
    S[idx, j[hit]] = True
    return V.reshape(m.shape)


def fw_grow(
    model: nn.Module,
    reference: nn.Module | None,
    data: Any,
    *,
    count: int | None = None,
    epochs: int,
    lr: float,
    params: Sequence[str] | None = None,
    sets: Sequence[GrowSet] | None = None,
    grow_epochs: int | None = None,
    momentum: float = 0.9,
    slack: float = 1.0,
    dense_lr: float = 0.01,
    distill: str = "kl",
    temperature: float = 1.0,
    loss: LossFn | None = None,
    schedule: str = "cosine",
    device: str | torch.device = "cpu",
    seed: int = 0,
) -> nn.Module:
    """Grow sparse weights from zero by Frank-Wolfe; returns a new model (the input is not changed).

    The constraints are either `count` (with `params`, default every ≥ 2-D weight: one
    GrowSet(params, count)) or `sets`, a sequence of `GrowSet` over disjoint weights. The weights of
    every set, in a copy of `model`, start at zero; the other parameters keep `model`'s values and
    take SGD steps at `dense_lr`. The loss is the distillation loss (`distill`, `temperature`)
    between the student's and `reference`'s logits, labels unused; with reference=None it is the
    task loss `loss` on the labels (as in `sfw_refine`).

    Each set's LMO is restricted to the face of vertices supported on the candidates S ∪ N, S the
    support grown so far and N the ≤ b coordinates outside S with the largest scores,
    b = min(count − |S|, ⌈count / (grow_epochs·batches)⌉); then S ← S ∪ supp(v).

    kappa=None: one joint k-sparse polytope, k = count, in coordinates scaled per tensor,
    C = {x : |xᵢ| ≤ r_l, Σᵢ |xᵢ|/r_l ≤ count}, r_l = slack·‖w_l‖∞ of `model`'s tensor l;
    scores |mᵢ|·r_l and (`polytope_vertex`)

        v = −r_l·sign(mᵢ) on S ∪ N,  0 elsewhere.

    kappa given: row ℓ1 balls ‖X_i‖₁ ≤ kappa of one weight; scores |m_ij|, rows at `row_count`
    excluded from N, and per row one vertex −kappa·sign(m_ij*)·e_j* (`row_ball_vertex`).

    So |S| ≤ count (and |S_i| ≤ row_count) at every step and the result has at most `count`
    non-zeros per set by construction (the supports fill during the first `grow_epochs`, default
    epochs // 2, then only their values move). Steps are gradient-rescaled, η = lr·‖m‖/‖x − v‖.

    A coordinate enters S only where its gradient is non-zero, so weights whose gradient vanishes
    at zero never grow (a warning is logged for a set left empty). An `ImplicitNet` with A = B = 0
    has the state x = 0 at relu's kink; its backward takes relu'(0) = 1 there, so B (and then A)
    get gradients and grow: A in row ℓ1 balls of radius kappa < 1 (well-posed at every step), B in
    the box polytope.
    """
    dev = resolve_device(device)
    loader = _loader(data)
    model = copy.deepcopy(model).to(dev)
    teacher = None
    if reference is not None:
        if loss is not None:
            raise ConfigError("loss= applies only with reference=None; with a reference the loss is distillation")
        teacher = copy.deepcopy(reference).to(dev).eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
    named = dict(model.named_parameters())
    if sets is None:
        if count is None:
            raise ConfigError("fw_grow needs count= (with params=) or sets=")
        names = list(params) if params is not None else compressible(model)
        unknown = [n for n in names if n not in named]
        if unknown or not names:
            raise ConfigError(f"params={unknown or names!r} name no parameter; parameters are: {', '.join(named)}")
        total = sum(named[n].numel() for n in names)
        if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= total:
            raise ConfigError(f"count={count!r} must be an integer between 1 and {total}, the weights it applies to")
        sets = [GrowSet(tuple(names), count)]
    else:
        if count is not None or params is not None:
            raise ConfigError("give either count= (with params=) or sets=, not both")
        sets = [sets] if isinstance(sets, GrowSet) else list(sets)
        if not sets:
            raise ConfigError("sets= is empty: give at least one GrowSet")
    taken: dict[str, int] = {}
    for i, gs in enumerate(sets):
        if not isinstance(gs, GrowSet):
            raise ConfigError(f"sets[{i}]={gs!r} is not a GrowSet")
        unknown = [n for n in gs.params if n not in named]
        if unknown:
            raise ConfigError(f"sets[{i}] params {unknown!r} name no parameter; parameters are: {', '.join(named)}")
        for n in gs.params:
            if n in taken:
                raise ConfigError(f"parameter {n!r} is in both sets[{taken[n]}] and sets[{i}]")
            taken[n] = i
        total = sum(named[n].numel() for n in gs.params)
        if not gs.count <= total:
            raise ConfigError(f"sets[{i}] count={gs.count!r} must be an integer between 1 and {total}, "
                              f"the weights it applies to")
        if gs.row_count is not None and gs.row_count > _as_rows(named[gs.params[0]].shape)[1]:
            raise ConfigError(f"sets[{i}] row_count={gs.row_count!r} exceeds the row length "
                              f"{_as_rows(named[gs.params[0]].shape)[1]} of {gs.params[0]!r}")
    _positive("epochs", epochs, integer=True), _positive("slack", slack)
    grow_epochs = max(1, epochs // 2) if grow_epochs is None else grow_epochs
    _positive("grow_epochs", grow_epochs, integer=True)
    try:
        batches = len(loader)  # type: ignore[arg-type]
    except TypeError:
        raise ConfigError("fw_grow needs a training loader with a length (to spread the growth)") from None
    blocks: list[_Block] = []
    supports: list[Tensor] = []
    lmos: dict[int, Callable[[Tensor], Tensor]] = {}
    for gs in sets:
        names = list(gs.params)
        total = sum(named[n].numel() for n in names)
        per_step = math.ceil(gs.count / (grow_epochs * max(1, batches)))
        with torch.no_grad():
            if gs.kappa is None:
                r = torch.cat([torch.full((named[n].numel(),), slack * float(named[n].abs().max()), device=dev)
                               for n in names])
                if not bool((r > 0).all()):
                    raise ConfigError("a weight to grow is all zero in `model`, so it gives no radius")
            for n in names:
                named[n].zero_()
        support = torch.zeros(total, dtype=torch.bool, device=dev)
        span = Span("+".join(names), tuple(names), tuple(named[n].shape for n in names))
        block = _Block(span, named, L2Ball(1.0))  # its LMO is lmos[id(block)]
        if gs.kappa is None:
            lmos[id(block)] = (lambda m, r=r, s=support, b=per_step, k=gs.count: polytope_vertex(m, r, s, b, k))
        else:
            lmos[id(block)] = (lambda m, s=support, b=per_step, g=gs:
                               row_ball_vertex(m, float(g.kappa), s, b, g.count, g.row_count))
        blocks.append(block)
        supports.append(support)

    if teacher is None:
        task = as_loss(loss)

        def objective(x: Any, y: Any) -> Tensor:
            return task.on(model, x, y)[0]
    else:
        kd = distill_loss(distill, temperature)

        def objective(x: Any, y: Any) -> Tensor:
            with torch.no_grad():
                t = prediction(x(teacher))
            return kd(prediction(x(model)), t)

    _fw_train(model, loader, blocks, epochs=epochs, lr=lr, momentum=momentum, rescale="gradient",
              objective=objective, device=dev, seed=seed, schedule=schedule, dense_lr=dense_lr,
              lmo_fn=lambda b, m: lmos[id(b)](m), state=supports)
    for gs, support in zip(sets, supports):
        if not bool(support.any()):
            log.warning("fw_grow: %s grew no weight (its gradient was zero at every step)", "+".join(gs.params))
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


__all__ = ["GROW_DEFAULTS", "GrowSet", "SFW_DEFAULTS", "compressible", "constraints_for", "fw_grow",
           "polytope_vertex", "prune_filters", "row_ball_vertex", "sfw_refine"]
