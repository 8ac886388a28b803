"""LC against DC + fine-tuning at equal budgets: four models × three compressions × seeds 3, 4, 5.

    python benchmarks/lc_vs_ft.py --models b1,wide,cnn  # the README table, 17 min on one thread,
    python benchmarks/lc_vs_ft.py --models lenet5       #   and 25 min, side by side
    python benchmarks/lc_vs_ft.py --config '{"tail": 0}' --methods lc   # LC with other settings
    python benchmarks/lc_vs_ft.py --models b1,lenet5 --tasks none --bytes --seeds 3 --alphas 1e-6,1e-5,3e-5
                                                        # rank selection only: error against bytes
    python benchmarks/lc_vs_ft.py --json out.json

Models: B1's MLP 64-300-100-10 and a wider MLP 64-512-256-10 on scikit-learn's digits; a digits
CNN (conv 1→16 3×3, conv 16→32 3×3, max-pool 2, fc 512→10); B2's LeNet5 on a Fashion-MNIST subset
(10,000 training images, the 10,000 test images). Each reference is trained by the benchmark from the seed.
Compressions: ℓ0 pruning keeping 5 % of all weights jointly, a 2-entry codebook per layer, and
low rank (rank 8 on B1's first two layers; rank 4 on the wider MLP's first two and the CNN's conv2
and fc; rank 8 on LeNet5's conv2 and rank 16 on its fc1). Every method gets the same budget in
optimizer steps: B1's 40 L steps × 5 epochs (10 at the first) on the digits, 15 L steps of 5,000
samples on LeNet5; DC + FT trains as many steps with the compression held fixed. Defaults
everywhere (AdamW, μ₀ measured on the problem), one thread.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

import lccompress as lcc  # noqa: E402
from lccompress import digits  # noqa: E402
from lccompress.modelio import cross_entropy  # noqa: E402
from lccompress.train import Guard, accuracy, evaluate, train_epochs  # noqa: E402

METHODS = {"dc": "DC", "finetune": "DC+FT", "lc": "LC"}


class DigitsCNN(nn.Module):
    """conv 1→16 3×3 (pad 1), ReLU, conv 16→32 3×3 (pad 1), ReLU, max-pool 2, fc 512→10."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(1, 16, 3, padding=1), nn.Conv2d(16, 32, 3, padding=1)
        self.fc = nn.Linear(512, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x (B, 64), an 8×8 image flattened
        x = torch.relu(self.conv1(x.view(-1, 1, 8, 8)))
        x = torch.max_pool2d(torch.relu(self.conv2(x)), 2)  # (B, 32, 4, 4)
        return self.fc(x.flatten(1))


def weights(model: nn.Module) -> list[str]:
    return [n for n, p in model.named_parameters() if n.endswith("weight")]


class Bench:
    """One model family: how to build its data and reference, its low-rank layers, its budget."""

    def __init__(self, name: str, make: Callable[[], nn.Module], ranks: dict[str, int], digits_data: bool) -> None:
        self.name, self.make, self.ranks, self.digits_data = name, make, ranks, digits_data

    def data(self, seed: int) -> dict[str, Any]:
        if self.digits_data:
            return digits.loaders(seed)
        import fashion

        d = fashion.load_data(Path(fashion.DATA), 10000, 10000)
        g = torch.Generator().manual_seed(seed)
        perm = torch.randperm(len(d["train"][0]), generator=g)
        X, y = d["train"][0][perm], d["train"][1][perm]
        self.full = fashion.loader(X, y, 128)  # whole passes, for the reference
        return {"train": fashion.loader(X, y, 128, epoch_size=5000), "eval": fashion.loader(*d["test"], 1000, shuffle=False)}

    def reference(self, seed: int, data: dict[str, Any]) -> nn.Module:
        """SGD, Nesterov momentum 0.9: the digits models B1's way (lr 0.05, batch 64, 60 epochs,
        × 0.97 per epoch), LeNet5 B2's (lr 0.05, batch 128, × 0.9 per epoch) for 15 epochs."""
        epochs, decay, loader = (60, 0.97, data["train"]) if self.digits_data else (15, 0.9, self.full)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = self.make()
            train_epochs(model, loader, [(list(model.parameters()), 0.05)], epochs=epochs, loss_fn=cross_entropy,
                         device=torch.device("cpu"), lr_factor=lambda e: decay ** e, guard=Guard())
        return model

    def config(self, **over: Any) -> lcc.LCConfig:
        if self.digits_data:  # B1's budget: 40 steps × 5 epochs (10 at the first)
            return lcc.LCConfig(steps=40, epochs=5, first_epochs=10, **over)
        return lcc.LCConfig(steps=15, epochs=1, first_epochs=1, **over)  # 15 × 40 batches of 128

    def recipes(self, model: nn.Module) -> dict[str, lcc.Recipe]:
        w = weights(model)
        rank_rules = [lcc.Rule((n,), lcc.LowRank(r)) for n, r in self.ranks.items()]
        return {"prune 5%": lcc.Recipe.single(w, lcc.Prune(keep=0.05), joint=True),
                "codebook k=2": lcc.Recipe.single(w, lcc.Codebook(k=2)),
                "low rank": lcc.Recipe(tuple(rank_rules))}


def _lenet() -> nn.Module:
    import fashion

    return fashion.LeNet5()


BENCHES = {
    "b1": Bench("B1 MLP 64-300-100-10", digits.MLP, {"fc1.weight": 8, "fc2.weight": 8}, True),
    "wide": Bench("MLP 64-512-256-10", lambda: digits.MLP((64, 512, 256, 10)), {"fc1.weight": 4, "fc2.weight": 4}, True),
    "cnn": Bench("digits CNN 16-32 + fc", DigitsCNN, {"conv2.weight": 4, "fc.weight": 4}, True),
    "lenet5": Bench("LeNet5 / Fashion-MNIST 10k", _lenet, {"conv2.weight": 8, "fc1.weight": 16}, False),
}


def error(model: nn.Module, loader: Any) -> float:
    acc, _, _ = evaluate(model, loader, torch.device("cpu"), accuracy)
    return 100 * (1 - acc)


def run(models: list[str], tasks: list[str] | None, seeds: list[int], over: dict[str, Any],
        alphas: list[float], methods: list[str] = list(METHODS)) -> dict:
    cells: list[dict[str, Any]] = []
    curves: list[dict[str, Any]] = []
    for key in models:
        b = BENCHES[key]
        for seed in seeds:
            data = b.data(seed)
            ref = b.reference(seed, data)
            ref_err = error(ref, data["eval"])
            for task, recipe in b.recipes(ref).items():
                if tasks and not any(t in task for t in tasks):
                    continue
                row = {"model": key, "task": task, "seed": seed, "reference": ref_err}
                for m in methods:
                    t = time.perf_counter()
                    r = lcc.compress(ref, recipe, data, method=m, config=b.config(**over), device="cpu", seed=seed)
                    row[m] = error(r.model, data["eval"])
                    row[f"{m}_s"] = time.perf_counter() - t
                    row[f"{m}_bits"] = r.bits()
                cells.append(row)
                print(json.dumps(row), flush=True)
            for alpha in alphas:  # rank selection on the same layers as the fixed ranks
                recipe = lcc.Recipe.single(list(b.ranks), lcc.RankSelection(alpha=alpha))
                for m in ("finetune", "lc"):
                    r = lcc.compress(ref, recipe, data, method=m, config=b.config(**over), device="cpu", seed=seed)
                    ranks = {g.name: g.scheme.summary(r.thetas[g.name], g.shape)["rank"] for g in r.groups}
                    point = {"model": key, "seed": seed, "alpha": alpha, "method": m, "error": error(r.model, data["eval"]),
                             "bytes": r.bits() // 8, "ranks": ranks}
                    curves.append(point)
                    print(json.dumps(point), flush=True)
                if min(ranks.values()) >= 1:  # equal bytes: DC + FT at the ranks LC chose
                    fixed = lcc.Recipe(tuple(lcc.Rule((n,), lcc.LowRank(k)) for n, k in ranks.items()))
                    r = lcc.compress(ref, fixed, data, method="finetune", config=b.config(**over), device="cpu", seed=seed)
                    point = {"model": key, "seed": seed, "alpha": alpha, "method": "finetune@lc", "error": error(r.model, data["eval"]),
                             "bytes": r.bits() // 8, "ranks": ranks}
                    curves.append(point)
                    print(json.dumps(point), flush=True)
    return {"cells": cells, "curves": curves, "seeds": seeds, "threads": torch.get_num_threads(), "config": over}


def mean(v: list[float]) -> float:
    return statistics.fmean(v) if v else math.nan


def table(res: dict) -> str:
    lines = ["| model | task | reference | DC | DC+FT | LC | LC − FT | LC wall s |", "|---|---|---|---|---|---|---|---|"]
    keys: list[tuple[str, str]] = []
    for c in res["cells"]:
        if (c["model"], c["task"]) not in keys:
            keys.append((c["model"], c["task"]))
    for model, task in keys:
        cs = [c for c in res["cells"] if c["model"] == model and c["task"] == task]
        m = {k: mean([c.get(k, math.nan) for c in cs]) for k in ("reference", "dc", "finetune", "lc", "lc_s")}
        lines.append(f"| {BENCHES[model].name} | {task} | {m['reference']:.2f} | {m['dc']:.2f} | {m['finetune']:.2f} | "
                     f"{m['lc']:.2f} | {m['lc'] - m['finetune']:+.2f} | {m['lc_s']:.1f} |")
    return "\n".join(lines)


def curve_table(res: dict) -> str:
    """Per model, α and seed: DC + FT at α (its own ranks), LC at α, and DC + FT at LC's ranks."""
    lines = ["| model | seed | α | DC+FT ranks | bytes | error | LC ranks | bytes | LC error | DC+FT at LC's ranks |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    pts = {(p["model"], p["seed"], p["alpha"], p["method"]): p for p in res["curves"]}
    for (model, seed, alpha, m), p in pts.items():
        if m != "lc":
            continue
        f, a = pts.get((model, seed, alpha, "finetune")), pts.get((model, seed, alpha, "finetune@lc"))
        rk = lambda q: "/".join(str(v) for v in q["ranks"].values())  # noqa: E731
        lines.append(f"| {BENCHES[model].name} | {seed} | {alpha:g} | {rk(f)} | {f['bytes']:,} | {f['error']:.2f} | "
                     f"{rk(p)} | {p['bytes']:,} | {p['error']:.2f} | {a['error']:.2f} |" if f and a else
                     f"| {BENCHES[model].name} | {seed} | {alpha:g} | {rk(f) if f else '—'} | — | — | {rk(p)} | "
                     f"{p['bytes']:,} | {p['error']:.2f} | — |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(BENCHES), help=f"comma-separated, of {', '.join(BENCHES)}")
    ap.add_argument("--tasks", help="only tasks whose name contains one of these comma-separated words")
    ap.add_argument("--seeds", default="3,4,5", help="comma-separated seeds (default 3,4,5)")
    ap.add_argument("--bytes", action="store_true", help="also rank selection over --alphas: error against bytes")
    ap.add_argument("--alphas", default="1e-6,1e-5,1e-4", help="rank selection α values (default 1e-6,1e-5,1e-4)")
    ap.add_argument("--config", default="{}", help="LCConfig overrides as JSON, e.g. '{\"mu0\": 0.01}'")
    ap.add_argument("--methods", default=",".join(METHODS), help="comma-separated, of dc, finetune, lc (default all)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", metavar="PATH", help="write the results as JSON")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    t = time.perf_counter()
    res = run(a.models.split(","), a.tasks.split(",") if a.tasks else None, [int(s) for s in a.seeds.split(",")],
              json.loads(a.config), [float(x) for x in a.alphas.split(",")] if a.bytes else [], a.methods.split(","))
    res["wall_s"] = time.perf_counter() - t
    print(f"\nLC vs DC + fine-tuning, test error %, mean of seeds {a.seeds}, {a.threads} thread(s), "
          f"{res['wall_s'] / 60:.1f} min")
    print(table(res))
    if res["curves"]:
        print("\nRank selection: error (%) against bytes of the factors; the last column is DC + FT at exactly LC's "
              "ranks (equal bytes):")
        print(curve_table(res))
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
