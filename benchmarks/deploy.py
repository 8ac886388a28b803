"""What the device sees: an exported ONNX file served by onnxruntime on the CPU, dense against
compressed — bytes on disk, resident memory of the session, latency, and agreement with torch.

    python benchmarks/deploy.py                   # n = 1024, 2048, 4096 and the two CNNs, ~9 min on 2 cores
    python benchmarks/deploy.py --quick           # n = 1024, 2048 only, fewer timed runs, ~2 min
    python benchmarks/deploy.py --json deploy.json --out onnx/   # also the results as JSON, keep the files
    python benchmarks/deploy.py --tables 1 --sizes 4096          # one table, chosen sizes

Most of the default run is DC itself: the 8-bit uniform C step on the 4096×4096 weight takes
a couple of minutes on one thread.

Every file is measured by `lccompress.artifact.runtime.measure_onnx` (a fresh child process, one
intra-op thread, default graph optimisations; see that module's docstring): session memory is
the resident-set growth from creating the session and running it once at batch 1, latency the
median of --repeats timed `session.run` calls at batch 1 and at batch 32. Each file is measured
--rounds times, the rounds interleaved over the files of a table (so that a burst of load from
elsewhere hits every file alike); memory is the median of the rounds and latency the minimum of
the rounds' medians.

Part of an onnxruntime session's memory does not depend on the model (arena, kernel registry,
allocator bookkeeping). To see the model's share, a model that holds nothing — one Relu built with
onnx.helper — is measured the same way (three fresh processes, median), and "net MiB" is raw MiB
minus the empty session's. Memory ratios ("net ×") are of net figures; raw ones are shown too.

Table 1 — uniform grids on one Linear(n, n) with bias (seed 0, n = 1024, 2048, 4096): the dense
export against `Uniform(bits, group_size=32)` compressed by DC and exported as MatMulNBits
(ORT's com.microsoft kernel that reads packed codes) or as a DequantizeLinear decoder in front
of the dense product. 4 bits go to MatMulNBits by default; 2 and 8 bits do not
(`onnx_export.MATMUL_NBITS`), and are forced there for their MatMulNBits rows by patching that
tuple for the duration of the export. The error is verify_onnx's max relative difference between
ORT on the file and torch on the Δ(θ) model (`Result.model`), batch 32. "ORT runs" lists the
operators left in the graph after onnxruntime's load-time optimisations (the graph a session
with the same settings writes to `optimized_model_filepath`): a DequantizeLinear folded into a
dense initializer at load shows up as a plain Gemm / MatMul. The issue's targets for 4-bit g32
MatMulNBits: net session memory ≤ 0.2× dense, batch-1 latency ≤ 1.2× dense, error ≤ 1e-4.

Table 2 — structured pruning of half the channels of every prunable group
(`Recipe.structured(model, (x,), StructuredPrune(keep=0.5))`, DC), exported with the pruned
channels physically removed, on B2's LeNet5 (benchmarks/fashion.py; input 1×28×28) and a small
residual CNN defined here (input 3×32×32): a 3×3 conv stem to 32 channels with BN and ReLU, two
residual blocks (conv 3×3, BN, ReLU, conv 3×3, BN, identity shortcut, ReLU after the sum) at 32
channels, one block at stride 2 to 64 channels whose shortcut is a 1×1 stride-2 conv with BN,
global average pooling and Linear(64, 10). Weights are random (seed 0) and the BatchNorms carry
random non-default running statistics and affine parameters: size, memory and latency do not
depend on training. Targets: batch-32 latency ≤ 0.6× dense, file and net session memory about
halved (checked here as ≤ 0.6×).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fashion import LeNet5  # noqa: E402

import lccompress as lcc  # noqa: E402
from lccompress.artifact import export_onnx, onnx_export, verify_onnx  # noqa: E402
from lccompress.artifact.runtime import DeviceFigures, measure_onnx  # noqa: E402

MIB = 2**20
GROUP = 32  # block size of every uniform grid
BATCHES = (1, 32)
# Table 1 rows: (label, bits, matmul_nbits argument, widths patched into MATMUL_NBITS or None, expected encoding prefix)
GRID_ROWS = [
    ("4-bit g32 MatMulNBits", 4, True, None, "matmulnbits/4bit"),
    ("4-bit g32 DequantizeLinear", 4, False, None, "dequantize/"),
    ("8-bit g32 DequantizeLinear", 8, False, None, "dequantize/"),
    ("2-bit g32 DequantizeLinear", 2, False, None, "dequantize/"),
    ("8-bit g32 MatMulNBits (forced)", 8, True, (2, 4, 8), "matmulnbits/8bit"),
    ("2-bit g32 MatMulNBits (forced)", 2, True, (2, 4, 8), "matmulnbits/2bit"),
]
TARGET_ROW = "4-bit g32 MatMulNBits"
TARGET = {"net_mem": 0.2, "lat1": 1.2, "err": 1e-4}  # Table 1, 4-bit g32 MatMulNBits
TARGET2 = {"lat32": 0.6, "file": 0.6, "net_mem": 0.6}  # Table 2, structured 50 %


# ----------------------------------------------------------------------------- models
class Block(nn.Module):
    """conv 3×3 (stride s) + BN + ReLU + conv 3×3 + BN, plus the shortcut (identity, or a 1×1
    stride-s conv + BN when the shape changes), then ReLU."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.short = (nn.Identity() if stride == 1 and cin == cout else
                      nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
        return torch.relu(y + self.short(x))


class ResCNN(nn.Module):
    """Stem conv 3→32 + BN + ReLU, two identity blocks at 32, a stride-2 block to 64 with a
    projection shortcut, global average pooling, Linear 64→10. Input (B, 3, 32, 32)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 32, 3, 1, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU())
        self.blocks = nn.Sequential(Block(32, 32), Block(32, 32), Block(32, 64, stride=2))
        self.fc = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(F.adaptive_avg_pool2d(self.blocks(self.stem(x)), 1).flatten(1))


def randomize_bn_(model: nn.Module) -> nn.Module:
    """Non-default statistics and affine parameters in every BatchNorm (called under a seed)."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.normal_(1, 0.1)
                m.bias.normal_(0, 0.1)
    return model


# ----------------------------------------------------------------------------- measuring
def empty_model(path: Path) -> None:
    """A model that holds nothing: y = Relu(x), x (batch, 8) float."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 8])
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "empty", [x], [y])
    mp = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    onnx.checker.check_model(mp)
    path.write_bytes(mp.SerializeToString())


def input_name(path: Path) -> str:
    names = [i.name for i in onnx.load(str(path), load_external_data=False).graph.input]
    if len(names) != 1:
        raise SystemExit(f"{path}: expected one graph input, found {names}")
    return names[0]


def runtime_ops(path: Path, threads: int) -> str:
    """Operator types left after onnxruntime's load-time optimisations (ORT_ENABLE_ALL, CPU), in
    graph order, each once; com.microsoft ones without their domain."""
    opt = path.with_suffix(".ort-opt.onnx")
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.optimized_model_filepath = str(opt)
    so.log_severity_level = 3  # ORT warns that an ENABLE_ALL graph may not be portable; it is only read here
    ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    try:
        ops = [n.op_type for n in onnx.load(str(opt), load_external_data=False).graph.node]
    finally:
        opt.unlink(missing_ok=True)
    return "+".join(dict.fromkeys(ops))


@contextlib.contextmanager
def matmul_nbits_widths(widths: tuple[int, ...] | None) -> Iterator[None]:
    """Let the exporter emit MatMulNBits at these widths for the duration (None: unchanged)."""
    saved = onnx_export.MATMUL_NBITS
    if widths is not None:
        onnx_export.MATMUL_NBITS = widths
    try:
        yield
    finally:
        onnx_export.MATMUL_NBITS = saved


def measure_all(files: list[tuple[Path, dict[int, dict[str, np.ndarray]]]], a: argparse.Namespace) -> list[DeviceFigures]:
    """Each file measured a.rounds times, the rounds interleaved over the files; memory the median
    of the rounds, latency per batch the minimum of the rounds' medians."""
    runs: list[list[DeviceFigures]] = [[] for _ in files]
    for _ in range(a.rounds):
        for i, (path, feeds) in enumerate(files):
            runs[i].append(measure_onnx(path, feeds, threads=a.threads, repeats=a.repeats, warmup=a.warmup))
    out = []
    for rs in runs:
        out.append(DeviceFigures(file_bytes=rs[0].file_bytes,
                                 session_bytes=int(statistics.median(r.session_bytes for r in rs)),
                                 latency_ms={b: min(r.latency_ms[b] for r in rs) for b in rs[0].latency_ms}))
    return out


def empty_session(out: Path, a: argparse.Namespace) -> dict[str, Any]:
    """Session memory and latency of the empty model: the median over 3 fresh processes."""
    path = out / "empty.onnx"
    empty_model(path)
    feeds = {b: {"x": np.random.default_rng(0).standard_normal((b, 8), dtype=np.float32)} for b in BATCHES}
    figs = [measure_onnx(path, feeds, threads=a.threads, repeats=a.repeats, warmup=a.warmup) for _ in range(3)]
    return {"file_bytes": figs[0].file_bytes,
            "session_bytes": int(statistics.median(f.session_bytes for f in figs)),
            "session_bytes_runs": [f.session_bytes for f in figs],
            "latency_ms": {b: min(f.latency_ms[b] for f in figs) for b in BATCHES}}


def figures_row(fig: DeviceFigures, empty: dict[str, Any]) -> dict[str, Any]:
    return {"file_bytes": fig.file_bytes, "session_bytes": fig.session_bytes,
            "net_session_bytes": fig.session_bytes - empty["session_bytes"],
            "latency_ms": {b: fig.latency_ms[b] for b in BATCHES}}


def add_ratios(rows: list[dict[str, Any]], dense: dict[str, Any]) -> None:
    for r in rows:
        r["file_ratio"] = r["file_bytes"] / dense["file_bytes"]
        base = dense["net_session_bytes"]
        r["net_mem_ratio"] = r["net_session_bytes"] / base if base > 0 else float("nan")
        r["latency_ratio"] = {b: r["latency_ms"][b] / dense["latency_ms"][b] for b in BATCHES}


# ----------------------------------------------------------------------------- table 1
def grid_table(n: int, out: Path, empty: dict[str, Any], a: argparse.Namespace) -> list[dict[str, Any]]:
    torch.manual_seed(a.seed)
    model = nn.Linear(n, n).eval()
    x = torch.randn(1, n)
    feed32 = torch.randn(32, n)
    check = torch.randn(32, n)
    rows, files = [], []
    dense = out / f"linear{n}-dense.onnx"
    export_onnx(model, {}, [], x, dense)
    rows.append({"n": n, "form": "dense", "encoding": "dense",
                 "max_rel": verify_onnx(dense, model, check, threads=a.threads)["max_rel"]})
    files.append(dense)
    results: dict[int, lcc.Result] = {}
    for label, bits, nbits, widths, expect in GRID_ROWS:
        if bits not in results:
            t = time.perf_counter()
            recipe = lcc.Recipe.single(["weight"], lcc.Uniform(bits=bits, group_size=GROUP))
            results[bits] = lcc.compress(model, recipe, method="dc")
            print(f"  n={n}: DC {bits}-bit in {time.perf_counter() - t:.1f} s", file=sys.stderr)
        r = results[bits]
        path = out / f"linear{n}-{bits}bit-{'nbits' if nbits else 'dq'}.onnx"
        with matmul_nbits_widths(widths):
            enc = export_onnx(r.model, r.thetas, r.groups, x, path, matmul_nbits=nbits)["weight"]
        if not enc.startswith(expect):
            raise SystemExit(f"n={n}, {label}: the exporter chose {enc!r}, expected {expect}…")
        rows.append({"n": n, "form": label, "encoding": enc,
                     "max_rel": verify_onnx(path, r.model, check, threads=a.threads)["max_rel"]})
        files.append(path)
    for row, path in zip(rows, files):
        row["ort_ops"] = runtime_ops(path, a.threads)
    name = input_name(dense)
    feeds = {1: {name: x.numpy()}, 32: {name: feed32.numpy()}}
    t = time.perf_counter()
    for row, fig in zip(rows, measure_all([(p, feeds) for p in files], a)):
        row.update(figures_row(fig, empty))
    print(f"  n={n}: measured {len(files)} files in {time.perf_counter() - t:.1f} s", file=sys.stderr)
    add_ratios(rows, rows[0])
    for row in rows:
        if row["form"] == TARGET_ROW:
            row["target"] = {"net_mem": row["net_mem_ratio"] <= TARGET["net_mem"],
                             "lat1": row["latency_ratio"][1] <= TARGET["lat1"],
                             "err": row["max_rel"] <= TARGET["err"]}
    if not a.out:
        for p in files:
            p.unlink()
    return rows


# ----------------------------------------------------------------------------- table 2
def structured_api() -> str | None:
    """None if the structured-pruning API is there, else what is missing."""
    missing = [n for n, ok in (("lccompress.StructuredPrune", hasattr(lcc, "StructuredPrune")),
                               ("lccompress.Recipe.structured", hasattr(lcc.Recipe, "structured"))) if not ok]
    return ", ".join(missing) or None


def pruned_table(name: str, make: Callable[[], nn.Module], shape: tuple[int, ...], out: Path,
                 empty: dict[str, Any], a: argparse.Namespace) -> list[dict[str, Any]]:
    torch.manual_seed(a.seed)
    model = randomize_bn_(make()).eval()
    x = torch.randn(1, *shape)
    feed32 = torch.randn(32, *shape)
    check = torch.randn(32, *shape)
    dense, small = out / f"{name}-dense.onnx", out / f"{name}-structured.onnx"
    export_onnx(model, {}, [], x, dense)
    t = time.perf_counter()
    recipe = lcc.Recipe.structured(model, (x,), lcc.StructuredPrune(keep=0.5))
    r = lcc.compress(model, recipe, method="dc")
    print(f"  {name}: DC structured in {time.perf_counter() - t:.1f} s", file=sys.stderr)
    enc = export_onnx(r.model, r.thetas, r.groups, x, small)
    rows = [{"model": name, "form": "dense", "encoding": "dense",
             "max_rel": verify_onnx(dense, model, check, threads=a.threads)["max_rel"]},
            {"model": name, "form": "structured 50 %", "encoding": ", ".join(sorted(set(enc.values()))),
             "groups": len(r.groups), "max_rel": verify_onnx(small, r.model, check, threads=a.threads)["max_rel"]}]
    files = [dense, small]
    for row, path in zip(rows, files):
        row["ort_ops"] = runtime_ops(path, a.threads)
    iname = input_name(dense)
    feeds = {1: {iname: x.numpy()}, 32: {iname: feed32.numpy()}}
    for row, fig in zip(rows, measure_all([(p, feeds) for p in files], a)):
        row.update(figures_row(fig, empty))
    add_ratios(rows, rows[0])
    s = rows[1]
    s["target"] = {"lat32": s["latency_ratio"][32] <= TARGET2["lat32"], "file": s["file_ratio"] <= TARGET2["file"],
                   "net_mem": s["net_mem_ratio"] <= TARGET2["net_mem"]}
    if not a.out:
        for p in files:
            p.unlink()
    return rows


# ----------------------------------------------------------------------------- output
def mib(b: float) -> str:
    return f"{b / MIB:.2f}"


def verdict(t: dict[str, bool] | None) -> str:
    if t is None:
        return ""
    failed = [k for k, ok in t.items() if not ok]
    return "yes" if not failed else "no (" + ", ".join(failed) + ")"


def tables(res: dict[str, Any]) -> str:
    e = res["empty"]
    lines = [f"onnxruntime {res['ort_version']}, {res['threads']} thread(s), latency = "
             f"{'min over ' + str(res['rounds']) + ' rounds of the ' if res['rounds'] > 1 else ''}median of "
             f"{res['repeats']} runs; empty session (one Relu): {mib(e['session_bytes'])} MiB "
             f"(runs: {', '.join(mib(b) for b in e['session_bytes_runs'])}), "
             f"{e['latency_ms'][1] * 1e3:.0f} µs per run. net MiB = raw − empty; ratios use net MiB."]
    if res.get("grid"):
        lines += ["", f"Table 1 — Linear(n, n) + bias, uniform grids with blocks of {GROUP}, DC",
                  "| n | form | encoding | ORT runs | file bytes | file × | session MiB raw | net MiB | net × | "
                  "b=1 ms | b=1 × | b=32 ms | b=32 × | max rel err | target met? |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in res["grid"]:
            lines.append(f"| {r['n']} | {r['form']} | {r['encoding']} | {r['ort_ops']} | {r['file_bytes']:,} | "
                         f"{r['file_ratio']:.3f} | {mib(r['session_bytes'])} | {mib(r['net_session_bytes'])} | "
                         f"{r['net_mem_ratio']:.3f} | {r['latency_ms'][1]:.3f} | {r['latency_ratio'][1]:.2f} | "
                         f"{r['latency_ms'][32]:.3f} | {r['latency_ratio'][32]:.2f} | {r['max_rel']:.1e} | "
                         f"{verdict(r.get('target'))} |")
        lines.append(f"targets (4-bit g32 MatMulNBits): net memory ≤ {TARGET['net_mem']}× dense (net_mem), "
                     f"batch-1 latency ≤ {TARGET['lat1']}× dense (lat1), max rel err ≤ {TARGET['err']:g} (err)")
    if res.get("structured_skipped"):
        lines += ["", f"Table 2 skipped: {res['structured_skipped']}"]
    elif res.get("structured"):
        lines += ["", "Table 2 — structured pruning, keep 50 % of the channels of every prunable group, DC",
                  "| model | form | encoding | ORT runs | file bytes | file × | session MiB raw | net MiB | net × | "
                  "b=1 ms | b=1 × | b=32 ms | b=32 × | max rel err | target met? |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in res["structured"]:
            lines.append(f"| {r['model']} | {r['form']} | {r['encoding']} | {r['ort_ops']} | {r['file_bytes']:,} | "
                         f"{r['file_ratio']:.3f} | {mib(r['session_bytes'])} | {mib(r['net_session_bytes'])} | "
                         f"{r['net_mem_ratio']:.3f} | {r['latency_ms'][1]:.3f} | {r['latency_ratio'][1]:.2f} | "
                         f"{r['latency_ms'][32]:.3f} | {r['latency_ratio'][32]:.2f} | {r['max_rel']:.1e} | "
                         f"{verdict(r.get('target'))} |")
        lines.append(f"targets: batch-32 latency ≤ {TARGET2['lat32']}× dense (lat32), file ≤ {TARGET2['file']}× "
                     f"(file), net session memory ≤ {TARGET2['net_mem']}× (net_mem)")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="n = 1024, 2048 only; 20 timed runs, 1 round")
    ap.add_argument("--sizes", help="comma-separated n for table 1 (default 1024,2048,4096)")
    ap.add_argument("--tables", default="1,2", help="which tables to run (default 1,2)")
    ap.add_argument("--repeats", type=int, default=25, help="timed runs per batch size and round (default 25)")
    ap.add_argument("--warmup", type=int, default=5, help="untimed runs before them (default 5)")
    ap.add_argument("--rounds", type=int, default=2, help="measurements of each file, interleaved (default 2)")
    ap.add_argument("--threads", type=int, default=1, help="torch and onnxruntime intra-op threads (default 1)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", help="keep the exported files here (default: a temporary directory)")
    ap.add_argument("--json", metavar="PATH", help="write the results as JSON")
    a = ap.parse_args()
    sizes = [int(s) for s in a.sizes.split(",")] if a.sizes else [1024, 2048] if a.quick else [1024, 2048, 4096]
    if a.quick:
        a.repeats, a.rounds = 20, 1
    which = {t.strip() for t in a.tables.split(",")}
    torch.set_num_threads(a.threads)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(a.out or tmp)
        os.makedirs(out, exist_ok=True)
        res: dict[str, Any] = {"ort_version": ort.__version__, "torch_version": torch.__version__,
                               "threads": a.threads, "repeats": a.repeats, "warmup": a.warmup,
                               "rounds": a.rounds, "seed": a.seed}
        res["empty"] = empty_session(out, a)
        if "1" in which:
            res["grid"] = [row for n in sizes for row in grid_table(n, out, res["empty"], a)]
        if "2" in which:
            missing = structured_api()
            if missing:
                res["structured_skipped"] = f"not available in this lccompress: {missing}"
            else:
                res["structured"] = (pruned_table("LeNet5", LeNet5, (1, 28, 28), out, res["empty"], a)
                                     + pruned_table("ResCNN", ResCNN, (3, 32, 32), out, res["empty"], a))
    res["wall_s"] = time.perf_counter() - t0
    print(tables(res))
    print(f"\n{res['wall_s']:.0f} s in all")
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
