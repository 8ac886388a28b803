"""The `lccompress` command line: a thin Click layer over the Python API, rendered with rich."""

from __future__ import annotations

import functools
import json
import re
import sys
from pathlib import Path
from typing import Any, Callable

import click
from rich.console import Console
from rich.table import Table

from .errors import ConfigError, LCError

err_console = Console(stderr=True)


# ----------------------------------------------------------------------------- helpers
class UsageError(click.ClickException):
    """A domain error shown as one line, exit status 2 (the usage-error status)."""

    exit_code = 2


def guarded(fn: Callable) -> Callable:
    """Library errors become one line on stderr and a non-zero exit, never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except click.ClickException:
            raise
        except LCError as e:
            raise click.ClickException(str(e)) from None
        except FileNotFoundError as e:
            raise click.ClickException(f"{e.filename}: no such file") from None
        except PermissionError as e:
            raise click.ClickException(f"{e.filename}: permission denied") from None
        except KeyboardInterrupt:
            raise click.ClickException("interrupted") from None

    return wrapper


def parse_size(text: str) -> int:
    """'123456', '200k', '1.5MB', '2MiB' → bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]?)(i?)b?\s*", text.lower())
    if not m:
        raise click.BadParameter(f"{text!r} is not a size (examples: 50000, 200KB, 1.5MiB)")
    base = 1024 if m.group(3) else 1000
    return int(float(m.group(1)) * base ** " kmgt".index(m.group(2) or " "))


def fraction(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise click.BadParameter(f"{text!r} is not a number") from None
    if not 0 < v <= 1:
        raise click.BadParameter(f"{text} must be a fraction in (0, 1]")
    return v


# ----------------------------------------------------------------------------- shared options
def compression_options(fn: Callable) -> Callable:
    opts = [
        click.option("-o", "--out", type=click.Path(dir_okay=False), help="Output: .safetensors (default) or .onnx."),
        click.option("--report", "report_path", type=click.Path(dir_okay=False), help="Also write the report (.json or .md)."),
        click.option("--model", "model_spec", help="Model factory FILE.py:FUNC or module:FUNC (needed to train or export)."),
        click.option("--data", "data_spec", help='Data FILE.py:FUNC returning {"train": DataLoader, "eval": DataLoader}.'),
        click.option("--loss", default="ce", show_default=True, help="ce | mse | distill | FILE.py:FUNC."),
        click.option("--metric", default="accuracy", show_default=True, help="accuracy | FILE.py:FUNC."),
        click.option("--include", multiple=True, help="Glob of parameters to compress (repeatable)."),
        click.option("--exclude", multiple=True, help="Glob of parameters to leave dense (repeatable)."),
        click.option("--method", type=click.Choice(["dc", "idc", "lc", "finetune", "sfw", "fw-grow"]),
                     help="Default: lc with --data, dc without. sfw: Frank-Wolfe refinement, then one-shot."),
        click.option("--steps", type=click.IntRange(min=1), default=40, show_default=True, help="LC / iDC steps."),
        click.option("--epochs", type=click.IntRange(min=0), default=5, show_default=True, help="Epochs per L step."),
        click.option("--first-epochs", type=click.IntRange(min=0), default=10, show_default=True, help="Epochs of the first L step."),
        click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=0.05, show_default=True, help="SGD learning rate."),
        click.option("--mu0", type=click.FloatRange(min=0, min_open=True), help="First μ (default: per scheme family)."),
        click.option("--mu-growth", type=click.FloatRange(min=0, min_open=True), help="μ growth per step (default: per family)."),
        click.option("--penalty", type=click.Choice(["al", "qp"]), default="al", show_default=True,
                     help="Augmented Lagrangian or quadratic penalty."),
        click.option("--device", default="auto", show_default=True, help="auto | cpu | cuda | cuda:N."),
        click.option("--seed", type=int, default=0, show_default=True, help="Seed: same seed, same bytes."),
        click.option("--input-shape", help="Example input shape for ONNX export, e.g. 1,64 (default: first batch)."),
        click.option("--state-dir", type=click.Path(file_okay=False), help="Where LC state is saved (default OUT.lcstate/)."),
        click.option("--resume", is_flag=True, help="Continue an interrupted run from its state directory."),
        click.option("--trust-checkpoint", is_flag=True, help="Allow unpickling a whole pickled module (runs its code)."),
    ]
    for o in reversed(opts):
        fn = o(fn)
    return fn


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="lccompress")
def main() -> None:
    """Compress trained PyTorch models: direct compression, then the LC algorithm."""


def _run(ckpt: str, build: Callable[[list[str]], Any], opts: dict[str, Any], **extra: Any) -> None:
    from .pipeline import CompressJob, run_job

    job = CompressJob(checkpoint=ckpt, build_recipe=build, **opts, **extra)
    run_job(job, err_console)


# ----------------------------------------------------------------------------- commands
@main.command()
@click.argument("ckpt", type=click.Path())
@click.option("--keep", required=True, type=fraction, help="Fraction of the weights to keep, in (0, 1].")
@click.option("--per-layer", is_flag=True, help="Keep that fraction of each layer (default: one global top-k).")
@compression_options
@guarded
def prune(ckpt: str, keep: float, per_layer: bool, **opts: Any) -> None:
    """Prune to a fraction of the weights (ℓ0 constraint, global top-k by default).

    Example: lccompress prune ckpt.pt --keep 0.1 --model net.py:make --data data.py:loaders -o small.safetensors
    """
    from . import Prune, Recipe

    _run(ckpt, lambda names: Recipe.single(names, Prune(keep=keep), joint=not per_layer), opts)


@main.command()
@click.argument("ckpt", type=click.Path())
@click.option("--codebook", "k", type=click.IntRange(min=1, max=65536), help="Entries of the adaptive codebook per layer.")
@click.option("--bits", type=click.IntRange(min=1, max=16), help="Bits per weight (a codebook of 2^bits entries).")
@click.option("--shared", is_flag=True, help="One codebook shared by all layers.")
@compression_options
@guarded
def quantize(ckpt: str, k: int | None, bits: int | None, shared: bool, **opts: Any) -> None:
    """Quantize each layer to an adaptive codebook (k-means).

    Example: lccompress quantize ckpt.pt --codebook 2 --model net.py:make --data data.py:loaders
    """
    from . import Codebook, Recipe

    if (k is None) == (bits is None):
        raise UsageError("give one of --codebook K or --bits B")
    k = k if k is not None else 2 ** bits
    _run(ckpt, lambda names: Recipe.single(names, Codebook(k=k), joint=shared), opts)


@main.command()
@click.argument("ckpt", type=click.Path())
@click.option("--rank", type=click.IntRange(min=1), help="Target rank of each layer.")
@click.option("--select", "alpha", type=click.FloatRange(min=0, min_open=True),
              help="Rank selection: α of α·storage(r) + μ/2·Σ_{i>r} σᵢ².")
@compression_options
@guarded
def lowrank(ckpt: str, rank: int | None, alpha: float | None, **opts: Any) -> None:
    """Make layers low rank (truncated SVD), at a given rank or selected per layer.

    Example: lccompress lowrank ckpt.pt --rank 8 --exclude fc3.weight --model net.py:make --data data.py:loaders
    """
    from . import LowRank, RankSelection, Recipe

    if (rank is None) == (alpha is None):
        raise UsageError("give one of --rank R or --select ALPHA")
    scheme = LowRank(rank) if rank is not None else RankSelection(alpha=alpha)
    _run(ckpt, lambda names: Recipe.single(names, scheme), opts)


@main.command("compress")
@click.argument("ckpt", type=click.Path())
@click.option("--recipe", "recipe_path", required=True, type=click.Path(), help="A recipe in TOML.")
@compression_options
@guarded
def compress_cmd(ckpt: str, recipe_path: str, **opts: Any) -> None:
    """Compress with a recipe: mixed schemes per layer, additive combinations (TOML).

    Example: lccompress compress ckpt.pt --recipe recipe.toml --model net.py:make --data data.py:loaders
    """
    from .recipe import Recipe

    recipe = Recipe.from_toml(recipe_path)
    _run(ckpt, lambda names: recipe, opts, fixed_recipe=True)


@main.command()
@click.argument("artifact", type=click.Path())
@click.option("--onnx", "onnx_out", required=True, type=click.Path(dir_okay=False), help="ONNX file to write.")
@click.option("--model", "model_spec", required=True, help="Model factory FILE.py:FUNC or module:FUNC.")
@click.option("--input-shape", help="Example input shape, e.g. 1,64.")
@click.option("--data", "data_spec", help="Data function; the first batch is the example input.")
@click.option("--sparse", type=click.Choice(["packed", "dense"]), default="packed", show_default=True,
              help="Pruned weights as positions + values, or dense with zeros.")
@guarded
def export(artifact: str, onnx_out: str, model_spec: str, input_shape: str | None, data_spec: str | None,
           sparse: str) -> None:
    """Export a compressed artifact to ONNX and check it in onnxruntime.

    Example: lccompress export small.safetensors --onnx small.onnx --model net.py:make --input-shape 1,64
    """
    from .pipeline import export_artifact

    export_artifact(artifact, onnx_out, model_spec, input_shape, data_spec, sparse, err_console)


@main.command()
@click.argument("path", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.option("--trust-checkpoint", is_flag=True, help="Allow unpickling a whole pickled module.")
@guarded
def inspect(path: str, as_json: bool, trust_checkpoint: bool) -> None:
    """Per-layer table of a checkpoint or an artifact: shape, params, scheme, bits, bytes.

    Example: lccompress inspect small.safetensors
    """
    from .pipeline import inspect_rows

    rows, total = inspect_rows(path, trust_checkpoint)
    if as_json:
        click.echo(json.dumps({"path": path, "file_bytes": total, "layers": rows}))
        return
    table = Table(title=f"{path}: {total:,} bytes on disk")
    for col in ("name", "shape", "params", "scheme", "kept / k / rank", "bits", "bytes"):
        table.add_column(col, justify="left" if col in ("name", "scheme", "kept / k / rank") else "right")
    for r in rows:
        table.add_row(r["name"], r["shape"], f"{r['numel']:,}", r["scheme"], r["detail"], f"{r['bits']:,}",
                      f"{r['bytes']:,}")
    Console().print(table)


@main.command()
@click.argument("artifact", type=click.Path())
@click.option("--max-bytes", help="Budget for the artifact's bytes on disk (e.g. 50000, 200KB, 1.5MiB).")
@click.option("--max-drop", type=float, help="Budget for the metric drop vs the reference, e.g. 0.01.")
@click.option("--reference", "reference", type=click.Path(), help="Reference checkpoint (for --max-drop).")
@click.option("--model", "model_spec", help="Model factory (for --max-drop).")
@click.option("--data", "data_spec", help="Data function (for --max-drop; its eval loader is used).")
@click.option("--metric", default="accuracy", show_default=True, help="accuracy | FILE.py:FUNC.")
@click.option("--json", "as_json", is_flag=True, help="Print one machine-readable JSON line.")
@click.option("--trust-checkpoint", is_flag=True, help="Allow unpickling a whole pickled reference module.")
def check(artifact: str, max_bytes: str | None, max_drop: float | None, reference: str | None,
          model_spec: str | None, data_spec: str | None, metric: str, as_json: bool, trust_checkpoint: bool) -> None:
    """Gate for CI: exit 0 within every budget, 1 over one, 2 on usage errors.

    Example: lccompress check small.safetensors --max-bytes 200KB
    """
    from .pipeline import check_budgets

    try:
        if max_bytes is None and max_drop is None:
            raise UsageError("give at least one budget: --max-bytes or --max-drop")
        budget = parse_size(max_bytes) if max_bytes is not None else None
        res = check_budgets(artifact, budget, max_drop, reference, model_spec, data_spec, metric, trust_checkpoint)
    except click.BadParameter as e:
        raise UsageError(f"--max-bytes: {e.message}") from None
    except LCError as e:
        raise UsageError(str(e)) from None
    except FileNotFoundError as e:
        raise UsageError(f"{e.filename}: no such file") from None
    if as_json:
        click.echo(json.dumps(res))
    else:
        for c in res["checks"]:
            mark = "ok  " if c["ok"] else "OVER"
            click.echo(f"{mark} {c['budget']}: {c['value']} (limit {c['limit']}" +
                       ("" if c["ok"] else f", over by {c['over']}") + ")")
    sys.exit(0 if res["ok"] else 1)


def _levels(text: str, kind: str) -> list:
    try:
        vals = [float(x) if kind == "keep" else int(x) for x in text.split(",")]
    except ValueError:
        raise UsageError(f"--{kind} {text!r}: give comma-separated {'fractions' if kind == 'keep' else 'integers'}") from None
    if kind == "keep":
        for v in vals:
            fraction(str(v))
    return vals


@main.command()
@click.argument("ckpt", type=click.Path())
@click.option("--keep", help="Fractions to keep, e.g. 0.5,0.2,0.1,0.05,0.02 (one global top-k each).")
@click.option("--bits", help="Codebook bits per weight, e.g. 1,2,4.")
@click.option("--rank", help="Ranks, e.g. 4,8,16.")
@click.option("--method", "methods", default="dc,lc,sfw", show_default=True, help="Methods, comma-separated.")
@click.option("-o", "--out", "out_dir", type=click.Path(file_okay=False), default="sweep", show_default=True,
              help="Directory for the artifacts, curve.json and curve.svg.")
@click.option("--model", "model_spec", help="Model factory FILE.py:FUNC or module:FUNC.")
@click.option("--data", "data_spec", required=True, help='Data FILE.py:FUNC returning {"train": ..., "eval": ...}.')
@click.option("--steps", type=click.IntRange(min=1), default=40, show_default=True, help="LC steps.")
@click.option("--epochs", type=click.IntRange(min=0), default=5, show_default=True, help="Epochs per L step.")
@click.option("--device", default="auto", show_default=True, help="auto | cpu | cuda.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--trust-checkpoint", is_flag=True, help="Allow unpickling a whole pickled module.")
@guarded
def sweep(ckpt: str, keep: str | None, bits: str | None, rank: str | None, methods: str, out_dir: str,
          model_spec: str | None, data_spec: str, steps: int, epochs: int, device: str, seed: int,
          trust_checkpoint: bool) -> None:
    """Trade-off curve: each level by each method; writes artifacts, curve.json and curve.svg.

    Example: lccompress sweep ckpt.pt --keep 0.5,0.2,0.1,0.05,0.02 --method dc,lc,sfw --model net.py:make --data data.py:loaders -o curve/
    """
    from .checkpoint import build_model, read_checkpoint
    from .lc import LCConfig
    from .pipeline import load_data
    from .sweep import sweep as run_sweep

    given = [(k, v) for k, v in (("keep", keep), ("bits", bits), ("rank", rank)) if v]
    if len(given) != 1:
        raise UsageError("give exactly one of --keep, --bits or --rank")
    kind, text = given[0]
    model = build_model(read_checkpoint(ckpt, trust=trust_checkpoint), model_spec)
    if model is None:
        raise ConfigError(f"{ckpt} holds weights only; the sweep trains: give --model FILE.py:FUNC")
    res = run_sweep(model, load_data(data_spec), kind, _levels(text, kind), methods.split(","), out_dir,
                    config=LCConfig(steps=steps, epochs=epochs), device=device, seed=seed,
                    callback=lambda m, lv, p: err_console.print(
                        f"{m} {kind} {lv}: error {p['error']:.2f} %, {p['bytes']:,} bytes", highlight=False))
    click.echo(f"wrote {Path(out_dir) / 'curve.json'} and {Path(out_dir) / 'curve.svg'}")
    return res


@main.command()
@click.argument("ckpt", type=click.Path())
@click.option("--keep", required=True, help="Nested fractions to keep, decreasing, e.g. 0.5,0.2,0.1,0.05.")
@click.option("--per-layer", is_flag=True, help="Rank weights per layer (default: over all layers).")
@click.option("--structure", type=click.Choice(["weight", "filter"]), default="weight", show_default=True,
              help="Units that survive or not: single weights, or whole filters / rows.")
@click.option("--method", type=click.Choice(["none", "sfw"]), default="none", show_default=True,
              help="sfw: Frank-Wolfe refinement first, so every level stays accurate without retraining.")
@click.option("--include", multiple=True, help="Glob of parameters to compress (repeatable).")
@click.option("--exclude", multiple=True, help="Glob of parameters to leave dense (repeatable).")
@click.option("-o", "--out", required=True, type=click.Path(dir_okay=False), help="The multi-level .safetensors file.")
@click.option("--model", "model_spec", help="Model factory (needed for --method sfw).")
@click.option("--data", "data_spec", help="Data function (needed for --method sfw).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--trust-checkpoint", is_flag=True, help="Allow unpickling a whole pickled module.")
@guarded
def multilevel(ckpt: str, keep: str, per_layer: bool, structure: str, method: str, include: tuple[str, ...],
               exclude: tuple[str, ...], out: str, model_spec: str | None, data_spec: str | None, seed: int,
               trust_checkpoint: bool) -> None:
    """One file, many nested sparsity levels: the weights once plus a level id per weight.

    Example: lccompress multilevel ckpt.pt --keep 0.5,0.2,0.1,0.05 --method sfw --model net.py:make --data data.py:loaders -o multi.safetensors
    """
    from .checkpoint import build_model, read_checkpoint
    from .multilevel import build_levels, levels_summary, save_multilevel
    from .pipeline import _check_out, load_data, select, state_module

    _check_out(Path(out))
    ck = read_checkpoint(ckpt, trust=trust_checkpoint)
    model = build_model(ck, model_spec)
    subject = model if model is not None else state_module(ck.state_dict)
    names = select(subject, model is not None, include, exclude)
    keeps = _levels(keep, "keep")
    if method == "sfw":
        if model is None or not data_spec:
            raise ConfigError("--method sfw trains: give --model and --data")
        from .fw import SFW_DEFAULTS, KSparsePolytope, sfw_refine

        subject = sfw_refine(model, load_data(data_spec), {tuple(names): KSparsePolytope(k=min(keeps))},
                             seed=seed, device="cpu", **SFW_DEFAULTS)
    levels = build_levels(subject, names, keeps, scope="layer" if per_layer else "global", structure=structure)
    size = save_multilevel(out, subject, levels)
    click.echo(f"wrote {out}: {size:,} bytes, levels " +
               ", ".join(f"{r['level']} (keep {r['keep']})" for r in levels_summary(out)))


@main.command()
@click.argument("multi", type=click.Path())
@click.option("--level", required=True, type=click.IntRange(min=0), help="Level to extract (0 = dense).")
@click.option("-o", "--out", required=True, type=click.Path(dir_okay=False), help="Single-level .safetensors artifact.")
@click.option("--model", "model_spec", help="With --data: recalibrate BatchNorm statistics for this level.")
@click.option("--data", "data_spec", help="Data function whose train loader recalibrates BatchNorm.")
@guarded
def extract(multi: str, level: int, out: str, model_spec: str | None, data_spec: str | None) -> None:
    """Extract one level of a multi-level file as a compressed artifact, no retraining.

    Example: lccompress extract multi.safetensors --level 3 -o level3.safetensors
    """
    from .multilevel import extract_artifact
    from .checkpoint import call_factory
    from .pipeline import _check_out, load_data

    _check_out(Path(out))
    if not Path(multi).exists():
        raise ConfigError(f"{multi}: no such file")
    model = call_factory(model_spec) if model_spec else None
    loader = load_data(data_spec)["train"] if data_spec else None
    size = extract_artifact(multi, level, out, model=model, loader=loader)
    click.echo(f"wrote {out}: {size:,} bytes")


@main.command()
@click.option("--out-dir", type=click.Path(file_okay=False), default="lccompress-demo", show_default=True,
              help="Where the checkpoint, the artifact and the report go.")
@click.option("--steps", type=click.IntRange(min=1), default=40, show_default=True, help="LC steps.")
@guarded
def demo(out_dir: str, steps: int) -> None:
    """Train the digits MLP, save it, then run `lccompress prune` on it: DC then LC, ONNX export, report.

    Example: lccompress demo --steps 40
    """
    import torch

    from . import digits

    torch.set_num_threads(1)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ckpt = out / "digits_mlp.pt"
    with err_console.status("training the reference 64-300-100-10 MLP on scikit-learn's digits"):
        torch.save(digits.train_reference(0).state_dict(), ckpt)
    args = ["prune", str(ckpt), "--keep", "0.05", "--model", "lccompress.digits:MLP", "--data",
            "lccompress.digits:loaders", "--steps", str(steps), "-o", str(out / "digits_mlp.onnx"),
            "--report", str(out / "report.md")]
    err_console.print("[bold]$ lccompress " + " ".join(args))
    main.main(args, standalone_mode=False)


if __name__ == "__main__":
    main()
