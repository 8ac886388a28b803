"""What the commands do, without a screen: each CLI command is a short function over this API.

    compress_checkpoint(job, callbacks)  checkpoint → model + recipe → DC / LC / FW → artifact → report
    export(artifact, onnx, model, …)     a compressed artifact as ONNX, checked in onnxruntime
    inspect(path)                        per-layer sizes of a checkpoint, artifact or ONNX file
    check(artifact, max_bytes, …)        size / accuracy budgets for CI
    sweep_checkpoint(…)                  a trade-off curve over levels and methods
    multilevel(…) / extract(…)           nested sparsity levels in one file, and one level out

Arguments are plain values (paths, numbers, `FILE.py:FUNC` specs); results are dataclasses;
progress goes out through `Callbacks`. Errors are `LCError`s with one line naming the problem.
"""

from __future__ import annotations

import fnmatch
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
from torch import Tensor, nn

from . import report as rep
from .checkpoint import CheckpointError, build_model, call_factory, load_callable, read_checkpoint
from .errors import ConfigError, LCError
from . import distributed
from .lc import LCConfig, Result, StepRecord
from .lc_config import DEFAULT_CAP
from .methods import compress
from .recipe import Recipe, Rule
from .schemes import LowRank, Prune
from .modelio import (METRICS, Inputs, Loss, Metric, accepts_labels, as_inputs, as_loss, as_metric, default_metric,
                      DISTILL, distill_kind, split_batch)
from .train import Teacher, evaluate, first_batch, recalibrate_bn_, resolve_device

COMPRESSIBLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d,
                nn.ConvTranspose3d, nn.Embedding)
# by class name, so that neither transformers nor a TorchScript module's Python class is needed
LAYER_NAMES = {c.__name__ for c in COMPRESSIBLE} | {"Conv1D", "NonDynamicallyQuantizableLinear"}
RNN_NAMES = {"LSTM", "GRU", "RNN"}


def _layer_weights(name: str, m: nn.Module) -> list[str]:
    """The compressible weights a module owns directly: the `weight` of Linear / Conv / Embedding /
    transformers' Conv1D, the input-hidden and hidden-hidden matrices of LSTM / GRU / RNN
    (weight_ih_l0, weight_hh_l0_reverse, …), MultiheadAttention's in_proj_weight (or q/k/v_proj_weight),
    an `ImplicitNet`'s A, B, C and D."""
    kind = getattr(m, "original_name", None) or type(m).__name__  # TorchScript keeps the Python class name
    own = dict(m.named_parameters(recurse=False))
    pre = f"{name}." if name else ""
    if isinstance(m, COMPRESSIBLE) or kind in LAYER_NAMES:
        keys = ["weight"]
    elif isinstance(m, (nn.LSTM, nn.GRU, nn.RNN)) or kind in RNN_NAMES:
        keys = [k for k in own if k.startswith(("weight_ih_l", "weight_hh_l"))]
    elif isinstance(m, nn.MultiheadAttention) or kind == "MultiheadAttention":
        keys = [k for k in ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight") if k in own]
    elif kind == "ImplicitNet":  # lccompress.implicit: x = relu(A x + B u), ŷ = C x + D u
        keys = ["A", "B", "C", "D"]
    else:
        return []
    return [pre + k for k in keys if isinstance(own.get(k), Tensor) and own[k].dim() >= 2]


@dataclass
class Callbacks:
    """Progress of a long call: `info(message)`, `start(label, steps)` before the first LC step,
    `step(record)` after each, `progress(done, total)` after each optimizer step of an L step
    (total None when unknown), `end()`."""

    info: Callable[[str], None] = lambda message: None
    start: Callable[[str, int], None] = lambda label, steps: None
    step: Callable[[StepRecord], None] = lambda record: None
    progress: Callable[[int, int | None], None] = lambda done, total: None
    end: Callable[[], None] = lambda: None


# ----------------------------------------------------------------------------- pieces
def state_module(state: Mapping[str, Tensor]) -> nn.Module:
    """A module whose parameters are a state_dict's floating tensors (for DC without the model)."""
    root = nn.Module()
    for name, t in state.items():
        *path, leaf = name.split(".")
        mod = root
        for p in path:
            if p not in mod._modules:
                mod.add_module(p, nn.Module())
            mod = mod._modules[p]
        if t.is_floating_point():
            mod.register_parameter(leaf, nn.Parameter(t.detach().clone()))
        else:
            mod.register_buffer(leaf, t.detach().clone())
    return root


def default_targets(module: nn.Module, has_code: bool) -> list[str]:
    """The weights of Linear, Conv, Embedding, LSTM / GRU / RNN, MultiheadAttention and transformers'
    Conv1D layers (`_layer_weights`), a tied weight once; from a bare state_dict (no code), every
    ≥ 2-D `*weight*` tensor."""
    if has_code:
        params = {id(p): n for n, p in module.named_parameters()}  # deduplicated: tied weights once
        found = []
        for name, m in module.named_modules():
            own = dict(m.named_parameters(recurse=False))
            for w in _layer_weights(name, m):
                if params.get(id(own[w.rpartition(".")[2]])) == w:
                    found.append(w)
        if found:
            return found
    return [n for n, p in module.named_parameters() if "weight" in n.rpartition(".")[2] and p.dim() >= 2]


def select(module: nn.Module, has_code: bool, include: Iterable[str], exclude: Iterable[str]) -> list[str]:
    names = [n for n, p in module.named_parameters() if p.is_floating_point()]
    include, exclude = list(include), list(exclude)
    for pat in include + exclude:
        if not any(fnmatch.fnmatchcase(n, pat) for n in names):
            raise ConfigError(f"glob {pat!r} matches no parameter; parameters are: {', '.join(names)}")
    chosen = [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in include)] if include else \
        default_targets(module, has_code)
    chosen = [n for n in chosen if not any(fnmatch.fnmatchcase(n, p) for p in exclude)]
    if not chosen:
        raise ConfigError("no parameter left to compress (check --include / --exclude)")
    return chosen


def load_data(spec: str) -> dict[str, Any]:
    fn = load_callable(spec, "--data")
    try:
        got = fn()
    except Exception as e:  # noqa: BLE001 - user code
        raise ConfigError(f"--data {spec!r} raised {type(e).__name__}: {e}") from None
    if isinstance(got, Mapping):
        bad = set(got) - {"train", "eval"}
        if bad or "train" not in got:
            raise ConfigError(f"--data {spec!r} returned keys {sorted(got)}; expected train and optionally eval")
        data = {k: v for k, v in got.items() if v is not None}
    else:
        data = {"train": got}
    for k, v in data.items():
        if not hasattr(v, "__iter__"):
            raise ConfigError(f"--data {spec!r}: {k!r} is a {type(v).__name__}, not a DataLoader")
    return data


def onnx_eval(path: str | os.PathLike, loader: Iterable, metric: Metric) -> float | None:
    """Metric of an ONNX file over a loader, run in onnxruntime on the CPU (None for a metric that
    needs the model's own loss, which the graph does not compute)."""
    import onnxruntime as ort

    from .artifact.onnx_export import feeds

    if metric.own:
        return None
    sess = ort.InferenceSession(os.fspath(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]

    def pairs() -> Iterable[tuple[Any, Any]]:
        for b in loader:
            x, y = split_batch(b, torch.device("cpu"))
            yield torch.from_numpy(sess.run(None, feeds(names, x))[0]), y

    return float(metric.compute(pairs()))


def check_output_path(out: Path, inputs: Sequence[str | os.PathLike | None] = ()) -> None:
    """An output path is .safetensors or .onnx, in an existing writable directory, and is none
    of the command's `inputs` (an output never overwrites an input)."""
    for i in inputs:
        if i is not None and os.path.exists(i) and os.path.exists(out) and os.path.samefile(i, out):
            raise ConfigError(f"-o {out}: is the input {i}; an output never overwrites an input")
    if out.suffix not in (".safetensors", ".onnx"):
        raise ConfigError(f"-o {out}: the output must end in .safetensors or .onnx")
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise ConfigError(f"-o {out}: directory {parent} does not exist")
    if not os.access(parent, os.W_OK) or (out.exists() and not os.access(out, os.W_OK)):
        raise ConfigError(f"-o {out}: not writable")


def parse_shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(s) for s in text.split(","))
    except ValueError:
        shape = ()
    if not shape or any(s < 1 for s in shape):
        raise ConfigError(f"--input-shape {text!r} must be positive integers separated by commas, e.g. 1,64")
    return shape


_DTYPES = {"float32": torch.float32, "float": torch.float32, "float16": torch.float16, "half": torch.float16,
           "bfloat16": torch.bfloat16, "float64": torch.float64, "int64": torch.int64, "long": torch.int64,
           "int32": torch.int32, "int": torch.int32, "int16": torch.int16, "int8": torch.int8, "uint8": torch.uint8,
           "bool": torch.bool}


def parse_input(text: str) -> tuple[str, Tensor, dict[int, str]]:
    """`NAME:SHAPE[:DTYPE]` → (name, example tensor, dynamic axes). SHAPE is comma-separated sizes,
    each `N` or `AXIS=N` (a dynamic axis named AXIS, example size N); DTYPE defaults to float32.
    Floats are N(0, 1), integers 0 or 1 (valid token ids), booleans True; seeded."""
    parts = text.split(":")
    if len(parts) not in (2, 3) or not parts[0].isidentifier():
        raise ConfigError(f"--input {text!r} must be NAME:SHAPE[:DTYPE], e.g. input_ids:batch=2,seq=16:int64")
    name, shape_text, dtype_text = parts[0], parts[1], parts[2] if len(parts) == 3 else "float32"
    dtype = _DTYPES.get(dtype_text.lower())
    if dtype is None:
        raise ConfigError(f"--input {text!r}: dtype {dtype_text!r} is not one of {', '.join(_DTYPES)}")
    shape, axes = [], {}
    for i, d in enumerate(shape_text.split(",")):
        axis, _, size = d.rpartition("=")
        if not size.isdigit() or int(size) < 1 or (axis and not axis.isidentifier()):
            raise ConfigError(f"--input {text!r}: dimension {d!r} must be a positive size N or AXIS=N")
        shape.append(int(size))
        if axis:
            axes[i] = axis
    g = torch.Generator().manual_seed(0)
    if dtype.is_floating_point:
        t = torch.randn(shape, generator=g).to(dtype)
    elif dtype == torch.bool:
        t = torch.ones(shape, dtype=torch.bool)
    else:
        t = torch.randint(0, 2, shape, generator=g).to(dtype)
    return name, t, axes


def load_example(spec: str) -> Inputs:
    """`--example FILE.py:FUNC`: the function returns a model's arguments: a tensor, a tuple of
    positional arguments, a dict of keyword arguments, or (args tuple, kwargs dict)."""
    fn = load_callable(spec, "--example")
    try:
        got = fn()
    except Exception as e:  # noqa: BLE001 - user code
        raise ConfigError(f"--example {spec!r} raised {type(e).__name__}: {e}") from None
    if isinstance(got, tuple) and len(got) == 2 and isinstance(got[0], (tuple, list)) and isinstance(got[1], Mapping):
        x = Inputs(tuple(got[0]), dict(got[1]))
    elif isinstance(got, (Tensor, tuple, list, Mapping)):
        x = as_inputs(got)
    else:
        raise ConfigError(f"--example {spec!r} returned {type(got).__name__}; expected a tensor, a tuple, a dict "
                          "or (args, kwargs)")
    if not x.tensors():
        raise ConfigError(f"--example {spec!r}: the arguments hold no tensor")
    return x


@dataclass
class ExampleSpec:
    """Where an ONNX export's example input comes from, first match wins: `inputs` (--input
    NAME:SHAPE:DTYPE, repeatable), `example` (--example FILE.py:FUNC), `input_shape` (one float
    tensor, e.g. "1,64"), else the first batch of the data (eval, else train)."""

    input_shape: str | None = None
    inputs: tuple[str, ...] = ()
    example: str | None = None

    def resolve(self, data: Mapping[str, Any] | None, what: str) -> tuple[Inputs, dict[str, dict[int, str]] | None]:
        """(example inputs, dynamic axes or None for the defaults)."""
        if self.inputs:
            parsed = [parse_input(t) for t in self.inputs]
            names = [n for n, _, _ in parsed]
            if len(set(names)) != len(names):
                raise ConfigError(f"--input names must differ; got {', '.join(names)}")
            axes = {n: (a or {0: "batch"}) for n, _, a in parsed}
            return Inputs((), {n: t for n, t, _ in parsed}), axes
        if self.example:
            return load_example(self.example), None
        if self.input_shape:
            return Inputs((torch.randn(parse_shape(self.input_shape), generator=torch.Generator().manual_seed(0)),)), None
        if data:
            return split_batch(first_batch(data.get("eval", data["train"]), "eval"))[0], None
        raise ConfigError(f"{what} needs an example input: give --data, --input NAME:SHAPE:DTYPE, "
                          "--example FILE.py:FUNC or --input-shape")


# ----------------------------------------------------------------------------- compress
@dataclass
class CompressJob:
    """One compression command's arguments: the checkpoint, a function making the recipe from
    the names of the parameters chosen (--include / --exclude or the defaults), and the options."""

    checkpoint: str
    build_recipe: Callable[[list[str]], Recipe]
    out: str | None = None
    report_path: str | None = None
    model_spec: str | None = None
    data_spec: str | None = None
    loss: str = "auto"
    metric: str = "auto"
    output: str | None = None
    inputs: tuple[str, ...] = ()
    example: str | None = None
    dtype: str | None = None
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    method: str | None = None
    steps: int = 40
    epochs: float | None = None
    first_epochs: float | None = None
    budget: int | None = None
    optimizer: str = "adamw"
    lr: float | None = None
    amp: str = "off"
    mu0: float | None = None
    mu_growth: float | None = None
    #: LC's last share of the budget, training θ itself (None: the schemes' default)
    tail: float | None = None
    #: AC/DC's compressed / decompressed phase pairs (method "acdc")
    cycles: int = 4
    #: CrAM's ascent step ρ (method "cram")
    rho: float | None = None
    penalty: str = "al"
    device: str = "auto"
    seed: int = 0
    input_shape: str | None = None
    state_dir: str | None = None
    resume: bool = False
    trust_checkpoint: bool = False
    fixed_recipe: bool = False
    #: the recipe's rule is structured pruning, its units from the model's graph (traced on the example
    #: input): "groups" (one constraint per group of coupled layers) or "global" (one over all channels)
    structured: str | None = None
    #: for an ONNX artifact, measure what onnxruntime sees (session memory, latency) against the dense model
    device_report: bool = True
    argv: list[str] = field(default_factory=lambda: sys.argv[1:])


@dataclass
class CompressOutcome:
    """A finished compression: the report (stable JSON keys, see `report`), the artifact, the run."""

    report: dict[str, Any]
    artifact: Path
    result: Result


def output_axes(recipe: Recipe, model: nn.Module) -> Recipe:
    """The recipe with uniform grids of GPT-2-style Conv1D weights (stored (in, out)) set to
    `axis=1`, so their scales run along the output channels as for a Linear (and the export can
    use MatMulNBits)."""
    from .recipe import match
    from .schemes import Uniform

    conv1d = {f"{n}.weight" for n, m in model.named_modules() if type(m).__name__ == "Conv1D"}
    if not conv1d:
        return recipe
    named = dict(model.named_parameters())
    rules = []
    for r in recipe.rules:
        if isinstance(r.scheme, Uniform) and r.scheme.axis == 0 and not r.joint and not r.units:
            names = match(r.params, named)
            turned = [n for n in names if n in conv1d and named[n].dim() == 2]
            if turned:
                rest = tuple(n for n in names if n not in turned)
                s = r.scheme
                rules += ([Rule(rest, s)] if rest else []) + [Rule(tuple(turned), Uniform(s.width, s.group_size, s.symmetric, axis=1))]
                continue
        rules.append(r)
    return Recipe(tuple(rules))


def _structured(recipe: Recipe, model: nn.Module | None, data: Mapping[str, Any], job: CompressJob) -> Recipe:
    """The structured rule resolved against the model's graph: its channel groups, traced on the
    example input (the first batch, or --input / --example / --input-shape)."""
    if model is None:
        raise ConfigError("structured pruning follows channels through the model's graph: give --model FILE.py:FUNC")
    x = ExampleSpec(job.input_shape, job.inputs, job.example).resolve(data, "structured pruning")[0]
    if x.kwargs or not x.args or not all(isinstance(a, Tensor) for a in x.args):
        raise ConfigError("structured pruning traces models called with positional tensors only")
    dev = next((p.device for p in model.parameters()), torch.device("cpu"))
    rule = recipe.rules[0]
    if job.structured not in ("groups", "global"):
        raise ConfigError(f"structured={job.structured!r} must be 'groups' or 'global'")
    return Recipe.structured(model, tuple(a.to(dev) for a in x.args), rule.scheme, include=rule.params,
                             joint=job.structured == "global")


def compress_checkpoint(job: CompressJob, callbacks: Callbacks | None = None) -> CompressOutcome:
    """Run one compression command end to end: read, build, compress, write, measure, report."""
    cb = callbacks or Callbacks()
    t_start = time.perf_counter()
    ckpt_path = Path(job.checkpoint)
    out = Path(job.out) if job.out else Path(ckpt_path.stem + ".compressed.safetensors")
    check_output_path(out, [job.checkpoint])
    if job.report_path:
        rp = Path(job.report_path)
        if rp.suffix not in (".json", ".md"):
            raise ConfigError(f"--report {rp}: must end in .json or .md")
        where = rp.parent if str(rp.parent) else Path(".")
        if not where.is_dir() or not os.access(where, os.W_OK):
            raise ConfigError(f"--report {rp}: directory {where} does not exist or is not writable")
    ck = read_checkpoint(ckpt_path, trust=job.trust_checkpoint)
    model = build_model(ck, job.model_spec)
    for note in ck.notes:
        cb.info(note)
    data = load_data(job.data_spec) if job.data_spec else {}
    method = job.method or ("lc" if data else "dc")
    if method != "dc" and not data:
        raise ConfigError(f"--method {method} trains, so it needs --data FILE.py:FUNC")
    if not data:
        cb.info("no --data given: the method is DC (direct compression of the weights, no training)")
    needs_model = method != "dc" or out.suffix == ".onnx" or bool(data)
    if model is None and needs_model:
        raise ConfigError(f"{ckpt_path} holds weights only ({ck.kind}); training, evaluation and ONNX export "
                          "need the model: give --model FILE.py:FUNC")
    subject = model if model is not None else state_module(ck.state_dict)
    if job.fixed_recipe:
        if job.include or job.exclude:
            raise ConfigError("--include / --exclude do not apply to --recipe (name parameters in the recipe)")
        recipe = job.build_recipe([])
    else:
        recipe = job.build_recipe(select(subject, model is not None, job.include, job.exclude))
    if job.structured:
        recipe = _structured(recipe, model, data, job)
    if model is not None and not job.fixed_recipe:
        recipe = output_axes(recipe, model)
    _refuse_growing_ranks(recipe.groups(subject))  # resolve now: a bad glob fails before any training
    device = resolve_device(job.device)

    loss_fn: Loss = as_loss("ce", job.output)
    metric: Metric = as_metric("accuracy" if job.metric == "auto" else job.metric, loss_fn, job.output)
    if data:
        model.to(device).eval()
        data, loss_fn, metric = make_task(model, data, job.loss, job.metric, job.output, device)
    example = None
    if out.suffix == ".onnx":  # a missing or unfitting example fails before any training
        example = ExampleSpec(job.input_shape, job.inputs, job.example).resolve(data, "ONNX export")
        x = example[0]
        try:
            with torch.no_grad():
                dev = next((p.device for p in model.parameters()), torch.device("cpu"))
                x.to(dev)(model.eval())  # eval mode: no statistics change
        except Exception as e:  # noqa: BLE001 - the user's model on the user's example
            msg = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise ConfigError(f"the model fails on the ONNX example input: {msg}") from None

    default_epochs = job.epochs is None and job.first_epochs is None and job.budget is None
    cfg = LCConfig(steps=job.steps, epochs=5 if job.epochs is None else job.epochs,
                   first_epochs=2 * (5 if job.epochs is None else job.epochs) if job.first_epochs is None
                   else job.first_epochs, budget=job.budget, cap=DEFAULT_CAP if default_epochs else None,
                   optimizer=job.optimizer, lr=job.lr, amp=job.amp, mu0=job.mu0,
                   mu_growth=job.mu_growth, penalty=job.penalty, tail=job.tail, cycles=job.cycles)
    state_dir = Path(job.state_dir) if job.state_dir else out.with_name(out.name + ".lcstate")
    trains = method in ("lc", "idc")
    cb.start(f"{method.upper()} {recipe.rules[0].scheme.name}",
             job.steps if trains else 2 * job.cycles + 1 if method == "acdc" else 1)
    extra = {"cram": {"rho": job.rho}} if method == "cram" and job.rho is not None else {}
    try:
        result = compress(subject, recipe, data or None, method=method, config=cfg, loss=loss_fn, **extra,
                          metric=metric, device=device, seed=job.seed, callback=cb.step,
                          on_progress=cb.progress,
                          state_dir=state_dir if trains else None, resume=job.resume)
    finally:
        cb.end()
    if not distributed.is_main():  # under torchrun process 0 writes and reports
        return CompressOutcome({}, out, result)
    report = _write_outputs(job, ck, model, result, recipe, data, device, out, metric, example)
    for row in report["layers"]:
        dense = sum(subject.get_parameter(p).numel() * subject.get_parameter(p).element_size() * 8
                    for p in row["params"]) if not isinstance(subject, torch.jit.ScriptModule) else None
        if dense is not None and row["bits"] >= dense:
            cb.info(f"notice: {row['name']} takes {row['bits']:,} bits compressed, not fewer than its {dense:,} "
                    "bits dense; --exclude it to keep it dense")
    if trains and state_dir.exists():
        shutil.rmtree(state_dir, ignore_errors=True)
    report["timings"]["total"] = time.perf_counter() - t_start
    if job.report_path:
        rep.write(job.report_path, report)
    return CompressOutcome(report, out, result)


def _refuse_growing_ranks(groups: Sequence[Any]) -> None:
    """A fixed rank whose factors r(m + n) are not fewer than the m·n dense weights: refused, naming
    the layer and the largest rank that saves space (the user asked for a size that is no saving)."""
    for g in groups:
        if isinstance(g.scheme, LowRank):
            m, n = g.shape[0], g.shape.numel() // max(1, g.shape[0])
            r = min(g.scheme.rank, m, n)
            if r * (m + n) >= m * n:
                best = (m * n - 1) // (m + n)
                hint = f"ranks ≤ {best} save space there" if best >= 1 else "no rank saves space there"
                raise ConfigError(f"rank {g.scheme.rank}: {g.name} ({m}×{n} as a matrix) is smaller dense ({m * n:,} "
                                  f"weights) than as rank-{r} factors ({r * (m + n):,}); {hint}: lower --rank "
                                  f"or --exclude {g.params[0]}")


def make_task(model: nn.Module, data: Mapping[str, Any], loss: str = "auto", metric: str = "auto",
              output: str | None = None, device: torch.device = torch.device("cpu")
              ) -> tuple[dict[str, Any], Loss, Metric]:
    """The data (wrapped for distillation), loss and metric of a job, from the options:

    loss    auto (the model's own loss when the batches are dicts with "labels" and its forward
            takes labels, else ce) | ce | mse | model | distill (KL on class logits, else MSE) |
            distill-kl | distill-mse | distill-cosine | FILE.py:FUNC
    metric  auto (`modelio.default_metric` on an eval batch) | accuracy | perplexity | loss | cosine
            | mse | FILE.py:FUNC

    One batch of each loader goes through the model, the loss and the metric, so that data, a
    loss or a metric that do not fit fail here in one line, before any training."""
    data = dict(data)
    first = first_batch(data["train"], "train")
    x0, y0 = split_batch(first)
    if loss == "auto":
        loss = "model" if x0.label_key == "labels" and accepts_labels(model) else "ce"
    if loss in ("distill", "distill-kl", "distill-mse", "distill-cosine"):
        kind = loss[8:]
        if not kind:
            with torch.no_grad():
                kind = distill_kind(x0.to(device)(model), y0, output)
        labelled = y0 is not None
        logits = kind == "kl"
        # the eval data keeps its own targets for classifiers; else the reference's outputs are the
        # targets (its predicted classes for logits, its vectors for embeddings)
        data = {"train": Teacher(data["train"], model, device, output=output),
                **({"eval": data["eval"] if labelled and logits else
                    Teacher(data["eval"], model, device, argmax=logits, output=output)} if "eval" in data else {})}
        loss_fn = Loss(DISTILL[kind], "distill" if logits else f"distill-{kind}", output)
    elif loss in ("ce", "mse", "model"):
        loss_fn = as_loss(loss, output)
    else:
        loss_fn = as_loss(load_callable(loss, "--loss"), output)
    probe = "eval" if "eval" in data else "train"
    for split in data:
        b = first_batch(data[split], split)
        try:
            x, y = split_batch(b, device)
            with torch.no_grad():
                if split == "train":
                    if y is None and not loss_fn.own:
                        raise ConfigError(f"the train batches have no targets; --loss {loss_fn.name} needs them "
                                          "(or use --loss distill)")
                    _, out = loss_fn.on(model, x, y)
                else:
                    out = x(model, y if loss_fn.own else None)
        except LCError as e:
            raise ConfigError(f"--data: {e}") from None
        except Exception as e:  # noqa: BLE001 - shapes, dtypes, anything user data can get wrong
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ConfigError(f"--data: a {split} batch does not fit the model or the loss: {msg}") from None
        if split == probe:  # the batch the metric is chosen and tried on
            probe_batch = (x, y, out)
    x, y, out = probe_batch
    if metric == "auto":
        m = default_metric(loss_fn, out, y, x)
    elif metric in METRICS:
        m = as_metric(metric, loss_fn, output)
    else:
        m = as_metric(load_callable(metric, "--metric"), loss_fn, output)
    if "eval" in data:
        try:
            with torch.no_grad():
                m.compute([(out, y)])
        except LCError as e:
            raise ConfigError(str(e)) from None
        except Exception as e:  # noqa: BLE001 - a user metric
            raise ConfigError(f"--metric {m.name} does not apply to these outputs: {type(e).__name__}: {e}") from None
    return data, loss_fn, m


def _write_outputs(job: CompressJob, ck, model, result: Result, recipe: Recipe, data, device, out: Path,
                   metric_fn: Metric, example: tuple[Inputs, dict[str, dict[int, str]] | None] | None
                   ) -> dict[str, Any]:
    from .artifact import disk_bytes, export_onnx, save, size_report, verify_onnx
    from .artifact.container import cast_

    onnx_metric, onnx_diff = None, None
    if out.suffix == ".onnx":
        x, axes = example
        export_onnx(result.model.cpu(), result.thetas, result.groups, x, out, dynamic_axes=axes, output=job.output)
        onnx_diff = verify_onnx(out, result.model, x, output=job.output)["max_rel"]
        if "eval" in data:
            onnx_metric = onnx_eval(out, data["eval"], metric_fn)
    else:
        thetas = result.thetas
        dtypes = _stored_dtypes(job.dtype, ck, result.model)
        if dtypes:
            thetas = cast_(result.model, result.thetas, result.groups, dtypes)
        save(out, result.model, thetas, result.groups, recipe=recipe)
    device_figs = None
    if out.suffix == ".onnx" and job.device_report:
        device_figs = device_report(out, model, example, job.output)
    size = size_report(out)
    ref_bytes = sum(t.numel() * t.element_size() for t in ck.state_dict.values())
    art_bytes = disk_bytes(out)
    metric = {**metric_fn.describe(), "reference": None, "compressed": result.metric, "onnx": onnx_metric,
              "drop": None}
    classes: list[dict[str, Any]] = []
    if "eval" in data:
        ref_val, ref_cls, y = evaluate(model.to(device).eval(), data["eval"], device, metric_fn)
        _, new_cls, _ = evaluate(result.model.to(device).eval(), data["eval"], device, metric_fn)
        metric["reference"] = ref_val
        metric["drop"] = metric_fn.worse_by(ref_val, onnx_metric if onnx_metric is not None else result.metric)
        if ref_cls is not None and new_cls is not None:
            classes = rep.per_class(ref_cls, new_cls, y)
    return {
        **rep.versions(), "command": "lccompress " + " ".join(job.argv), "method": result.method,
        "seed": job.seed, "device": str(device), "recipe": recipe.to_dict(), "config": _config(result),
        "artifact": str(out), "artifact_bytes": art_bytes, "reference_bytes": ref_bytes,
        "compression_ratio": ref_bytes / max(1, art_bytes), "metric": metric, "onnx_max_rel_diff": onnx_diff,
        "per_class": classes, "layers": rep.layers(result.groups, result.thetas, size),
        "timings": {k: round(v, 3) for k, v in result.timings.items()}, "budget": result.budget,
        "history": [vars(h) for h in result.history], "device_figures": device_figs,
        "implicit": implicit_certificates(
            result.model, lambda: example[0] if example else (ExampleSpec().resolve(data, "")[0] if data else None),
            device),
    }


def implicit_certificates(model: nn.Module, batch: Callable[[], Inputs | None],
                          device: torch.device) -> list[dict[str, Any]]:
    """Per `ImplicitNet` in the model: ‖A‖∞ (< 1: well-posed, a unique state) and the relative
    fixed-point residual of its state on the inputs `batch()` gives (called only when the model
    has implicit layers; None: no residual), read by running the model once with a hook on each
    implicit layer's input."""
    from .implicit import ImplicitNet

    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, ImplicitNet)]
    seen: dict[str, Tensor] = {}
    inputs = batch() if layers else None
    if inputs is not None:
        hooks = [m.register_forward_hook(lambda mod, args, out, name=n: seen.setdefault(name, args[0].detach()))
                 for n, m in layers]
        try:
            with torch.no_grad():
                inputs.to(device)(model.to(device).eval())
        finally:
            for h in hooks:
                h.remove()
    out = []
    for n, m in layers:
        norm = m.well_posedness()
        out.append({"module": n or "(model)", "norm_inf": norm, "well_posed": norm < 1,
                    "residual": m.residual(seen[n]) if n in seen else None})
    return out


def device_report(path: Path, reference: nn.Module, example: tuple[Inputs, Any], output: str | None = None,
                  batches: Sequence[int] = (1, 32), repeats: int = 20) -> dict[str, Any]:
    """What onnxruntime sees (`artifact.runtime.measure_onnx`: session memory, median latency at each
    batch size, one thread) for the ONNX file at `path` and for the dense reference model exported
    the same way: {"artifact": {...}, "reference": {...}, "batches": [...]}."""
    import tempfile

    import onnx

    from .artifact import export_onnx
    from .artifact.onnx_export import feeds
    from .artifact.runtime import batch_feed, measure_onnx

    x, axes = example
    g = onnx.load(str(path), load_external_data=False).graph
    inits = {t.name for t in g.initializer}
    feed = feeds([i.name for i in g.input if i.name not in inits], x)
    per = {b: batch_feed(feed, b) for b in batches}
    with tempfile.TemporaryDirectory(prefix="lccompress-ref-") as tmp:
        ref = Path(tmp) / "reference.onnx"
        export_onnx(reference.cpu(), {}, [], x, ref, dynamic_axes=axes, output=output)
        figs = {"artifact": measure_onnx(path, per, repeats=repeats), "reference": measure_onnx(ref, per, repeats=repeats)}
    return {"batches": list(batches), "threads": 1,
            **{k: {"file_bytes": f.file_bytes, "session_bytes": f.session_bytes,
                   "latency_ms": {str(b): round(ms, 4) for b, ms in f.latency_ms.items()}} for k, f in figs.items()}}


def _stored_dtypes(dtype: str | None, ck, model: nn.Module) -> dict[str, torch.dtype]:
    """Dtypes for the artifact's floating tensors where they differ from the model's: `dtype` for
    all, else each tensor's dtype in the checkpoint (an fp16 checkpoint stays fp16)."""
    own = {k: v.dtype for k, v in model.state_dict().items() if v.is_floating_point()}
    if dtype:
        want = dict.fromkeys(own, getattr(torch, dtype))
    else:
        want = {k: v.dtype for k, v in ck.state_dict.items() if k in own and v.is_floating_point()}
    return {k: d for k, d in want.items() if d != own[k]}


def _config(result: Result) -> dict[str, Any] | None:
    return dict(vars(result.config)) if result.config is not None else None




# ----------------------------------------------------------------------------- export / inspect / check
@dataclass
class ExportOutcome:
    """An exported ONNX file, its bytes on disk, and onnxruntime's largest deviation from torch."""

    path: Path
    bytes: int
    max_abs: float
    max_rel: float


def export(artifact: str, onnx_out: str, model_spec: str, input_shape: str | None = None,
           data_spec: str | None = None, sparse: str = "packed", *, inputs: Sequence[str] = (),
           example: str | None = None, output: str | None = None, dequantize: str = "qdq",
           matmul_nbits: bool = True) -> ExportOutcome:
    """Export a compressed artifact to ONNX with the model from `model_spec`, checked in onnxruntime;
    the example input from `inputs`, `example`, `input_shape` or the data's first batch (`ExampleSpec`)."""
    from .artifact import disk_bytes, export_onnx, load, load_into_, verify_onnx

    out = Path(onnx_out)
    if out.suffix != ".onnx":
        raise ConfigError(f"--onnx {out}: must end in .onnx")
    check_output_path(out, [artifact])
    art = load(artifact)
    model = load_into_(call_factory(model_spec), artifact)
    spec = ExampleSpec(input_shape, tuple(inputs), example)
    given = bool(input_shape or inputs or example)
    x, axes = spec.resolve(load_data(data_spec) if data_spec and not given else None, "export")
    export_onnx(model, art.thetas, art.groups, x, out, sparse=sparse, dynamic_axes=axes, output=output,
                dequantize=dequantize, matmul_nbits=matmul_nbits)
    diff = verify_onnx(out, model, x, output=output)
    return ExportOutcome(out, disk_bytes(out), diff["max_abs"], diff["max_rel"])


def _is_artifact(path: str) -> bool:
    if not path.endswith(".safetensors"):
        return False
    from safetensors import safe_open

    from .artifact.container import META_KEY

    try:
        with safe_open(path, framework="pt") as f:
            return META_KEY in (f.metadata() or {})
    except Exception:  # noqa: BLE001 - not a readable safetensors file: treat as a checkpoint
        return False


@dataclass
class Inspection:
    """`inspect`'s rows, per compressed group and per dense tensor, and the file's bytes on disk."""

    path: str
    file_bytes: int
    layers: list[dict[str, Any]]


def inspect(path: str, trust: bool = False) -> Inspection:
    """Per-layer sizes of a checkpoint, a compressed artifact or an exported ONNX file."""
    from .artifact import disk_bytes, load, size_report

    if not Path(path).exists():
        raise CheckpointError(f"{path}: no such file")
    rows: list[dict[str, Any]] = []
    if path.endswith(".onnx") or _is_artifact(path):
        size = size_report(path)
        art = load(path) if not path.endswith(".onnx") else None
        for g in size.groups:
            group = next((x for x in art.groups if x.name == g.name), None) if art else None
            detail = rep.summary_text(group.scheme.summary(art.thetas[g.name], group.shape)) if group else ""
            shape = " + ".join("×".join(map(str, s)) for s in group.shapes) if group else ""
            rows.append({"name": g.name, "shape": shape, "numel": g.numel, "scheme": g.scheme, "detail": detail,
                         "bits": g.stored_bits, "bytes": math.ceil(g.stored_bits / 8)})
        if art:
            compressed = {p for gg in art.groups for p in gg.params}
            aliases = art.manifest.get("aliases", {})
            for k, t in art.state_dict.items():
                if k in aliases:
                    rows.append({**_dense_row(k, t), "scheme": "tied", "detail": f"= {aliases[k]}", "bits": 0,
                                 "bytes": 0})
                elif k not in compressed:
                    rows.append(_dense_row(k, t))
        return Inspection(path, disk_bytes(path), rows)
    ck = read_checkpoint(path, trust=trust)
    return Inspection(path, os.stat(path).st_size, [_dense_row(k, t) for k, t in ck.state_dict.items()])


def _dense_row(name: str, t: Tensor) -> dict[str, Any]:
    bits = t.numel() * t.element_size() * 8
    return {"name": name, "shape": "×".join(map(str, t.shape)) or "scalar", "numel": t.numel(), "scheme": "dense",
            "detail": str(t.dtype).replace("torch.", ""), "bits": bits, "bytes": bits // 8}


@dataclass
class CheckOutcome:
    """Each budget's value, limit and verdict; `ok` when all hold."""

    artifact: str
    ok: bool
    checks: list[dict[str, Any]]

    def to_dict(self) -> dict[str, Any]:
        return {"artifact": self.artifact, "ok": self.ok, "checks": self.checks}


def check(artifact: str, max_bytes: int | None = None, max_drop: float | None = None, reference: str | None = None,
          model_spec: str | None = None, data_spec: str | None = None, metric: str = "auto",
          trust: bool = False, loss: str = "auto", output: str | None = None) -> CheckOutcome:
    """Budgets for CI: bytes on disk ≤ max_bytes; how much worse the metric is than on `reference`
    (in the metric's unit: a fraction for accuracy) ≤ max_drop. The metric is chosen as by
    `make_task` (`metric`, `loss`, `output`)."""
    from .artifact import disk_bytes, load_into_

    if max_bytes is None and max_drop is None:
        raise ConfigError("give at least one budget: --max-bytes or --max-drop")
    if max_drop is not None and not (isinstance(max_drop, (int, float)) and math.isfinite(max_drop) and max_drop >= 0):
        raise ConfigError(f"--max-drop {max_drop!r} must be a number ≥ 0")
    if max_bytes is not None and (isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 0):
        raise ConfigError(f"--max-bytes {max_bytes!r} must be a whole number of bytes ≥ 0")
    verify_artifact(artifact)
    checks = []
    if max_bytes is not None:
        size = disk_bytes(artifact)
        checks.append({"budget": "bytes", "value": size, "limit": max_bytes, "ok": size <= max_bytes,
                       "over": max(0, size - max_bytes)})
    if max_drop is not None:
        if not (reference and model_spec and data_spec):
            raise ConfigError("--max-drop needs --reference CKPT, --model and --data")
        data = load_data(data_spec)
        ref = build_model(read_checkpoint(reference, trust=trust), model_spec)
        cpu = torch.device("cpu")
        data, _, metric_fn = make_task(ref.eval(), data, loss, metric, output, cpu)
        loader = data.get("eval", data["train"])
        ref_val = evaluate(ref.eval(), loader, cpu, metric_fn)[0]
        if artifact.endswith(".onnx"):
            new_val = onnx_eval(artifact, loader, metric_fn)
            if new_val is None:
                raise ConfigError(f"--metric {metric_fn.name} needs the model's own loss, which an ONNX graph does "
                                  "not compute; choose another --metric")
        else:
            new_val = evaluate(load_into_(call_factory(model_spec), artifact).eval(), loader, cpu, metric_fn)[0]
        drop = metric_fn.worse_by(ref_val, new_val)
        checks.append({"budget": "drop", "metric": metric_fn.name, "value": round(drop, 6), "limit": max_drop, "ok": drop <= max_drop,
                       "over": round(max(0.0, drop - max_drop), 6), "reference": ref_val, "compressed": new_val})
    return CheckOutcome(artifact, all(c["ok"] for c in checks), checks)


def verify_artifact(path: str) -> str:
    """Open and verify a file before judging it: a compressed artifact (manifest, every checksum,
    every group rebuilt), a multi-level file, or an ONNX model (parsed and checked). Returns its
    kind; anything else is an LCError."""
    from .artifact import ArtifactError, load
    from .artifact.multilevel import levels_summary

    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"{path}: no such file")
    if not p.is_file():
        raise ArtifactError(f"{path}: not a file")
    if path.endswith(".onnx"):
        import onnx

        from .artifact.size import load_onnx

        try:
            onnx.checker.check_model(load_onnx(path))
        except (onnx.checker.ValidationError, ValueError, UnicodeDecodeError) as e:
            raise ArtifactError(f"{path}: not a valid ONNX model ({_first_line(e)})") from None
        return "onnx"
    if _is_artifact(path):
        load(path)
        return "artifact"
    try:
        levels_summary(path)
        return "multilevel"
    except LCError:
        pass
    except Exception:  # noqa: BLE001 - not a safetensors file at all
        pass
    raise ArtifactError(f"{path}: not an lccompress artifact, multi-level file or ONNX model")


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


# ----------------------------------------------------------------------------- sweep / multilevel / extract
def _trained_model(ckpt: str, model_spec: str | None, trust: bool, what: str) -> nn.Module:
    model = build_model(read_checkpoint(ckpt, trust=trust), model_spec)
    if model is None:
        raise ConfigError(f"{ckpt} holds weights only; {what}: give --model FILE.py:FUNC")
    return model


@dataclass
class SweepOutcome:
    """The curves per method ({method: [points]}) and the files written."""

    curves: dict[str, list[dict[str, Any]]]
    json_path: Path
    svg_path: Path


def sweep_checkpoint(ckpt: str, kind: str, levels: Sequence[Any], methods: Sequence[str], out_dir: str, *,
                     model_spec: str | None, data_spec: str, steps: int = 40, epochs: int = 5,
                     device: str = "auto", seed: int = 0, trust: bool = False,
                     on_point: Callable[[str, Any, dict[str, Any]], None] | None = None) -> SweepOutcome:
    """Every (method, level) of one kind ("keep", "bits", "rank") on a checkpoint: `sweep.sweep`."""
    from .sweep import sweep

    model = _trained_model(ckpt, model_spec, trust, "the sweep trains")
    curves = sweep(model, load_data(data_spec), kind, list(levels), list(methods), out_dir,
                   config=LCConfig(steps=steps, epochs=epochs), device=device, seed=seed, callback=on_point)
    return SweepOutcome(curves, Path(out_dir) / "curve.json", Path(out_dir) / "curve.svg")


@dataclass
class MultilevelOutcome:
    """The multi-level file, its bytes, and per level its keep fraction and units kept."""

    path: Path
    bytes: int
    levels: list[dict[str, Any]]


def multilevel(ckpt: str, keeps: Sequence[float], out: str, *, per_layer: bool = False, structure: str = "weight",
               method: str = "none", include: Sequence[str] = (), exclude: Sequence[str] = (),
               model_spec: str | None = None, data_spec: str | None = None, seed: int = 0,
               trust: bool = False, budget: int | None = None,
               on_progress: Callable[[int, int | None], None] | None = None) -> MultilevelOutcome:
    """One file with nested sparsity levels (`artifact.multilevel`). Method "sfw" refines the dense
    model first by Frank-Wolfe in the k-sparse polytope of the smallest level (`fw.SFW_DEFAULTS`);
    "cram" by CrAM⁺ cycling through the levels (`cram.cram_refine` with `cram.MULTILEVEL_DEFAULTS`),
    `budget` optimizer steps (default: LC's default budget on this loader)."""
    from .artifact.container import tied
    from .artifact.multilevel import build_levels, levels_summary, save_multilevel, tie_
    from .fw import SFW_DEFAULTS, KSparsePolytope, sfw_refine

    check_output_path(Path(out), [ckpt])
    if method not in ("none", "sfw", "cram"):
        raise ConfigError(f"method={method!r} must be none, sfw or cram")
    if method == "cram" and structure != "weight":
        raise ConfigError("--method cram trains for weight levels; use --structure weight (or --method sfw)")
    ck = read_checkpoint(ckpt, trust=trust)
    model = build_model(ck, model_spec)
    if model is not None:
        subject = model
    else:  # a bare state_dict: entries sharing storage (torch.save keeps a tie) stay one parameter
        ties = tied(ck.state_dict)
        subject = tie_(state_module({k: v for k, v in ck.state_dict.items() if k not in ties}), ties)
    names = select(subject, model is not None, include, exclude)
    if method != "none" and (model is None or not data_spec):
        raise ConfigError(f"--method {method} trains: give --model and --data")
    if method == "sfw":
        subject = sfw_refine(model, load_data(data_spec), {tuple(names): KSparsePolytope(k=min(keeps))},
                             seed=seed, device="cpu", **SFW_DEFAULTS)
    elif method == "cram":
        from .cram import MULTILEVEL_DEFAULTS, cram_refine

        data = load_data(data_spec)
        if budget is None:
            try:
                budget = sum(LCConfig(cap=DEFAULT_CAP).plan(len(data["train"])) or [])
            except TypeError:
                raise ConfigError("--method cram needs --budget when the training loader has no len()") from None
        recipes = [Recipe.single(names, Prune(keep=k), joint=not per_layer) for k in keeps]
        subject = cram_refine(model, data, recipes, iterations=budget, seed=seed, device="cpu", **MULTILEVEL_DEFAULTS,
                              on_step=None if on_progress is None else (lambda done: on_progress(done, budget)))
    levels = build_levels(subject, names, keeps, scope="layer" if per_layer else "global", structure=structure)
    size = save_multilevel(out, subject, levels)
    return MultilevelOutcome(Path(out), size, levels_summary(out))


def load_level_(model: nn.Module, path: str | os.PathLike, level: int, loader: Iterable | None = None,
                batches: int = 50) -> nn.Module:
    """Fill `model` with the weights of `level`; with a loader, also recalibrate its BatchNorms.
    Weights the model ties to a leveled parameter get that parameter's level (`multilevel.untied`)."""
    from .artifact.multilevel import read_level, untied

    meta, sd = read_level(path, level)
    model.load_state_dict(untied(model, sd, list(meta["params"])))
    if loader is not None:
        recalibrate_bn_(model, loader, batches)
    return model


def extract_artifact(path: str | os.PathLike, level: int, out: str | os.PathLike, *,
                     model: nn.Module | None = None, loader: Iterable | None = None, batches: int = 50) -> int:
    """Write level `level` of a multi-level file as a single-level lccompress artifact (ready for
    ONNX export); returns its bytes. Pruned levels become `Prune(count=…)` groups (one joint group
    for a "global" file), rank levels `LowRank`. With `model` and `loader`, BatchNorm statistics
    are recalibrated for this level first. Tied entries (the file's aliases, or the model's ties)
    stay tied: stored once, recorded as the artifact's aliases."""
    from safetensors import safe_open

    from .artifact import save
    from .artifact.container import tied
    from .artifact.multilevel import read_level, tie_, untied

    meta, sd = read_level(path, level)  # validated (seal, digests, shapes) before anything is decoded
    names = list(meta["params"])
    aliases = meta.get("aliases", {})
    if model is not None and loader is not None:
        model.load_state_dict(untied(model, sd, names))
        recalibrate_bn_(model, loader, batches)
        own = model.state_dict()
        aliases = tied(own, first=[*names, *own])
        sd = {k: v.detach().cpu() for k, v in own.items()}
    nnz = {n: int((sd[n] != 0).sum()) for n in names}
    if meta["structure"] == "rank":
        with safe_open(os.fspath(path), framework="pt") as f:
            ranks = {n: int((f.get_tensor(f"{n}.level") >= level).sum()) for n in names}
        rules = [Rule((n,), LowRank(max(1, ranks[n]))) for n in names]
    elif meta["scope"] == "global" and meta["structure"] == "weight":
        rules = [Rule(tuple(names), Prune(count=max(1, sum(nnz.values()))), joint=len(names) > 1)]
    else:
        rules = [Rule((n,), Prune(count=max(1, nnz[n]))) for n in names]
    recipe = Recipe(tuple(rules))
    subject = tie_(state_module({k: v for k, v in sd.items() if k not in aliases}), aliases)
    result = compress(subject, recipe, method="dc", device="cpu")
    return save(out, result.model, result.thetas, result.groups, recipe=recipe)


@dataclass
class ExtractOutcome:
    path: Path
    bytes: int


def extract(multi: str, level: int, out: str, *, model_spec: str | None = None,
            data_spec: str | None = None) -> ExtractOutcome:
    """One level of a multi-level file as a compressed artifact; with --model and --data, BatchNorm
    statistics are recalibrated for it."""
    check_output_path(Path(out), [multi])
    if not Path(multi).exists():
        raise ConfigError(f"{multi}: no such file")
    model = call_factory(model_spec) if model_spec else None
    loader = load_data(data_spec)["train"] if data_spec else None
    return ExtractOutcome(Path(out), extract_artifact(multi, level, out, model=model, loader=loader))
