"""CrAM: compression-aware minimization (Peste, Vladu, Kurtic, Lampert, Alistarh, ICLR 2023).

Training whose gradient is taken at the compressed point, so that the dense model stays accurate
when it is compressed one-shot afterwards, at one level or at several. One step (CrAM⁺, the
paper's variant that also keeps the dense model accurate):

    g = ∇L(w)                                   the dense gradient
    w̃ = Δ(Π(w + ρ·g))                           compress after an ascent step of size ρ
    w ← optimizer step with ∇L(w̃) + g           (plus=False: ∇L(w̃) alone, plain CrAM)

∇L(w̃) is applied to w as is (the straight-through rule of the paper: the C step is not
differentiated). With several recipes (levels), step t compresses with recipe t mod levels, so
one dense model learns to survive each of them (CrAM-Multi, cycled rather than sampled).

    cram_refine(model, data, recipes, iterations=…)   → the trained dense model (input unchanged)

`lccompress.compress(method="cram")` follows it with direct compression at the recipe, at the
same budget in optimizer steps as LC; `lccompress.api.multilevel(method="cram")` stores the
dense model's nested levels. A step costs two forward and two backward passes and one C step
per level compressed, so a cheap C step (pruning's top-k) suits it best.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call

from . import distributed
from .errors import ConfigError
from .modelio import as_loss
from .recipe import Recipe
from .train import Guard, LossFn, OptStepper, as_data, cosine, resolve_device, seeded, train_loop
from .util import copy_module

#: ρ, the ascent step before the C step: the paper's range for image models is 0.05–0.1 (SGD)
DEFAULT_RHO = 0.05

#: cram_refine's options for a multi-level file (`api.multilevel`), measured on B1's MLP at the
#: levels 50/20/10/5 % (benchmarks/implicit_digits.py, seeds 3–5): AdamW at lr 1e-3 (the
#: single-level method's default, LC's) gave 2.93/2.67/2.40/1.87 % error, SGD with momentum at
#: lr 0.01 2.47/2.33/2.27/2.53 %: flatter over the levels
MULTILEVEL_DEFAULTS: dict[str, Any] = {"optimizer": "sgd", "lr": 0.01, "momentum": 0.9}


def cram_refine(
    model: nn.Module,
    data: Any,
    recipes: Recipe | Sequence[Recipe],
    *,
    iterations: int,
    lr: float = 1e-3,
    rho: float = DEFAULT_RHO,
    plus: bool = True,
    optimizer: str = "adamw",
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    loss: LossFn | None = None,
    amp: str | None = None,
    device: str | torch.device = "cpu",
    seed: int = 0,
    on_step: Callable[[int], None] | None = None,
    tally: dict[str, float] | None = None,
) -> nn.Module:
    """CrAM(⁺) training of a copy of `model` for `iterations` optimizer steps, the learning rate
    from `lr` down a cosine; returns the dense model. Every trainable parameter trains; those the
    recipes name are the ones compressed at each step. Under torchrun, give each process its
    shard of the data: gradients (the ascent's included) are averaged over the processes, so the
    weights stay identical on all of them. `tally` accumulates "steps" and "samples" (this
    process's). Same seed, same bytes."""
    recipes = [recipes] if isinstance(recipes, Recipe) else list(recipes)
    if not recipes or not all(isinstance(r, Recipe) for r in recipes):
        raise ConfigError(f"recipes={recipes!r} must be a Recipe or a non-empty list of them")
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
        raise ConfigError(f"iterations={iterations!r} must be a positive whole number")
    for name, v in (("lr", lr), ("rho", rho)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0 or \
                (name == "lr" and v == 0):
            raise ConfigError(f"{name}={v!r} must be a {'positive' if name == 'lr' else 'non-negative'} number")
    if isinstance(model, torch.jit.ScriptModule):
        raise ConfigError("cram needs a Python module (TorchScript cannot run with swapped-in weights)")
    d = as_data(data)
    if "train" not in d:
        raise ConfigError("cram trains: pass a training DataLoader or {'train': ...}")
    dev = resolve_device(device)
    model = copy_module(model).to(dev)
    params = dict(model.named_parameters())
    levels = [r.groups(model) for r in recipes]
    trainable = [p for p in params.values() if p.requires_grad]
    task = as_loss(loss)
    count = [0]

    def objective(x: Any, y: Any) -> tuple[Tensor, Tensor]:
        groups = levels[count[0] % len(levels)]
        count[0] += 1
        dense_loss, _ = task.on(model, x, y)
        grads = torch.autograd.grad(dense_loss, trainable, allow_unused=True)
        g = {n: t for n, t in zip((n for n, p in params.items() if p.requires_grad), grads)}
        with torch.no_grad():
            ascent = {n: params[n].detach() + rho * g[n] if g[n] is not None else params[n].detach()
                      for grp in groups for n in grp.params}
            target: dict[str, Tensor] = {}
            for grp in groups:
                target.update(grp.decompress(grp.compress(ascent)))
        # w̃ with the gradient of w: ∂L(w̃)/∂w̃ lands on w (the C step is not differentiated)
        tilde = {n: params[n] + (t.to(params[n].dtype) - params[n]).detach() for n, t in target.items()}
        compressed_loss, _ = task.on(lambda *a, **k: functional_call(model, tilde, a, k), x, y)
        obj = compressed_loss
        if plus:  # + ⟨g, w⟩, whose gradient is the dense gradient g already computed
            obj = obj + sum((t.detach() * p).sum() for p, t in zip(trainable, grads) if t is not None)
        return compressed_loss, obj

    stepper = OptStepper([(trainable, lr)], optimizer=optimizer, momentum=momentum, weight_decay=weight_decay)
    hooks = distributed.average_gradients(trainable)  # under torchrun: as DDP would
    try:
        with seeded(seed, dev):
            model.train()
            train_loop(objective, d["train"], stepper, iterations=iterations, device=dev,
                       lr_factor=lambda e: cosine(e, iterations), guard=Guard(), where="CrAM", on_step=on_step,
                       amp=amp, tally=tally)
    finally:
        for h in hooks:
            h.remove()
    return model


__all__ = ["DEFAULT_RHO", "MULTILEVEL_DEFAULTS", "cram_refine"]
