"""Frank-Wolfe on benchmark B1's digits MLP (64-300-100-10): one SFW-refined checkpoint pruned
one-shot at 90 / 95 / 97 % against the reference pruned the same way, and fw_grow (from zero,
distillation) against LC at keep 5 %. Test error in %, mean over seeds; single-threaded.

    python benchmarks/fw_digits.py                  # seeds 0, 1, 2; about half a minute
    python benchmarks/fw_digits.py --json fw.json   # also write the numbers as JSON

The pruned SFW models are extracted from one multi-level file (lccompress.multilevel) holding the
refined weights once plus a level id per weight; extraction is the global magnitude mask.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

import torch

import lccompress as lcc
from lccompress import digits, fw
from lccompress.artifact import multilevel
from lccompress.train import accuracy, evaluate

LAYERS = ["fc1.weight", "fc2.weight", "fc3.weight"]
KEEPS = [0.10, 0.05, 0.03]  # pruned 90 / 95 / 97 %, one global magnitude threshold over all three
# SFW from the reference inside one joint k-sparse polytope (k = 3 % of the weights, the radius
# puts the reference on its boundary) or k-support ball; constant step fraction η = lr (cosine)
SFW = {"k-sparse": fw.KSparsePolytope(k=0.03), "k-support": fw.KSupportBall(k=0.03)}
SFW_OPTS = dict(epochs=40, lr=0.015, rescale=None, schedule="cosine", dense_lr=0.01)
# fw_grow: 2,510 weights (keep 5 %) grown from zero on KL distillation, gradient-rescaled steps
GROW_OPTS = fw.GROW_DEFAULTS


def error(model: torch.nn.Module, loader) -> float:
    acc, _, _ = evaluate(model, loader, torch.device("cpu"), accuracy)
    return 100 * (1 - acc)


def run(seeds: list[int]) -> dict:
    rows: dict[str, list[float]] = {}
    add = lambda k, v: rows.setdefault(k, []).append(v)  # noqa: E731
    file_bytes = dense_bytes = 0
    for seed in seeds:
        data = digits.loaders(seed)
        ref = digits.train_reference(seed, data=data)
        add("reference/dense", error(ref, data["eval"]))
        for keep in KEEPS:
            add(f"reference/{keep}", error(lcc.one_shot(ref, LAYERS, keep=keep).model, data["eval"]))
        for name, lmo in SFW.items():
            t = time.perf_counter()
            refined = fw.sfw_refine(ref, data, {tuple(LAYERS): lmo}, seed=seed, **SFW_OPTS)
            add(f"{name}/seconds", time.perf_counter() - t)
            add(f"{name}/dense", error(refined, data["eval"]))
            with tempfile.TemporaryDirectory() as tmp:
                path = os.path.join(tmp, "levels.safetensors")
                file_bytes = multilevel.save_multilevel(path, refined, multilevel.build_levels(refined, LAYERS, KEEPS))
                dense_bytes = sum(v.numel() * v.element_size() for v in refined.state_dict().values())
                for j, keep in enumerate(KEEPS, start=1):
                    model = digits.MLP()
                    model.load_state_dict(multilevel.extract(path, j))
                    add(f"{name}/{keep}", error(model, data["eval"]))
        t = time.perf_counter()
        grown = fw.fw_grow(ref, ref, data, count=round(0.05 * 50200), seed=seed, **GROW_OPTS)
        add("grow/seconds", time.perf_counter() - t)
        add("grow/error", error(grown, data["eval"]))
        add("grow/nonzeros", float(sum(int((dict(grown.named_parameters())[n] != 0).sum()) for n in LAYERS)))
        t = time.perf_counter()
        lc = lcc.compress(ref, lcc.Recipe.single(LAYERS, lcc.Prune(keep=0.05), joint=True), data,
                          device="cpu", seed=seed)
        add("lc/seconds", time.perf_counter() - t)
        add("lc/error", error(lc.model, data["eval"]))
    mean = {k: round(statistics.fmean(v), 3) for k, v in rows.items()}
    return {"seeds": seeds, "threads": torch.get_num_threads(), "sfw": SFW_OPTS, "grow": GROW_OPTS,
            "multilevel_bytes": file_bytes, "dense_bytes": dense_bytes, "mean": mean,
            "per_seed": {k: [round(x, 2) for x in v] for k, v in rows.items()}}


def table(res: dict) -> str:
    m, ps = res["mean"], res["per_seed"]
    cell = lambda k: f"{m[k]:.2f} % ({', '.join(f'{x:.1f}' for x in ps[k])})"  # noqa: E731
    out = ["| weights kept | reference → one-shot | SFW k-sparse → one-shot | SFW k-support → one-shot |",
           "|---|---|---|---|",
           f"| 100 % (no pruning) | {cell('reference/dense')} | {cell('k-sparse/dense')} | {cell('k-support/dense')} |"]
    for keep in KEEPS:
        out.append(f"| {100 * keep:.0f} % (pruned {100 - 100 * keep:.0f} %) | {cell(f'reference/{keep}')} | "
                   f"{cell(f'k-sparse/{keep}')} | {cell(f'k-support/{keep}')} |")
    out += ["", "| keep 5 % (2,510 weights) | test error | wall s | epochs |", "|---|---|---|---|",
            f"| reference → one-shot (DC) | {cell('reference/0.05')} | 0.0 | 0 |",
            f"| LC (default schedule) | {cell('lc/error')} | {m['lc/seconds']:.1f} | 205 |",
            f"| fw_grow (from zero, KL distillation) | {cell('grow/error')} | {m['grow/seconds']:.1f} | {GROW_OPTS['epochs']} |",
            f"| SFW k-sparse → one-shot | {cell('k-sparse/0.05')} | {m['k-sparse/seconds']:.1f} | {SFW_OPTS['epochs']} |",
            "", f"mean test error over seeds {res['seeds']} (per seed in brackets), {res['threads']} thread(s); "
            f"fw_grow non-zeros: {m['grow/nonzeros']:.0f}; multi-level file {res['multilevel_bytes']:,} bytes "
            f"= dense {res['dense_bytes']:,} + 1 byte × 50,200 weights + header"]
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    torch.set_num_threads(1)
    t = time.perf_counter()
    res = run(args.seeds)
    res["wall_s"] = round(time.perf_counter() - t, 1)
    print(table(res))
    print(f"total wall time {res['wall_s']} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
