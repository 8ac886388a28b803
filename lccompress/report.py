"""The size and accuracy report of a compression run, as JSON, Markdown or a rich table.

JSON keys (stable): lccompress_version, torch_version, command, method, seed, recipe, device,
artifact, artifact_bytes, reference_bytes, compression_ratio, metric {name, reference,
compressed, onnx, drop}, onnx_max_rel_diff, per_class [{class, reference, compressed, delta}],
layers [{name, params, scheme, shape, numel, summary, bits, bytes}], timings {total, lstep,
cstep, eval}, history [{step, mu, lr, loss, gap, metric, phase}], implicit [{module, norm_inf,
well_posed, residual}] (one per `ImplicitNet` layer: ‖A‖∞ and the fixed-point residual).
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Mapping

import torch
from torch import Tensor

from .util import atomic_write


def per_class(classes_ref: Tensor, classes_new: Tensor, targets: Tensor) -> list[dict[str, Any]]:
    """Accuracy per class of the reference and of the compressed model (their predicted classes
    against the targets), and the change."""
    if not (isinstance(targets, Tensor) and targets.dim() == 1 and not targets.is_floating_point()):
        return []
    rows = []
    for c in targets.unique().tolist():
        m = targets == c
        a = float((classes_ref[m] == c).float().mean())
        b = float((classes_new[m] == c).float().mean())
        rows.append({"class": int(c), "reference": a, "compressed": b, "delta": b - a})
    return rows


def layers(groups, thetas: Mapping[str, Mapping[str, Tensor]], size) -> list[dict[str, Any]]:
    """One row per compressed group: scheme, shapes, summary (kept / k / rank), bits as stored."""
    stored = {g.name: g for g in size.groups} if size is not None else {}
    rows = []
    for g in groups:
        s = stored.get(g.name)
        bits = s.stored_bits if s is not None else g.bits(thetas[g.name])
        rows.append({"name": g.name, "params": list(g.params), "scheme": g.scheme.to_dict(),
                     "shape": [list(x) for x in g.shapes], "numel": int(sum(x.numel() for x in g.shapes)),
                     "summary": g.scheme.summary(thetas[g.name], g.shape), "bits": int(bits),
                     "bytes": math.ceil(bits / 8)})
    return rows


def write(path: str | os.PathLike, report: Mapping[str, Any]) -> None:
    """Write the report as JSON (.json) or Markdown (anything else), atomically."""
    p = os.fspath(path)
    text = json.dumps(_finite(report), indent=2, default=str) + "\n" if p.endswith(".json") else markdown(report)
    atomic_write(p, text.encode())


def _finite(o: Any) -> Any:
    """The report with every non-finite float as None (JSON null): strict readers reject NaN."""
    if isinstance(o, float):
        return o if math.isfinite(o) else None
    if isinstance(o, Mapping):
        return {k: _finite(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_finite(v) for v in o]
    return o


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.2f} %"


def metric_text(v: float | None, unit: str = "%") -> str:
    """A metric's value in its unit: fractions as percentages, anything else as a plain number."""
    return "–" if v is None else (f"{100 * v:.2f} %" if unit == "%" else f"{v:.4g}")


def drop_text(d: float | None, unit: str = "%") -> str:
    """How much worse, in the metric's unit: percentage points, or the plain difference."""
    return "–" if d is None else (f"{100 * d:.2f} points" if unit == "%" else f"{d:.4g}")


def markdown(r: Mapping[str, Any]) -> str:
    m = r.get("metric") or {}
    out = [f"# lccompress report: {r.get('artifact')}", "",
           f"- method: {r.get('method')}, seed {r.get('seed')}, device {r.get('device')}",
           f"- artifact: {r['artifact_bytes']:,} bytes on disk; reference {r['reference_bytes']:,} bytes dense; "
           f"ratio {r['compression_ratio']:.2f}×"]
    if m.get("reference") is not None:
        u = m.get("unit", "%")
        out.append(f"- {m.get('name', 'metric')}: reference {metric_text(m.get('reference'), u)}, compressed "
                   f"{metric_text(m.get('compressed'), u)}, ONNX {metric_text(m.get('onnx'), u)}, "
                   f"worse by {drop_text(m.get('drop'), u)}")
    t = r.get("timings") or {}
    if t:
        out.append("- time: " + ", ".join(f"{k} {v:.1f} s" for k, v in t.items()))
    out += ["", "| layer | scheme | shape | params | kept / k / rank | bits | bytes |", "|---|---|---|---|---|---|---|"]
    for row in r.get("layers", []):
        out.append(f"| {row['name']} | {row['scheme']['scheme']} | {' + '.join('×'.join(map(str, s)) for s in row['shape'])} "
                   f"| {row['numel']:,} | {summary_text(row['summary'])} | {row['bits']:,} | {row['bytes']:,} |")
    if r.get("per_class"):
        out += ["", "| class | reference | compressed | change |", "|---|---|---|---|"]
        out += [f"| {c['class']} | {_pct(c['reference'])} | {_pct(c['compressed'])} | {100 * c['delta']:+.2f} |"
                for c in r["per_class"]]
    return "\n".join(out) + "\n"


def summary_text(s: Mapping[str, Any]) -> str:
    if "units" in s:
        return f"{s['kept']:,} of {s['units']:,} channels"
    if "group_size" in s:
        where = f"groups of {s['group_size']}" if s["group_size"] else "per channel"
        return f"{s['bits_per_weight']:.2f} bits/weight, {where}" + (", symmetric" if s.get("symmetric") else "")
    if "kept" in s:
        return f"{s['kept']:,} kept ({100 * s['density']:.2f} %)"
    if "rank" in s:
        return f"rank {s['rank']}"
    if "k" in s:
        return f"k = {s['k']}"
    if "terms" in s:
        return " + ".join(summary_text(t) for t in s["terms"])
    return ", ".join(f"{k} {v}" for k, v in s.items())  # a scheme's own facts, as they are


def versions() -> dict[str, str]:
    from .version import __version__

    return {"lccompress_version": __version__, "torch_version": torch.__version__}
