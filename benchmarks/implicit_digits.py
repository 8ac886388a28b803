"""Sparse implicit networks on the digits, and the IST Austria methods on B1.

    python benchmarks/implicit_digits.py --part implicit   # the README's implicit table
    python benchmarks/implicit_digits.py --part b1         # AC/DC and CrAM against LC and SFW on B1
    python benchmarks/implicit_digits.py --json out.json

Part "implicit". A dense ImplicitNet(64, 100, 10) (x = relu(A x + B u), ŷ = C x + D u + b) is
trained on scikit-learn's digits by the benchmark (AdamW lr 1e-3, batch 64, 30 epochs, every row
of A projected back onto the ℓ1 ball of radius κ = 0.9 after each step, so ‖A‖∞ ≤ 0.9). Then A and
B are made sparse at 10 % and 5 % of their weights: A by SparseRowL1Ball(0.9, keep, per_row=False)
(at most keep·n² non-zeros, every row ℓ1 norm ≤ 0.9: well-posed by construction), B by
Prune(keep); C, D and the bias stay dense. Methods:
    DC            the exact projection of the dense weights (no training);
    LC            from the dense model, LC's default schedule, B1's budget (40 L steps, 205 epochs);
    fw-grow       A and B from zero by Frank-Wolfe on the distillation loss against the dense model,
                  inside the same sets (row ℓ1 balls ∩ sparsity for A, a box ∩ sparsity for B);
    fw-grow task  the same from a freshly initialised model on the labels, no teacher.
Against: an MLP 64-H-10 trained the reference's way, H chosen so that its weights are as many as
the sparse implicit model's non-zeros (A, B kept, C, D whole).

Part "b1". B1's MLP 64-300-100-10 (60 epochs of SGD, seeds 3, 4, 5), one global ℓ0 constraint
over its three weights. At keep 5 %: LC, AC/DC (4 cycles), CrAM⁺ (ρ 0.05) then one-shot, and SFW
then one-shot, every method at LC's budget in optimizer steps. Across multilevel levels (keep 50,
20, 10, 5 %): one file from the reference as is, from SFW, and from CrAM⁺ cycling through the
levels (SGD lr 0.01, `cram.MULTILEVEL_DEFAULTS`; one dense model each), against LC and AC/DC run
separately per level.

Test error in %, one thread; means over the seeds (implicit: 0, 1, 2; B1: 3, 4, 5).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

import lccompress as lcc  # noqa: E402
from lccompress import digits, fw  # noqa: E402
from lccompress.artifact.multilevel import build_levels, extract, save_multilevel  # noqa: E402
from lccompress.cram import MULTILEVEL_DEFAULTS, cram_refine  # noqa: E402
from lccompress.implicit import ImplicitNet  # noqa: E402
from lccompress.train import accuracy, evaluate  # noqa: E402

KAPPA = 0.9


def error(model: nn.Module, loader: Any) -> float:
    model.eval()
    value, _, _ = evaluate(model, loader, torch.device("cpu"), accuracy)
    return 100 * (1 - value)


def train_dense(model: nn.Module, data: dict[str, Any], epochs: int, project: bool) -> nn.Module:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    for _ in range(epochs):
        model.train()
        for x, y in data["train"]:
            loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            if project:
                model.project_(KAPPA)
    return model


def implicit_recipe(keep: float) -> lcc.Recipe:
    return lcc.Recipe((lcc.Rule(("A",), lcc.SparseRowL1Ball(KAPPA, keep=keep, per_row=False)),
                       lcc.Rule(("B",), lcc.Prune(keep=keep))))


def describe(model: ImplicitNet, data: dict[str, Any]) -> dict[str, Any]:
    u = next(iter(data["eval"]))[0]
    return {"error": error(model, data["eval"]), "nnz_A": int((model.A != 0).sum()), "nnz_B": int((model.B != 0).sum()),
            "norm_inf": model.well_posedness(), "residual": model.residual(u)}


def part_implicit(seed: int, keeps: list[float], epochs: int) -> list[dict[str, Any]]:
    data = digits.loaders(seed)
    rows: list[dict[str, Any]] = []
    torch.manual_seed(seed)
    t = time.perf_counter()
    dense = train_dense(ImplicitNet(64, 100, 10), data, epochs, project=True)
    rows.append({"model": "implicit 64-100-10", "method": "dense", "keep": 1.0, **describe(dense, data),
                 "seconds": time.perf_counter() - t})
    print(json.dumps(rows[-1]), flush=True)
    cfg = lcc.LCConfig(steps=40, epochs=5, first_epochs=10)
    for keep in keeps:
        recipe = implicit_recipe(keep)
        for method in ("dc", "lc", "fw-grow", "fw-grow task"):
            t = time.perf_counter()
            if method == "fw-grow task":  # from a fresh model on the labels: no teacher
                torch.manual_seed(seed + 1)
                fresh = ImplicitNet(64, 100, 10)
                sets = [fw.GrowSet(("A",), round(keep * 100 * 100), kappa=KAPPA),
                        fw.GrowSet(("B",), round(keep * 100 * 64))]
                grown = fw.fw_grow(fresh, None, data, sets=sets, device="cpu", seed=seed, **fw.GROW_DEFAULTS)
                model = lcc.compress(grown, recipe, method="dc", device="cpu").model
            else:
                model = lcc.compress(dense, recipe, data, method=method, config=cfg, device="cpu", seed=seed).model
            rows.append({"model": "implicit 64-100-10", "method": method, "keep": keep, **describe(model, data),
                         "seconds": time.perf_counter() - t})
            print(json.dumps(rows[-1]), flush=True)
        nnz = round(keep * 100 * 100) + round(keep * 100 * 64) + 10 * 100 + 10 * 64  # the budget; C, D dense
        hidden = max(1, round(nnz / (64 + 10)))
        torch.manual_seed(seed)
        t = time.perf_counter()
        mlp = train_dense(nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, 10)), data, epochs,
                          project=False)
        rows.append({"model": f"MLP 64-{hidden}-10", "method": "dense", "keep": keep, "error": error(mlp, data["eval"]),
                     "weights": 74 * hidden, "seconds": time.perf_counter() - t})
        print(json.dumps(rows[-1]), flush=True)
    return rows


B1_NAMES = ["fc1.weight", "fc2.weight", "fc3.weight"]
LEVELS = [0.5, 0.2, 0.1, 0.05]


def part_b1(seeds: list[int]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    cfg = lcc.LCConfig(steps=40, epochs=5, first_epochs=10)
    for seed in seeds:
        data = digits.loaders(seed)
        ref = digits.train_reference(seed, data=data)
        budget = sum(cfg.plan(len(data["train"])))
        sfw_epochs = round(budget / len(data["train"]))

        def add(**row: Any) -> None:
            rows.append({"seed": seed, **row})
            print(json.dumps(rows[-1]), flush=True)

        add(method="reference", keep=1.0, error=error(ref, data["eval"]), seconds=0.0)
        for keep in LEVELS:  # the single-level methods, per level
            recipe = lcc.Recipe.single(B1_NAMES, lcc.Prune(keep=keep), joint=True)
            for method in ("lc", "acdc", "cram", "sfw") if keep == 0.05 else ("lc", "acdc"):
                t = time.perf_counter()
                r = lcc.compress(ref, recipe, data, method=method, config=cfg, device="cpu", seed=seed,
                                 sfw={"epochs": sfw_epochs})
                add(method=method, keep=keep, error=error(r.model, data["eval"]), seconds=time.perf_counter() - t)
        for method in ("multilevel", "multilevel sfw", "multilevel cram"):  # one dense model, every level
            t = time.perf_counter()
            if method == "multilevel sfw":
                subject = fw.sfw_refine(ref, data, {tuple(B1_NAMES): fw.KSparsePolytope(k=min(LEVELS))}, seed=seed,
                                        device="cpu", **{**fw.SFW_DEFAULTS, "epochs": sfw_epochs})
            elif method == "multilevel cram":
                recipes = [lcc.Recipe.single(B1_NAMES, lcc.Prune(keep=k), joint=True) for k in LEVELS]
                subject = cram_refine(ref, data, recipes, iterations=budget, seed=seed, device="cpu",
                                      **MULTILEVEL_DEFAULTS)
            else:
                subject = ref
            seconds = time.perf_counter() - t
            with tempfile.TemporaryDirectory() as d:
                path = Path(d) / "multi.safetensors"
                save_multilevel(path, subject, build_levels(subject, B1_NAMES, LEVELS))
                for j, keep in enumerate(LEVELS, start=1):
                    m = digits.MLP()
                    m.load_state_dict(extract(path, j))
                    add(method=method, keep=keep, error=error(m, data["eval"]), seconds=seconds)
    return rows


def mean(v: list[float]) -> float:
    return statistics.fmean(v) if v else math.nan


def implicit_table(rows: list[dict[str, Any]]) -> str:
    """Means over the seeds; ‖A‖∞ and the residual are the largest over the seeds."""
    out = ["| model | method | keep A, B | test error % | nnz A | nnz B | ‖A‖∞ | residual | wall s |",
           "|---|---|---|---|---|---|---|---|---|"]
    keys: list[tuple[str, str, float]] = []
    for r in rows:
        if (r["model"], r["method"], r["keep"]) not in keys:
            keys.append((r["model"], r["method"], r["keep"]))
    for model, method, keep in keys:
        rs = [r for r in rows if (r["model"], r["method"], r["keep"]) == (model, method, keep)]
        m = {k: mean([r[k] for r in rs]) for k in ("error", "seconds")}
        if model.startswith("MLP"):
            out.append(f"| {model} (dense, {rs[0]['weights']:,} weights) | dense | — | {m['error']:.2f} | | | | | "
                       f"{m['seconds']:.1f} |")
        else:
            out.append(f"| {model} | {method} | {keep:.0%} | {m['error']:.2f} | {mean([r['nnz_A'] for r in rs]):,.0f} | "
                       f"{mean([r['nnz_B'] for r in rs]):,.0f} | {max(r['norm_inf'] for r in rs):.3f} | "
                       f"{max(r['residual'] for r in rs):.1e} | {m['seconds']:.1f} |")
    return "\n".join(out)


def b1_table(rows: list[dict[str, Any]]) -> str:
    methods = [m for m in ("lc", "acdc", "cram", "sfw", "multilevel", "multilevel sfw", "multilevel cram")
               if any(r["method"] == m for r in rows)]
    out = ["| keep | " + " | ".join(methods) + " |", "|---|" + "---|" * len(methods)]
    for keep in LEVELS:
        cells = []
        for m in methods:
            v = [r["error"] for r in rows if r["method"] == m and r["keep"] == keep]
            cells.append(f"{mean(v):.2f}" if v else "")
        out.append(f"| {keep:.0%} | " + " | ".join(cells) + " |")
    secs = [f"{mean([r['seconds'] for r in rows if r['method'] == m and (r['keep'] == 0.05)]):.1f}" for m in methods]
    out.append("| wall s (keep 5 %) | " + " | ".join(secs) + " |")
    ref = mean([r["error"] for r in rows if r["method"] == "reference"])
    return f"reference {ref:.2f} % (mean of seeds)\n\n" + "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", choices=["implicit", "b1", "all"], default="all")
    ap.add_argument("--seeds", default="3,4,5", help="B1 seeds (default 3,4,5)")
    ap.add_argument("--implicit-seeds", default="0,1,2", help="the implicit part's seeds (default 0,1,2)")
    ap.add_argument("--epochs", type=int, default=30, help="epochs of the dense implicit model and the MLP")
    ap.add_argument("--keeps", default="0.1,0.05", help="the implicit part's fractions of A and B kept")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", metavar="PATH")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    res: dict[str, Any] = {}
    t = time.perf_counter()
    if a.part in ("implicit", "all"):
        res["implicit"] = [r for seed in a.implicit_seeds.split(",")
                           for r in part_implicit(int(seed), [float(k) for k in a.keeps.split(",")], a.epochs)]
    if a.part in ("b1", "all"):
        res["b1"] = part_b1([int(s) for s in a.seeds.split(",")])
    res["wall_s"] = time.perf_counter() - t
    if "implicit" in res:
        print(implicit_table(res["implicit"]))
    if "b1" in res:
        print(b1_table(res["b1"]))
    print(f"wall {res['wall_s']:.0f} s")
    if a.json:
        Path(a.json).write_text(json.dumps(res))


if __name__ == "__main__":
    main()
