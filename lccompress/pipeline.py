"""Checkpoint → model + recipe → DC / LC → artifact → report: what the CLI commands run.

Everything here is usable from Python; the CLI only parses options and prints.
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
from typing import Any, Callable, Iterable, Mapping

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from torch import Tensor, nn

from . import report as rep
from .checkpoint import CheckpointError, build_model, call_factory, load_callable, read_checkpoint
from .errors import ConfigError, LCError
from .lc import LCConfig, Result, StepRecord, compress, resolve_device
from .recipe import Recipe
from .train import accuracy, cross_entropy, evaluate, split_batch

COMPRESSIBLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Embedding)


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
    """Weights of Linear, Conv and Embedding layers; from a bare state_dict, every ≥2-D `*.weight`."""
    kinds = {c.__name__ for c in COMPRESSIBLE}
    if has_code:  # TorchScript modules keep their Python class name in original_name
        found = [f"{n}.weight" if n else "weight" for n, m in module.named_modules()
                 if (isinstance(m, COMPRESSIBLE) or getattr(m, "original_name", None) in kinds)
                 and isinstance(getattr(m, "weight", None), Tensor)]
        if found:
            return found
    return [n for n, p in module.named_parameters() if n.endswith("weight") and p.dim() >= 2]


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


def _first(loader: Iterable, what: str) -> Any:
    try:
        return next(iter(loader))
    except StopIteration:
        raise ConfigError(f"the {what} data loader yields no batches") from None
    except Exception as e:  # noqa: BLE001 - user code
        raise ConfigError(f"the {what} data loader raised {type(e).__name__}: {e}") from None


def _inputs(batch: Any) -> Any:
    if isinstance(batch, Tensor):
        return batch
    if isinstance(batch, dict) and "x" in batch:
        return batch["x"]
    if isinstance(batch, (list, tuple)) and batch:
        return batch[0]
    raise ConfigError(f"a batch must be (inputs, targets) or inputs; got {type(batch).__name__}")


class Teacher:
    """Batches (x, reference(x)) from batches x or (x, y): distillation needs no labels."""

    def __init__(self, loader: Iterable, teacher: nn.Module, device: torch.device, argmax: bool = False) -> None:
        self.loader, self.teacher, self.device, self.argmax = loader, teacher, device, argmax

    def __iter__(self):
        for b in self.loader:
            x = _inputs(b).to(self.device)
            with torch.no_grad():
                t = self.teacher(x)
            yield x, (t.argmax(-1) if self.argmax else t)

    def __len__(self) -> int:
        return len(self.loader)  # type: ignore[arg-type]


def distill_loss(out: Tensor, teacher_logits: Tensor) -> Tensor:
    """KL(softmax(teacher) ‖ softmax(student)), batch mean."""
    return F.kl_div(F.log_softmax(out, -1), F.log_softmax(teacher_logits, -1), log_target=True, reduction="batchmean")


def onnx_eval(path: str | os.PathLike, loader: Iterable, metric: Callable) -> tuple[float, Tensor]:
    """Metric of an ONNX file over a loader, run in onnxruntime on the CPU."""
    import onnxruntime as ort

    sess = ort.InferenceSession(os.fspath(path), providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    outs, ys = [], []
    for b in loader:
        x, y = split_batch(b, torch.device("cpu"))
        outs.append(torch.from_numpy(sess.run(None, {name: x.detach().cpu().numpy()})[0]))
        ys.append(y)
    out, y = torch.cat(outs), torch.cat(ys)
    return float(metric(out, y)), out


# ----------------------------------------------------------------------------- progress
class Reporter:
    """Progress: rich bars for LC steps and for the epochs of the current step on a terminal, one
    plain line per step otherwise (CI, pipes)."""

    def __init__(self, console: Console, steps: int, label: str) -> None:
        self.console, self.steps = console, steps
        self.progress = None
        if console.is_terminal and not os.environ.get("CI"):
            self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                     TextColumn("{task.fields[info]}"), TimeElapsedColumn(), console=console)
            self.task = self.progress.add_task(label, total=steps, info="")
            self.epochs = self.progress.add_task("  epochs", total=1, info="")

    def __enter__(self) -> "Reporter":
        if self.progress:
            self.progress.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.progress:
            self.progress.stop()

    def epoch(self, done: int, total: int) -> None:
        if self.progress:
            self.progress.update(self.epochs, completed=done, total=total)

    def __call__(self, r: StepRecord) -> None:
        metric = "" if r.metric is None else f"  metric {r.metric:.4f}"
        info = f"μ {r.mu:.3g}  loss {r.loss:.4f}  gap {r.gap:.2e}{metric}"
        if self.progress:
            self.progress.update(self.task, completed=r.step + 1, info=info)
        else:
            self.console.print(f"step {r.step + 1}/{self.steps}  {info}", highlight=False)


# ----------------------------------------------------------------------------- compress
@dataclass
class CompressJob:
    checkpoint: str
    build_recipe: Callable[[list[str]], Recipe]
    out: str | None = None
    report_path: str | None = None
    model_spec: str | None = None
    data_spec: str | None = None
    loss: str = "ce"
    metric: str = "accuracy"
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    method: str | None = None
    steps: int = 40
    epochs: int = 5
    first_epochs: int = 10
    lr: float = 0.05
    mu0: float | None = None
    mu_growth: float | None = None
    penalty: str = "al"
    device: str = "auto"
    seed: int = 0
    input_shape: str | None = None
    state_dir: str | None = None
    resume: bool = False
    trust_checkpoint: bool = False
    fixed_recipe: bool = False
    argv: list[str] = field(default_factory=lambda: sys.argv[1:])


def _check_out(out: Path) -> None:
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


def run_job(job: CompressJob, console: Console) -> dict[str, Any]:
    """Run one compression command end to end; returns the report."""
    t_start = time.perf_counter()
    ckpt_path = Path(job.checkpoint)
    out = Path(job.out) if job.out else Path(ckpt_path.stem + ".compressed.safetensors")
    _check_out(out)
    if job.report_path:
        rp = Path(job.report_path)
        if rp.suffix not in (".json", ".md"):
            raise ConfigError(f"--report {rp}: must end in .json or .md")
        where = rp.parent if str(rp.parent) else Path(".")
        if not where.is_dir() or not os.access(where, os.W_OK):
            raise ConfigError(f"--report {rp}: directory {where} does not exist or is not writable")
    ck = read_checkpoint(ckpt_path, trust=job.trust_checkpoint)
    model = build_model(ck, job.model_spec)
    data = load_data(job.data_spec) if job.data_spec else {}
    method = job.method or ("lc" if data else "dc")
    if method != "dc" and not data:
        raise ConfigError(f"--method {method} trains, so it needs --data FILE.py:FUNC")
    if not data:
        console.print("no --data given: the method is DC (direct compression of the weights, no training)")
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
    recipe.groups(subject)  # resolve now: a bad glob fails before any training
    device = resolve_device(job.device)

    loss_fn: Callable = cross_entropy
    metric_fn: Callable = accuracy if job.metric == "accuracy" else load_callable(job.metric, "--metric")
    if data:
        reference = model.to(device).eval()
        if job.loss == "distill":
            first = _first(data["train"], "train")
            labelled = not isinstance(first, Tensor)
            data = {"train": Teacher(data["train"], reference, device),
                    **({"eval": data["eval"] if labelled else Teacher(data["eval"], reference, device, argmax=True)}
                       if "eval" in data else {})}
            loss_fn = distill_loss
        elif job.loss == "mse":
            loss_fn = F.mse_loss
        elif job.loss != "ce":
            loss_fn = load_callable(job.loss, "--loss")
        _check_batches(reference, data, device, loss_fn)

    cfg = LCConfig(steps=job.steps, epochs=job.epochs, first_epochs=job.first_epochs, lr=job.lr, mu0=job.mu0,
                   mu_growth=job.mu_growth, penalty=job.penalty)
    state_dir = Path(job.state_dir) if job.state_dir else out.with_name(out.name + ".lcstate")
    trains = method in ("lc", "idc")
    with Reporter(console, job.steps, f"{method.upper()} {recipe.rules[0].scheme.name}") as progress:
        result = compress(subject, recipe, data or None, method=method, config=cfg, loss=loss_fn,
                          metric=metric_fn, device=device, seed=job.seed, callback=progress,
                          on_epoch=progress.epoch,
                          state_dir=state_dir if trains else None, resume=job.resume)
    report = _write_outputs(job, ck, model, result, recipe, data, device, out, metric_fn, console)
    if trains and state_dir.exists():
        shutil.rmtree(state_dir, ignore_errors=True)
    report["timings"]["total"] = time.perf_counter() - t_start
    if job.report_path:
        rep.write(job.report_path, report)
    print_report(report, Console())  # the result goes to stdout, progress to `console`
    return report


def _check_batches(model: nn.Module, data: Mapping[str, Any], device: torch.device, loss_fn: Callable) -> None:
    """One batch of each loader through the model and the loss, so a bad loader fails in one clear line."""
    for split in data:
        b = _first(data[split], split)
        try:
            x, y = split_batch(b, device)
            with torch.no_grad():
                loss_fn(model(x), y) if split == "train" else model(x)
        except LCError:
            raise
        except Exception as e:  # noqa: BLE001 - shapes, dtypes, anything user data can get wrong
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ConfigError(f"--data: a {split} batch does not fit the model or the loss: {msg}") from None


def _write_outputs(job: CompressJob, ck, model, result: Result, recipe: Recipe, data, device, out: Path,
                   metric_fn: Callable, console: Console) -> dict[str, Any]:
    from .artifact import disk_bytes, export_onnx, save, size_report, verify_onnx

    onnx_metric, onnx_diff, onnx_out = None, None, None
    if out.suffix == ".onnx":
        if job.input_shape:
            example = torch.randn(parse_shape(job.input_shape), generator=torch.Generator().manual_seed(0))
        elif data:
            example = _inputs(_first(data.get("eval", data["train"]), "eval")).cpu()
        else:
            raise ConfigError("ONNX export needs an example input: give --input-shape (e.g. 1,64) or --data")
        export_onnx(result.model.cpu(), result.thetas, result.groups, example, out)
        onnx_diff = verify_onnx(out, result.model, example)["max_rel"]
        if "eval" in data:
            onnx_metric, onnx_out = onnx_eval(out, _cpu(data["eval"]), metric_fn)
    else:
        save(out, result, recipe=recipe)
    size = size_report(out)
    ref_bytes = sum(t.numel() * t.element_size() for t in ck.state_dict.values())
    art_bytes = disk_bytes(out)
    metric = {"name": "accuracy" if job.metric == "accuracy" else job.metric, "reference": None,
              "compressed": result.metric, "onnx": onnx_metric, "drop": None}
    classes: list[dict[str, Any]] = []
    if "eval" in data:
        ref_val, ref_out, y = evaluate(model.to(device).eval(), data["eval"], device, metric_fn)
        _, new_out, _ = evaluate(result.model.to(device).eval(), data["eval"], device, metric_fn)
        metric["reference"] = ref_val
        metric["drop"] = ref_val - (onnx_metric if onnx_metric is not None else result.metric)
        classes = rep.per_class(ref_out, onnx_out if onnx_out is not None else new_out, y)
    return {
        **rep.versions(), "command": "lccompress " + " ".join(job.argv), "method": result.method,
        "seed": job.seed, "device": str(device), "recipe": recipe.to_dict(), "config": _config(result),
        "artifact": str(out), "artifact_bytes": art_bytes, "reference_bytes": ref_bytes,
        "compression_ratio": ref_bytes / max(1, art_bytes), "metric": metric, "onnx_max_rel_diff": onnx_diff,
        "per_class": classes, "layers": rep.layers(result.groups, result.thetas, size),
        "timings": {k: round(v, 3) for k, v in result.timings.items()},
        "history": [vars(h) for h in result.history],
    }


def _cpu(loader: Iterable) -> Iterable:
    for b in loader:
        x, y = split_batch(b, torch.device("cpu"))
        yield x, y


def _config(result: Result) -> dict[str, Any] | None:
    return dict(vars(result.config)) if result.config is not None else None


def print_report(r: Mapping[str, Any], console: Console) -> None:
    t = Table(title=f"{r['artifact']}: {r['artifact_bytes']:,} bytes on disk, "
                    f"{r['compression_ratio']:.1f}× smaller than {r['reference_bytes']:,} dense bytes")
    for col in ("layer", "scheme", "params", "kept / k / rank", "bits", "bytes"):
        t.add_column(col, justify="left" if col in ("layer", "scheme", "kept / k / rank") else "right")
    for row in r["layers"]:
        t.add_row(row["name"], row["scheme"]["scheme"], f"{row['numel']:,}", rep.summary_text(row["summary"]),
                  f"{row['bits']:,}", f"{row['bytes']:,}")
    console.print(t)
    m = r["metric"]
    if m.get("reference") is not None:
        onnx = f", ONNX (onnxruntime) {100 * m['onnx']:.2f} %" if m.get("onnx") is not None else ""
        console.print(f"{m['name']}: reference {100 * m['reference']:.2f} %, compressed "
                      f"{100 * m['compressed']:.2f} %{onnx}; drop {100 * m['drop']:.2f} points", highlight=False)
    tm = r["timings"]
    console.print(f"method {r['method']}; time {tm.get('total', 0):.1f} s (L steps {tm.get('lstep', 0):.1f} s, "
                  f"C steps {tm.get('cstep', 0):.2f} s)", highlight=False)


# ----------------------------------------------------------------------------- export / inspect / check
def export_artifact(artifact: str, onnx_out: str, model_spec: str, input_shape: str | None,
                    data_spec: str | None, sparse: str, console: Console) -> dict[str, float]:
    from .artifact import disk_bytes, export_onnx, load, load_into_, verify_onnx

    out = Path(onnx_out)
    if out.suffix != ".onnx":
        raise ConfigError(f"--onnx {out}: must end in .onnx")
    _check_out(out)
    art = load(artifact)
    model = load_into_(call_factory(model_spec), artifact)
    if input_shape:
        example = torch.randn(parse_shape(input_shape), generator=torch.Generator().manual_seed(0))
    elif data_spec:
        d = load_data(data_spec)
        example = _inputs(_first(d.get("eval", d["train"]), "eval"))
    else:
        raise ConfigError("export needs an example input: --input-shape (e.g. 1,64) or --data")
    export_onnx(model, art.thetas, art.groups, example, out, sparse=sparse)
    diff = verify_onnx(out, model, example)
    console.print(f"wrote {out}: {disk_bytes(out):,} bytes; onnxruntime vs torch: max abs diff "
                  f"{diff['max_abs']:.3g}, max rel diff {diff['max_rel']:.3g}", highlight=False)
    return diff


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


def inspect_rows(path: str, trust: bool) -> tuple[list[dict[str, Any]], int]:
    """Rows of `inspect`: per compressed group and per dense tensor."""
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
            for k, t in art.state_dict.items():
                if k not in compressed:
                    rows.append(_dense_row(k, t))
        return rows, disk_bytes(path)
    ck = read_checkpoint(path, trust=trust)
    return [_dense_row(k, t) for k, t in ck.state_dict.items()], os.stat(path).st_size


def _dense_row(name: str, t: Tensor) -> dict[str, Any]:
    bits = t.numel() * t.element_size() * 8
    return {"name": name, "shape": "×".join(map(str, t.shape)) or "scalar", "numel": t.numel(), "scheme": "dense",
            "detail": str(t.dtype).replace("torch.", ""), "bits": bits, "bytes": bits // 8}


def check_budgets(artifact: str, max_bytes: int | None, max_drop: float | None, reference: str | None,
                  model_spec: str | None, data_spec: str | None, metric: str, trust: bool) -> dict[str, Any]:
    """Each budget's value, limit and verdict; `ok` when all hold."""
    from .artifact import disk_bytes, load_into_

    if not Path(artifact).exists():
        raise CheckpointError(f"{artifact}: no such file")
    checks = []
    if max_bytes is not None:
        size = disk_bytes(artifact)
        checks.append({"budget": "bytes", "value": size, "limit": max_bytes, "ok": size <= max_bytes,
                       "over": max(0, size - max_bytes)})
    if max_drop is not None:
        if not (reference and model_spec and data_spec):
            raise ConfigError("--max-drop needs --reference CKPT, --model and --data")
        metric_fn = accuracy if metric == "accuracy" else load_callable(metric, "--metric")
        data = load_data(data_spec)
        loader = data.get("eval", data["train"])
        ref = build_model(read_checkpoint(reference, trust=trust), model_spec)
        cpu = torch.device("cpu")
        ref_val = evaluate(ref.eval(), loader, cpu, metric_fn)[0]
        if artifact.endswith(".onnx"):
            new_val = onnx_eval(artifact, _cpu(loader), metric_fn)[0]
        else:
            new_val = evaluate(load_into_(call_factory(model_spec), artifact).eval(), loader, cpu, metric_fn)[0]
        drop = ref_val - new_val
        checks.append({"budget": "drop", "value": round(drop, 6), "limit": max_drop, "ok": drop <= max_drop,
                       "over": round(max(0.0, drop - max_drop), 6), "reference": ref_val, "compressed": new_val})
    return {"artifact": artifact, "ok": all(c["ok"] for c in checks), "checks": checks}
