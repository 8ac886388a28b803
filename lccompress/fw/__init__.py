"""Frank-Wolfe: constraint sets with their LMOs (`lmo`), SFW refinement and fw-grow (`sfw`, its
constraints `GrowSet`: k-sparse polytopes, or row ℓ1 balls for well-posed implicit models).

A sibling of the LC algorithm, never importing it; `lccompress.api` composes the two.
"""

from .lmo import (LMO, GroupKSupport, KSparsePolytope, KSupportBall, L2Ball, NuclearBall, SpectralKSparse,
                  SpectralKSupport, k_support_norm)
from .sfw import (GROW_DEFAULTS, SFW_DEFAULTS, GrowSet, compressible, constraints_for, fw_grow, polytope_vertex,
                  prune_filters, row_ball_vertex, sfw_refine)

__all__ = [
    "GROW_DEFAULTS", "GroupKSupport", "GrowSet", "KSparsePolytope", "KSupportBall", "L2Ball", "LMO", "NuclearBall",
    "SFW_DEFAULTS", "SpectralKSparse", "SpectralKSupport", "compressible", "constraints_for", "fw_grow",
    "k_support_norm", "polytope_vertex", "prune_filters", "row_ball_vertex", "sfw_refine",
]
