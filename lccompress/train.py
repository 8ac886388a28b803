"""The training loop every method uses (LC's L steps, iDC, fine-tuning, SFW, fw-grow), with its
one NaN guard; losses, evaluation, data and device conventions.

    train_loop(objective, loader, stepper, epochs=…)   one loop: objective → backward → stepper.step()
    train_epochs(forward, loader, [(params, lr)], …)    the same with SGD (the default L step)

`forward(x)` is the model's output; for LC it is the model itself, for fine-tuning with the
compression held fixed it runs the model with weights Δ(θ) (torch.func.functional_call).
"""

from __future__ import annotations

import contextlib
import logging
import math
from typing import Any, Callable, Iterable, Iterator, Mapping, Protocol, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import ConfigError, DivergenceError, LCError
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


class SGDStepper:
    """SGD (momentum, Nesterov, weight decay) over (tensors, learning rate) groups."""

    def __init__(self, groups: Sequence[tuple[list[Tensor], float]], *, momentum: float = 0.9, nesterov: bool = True,
                 weight_decay: float = 0.0) -> None:
        self.groups = [(ps, lr) for ps, lr in groups if ps]
        self.params = [p for ps, _ in self.groups for p in ps]
        self.opt = torch.optim.SGD([{"params": ps, "lr": lr} for ps, lr in self.groups], lr=self.groups[0][1],
                                   momentum=momentum, nesterov=nesterov and momentum > 0, weight_decay=weight_decay)

    def set_lr(self, factor: float) -> None:
        for pg, (_, lr) in zip(self.opt.param_groups, self.groups):
            pg["lr"] = lr * factor

    def zero_grad(self) -> None:
        self.opt.zero_grad(set_to_none=True)

    def step(self) -> None:
        self.opt.step()

    def snapshot(self) -> list[Tensor]:
        return [p.detach().clone() for p in self.params]

    def restore(self, snap: list[Tensor]) -> None:
        with torch.no_grad():
            for p, s in zip(self.params, snap):
                p.copy_(s)
        self.opt.state.clear()


def train_loop(
    objective: Callable[[Any, Any], tuple[Tensor, Tensor]],
    loader: Iterable,
    stepper: Stepper,
    *,
    epochs: int,
    device: torch.device,
    lr_factor: Callable[[int], float] = lambda e: 1.0,
    guard: Guard | None = None,
    where: str = "training",
    on_epoch: Callable[[int, int], None] | None = None,
    on_step: Callable[[int], None] | None = None,
) -> float:
    """Train `epochs` epochs: per batch (x, y), objective(x, y) → (task loss, what to minimize),
    backward, stepper.step(); returns the last epoch's mean task loss.

    The NaN guard: at each epoch's end the loss and the weights are checked (no host sync per
    batch); if anything is non-finite the epoch's starting state is restored, the guard halves
    the learning rate, and the epoch runs again (the 4th time: DivergenceError).
    `on_epoch(done, epochs)` follows each epoch, `on_step(steps)` each optimizer step.
    """
    guard = guard or Guard()
    last = float("nan")
    e = steps = 0
    while e < epochs:
        snap = stepper.snapshot()
        stepper.set_lr(lr_factor(e) * guard.scale)
        total = torch.zeros((), device=device, dtype=torch.float64)
        count = 0
        for batch in batches(loader, "training"):
            x, y = split_batch(batch, device)
            loss, obj = objective(x, y)
            stepper.zero_grad()
            obj.backward()
            stepper.step()
            total += loss.detach().double()
            count += 1
            steps += 1
            if on_step is not None:
                on_step(steps)
        if count == 0:
            raise ConfigError("the training data loader yielded no batches")
        finite = torch.isfinite(total) & torch.stack([torch.isfinite(p).all() for p in stepper.params]).all()
        if not bool(finite):
            stepper.restore(snap)
            guard.fail(where)
            continue
        last = float(total) / count
        e += 1
        if on_epoch is not None:
            on_epoch(e, epochs)
    return last


def train_epochs(
    forward: Callable[..., Any],
    loader: Iterable,
    groups: Sequence[tuple[list[Tensor], float]],
    *,
    epochs: int,
    loss_fn: LossFn | Loss,
    device: torch.device,
    extra: Callable[[], Tensor] | None = None,
    momentum: float = 0.9,
    nesterov: bool = True,
    weight_decay: float = 0.0,
    lr_factor: Callable[[int], float] = lambda e: 1.0,
    guard: Guard | None = None,
    where: str = "training",
    on_epoch: Callable[[int, int], None] | None = None,
) -> float:
    """`train_loop` with SGD on the loss of forward(inputs) against the targets, + extra();
    `groups` are (tensors, learning rate)."""
    task = as_loss(loss_fn)

    def objective(x: Inputs, y: Any) -> tuple[Tensor, Tensor]:
        loss, _ = task.on(forward, x, y)
        return loss, (loss + extra() if extra is not None else loss)

    stepper = SGDStepper(groups, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay)
    return train_loop(objective, loader, stepper, epochs=epochs, device=device, lr_factor=lr_factor, guard=guard,
                      where=where, on_epoch=on_epoch)


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
