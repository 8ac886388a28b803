"""How lccompress talks to a model: batches in, outputs out, and the losses and metrics between.

Batches, as a DataLoader yields them:

    x                          a tensor: inputs only (distillation, DC, export)
    (inputs, targets)          inputs: a tensor, a tuple of positional arguments, or a dict of
                               keyword arguments; [inputs, targets] and {"x": …, "y": …} alike
    {name: value, …}           keyword arguments (Hugging Face style); the targets are the value
                               under "labels" (else "label", "targets", "target"), split off

The model is called as model(*args, **kwargs). Its output may be a tensor, a tuple, a dict or a
Hugging Face `ModelOutput`; the *prediction* is `output=NAME` when given (a key, an attribute or a
tuple index), else "logits", else the first tensor. `--loss model` uses the model's own `.loss`
(the batch's labels are then passed back to the model under their key).

Losses: "ce" (class dimension last with sequence outputs flattened, or torch's class dimension 1;
target -100 ignored), "mse", "model", "kl" (distillation), or a function loss(prediction, target).
Metrics (streaming over the eval loader): "accuracy" (%), "perplexity", "loss", "cosine", "mse",
or a function metric(predictions, targets) over the whole set (it may carry the attributes
`unit = "%"` and `lower_is_better = True`). `default_metric` chooses one from the loss and a batch.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

from .errors import ConfigError

TARGET_KEYS = ("labels", "label", "targets", "target")


# ----------------------------------------------------------------------------- batches
@dataclass
class Inputs:
    """A model call's arguments: positional `args`, keyword `kwargs`; `label_key` is where a dict
    batch's targets came from (given back to the model when its own loss is wanted)."""

    args: tuple = ()
    kwargs: dict[str, Any] = field(default_factory=dict)
    label_key: str | None = None

    def to(self, device: torch.device) -> "Inputs":
        return Inputs(tuple(_to(a, device) for a in self.args), {k: _to(v, device) for k, v in self.kwargs.items()},
                      self.label_key)

    def __call__(self, forward: Callable[..., Any], labels: Any = None) -> Any:
        """forward(*args, **kwargs), with `labels` under their key when given."""
        kw = self.kwargs if labels is None else {**self.kwargs, self.label_key or "labels": labels}
        return forward(*self.args, **kw)

    def tensors(self) -> list[Tensor]:
        return [v for v in (*self.args, *self.kwargs.values()) if isinstance(v, Tensor)]

    def batch_size(self) -> int:
        """Rows of the first tensor argument (0 when there is none)."""
        t = self.tensors()
        return int(t[0].shape[0]) if t and t[0].dim() else 0


def as_inputs(v: Any) -> Inputs:
    """Inputs from a tensor, a tuple/list of positional arguments or a dict of keyword arguments."""
    if isinstance(v, Inputs):
        return v
    if isinstance(v, Mapping):
        return Inputs((), dict(v))
    if isinstance(v, (list, tuple)):
        return Inputs(tuple(v))
    return Inputs((v,))


def split_batch(batch: Any, device: torch.device | None = None) -> tuple[Inputs, Any]:
    """(inputs, targets) of a batch (targets None when it has none), moved to `device`."""
    if isinstance(batch, Tensor) or isinstance(batch, Inputs):
        x, y = as_inputs(batch), None
    elif isinstance(batch, Mapping) and "x" in batch:
        x, y = as_inputs(batch["x"]), batch.get("y")
    elif isinstance(batch, Mapping):
        key = next((k for k in TARGET_KEYS if k in batch), None)
        x = Inputs((), {k: v for k, v in batch.items() if k != key}, key)
        y = batch[key] if key else None
    elif isinstance(batch, (list, tuple)) and len(batch) in (1, 2):
        x, y = as_inputs(batch[0]), (batch[1] if len(batch) == 2 else None)
    else:
        what = f" of length {len(batch)}" if isinstance(batch, (list, tuple)) else ""
        raise ConfigError(f"a batch must be inputs, (inputs, targets) or a dict of model arguments; got "
                          f"{type(batch).__name__}{what}")
    return (x.to(device), _to(y, device)) if device is not None else (x, y)


def _to(v: Any, device: torch.device) -> Any:
    if isinstance(v, Tensor):
        return v.to(device, non_blocking=True)
    if isinstance(v, (list, tuple)):
        return type(v)(_to(t, device) for t in v)
    if isinstance(v, dict):
        return {k: _to(t, device) for k, t in v.items()}
    return v


# ----------------------------------------------------------------------------- outputs
def _first_tensor(v: Any) -> Tensor | None:
    if isinstance(v, Tensor):
        return v
    if isinstance(v, Mapping):
        v = [t for k, t in v.items() if k != "loss"]
    if isinstance(v, (list, tuple)):
        for t in v:
            got = _first_tensor(t)
            if got is not None:
                return got
    return None


def _keys(out: Any) -> str:
    if isinstance(out, Mapping):
        return ", ".join(map(str, out.keys()))
    if isinstance(out, (list, tuple)):
        return f"indices 0 … {len(out) - 1}"
    return type(out).__name__


def prediction(out: Any, name: str | None = None) -> Tensor:
    """The prediction in a model's output: `name` (key, attribute or index), else "logits", else
    the first tensor (a dict's "loss" skipped)."""
    if name is not None:
        got: Any = None
        if isinstance(out, Mapping):
            got = out.get(name)
        elif isinstance(out, (list, tuple)) and name.lstrip("-").isdigit() and -len(out) <= int(name) < len(out):
            got = out[int(name)]
        elif not isinstance(out, Tensor):
            got = getattr(out, name, None)
        if not isinstance(got, Tensor):
            raise ConfigError(f"--output {name!r}: the model's output has no tensor {name!r} (it has {_keys(out)})")
        return got
    if isinstance(out, Tensor):
        return out
    if isinstance(out, Mapping) and isinstance(out.get("logits"), Tensor):
        return out["logits"]
    got = _first_tensor(out)
    if got is None:
        raise ConfigError(f"the model's output ({type(out).__name__}) holds no tensor")
    return got


def model_loss(out: Any) -> Tensor:
    """The loss the model computed itself (`.loss` / ["loss"])."""
    v = out.get("loss") if isinstance(out, Mapping) else getattr(out, "loss", None)
    if not isinstance(v, Tensor):
        raise ConfigError("--loss model: the model returned no loss (it computes one when the batches are dicts "
                          "with 'labels' and its forward takes labels); use --loss ce or mse")
    return v


# ----------------------------------------------------------------------------- losses
def _class_layout(pred: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """(N, C) logits and (N,) classes from class-last outputs (…, C) with targets (…), e.g. sequences."""
    if pred.dim() > 2 and tuple(pred.shape[:-1]) == tuple(target.shape):
        return pred.reshape(-1, pred.shape[-1]), target.reshape(-1)
    return pred, target


def cross_entropy(pred: Tensor, target: Tensor) -> Tensor:
    """Cross-entropy; sequence outputs (…, C) against (…) targets are flattened; target -100 is ignored."""
    p, t = _class_layout(pred, target)
    return F.cross_entropy(p.float(), t, ignore_index=-100)


def mse(pred: Tensor, target: Tensor) -> Tensor:
    return F.mse_loss(pred.float(), target.float())


def kl_distill(temperature: float = 1.0) -> Callable[[Tensor, Tensor], Tensor]:
    """T²·KL(softmax(t/T) ‖ softmax(s/T)) of student logits s against teacher logits t, mean over rows
    (sequence outputs: over tokens)."""
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not 0 < temperature < math.inf:
        raise ConfigError(f"temperature={temperature!r} must be a positive number")
    T = float(temperature)

    def kl(s: Tensor, t: Tensor) -> Tensor:
        s, t = s.float().reshape(-1, s.shape[-1]), t.float().reshape(-1, t.shape[-1])
        return F.kl_div(F.log_softmax(s / T, -1), F.log_softmax(t / T, -1), reduction="batchmean",
                        log_target=True) * T * T

    return kl


def cosine_distance(pred: Tensor, target: Tensor) -> Tensor:
    """1 − cosine similarity of prediction and target vectors (the last dimension), mean over rows."""
    p, t = pred.float().reshape(-1, pred.shape[-1]), target.float().reshape(-1, pred.shape[-1])
    return 1 - F.cosine_similarity(p, t, dim=-1).mean()


#: --loss distill-KIND: the distillation losses by the outputs they suit
DISTILL = {"kl": kl_distill(), "mse": mse, "cosine": cosine_distance}


def distill_kind(out: Any, target: Any, output: str | None = None) -> str:
    """"kl" when the outputs are class logits — a ModelOutput with logits, or integer targets that
    index the output's last dimension — else "mse" (embeddings, regression outputs, hidden states:
    a softmax over them would be meaningless)."""
    if not isinstance(out, Tensor) and getattr(out, "logits", None) is not None and output in (None, "logits"):
        return "kl"
    try:
        p = prediction(out, output)
    except ConfigError:
        return "mse"
    if isinstance(target, Tensor) and not target.is_floating_point() and p.dim() >= 2 and target.numel() \
            and int(target.min()) >= -100 and int(target.max()) < p.shape[-1]:
        return "kl"
    return "mse"


@dataclass(frozen=True)
class Loss:
    """A training loss: fn(prediction, target), or the model's own loss (`own=True`). `output` names
    the prediction in the model's output. Calling it on (prediction, target) applies fn."""

    fn: Callable[[Tensor, Any], Tensor] | None
    name: str = "loss"
    output: str | None = None
    own: bool = False

    def __call__(self, pred: Tensor, target: Any) -> Tensor:
        if self.fn is None:
            raise ConfigError("the model's own loss needs the model call: use Loss.on")
        return self.fn(pred, target)

    def on(self, forward: Callable[..., Any], inputs: Inputs, target: Any) -> tuple[Tensor, Any]:
        """(loss, raw output) of forward on inputs against target."""
        if self.own:
            out = inputs(forward, target)
            return model_loss(out), out
        out = inputs(forward)
        return self.fn(prediction(out, self.output), target), out  # type: ignore[misc]


def accepts_labels(model: Any) -> bool:
    """Whether model.forward takes a `labels` argument (by name or **kwargs), as Hugging Face models do."""
    schema = getattr(getattr(model, "forward", None), "schema", None)
    if schema is not None:  # TorchScript
        return any(a.name == "labels" for a in schema.arguments)
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError, AttributeError):
        return False
    return "labels" in params or any(p.kind == p.VAR_KEYWORD for p in params.values())


def as_loss(loss: Any, output: str | None = None) -> Loss:
    """A Loss from a Loss, a name ("ce", "mse", "model") or a function loss(prediction, target)."""
    if isinstance(loss, Loss):
        return loss
    if loss is None or loss == "ce":
        return Loss(cross_entropy, "ce", output)
    if loss == "mse":
        return Loss(mse, "mse", output)
    if loss == "model":
        return Loss(None, "model", output, own=True)
    if callable(loss):
        return Loss(loss, getattr(loss, "__name__", "loss"), output)
    raise ConfigError(f"loss={loss!r} must be ce, mse, model or a function")


# ----------------------------------------------------------------------------- metrics
class Metric:
    """A metric over an eval loader: `compute(pairs)` takes (raw output, target) pairs. `unit` is
    "%" for fractions shown as percentages; `higher` tells which way is better; `own` asks for the
    model's own loss (the labels passed back to it)."""

    name = "metric"
    unit = ""
    higher = True
    own = False

    def __init__(self, output: str | None = None) -> None:
        self.output = output

    def compute(self, pairs: Iterable[tuple[Any, Any]]) -> float:
        raise NotImplementedError

    def worse_by(self, reference: float, value: float) -> float:
        """How much worse `value` is than `reference` (positive: worse), in the metric's unit."""
        return reference - value if self.higher else value - reference

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "unit": self.unit, "higher_is_better": self.higher}


def _int_targets(y: Any, what: str) -> Tensor:
    if not isinstance(y, Tensor) or y.is_floating_point() or y.is_complex():
        kind = "no targets" if y is None else f"{'float' if isinstance(y, Tensor) else type(y).__name__} targets"
        raise ConfigError(f"--metric {what} needs integer class targets; the batches have {kind} "
                          "(choose --metric cosine, mse, loss or FILE.py:FUNC)")
    return y


def accuracy(output: Tensor, target: Tensor) -> float:
    """Fraction of rows whose arg-max equals the integer target (`Accuracy` streams it)."""
    return float((output.argmax(-1) == target).float().mean())


class Accuracy(Metric):
    """Fraction of targets (≠ −100) whose class is the arg-max of the prediction."""

    name, unit = "accuracy", "%"

    def compute(self, pairs: Iterable[tuple[Any, Any]]) -> float:
        hit = total = 0
        for out, y in pairs:
            p = prediction(out, self.output)
            y = _int_targets(y, "accuracy")
            if tuple(p.shape[:-1]) == tuple(y.shape):
                cls = p.argmax(-1)
            elif p.dim() >= 2 and tuple(p.shape[:1] + p.shape[2:]) == tuple(y.shape):
                cls = p.argmax(1)
            else:
                raise ConfigError(f"--metric accuracy: predictions of shape {tuple(p.shape)} do not match "
                                  f"targets of shape {tuple(y.shape)}")
            valid = y != -100
            hit += int(((cls == y) & valid).sum())
            total += int(valid.sum())
        return hit / max(total, 1)


class Perplexity(Metric):
    """exp(mean token cross-entropy) of the prediction against the targets (−100 ignored). With
    `shift=1` position t predicts target t + 1: the targets are the input ids themselves, as Hugging
    Face causal LMs take their labels (the model shifts them inside)."""

    name, higher = "perplexity", False

    def __init__(self, output: str | None = None, shift: int = 0) -> None:
        super().__init__(output)
        self.shift = shift

    def compute(self, pairs: Iterable[tuple[Any, Any]]) -> float:
        total, count = 0.0, 0
        for out, y in pairs:
            y = _int_targets(y, "perplexity")
            p = prediction(out, self.output)
            if self.shift:
                p, y = p[..., :-self.shift, :], y[..., self.shift:]
            p, t = _class_layout(p, y)
            total += float(F.cross_entropy(p.float(), t, ignore_index=-100, reduction="sum"))
            count += int((t != -100).sum())
        return math.exp(total / max(count, 1))


class MeanLoss(Metric):
    """The training loss, averaged over the eval batches weighted by their size."""

    name, higher = "loss", False

    def __init__(self, loss: Loss) -> None:
        super().__init__(loss.output)
        self.loss, self.own = loss, loss.own

    def compute(self, pairs: Iterable[tuple[Any, Any]]) -> float:
        total, count = 0.0, 0
        for out, y in pairs:
            v = model_loss(out) if self.loss.own else self.loss(prediction(out, self.output), y)
            n = int(y.shape[0]) if isinstance(y, Tensor) and y.dim() else 1
            total, count = total + float(v) * n, count + n
        return total / max(count, 1)


class Cosine(Metric):
    """Mean cosine similarity of prediction and target vectors (the last dimension)."""

    name = "cosine"

    def compute(self, pairs: Iterable[tuple[Any, Any]]) -> float:
        total, count = 0.0, 0
        for out, y in pairs:
            p = prediction(out, self.output).float()
            if not isinstance(y, Tensor) or tuple(y.shape) != tuple(p.shape):
                raise ConfigError(f"--metric cosine needs targets shaped like the predictions {tuple(p.shape)}")
            c = F.cosine_similarity(p.reshape(-1, p.shape[-1]), y.float().reshape(-1, p.shape[-1]), dim=-1)
            total, count = total + float(c.sum()), count + c.numel()
        return total / max(count, 1)


class MSE(Metric):
    """Mean squared error of prediction and target, over all elements."""

    name, higher = "mse", False

    def compute(self, pairs: Iterable[tuple[Any, Any]]) -> float:
        total, count = 0.0, 0
        for out, y in pairs:
            p = prediction(out, self.output).float()
            if not isinstance(y, Tensor) or y.numel() != p.numel():
                raise ConfigError(f"--metric mse needs targets with as many elements as the predictions {tuple(p.shape)}")
            total, count = total + float(((p - y.float().reshape(p.shape)) ** 2).sum()), count + p.numel()
        return total / max(count, 1)


class Custom(Metric):
    """A user function metric(predictions, targets) over the whole eval set (concatenated on the CPU)."""

    def __init__(self, fn: Callable[[Tensor, Any], float], output: str | None = None) -> None:
        super().__init__(output)
        self.fn = fn
        self.name = getattr(fn, "__name__", "metric")
        self.unit = getattr(fn, "unit", "")
        self.higher = not getattr(fn, "lower_is_better", False)

    def compute(self, pairs: Iterable[tuple[Any, Any]]) -> float:
        preds, ys = [], []
        for out, y in pairs:
            preds.append(prediction(out, self.output).detach().float().cpu())
            ys.append(y.cpu() if isinstance(y, Tensor) else y)
        y_all = torch.cat(ys) if ys and all(isinstance(v, Tensor) for v in ys) else ys
        return float(self.fn(torch.cat(preds), y_all))


METRICS = ("auto", "accuracy", "perplexity", "loss", "cosine", "mse")


def as_metric(metric: Any, loss: Loss | None = None, output: str | None = None) -> Metric:
    """A Metric from a Metric, a name of METRICS (but "auto": see `default_metric`) or a function."""
    if isinstance(metric, Metric):
        return metric
    if metric is None or metric == "accuracy" or metric is accuracy:
        return Accuracy(output)
    if metric == "perplexity":
        return Perplexity(output, shift=1 if loss is not None and loss.own else 0)
    if metric == "loss":
        return MeanLoss(loss or as_loss("ce", output))
    if metric == "cosine":
        return Cosine(output)
    if metric == "mse":
        return MSE(output)
    if callable(metric):
        return Custom(metric, output)
    raise ConfigError(f"metric={metric!r} must be one of {', '.join(METRICS[1:])} or a function")


def _lm_shift(inputs: Inputs | None, target: Tensor) -> int | None:
    """1 when the targets are an integer input itself (the model shifts them: Hugging Face causal
    LMs), 0 when they are an input shifted by one, None when they are neither (not a language model)."""
    if inputs is None or target.dim() != 2:
        return None
    for t in inputs.tensors():
        if t.shape == target.shape and not t.is_floating_point():
            if torch.equal(t, target):
                return 1
            if torch.equal(t[:, 1:], target[:, :-1]):
                return 0
    return None


def default_metric(loss: Loss, out: Any, target: Any, inputs: Inputs | None = None) -> Metric:
    """The metric that follows the loss, judged on one batch: perplexity for language models
    (sequence outputs whose targets are the input ids, shifted or not), accuracy for
    classification and tagging, cosine for vector regression (embeddings), MSE for scalar
    regression, else the mean loss."""
    classes = isinstance(target, Tensor) and not target.is_floating_point() and not target.is_complex()
    try:
        p = prediction(out, loss.output)
    except ConfigError:
        p = None
    if classes and p is not None and p.is_floating_point():
        seq = p.dim() >= 3 and tuple(p.shape[:-1]) == tuple(target.shape)
        shift = _lm_shift(inputs, target) if seq else None
        if shift is not None and (loss.own or loss.name == "ce"):
            return Perplexity(loss.output, shift=shift if loss.own else 0)
        if seq or (p.dim() >= 2 and tuple(p.shape[:1] + p.shape[2:]) == tuple(target.shape)) or \
                (p.dim() == 2 and tuple(p.shape[:1]) == tuple(target.shape)):
            return Accuracy(loss.output)
    if loss.name in ("mse", "distill-mse", "distill-cosine") and p is not None and isinstance(target, Tensor) \
            and target.shape == p.shape:
        return Cosine(loss.output) if p.dim() >= 2 and p.shape[-1] > 1 else MSE(loss.output)
    return MeanLoss(loss)
