"""Benchmark B2: LeNet5 on Fashion-MNIST, compressed by DC, DC + fine-tuning and LC, exported to
ONNX; test error measured in onnxruntime on the exported file, and bytes on disk.

    python benchmarks/fashion.py --steps 30       # the README table (tasks can be split with --tasks)
    python benchmarks/fashion.py --quick          # smoke run on a data subset, about 1 min
    python benchmarks/fashion.py --json b2.json   # also write the results as JSON

Data: the IDX files of Debian's dataset-fashion-mnist (apt-get install dataset-fashion-mnist),
gzipped or not, under --data. A second table times a rank-64 1024×1024 linear layer against the
dense one in onnxruntime (one thread, median of --repeats runs).
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import BatchSampler, DataLoader, RandomSampler, SequentialSampler, TensorDataset

import lccompress as lcc
from lccompress.artifact import disk_bytes, export_onnx, save, size_report, verify_onnx
from lccompress.modelio import cross_entropy
from lccompress.train import Guard, train_epochs

DATA = "/usr/share/datasets/fashion-mnist"
LAYERS = ["conv1.weight", "conv2.weight", "fc1.weight", "fc2.weight"]


class LeNet5(nn.Module):
    """conv 1→20 5×5, maxpool 2, conv 20→50 5×5, maxpool 2, fc 800→500, ReLU, fc 500→10 (431k weights)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(1, 20, 5), nn.Conv2d(20, 50, 5)
        self.fc1, self.fc2 = nn.Linear(800, 500), nn.Linear(500, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x (B, 1, 28, 28)
        x = F.max_pool2d(self.conv2(F.max_pool2d(self.conv1(x), 2)), 2)  # (B, 50, 4, 4)
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))


# ----------------------------------------------------------------------------- data
def read_idx(path: Path) -> np.ndarray:
    """An IDX file (gzipped or not): magic 0x0000 08 d (unsigned bytes, d dimensions), sizes, data."""
    raw = (gzip.open if path.suffix == ".gz" else open)(path, "rb").read()
    if raw[:3] != b"\0\0\x08":
        raise ValueError(f"{path} is not an IDX file of unsigned bytes (magic {raw[:4].hex()})")
    d = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(d)]
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * d).reshape(dims)


def find(root: Path, stem: str) -> Path:
    for p in (root / stem, root / f"{stem}.gz"):
        if p.exists():
            return p
    raise SystemExit(f"{stem}[.gz] not found under {root}; install it: apt-get install dataset-fashion-mnist")


def load_data(root: Path, train_size: int, test_size: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Images (N, 1, 28, 28) standardized with the training mean and std, labels (N,) int64."""
    out = {}
    for split, prefix, n in (("train", "train", train_size), ("test", "t10k", test_size)):
        X = torch.from_numpy(read_idx(find(root, f"{prefix}-images-idx3-ubyte")).copy())[:n]
        y = torch.from_numpy(read_idx(find(root, f"{prefix}-labels-idx1-ubyte")).astype(np.int64))[:n]
        out[split] = (X.float().div(255).unsqueeze(1), y)
    mean, std = out["train"][0].mean(), out["train"][0].std()
    return {k: ((X - mean) / std, y) for k, (X, y) in out.items()}


def loader(X: torch.Tensor, y: torch.Tensor, batch: int, epoch_size: int | None = None, shuffle: bool = True) -> DataLoader:
    """Whole batches sliced out of in-memory tensors; an epoch is `epoch_size` random samples."""
    ds = TensorDataset(X, y)
    sampler = RandomSampler(ds, num_samples=epoch_size) if shuffle else SequentialSampler(ds)
    return DataLoader(ds, sampler=BatchSampler(sampler, batch, drop_last=False), batch_size=None)


def train_reference(data: dict, epochs: int, lr: float, seed: int) -> LeNet5:
    """SGD, Nesterov momentum 0.9, batch 128, lr × 0.9 per epoch, from a fixed seed."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LeNet5()
        train_epochs(model, loader(*data["train"], 128), [(list(model.parameters()), lr)], epochs=epochs,
                     loss_fn=cross_entropy, device=torch.device("cpu"), lr_factor=lambda e: 0.9 ** e, guard=Guard())
    return model


# ----------------------------------------------------------------------------- measuring
def session(path: Path) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = 1, 1
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def onnx_error(path: Path, X: torch.Tensor, y: torch.Tensor) -> float:
    """Test error in % of the exported file, run in onnxruntime."""
    sess = session(path)
    name = sess.get_inputs()[0].name
    wrong = sum(int((sess.run(None, {name: X[i:i + 1000].numpy()})[0].argmax(1) != y[i:i + 1000].numpy()).sum())
                for i in range(0, len(X), 1000))
    return 100 * wrong / len(X)


def tasks(alpha: float, model: nn.Module, x: torch.Tensor) -> dict[str, lcc.Recipe]:
    return {
        "prune 5% (global)": lcc.Recipe.single(LAYERS, lcc.Prune(keep=0.05), joint=True),
        "prune 1% (global)": lcc.Recipe.single(LAYERS, lcc.Prune(keep=0.01), joint=True),
        "codebook k=4": lcc.Recipe.single(LAYERS, lcc.Codebook(k=4)),
        "codebook k=2": lcc.Recipe.single(LAYERS, lcc.Codebook(k=2)),
        # conv1 (20×25) and fc2 (10×500) cannot get cheaper by a factorization worth having
        f"rank selection α={alpha:g}": lcc.Recipe.single(["conv2.weight", "fc1.weight"], lcc.RankSelection(alpha=alpha)),
        # what runtimes execute compressed: uniform int grids, whole filters and rows removed
        "uniform int4 g32": lcc.Recipe.single(LAYERS, lcc.Uniform(bits=4, group_size=32)),
        "uniform int2 per-channel": lcc.Recipe.single(LAYERS, lcc.Uniform(bits=2)),
        "structured 50%": lcc.Recipe.structured(model, (x,), lcc.StructuredPrune(keep=0.5)),
    }


def config(a: argparse.Namespace) -> lcc.LCConfig:
    """`steps` L steps of one (sub-sampled) epoch; μ₀ and its growth from the schemes' defaults
    (the growth rescaled to `steps`, so μ ends where the default 40 steps would take it)."""
    return lcc.LCConfig(steps=a.steps, epochs=1, first_epochs=1, lr=a.lr, optimizer=a.optimizer, tail=a.tail)


def run(a: argparse.Namespace, out: Path) -> dict:
    data = load_data(Path(a.data), a.train_size, a.test_size)
    Xte, yte = data["test"]
    t0 = time.perf_counter()
    if a.reference and Path(a.reference).exists():  # a reference trained by an earlier run with the same settings
        ref = LeNet5()
        ref.load_state_dict(torch.load(a.reference, weights_only=True))
    else:
        ref = train_reference(data, a.ref_epochs, a.ref_lr, a.seed)
        if a.reference:
            torch.save(ref.state_dict(), a.reference)
    x = Xte[:2]
    export_onnx(ref, {}, [], x, out / "reference.onnx")
    save(out / "reference.safetensors", ref, {}, [])
    rows = [{"task": "reference", "method": "—", "error": onnx_error(out / "reference.onnx", Xte, yte),
             "onnx_bytes": disk_bytes(out / "reference.onnx"), "container_bytes": disk_bytes(out / "reference.safetensors"),
             "ratio": 1.0, "wall_s": time.perf_counter() - t0}]
    train = loader(*data["train"], 128, epoch_size=min(a.epoch_size, len(data["train"][0])))
    for ti, (task, recipe) in enumerate(tasks(a.alpha, ref, x).items()):
        if a.tasks and not any(t in task for t in a.tasks.split(",")):
            continue
        cfg = config(a)
        for method in ("dc", "finetune", "lc"):
            t = time.perf_counter()
            r = lcc.compress(ref, recipe, {"train": train}, method=method, config=cfg, device="cpu", seed=a.seed)
            wall = time.perf_counter() - t
            f = out / f"t{ti}-{method}"
            export_onnx(r.model, r.thetas, r.groups, x, f.with_suffix(".onnx"))
            save(f.with_suffix(".safetensors"), r.model, r.thetas, r.groups)
            rep = size_report(f.with_suffix(".safetensors"))
            rows.append({"task": task, "method": {"dc": "DC", "finetune": "DC+FT", "lc": "LC"}[method],
                         "error": onnx_error(f.with_suffix(".onnx"), Xte, yte),
                         "onnx_bytes": disk_bytes(f.with_suffix(".onnx")),
                         "container_bytes": rep.file_bytes, "ratio": rep.dense_bits / max(1, rep.theta_bits),
                         "max_rel_diff": verify_onnx(f.with_suffix(".onnx"), r.model, Xte[:256], threads=1)["max_rel"],
                         "summary": {g.name: g.scheme.summary(r.thetas[g.name], g.shape) for g in r.groups},
                         "wall_s": wall})
    return {"threads": torch.get_num_threads(), "seed": a.seed, "train_size": len(data["train"][0]),
            "test_size": len(Xte), "ref_epochs": a.ref_epochs, "steps": a.steps, "epoch_size": a.epoch_size,
            "rows": rows}


def timing(a: argparse.Namespace, out: Path) -> dict:
    """Median latency of a 1024×1024 linear layer, dense vs rank 64 (two MatMuls), in onnxruntime."""
    torch.manual_seed(a.seed)
    model = nn.Sequential(nn.Linear(1024, 1024))
    recipe = lcc.Recipe.single("0.weight", lcc.LowRank(64))
    groups = recipe.groups(model)
    thetas = {"0.weight": groups[0].compress(dict(model.named_parameters()))}
    x = torch.randn(a.batch, 1024)
    export_onnx(model, {}, [], x, out / "dense1024.onnx")
    export_onnx(model, thetas, groups, x, out / "rank64.onnx")
    res = {}
    for name in ("dense1024", "rank64"):
        sess, feed = session(out / f"{name}.onnx"), {"input": x.numpy()}
        for _ in range(5):
            sess.run(None, feed)
        times = []
        for _ in range(a.repeats):
            t = time.perf_counter()
            sess.run(None, feed)
            times.append(time.perf_counter() - t)
        res[name] = {"median_ms": 1000 * statistics.median(times), "bytes": disk_bytes(out / f"{name}.onnx")}
    res["speedup"] = res["dense1024"]["median_ms"] / res["rank64"]["median_ms"]
    res["batch"] = a.batch
    return res


def tables(res: dict) -> str:
    ref = res["rows"][0]
    lines = ["| task | method | ONNX test error (ORT) | ONNX bytes | × smaller | container bytes | θ ratio | wall s |",
             "|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        lines.append(f"| {r['task']} | {r['method']} | {r['error']:.2f} % | {r['onnx_bytes']:,} | "
                     f"{ref['onnx_bytes'] / r['onnx_bytes']:.1f}× | {r['container_bytes']:,} | {r['ratio']:.1f}× | "
                     f"{r['wall_s']:.0f} |")
    t = res.get("timing")
    if t is None:
        return "\n".join(lines)
    lines += ["", f"rank-64 vs dense 1024×1024 linear, onnxruntime 1 thread, batch {t['batch']}, median:",
              "| model | median ms | bytes |", "|---|---|---|"]
    lines += [f"| {k} | {t[k]['median_ms']:.3f} | {t[k]['bytes']:,} |" for k in ("dense1024", "rank64")]
    lines.append(f"speedup {t['speedup']:.1f}×")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=DATA, help=f"directory of the IDX files (default {DATA})")
    ap.add_argument("--quick", action="store_true", help="smoke run: 5k/1k images, 1 epoch, 2 LC steps")
    ap.add_argument("--train-size", type=int, default=60000)
    ap.add_argument("--test-size", type=int, default=10000)
    ap.add_argument("--ref-epochs", type=int, default=8, help="reference training epochs (default 8)")
    ap.add_argument("--ref-lr", type=float, default=0.05, help="reference learning rate (default 0.05)")
    ap.add_argument("--steps", type=int, default=15, help="LC steps; DC+FT trains as many epochs (default 15)")
    ap.add_argument("--epoch-size", type=int, default=15000, help="samples per L-step epoch (default 15000)")
    ap.add_argument("--lr", type=float, default=0.02, help="L-step / fine-tuning learning rate (default 0.02)")
    ap.add_argument("--optimizer", default="sgd", choices=["sgd", "adamw"],
                    help="L-step / fine-tuning optimizer (default sgd, the one the README table was measured with)")
    ap.add_argument("--tail", type=float, default=None,
                    help="LC's tail share (default: the schemes' own; 0 for the README table, measured before the tail)")
    ap.add_argument("--alpha", type=float, default=1e-5, help="rank selection α (default 1e-5)")
    ap.add_argument("--batch", type=int, default=32, help="batch of the timing table (default 32)")
    ap.add_argument("--repeats", type=int, default=50, help="timed runs per model (default 50)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--reference", metavar="PATH",
                    help="load the reference from PATH if it exists, else train it and save it there")
    ap.add_argument("--tasks", help="only tasks whose name contains one of these comma-separated words")
    ap.add_argument("--no-timing", action="store_true", help="skip the rank-64 timing table")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", help="keep the exported files here (default: a temporary directory)")
    ap.add_argument("--json", metavar="PATH", help="write the results as JSON")
    a = ap.parse_args()
    if a.quick:
        a.train_size, a.test_size, a.ref_epochs, a.steps, a.epoch_size = 5000, 1000, 1, 2, 2000
    torch.set_num_threads(a.threads)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(a.out or tmp)
        os.makedirs(out, exist_ok=True)
        res = run(a, out)
        if not a.no_timing:
            res["timing"] = timing(a, out)
    print(f"B2 LeNet5 / Fashion-MNIST, {res['train_size']} train / {res['test_size']} test images, "
          f"{a.steps} L steps × {a.epoch_size} samples, {a.threads} thread(s)")
    print(tables(res))
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
