"""The digits MLP of benchmark B1: real 8×8 handwritten digits shipped with scikit-learn.

Used by the demo, the fixtures, the tests and benchmarks/digits.py. scikit-learn is only needed
here (it carries the data set); install it with the `test` extra.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.utils.data import BatchSampler, DataLoader, RandomSampler, SequentialSampler, TensorDataset

from .errors import ConfigError
from .modelio import cross_entropy
from .train import Guard, train_epochs


class MLP(nn.Module):
    """64-300-100-10 ReLU network (50,200 weights)."""

    def __init__(self, sizes: tuple[int, ...] = (64, 300, 100, 10)) -> None:
        super().__init__()
        self.fc1 = nn.Linear(sizes[0], sizes[1])
        self.fc2 = nn.Linear(sizes[1], sizes[2])
        self.fc3 = nn.Linear(sizes[2], sizes[3])

    def forward(self, x: Tensor) -> Tensor:
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def load(seed: int = 0) -> dict[str, tuple[Tensor, Tensor]]:
    """Stratified split with 500 test digits, standardized with the training statistics."""
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
        from sklearn.preprocessing import StandardScaler
    except ImportError:
        raise ConfigError("the digits data comes with scikit-learn: pip install scikit-learn") from None
    X, y = load_digits(return_X_y=True)
    Xtr, Xte, ytr, yte = train_test_split(X, y, test_size=500, random_state=seed, stratify=y)
    sc = StandardScaler().fit(Xtr)
    f = lambda a: torch.tensor(a, dtype=torch.float32)  # noqa: E731
    return {"train": (f(sc.transform(Xtr)), torch.tensor(ytr)), "test": (f(sc.transform(Xte)), torch.tensor(yte))}


def batches(X: Tensor, y: Tensor, batch_size: int = 64, shuffle: bool = True) -> DataLoader:
    """A DataLoader that slices whole batches out of in-memory tensors (no per-sample collate)."""
    ds = TensorDataset(X, y)
    sampler = RandomSampler(ds) if shuffle else SequentialSampler(ds)
    return DataLoader(ds, sampler=BatchSampler(sampler, batch_size, drop_last=False), batch_size=None)


def loaders(seed: int = 0, batch_size: int = 64) -> dict[str, DataLoader]:
    d = load(seed)
    return {"train": batches(*d["train"], batch_size), "eval": batches(*d["test"], 500, shuffle=False)}


def train_reference(seed: int = 0, epochs: int = 60, data: dict[str, DataLoader] | None = None) -> MLP:
    """B1's reference: SGD lr 0.05, Nesterov momentum 0.9, batch 64, lr × 0.97 per epoch."""
    data = data or loaders(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = MLP()
        train_epochs(model, data["train"], [(list(model.parameters()), 0.05)], epochs=epochs,
                     loss_fn=cross_entropy, device=torch.device("cpu"), lr_factor=lambda e: 0.97 ** e,
                     guard=Guard())
    return model
