"""Accuracy–size curves: each (method, level) compressed, measured and plotted.

    sweep(model, data, kind="keep", levels=[0.1, 0.05, 0.02], methods=["dc", "lc", "sfw"], out_dir=...)

writes `out_dir/curve.json`, {method: [{level, metric, error, bytes, theta_bytes, ratio, seconds}]}
plus {"reference": [the uncompressed model]}, and `out_dir/curve.svg` (error against bytes on a
log scale, one line per method), both atomically and after every point, so an interrupted sweep
leaves a valid partial curve. `bytes` is the size of the real artifact (`lccompress.artifact.save`:
compact θ + dense tensors + manifest); `theta_bytes` is ⌈θ bits / 8⌉ + the dense tensors' bytes.

kinds: "keep" → Prune(keep=level), one global top-κ over `params`; "bits" → Codebook(k=2^level) per
tensor; "rank" → LowRank(rank=level) per tensor. Methods: those of `lccompress.compress` ("dc",
"idc", "lc", "finetune"), and "sfw" = `sfw_refine` (options `fw.SFW_DEFAULTS`) in the matching
ball (`fw.constraints_for`: keep → one joint KSparsePolytope(k=level); rank → SpectralKSupport(k=level)
per tensor; bits → L2Ball per tensor, a plain norm bound, no quantization prior), then one-shot DC.
"""

from __future__ import annotations

import copy
import json
import math
import os
import time
from html import escape
from typing import Any, Callable, Mapping, Sequence

import safetensors.torch
import torch
from torch import nn

from .artifact import save as save_artifact
from .errors import ConfigError
from .fw import compressible
from .lc import LCConfig, Result
from .methods import METHODS, compress
from .recipe import Recipe
from .schemes import Codebook, LowRank, Prune
from .train import LossFn, MetricFn, accuracy, as_data, evaluate, resolve_device
from .util import atomic_write

KINDS = ("keep", "bits", "rank")


def recipe_for(kind: str, level: Any, params: Sequence[str]) -> Recipe:
    """The single-level recipe of a sweep point."""
    if kind == "keep":
        return Recipe.single(params, Prune(keep=level), joint=True)
    if kind == "bits":
        if isinstance(level, bool) or not isinstance(level, int) or not 1 <= level <= 16:
            raise ConfigError(f"level={level!r} must be a whole number of bits in 1…16")
        return Recipe.single(params, Codebook(k=2 ** level))
    if kind == "rank":
        return Recipe.single(params, LowRank(rank=level))
    raise ConfigError(f"kind={kind!r} must be one of {', '.join(KINDS)}")


def _theta_bytes(r: Result) -> int:
    compressed = {p for g in r.groups for p in g.params}
    dense = sum(v.numel() * v.element_size() for k, v in r.model.state_dict().items() if k not in compressed)
    return math.ceil(r.bits() / 8) + dense


def sweep(
    model: nn.Module,
    data: Any,
    kind: str = "keep",
    levels: Sequence[Any] = (0.2, 0.1, 0.05),
    methods: Sequence[str] = ("dc", "lc", "sfw"),
    out_dir: str | os.PathLike = "sweep",
    *,
    config: LCConfig = LCConfig(),
    params: Sequence[str] | None = None,
    sfw: Mapping[str, Any] | None = None,
    loss: LossFn | None = None,
    metric: MetricFn | None = None,
    device: str | torch.device = "cpu",
    seed: int = 0,
    callback: Callable[[str, Any, dict[str, Any]], None] | None = None,
) -> dict[str, list[dict[str, Any]]]:
    """Run every (method, level), write curve.json and curve.svg under out_dir; return the curves.

    `data` is {"train": ..., "eval": ...} (eval is required: it gives the metric, accuracy by
    default, plotted as error = 100·(1 − accuracy) %). `params` defaults to every ≥ 2-D weight;
    `sfw` overrides SFW_DEFAULTS; `callback(method, level, point)` runs after each point.
    """
    d = as_data(data)
    if "eval" not in d:
        raise ConfigError("sweep needs evaluation data: pass {'train': ..., 'eval': ...}")
    if kind not in KINDS:
        raise ConfigError(f"kind={kind!r} must be one of {', '.join(KINDS)}")
    methods = list(methods)
    for m in methods:
        if m not in METHODS:
            raise ConfigError(f"method {m!r} must be one of {', '.join(METHODS)}")
    if not levels:
        raise ConfigError("levels must not be empty")
    params = list(params) if params is not None else compressible(model)
    for level in levels:  # fail before any work on a bad level
        recipe_for(kind, level, params).groups(model)
    os.makedirs(out_dir, exist_ok=True)
    json_path, svg_path = os.path.join(out_dir, "curve.json"), os.path.join(out_dir, "curve.svg")
    dev = resolve_device(device)
    labels = {"kind": kind, "error": metric is None}

    ref = copy.deepcopy(model).to(dev).eval()
    value, _, _ = evaluate(ref, d["eval"], dev, metric or accuracy)
    dense = len(safetensors.torch.save({k: v.detach().cpu().contiguous() for k, v in ref.state_dict().items()}))
    del ref
    curves: dict[str, list[dict[str, Any]]] = {"reference": [_point(None, value, metric, dense, dense, 1.0, 0.0)]}

    def flush() -> None:
        atomic_write(json_path, json.dumps(curves, indent=1).encode())
        atomic_write(svg_path, plot_svg(curves, **labels).encode())

    flush()
    for m in methods:
        curves[m] = []
        for level in levels:
            t = time.perf_counter()
            recipe = recipe_for(kind, level, params)
            r = compress(model, recipe, d, method=m, config=config, loss=loss, metric=metric, device=dev,
                         seed=seed, sfw=sfw)
            seconds = time.perf_counter() - t
            name = f"{m}-{kind}{level}.safetensors"
            size = save_artifact(os.path.join(out_dir, name), r.model, r.thetas, r.groups, recipe=recipe)
            p = {**_point(level, r.metric, metric, size, _theta_bytes(r), r.ratio, seconds), "artifact": name}
            curves[m].append(p)
            flush()
            if callback is not None:
                callback(m, level, p)
    return curves


def _point(level: Any, value: float | None, metric: Any, size: int, theta: int, ratio: float,
           seconds: float) -> dict[str, Any]:
    p: dict[str, Any] = {"level": level, "metric": value}
    if metric is None and value is not None:
        p["error"] = round(100 * (1 - value), 4)
    return {**p, "bytes": size, "theta_bytes": theta, "ratio": round(ratio, 3), "seconds": round(seconds, 3)}


# ----------------------------------------------------------------------------- SVG
_COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf")


def _fmt_bytes(b: float) -> str:
    for unit, s in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if b >= s:
            v = b / s
            return f"{v:.0f} {unit}" if v >= 10 or v == int(v) else f"{v:.1f} {unit}"
    return f"{b:.0f} B"


def _nice_step(span: float, n: int = 5) -> float:
    raw = span / max(1, n)
    e = 10 ** math.floor(math.log10(raw))
    return next(m * e for m in (1, 2, 2.5, 5, 10) if m * e >= raw)


def plot_svg(curves: Mapping[str, Sequence[Mapping[str, Any]]], *, kind: str = "keep", error: bool = True,
             width: int = 720, height: int = 440) -> str:
    """Error (or metric) against bytes, log-scale x, one polyline per method, the reference as a
    dashed line, each point labelled with its level; a self-contained SVG document."""
    key = "error" if error else "metric"
    pts = {m: [(p["bytes"], p[key], p["level"]) for p in ps if p.get(key) is not None and p["bytes"] > 0]
           for m, ps in curves.items()}
    allp = [q for ps in pts.values() for q in ps]
    L, R, T, B = 78, 170, 44, 58  # margins: the legend sits in the right one
    pw, ph = width - L - R, height - T - B
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" font-family="Helvetica, Arial, sans-serif" font-size="12">',
           f'<rect width="{width}" height="{height}" fill="white"/>',
           f'<text x="{L + pw / 2}" y="24" text-anchor="middle" font-size="15">'
           f'{"test error" if error else "metric"} vs compressed size ({escape(kind)})</text>']
    if not allp:
        out.append(f'<text x="{L + pw / 2}" y="{T + ph / 2}" text-anchor="middle">no points yet</text></svg>')
        return "\n".join(out)
    x0, x1 = math.log10(min(q[0] for q in allp)), math.log10(max(q[0] for q in allp))
    pad = max(0.05, 0.06 * (x1 - x0))
    x0, x1 = x0 - pad, x1 + pad
    ys = [q[1] for q in allp]
    y0 = 0.0 if error else min(ys)
    y1 = max(ys) if max(ys) > y0 else y0 + 1
    step = _nice_step(y1 - y0)
    y1 = math.ceil(y1 / step) * step
    y0 = math.floor(y0 / step) * step
    X = lambda b: L + (math.log10(b) - x0) / (x1 - x0) * pw  # noqa: E731
    Y = lambda v: T + ph - (v - y0) / (y1 - y0) * ph  # noqa: E731
    # axes, grid and ticks
    out.append(f'<rect x="{L}" y="{T}" width="{pw}" height="{ph}" fill="none" stroke="#444"/>')
    ticks = [10 ** e for e in range(math.floor(x0), math.ceil(x1) + 1)]
    if x1 - x0 < 2.5:
        ticks = sorted(m * t for t in ticks for m in (1, 2, 5))
    for t in ticks:
        if x0 <= math.log10(t) <= x1:
            x = X(t)
            out.append(f'<line x1="{x:.1f}" y1="{T}" x2="{x:.1f}" y2="{T + ph}" stroke="#e5e5e5"/>')
            out.append(f'<text x="{x:.1f}" y="{T + ph + 18}" text-anchor="middle">{_fmt_bytes(t)}</text>')
    v = y0
    while v <= y1 + 1e-9:
        y = Y(v)
        out.append(f'<line x1="{L}" y1="{y:.1f}" x2="{L + pw}" y2="{y:.1f}" stroke="#e5e5e5"/>')
        out.append(f'<text x="{L - 8}" y="{y + 4:.1f}" text-anchor="end">{v:g}</text>')
        v += step
    out.append(f'<text x="{L + pw / 2}" y="{height - 16}" text-anchor="middle" font-size="13">'
               f'compressed size in bytes (log scale)</text>')
    out.append(f'<text transform="translate(20 {T + ph / 2}) rotate(-90)" text-anchor="middle" font-size="13">'
               f'{"test error (%)" if error else "metric"}</text>')
    # lines
    legend = []
    for i, (m, ps) in enumerate((m, ps) for m, ps in pts.items() if ps and m != "reference"):
        c = _COLORS[i % len(_COLORS)]
        ps = sorted(ps)
        path = " ".join(f"{X(b):.1f},{Y(e):.1f}" for b, e, _ in ps)
        out.append(f'<polyline points="{path}" fill="none" stroke="{c}" stroke-width="2"/>')
        for b, e, lv in ps:
            out.append(f'<circle cx="{X(b):.1f}" cy="{Y(e):.1f}" r="4" fill="{c}"><title>{escape(m)} level {lv}: '
                       f'{e:g} at {b} bytes</title></circle>')
            out.append(f'<text x="{X(b) + 6:.1f}" y="{Y(e) - 7:.1f}" font-size="10" fill="{c}">'
                       f'{escape(str(lv))}</text>')
        legend.append((m, c, False))
    for m, ps in pts.items():
        if m == "reference" and ps:
            y = Y(ps[0][1])
            out.append(f'<line x1="{L}" y1="{y:.1f}" x2="{L + pw}" y2="{y:.1f}" stroke="#777" stroke-dasharray="6 4"/>')
            out.append(f'<circle cx="{X(ps[0][0]):.1f}" cy="{y:.1f}" r="4" fill="#777"/>')
            legend.append((m, "#777", True))
    lx, ly = L + pw + 18, T + 8
    out.append(f'<text x="{lx}" y="{ly}" font-size="12" font-weight="bold">method</text>')
    for j, (m, c, dashed) in enumerate(legend):
        y = ly + 20 + 20 * j
        dash = ' stroke-dasharray="6 4"' if dashed else ""
        out.append(f'<line x1="{lx}" y1="{y - 4}" x2="{lx + 26}" y2="{y - 4}" stroke="{c}" stroke-width="2"{dash}/>')
        out.append(f'<text x="{lx + 32}" y="{y}">{escape(m)}</text>')
    out.append("</svg>")
    return "\n".join(out)
