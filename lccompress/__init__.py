"""lccompress: compress trained PyTorch models by direct compression and the LC algorithm."""

from .errors import ConfigError, DivergenceError, LCError
from .lc import LCConfig, LStepContext, Result, StepRecord, compress
from .recipe import Group, Recipe, Rule
from .schemes import (
    Additive, Binarize, Codebook, FixedCodebook, L0Penalty, L1Ball, L1Penalty, LowRank, Prune,
    RankSelection, ScaledBinarize, ScaledTernary, Scheme, Theta, kmeans_1d, registry,
    scheme_from_dict,
)

__version__ = "0.1.0"

__all__ = [
    "Additive", "Binarize", "Codebook", "ConfigError", "DivergenceError", "FixedCodebook", "Group",
    "L0Penalty", "L1Ball", "L1Penalty", "LCConfig", "LCError", "LStepContext", "LowRank", "Prune",
    "RankSelection", "Recipe", "Result", "Rule", "ScaledBinarize", "ScaledTernary", "Scheme",
    "StepRecord", "Theta", "compress", "kmeans_1d", "registry", "scheme_from_dict",
]
