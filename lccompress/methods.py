"""Every compression method behind one call: the LC family, and Frank-Wolfe training then DC.

    compress(model, recipe, data, method=…)    "dc", "idc", "lc", "finetune", "acdc" (lccompress.lc);
                                               "cram" (lccompress.cram, then "dc");
                                               "sfw", "fw-grow" (lccompress.fw, then "dc")
    one_shot(model, params, keep= | rank=)     magnitude pruning or SVD truncation by DC

`lc` and `fw` are siblings that never import each other; this module composes them.
"""

from __future__ import annotations

import time
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from . import distributed, lc
from .cram import DEFAULT_RHO, cram_refine
from .errors import ConfigError
from .fw import GROW_DEFAULTS, SFW_DEFAULTS, GrowSet, constraints_for, fw_grow, sfw_refine
from .lc import LCConfig, Result
from .recipe import Recipe
from .schemes import LowRank, Prune, RowL1Ball, SparseRowL1Ball
from .train import as_data, resolve_device
from .util import kappa

METHODS = lc.METHODS + ("cram", "sfw", "fw-grow")


def compress(model: nn.Module, recipe: Recipe, data: Any = None, *, method: str = "lc",
             config: LCConfig = LCConfig(), device: str | torch.device = "auto", seed: int = 0,
             sfw: Mapping[str, Any] | None = None, cram: Mapping[str, Any] | None = None,
             **options: Any) -> Result:
    """Compress a trained model by `method`; the input model is not changed.

    Methods: "dc", "idc", "lc", "finetune", "acdc" (`lccompress.lc.compress`, which documents
    `options`: loss, metric, lstep, callback, on_epoch, state_dir, resume); "cram" (CrAM⁺ training
    of the dense model, `lccompress.cram`, for LC's budget in optimizer steps with `config`'s
    optimizer, lr and weight decay, `cram` options rho (default 0.05) and plus, then one-shot DC); "sfw" (stochastic Frank-Wolfe
    refinement inside the recipe's matching norm balls, `fw.SFW_DEFAULTS`, then one-shot DC);
    "fw-grow" (the compressed weights grow from zero by Frank-Wolfe on the distillation loss
    against the model, inside each group's set (`grow_sets`), so within its budget by
    construction; then DC, which keeps them all; `fw.GROW_DEFAULTS`). `sfw` overrides
    `fw.SFW_DEFAULTS`.
    """
    if method not in METHODS:
        raise ConfigError(f"method={method!r} must be one of {', '.join(METHODS)}")
    if method in lc.METHODS:
        return lc.compress(model, recipe, data, method=method, config=config, device=device, seed=seed, **options)
    if not isinstance(recipe, Recipe):
        raise ConfigError(f"recipe={recipe!r} is not a Recipe")
    d = as_data(data)
    if "train" not in d and options.get("lstep") is None:
        raise ConfigError(f"method {method!r} trains, so it needs training data (or an lstep function)")
    if options.get("lstep") is not None:
        raise ConfigError(f"method {method!r} trains with its own steps; lstep= does not apply")
    dev = resolve_device(device)
    t = time.perf_counter()
    tally: dict[str, float] = {}
    dev = distributed.setup(dev)
    if distributed.active():  # under torchrun each process trains on its shard, gradients averaged
        d = {**d, "train": distributed.shard(d["train"], seed, dev)}
    if method == "cram":
        cfg = config.resolve(recipe.groups(model))
        try:
            length: int | None = len(d["train"])
        except TypeError:
            length = None
        plan = cfg.plan(length)
        if plan is None:
            raise ConfigError("cram needs its budget in optimizer steps: a training loader with a len(), or a budget")
        trained = cram_refine(model, d, recipe, iterations=sum(plan), lr=cfg.lr, optimizer=cfg.optimizer,
                              momentum=cfg.momentum, weight_decay=cfg.weight_decay, amp=cfg.amp,
                              rho=(cram or {}).get("rho", DEFAULT_RHO), plus=(cram or {}).get("plus", True),
                              loss=options.get("loss"), device=dev,
                              seed=seed, on_step=_progress(options.get("on_progress"), sum(plan)), tally=tally)
    elif method == "sfw":
        trained = sfw_refine(model, d, constraints_for(recipe, model), loss=options.get("loss"), device=dev,
                             seed=seed, **{**SFW_DEFAULTS, **(sfw or {})})
    else:
        trained = fw_grow(model, model, d, sets=grow_sets(recipe, model), device=dev, seed=seed, **GROW_DEFAULTS)
    seconds = time.perf_counter() - t
    steps = sum(plan) if method == "cram" else None
    r = lc.compress(trained, recipe, d, method="dc", config=config, loss=options.get("loss"),
                    metric=options.get("metric"), device=dev, seed=seed)
    r.method = method
    if steps is not None:
        r.budget = {**r.budget, "steps": steps, "epochs": steps / length if length else None,
                    "samples": int(tally.get("samples", 0)) * distributed.world(), "processes": distributed.world()}
    r.timings = {**r.timings, "lstep": seconds, "total": r.timings.get("total", 0.0) + seconds}
    return r


def grow_sets(recipe: Recipe, model: nn.Module) -> list[GrowSet]:
    """fw-grow's set per group of a recipe: Prune(keep | count) → the box k-sparse polytope with its
    count (joint over a joint group); SparseRowL1Ball(κ, …) → row ℓ1 balls of radius κ with its
    budget (per row, or in all); RowL1Ball(κ) → row ℓ1 balls alone. The ball schemes are those of
    implicit layers' A (well-posed when κ < 1)."""
    out: list[GrowSet] = []
    for g in recipe.groups(model):
        s, n = g.scheme, g.shape.numel()
        rows = g.shape[0] if len(g.shape) else 1
        if isinstance(s, Prune):
            out.append(GrowSet(tuple(g.params), s.kappa(n)))
        elif isinstance(s, SparseRowL1Ball) and s.per_row:
            per = kappa(n // rows, keep=s.keep, count=s.count, what="weights per row")
            out.append(GrowSet(tuple(g.params), per * rows, kappa=s.kappa, row_count=per))
        elif isinstance(s, SparseRowL1Ball):
            out.append(GrowSet(tuple(g.params), kappa(n, keep=s.keep, count=s.count), kappa=s.kappa))
        elif isinstance(s, RowL1Ball):
            out.append(GrowSet(tuple(g.params), n, kappa=s.kappa))
        else:
            raise ConfigError(f"fw-grow grows sparse or row-ℓ1-ball constraints (Prune, SparseRowL1Ball, RowL1Ball), "
                              f"not {type(s).__name__} ({g.name})")
    return out


def _progress(on_progress: Any, total: int) -> Any:
    return None if on_progress is None else (lambda done: on_progress(done, total))


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
    """One-shot compression without training, by direct compression ("dc"): magnitude pruning
    Prune(keep | count), one global top-κ over `params` when `joint`, or truncated SVD
    LowRank(rank) per tensor. Returns the `Result` (model = Δ(θ), θ, bits)."""
    if (rank is None) == (keep is None and count is None):
        raise ConfigError("one_shot needs either keep / count (pruning) or rank (low rank)")
    params = [params] if isinstance(params, str) else list(params)
    if rank is not None:
        recipe = Recipe.single(params, LowRank(rank))
    else:
        recipe = Recipe.single(params, Prune(keep=keep, count=count), joint=joint)
    return lc.compress(model, recipe, method="dc", config=LCConfig(), device=device)
