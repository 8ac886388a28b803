"""Low-rank C steps at scale: the randomized SVD is within 1e-3 of the exact truncation (by the
Eckart–Young error from all singular values), rank selection minimizes its objective over every
rank, and both are deterministic."""

import pytest
import torch

import lccompress as lcc
from lccompress.schemes.lowrank import top_singular


def _matrices():
    g = torch.Generator().manual_seed(0)
    d = 400
    U, V = torch.linalg.qr(torch.randn(d, d, generator=g)).Q, torch.linalg.qr(torch.randn(d, d, generator=g)).Q
    decay = (U * torch.arange(1, d + 1).float() ** -0.5) @ V.T + 1e-4 * torch.randn(d, d, generator=g)
    yield "slow decay", decay
    yield "flat (Gaussian)", torch.randn(300, 500, generator=g)
    yield "low rank + noise", torch.randn(256, 8, generator=g) @ torch.randn(8, 600, generator=g) + 0.01 * torch.randn(256, 600, generator=g)
    yield "conv kernel", torch.randn(64, 32, 3, 3, generator=g)


@pytest.mark.parametrize("r", [4, 16])
def test_randomized_error_within_1e_3_of_the_optimum(r):
    for name, w in _matrices():
        th = lcc.LowRank(rank=r).compress(w)
        w2 = w.reshape(w.shape[0], -1).double()
        s = torch.linalg.svdvals(w2)
        optimum = float(s[r:].pow(2).sum().sqrt())  # Eckart–Young
        err = float((w2 - (th["U"] @ th["V"]).double()).norm())
        assert th["U"].shape == (w.shape[0], r) and th["V"].shape == (r, w2.shape[1]), name
        assert err <= optimum * (1 + 1e-3), (name, err / optimum)


def test_top_singular_is_exact_on_small_blocks_and_deterministic():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(40, 30, generator=g, dtype=torch.float64)
    U, S, Vh = top_singular(w, 10)  # 4·(10 + 8) > 30: the exact SVD
    torch.testing.assert_close(S, torch.linalg.svdvals(w)[:10])
    big = torch.randn(500, 400, generator=g)
    a, b = top_singular(big, 8, seed=3), top_singular(big, 8, seed=3)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_rank_selection_minimizes_its_objective_over_every_rank():
    g = torch.Generator().manual_seed(2)
    w = torch.randn(120, 8, generator=g) @ torch.randn(8, 90, generator=g) + 0.05 * torch.randn(120, 90, generator=g)
    s = torch.linalg.svdvals(w.double())
    for alpha, mu in ((1e-4, 1.0), (1e-3, 1.0), (1e-6, 10.0)):
        th = lcc.RankSelection(alpha=alpha).compress(w, mu=mu)
        objective = [alpha * r * (120 + 90) + mu / 2 * float(s[r:].pow(2).sum()) for r in range(len(s) + 1)]
        r = th["U"].shape[1]
        assert objective[r] == pytest.approx(min(objective), rel=1e-9)
        err = float((w.double() - (th["U"] @ th["V"]).double()).pow(2).sum())
        assert err <= float(s[r:].pow(2).sum()) * (1 + 2e-3) + 1e-9 * float(s.pow(2).sum())


def test_rank_selection_by_threshold_on_a_large_matrix():
    """Above 1024 the rank comes from the leading triplets alone while it is small; the same rank
    as the objective's argmin over the full spectrum either way."""
    g = torch.Generator().manual_seed(5)
    w = torch.randn(1040, 20, generator=g) @ torch.randn(20, 1100, generator=g) + 0.05 * torch.randn(1040, 1100, generator=g)
    s = torch.linalg.svdvals(w.double())
    for alpha in (3e-3, 1e-4):  # rank 20 by the randomized search; a high rank by every σ
        th = lcc.RankSelection(alpha=alpha).compress(w, mu=1.0)
        objective = [alpha * r * (1040 + 1100) + 0.5 * float(s[r:].pow(2).sum()) for r in range(len(s) + 1)]
        assert th["U"].shape[1] == objective.index(min(objective))
