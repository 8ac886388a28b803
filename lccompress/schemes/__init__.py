"""Compression schemes: each a frozen dataclass of hyperparameters with an exact C step."""

from .additive import Additive
from .base import Scheme, Theta, registry, scheme_from_dict
from .lowrank import LowRank, RankSelection
from .prune import L0Penalty, L1Ball, L1Penalty, Prune, project_l1_ball
from .structured import StructuredPrune
from .uniform import Uniform
from .quantize import Binarize, Codebook, FixedCodebook, ScaledBinarize, ScaledTernary, kmeans_1d
from .wellposed import RowL1Ball, SparseRowL1Ball

__all__ = [
    "Additive", "Binarize", "Codebook", "FixedCodebook", "L0Penalty", "L1Ball", "L1Penalty",
    "LowRank", "Prune", "RankSelection", "ScaledBinarize", "ScaledTernary", "Scheme", "StructuredPrune", "Theta", "Uniform",
    "kmeans_1d", "project_l1_ball", "registry", "scheme_from_dict",
    "RowL1Ball", "SparseRowL1Ball",
]
