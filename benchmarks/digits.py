"""Benchmark B1: the digits MLP (64-300-100-10) under three compressions, DC / DC + fine-tuning /
iDC / LC at the same budget, mean test error over seeds.

    python benchmarks/digits.py                 # 3 seeds, about a minute per seed single-threaded
    python benchmarks/digits.py --json b1.json  # also write the table as JSON
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
import math
import statistics
import time

import torch

import lccompress as lcc
from lccompress import digits
from lccompress.train import accuracy, evaluate

LAYERS = ["fc1.weight", "fc2.weight", "fc3.weight"]
TASKS = {
    # (a) ℓ0: keep 5 % of all three weight matrices jointly (2,510 weights)
    "prune": lcc.Recipe.single(LAYERS, lcc.Prune(keep=0.05), joint=True),
    # (b) adaptive codebook, k = 2 (1 bit per weight), one codebook per layer
    "quant": lcc.Recipe.single(LAYERS, lcc.Codebook(k=2)),
    # (c) rank 8 on the first two layers; the last stays dense
    "lowrank": lcc.Recipe.single(LAYERS[:2], lcc.LowRank(8)),
}
# 40 LC steps × 5 epochs (10 at the first step) for every task: the budget of the anchors.
BUDGET = dict(steps=40, epochs=5, first_epochs=10)
# The default schedule of each scheme family (LCConfig leaves mu0, mu_growth, weight_decay to them).
CONFIGS = {t: lcc.LCConfig(**BUDGET) for t in TASKS}
METHODS = ("dc", "finetune", "idc", "lc")


def error(model: torch.nn.Module, loader) -> float:
    acc, _, _ = evaluate(model, loader, torch.device("cpu"), accuracy)
    return 100 * (1 - acc)


def run(seeds: list[int], growth: float | None) -> dict:
    rows: dict[str, dict[str, list[float]]] = {t: {m: [] for m in ("reference", *METHODS)} for t in TASKS}
    extra: dict[str, dict[str, list[float]]] = {t: {"ratio": [], "wall_s": [], "other_share": [],
                                                     "fast_growth_err": [], "recoveries": []} for t in TASKS}
    for seed in seeds:
        data = digits.loaders(seed)
        ref = digits.train_reference(seed, data=data)
        ref_err = error(ref, data["eval"])
        for task, recipe in TASKS.items():
            rows[task]["reference"].append(ref_err)
            for m in METHODS:
                t0 = time.perf_counter()
                r = lcc.compress(ref, recipe, data, method=m, config=CONFIGS[task], device="cpu", seed=seed)
                wall = time.perf_counter() - t0
                rows[task][m].append(error(r.model, data["eval"]))
                if m == "lc":
                    extra[task]["ratio"].append(r.ratio)
                    extra[task]["wall_s"].append(wall)
                    extra[task]["other_share"].append(1 - r.timings["lstep"] / wall)
            if growth:
                cfg = dataclasses.replace(CONFIGS[task], mu_growth=growth)
                r = lcc.compress(ref, recipe, data, config=cfg, device="cpu", seed=seed)
                extra[task]["fast_growth_err"].append(error(r.model, data["eval"]))
                extra[task]["recoveries"].append(r.recoveries)
    mean = lambda v: statistics.fmean(v) if v else math.nan  # noqa: E731
    return {"seeds": seeds, "threads": torch.get_num_threads(), "fast_growth": growth,
            "tasks": {t: {**{m: round(mean(v), 3) for m, v in rows[t].items()},
                          **{k: round(mean(v), 4) for k, v in extra[t].items()}} for t in TASKS}}


def table(res: dict) -> str:
    g = res["fast_growth"]
    head = ["task", "reference", "DC", "DC+FT", "iDC", "LC", "ratio", "LC wall s", "outside L steps"]
    if g:
        head.append(f"LC, μ×{g}")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for t, r in res["tasks"].items():
        cells = [t] + [f"{r[m]:.2f} %" for m in ("reference", *METHODS)]
        cells += [f"{r['ratio']:.1f}×", f"{r['wall_s']:.1f}", f"{100 * r['other_share']:.1f} %"]
        if g:
            cells.append(f"{r['fast_growth_err']:.2f} % ({r['recoveries']:.0f} NaN restarts)")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default 0,1,2)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1: fastest for this size)")
    ap.add_argument("--fast-growth", type=float, default=1.4, help="also run LC with this μ growth (0: skip)")
    ap.add_argument("--json", metavar="PATH", help="write the results as JSON")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    res = run([int(s) for s in a.seeds.split(",")], a.fast_growth or None)
    print(f"B1 digits MLP, test error, mean of seeds {a.seeds}, {a.threads} thread(s)")
    print(table(res))
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
