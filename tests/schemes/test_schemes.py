"""Each C step against an independent truth on small inputs, and the shared scheme contract."""

import itertools
import math

import numpy as np
import pytest
import torch

import lccompress as lcc
from lccompress.schemes import registry, scheme_from_dict

# one instance of every registered scheme, for the contract tests
EXAMPLES = {
    "prune": lcc.Prune(keep=0.2),
    "l1_ball": lcc.L1Ball(radius=3.0),
    "l0_penalty": lcc.L0Penalty(alpha=0.2),
    "l1_penalty": lcc.L1Penalty(alpha=0.2),
    "codebook": lcc.Codebook(k=4, bins=16),
    "fixed_codebook": lcc.FixedCodebook((-0.5, 0.0, 0.5)),
    "binarize": lcc.Binarize(),
    "scaled_binarize": lcc.ScaledBinarize(),
    "scaled_ternary": lcc.ScaledTernary(),
    "lowrank": lcc.LowRank(3),
    "rank_selection": lcc.RankSelection(alpha=1e-3),
    "additive": lcc.Additive((lcc.Codebook(k=2), lcc.Prune(keep=0.05))),
    "uniform": lcc.Uniform(bits=3, group_size=16),
    "structured": lcc.StructuredPrune(keep=0.5),
    "row_l1_ball": lcc.RowL1Ball(kappa=0.8),
    "sparse_row_l1_ball": lcc.SparseRowL1Ball(kappa=0.8, keep=0.3),
}


def test_every_registered_scheme_has_an_example():
    assert set(EXAMPLES) == set(registry())


@pytest.mark.parametrize("name", sorted(EXAMPLES))
@pytest.mark.parametrize("shape", [(12, 10), (6, 3, 3, 3)])
def test_contract(name, shape):
    s = EXAMPLES[name]
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    w0 = w.clone()
    theta = s.compress(w, mu=1.0)
    assert torch.equal(w, w0)  # the C step does not mutate its input
    d = s.decompress(theta, w.shape)
    assert d.shape == w.shape and d.dtype == w.dtype
    # a projection is idempotent: C(Δ(θ)) = Δ(θ) (the soft threshold of the ℓ1 penalty is not a projection)
    if name != "l1_penalty":
        assert torch.allclose(s.decompress(s.compress(d, theta, mu=1.0), w.shape), d, atol=1e-5)
    assert 0 < s.bits(theta, w.shape)
    assert scheme_from_dict(s.to_dict()) == s
    # same input → same θ
    again = s.compress(w, mu=1.0)
    assert theta.keys() == again.keys() and all(torch.equal(theta[k], again[k]) for k in theta)
    # warm start never hurts
    warm = s.decompress(s.compress(w, theta, mu=1.0), w.shape)
    assert ((w - warm) ** 2).sum() <= ((w - d) ** 2).sum() * (1 + 1e-6) + 1e-9


# ------------------------------------------------------------------ ℓ0 / ℓ1
def _best_support(w, kappa):
    """min ‖w − θ‖² over all supports of size κ: keep w on the support, zero elsewhere."""
    n = w.numel()
    return min(float((w ** 2).sum() - (w[list(s)] ** 2).sum()) for s in itertools.combinations(range(n), kappa))


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("kappa", [1, 3, 6])
def test_prune_equals_brute_force(seed, kappa):
    w = torch.randn(12, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    theta = lcc.Prune(count=kappa).compress(w)
    d = lcc.Prune(count=kappa).decompress(theta, w.shape)
    assert int((d != 0).sum()) == kappa
    assert float(((w - d) ** 2).sum()) == pytest.approx(_best_support(w, kappa), rel=1e-12)


def test_global_prune_spans_tensors_and_matches_brute_force():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 3))  # 6 + 6 weights
    with torch.no_grad():
        model[1].weight.mul_(5)  # the second layer dominates the global top-k
    recipe = lcc.Recipe.single("*.weight", lcc.Prune(count=4), joint=True)
    (group,) = recipe.groups(model)
    params = dict(model.named_parameters())
    out = group.decompress(group.compress(params))
    w = torch.cat([params[p].detach().reshape(-1) for p in group.params])
    got = torch.cat([out[p].reshape(-1) for p in group.params])
    assert int((got != 0).sum()) == 4
    assert float(((w - got) ** 2).sum()) == pytest.approx(_best_support(w, 4), rel=1e-5)
    per = lcc.Recipe.single("*.weight", lcc.Prune(count=2)).groups(model)
    assert len(per) == 2  # per tensor: one constraint each


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("radius", [0.5, 2.0, 100.0])
def test_l1_ball_projection_satisfies_kkt(seed, radius):
    w = torch.randn(30, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    s = lcc.L1Ball(radius=radius)
    p = s.decompress(s.compress(w), w.shape)
    if float(w.abs().sum()) <= radius:
        assert torch.equal(p, w)
        return
    # KKT of min ½‖w − p‖² s.t. ‖p‖₁ ≤ r: ‖p‖₁ = r, and for some τ ≥ 0,
    # w − p = τ·sign(p) where p ≠ 0 and |w| ≤ τ where p = 0
    assert float(p.abs().sum()) == pytest.approx(radius, rel=1e-9)
    nz = p != 0
    tau = (w - p)[nz] * torch.sign(p[nz])
    assert torch.allclose(tau, tau[0].expand_as(tau), atol=1e-9) and float(tau[0]) >= 0
    assert bool((w[~nz].abs() <= tau[0] + 1e-9).all())


@pytest.mark.parametrize("seed", range(4))
def test_l0_penalty_equals_brute_force(seed):
    w = torch.randn(10, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    alpha, mu = 0.3, 2.0
    s = lcc.L0Penalty(alpha=alpha)
    d = s.decompress(s.compress(w, mu=mu), w.shape)
    obj = lambda t: alpha * int((t != 0).sum()) + mu / 2 * float(((w - t) ** 2).sum())  # noqa: E731
    best = min(obj(torch.where(torch.tensor(m, dtype=torch.bool), w, 0.0))
               for m in itertools.product([0, 1], repeat=10))
    assert obj(d) == pytest.approx(best, rel=1e-12)


def test_l1_penalty_is_the_separable_minimizer():
    w = torch.linspace(-2, 2, 41, dtype=torch.float64)
    alpha, mu = 0.3, 2.0
    s = lcc.L1Penalty(alpha=alpha)
    d = s.decompress(s.compress(w, mu=mu), w.shape)
    grid = torch.linspace(-3, 3, 60001, dtype=torch.float64)  # brute force per coordinate
    obj = alpha * grid.abs()[None] + mu / 2 * (w[:, None] - grid[None]) ** 2  # (41, 60001)
    assert torch.allclose(d, grid[obj.argmin(1)], atol=2e-4)


# ------------------------------------------------------------------ quantization
def _kmeans_dp(x: np.ndarray, k: int) -> float:
    """Exact 1-D k-means: clusters are runs of the sorted data; DP over (clusters, prefix)."""
    x = np.sort(x)
    n = len(x)
    s1 = np.concatenate([[0], np.cumsum(x)])
    s2 = np.concatenate([[0], np.cumsum(x * x)])

    def cost(i, j):  # SSE of x[i:j]
        m = j - i
        return s2[j] - s2[i] - (s1[j] - s1[i]) ** 2 / m

    D = np.full((k + 1, n + 1), np.inf)
    D[0, 0] = 0.0
    for c in range(1, k + 1):
        for j in range(c, n + 1):
            D[c, j] = min(D[c - 1, i] + cost(i, j) for i in range(c - 1, j))
    return float(D[k, n])


@pytest.mark.parametrize("dist", ["normal", "mixture", "laplace", "uniform"])
@pytest.mark.parametrize("k", [2, 3, 5, 8])
def test_codebook_distortion_within_0_1_percent_of_the_exact_dp(dist, k):
    g = torch.Generator().manual_seed(k)
    n = 120
    x = {
        "normal": torch.randn(n, generator=g),
        "mixture": torch.cat([torch.randn(n // 3, generator=g) * 0.1 + c for c in (-2.0, 0.3, 1.0)]),
        "laplace": torch.sign(torch.rand(n, generator=g) - 0.5) * -torch.log(torch.rand(n, generator=g)),
        "uniform": torch.rand(n, generator=g),
    }[dist].double()
    s = lcc.Codebook(k=k)
    theta = s.compress(x)
    d = s.decompress(theta, x.shape)
    got = float(((x - d) ** 2).sum())
    assert got <= _kmeans_dp(x.numpy(), k) * 1.001 + 1e-12
    assert theta["codes"].dtype == torch.uint8 and theta["codebook"].numel() == k


def test_codebook_shared_by_several_tensors():
    model = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Linear(5, 3))
    (g,) = lcc.Recipe.single("*.weight", lcc.Codebook(k=3), joint=True).groups(model)
    out = g.decompress(g.compress(dict(model.named_parameters())))
    vals = torch.cat([t.reshape(-1) for t in out.values()]).unique()
    assert vals.numel() == 3  # one codebook for both layers
    w = torch.cat([p.detach().reshape(-1) for p in model.parameters() if p.dim() == 2])
    assert float(((w - torch.cat([t.reshape(-1) for t in out.values()])) ** 2).sum()) <= \
        _kmeans_dp(w.double().numpy(), 3) * 1.001


def test_fixed_codebooks_pick_the_nearest_entry():
    w = torch.randn(200, generator=torch.Generator().manual_seed(0))
    for s, table in ((lcc.FixedCodebook((0.7, -0.4, 0.1)), [-0.4, 0.1, 0.7]), (lcc.Binarize(), [-1.0, 1.0])):
        d = s.decompress(s.compress(w), w.shape)
        t = torch.tensor(table)
        brute = t[(w[:, None] - t[None]).abs().argmin(1)]
        assert torch.equal(d, brute)


def test_scaled_binarize_is_optimal():
    w = torch.randn(50, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    s = lcc.ScaledBinarize()
    err = float(((w - s.decompress(s.compress(w), w.shape)) ** 2).sum())
    cs = torch.linspace(0, 3, 30001, dtype=torch.float64)  # any c ≥ 0 with z = sign(w), the best signs
    brute = float(((w.abs()[None] - cs[:, None]) ** 2).sum(1).min())
    assert err <= brute + 1e-9


def test_scaled_ternary_equals_brute_force_over_all_codes():
    for seed in range(3):
        w = torch.randn(8, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        s = lcc.ScaledTernary()
        err = float(((w - s.decompress(s.compress(w), w.shape)) ** 2).sum())
        best = math.inf
        for z in itertools.product([-1.0, 0.0, 1.0], repeat=8):
            z = torch.tensor(z, dtype=torch.float64)
            if z.abs().sum() == 0:
                continue
            c = max(0.0, float((z * w).sum() / (z * z).sum()))  # optimal scale for these codes
            best = min(best, float(((w - c * z) ** 2).sum()))
        assert err == pytest.approx(best, rel=1e-9)


# ------------------------------------------------------------------ low rank
@pytest.mark.parametrize("shape", [(20, 12), (12, 20), (8, 3, 3, 3)])
@pytest.mark.parametrize("r", [1, 4])
def test_lowrank_meets_eckart_young(shape, r):
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    s = lcc.LowRank(r)
    theta = s.compress(w)
    d = s.decompress(theta, w.shape)
    sv = np.linalg.svd(w.reshape(shape[0], -1).numpy(), compute_uv=False)  # numpy, a second implementation
    assert float(((w - d) ** 2).sum()) == pytest.approx(float((sv[r:] ** 2).sum()), rel=1e-9)
    assert theta["U"].shape == (shape[0], r) and theta["V"].shape == (r, math.prod(shape[1:]))
    assert s.bits(theta, w.shape) == 64 * r * (shape[0] + math.prod(shape[1:]))


def test_rank_selection_minimizes_its_objective():
    w = torch.randn(15, 10, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    alpha, mu = 0.02, 1.5
    s = lcc.RankSelection(alpha=alpha)
    r = s.compress(w, mu=mu)["U"].shape[1]

    def obj(q):  # brute force: reconstruct with a rank-q truncation via numpy
        u, sv, vt = np.linalg.svd(w.numpy(), full_matrices=False)
        approx = (u[:, :q] * sv[:q]) @ vt[:q]
        return alpha * q * (15 + 10) + mu / 2 * float(((w.numpy() - approx) ** 2).sum())

    assert obj(r) == pytest.approx(min(obj(q) for q in range(11)), rel=1e-9)
    assert 0 < r < 10


def test_additive_codebook_plus_sparse_correction():
    w = torch.randn(40, 30, generator=torch.Generator().manual_seed(0))
    w[0, :5] = 8.0  # outliers a 2-entry codebook cannot represent
    cb = lcc.Codebook(k=2)
    both = lcc.Additive((lcc.Codebook(k=2), lcc.Prune(keep=0.01)))
    theta = both.compress(w)
    e_both = float(((w - both.decompress(theta, w.shape)) ** 2).sum())
    e_cb = float(((w - cb.decompress(cb.compress(w), w.shape)) ** 2).sum())
    assert e_both < 0.62 * e_cb
    # each term is the exact projection of the residual the other leaves
    t0 = {k[2:]: v for k, v in theta.items() if k.startswith("0.")}
    t1 = {k[2:]: v for k, v in theta.items() if k.startswith("1.")}
    resid = w - cb.decompress(t0, w.shape)
    p = lcc.Prune(keep=0.01)
    assert torch.equal(p.decompress(p.compress(resid), w.shape), p.decompress(t1, w.shape))
    assert bool((p.decompress(t1, w.shape)[0, :5] != 0).all())  # the outliers went to the sparse term
    assert both.bits(theta, w.shape) == cb.bits(t0, w.shape) + p.bits(t1, w.shape)


@pytest.mark.parametrize("bad, match", [
    (lambda: lcc.Prune(keep=0), "keep=0"),
    (lambda: lcc.Prune(keep=1.5), "keep=1.5"),
    (lambda: lcc.Prune(keep="abc"), "keep='abc'"),
    (lambda: lcc.Prune(), "exactly one"),
    (lambda: lcc.Codebook(k=0), "k=0"),
    (lambda: lcc.LowRank(0), "rank=0"),
    (lambda: lcc.L1Ball(radius=-1), "radius=-1"),
    (lambda: lcc.RankSelection(alpha=1, cost="time"), "cost='time'"),
    (lambda: lcc.Additive((lcc.Prune(keep=0.1),)), "at least two"),
])
def test_bad_hyperparameters_are_named(bad, match):
    with pytest.raises(lcc.ConfigError, match=match):
        bad()


def test_recipe_errors_are_named():
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 3))
    with pytest.raises(lcc.ConfigError, match="'fc9.weight' matches no parameter"):
        lcc.Recipe.single("fc9.weight", lcc.Prune(keep=0.5)).groups(model)
    with pytest.raises(lcc.ConfigError, match="named by rules 1 and 2"):
        lcc.Recipe((lcc.Rule(("0.weight",), lcc.Prune(keep=0.5)),
                    lcc.Rule(("*.weight",), lcc.Codebook(k=2)))).groups(model)
    with pytest.raises(lcc.ConfigError, match="one tensor at a time"):
        lcc.Rule(("*.weight",), lcc.LowRank(1), joint=True)
    r = lcc.Recipe((lcc.Rule(("0.weight",), lcc.Prune(keep=0.5)), lcc.Rule(("1.*",), lcc.Codebook(k=2), True)))
    assert lcc.Recipe.from_dict(r.to_dict()) == r

