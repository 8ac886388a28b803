"""The training loop every method uses (LC's L steps, iDC, fine-tuning, SFW, fw-grow), with its
one NaN guard; losses, evaluation, data and device conventions.

    train_loop(objective, loader, stepper, epochs= | iterations=)   objective → backward → stepper.step()
    train_epochs(forward, loader, [(params, lr)], …)    the same with SGD or AdamW (the default L step)
    Stream(loader)                                      batches across calls: passes continue, resume exact
    Pull(params, targets, μ)                            LC's pull as an exact proximal step

`forward(x)` is the model's output; for LC it is the model itself, for fine-tuning with the
compression held fixed it runs the model with weights Δ(θ) (torch.func.functional_call).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import random
from typing import Any, Callable, Iterable, Iterator, Mapping, Protocol, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .distributed import set_epoch
from .errors import ConfigError, DivergenceError, LCError, NotConverged
from .modelio import Inputs, Loss, Metric, accuracy, as_loss, as_metric, kl_distill, prediction, split_batch

log = logging.getLogger("lccompress")

LossFn = Callable[[Tensor, Any], Tensor]
MetricFn = Callable[[Tensor, Any], float]


def distill_loss(kind: str = "kl", temperature: float = 1.0) -> Callable[[Tensor, Tensor], Tensor]:
    """Distillation loss of student logits s against the teacher's t: T²·KL(softmax(t/T) ‖
    softmax(s/T)), batch mean ("kl"), or the mean squared difference of the logits ("mse")."""
    if kind == "kl":
        return kl_distill(temperature)
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not 0 < temperature < math.inf:
        raise ConfigError(f"temperature={temperature!r} must be a positive number")
    if kind == "mse":
        return lambda s, t: F.mse_loss(s, t)
    raise ConfigError(f"distill={kind!r} must be 'kl' or 'mse'")


def cosine(e: int, total: int) -> float:
    """Cosine learning-rate factor of epoch e of `total`: ½(1 + cos(π·e/total))."""
    return 0.5 * (1 + math.cos(math.pi * e / max(1, total)))


def batches(loader: Iterable, what: str) -> Iterator[Any]:
    """The loader's batches; an exception raised by the loader itself (not by the model or the
    loss) becomes one ConfigError naming the batch."""
    try:
        it = iter(loader)
    except Exception as e:  # noqa: BLE001 - user code
        raise ConfigError(f"the {what} data loader raised {type(e).__name__}: {e}") from None
    i = 0
    while True:
        try:
            batch = next(it)
        except StopIteration:
            return
        except LCError:
            raise
        except Exception as e:  # noqa: BLE001 - user code
            raise ConfigError(f"the {what} data loader raised {type(e).__name__} at batch {i}: {e}") from None
        yield batch
        i += 1


def loader_generators(data: Mapping[str, Any]) -> list[torch.Generator]:
    """The torch.Generators that shape the order of the loaders' batches — a DataLoader's own, its
    sampler's, its batch sampler's sampler's — once each, in a fixed order (for exact resume)."""
    found: list[torch.Generator] = []

    def visit(obj: Any, depth: int = 0) -> None:
        if obj is None or depth > 3:
            return
        if isinstance(obj, torch.Generator):
            if all(obj is not g for g in found):
                found.append(obj)
            return
        for attr in ("generator", "sampler", "batch_sampler", "loader"):
            visit(getattr(obj, attr, None), depth + 1)

    for key in sorted(data):
        visit(data[key])
    return found


def first_batch(loader: Iterable, what: str) -> Any:
    """The loader's first batch; a loader that is empty or raises becomes one clear ConfigError."""
    try:
        return next(iter(loader))
    except StopIteration:
        raise ConfigError(f"the {what} data loader yields no batches") from None
    except Exception as e:  # noqa: BLE001 - user code
        raise ConfigError(f"the {what} data loader raised {type(e).__name__}: {e}") from None


class Teacher:
    """Batches (inputs, reference's prediction) from batches with or without targets: distillation
    needs no labels; with `argmax` the targets are the reference's predicted classes."""

    def __init__(self, loader: Iterable, teacher: nn.Module, device: torch.device, argmax: bool = False,
                 output: str | None = None) -> None:
        self.loader, self.teacher, self.device, self.argmax, self.output = loader, teacher, device, argmax, output

    def __iter__(self):
        for b in self.loader:
            x, _ = split_batch(b, self.device)
            with torch.no_grad():
                t = prediction(x(self.teacher), self.output)
            yield x, (t.argmax(-1) if self.argmax else t)

    def __len__(self) -> int:
        return len(self.loader)  # type: ignore[arg-type]


def as_data(data: Any) -> dict[str, Any]:
    """{"train": …, "eval": …} from a mapping with those keys or a bare training loader (None: {})."""
    if data is None:
        return {}
    if isinstance(data, Mapping):
        unknown = set(data) - {"train", "eval"}
        if unknown:
            raise ConfigError(f"data has keys {sorted(unknown)}; allowed: train, eval")
        return {k: v for k, v in data.items() if v is not None}
    return {"train": data}


def resolve_device(device: str | torch.device) -> torch.device:
    """"auto" → CUDA when available, else the CPU; "cpu", "cuda", "cuda:N" as given (checked)."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device={device!r} asked for but CUDA is not available")
    try:
        return torch.device(device)
    except RuntimeError:
        raise ConfigError(f"device={device!r} must be auto, cpu, cuda or cuda:N") from None


@contextlib.contextmanager
def seeded(seed: int, device: torch.device) -> Iterator[None]:
    """The global RNGs (and the device's) forked and seeded inside: same seed, same bytes."""
    with torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield


class Guard:
    """Counts non-finite failures over a run; each halves the learning rate, the 4th is fatal."""

    def __init__(self, max_failures: int = 3) -> None:
        self.max_failures, self.failures, self.scale = max_failures, 0, 1.0

    def fail(self, where: str) -> None:
        self.failures += 1
        if self.failures > self.max_failures:
            raise DivergenceError(
                f"non-finite loss or weights in {where} after halving the learning rate "
                f"{self.max_failures} times; lower --lr or --mu-growth")
        self.scale /= 2
        log.warning("non-finite values in %s: restored the last good state, learning rate × %g", where, self.scale)


class Stepper(Protocol):
    """What `train_loop` steps with: an optimizer over `params`, able to snapshot and restore
    everything it changes (for the NaN guard)."""

    params: list[Tensor]

    def set_lr(self, factor: float) -> None: ...
    def zero_grad(self) -> None: ...
    def step(self) -> None: ...
    def snapshot(self) -> Any: ...
    def restore(self, snap: Any) -> None: ...


class Pull:
    """LC's quadratic pull μ/2‖w − t‖² toward targets t = Δ(θ) + λ/μ, applied as an exact proximal
    step after each optimizer step: w ← (w + η·μ·t)/(1 + η·μ), stable for every μ and η. η is the
    optimizer's own step size per weight — lr/(1 − momentum) for SGD, lr/(√v̂ + ε) for AdamW (the
    prox in Adam's diagonal metric) — so that μ weighs the pull against the loss in the loss's units."""

    def __init__(self, params: Sequence[Tensor], targets: Sequence[Tensor], mu: float) -> None:
        self.params, self.targets, self.mu = list(params), list(targets), mu
        self.groups: list[dict[str, Any]] | None = None

    @torch.no_grad()
    def apply(self, opt: torch.optim.Optimizer) -> None:
        if self.groups is None:  # each weight's param group, found once
            group_of = {id(p): g for g in opt.param_groups for p in g["params"]}
            self.groups = [group_of[id(p)] for p in self.params]
        for p, t, g in zip(self.params, self.targets, self.groups):
            if isinstance(opt, torch.optim.AdamW):
                st = opt.state.get(p)
                if not st:
                    continue
                step = float(st["step"])
                b2, eps = g["betas"][1], g["eps"]
                eta = g["lr"] / ((st["exp_avg_sq"] / (1 - b2 ** step)).sqrt_().add_(eps))
                a = (eta * self.mu).div_(eta * self.mu + 1)
            else:
                eta = g["lr"] / (1 - g.get("momentum", 0.0))
                a = eta * self.mu / (1 + eta * self.mu)
            p.add_((t - p).mul_(a))


class OptStepper:
    """SGD (momentum, Nesterov, weight decay) or AdamW over (tensors, learning rate) groups, with
    LC's pull as a proximal step (`Pull`) when given, and fp16 loss scaling when given a scaler."""

    def __init__(self, groups: Sequence[tuple[list[Tensor], float]], *, optimizer: str = "sgd",
                 momentum: float = 0.9, nesterov: bool = True, weight_decay: float = 0.0,
                 pull: Pull | None = None) -> None:
        self.groups = [(ps, lr) for ps, lr in groups if ps]
        self.params = [p for ps, _ in self.groups for p in ps]
        pgs = [{"params": ps, "lr": lr} for ps, lr in self.groups]
        if optimizer == "sgd":
            self.opt: torch.optim.Optimizer = torch.optim.SGD(
                pgs, lr=self.groups[0][1], momentum=momentum, nesterov=nesterov and momentum > 0,
                weight_decay=weight_decay)
        elif optimizer == "adamw":
            self.opt = torch.optim.AdamW(pgs, lr=self.groups[0][1], weight_decay=weight_decay)
        else:
            raise ConfigError(f"optimizer={optimizer!r} must be 'sgd' or 'adamw'")
        self.pull = pull
        self.scaler: Any = None

    def set_lr(self, factor: float) -> None:
        for pg, (_, lr) in zip(self.opt.param_groups, self.groups):
            pg["lr"] = lr * factor

    def zero_grad(self) -> None:
        self.opt.zero_grad(set_to_none=True)

    def step(self) -> None:
        if self.scaler is not None:
            self.scaler.step(self.opt)
            self.scaler.update()
        else:
            self.opt.step()
        if self.pull is not None:
            self.pull.apply(self.opt)

    def snapshot(self) -> list[Tensor]:
        return [p.detach().clone() for p in self.params]

    def restore(self, snap: list[Tensor]) -> None:
        with torch.no_grad():
            for p, s in zip(self.params, snap):
                p.copy_(s)
        self.opt.state.clear()


def host_rngs() -> dict[str, Any]:
    """Python's `random` and numpy's global RNG states (a user's data pipeline may draw from them),
    as tensors and plain values, so that a saved state loads with weights_only."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    return {"random": {"version": version, "state": torch.tensor(internal, dtype=torch.int64), "gauss": gauss},
            "numpy": {"name": str(name), "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
                      "pos": int(pos), "has_gauss": int(has_gauss), "cached": float(cached)}}


def set_host_rngs(saved: Mapping[str, Any]) -> None:
    """Restore what `host_rngs` saved."""
    r, n = saved["random"], saved["numpy"]
    random.setstate((r["version"], tuple(int(v) for v in r["state"].tolist()), r["gauss"]))
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))


def rng_states(loader: Any) -> tuple[Any, ...]:
    """torch's global RNG state, the loader's own generators' states (they order its batches), and
    Python's and numpy's (`host_rngs`: a dataset or collate function may draw from them)."""
    return torch.get_rng_state(), [g.get_state() for g in loader_generators({"train": loader})], host_rngs()


def set_rng_states(loader: Any, states: Sequence[Any]) -> None:
    """Restore what `rng_states` returned (states saved before the host RNGs were: torch's and the
    loader's alone)."""
    torch.set_rng_state(states[0])
    for g, s in zip(loader_generators({"train": loader}), states[1]):
        g.set_state(s)
    if len(states) > 2:
        set_host_rngs(states[2])


def _length(loader: Any) -> int | None:
    try:
        n = len(loader)
    except Exception:  # noqa: BLE001 - an iterable without (or with a failing) len
        return None
    return n if isinstance(n, int) and n > 0 else None


class Stream:
    """A training loader as one stream of batches across calls: a pass (epoch) that one L step
    leaves unfinished is continued by the next, so fractional epochs and budgets see all the data
    in turn. It remembers the RNG states at which its current pass began and how far it is, so a
    resumed run rebuilds the same pass (`state` / `restore`)."""

    def __init__(self, loader: Iterable, what: str = "training") -> None:
        self.loader, self.what = loader, what
        self.length = _length(loader)
        self.it: Iterator[Any] | None = None
        self.pos = 0
        self.origin: tuple[Any, ...] | None = None
        self.ended = False  # the last pass ended after its last batch (no call has seen it yet)
        self.passes = 0  # passes begun

    def next(self, within_pass: bool = False) -> Any:
        """The next batch; at the end of a pass a new one starts, or None when `within_pass`."""
        while True:
            if self.ended:
                self.ended = False
                if within_pass:
                    return None
            if self.it is None:
                set_epoch(self.loader, self.passes)
                self.passes += 1
                self.origin = rng_states(self.loader)
                self.it, self.pos = batches(self.loader, self.what), 0
            try:
                b = next(self.it)
            except StopIteration:
                self.it = None
                if self.pos == 0:
                    raise ConfigError(f"the {self.what} data loader yielded no batches") from None
                if within_pass:
                    return None
                continue
            self.pos += 1
            if self.pos == self.length:
                self._close()
            return b

    def _close(self) -> None:
        """End a pass whose last batch was taken by running its iterator to StopIteration now (a
        sampler may draw from its generator then), unless it yields more than len() promised."""
        try:
            extra = next(self.it)  # type: ignore[arg-type]
        except StopIteration:
            self.it, self.ended = None, True
            return
        self.length = None  # len() was wrong: keep the batch for the next call

        def rest(first: Any = extra, it: Iterator[Any] = self.it) -> Iterator[Any]:  # type: ignore[assignment]
            yield first
            yield from it
        self.it = rest()

    def left_in_pass(self) -> int | None:
        if self.length is None:
            return None
        return self.length if self.it is None else max(0, self.length - self.pos)

    def state(self) -> dict[str, Any]:
        """Passes begun, and where the stream is inside its pass (pos 0 at a pass boundary)."""
        inside = self.it is not None and self.pos > 0
        return {"passes": self.passes - inside, "pos": self.pos if inside else 0,
                "origin": self.origin if inside else None}

    def restore(self, state: Mapping[str, Any] | None) -> None:
        """Rebuild a pass from the RNG states it began at and skip the batches already taken; the
        RNG states as they are now (the saved run's, restored by the caller) are kept."""
        self.it, self.pos, self.ended = None, 0, False
        self.passes = int(state.get("passes", 0)) if state else 0
        if not state or not state.get("pos"):
            return
        now = rng_states(self.loader)
        set_rng_states(self.loader, state["origin"])
        for _ in range(int(state["pos"])):
            self.next()
        set_rng_states(self.loader, now)


AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def train_loop(
    objective: Callable[[Any, Any], tuple[Tensor, Tensor]],
    loader: Iterable | Stream,
    stepper: Stepper,
    *,
    epochs: int | None = None,
    iterations: int | None = None,
    device: torch.device,
    lr_factor: Callable[[float], float] = lambda e: 1.0,
    guard: Guard | None = None,
    where: str = "training",
    on_epoch: Callable[[int, int], None] | None = None,
    on_step: Callable[[int], None] | None = None,
    amp: str | None = None,
    tally: dict[str, float] | None = None,
    chunk: int = 500,
    limit: int | None = None,
) -> float:
    """Train `epochs` whole passes over the loader, or `iterations` optimizer steps taken from it as
    a stream (passes continue across calls when given a `Stream`): per batch (x, y), objective(x, y)
    → (task loss, what to minimize), backward, stepper.step(); returns the mean task loss of the
    last chunk (a pass, or at most `chunk` steps).

    The NaN guard: at each chunk's end the loss and the weights are checked (no host sync per
    batch); if anything is non-finite, or a fixed point inside the model did not converge
    (`NotConverged`, e.g. an implicit layer whose ‖A‖∞ grew past 1), the chunk's starting state is
    restored, the guard halves the learning rate, and the chunk runs again on the next batches
    (the 4th time: DivergenceError).
    The learning rate is lr_factor(e) × the guard's scale, e the passes (epochs mode) or steps
    (iterations mode) done when the chunk starts. `limit` stops whole epochs after that many
    optimizer steps in all. `amp` ("bf16", "fp16") runs the objective under
    autocast, fp16 with a gradient scaler. `on_epoch(done, total)` follows each chunk (in passes or
    steps), `on_step(steps)` each optimizer step; `tally` accumulates "steps" and "samples".
    """
    if (epochs is None) == (iterations is None):
        raise ConfigError("train_loop needs either epochs or iterations")
    guard = guard or Guard()
    stream = loader if isinstance(loader, Stream) else Stream(loader)
    autocast: Callable[[], Any] = contextlib.nullcontext
    if amp and amp != "off":
        if amp not in AMP_DTYPES:
            raise ConfigError(f"amp={amp!r} must be bf16, fp16 or off")
        if amp == "fp16" and device.type != "cuda":
            raise ConfigError("--amp fp16 needs a CUDA device; use --amp bf16 on the CPU")
        autocast = functools.partial(torch.autocast, device.type, AMP_DTYPES[amp])
        if amp == "fp16":
            stepper.scaler = torch.amp.GradScaler(device.type)  # type: ignore[attr-defined]
    total_units = epochs if epochs is not None else iterations
    last = float("nan")
    done = steps = 0
    while done < total_units and (limit is None or steps < limit):
        snap = stepper.snapshot()
        stepper.set_lr(lr_factor(done) * guard.scale)
        if epochs is not None:
            size = None  # a whole pass
        else:
            left = stream.left_in_pass()
            size = min(iterations - done, chunk, left if left else chunk)
        total = torch.zeros((), device=device, dtype=torch.float64)
        count = samples = 0
        broken = False  # a fixed point that did not converge: handled like non-finite values
        while (size is None or count < size) and (limit is None or steps < limit):
            batch = stream.next(within_pass=size is None)
            if batch is None:
                break
            x, y = split_batch(batch, device)
            try:
                with autocast():
                    loss, obj = objective(x, y)
                stepper.zero_grad()
                scaler = getattr(stepper, "scaler", None)
                (scaler.scale(obj) if scaler is not None else obj).backward()
            except NotConverged as e:
                log.warning("%s", e)
                broken = True
                break
            stepper.step()
            total += loss.detach().double()
            count += 1
            samples += x.batch_size()
            steps += 1
            if on_step is not None:
                on_step(steps)
        finite = torch.isfinite(total) & torch.stack([torch.isfinite(p).all() for p in stepper.params]).all()
        if broken or not bool(finite):
            stepper.restore(snap)
            guard.fail(where)
            continue
        last = float(total) / count
        done += 1 if epochs is not None else count
        if tally is not None:
            tally["steps"] = tally.get("steps", 0) + count
            tally["samples"] = tally.get("samples", 0) + samples
        if on_epoch is not None:
            on_epoch(done, total_units)
    return last


def train_epochs(
    forward: Callable[..., Any],
    loader: Iterable | Stream,
    groups: Sequence[tuple[list[Tensor], float]],
    *,
    epochs: int | None = None,
    iterations: int | None = None,
    loss_fn: LossFn | Loss,
    device: torch.device,
    extra: Callable[[], Tensor] | None = None,
    optimizer: str = "sgd",
    pull: Pull | None = None,
    momentum: float = 0.9,
    nesterov: bool = True,
    weight_decay: float = 0.0,
    lr_factor: Callable[[float], float] = lambda e: 1.0,
    guard: Guard | None = None,
    where: str = "training",
    on_epoch: Callable[[int, int], None] | None = None,
    on_step: Callable[[int], None] | None = None,
    amp: str | None = None,
    tally: dict[str, float] | None = None,
    limit: int | None = None,
) -> float:
    """`train_loop` with SGD or AdamW on the loss of forward(inputs) against the targets, + extra()
    (a penalty in the gradient) or a proximal `pull`; `groups` are (tensors, learning rate)."""
    task = as_loss(loss_fn)

    def objective(x: Inputs, y: Any) -> tuple[Tensor, Tensor]:
        loss, _ = task.on(forward, x, y)
        return loss, (loss + extra() if extra is not None else loss)

    stepper = OptStepper(groups, optimizer=optimizer, momentum=momentum, nesterov=nesterov,
                         weight_decay=weight_decay, pull=pull)
    return train_loop(objective, loader, stepper, epochs=epochs, iterations=iterations, device=device,
                      lr_factor=lr_factor, guard=guard, where=where, on_epoch=on_epoch, on_step=on_step, amp=amp,
                      tally=tally, limit=limit)


@torch.no_grad()
def evaluate(
    forward: Callable[..., Any],
    loader: Iterable,
    device: torch.device,
    metric: MetricFn | Metric | str = accuracy,
) -> tuple[float, Tensor | None, Tensor | None]:
    """(metric over the whole loader, predicted classes, targets): the classes (arg-max of the
    prediction, on the CPU) and targets only for classifiers with one integer target per row."""
    m = as_metric(metric)
    classes: list[Tensor] = []
    ys: list[Tensor] = []
    seen = [0]

    def pairs() -> Iterator[tuple[Any, Any]]:
        for batch in batches(loader, "evaluation"):
            x, y = split_batch(batch, device)
            out = x(forward, y if m.own else None)
            seen[0] += 1
            p = prediction(out, m.output) if not m.own else None
            if p is not None and p.dim() == 2 and isinstance(y, Tensor) and y.dim() == 1 \
                    and not y.is_floating_point() and len(y) == len(p):
                classes.append(p.argmax(-1).cpu())
                ys.append(y.cpu())
            yield out, y

    value = float(m.compute(pairs()))
    if seen[0] == 0:
        raise ConfigError("the evaluation data loader yielded no batches")
    if not math.isfinite(value):
        log.warning("the metric is %s", value)
    whole = len(classes) == seen[0]
    return value, (torch.cat(classes) if whole else None), (torch.cat(ys) if whole else None)


@torch.no_grad()
def recalibrate_bn_(model: nn.Module, loader: Iterable, batches: int = 50,
                    device: str | torch.device | None = None) -> nn.Module:
    """Recompute every BatchNorm's running statistics on `batches` batches of data (in place).

    The stats are reset and re-estimated as cumulative averages of the batch statistics
    (momentum=None) with the model in train mode; momentum and mode are restored after.
    """
    if isinstance(batches, bool) or not isinstance(batches, int) or batches < 1:
        raise ConfigError(f"batches={batches!r} must be an integer ≥ 1")
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not bns:
        return model
    dev = torch.device(device) if device is not None else next(model.parameters()).device
    modes = {m: m.training for m in model.modules()}
    moms = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    try:
        seen = 0
        for batch in loader:
            if seen >= batches:
                break
            x, _ = split_batch(batch, dev)
            x(model)
            seen += 1
        if seen == 0:
            raise ConfigError("the loader for BatchNorm recalibration yielded no batches")
    finally:
        for m, mom in zip(bns, moms):
            m.momentum = mom
        for m, t in modes.items():
            m.train(t)
    return model
