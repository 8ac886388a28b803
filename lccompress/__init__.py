"""lccompress: compress trained PyTorch models by direct compression and the LC algorithm.

Layers, arrows one way (see README, "How the code is organised"):
    cli (lccompress.cli) → api, sweep → methods → {lc, fw, train} and {artifact, checkpoint, report}
    → {recipe, schemes} → {util, errors}
"""

from .errors import ConfigError, DivergenceError, LCError
from .lc import LCConfig, LStepContext, Result, StepRecord
from .methods import METHODS, compress, one_shot
from .recipe import Group, Recipe, Rule, Span
from .schemes import (
    Additive, Binarize, Codebook, FixedCodebook, L0Penalty, L1Ball, L1Penalty, LowRank, Prune,
    RankSelection, ScaledBinarize, ScaledTernary, Scheme, StructuredPrune, Theta, Uniform, kmeans_1d, registry,
    scheme_from_dict,
)
from .schemes import RowL1Ball, SparseRowL1Ball
from .version import __version__

__all__ = [
    "Additive", "Binarize", "Codebook", "ConfigError", "DivergenceError", "FixedCodebook", "Group",
    "L0Penalty", "L1Ball", "L1Penalty", "LCConfig", "LCError", "LStepContext", "LowRank", "METHODS", "Prune",
    "RankSelection", "Recipe", "Result", "Rule", "ScaledBinarize", "ScaledTernary", "Scheme", "Span",
    "StepRecord", "StructuredPrune", "Theta", "Uniform", "__version__", "compress", "kmeans_1d", "one_shot", "registry", "scheme_from_dict",
    "RowL1Ball", "SparseRowL1Ball",
]
