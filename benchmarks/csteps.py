"""Benchmark of the C steps: time, distortion and peak memory of each scheme's compress() against
a reference torch op on the same tensor, then DC of a BERT-base-shaped checkpoint through the CLI.

    python benchmarks/csteps.py                                # full sizes, 1 thread, CPU
    python benchmarks/csteps.py --sizes small                  # smoke test, under a minute
    python benchmarks/csteps.py --threads 1 --device cpu --json csteps.json
    python benchmarks/csteps.py --tables 1                     # the C steps only, not the CLI

Table 1, one row per (C step, size). Every row also runs a reference op on the same tensor in
the same process: torch.sort for codebooks, torch.topk(|x|, κ) for pruning and
torch.svd_lowrank(W, q=32, niter=2) for low rank and rank selection.

- Data. Flat float32 tensors of 1M, 16M, 64M (2^20, 2^24, 2^26) elements, w = 0.02·z·exp(0.5·s)
  with z, s ~ N(0, 1): a Gaussian scale mixture, heavier-tailed than a Gaussian like trained
  weights. Square d×d matrices (d = 512, 2048, 4096) W = U diag(σ) Vᵀ + (0.1/d)·G, U, V random
  orthogonal (QR of Gaussians), σᵢ = i^-0.5, G ~ N(0, 1): a slowly decaying spectrum with a
  noise floor. Everything from fixed torch.Generator seeds.
- Codebooks: k = 2, 16, 256 from a cold start, and k = 16 warm-started as LC's C steps are: θ of
  the cold k = 16 run on w, then w + 0.01·std(w)·N(0, 1) compressed with init=θ.
- Time: median of 3 runs up to 16M elements / 2048², 1 run above; the ratio is C step / reference.
- Distortion vs best: the C step's ‖w − Δ(θ)‖² over the best reference distortion at hand:
  plain Lloyd for codebooks (sorted data, prefix sums, until the partition stops changing,
  ≤ 300 iterations), the better of two inits: evenly spaced quantiles, and evenly spaced levels of
  ∫p^(1/3) (the high-rate optimum; at k = 256 on these tails Lloyd from quantiles is still 8× off
  after 300 iterations, from ∫p^(1/3) about 1.1× off the exact 1-D optimum); the exact top-κ for pruning (1 by construction); for low rank the exact
  truncated SVD at every size, ‖W‖² − Σ_{i≤r} σᵢ² from torch.linalg.svdvals (17 s at 4096² on one
  thread; torch.svd_lowrank(W, q=42, niter=4) would be 1.0007–1.0013× off, too coarse for the
  1e-3 goal). Rank selection minimises α·r·(m + n) + μ/2·‖W − Δ‖², so its column compares that
  objective to its minimum over r on the same reference spectrum; α is set so that the planted
  spectrum selects rank 32.
- Peak extra memory: (peak RSS during the call − RSS just before) / bytes of the input tensor.
  A background thread samples /proc/self/statm about every millisecond, and where the kernel
  allows it the exact high-water mark is also read (VmHWM, reset through /proc/self/clear_refs);
  the larger of the two is taken. With --device cuda: torch.cuda.max_memory_allocated instead.
  Median over the runs, like the time.

Table 2, DC of a BERT-base-shaped state_dict (109.5M parameters, weights 0.02·z·exp(0.5·s)) saved
with torch.save and compressed by `lccompress quantize|prune|lowrank` run in-process with click's
CliRunner, without --model or --data (so the method is DC). The reference is torch.sort over every
tensor the CLI compresses (each ≥ 2-D `*.weight`), summed. `--sizes small` uses a 2-layer model,
hidden 512, intermediate 2048, vocab 8000 (11M parameters).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from click.testing import CliRunner

import lccompress
from lccompress.cli import main as cli

RANK = 32  # low rank and the reference svd_lowrank
KEEP = 0.1  # pruning
CODEBOOK_KS = (2, 16, 256)
WARM_K = 16
WARM_NOISE = 0.01  # × std(w): how far w moves between two C steps
RS_MU = 1e-2  # μ of the rank-selection C step
LLOYD_MAX_ITER = 300


@dataclass(frozen=True)
class BertShape:
    layers: int
    vocab: int
    hidden: int
    intermediate: int
    positions: int = 512
    token_types: int = 2


SIZES: dict[str, dict[str, Any]] = {
    "small": {"flat": [2**20], "square": [512], "bert": BertShape(2, 8000, 512, 2048)},
    "full": {"flat": [2**20, 2**24, 2**26], "square": [512, 2048, 4096], "bert": BertShape(12, 30522, 768, 3072)},
}
# median of 3 runs up to these sizes, 1 run above
REPEAT_FLAT_UP_TO = 2**24  # elements
REPEAT_SQUARE_UP_TO = 2048  # d of d×d


# ----------------------------------------------------------------------------- data
def heavy_tailed(n: int, gen: torch.Generator, scale: float = 0.02) -> torch.Tensor:
    """(n,) float32, scale·z·exp(0.5·s) with z, s ~ N(0, 1)."""
    z = torch.randn(n, generator=gen)
    s = torch.randn(n, generator=gen)
    return z.mul_(s.mul_(0.5).exp_()).mul_(scale)


def decaying_matrix(d: int, gen: torch.Generator) -> torch.Tensor:
    """(d, d) float32, U diag(σ) Vᵀ + (0.1/d)·G with σᵢ = i^-0.5, U, V random orthogonal."""
    U = torch.linalg.qr(torch.randn(d, d, generator=gen)).Q
    V = torch.linalg.qr(torch.randn(d, d, generator=gen)).Q
    sigma = torch.arange(1, d + 1, dtype=torch.float32) ** -0.5
    return (U * sigma) @ V.T + (0.1 / d) * torch.randn(d, d, generator=gen)


def bert_state_dict(shape: BertShape, seed: int) -> dict[str, torch.Tensor]:
    """A state_dict with the names and shapes of Hugging Face's BertModel, random weights."""
    gen = torch.Generator().manual_seed(seed)
    h, i = shape.hidden, shape.intermediate

    def weight(*dims: int) -> torch.Tensor:
        return heavy_tailed(int(torch.Size(dims).numel()), gen).reshape(dims)

    def layer_norm(prefix: str) -> dict[str, torch.Tensor]:
        return {f"{prefix}.weight": 1 + 0.05 * torch.randn(h, generator=gen),
                f"{prefix}.bias": 0.02 * torch.randn(h, generator=gen)}

    def dense(prefix: str, out: int, inp: int) -> dict[str, torch.Tensor]:
        return {f"{prefix}.weight": weight(out, inp), f"{prefix}.bias": 0.02 * torch.randn(out, generator=gen)}

    sd = {"embeddings.word_embeddings.weight": weight(shape.vocab, h),
          "embeddings.position_embeddings.weight": weight(shape.positions, h),
          "embeddings.token_type_embeddings.weight": weight(shape.token_types, h),
          **layer_norm("embeddings.LayerNorm")}
    for n in range(shape.layers):
        p = f"encoder.layer.{n}"
        for part in ("query", "key", "value"):
            sd |= dense(f"{p}.attention.self.{part}", h, h)
        sd |= dense(f"{p}.attention.output.dense", h, h) | layer_norm(f"{p}.attention.output.LayerNorm")
        sd |= dense(f"{p}.intermediate.dense", i, h)
        sd |= dense(f"{p}.output.dense", h, i) | layer_norm(f"{p}.output.LayerNorm")
    return sd | dense("pooler.dense", h, h)


# ----------------------------------------------------------------------------- measuring
PAGE = os.sysconf("SC_PAGE_SIZE")
_MALLOC_TRIM = getattr(ctypes.CDLL(None), "malloc_trim", None)  # glibc: give freed heap pages back


def rss_bytes() -> int:
    with open("/proc/self/statm", "rb", buffering=0) as f:
        return int(f.read().split()[1]) * PAGE


def hwm_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def reset_hwm() -> bool:
    """Reset the kernel's peak-RSS counter to the current RSS; False where that is not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class PeakMemory:
    """Context manager: `extra` = peak memory during the block − memory just before it, in bytes."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.extra = 0

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.before = torch.cuda.memory_allocated(self.device)
            return self
        self.before = self.peak = rss_bytes()
        self.exact = reset_hwm()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            self._stop.wait(0.001)

    def __exit__(self, *exc: Any) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.extra = torch.cuda.max_memory_allocated(self.device) - self.before
            return
        self._stop.set()
        self._thread.join()
        peak = max(self.peak, rss_bytes(), hwm_bytes() if self.exact else 0)
        self.extra = max(0, peak - self.before)


def settle(device: torch.device) -> None:
    """Free what can be freed, so that the RSS before a call is not inflated by garbage."""
    gc.collect()
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(fn: Callable[[], Any], repeats: int, device: torch.device) -> tuple[Any, float, int]:
    """Run fn `repeats` times: (its last result, median seconds, median peak extra bytes)."""
    times, extras, out = [], [], None
    for _ in range(repeats):
        out = None  # drop the previous result before measuring the next call
        settle(device)
        with PeakMemory(device) as mem:
            t0 = time.perf_counter()
            out = fn()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - t0)
        extras.append(mem.extra)
    return out, statistics.median(times), int(statistics.median(extras))


def distortion(w: torch.Tensor, delta: torch.Tensor) -> float:
    """‖w − Δ‖² in float64."""
    return float(((w.double() - delta.reshape(w.shape).double()) ** 2).sum())


# ----------------------------------------------------------------------------- references
def lloyd(xs: torch.Tensor, s1: torch.Tensor, c: torch.Tensor, max_iter: int = LLOYD_MAX_ITER) -> torch.Tensor:
    """Plain Lloyd in 1-D on sorted float64 data xs (n,) with prefix sums s1 (n+1,), from centroids c.

    Each cluster is a run of xs cut at the midpoints of the centroids, and its mean comes from
    the prefix sums, so an iteration costs O(k log n). Stops when the cuts repeat.
    """
    ends = torch.tensor([0, xs.numel()], device=xs.device)
    cuts = None
    for _ in range(max_iter):
        c = torch.sort(c).values
        new = torch.cat([ends[:1], torch.searchsorted(xs, (c[:-1] + c[1:]) / 2), ends[1:]])  # (k+1,)
        if cuts is not None and torch.equal(new, cuts):
            break
        cuts = new
        count = cuts[1:] - cuts[:-1]
        c = torch.where(count > 0, (s1[cuts[1:]] - s1[cuts[:-1]]) / count.clamp(min=1), c)
    return torch.sort(c).values


def quantile_init(xs: torch.Tensor, k: int) -> torch.Tensor:
    """k centroids at evenly spaced quantiles of the sorted data."""
    n = xs.numel()
    return xs[((torch.arange(k, dtype=torch.float64, device=xs.device) + 0.5) * n / k).long()]


def companded_init(xs: torch.Tensor, k: int, bins: int = 4096) -> torch.Tensor:
    """k centroids at evenly spaced levels of ∫p^(1/3), the high-rate optimal spacing (Panter–Dite),
    with the density p estimated on `bins` equal-mass bins. Far better than quantiles at large k
    on heavy tails, where Lloyd from quantiles moves very slowly."""
    edges = xs[torch.linspace(0, xs.numel() - 1, bins + 1, dtype=torch.float64, device=xs.device).long()]  # (bins+1,)
    width = (edges[1:] - edges[:-1]).clamp(min=1e-30)
    mass = torch.cat([width.new_zeros(1), torch.cumsum((1 / bins / width) ** (1 / 3) * width, 0)])
    mass = mass / mass[-1]
    levels = (torch.arange(k, dtype=torch.float64, device=xs.device) + 0.5) / k
    j = torch.searchsorted(mass, levels).clamp(1, bins)  # bin of each level
    frac = (levels - mass[j - 1]) / (mass[j] - mass[j - 1]).clamp(min=1e-30)
    return edges[j - 1] + frac * (edges[j] - edges[j - 1])


def lloyd_distortion(x: torch.Tensor, k: int) -> float:
    """Lowest ‖x − Δ‖² of plain Lloyd (≤ 300 iterations) from quantile and from companded init,
    each codebook cast to x's dtype and applied by nearest entry like a C step's."""
    xs = torch.sort(x.reshape(-1)).values.double()  # (n,)
    s1 = torch.cat([xs.new_zeros(1), torch.cumsum(xs, 0)])  # (n+1,)
    return min(distortion(x, nearest(x, lloyd(xs, s1, init(xs, k)).to(x.dtype)))
               for init in (quantile_init, companded_init))


def nearest(x: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Δ: each element of x replaced by its nearest entry of a sorted codebook."""
    mid = (codebook[:-1] + codebook[1:]) / 2
    return codebook[torch.bucketize(x, mid)]


def svd_errors(W: torch.Tensor, S: torch.Tensor) -> torch.Tensor:
    """(len(S)+1,) float64: ‖W − W_r‖² = ‖W‖² − Σ_{i≤r} σᵢ² for r = 0..len(S), W_r the best rank-r
    approximation, from the singular values S of W."""
    kept = torch.cat([S.new_zeros(1, dtype=torch.float64), torch.cumsum(S.double() ** 2, 0)])
    return ((W.double() ** 2).sum() - kept).clamp(min=0)


# ----------------------------------------------------------------------------- table 1
@dataclass
class Row:
    """One row of table 1; memory as a multiple of the input tensor's bytes."""

    step: str
    size: str
    seconds: float
    reference: str
    reference_seconds: float
    distortion_vs_best: float
    best: str  # what the distortion is compared to
    peak_extra: float  # × input bytes
    reference_peak_extra: float

    @property
    def ratio(self) -> float:
        return self.seconds / self.reference_seconds

    def markdown(self) -> str:
        return (f"| {self.step} | {self.size} | {fmt_s(self.seconds)} | {self.reference} | "
                f"{fmt_s(self.reference_seconds)} | {self.ratio:.2f} | {self.distortion_vs_best:.4f} ({self.best}) | "
                f"{self.peak_extra:.2f} |")


def fmt_s(t: float) -> str:
    return f"{t:.4f}" if t < 1 else f"{t:.2f}"


def flat_label(n: int) -> str:
    return f"{n >> 20}M" if n % 2**20 == 0 else f"{n:,}"


class CStepBench:
    """Table 1: builds the tensors of one size, measures the C steps and their references on them."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.rows: list[Row] = []

    def add(self, row: Row) -> None:
        self.rows.append(row)
        print(f"  {row.step} {row.size}: {fmt_s(row.seconds)} s, {row.ratio:.2f}× {row.reference}, "
              f"distortion {row.distortion_vs_best:.4f}× {row.best}, {row.peak_extra:.2f}× memory",
              file=sys.stderr, flush=True)

    # -- flat tensors: codebooks and pruning
    def flat(self, n: int) -> None:
        label, dev = flat_label(n), self.device
        w = heavy_tailed(n, torch.Generator().manual_seed(0)).to(dev)
        nbytes, repeats = w.numel() * w.element_size(), 3 if n <= REPEAT_FLAT_UP_TO else 1
        run = lambda fn: measure(fn, repeats, dev)  # noqa: E731
        _, sort_s, sort_mem = run(lambda: torch.sort(w))
        for k in CODEBOOK_KS:
            scheme = lccompress.Codebook(k=k)
            theta, t, mem = run(lambda: scheme.compress(w))
            best = lloyd_distortion(w, k)
            self.add(Row(f"codebook k={k} cold", label, t, "sort", sort_s,
                         distortion(w, scheme.decompress(theta, w.shape)) / best, "Lloyd", mem / nbytes,
                         sort_mem / nbytes))
            if k == WARM_K:
                self.warm(w, scheme, theta, label, repeats)

        kappa = max(1, round(KEEP * n))
        prune = lccompress.Prune(keep=KEEP)
        top, ref_s, ref_mem = run(lambda: torch.topk(w.abs(), kappa))
        best = distortion(w, torch.zeros_like(w).scatter_(0, top.indices, w[top.indices]))
        theta, t, mem = run(lambda: prune.compress(w))
        self.add(Row(f"prune keep={KEEP}", label, t, "topk(|x|, κ)", ref_s,
                     distortion(w, prune.decompress(theta, w.shape)) / best, "top-κ", mem / nbytes,
                     ref_mem / nbytes))

    def warm(self, w: torch.Tensor, scheme: lccompress.Codebook, theta: dict, label: str, repeats: int) -> None:
        gen = torch.Generator().manual_seed(1)
        w2 = w + (WARM_NOISE * w.std()) * torch.randn(w.shape, generator=gen).to(w.device)
        nbytes = w2.numel() * w2.element_size()
        _, sort_s, sort_mem = measure(lambda: torch.sort(w2), repeats, self.device)
        theta2, t, mem = measure(lambda: scheme.compress(w2, init=theta), repeats, self.device)
        best = lloyd_distortion(w2, scheme.k)
        self.add(Row(f"codebook k={scheme.k} warm", label, t, "sort", sort_s,
                     distortion(w2, scheme.decompress(theta2, w2.shape)) / best, "Lloyd", mem / nbytes,
                     sort_mem / nbytes))

    # -- matrices: low rank and rank selection
    def square(self, d: int) -> None:
        label, dev = f"{d}²", self.device
        W = decaying_matrix(d, torch.Generator().manual_seed(2)).to(dev)
        nbytes, repeats = W.numel() * W.element_size(), 3 if d <= REPEAT_SQUARE_UP_TO else 1
        run = lambda fn: measure(fn, repeats, dev)  # noqa: E731
        _, ref_s, ref_mem = run(lambda: torch.svd_lowrank(W, q=RANK, niter=2))
        errors = svd_errors(W, torch.linalg.svdvals(W))  # the optimum at every rank (17 s at 4096², 1 thread)
        ref = f"svd_lowrank q={RANK} niter=2"

        lowrank = lccompress.LowRank(rank=RANK)
        theta, t, mem = run(lambda: lowrank.compress(W))
        self.add(Row(f"low rank r={RANK}", label, t, ref, ref_s,
                     distortion(W, lowrank.decompress(theta, W.shape)) / float(errors[RANK]), "SVD",
                     mem / nbytes, ref_mem / nbytes))

        per_rank = 2 * d  # storage of one rank, m + n
        alpha = RS_MU / (2 * per_rank) / (RANK + 0.5)  # keeps σᵢ² = 1/i while i < RANK + 0.5
        select = lccompress.RankSelection(alpha=alpha)
        theta, t, mem = run(lambda: select.compress(W, mu=RS_MU))
        r = theta["U"].shape[1]
        objective = alpha * per_rank * r + RS_MU / 2 * distortion(W, select.decompress(theta, W.shape))
        ranks = torch.arange(errors.numel(), dtype=torch.float64, device=errors.device)
        best = float((alpha * per_rank * ranks + RS_MU / 2 * errors).min())
        self.add(Row(f"rank selection (r={r})", label, t, ref, ref_s, objective / best, "SVD, objective",
                     mem / nbytes, ref_mem / nbytes))


# ----------------------------------------------------------------------------- table 2
CLI_COMMANDS = [
    ["quantize", "--codebook", "16"],
    ["quantize", "--codebook", "256"],
    ["prune", "--keep", "0.1"],
    ["lowrank", "--rank", "64", "--exclude", "embeddings.token_type_embeddings.weight"],  # 2×768: no rank-64 saving, refused
]


def cli_table(shape: BertShape, device: torch.device) -> dict[str, Any]:
    sd = bert_state_dict(shape, seed=3)
    params = sum(t.numel() for t in sd.values())
    targets = [t for name, t in sd.items() if name.endswith("weight") and t.dim() >= 2]  # what the CLI compresses
    print(f"  BERT-shaped state_dict: {params / 1e6:.1f}M parameters, {len(targets)} weights compressed",
          file=sys.stderr, flush=True)
    sort_s = 0.0
    for t in targets:
        t = t.to(device)
        sort_s += measure(lambda: torch.sort(t.reshape(-1)), 1, device)[1]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / "ckpt.pt"
        torch.save(sd, ckpt)
        del sd, targets
        for i, args in enumerate(CLI_COMMANDS):
            out = Path(tmp) / f"out{i}.safetensors"
            settle(device)
            t0 = time.perf_counter()
            res = CliRunner().invoke(cli, [args[0], str(ckpt), *args[1:], "-o", str(out), "--device", device.type])
            wall = time.perf_counter() - t0
            ok = res.exit_code == 0 and out.exists()
            if not ok:
                print(f"  FAILED (exit {res.exit_code}): {' '.join(args)}\n{res.output[-2000:]}", file=sys.stderr)
            rows.append({"command": " ".join(args), "wall_s": wall, "sort_s": sort_s, "ok": ok,
                         "artifact_bytes": out.stat().st_size if out.exists() else None,
                         "dense_bytes": ckpt.stat().st_size})
            print(f"  {' '.join(args)}: {wall:.2f} s, {wall / sort_s:.2f}× sort, ok={ok}", file=sys.stderr, flush=True)
    return {"params": params, "rows": rows}


# ----------------------------------------------------------------------------- output
def machine(threads: int, device: torch.device) -> dict[str, Any]:
    if device.type == "cuda":
        hw = torch.cuda.get_device_name(device)
    else:
        cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
        models = [ln.split(":", 1)[1].strip() for ln in cpuinfo if ln.startswith("model name")]
        hw = f"{models[0] if models else platform.processor()}, {os.cpu_count()} logical CPUs"
    try:
        commit = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True, text=True,
                                cwd=Path(__file__).parent, timeout=10).stdout.strip() or None
    except OSError:
        commit = None
    return {"torch": torch.__version__, "threads": threads, "device": str(device), "hardware": hw,
            "python": platform.python_version(), "lccompress": lccompress.__version__, "commit": commit}


def print_csteps(rows: list[Row]) -> None:
    order = [f"codebook k={k} cold" for k in CODEBOOK_KS] + [f"codebook k={WARM_K} warm", f"prune keep={KEEP}",
                                                               f"low rank r={RANK}", "rank selection"]
    rows = sorted(rows, key=lambda r: next(i for i, s in enumerate(order) if r.step.startswith(s)))
    print("\n## C steps\n")
    print("| C step | size | time s | reference | reference s | ratio | distortion vs best | peak extra memory (× tensor) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(r.markdown())
    print(f"\nGoals: codebook cold ≤ 1.5× sort, warm ≤ 0.6× sort; low rank ≤ 2× svd_lowrank with error "
          f"≤ (1 + 1e-3)× optimal; peak extra memory ≤ 3× the tensor. Distortion vs best < 1 means better than "
          f"the reference (Lloyd for codebooks). Rank selection: α·r·(m + n) + μ/2·‖W − Δ‖² over its minimum, "
          f"μ = {RS_MU}. Time: median of 3 runs up to 16M elements / 2048², else 1 run.")
    refs: dict[str, list[float]] = {}
    for r in rows:
        refs.setdefault(r.reference, []).append(r.reference_peak_extra)
    print("Peak extra memory of the references themselves (× tensor): "
          + ", ".join(f"{name} {min(v):.2f}–{max(v):.2f}" for name, v in refs.items()) + ".")


def print_cli(rows: list[dict[str, Any]], shape: BertShape, params: int) -> None:
    print(f"\n## DC of a {params / 1e6:.1f}M-parameter checkpoint through the CLI\n")
    print(f"BERT-shaped: {shape.layers} layers, hidden {shape.hidden}, intermediate {shape.intermediate}, "
          f"vocab {shape.vocab}; `lccompress COMMAND ckpt.pt ... -o out.safetensors` (DC, no --model/--data).\n")
    print("| command | wall s | sort all weights once s | ratio | artifact bytes | dense bytes |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        size = f"{r['artifact_bytes']:,}" if r["ok"] else "FAILED"
        print(f"| {r['command']} | {r['wall_s']:.2f} | {r['sort_s']:.2f} | {r['wall_s'] / r['sort_s']:.2f} | "
              f"{size} | {r['dense_bytes']:,} |")
    print("\nGoal: wall ≤ 2× one sort of all the compressed weights (reading and writing the files included).")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", choices=list(SIZES), default="full")
    ap.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--tables", default="1,2", help="which tables to run: 1 (C steps), 2 (CLI) or 1,2")
    ap.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    a = ap.parse_args()
    sys.stdout.reconfigure(line_buffering=True)  # keep the tables in order with the progress on stderr
    t_start = time.perf_counter()
    torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    sizes, tables = SIZES[a.sizes], a.tables.split(",")
    info = machine(a.threads, device)
    print(f"torch {info['torch']}, {a.threads} thread(s), device {info['device']} ({info['hardware']}), "
          f"Python {info['python']}, lccompress {info['lccompress']} @ {info['commit']}, sizes {a.sizes}")
    results: dict[str, Any] = {"machine": info, "sizes": a.sizes}

    if "1" in tables:
        bench = CStepBench(device)
        for n in sizes["flat"]:
            bench.flat(n)
        for d in sizes["square"]:
            bench.square(d)
        print_csteps(bench.rows)
        results["csteps"] = [{**vars(r), "ratio": r.ratio} for r in bench.rows]
    failed = False
    if "2" in tables:
        shape: BertShape = sizes["bert"]
        results["cli"] = cli_table(shape, device)
        print_cli(results["cli"]["rows"], shape, results["cli"]["params"])
        failed = not all(r["ok"] for r in results["cli"]["rows"])

    results["total_s"] = time.perf_counter() - t_start
    print(f"\nTotal wall time: {results['total_s']:.1f} s")
    if a.json:
        Path(a.json).write_text(json.dumps(results))
    if failed:
        raise SystemExit("some CLI commands failed (see above)")


if __name__ == "__main__":
    main()
