"""Direct compression, iterated DC, the LC algorithm, fine-tuning with the compression fixed, and
AC/DC (alternating compressed / decompressed phases, `acdc`).

LC (Carreira-Perpiñán 2017) solves min_w L(w) s.t. w = Δ(θ) by the augmented Lagrangian:

    θ ← Π(w_ref)                                         DC start (μ → 0); μ₀ = c·κ measured
    for k = 0 … steps−1, μ = μ₀·aᵏ:
        L step  w ← argmin L(w) + μ/2‖w − Δ(θ) − λ/μ‖²   AdamW + proximal pull, or SGD (lr ≤ lr_clip/μ)
        C step  θ ← argmin ‖w − λ/μ − Δ(θ)‖²              the scheme's exact projection
        λ ← λ − μ(w − Δ(θ))                              (kept at 0 for the quadratic penalty)
        stop when ‖w − Δ(θ)‖² / ‖w‖² < tol
    tail: the rest of the budget (a share `tail` of it, and what an early stop left) trains θ's
          free parts from this θ, masks / codes / ranks fixed (`_Run.tune`, as fine-tuning does)
    return the feasible model, weights Δ(θ)
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import torch
from torch import Tensor, nn
from torch.func import functional_call

from . import distributed
from .acdc import ACDC
from .errors import ConfigError
from .lc_config import LCConfig, LStep, LStepContext, Result, StepRecord, split
from .lc_state import LCState, fingerprint
from .recipe import Recipe
from .schemes.base import Theta, merge_lc_defaults
from .modelio import as_loss, as_metric
from .modelio import split_batch
from .train import (Guard, LossFn, MetricFn, Pull, Stream, as_data, batches as iter_batches, cosine, evaluate,
                    host_rngs, loader_generators, resolve_device, rng_states, seeded, set_host_rngs, set_rng_states,
                    train_epochs)
from .util import copy_module

log = logging.getLogger("lccompress")

METHODS = ("dc", "idc", "lc", "finetune", "acdc")


def compress(
    model: nn.Module,
    recipe: Recipe,
    data: Any = None,
    *,
    method: str = "lc",
    config: LCConfig = LCConfig(),
    loss: LossFn | None = None,
    metric: MetricFn | None = None,
    lstep: LStep | None = None,
    device: str | torch.device = "auto",
    seed: int = 0,
    callback: Callable[[StepRecord], None] | None = None,
    on_progress: Callable[[int, int | None], None] | None = None,
    state_dir: str | Path | None = None,
    resume: bool = False,
) -> Result:
    """Compress a trained model by `method` ("dc", "idc", "lc", "finetune", "acdc"); the input model
    is not changed. (`lccompress.compress` adds "cram" and the Frank-Wolfe methods "sfw" and "fw-grow".)

    `data` is a training DataLoader or {"train": ..., "eval": ...}; "dc" needs none. Each batch is
    (inputs, targets). `loss(output, target)` defaults to cross-entropy and `metric(outputs,
    targets)` (over the whole eval set) to accuracy. `lstep` replaces the default L step.
    `callback(record)` follows each step and `on_progress(done, total)` each optimizer step of the
    default L step (total None when the loader has no len and the step runs whole epochs). With `state_dir`, the state after each LC / iDC step is saved there atomically, and
    `resume=True` continues from the last saved step with the same result as an unbroken run.
    """
    if method not in METHODS:
        raise ConfigError(f"method={method!r} must be one of {', '.join(METHODS)}")
    if not isinstance(recipe, Recipe):
        raise ConfigError(f"recipe={recipe!r} is not a Recipe")
    data = as_data(data)
    if method != "dc" and "train" not in data and lstep is None:
        raise ConfigError(f"method {method!r} trains, so it needs training data (or an lstep function)")
    dev = distributed.setup(resolve_device(device))
    if distributed.active() and "train" in data:
        data = {**data, "train": distributed.shard(data["train"], seed, dev)}
    run = _Run(copy_module(model).to(dev), recipe, data, config, as_loss(loss), as_metric(metric, as_loss(loss)),
               lstep, dev, callback)
    run.on_progress = on_progress
    if state_dir is not None:
        shapes = {n: p.shape for n, p in run.params.items()}
        run.state = LCState(Path(state_dir), fingerprint(method, run.cfg, recipe, seed, shapes), resume)
    with seeded(seed, dev):
        return getattr(run, method)()


#: Batches of training data the μ₀ probe measures the loss on.
PROBE_BATCHES = 8


@contextlib.contextmanager
def swapped(params: Mapping[str, Tensor], over: Mapping[str, Tensor]) -> Iterator[None]:
    """The parameters `over` names hold the given values inside, their own after (copied in and
    back, which works for TorchScript modules too, unlike torch.func.functional_call)."""
    saved = {n: params[n].detach().clone() for n in over}
    try:
        with torch.no_grad():
            for n, v in over.items():
                params[n].copy_(v)
        yield
    finally:
        with torch.no_grad():
            for n, v in saved.items():
                params[n].copy_(v)


@torch.no_grad()
def dc_curvature(model: nn.Module, loss: Any, loader: Any, device: torch.device,
                 deltas: Mapping[str, Tensor], batches: int = PROBE_BATCHES) -> tuple[float, float, float]:
    """(L(w), L(Δ(θ)), ‖w − Δ(θ)‖²): the task loss of the model as it is and with the compressed
    weights Δ(θ), in eval mode on the first `batches` training batches, and their squared distance.
    2(L(Δ) − L(w))/‖w − Δ‖² is the loss's curvature along the direction that DC moved the weights.
    The loader's and torch's RNG states are restored after, so the run's batches do not change."""
    params = dict(model.named_parameters())
    states = rng_states(loader)
    was = model.training
    model.eval()
    try:
        taken = [split_batch(b, device) for b in itertools.islice(iter_batches(loader, "training"), batches)]
        if not taken:
            raise ConfigError("the training data loader yields no batches")
        def mean_loss() -> float:
            return sum(float(loss.on(model, x, y)[0]) for x, y in taken) / len(taken)
        base = mean_loss()
        with swapped(params, deltas):
            moved = mean_loss()
    finally:
        model.train(was)
        set_rng_states(loader, states)
    dist = sum(float(((params[n].detach() - d) ** 2).sum()) for n, d in deltas.items())
    return base, moved, dist


class _Run(ACDC):
    """State of one compression run; one public method per algorithm (AC/DC's in `acdc.ACDC`)."""

    def __init__(self, model, recipe, data, config, loss, metric, lstep, device, callback) -> None:
        self.model, self.data, self.loss, self.metric = model, data, loss, metric
        self.lstep, self.device, self.callback = lstep, device, callback
        self.groups = recipe.groups(model)
        self.cfg = config.resolve(self.groups)
        #: μ₀ is measured on the problem unless given (see `fit_mu0`)
        self.mu0_free = config.mu0 is None
        self.params = dict(model.named_parameters())
        names = {p for g in self.groups for p in g.params}
        self.compressed = [self.params[n] for g in self.groups for n in g.params]
        self.dense = [p for n, p in self.params.items() if n not in names and p.requires_grad]
        self.guard = Guard()
        self.t = {"lstep": 0.0, "cstep": 0.0, "eval": 0.0}
        self.t0 = time.perf_counter()
        self.history: list[StepRecord] = []
        self.state: LCState | None = None
        self.on_progress: Callable[[int, int | None], None] | None = None
        self.stream = Stream(data["train"]) if "train" in data else None
        self.plan = self.cfg.plan(self.stream.length) if self.stream else None
        self.limits = self.cfg.limits(self.stream.length) if self.stream else None
        self.tally: dict[str, float] = {}
        self.ddp: nn.Module | None = None

    # -- resumable state ---------------------------------------------------------------------
    def restore(self) -> tuple[int, dict[str, Theta], dict[str, Tensor]] | None:
        """(next step, θ, λ) from a saved state, with weights, RNG (torch's, the loaders' generators',
        Python's `random` and numpy's global one) and history restored; or None."""
        st = self.state.load() if self.state else None
        if st is None:
            return None
        with torch.no_grad():
            for n, t in st["weights"].items():
                self.params[n].copy_(t)
        torch.set_rng_state(st["rng"])
        gens = loader_generators(self.data)
        saved = st.get("loader_rng", [])
        if len(saved) != len(gens):
            raise ConfigError(f"--resume: the data loaders hold {len(gens)} random generators, the saved run "
                              f"{len(saved)}; the batches would come in another order (start afresh without --resume)")
        for g, state in zip(gens, saved):
            g.set_state(state)
        if self.device.type == "cuda" and st.get("cuda_rng") is not None:
            torch.cuda.set_rng_state(st["cuda_rng"], self.device)
        self.guard.failures, self.guard.scale = st["guard"]
        self.tally = dict(st.get("tally", {}))
        self.cfg = replace(self.cfg, mu0=st.get("mu0", self.cfg.mu0))
        if self.stream is not None:
            self.stream.restore(st.get("stream"))
        if st.get("host_rng") is not None:  # states saved before it was recorded have none
            set_host_rngs(st["host_rng"])  # after the stream's replay, which may draw from them
        self.history = [StepRecord(**h) for h in st["history"]]
        to = lambda d: {k: v.to(self.device) for k, v in d.items()}  # noqa: E731
        return st["step"] + 1, {g: to(th) for g, th in st["thetas"].items()}, to(st["lam"])

    def checkpoint(self, step: int, thetas: Mapping[str, Theta], lam: Mapping[str, Tensor]) -> None:
        if not self.state:
            return
        if not distributed.is_main():  # process 0 saves; the others wait until it has
            distributed.barrier()
            return
        cpu = lambda d: {k: v.detach().cpu() for k, v in d.items()}  # noqa: E731
        self.state.save({
            "step": step, "weights": cpu(self.weights()), "thetas": {g: cpu(th) for g, th in thetas.items()},
            "lam": cpu(lam), "rng": torch.get_rng_state(), "host_rng": host_rngs(),
            "loader_rng": [g.get_state() for g in loader_generators(self.data)],
            "cuda_rng": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None,
            "guard": [self.guard.failures, self.guard.scale], "tally": dict(self.tally), "mu0": self.cfg.mu0,
            "stream": self.stream.state() if self.stream else None, "history": [asdict(h) for h in self.history]})
        distributed.barrier()

    # -- pieces ------------------------------------------------------------------------------
    def cstep(self, shifted: Mapping[str, Tensor], thetas: Mapping[str, Theta] | None, mu: float) -> dict[str, Theta]:
        t = time.perf_counter()
        out = {g.name: g.compress(shifted, thetas.get(g.name) if thetas else None, mu) for g in self.groups}
        distributed.check_same(out, "a C step")
        self.t["cstep"] += time.perf_counter() - t
        return out

    def deltas(self, thetas: Mapping[str, Theta]) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        for g in self.groups:
            out.update(g.decompress(thetas[g.name]))
        return out

    def weights(self) -> dict[str, Tensor]:
        return {n: p.detach() for n, p in self.params.items()}

    def evaluate(self, over: Mapping[str, Tensor]) -> float | None:
        """Metric on the eval data of the model with the weights `over` (Δ(θ) per parameter; {}
        for the model as it is), swapped into the parameters and back."""
        if "eval" not in self.data:
            return None
        t = time.perf_counter()
        was = self.model.training
        self.model.eval()
        try:
            with swapped(self.params, over):
                value, _, _ = evaluate(self.model, self.data["eval"], self.device, self.metric)
        finally:
            self.model.train(was)
        self.t["eval"] += time.perf_counter() - t
        return value

    def gap(self, d: Mapping[str, Tensor]) -> float:
        """‖w − Δ(θ)‖² / ‖w‖² over the compressed weights, given Δ(θ) per parameter."""
        num = sum(float(((self.params[n].detach() - d[n]) ** 2).sum()) for n in d)
        den = sum(float((self.params[n].detach() ** 2).sum()) for n in d)
        return num / max(den, 1e-30)

    def train(self, step: int, mu: float | None, targets: Mapping[str, Tensor] | None) -> tuple[float, float]:
        """One L step (or plain training when mu is None); returns (task loss, lr used)."""
        cfg = self.cfg
        lr = cfg.lr * cfg.lr_decay ** step
        prox = cfg.pull == "prox" or (cfg.pull == "auto" and cfg.optimizer == "adamw")
        lr_c = min(lr, cfg.lr_clip / mu) if mu and not prox else lr
        iters = self.plan[step] if self.plan is not None else None
        epochs = int(cfg.epochs_at(step)) if iters is None else None

        def penalty() -> Tensor:
            if not targets:
                return torch.zeros((), device=self.device)
            return mu / 2 * sum(((self.params[n] - t) ** 2).sum() for n, t in targets.items())

        t = time.perf_counter()
        self.model.train()
        if self.lstep is not None:
            ctx = LStepContext(step, mu or 0.0, lr_c, cfg.epochs_at(step), self.device, self.data, self.guard)
            value = self.lstep(self.model, penalty, ctx)
            task = float(value) if value is not None else float("nan")
        else:
            names = list(targets or {})
            pull = Pull([self.params[n] for n in names], [targets[n] for n in names], mu) if prox and targets else None
            task = train_epochs(self.trainer(), self.stream, [(self.compressed, lr_c), (self.dense, lr)],
                                epochs=epochs, iterations=iters, loss_fn=self.loss, device=self.device,
                                extra=penalty if targets and not prox else None, optimizer=cfg.optimizer, pull=pull,
                                momentum=cfg.momentum, nesterov=cfg.nesterov, weight_decay=cfg.weight_decay,
                                guard=self.guard, where=f"L step {step}", on_step=self.progress(iters),
                                amp=cfg.amp, tally=self.tally, limit=self.limits[step] if self.limits else None)
        self.t["lstep"] += time.perf_counter() - t
        return task, lr_c

    def trainer(self) -> Callable[..., Any]:
        """What the L step calls: the model, in DistributedDataParallel under torchrun."""
        if not distributed.active():
            return self.model
        if self.ddp is None:
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device] if self.device.type == "cuda" else None
            self.ddp = DistributedDataParallel(self.model, device_ids=ids)
        return self.ddp

    def progress(self, total: int | None) -> Callable[[int], None] | None:
        if self.on_progress is None:
            return None
        return lambda done: self.on_progress(done, total)  # type: ignore[misc]

    def budget(self) -> dict[str, float]:
        """What the run's training took: optimizer steps, samples, and those steps in epochs."""
        steps = int(self.tally.get("steps", 0))
        length = self.stream.length if self.stream else None
        return {"steps": steps, "samples": int(self.tally.get("samples", 0)) * distributed.world(),
                "epochs": steps / length if length else None, "processes": distributed.world()}

    def record(self, **kw: Any) -> None:
        rec = StepRecord(seconds=time.perf_counter() - self.t0, **kw)
        self.history.append(rec)
        log.info("step %d  mu %.3g  loss %.4g  gap %.3g  metric %s", rec.step, rec.mu, rec.loss, rec.gap, rec.metric)
        if self.callback:
            self.callback(rec)

    def finish(self, thetas: dict[str, Theta], method: str) -> Result:
        with torch.no_grad():
            for n, t in self.deltas(thetas).items():
                self.params[n].copy_(t)
        metric = self.evaluate({})
        self.t["total"] = time.perf_counter() - self.t0
        return Result(self.model, thetas, self.groups, method, self.history, metric, dict(self.t),
                      self.guard.failures, self.cfg, self.budget())

    # -- methods -----------------------------------------------------------------------------
    def dc(self) -> Result:
        """Direct compression: θ = Π(w_ref)."""
        return self.finish(self.cstep(self.weights(), None, self.cfg.mu0), "dc")

    def fit_mu0(self, thetas: Mapping[str, Theta]) -> LCConfig:
        """μ₀ from the problem itself, unless given: c·κ, κ = 2(L(Δ(θ_DC)) − L(w))/‖w − Δ(θ_DC)‖² the
        loss's curvature along the DC move (on the first training batches), c the scheme family's
        `curvature_scale` (chosen so that the digits MLP gets the family's former μ₀). It scales with
        the loss, so CE classifiers, MSE regressors and embedders, distillation and LMs start alike.
        The family's fixed μ₀ stays where κ cannot be measured (no training data, a user L step,
        DC that does not raise the loss)."""
        if not self.mu0_free or self.stream is None or self.lstep is not None:
            return self.cfg
        base, moved, dist = dc_curvature(self.model, self.loss, self.data["train"], self.device,
                                         self.deltas(thetas))
        base, moved, dist = self.agree([base, moved, dist])
        kappa = 2 * (moved - base) / dist if dist > 0 else float("nan")
        if not (math.isfinite(kappa) and kappa > 0):
            log.info("DC does not raise the training loss (%.4g → %.4g): μ₀ stays %.3g", base, moved, self.cfg.mu0)
            return self.cfg
        c = merge_lc_defaults([g.scheme for g in self.groups])["curvature_scale"]
        self.cfg = replace(self.cfg, mu0=c * kappa)
        log.info("μ₀ = %.3g from the loss's curvature along the DC move (%.4g → %.4g)", self.cfg.mu0, base, moved)
        return self.cfg

    def agree(self, values: list[float]) -> list[float]:
        """Values measured on this process's data, made the same on every process (the mean)."""
        return distributed.mean(values)

    def lc(self) -> Result:
        start, thetas, lam = self.restore() or (0, None, None)
        cfg = self.cfg
        # LC's tail: the last share of a budget known in steps trains θ itself (`tune`); not for
        # TorchScript (no swapped-in weights) or a user L step (its own training)
        tail = self.plan is not None and bool(cfg.tail) and self.lstep is None \
            and not isinstance(self.model, torch.jit.ScriptModule)
        total = sum(self.plan) if tail else 0
        if tail:
            self.plan = split(total - round(cfg.tail * total), [cfg.epochs_at(k) for k in range(cfg.steps)])
        if thetas is None:
            thetas = self.cstep(self.weights(), None, cfg.mu0)
            lam = {n: torch.zeros_like(self.params[n]) for g in self.groups for n in g.params}
            cfg = self.fit_mu0(thetas)
        elif self.history and self.history[-1].gap < cfg.tol:
            start = cfg.steps  # the saved run had already converged
        for k in range(start, cfg.steps):
            mu = cfg.mu(k)
            d = self.deltas(thetas)
            targets = {n: d[n] + lam[n] / mu for n in d}
            task, lr = self.train(k, mu, targets)
            w = self.weights()
            thetas = self.cstep({n: w[n] - lam[n] / mu if n in lam else w[n] for n in w}, thetas, mu)
            d = self.deltas(thetas)
            if cfg.penalty == "al":
                for n in lam:
                    lam[n] -= mu * (w[n] - d[n])
            gap = self.gap(d)
            self.record(step=k, mu=mu, lr=lr, loss=task, gap=gap, metric=self.evaluate(d))
            self.checkpoint(k, thetas, lam)
            if gap < cfg.tol:
                break
        rest = total - int(self.tally.get("steps", 0)) if tail else 0
        if rest > 0:  # the rest of the budget (the tail, and what an early stop left) trains θ itself
            thetas, task = self.tune(thetas, rest, None, cfg.lr, "LC's tail")
            self.record(step=len(self.history), mu=0.0, lr=cfg.lr, loss=task, gap=0.0, phase="tail",
                        metric=self.evaluate(self.deltas(thetas)))
        return self.finish(thetas, "lc")

    def idc(self) -> Result:
        """Iterated DC: from Δ(θ), train without constraint, compress again; repeat."""
        cfg = self.cfg
        start, thetas, _ = self.restore() or (0, None, None)
        if thetas is None:
            thetas = self.cstep(self.weights(), None, cfg.mu0)
        for k in range(start, cfg.steps):
            with torch.no_grad():
                for n, t in self.deltas(thetas).items():
                    self.params[n].copy_(t)
            task, lr = self.train(k, None, None)
            thetas = self.cstep(self.weights(), thetas, cfg.mu(k))
            d = self.deltas(thetas)
            self.record(step=k, mu=cfg.mu(k), lr=lr, loss=task, gap=self.gap(d), metric=self.evaluate(d), phase="idc")
            self.checkpoint(k, thetas, {})
        return self.finish(thetas, "idc")

    def finetune(self) -> Result:
        """DC, then train θ's free parts (kept values, codebook entries, factors) and the dense
        parameters for as many epochs as LC would, cosine learning rate; masks, codes, ranks fixed."""
        cfg = self.cfg
        thetas = self.cstep(self.weights(), None, cfg.mu0)
        iters = sum(self.plan) if self.plan is not None else None
        thetas, task = self.tune(thetas, iters, None if iters else int(cfg.total_epochs), cfg.lr, "fine-tuning",
                                 sum(self.limits) if self.limits else None)
        self.record(step=0, mu=0.0, lr=cfg.lr, loss=task, gap=0.0, metric=self.evaluate(self.deltas(thetas)),
                    phase="finetune")
        return self.finish(thetas, "finetune")

    def tune(self, thetas: dict[str, Theta], iters: int | None, epochs: int | None, lr: float, where: str,
             limit: int | None = None, lr_factor: Callable[[float], float] | None = None
             ) -> tuple[dict[str, Theta], float]:
        """Train θ's free parts (kept values, codebook entries, factors) and the dense parameters
        from `thetas` for `iters` optimizer steps (or whole `epochs`), the learning rate from `lr`
        down a cosine (or lr × lr_factor(steps or epochs done)); masks, codes, ranks stay fixed.
        Returns (θ, the task loss)."""
        cfg = self.cfg
        if isinstance(self.model, torch.jit.ScriptModule):
            raise ConfigError("finetune needs a Python module (TorchScript cannot run with swapped-in "
                              "weights); give the model as code with --model")
        thetas = {name: dict(th) for name, th in thetas.items()}
        free: list[Tensor] = []
        for g in self.groups:
            th = thetas[g.name]
            fan = g.scheme.fanout(th)
            for key in g.scheme.trainable(th):
                th[key] = th[key].detach().clone().requires_grad_(True)
                if key in fan:  # shared entries step by the mean gradient of the weights they stand for
                    scale = 1.0 / fan[key].clamp(min=1).to(th[key].dtype)
                    th[key].register_hook(lambda grad, s=scale: grad * s)
                free.append(th[key])
        total = iters if iters is not None else epochs

        def forward(*args: Any, **kwargs: Any) -> Any:
            return functional_call(self.model, self.deltas(thetas), args, kwargs)

        t = time.perf_counter()
        self.model.train()
        hooks = distributed.average_gradients(free + self.dense)  # under torchrun: as DDP would
        try:
            task = train_epochs(forward, self.stream, [(free, lr), (self.dense, lr)],
                                epochs=None if iters else total, iterations=iters, loss_fn=self.loss,
                                device=self.device, optimizer=cfg.optimizer, momentum=cfg.momentum,
                                nesterov=cfg.nesterov, weight_decay=cfg.weight_decay,
                                lr_factor=lr_factor or (lambda e: cosine(e, total)), guard=self.guard, where=where,
                                on_step=self.progress(iters), amp=cfg.amp, tally=self.tally, limit=limit)
        finally:
            for h in hooks:
                h.remove()
        self.t["lstep"] += time.perf_counter() - t
        return {name: {k: v.detach() for k, v in th.items()} for name, th in thetas.items()}, task
