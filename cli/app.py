"""The `lccompress` commands: Click options, each command a few lines over `lccompress.api`."""

from __future__ import annotations

import functools
import json
import re
import sys
from pathlib import Path
from typing import Any, Callable

import click
from rich.console import Console

from lccompress import api
from lccompress.errors import LCError
from lccompress.methods import METHODS

from .render import Reporter, print_inspection, print_report

err_console = Console(stderr=True)


# ----------------------------------------------------------------------------- errors → exit statuses
class Failure(click.ClickException):
    """One line on stderr and an exit status; never a traceback."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.exit_code = status


def guarded(status: int = 1) -> Callable[[Callable], Callable]:
    """The one place library errors become exit statuses. A command fails with `status` on a
    domain error (an `LCError`, a missing or unreadable file, an interrupt): 1 for the commands
    that do work, 2 for `check`, whose 1 means "over budget" so that CI can tell the two apart.
    Click's own usage errors (bad options) exit 2."""

    def wrap(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            try:
                return fn(*args, **kwargs)
            except click.ClickException:
                raise
            except LCError as e:
                message = str(e)
            except FileNotFoundError as e:
                message = f"{e.filename}: no such file"
            except PermissionError as e:
                message = f"{e.filename}: permission denied"
            except OSError as e:  # disk full, a directory where a file was expected, …
                message = f"{e.filename + ': ' if e.filename else ''}{e.strerror or e}"
            except KeyboardInterrupt:
                message = "interrupted" + (resume_hint if "resume" in kwargs else "")
            raise Failure(message, status) from None

        return wrapper

    return wrap


resume_hint = ("; LC state up to the last completed step is kept: rerun the same command with --resume "
               "to continue")


class UsageError(click.ClickException):
    """A usage error found after parsing (exit status 2)."""

    exit_code = 2


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
        click.option("--loss", default="auto", show_default=True,
                     help="auto | ce | mse | model | distill | distill-kl | distill-mse | distill-cosine | FILE.py:FUNC. "
                          "auto: the model's own loss for dict batches with labels (Hugging Face), else ce; "
                          "distill: KL on class logits, MSE on other outputs (embeddings)."),
        click.option("--metric", default="auto", show_default=True,
                     help="auto | accuracy | perplexity | loss | cosine | mse | FILE.py:FUNC. auto follows the loss."),
        click.option("--output", "output", metavar="NAME",
                     help="The model output to train and evaluate on (a key or attribute such as logits, or an index)."),
        click.option("--include", multiple=True, help="Glob of parameters to compress (repeatable)."),
        click.option("--exclude", multiple=True, help="Glob of parameters to leave dense (repeatable)."),
        click.option("--method", type=click.Choice(list(METHODS)),
                     help="Default: lc with --data, dc without. acdc: alternating compressed / dense phases. "
                          "cram: compression-aware training, then one-shot. sfw: Frank-Wolfe refinement, then "
                          "one-shot. fw-grow: sparse weights grown from zero by Frank-Wolfe."),
        click.option("--steps", type=click.IntRange(min=1), default=40, show_default=True, help="LC / iDC steps."),
        click.option("--epochs", type=click.FloatRange(min=0),
                     help="Epochs per L step, fractions allowed [default: 5, the run capped at 5,000 optimizer steps]."),
        click.option("--first-epochs", type=click.FloatRange(min=0), help="Epochs of the first L step [default: 2 × --epochs]."),
        click.option("--budget", type=click.IntRange(min=1),
                     help="Optimizer steps for the whole run, split over the L steps (the first takes two shares)."),
        click.option("--optimizer", type=click.Choice(["sgd", "adamw"]), default="adamw", show_default=True,
                     help="L-step optimizer; with adamw LC's pull is an exact proximal step."),
        click.option("--lr", type=click.FloatRange(min=0, min_open=True), help="Learning rate [default: 0.05 sgd, 1e-3 adamw]."),
        click.option("--amp", type=click.Choice(["off", "bf16", "fp16"]), default="off", show_default=True,
                     help="Mixed precision in the L steps (autocast; fp16 with a gradient scaler, CUDA only)."),
        click.option("--mu0", type=click.FloatRange(min=0, min_open=True), help="First μ (default: per scheme family)."),
        click.option("--mu-growth", type=click.FloatRange(min=0, min_open=True), help="μ growth per step (default: per family)."),
        click.option("--penalty", type=click.Choice(["al", "qp"]), default="al", show_default=True,
                     help="Augmented Lagrangian or quadratic penalty."),
        click.option("--tail", type=click.FloatRange(min=0, max=1, max_open=True),
                     help="Share of LC's budget that fine-tunes θ from the LC point at the end "
                          "[default: 0.2, 0.5 for low rank; 0: none]."),
        click.option("--cycles", type=click.IntRange(min=1), default=4, show_default=True,
                     help="acdc: compressed / decompressed phase pairs before the final compressed phase."),
        click.option("--rho", type=click.FloatRange(min=0),
                     help="cram: the ascent step before each step's C step [default: 0.05]."),
        click.option("--device", default="auto", show_default=True, help="auto | cpu | cuda | cuda:N."),
        click.option("--seed", type=int, default=0, show_default=True, help="Seed: same seed, same bytes."),
        click.option("--input-shape", help="Example input shape for ONNX export, e.g. 1,64 (default: first batch)."),
        click.option("--input", "inputs", multiple=True, metavar="NAME:SHAPE[:DTYPE]",
                     help="An ONNX example input (repeatable), e.g. input_ids:batch=1,seq=16:int64."),
        click.option("--example", metavar="FILE.py:FUNC",
                     help="Function returning the ONNX example arguments: a tensor, a tuple, a dict or (args, kwargs)."),
        click.option("--dtype", type=click.Choice(["float32", "float16", "bfloat16"]),
                     help="Dtype of the artifact's weights (default: the checkpoint's)."),
        click.option("--state-dir", type=click.Path(file_okay=False), help="Where LC state is saved (default OUT.lcstate/)."),
        click.option("--resume", is_flag=True, help="Continue an interrupted run from its state directory."),
        click.option("--trust-checkpoint", is_flag=True, help="Allow unpickling a whole pickled module (runs its code)."),
        click.option("--device-report/--no-device-report", default=True, show_default=True,
                     help="For an ONNX artifact: onnxruntime's session memory and latency (batch 1 and 32, one "
                          "thread) against the dense model exported the same way."),
    ]
    for o in reversed(opts):
        fn = o(fn)
    return fn


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="lccompress")
def main() -> None:
    """Compress trained PyTorch models: direct compression, then the LC algorithm.

    \b
    Example: lccompress prune ckpt.pt --keep 0.1 --model net.py:make --data data.py:loaders -o small.safetensors
    Try it:  lccompress demo
    """


def _run(ckpt: str, build: Callable[[list[str]], Any], opts: dict[str, Any], **extra: Any) -> None:
    from lccompress import distributed

    job = api.CompressJob(checkpoint=ckpt, build_recipe=build, **opts, **extra)
    main_process = distributed.is_main()  # under torchrun only process 0 speaks
    outcome = api.compress_checkpoint(job, Reporter(err_console).callbacks() if main_process else api.Callbacks())
    if main_process:
        print_report(outcome.report, Console())  # the result goes to stdout, progress to stderr


# ----------------------------------------------------------------------------- commands
@main.command()
@click.argument("ckpt", type=click.Path())
@click.option("--keep", required=True, type=fraction, help="Fraction of the weights to keep, in (0, 1].")
@click.option("--per-layer", is_flag=True, help="Keep that fraction of each layer (default: one global top-k).")
@click.option("--structured", is_flag=True,
              help="Keep that fraction of whole channels (filters, output rows) of each group of coupled layers; "
                   "exported layers shrink.")
@click.option("--global", "across", is_flag=True,
              help="With --structured: keep that fraction of all channels, the largest over all layers.")
@compression_options
@guarded()
def prune(ckpt: str, keep: float, per_layer: bool, structured: bool, across: bool, **opts: Any) -> None:
    """Prune to a fraction of the weights (ℓ0 constraint, global top-k by default), or of whole
    channels (--structured: the exact group-ℓ0 projection, the layers shrink on export).

    \b
    Example: lccompress prune ckpt.pt --keep 0.1 --model net.py:make --data data.py:loaders -o small.safetensors
             lccompress prune ckpt.pt --keep 0.5 --structured --model net.py:make --data data.py:loaders -o small.onnx
    """
    from lccompress import Prune, Recipe, StructuredPrune

    if structured:
        if per_layer:
            raise UsageError("--structured keeps the fraction per group of coupled layers (or --global); drop --per-layer")
        scheme = StructuredPrune(keep=keep)
        _run(ckpt, lambda names: Recipe.single(names, scheme), opts, structured="global" if across else "groups")
        return
    if across:
        raise UsageError("--global applies to --structured (plain pruning is global by default)")
    _run(ckpt, lambda names: Recipe.single(names, Prune(keep=keep), joint=not per_layer), opts)


@main.command()
@click.argument("ckpt", type=click.Path())
@click.option("--codebook", "k", type=click.IntRange(min=1, max=65536), help="Entries of the adaptive codebook per layer.")
@click.option("--bits", type=click.IntRange(min=1, max=16),
              help="Bits per weight: a codebook of 2^bits entries, or with --uniform the grid's bits (2–8).")
@click.option("--shared", is_flag=True, help="One codebook shared by all layers.")
@click.option("--uniform", is_flag=True, help="A uniform integer grid per channel or block (what runtimes execute: int4/int8).")
@click.option("--group-size", type=click.Choice(["0", "16", "32", "64", "128", "256"]), default="0", show_default=True,
              help="With --uniform: weights per scale along the input dimension (0: one scale per output channel).")
@click.option("--symmetric", is_flag=True, help="With --uniform: no zero points (the grid centred on 0).")
@compression_options
@guarded()
def quantize(ckpt: str, k: int | None, bits: int | None, shared: bool, uniform: bool, group_size: str,
             symmetric: bool, **opts: Any) -> None:
    """Quantize each layer to an adaptive codebook (k-means) or a uniform integer grid.

    \b
    Example: lccompress quantize ckpt.pt --codebook 2 --model net.py:make --data data.py:loaders
             lccompress quantize ckpt.pt --uniform --bits 4 --group-size 32 -o small.onnx --model net.py:make --data data.py:loaders
    """
    from lccompress import Codebook, Recipe, Uniform

    if uniform:
        if k is not None or shared:
            raise UsageError("--uniform takes --bits (2–8), not --codebook or --shared")
        if bits is None or not 2 <= bits <= 8:
            raise UsageError("--uniform needs --bits from 2 to 8")
        scheme = Uniform(bits=bits, group_size=int(group_size), symmetric=symmetric)
        _run(ckpt, lambda names: Recipe.single(names, scheme), opts)
        return
    if group_size != "0" or symmetric:
        raise UsageError("--group-size and --symmetric apply to --uniform grids")
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
@guarded()
def lowrank(ckpt: str, rank: int | None, alpha: float | None, **opts: Any) -> None:
    """Make layers low rank (truncated SVD), at a given rank or selected per layer.

    Example: lccompress lowrank ckpt.pt --rank 8 --exclude fc3.weight --model net.py:make --data data.py:loaders
    """
    from lccompress import LowRank, RankSelection, Recipe

    if (rank is None) == (alpha is None):
        raise UsageError("give one of --rank R or --select ALPHA")
    scheme = LowRank(rank) if rank is not None else RankSelection(alpha=alpha)
    _run(ckpt, lambda names: Recipe.single(names, scheme), opts)


@main.command("compress")
@click.argument("ckpt", type=click.Path())
@click.option("--recipe", "recipe_path", required=True, type=click.Path(), help="A recipe in TOML.")
@compression_options
@guarded()
def compress_cmd(ckpt: str, recipe_path: str, **opts: Any) -> None:
    """Compress with a recipe: mixed schemes per layer, additive combinations (TOML).

    Example: lccompress compress ckpt.pt --recipe recipe.toml --model net.py:make --data data.py:loaders
    """
    from lccompress import Recipe

    recipe = Recipe.from_toml(recipe_path)
    _run(ckpt, lambda names: recipe, opts, fixed_recipe=True)


@main.command()
@click.argument("artifact", type=click.Path())
@click.option("--onnx", "onnx_out", required=True, type=click.Path(dir_okay=False), help="ONNX file to write.")
@click.option("--model", "model_spec", required=True, help="Model factory FILE.py:FUNC or module:FUNC.")
@click.option("--input-shape", help="Example input shape, e.g. 1,64.")
@click.option("--input", "inputs", multiple=True, metavar="NAME:SHAPE[:DTYPE]",
              help="An example input (repeatable), e.g. input_ids:batch=1,seq=16:int64; AXIS=N axes are dynamic.")
@click.option("--example", metavar="FILE.py:FUNC",
              help="Function returning the example arguments: a tensor, a tuple, a dict or (args, kwargs).")
@click.option("--output", "output", metavar="NAME", help="The model output to export (default: logits or all tensors).")
@click.option("--data", "data_spec", help="Data function; the first batch is the example input.")
@click.option("--sparse", type=click.Choice(["packed", "dense"]), default="packed", show_default=True,
              help="Pruned weights as positions + values, or dense with zeros.")
@click.option("--dequantize", type=click.Choice(["qdq", "fold"]), default="qdq", show_default=True,
              help="Uniform grids outside MatMulNBits: DequantizeLinear (kept by the runtime), or arithmetic "
                   "onnxruntime folds into dense weights at load (dense speed, smallest file).")
@click.option("--no-matmul-nbits", is_flag=True, help="4-bit Linear weights as DequantizeLinear, not MatMulNBits.")
@guarded()
def export(artifact: str, onnx_out: str, model_spec: str, input_shape: str | None, inputs: tuple[str, ...],
           example: str | None, output: str | None, data_spec: str | None, sparse: str, dequantize: str,
           no_matmul_nbits: bool) -> None:
    """Export a compressed artifact to ONNX and check it in onnxruntime.

    Example: lccompress export small.safetensors --onnx small.onnx --model net.py:make --input-shape 1,64
    """
    r = api.export(artifact, onnx_out, model_spec, input_shape, data_spec, sparse, inputs=inputs, example=example,
                   output=output, dequantize=dequantize, matmul_nbits=not no_matmul_nbits)
    err_console.print(f"wrote {r.path}: {r.bytes:,} bytes; onnxruntime vs torch: max abs diff "
                      f"{r.max_abs:.3g}, max rel diff {r.max_rel:.3g}", highlight=False)


@main.command()
@click.argument("path", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.option("--trust-checkpoint", is_flag=True, help="Allow unpickling a whole pickled module.")
@guarded()
def inspect(path: str, as_json: bool, trust_checkpoint: bool) -> None:
    """Per-layer table of a checkpoint or an artifact: shape, params, scheme, bits, bytes.

    Example: lccompress inspect small.safetensors
    """
    ins = api.inspect(path, trust_checkpoint)
    if as_json:
        click.echo(json.dumps({"path": ins.path, "file_bytes": ins.file_bytes, "layers": ins.layers}))
    else:
        print_inspection(ins, Console())


@main.command()
@click.argument("artifact", type=click.Path())
@click.option("--max-bytes", help="Budget for the artifact's bytes on disk (e.g. 50000, 200KB, 1.5MiB).")
@click.option("--max-drop", type=float, help="Budget for the metric drop vs the reference, e.g. 0.01.")
@click.option("--reference", "reference", type=click.Path(), help="Reference checkpoint (for --max-drop).")
@click.option("--model", "model_spec", help="Model factory (for --max-drop).")
@click.option("--data", "data_spec", help="Data function (for --max-drop; its eval loader is used).")
@click.option("--metric", default="auto", show_default=True,
              help="auto | accuracy | perplexity | loss | cosine | mse | FILE.py:FUNC.")
@click.option("--loss", default="auto", show_default=True, help="The loss that auto metrics follow (as for prune).")
@click.option("--output", "output", metavar="NAME", help="The model output to evaluate.")
@click.option("--json", "as_json", is_flag=True, help="Print one machine-readable JSON line.")
@click.option("--trust-checkpoint", is_flag=True, help="Allow unpickling a whole pickled reference module.")
@guarded(status=2)
def check(artifact: str, max_bytes: str | None, max_drop: float | None, reference: str | None,
          model_spec: str | None, data_spec: str | None, metric: str, loss: str, output: str | None, as_json: bool,
          trust_checkpoint: bool) -> None:
    """Gate for CI: exit 0 within every budget, 1 over one, 2 on usage errors.

    Example: lccompress check small.safetensors --max-bytes 200KB
    """
    try:
        budget = parse_size(max_bytes) if max_bytes is not None else None
    except click.BadParameter as e:
        raise UsageError(f"--max-bytes: {e.message}") from None
    res = api.check(artifact, budget, max_drop, reference, model_spec, data_spec, metric, trust_checkpoint, loss, output)
    if as_json:
        click.echo(json.dumps(res.to_dict()))
    else:
        for c in res.checks:
            mark = "ok  " if c["ok"] else "OVER"
            click.echo(f"{mark} {c['budget']}: {c['value']} (limit {c['limit']}" +
                       ("" if c["ok"] else f", over by {c['over']}") + ")")
    sys.exit(0 if res.ok else 1)


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
@guarded()
def sweep(ckpt: str, keep: str | None, bits: str | None, rank: str | None, methods: str, out_dir: str,
          model_spec: str | None, data_spec: str, steps: int, epochs: int, device: str, seed: int,
          trust_checkpoint: bool) -> None:
    """Trade-off curve: each level by each method; writes artifacts, curve.json and curve.svg.

    Example: lccompress sweep ckpt.pt --keep 0.5,0.2,0.1,0.05,0.02 --method dc,lc,sfw --model net.py:make --data data.py:loaders -o curve/
    """
    given = [(k, v) for k, v in (("keep", keep), ("bits", bits), ("rank", rank)) if v]
    if len(given) != 1:
        raise UsageError("give exactly one of --keep, --bits or --rank")
    kind, text = given[0]
    res = api.sweep_checkpoint(ckpt, kind, _levels(text, kind), methods.split(","), out_dir, model_spec=model_spec,
                               data_spec=data_spec, steps=steps, epochs=epochs, device=device, seed=seed,
                               trust=trust_checkpoint, on_point=lambda m, lv, p: err_console.print(
                                   f"{m} {kind} {lv}: error {p['error']:.2f} %, {p['bytes']:,} bytes", highlight=False))
    click.echo(f"wrote {res.json_path} and {res.svg_path}")


@main.command()
@click.argument("ckpt", type=click.Path())
@click.option("--keep", required=True, help="Nested fractions to keep, decreasing, e.g. 0.5,0.2,0.1,0.05.")
@click.option("--per-layer", is_flag=True, help="Rank weights per layer (default: over all layers).")
@click.option("--structure", type=click.Choice(["weight", "filter"]), default="weight", show_default=True,
              help="Units that survive or not: single weights, or whole filters / rows.")
@click.option("--method", type=click.Choice(["none", "sfw", "cram"]), default="none", show_default=True,
              help="Train the dense model first so that every level stays accurate without retraining: sfw "
                   "(Frank-Wolfe in the smallest level's k-sparse polytope) or cram (compression-aware "
                   "training, cycling through the levels).")
@click.option("--budget", type=click.IntRange(min=1),
              help="cram: optimizer steps [default: LC's default budget on the training loader].")
@click.option("--include", multiple=True, help="Glob of parameters to compress (repeatable).")
@click.option("--exclude", multiple=True, help="Glob of parameters to leave dense (repeatable).")
@click.option("-o", "--out", required=True, type=click.Path(dir_okay=False), help="The multi-level .safetensors file.")
@click.option("--model", "model_spec", help="Model factory (needed for --method sfw / cram).")
@click.option("--data", "data_spec", help="Data function (needed for --method sfw / cram).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--trust-checkpoint", is_flag=True, help="Allow unpickling a whole pickled module.")
@guarded()
def multilevel(ckpt: str, keep: str, per_layer: bool, structure: str, method: str, budget: int | None,
               include: tuple[str, ...], exclude: tuple[str, ...], out: str, model_spec: str | None,
               data_spec: str | None, seed: int, trust_checkpoint: bool) -> None:
    """One file, many nested sparsity levels: the weights once plus a level id per weight.

    Example: lccompress multilevel ckpt.pt --keep 0.5,0.2,0.1,0.05 --method cram --model net.py:make --data data.py:loaders -o multi.safetensors
    """
    reporter = Reporter(err_console)
    if method == "cram":
        reporter.start("CrAM over the levels", 1)
    try:
        res = api.multilevel(ckpt, _levels(keep, "keep"), out, per_layer=per_layer, structure=structure,
                             method=method, include=include, exclude=exclude, model_spec=model_spec,
                             data_spec=data_spec, seed=seed, trust=trust_checkpoint, budget=budget,
                             on_progress=reporter.progress_)
    finally:
        reporter.end()
    click.echo(f"wrote {res.path}: {res.bytes:,} bytes, levels " +
               ", ".join(f"{r['level']} (keep {r['keep']})" for r in res.levels))


@main.command()
@click.argument("multi", type=click.Path())
@click.option("--level", required=True, type=click.IntRange(min=0), help="Level to extract (0 = dense).")
@click.option("-o", "--out", required=True, type=click.Path(dir_okay=False), help="Single-level .safetensors artifact.")
@click.option("--model", "model_spec", help="With --data: recalibrate BatchNorm statistics for this level.")
@click.option("--data", "data_spec", help="Data function whose train loader recalibrates BatchNorm.")
@guarded()
def extract(multi: str, level: int, out: str, model_spec: str | None, data_spec: str | None) -> None:
    """Extract one level of a multi-level file as a compressed artifact, no retraining.

    Example: lccompress extract multi.safetensors --level 3 -o level3.safetensors
    """
    res = api.extract(multi, level, out, model_spec=model_spec, data_spec=data_spec)
    click.echo(f"wrote {res.path}: {res.bytes:,} bytes")


@main.command()
@click.option("--out-dir", type=click.Path(file_okay=False), default="lccompress-demo", show_default=True,
              help="Where the checkpoint, the artifact and the report go.")
@click.option("--steps", type=click.IntRange(min=1), default=40, show_default=True, help="LC steps.")
@guarded()
def demo(out_dir: str, steps: int) -> None:
    """Train the digits MLP, save it, then run `lccompress prune` on it: DC then LC, ONNX export, report.

    Example: lccompress demo --steps 40
    """
    import torch

    from lccompress import digits

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
