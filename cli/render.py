"""Rendering with rich: progress of LC steps and epochs, the compression report, the inspect table."""

from __future__ import annotations

import os
import time
from typing import Any, Mapping

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from lccompress import api, report as rep
from lccompress.lc import StepRecord


class Reporter:
    """Progress (`api.Callbacks`): rich bars for LC steps and for the epochs of the current step on a
    terminal, one plain line per step otherwise (CI, pipes)."""

    def __init__(self, console: Console) -> None:
        self.console, self.steps, self.progress = console, 0, None
        self.done, self.last, self.every = 0, time.monotonic(), 30.0

    def callbacks(self) -> api.Callbacks:
        return api.Callbacks(info=lambda m: self.console.print(m), start=self.start, step=self.step,
                             progress=self.progress_, end=self.end)

    def start(self, label: str, steps: int) -> None:
        self.steps = steps
        if self.console.is_terminal and not os.environ.get("CI"):
            self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                     TextColumn("{task.fields[info]}"), TimeElapsedColumn(), console=self.console)
            self.task = self.progress.add_task(label, total=steps, info="")
            self.epochs = self.progress.add_task("  optimizer steps", total=None, info="")
            self.progress.start()

    def end(self) -> None:
        if self.progress:
            self.progress.stop()
            self.progress = None

    def progress_(self, done: int, total: int | None) -> None:
        """Inside an L step: the bar on a terminal; otherwise a line at least every 30 seconds."""
        if self.progress:
            self.progress.update(self.epochs, completed=done, total=total)
            return
        now = time.monotonic()
        if now - self.last >= self.every:
            self.last = now
            of = f"/{total:,}" if total else ""
            self.console.print(f"  step {self.done + 1}/{self.steps}: {done:,}{of} optimizer steps", highlight=False)

    def step(self, r: StepRecord) -> None:
        metric = "" if r.metric is None else f"  metric {r.metric:.4f}"
        self.done, self.last = min(r.step + 1, self.steps), time.monotonic()
        lc = r.phase in ("lc", "idc")
        info = f"μ {r.mu:.3g}  loss {r.loss:.4f}  gap {r.gap:.2e}{metric}" if lc else f"loss {r.loss:.4f}{metric}"
        where = f"step {r.step + 1}/{self.steps}" if lc else {"tail": "tail (θ trained)"}.get(r.phase, r.phase)
        if self.progress:
            self.progress.update(self.task, completed=self.done, info=info)
        else:
            self.console.print(f"{where}  {info}", highlight=False)


def print_report(r: Mapping[str, Any], console: Console) -> None:
    ratio = r["compression_ratio"]
    than = f"{ratio:.1f}× smaller than" if ratio >= 1 else f"{1 / ratio:.1f}× LARGER than"
    t = Table(title=f"{r['artifact']}: {r['artifact_bytes']:,} bytes on disk, {than} {r['reference_bytes']:,} dense bytes")
    for col in ("layer", "scheme", "params", "kept / k / rank", "bits", "bytes"):
        t.add_column(col, justify="left" if col in ("layer", "scheme", "kept / k / rank") else "right")
    for row in r["layers"]:
        t.add_row(row["name"], row["scheme"]["scheme"], f"{row['numel']:,}", rep.summary_text(row["summary"]),
                  f"{row['bits']:,}", f"{row['bytes']:,}")
    console.print(t)
    m = r["metric"]
    if m.get("reference") is not None:
        u = m.get("unit", "%")
        onnx = f", ONNX (onnxruntime) {rep.metric_text(m['onnx'], u)}" if m.get("onnx") is not None else ""
        lower = "" if m.get("higher_is_better", True) else " (lower is better)"
        console.print(f"{m['name']}{lower}: reference {rep.metric_text(m['reference'], u)}, compressed "
                      f"{rep.metric_text(m['compressed'], u)}{onnx}; worse by {rep.drop_text(m['drop'], u)}",
                      highlight=False)
    for c in r.get("implicit") or []:
        res = f", fixed-point residual {c['residual']:.1e}" if c.get("residual") is not None else ""
        state = "well-posed" if c["well_posed"] else "NOT well-posed (≥ 1)"
        console.print(f"implicit layer {c['module']}: ‖A‖∞ = {c['norm_inf']:.4f}, {state}{res}", highlight=False)
    tm = r["timings"]
    b = r.get("budget") or {}
    if b.get("steps"):
        epochs = f", {b['epochs']:.2f} epochs" if b.get("epochs") is not None else ""
        procs = f" on {b['processes']} processes" if b.get("processes", 1) > 1 else ""
        console.print(f"budget: {b['steps']:,} optimizer steps ({b['samples']:,} samples{epochs}){procs}",
                      highlight=False)
    d = r.get("device_figures")
    if d:
        a, ref = d["artifact"], d["reference"]
        mib = 2 ** 20
        lat = "; ".join(f"batch {b}: {a['latency_ms'][str(b)]:.3f} ms ({a['latency_ms'][str(b)] / max(ref['latency_ms'][str(b)], 1e-9):.2f}× dense)"
                        for b in d["batches"])
        console.print(f"onnxruntime, {d['threads']} thread: session memory {a['session_bytes'] / mib:.1f} MiB "
                      f"({a['session_bytes'] / max(ref['session_bytes'], 1):.2f}× dense {ref['session_bytes'] / mib:.1f} MiB); "
                      f"latency {lat}", highlight=False)
    console.print(f"method {r['method']}; time {tm.get('total', 0):.1f} s (L steps {tm.get('lstep', 0):.1f} s, "
                  f"C steps {tm.get('cstep', 0):.2f} s)", highlight=False)


def print_inspection(ins: api.Inspection, console: Console) -> None:
    table = Table(title=f"{ins.path}: {ins.file_bytes:,} bytes on disk")
    for col in ("name", "shape", "params", "scheme", "kept / k / rank", "bits", "bytes"):
        table.add_column(col, justify="left" if col in ("name", "scheme", "kept / k / rank") else "right")
    for r in ins.layers:
        table.add_row(r["name"], r["shape"], f"{r['numel']:,}", r["scheme"], r["detail"], f"{r['bits']:,}",
                      f"{r['bytes']:,}")
    console.print(table)
