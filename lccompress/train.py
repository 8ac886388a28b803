"""The default L step: SGD over a user DataLoader, with a NaN guard; and evaluation.

`forward(x)` is the model's output; for LC it is the model itself, for fine-tuning with the
compression held fixed it runs the model with weights Δ(θ) (torch.func.functional_call).
"""

from __future__ import annotations

import logging
import math
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .errors import ConfigError, DivergenceError

log = logging.getLogger("lccompress")

LossFn = Callable[[Tensor, Any], Tensor]
MetricFn = Callable[[Tensor, Any], float]


def cross_entropy(output: Tensor, target: Tensor) -> Tensor:
    return F.cross_entropy(output, target)


def accuracy(output: Tensor, target: Tensor) -> float:
    """Fraction of rows whose arg-max equals the integer target."""
    return float((output.argmax(-1) == target).float().mean())


def split_batch(batch: Any, device: torch.device) -> tuple[Any, Any]:
    """(inputs, target) of a batch, moved to `device`; a batch is (x, y), [x, y] or {"x", "y"}."""
    if isinstance(batch, dict) and "x" in batch:
        x, y = batch["x"], batch.get("y")
    elif isinstance(batch, (list, tuple)) and len(batch) == 2:
        x, y = batch
    else:
        raise ConfigError(f"a batch must be (inputs, targets); got {type(batch).__name__}"
                          f"{' of length ' + str(len(batch)) if isinstance(batch, (list, tuple)) else ''}")
    return _to(x, device), _to(y, device)


def _to(v: Any, device: torch.device) -> Any:
    if isinstance(v, Tensor):
        return v.to(device, non_blocking=True)
    if isinstance(v, (list, tuple)):
        return type(v)(_to(t, device) for t in v)
    return v


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


def train_epochs(
    forward: Callable[[Any], Tensor],
    loader: Iterable,
    groups: Sequence[tuple[list[Tensor], float]],
    *,
    epochs: int,
    loss_fn: LossFn,
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
    """Train `epochs` epochs of SGD on loss_fn(forward(x), y) + extra(); return the last epoch's mean loss.

    `groups` are (tensors, learning rate) pairs. At each epoch's end the loss and the weights are
    checked; if anything is non-finite the epoch's starting state is restored, the guard halves
    the learning rate, and the epoch runs again. `on_epoch(done, epochs)` follows each epoch.
    """
    guard = guard or Guard()
    groups = [(ps, lr) for ps, lr in groups if ps]
    opt = torch.optim.SGD([{"params": ps, "lr": lr} for ps, lr in groups], lr=groups[0][1],
                          momentum=momentum, nesterov=nesterov and momentum > 0, weight_decay=weight_decay)
    tensors = [p for ps, _ in groups for p in ps]
    last = float("nan")
    e = 0
    while e < epochs:
        snap = [p.detach().clone() for p in tensors]
        for pg, (_, lr) in zip(opt.param_groups, groups):
            pg["lr"] = lr * lr_factor(e) * guard.scale
        total = torch.zeros((), device=device, dtype=torch.float64)
        count = 0
        for batch in loader:
            x, y = split_batch(batch, device)
            loss = loss_fn(forward(x), y)
            obj = loss + extra() if extra is not None else loss
            opt.zero_grad(set_to_none=True)
            obj.backward()
            opt.step()
            total += loss.detach().double()
            count += 1
        if count == 0:
            raise ConfigError("the training data loader yielded no batches")
        finite = torch.isfinite(total) & torch.stack([torch.isfinite(p).all() for p in tensors]).all()
        if not bool(finite):
            with torch.no_grad():
                for p, s in zip(tensors, snap):
                    p.copy_(s)
            opt.state.clear()
            guard.fail(where)
            continue
        last = float(total) / count
        e += 1
        if on_epoch is not None:
            on_epoch(e, epochs)
    return last


@torch.no_grad()
def evaluate(
    forward: Callable[[Any], Tensor],
    loader: Iterable,
    device: torch.device,
    metric: MetricFn = accuracy,
) -> tuple[float, Tensor, Any]:
    """(metric over the whole loader, all outputs, all targets), outputs concatenated on the CPU."""
    outs, ys = [], []
    for batch in loader:
        x, y = split_batch(batch, device)
        outs.append(forward(x).float().cpu())
        ys.append(y.cpu() if isinstance(y, Tensor) else y)
    if not outs:
        raise ConfigError("the evaluation data loader yielded no batches")
    out = torch.cat(outs)
    y = torch.cat(ys) if isinstance(ys[0], Tensor) else ys
    value = float(metric(out, y))
    if not math.isfinite(value):
        log.warning("the metric is %s", value)
    return value, out, y
