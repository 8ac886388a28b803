"""Frank-Wolfe: constraint sets with their LMOs (`lmo`), SFW refinement and fw-grow (`sfw`).

A sibling of the LC algorithm, never importing it; `lccompress.api` composes the two.
"""

from .lmo import (LMO, GroupKSupport, KSparsePolytope, KSupportBall, L2Ball, NuclearBall, SpectralKSparse,
                  SpectralKSupport, k_support_norm)
from .sfw import GROW_DEFAULTS, SFW_DEFAULTS, compressible, constraints_for, fw_grow, prune_filters, sfw_refine

__all__ = [
    "GROW_DEFAULTS", "GroupKSupport", "KSparsePolytope", "KSupportBall", "L2Ball", "LMO", "NuclearBall", "SFW_DEFAULTS",
    "SpectralKSparse", "SpectralKSupport", "compressible", "constraints_for", "fw_grow", "k_support_norm",
    "prune_filters", "sfw_refine",
]
