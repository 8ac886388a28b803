"""Small models shared by the tests."""

import torch.nn.functional as F
from torch import nn


class ConvNet(nn.Module):
    """1×8×8 → conv 3×3 (8) → BN → conv 3×3 pad 1 (16) → fc 576 → 10."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn = nn.Conv2d(1, 8, 3), nn.BatchNorm2d(8)
        self.conv2, self.fc = nn.Conv2d(8, 16, 3, padding=1), nn.Linear(576, 10)

    def forward(self, x):
        return self.fc(F.relu(self.conv2(F.relu(self.bn(self.conv1(x))))).flatten(1))
