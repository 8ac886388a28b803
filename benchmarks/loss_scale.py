"""Defaults that do not depend on the loss's scale: an embedder trained with MSE to unit-norm
targets (loss ≈ 1e-3), pruned to 20 % and quantized to k = 2, by DC and by LC with

  - SGD with the family's fixed μ₀ (the defaults before μ₀ was measured on the problem),
  - SGD with μ₀ measured on the problem,
  - AdamW with μ₀ measured on the problem (the default; scale-free: its steps and its proximal
    pull ignore the loss's scale),

and the same with the loss multiplied by 1000 (a second, independent check of scale-freeness).
Metric: mean cosine similarity to the targets on held-out digits.

    python benchmarks/loss_scale.py
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import lccompress as lcc
from lccompress import digits
from lccompress.modelio import Cosine
from lccompress.train import evaluate


class Embedder(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.fc3 = torch.nn.Linear(64, 256), torch.nn.Linear(256, 128), torch.nn.Linear(128, 32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x))))), dim=-1)


def problem(seed: int):
    d = digits.load(seed)
    g = torch.Generator().manual_seed(seed)
    proj = torch.randn(64, 32, generator=g)
    target = lambda X: F.normalize(torch.tanh(X @ proj / 8) + 0.1 * torch.sin(X @ proj), dim=-1)  # noqa: E731
    (Xtr, _), (Xte, _) = d["train"], d["test"]
    data = {"train": DataLoader(TensorDataset(Xtr, target(Xtr)), batch_size=64, shuffle=True,
                                generator=torch.Generator().manual_seed(seed)),
            "eval": DataLoader(TensorDataset(Xte, target(Xte)), batch_size=500)}
    torch.manual_seed(seed)
    model = Embedder()
    opt = torch.optim.Adam(model.parameters(), 2e-3)
    for _ in range(60):
        for x, y in data["train"]:
            opt.zero_grad()
            F.mse_loss(model(x), y).backward()
            opt.step()
    return model, data


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=20)
    a = ap.parse_args()
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    model, data = problem(a.seed)
    layers = ["fc1.weight", "fc2.weight", "fc3.weight"]
    tasks = {"prune 20 %": lcc.Recipe.single(layers, lcc.Prune(keep=0.2), joint=True),
             "codebook k=2": lcc.Recipe.single(layers, lcc.Codebook(k=2))}
    metric = Cosine()
    ref = evaluate(model, data["eval"], torch.device("cpu"), metric)[0]
    base = dict(steps=a.steps, epochs=2, first_epochs=4)
    variants = {
        "DC": ("dc", {}),
        "LC, SGD, fixed μ₀": ("lc", dict(optimizer="sgd", mu0="family")),
        "LC, SGD, measured μ₀": ("lc", dict(optimizer="sgd")),
        "LC, AdamW, measured μ₀ (default)": ("lc", dict(optimizer="adamw")),
    }
    print(f"embedder 64-256-128-32 (unit-norm outputs), MSE to targets; reference cosine {ref:.4f}; "
          f"{a.steps} LC steps, 2 epochs each (4 at the first)\n")
    print("| compression | method | loss × 1 | loss × 1000 | μ₀ (× 1) |")
    print("|---|---|---|---|---|")
    for tname, recipe in tasks.items():
        for vname, (method, kw) in variants.items():
            cells, mu0 = [], None
            for scale in (1.0, 1000.0):
                kw2 = dict(kw)
                if kw2.get("mu0") == "family":
                    kw2["mu0"] = lcc.LCConfig(**base).resolve(recipe.groups(model)).mu0
                cfg = lcc.LCConfig(**base, **kw2)
                r = lcc.compress(model, recipe, data, method=method, config=cfg, device="cpu", seed=a.seed,
                                 loss=lambda p, t, s=scale: s * F.mse_loss(p, t), metric=metric)
                cells.append(f"{r.metric:.4f}")
                mu0 = mu0 if mu0 is not None else (r.config.mu0 if method == "lc" else None)
            print(f"| {tname} | {vname} | {cells[0]} | {cells[1]} | {'' if mu0 is None else f'{mu0:.3g}'} |")
    print(f"\ntotal wall time {time.perf_counter() - t0:.0f} s (python benchmarks/loss_scale.py)")


if __name__ == "__main__":
    main()
