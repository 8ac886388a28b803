"""Small models shared by the tests."""

import torch
import torch.nn.functional as F
from torch import nn

import lccompress as lc


class ConvNet(nn.Module):
    """1×8×8 → conv 3×3 (8) → BN → conv 3×3 pad 1 (16) → fc 576 → 10."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn = nn.Conv2d(1, 8, 3), nn.BatchNorm2d(8)
        self.conv2, self.fc = nn.Conv2d(8, 16, 3, padding=1), nn.Linear(576, 10)

    def forward(self, x):
        return self.fc(F.relu(self.conv2(F.relu(self.bn(self.conv1(x))))).flatten(1))


class ToyNet(nn.Module):
    """6 → 12 → 3 ReLU network for the Frank-Wolfe and method tests."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(6, 12), nn.Linear(12, 3)

    def forward(self, x):
        return self.fc2(F.relu(self.fc1(x)))


def make(kind: str, batch: int = 5):
    """(model, its compressible weights, an input batch) for kind "mlp" (the digits MLP) or "conv"
    (ConvNet with BatchNorm statistics that are not the defaults), seed 0."""
    from lccompress.digits import MLP

    torch.manual_seed(0)
    if kind == "mlp":
        return MLP(), ["fc1.weight", "fc2.weight", "fc3.weight"], torch.randn(batch, 64)
    m = ConvNet()
    m.bn.running_mean.uniform_(-1, 1), m.bn.running_var.uniform_(0.5, 2)
    m.bn.num_batches_tracked += 7
    return m, ["conv1.weight", "conv2.weight", "fc.weight"], torch.randn(batch, 1, 8, 8)


SCHEMES = {  # one case per scheme family and layout: name: (scheme, joint)
    "prune": (lc.Prune(keep=0.1), False),
    "prune_joint": (lc.Prune(keep=0.05), True),
    "l1_ball": (lc.L1Ball(radius=3.0), False),
    "l0_penalty": (lc.L0Penalty(alpha=1.25e-6), False),  # threshold √(2α/μ₀) = 0.05
    "l1_penalty_empty": (lc.L1Penalty(alpha=1.0), False),  # threshold 1000: nothing kept
    "codebook": (lc.Codebook(k=4), False),
    "codebook_joint": (lc.Codebook(k=5), True),
    "fixed_codebook": (lc.FixedCodebook((-0.05, 0.0, 0.05)), False),
    "binarize": (lc.Binarize(), True),
    "scaled_binarize": (lc.ScaledBinarize(), False),
    "scaled_ternary": (lc.ScaledTernary(), False),
    "uniform": (lc.Uniform(bits=4, group_size=16), False),
    "uniform_symmetric": (lc.Uniform(bits=3, symmetric=True), False),
    "lowrank": (lc.LowRank(rank=2), False),
    "rank_selection": (lc.RankSelection(alpha=1e-6), False),
    "additive": (lc.Additive((lc.Codebook(k=2), lc.Prune(keep=0.05))), False),
    "additive_lowrank": (lc.Additive((lc.LowRank(rank=2), lc.Prune(keep=0.02))), False),
    "row_l1_ball": (lc.RowL1Ball(kappa=0.5), False),
    "sparse_row_l1_ball": (lc.SparseRowL1Ball(kappa=0.5, keep=0.2), False),
}
