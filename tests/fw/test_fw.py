"""Frank-Wolfe: each LMO against a brute-force minimum over its set's extreme points (or the SVD
closed form), each gauge against an LP / a dual program, and the SFW contracts (iterates stay in
the ball, no mutation, same seed → same bytes, fw_grow's non-zero budget), and fw_grow's row ℓ1
LMO against brute force over its restricted face, with implicit models kept well-posed."""

import copy
import hashlib
import itertools
import logging

import pytest
import torch

import lccompress as lcc
from lccompress import fw
from lccompress.implicit import ImplicitNet


def _g(*shape, seed=0, dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _dot(a, b):
    return float((a * b).sum())


# ----------------------------------------------------------------------------- vector LMOs
@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("k", [1, 2, 3])
def test_k_sparse_lmo_is_the_best_vertex(seed, k):
    n, r = 6, 0.7
    g = _g(n, seed=seed)
    # every vertex of conv{v ∈ {0, ±r}ⁿ : ‖v‖₀ ≤ k}
    best = min(_dot(g, torch.tensor(v, dtype=g.dtype)) for v in itertools.product((-r, 0.0, r), repeat=n)
               if sum(x != 0 for x in v) <= k)
    v = fw.KSparsePolytope(k=k, radius=r).lmo(g)
    assert _dot(g, v) == pytest.approx(best, rel=1e-12)
    assert set(v.abs().unique().tolist()) <= {0.0, r} and int((v != 0).sum()) <= k


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("k", [1, 2, 4, 7])
def test_k_support_lmo_is_the_best_sparse_unit_vector(seed, k):
    n, r = 7, 1.3
    g = _g(n, seed=seed)
    # extreme points: ‖v‖₀ ≤ k, ‖v‖₂ = r; on a support I the best is −r·g_I/‖g_I‖ (Cauchy–Schwarz)
    best = min(-r * float(g[list(I)].norm()) for I in itertools.combinations(range(n), k))
    v = fw.KSupportBall(k=k, radius=r).lmo(g)
    assert _dot(g, v) == pytest.approx(best, rel=1e-12)
    assert int((v != 0).sum()) <= k and float(v.norm()) == pytest.approx(r)


def test_l2_lmo_is_cauchy_schwarz():
    g = _g(3, 4, seed=1)
    v = fw.L2Ball(radius=2.0).lmo(g)
    assert _dot(g, v) == pytest.approx(-2.0 * float(g.norm()))
    assert float(v.norm()) == pytest.approx(2.0)


@pytest.mark.parametrize("shape", [(6, 4), (5, 2, 2, 2)])
@pytest.mark.parametrize("k", [1, 2, 3])
def test_group_k_support_lmo_is_the_best_row_subset(shape, k):
    g, r = _g(*shape, seed=k), 0.9
    rows = g.reshape(shape[0], -1)
    best = min(-r * float(rows[list(I)].norm()) for I in itertools.combinations(range(shape[0]), k))
    v = fw.GroupKSupport(k=k, radius=r).lmo(g)
    assert v.shape == g.shape
    assert _dot(g, v) == pytest.approx(best, rel=1e-12)
    assert int((v.reshape(shape[0], -1).norm(dim=1) > 0).sum()) <= k


def test_k_as_a_fraction():
    g = _g(40, seed=3)
    v = fw.KSparsePolytope(k=0.1, radius=1.0).lmo(g)  # κ = 4
    assert int((v != 0).sum()) == 4
    assert set(torch.topk(g.abs(), 4).indices.tolist()) == set(v.nonzero().reshape(-1).tolist())


# ----------------------------------------------------------------------------- spectral LMOs
def _gapped(m, n, seed):
    """A matrix with singular values 10·0.8ⁱ (a decaying spectrum, like a gradient's)."""
    q = min(m, n)
    U = torch.linalg.qr(_g(m, q, seed=seed)).Q
    V = torch.linalg.qr(_g(n, q, seed=seed + 1)).Q
    s = 10 * 0.8 ** torch.arange(q, dtype=torch.float64)
    return (U * s) @ V.T


@pytest.mark.parametrize("shape", [(60, 40), (6, 5)])  # power iteration, and full SVD (small)
@pytest.mark.parametrize("k", [1, 3])
def test_spectral_lmos_match_the_svd_closed_form(shape, k):
    g, r = _gapped(*shape, seed=k), 1.7
    U, S, Vh = torch.linalg.svd(g, full_matrices=False)
    # spectral k-support: argmin over rank ≤ k, ‖V‖_F ≤ r is −r·U_k Σ_k V_kᵀ/‖σ_k‖ (von Neumann)
    want = -r * (U[:, :k] * (S[:k] / S[:k].norm())) @ Vh[:k]
    v = fw.SpectralKSupport(k=k, radius=r).lmo(g)
    assert _dot(g, v) == pytest.approx(-r * float(S[:k].norm()), rel=1e-9)
    torch.testing.assert_close(v, want, atol=1e-6, rtol=0)
    # spectral k-sparse polytope: −r·U_k V_kᵀ, value −r·Σ_{i≤k} σᵢ
    v = fw.SpectralKSparse(k=k, radius=r).lmo(g)
    assert _dot(g, v) == pytest.approx(-r * float(S[:k].sum()), rel=1e-9)
    torch.testing.assert_close(v, -r * U[:, :k] @ Vh[:k], atol=1e-6, rtol=0)
    # nuclear ball: −r·u₁v₁ᵀ, value −r·σ₁
    v = fw.NuclearBall(radius=r).lmo(g)
    assert _dot(g, v) == pytest.approx(-r * float(S[0]), rel=1e-9)


def test_spectral_lmo_reshapes_conv_kernels():
    g = _g(8, 3, 3, 3, seed=5)
    v = fw.SpectralKSupport(k=2, radius=1.0).lmo(g)
    assert v.shape == g.shape
    S = torch.linalg.svdvals(g.reshape(8, -1))
    assert _dot(g, v) == pytest.approx(-float(S[:2].norm()), rel=1e-9)
    assert int(torch.linalg.matrix_rank(v.reshape(8, -1))) == 2


def test_spectral_lmo_is_deterministic_in_float32():
    g = _gapped(50, 30, seed=9).float()
    a, b = fw.SpectralKSupport(k=2, radius=1.0).lmo(g), fw.SpectralKSupport(k=2, radius=1.0).lmo(g)
    assert torch.equal(a, b)


# ----------------------------------------------------------------------------- gauges
@pytest.mark.parametrize("seed", range(3))
def test_k_sparse_norm_is_the_gauge_of_the_vertex_hull(seed):
    opt = pytest.importorskip("scipy.optimize")
    n, k = 5, 2
    x = _g(n, seed=seed)
    verts = [v for v in itertools.product((-1.0, 0.0, 1.0), repeat=n) if 0 < sum(a != 0 for a in v) <= k]
    A = torch.tensor(verts, dtype=torch.float64).T.numpy()  # (n, #vertices)
    # gauge(x) = min Σλ s.t. Σ λⱼ vⱼ = x, λ ≥ 0 (the unit polytope is symmetric, so 0 is inside)
    lp = opt.linprog(c=[1.0] * A.shape[1], A_eq=A, b_eq=x.numpy(), bounds=(0, None))
    assert fw.KSparsePolytope(k=k).norm(x) == pytest.approx(lp.fun, rel=1e-7)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("k", [2, 3])
def test_k_support_norm_equals_its_dual_program(seed, k):
    opt = pytest.importorskip("scipy.optimize")
    n = 6
    x = _g(n, seed=seed).numpy()
    # ‖x‖_sp = max ⟨u, x⟩ s.t. Σ_{i∈I} uᵢ² ≤ 1 for every |I| = k (the dual norm is the top-k ℓ2 norm)
    cons = [{"type": "ineq", "fun": (lambda u, I=list(I): 1 - (u[I] ** 2).sum())}
            for I in itertools.combinations(range(n), k)]
    res = opt.minimize(lambda u: -(u @ x), x / abs(x).sum(), constraints=cons, method="SLSQP",
                       options={"ftol": 1e-12, "maxiter": 500})
    assert fw.KSupportBall(k=k).norm(torch.tensor(x)) == pytest.approx(-res.fun, rel=1e-6)


def test_k_support_norm_limits():
    x = _g(9, seed=4)
    assert fw.KSupportBall(k=1).norm(x) == pytest.approx(float(x.abs().sum()))  # ℓ1
    assert fw.KSupportBall(k=9).norm(x) == pytest.approx(float(x.norm()))  # ℓ2


def test_radius_from_puts_the_reference_on_the_boundary():
    w = _g(5, 4, seed=2)
    want = 2 * max(float(w.abs().max()), float(w.abs().sum()) / 3)
    assert fw.KSparsePolytope(k=3).radius_from(w, 2.0) == pytest.approx(want)
    assert fw.NuclearBall().radius_from(w) == pytest.approx(float(torch.linalg.svdvals(w).sum()))


@pytest.mark.parametrize("bad", [dict(k=0), dict(k=1.5), dict(k=True), dict(radius=-1.0), dict(radius=float("inf"))])
def test_bad_hyperparameters_raise(bad):
    with pytest.raises(lcc.ConfigError):
        fw.KSupportBall(**bad)


def test_count_above_the_size_raises():
    with pytest.raises(lcc.ConfigError, match="k=9"):
        fw.KSparsePolytope(k=9, radius=1.0).lmo(torch.ones(4))


# ----------------------------------------------------------------------------- SFW
def _inside(constraints, ref_norms, slack=1.0):
    """A callback checking every iterate against the radius computed from the reference."""
    seen = []

    def cb(step, model):
        p = dict(model.named_parameters())
        for name, norm in constraints.items():
            assert norm(p[name].detach().double()) <= slack * ref_norms[name] * (1 + 1e-6), (step, name)
        seen.append(step)

    return cb, seen


@pytest.mark.parametrize("rescale,lr", [("gradient", 5.0), (None, 0.3), ("diameter", 0.5)])
def test_sfw_iterates_stay_in_the_ball(toy, rescale, lr):
    model, loader = toy
    ksparse = lambda w: max(float(w.abs().max()), float(w.abs().sum()) / 7)  # noqa: E731  k = 7
    spectral = lambda w: max(float(torch.linalg.svdvals(w).max()), float(torch.linalg.svdvals(w).sum()) / 2)  # noqa: E731
    norms = {"fc1.weight": ksparse, "fc2.weight": spectral}
    ref = {n: f(dict(model.named_parameters())[n].detach().double()) for n, f in norms.items()}
    cb, seen = _inside(norms, ref)
    out = fw.sfw_refine(model, loader, {"fc1.weight": fw.KSparsePolytope(k=7), "fc2.weight": fw.SpectralKSparse(k=2)},
                        epochs=3, lr=lr, rescale=rescale, callback=cb)
    assert len(seen) == 9
    assert not torch.equal(out.fc1.weight, model.fc1.weight)


def test_sfw_slack_below_one_starts_inside_the_smaller_ball(toy):
    model, loader = toy
    l2 = lambda w: float(w.norm())  # noqa: E731
    ref = {"fc1.weight": l2(model.fc1.weight.detach().double())}
    cb, seen = _inside({"fc1.weight": l2}, ref, slack=0.5)
    fw.sfw_refine(model, loader, {"fc1.weight": fw.L2Ball()}, epochs=1, lr=0.2, rescale=None, slack=0.5, callback=cb)
    assert seen


def test_sfw_joint_constraint_spans_tensors(toy):
    model, loader = toy
    ws = [model.fc1.weight.detach().double(), model.fc2.weight.detach().double()]
    flat = torch.cat([w.reshape(-1) for w in ws])
    r = max(float(flat.abs().max()), float(flat.abs().sum()) / 10)
    out = fw.sfw_refine(model, loader, {("fc1.weight", "fc2.weight"): fw.KSparsePolytope(k=10)},
                        epochs=2, lr=0.3, rescale=None)
    x = torch.cat([out.fc1.weight.detach().double().reshape(-1), out.fc2.weight.detach().double().reshape(-1)])
    assert max(float(x.abs().max()), float(x.abs().sum()) / 10) <= r * (1 + 1e-6)


def test_sfw_same_seed_same_bytes_and_input_untouched(toy):
    model, loader = toy
    before = {k: v.clone() for k, v in model.state_dict().items()}
    run = lambda: fw.sfw_refine(model, loader, {"fc*.weight": fw.KSupportBall(k=0.2)}, epochs=2, lr=0.2,  # noqa: E731
                                rescale=None)
    a, b = run(), run()
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k])
        assert torch.equal(model.state_dict()[k], before[k])


def test_sfw_bad_options_raise(toy):
    model, loader = toy
    with pytest.raises(lcc.ConfigError, match="nope"):
        fw.sfw_refine(model, loader, {"nope": fw.L2Ball()}, epochs=1, lr=0.1)
    with pytest.raises(lcc.ConfigError, match="rescale"):
        fw.sfw_refine(model, loader, {"fc1.weight": fw.L2Ball()}, epochs=1, lr=0.1, rescale="sometimes")
    with pytest.raises(lcc.ConfigError, match="one by one"):
        fw.sfw_refine(model, loader, {("fc1.weight", "fc2.weight"): fw.NuclearBall()}, epochs=1, lr=0.1)
    with pytest.raises(lcc.ConfigError, match="constrained by both"):
        fw.sfw_refine(model, loader, {"fc1.weight": fw.L2Ball(), "fc*.weight": fw.L2Ball()}, epochs=1, lr=0.1)


# ----------------------------------------------------------------------------- fw_grow, one-shot
@pytest.mark.parametrize("count", [1, 7, 40])
def test_fw_grow_respects_the_non_zero_budget(toy, count):
    model, loader = toy
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out = fw.fw_grow(model, model, loader, count=count, epochs=4, lr=2.0)
    nnz = int((out.fc1.weight != 0).sum()) + int((out.fc2.weight != 0).sum())
    assert 0 < nnz <= count
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    again = fw.fw_grow(model, model, loader, count=count, epochs=4, lr=2.0)
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in out.state_dict().items())


def test_fw_grow_learns_from_the_teacher(toy):
    model, loader = toy
    out = fw.fw_grow(model, model, loader, count=40, epochs=30, lr=2.0)
    X = torch.cat([x for x, _ in loader])
    agree = float((out(X).argmax(1) == model(X).argmax(1)).float().mean())
    # the biases alone (all weights zero) give one constant class: the grown weights must beat that
    base = float((model(X).argmax(1) == torch.bincount(model(X).argmax(1)).argmax()).float().mean())
    assert agree > base + 0.1


def test_fw_grow_bad_count_raises(toy):
    model, loader = toy
    with pytest.raises(lcc.ConfigError, match="count=1000"):
        fw.fw_grow(model, model, loader, count=1000, epochs=1, lr=1.0)


def test_fw_grow_path_is_unchanged(toy):
    # the non-zeros and weights that fw_grow(count=...) gave before GrowSet existed; the third
    # start has fc2 × 8, so the per-tensor radii r_l decide which coordinates enter the support
    model, loader = toy
    scaled = copy.deepcopy(model)
    with torch.no_grad():
        scaled.fc2.weight.mul_(8)
    old = [(model, 7, [86, 87, 93, 97, 98, 99, 105], 0.8911482095718384),
           (model, 40, "e6c7e58cf550001c", 1.8232592344284058),
           (scaled, 25, "17930e842d45e1c9", 1.417526364326477)]
    for start, count, support, l1 in old:
        out = fw.fw_grow(start, model, loader, count=count, epochs=4, lr=2.0)
        flat = torch.cat([out.fc1.weight.detach().reshape(-1), out.fc2.weight.detach().reshape(-1)])
        idx = flat.nonzero().reshape(-1).tolist()
        assert (idx if count == 7 else hashlib.sha256(str(idx).encode()).hexdigest()[:16]) == support
        assert float(flat.abs().sum()) == pytest.approx(l1, rel=1e-5)
        # the same constraint as one GrowSet: the same bytes
        via = fw.fw_grow(start, model, loader, sets=[fw.GrowSet(("fc1.weight", "fc2.weight"), count)],
                         epochs=4, lr=2.0)
        assert all(torch.equal(v, via.state_dict()[k]) for k, v in out.state_dict().items())


def test_fw_grow_one_tensor(toy):
    model, loader = toy
    out = fw.fw_grow(model, model, loader, count=5, params=["fc1.weight"], epochs=2, lr=2.0)
    assert 0 < int((out.fc1.weight != 0).sum()) <= 5
    assert not torch.equal(out.fc2.weight, model.fc2.weight)  # a dense parameter: SGD steps


# ----------------------------------------------------------------------------- fw_grow, row ℓ1 balls
def _restricted_face_min(m, kappa, S, per_step, count, row_count):
    """min ⟨m, v⟩ over every vertex of the face: each row 0 or ±kappa·e_j, j ∈ S_i ∪ N_i, with N the
    top min(count − |S|, per_step) non-zero |m_ij| outside S in rows below row_count."""
    rows, D = m.shape
    full = [row_count is not None and int(S[i].sum()) >= row_count for i in range(rows)]
    outside = sorted(((float(m[i, j].abs()), i, j) for i in range(rows) for j in range(D)
                      if not S[i, j] and m[i, j] != 0 and not full[i]), reverse=True)
    cand = S.clone()
    for _, i, j in outside[:max(0, min(count - int(S.sum()), per_step))]:
        cand[i, j] = True
    options = [[0.0] + [s * kappa * float(m[i, j]) for j in range(D) if cand[i, j] for s in (-1, 1)]
               for i in range(rows)]
    return min(sum(c) for c in itertools.product(*options))


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("per_step,count,row_count", [(1, 5, None), (3, 6, 2), (8, 7, 1), (2, 12, 3)])
def test_row_ball_vertex_is_the_best_vertex_of_the_restricted_face(seed, per_step, count, row_count):
    kappa = 0.8
    g = torch.Generator().manual_seed(seed)
    S = torch.rand(3, 4, generator=g) < 0.25  # a support grown so far, within the caps
    while int(S.sum()) > count - 1 or (row_count is not None and int(S.sum(1).max()) > row_count):
        S[torch.nonzero(S)[0].unbind()] = False
    m = _g(3, 4, seed=seed)
    m[0, 1] = 0.0  # a zero score is never a candidate
    want = _restricted_face_min(m, kappa, S, per_step, count, row_count)
    before = S.clone()
    v = fw.row_ball_vertex(m, kappa, S, per_step, count, row_count)
    assert _dot(m, v) == pytest.approx(want, rel=1e-12)
    assert ((v != 0).sum(1) <= 1).all() and set(v.abs().unique().tolist()) <= {0.0, kappa}
    assert torch.equal(S, before | (v != 0))  # the support is updated in place
    assert int(S.sum()) <= count and (row_count is None or int(S.sum(1).max()) <= row_count)
    assert int((S & ~before).sum(1).max()) <= 1


@pytest.mark.parametrize("row_count", [None, 2])
def test_row_ball_supports_fill_to_their_caps(row_count):
    kappa, count = 0.6, 9
    S = torch.zeros(4, 5, dtype=torch.bool)
    x = torch.zeros(4, 5, dtype=torch.float64)
    for step in range(60):
        m = _g(4, 5, seed=100 + step)
        v = fw.row_ball_vertex(m, kappa, S, 2, count, row_count)
        assert (v[~S] == 0).all() and int(S.sum()) <= count
        assert row_count is None or int(S.sum(1).max()) <= row_count
        x = torch.lerp(x, v, 0.3)
        assert float(x.abs().sum(1).max()) <= kappa * (1 + 1e-12)  # every iterate in the row ℓ1 balls
    assert int(S.sum()) == (count if row_count is None else min(count, 4 * row_count))


class _Spy(ImplicitNet):
    """Records ‖A‖∞ at every forward (training iterates included)."""

    def forward(self, u):
        self.seen = getattr(self, "seen", []) + [self.well_posedness()]
        return super().forward(u)


@pytest.fixture
def implicit():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(128, 8, generator=g)
    y = (X[:, 0] + X[:, 1] > 0).long() + (X[:, 2] > 1).long()
    torch.manual_seed(0)
    return _Spy(8, 12, 3), [(X[i:i + 32], y[i:i + 32]) for i in range(0, 128, 32)]


def _nll(model, loader, teacher=None):
    with torch.no_grad():
        X, y = torch.cat([x for x, _ in loader]), torch.cat([t for _, t in loader])
        if teacher is None:
            return float(torch.nn.functional.cross_entropy(model(X), y))
        return float(torch.nn.functional.kl_div(model(X).log_softmax(1), teacher(X).log_softmax(1),
                                                log_target=True, reduction="batchmean"))


@pytest.mark.parametrize("distill", [False, True])
def test_fw_grow_implicit_net_in_the_sparse_well_posed_set(implicit, distill):
    """A and B both from zero (the state starts at relu's kink, where the backward takes relu'(0) = 1)."""
    model, loader = implicit
    torch.manual_seed(1)
    teacher = ImplicitNet(8, 12, 3) if distill else None
    kappa, count_a, row_count, count_b = 0.9, 30, 3, 24
    sets = [fw.GrowSet(("A",), count_a, kappa=kappa, row_count=row_count), fw.GrowSet(("B",), count_b)]
    out = fw.fw_grow(model, teacher, loader, sets=sets, epochs=20, lr=1.0)
    A, B = out.A.detach(), out.B.detach()
    assert 0 < int((A != 0).sum()) <= count_a and int((A != 0).sum(1).max()) <= row_count
    assert 0 < int((B != 0).sum()) <= count_b
    assert out.seen and max(out.seen) <= kappa + 1e-6  # ‖A‖∞ ≤ kappa at every iterate
    assert not torch.equal(out.C, model.C) and not torch.equal(out.D, model.D)  # dense: trained
    zero = copy.deepcopy(model)
    with torch.no_grad():
        zero.A.zero_(), zero.B.zero_()
    assert _nll(out, loader, teacher) < 0.9 * _nll(zero, loader, teacher)
    for name in ("A", "B"):  # the grown weights contribute
        without = copy.deepcopy(out)
        with torch.no_grad():
            getattr(without, name).zero_()
        assert _nll(out, loader, teacher) < _nll(without, loader, teacher)


def test_fw_grow_says_so_when_a_set_grows_nothing(implicit, caplog):
    model, loader = implicit

    class Unused(torch.nn.Module):  # a weight the loss does not depend on: no gradient, no growth
        def __init__(self):
            super().__init__()
            self.net, self.W = copy.deepcopy(model), torch.nn.Parameter(torch.ones(3, 4))

        def forward(self, u):
            return self.net(u)

    with caplog.at_level(logging.WARNING, logger="lccompress"):
        out = fw.fw_grow(Unused(), None, loader, sets=[fw.GrowSet(("W",), 5)], epochs=1, lr=5.0)
    assert int((out.W != 0).sum()) == 0 and "W grew no weight" in caplog.text


def test_grow_set_and_fw_grow_bad_input_raises(implicit):
    model, loader = implicit
    bad_sets = [dict(params=("A", "B"), count=3, kappa=0.5), dict(params=(), count=3), dict(params="A", count=3),
                dict(params=("A",), count=0), dict(params=("A",), count=2.0), dict(params=("A",), count=3, kappa=0.0),
                dict(params=("B",), count=3, row_count=2), dict(params=("A",), count=3, kappa=0.5, row_count=0),
                dict(params=("A", "A"), count=3)]
    for bad in bad_sets:
        with pytest.raises(lcc.ConfigError, match="GrowSet"):
            fw.GrowSet(**bad)
    run = lambda **kw: fw.fw_grow(model, None, loader, epochs=1, lr=1.0, **kw)  # noqa: E731
    with pytest.raises(lcc.ConfigError, match="both sets"):
        run(sets=[fw.GrowSet(("A",), 3, kappa=0.5), fw.GrowSet(("B", "A"), 3)])
    with pytest.raises(lcc.ConfigError, match="count=145"):
        run(sets=[fw.GrowSet(("A",), 145, kappa=0.5)])
    with pytest.raises(lcc.ConfigError, match="row_count=13"):
        run(sets=[fw.GrowSet(("A",), 5, kappa=0.5, row_count=13)])
    with pytest.raises(lcc.ConfigError, match="no parameter"):
        run(sets=[fw.GrowSet(("E",), 5)])
    with pytest.raises(lcc.ConfigError, match="not both"):
        run(count=3, sets=[fw.GrowSet(("A",), 3)])
    with pytest.raises(lcc.ConfigError, match="count="):
        run()
    with pytest.raises(lcc.ConfigError, match="reference=None"):
        fw.fw_grow(model, model, loader, sets=[fw.GrowSet(("A",), 3)], epochs=1, lr=1.0, loss="ce")


def test_constraints_for_a_recipe(toy):
    model, _ = toy
    recipe = lcc.Recipe((lcc.Rule(("fc1.weight", "fc2.weight"), lcc.Prune(keep=0.1), joint=True),))
    assert fw.constraints_for(recipe, model) == {("fc1.weight", "fc2.weight"): fw.KSparsePolytope(k=0.1)}
    recipe = lcc.Recipe((lcc.Rule(("fc1.weight",), lcc.LowRank(50)), lcc.Rule(("fc2.weight",), lcc.Codebook(k=4))))
    assert fw.constraints_for(recipe, model) == {"fc1.weight": fw.SpectralKSupport(k=6), "fc2.weight": fw.L2Ball()}


def test_prune_filters_keeps_the_rows_of_largest_norm(toy):
    model, _ = toy
    out = fw.prune_filters(model, ["fc1.weight"], keep=0.25)
    rows = model.fc1.weight.detach().norm(dim=1)
    keep = set(torch.topk(rows, 3).indices.tolist())
    for i in range(12):
        assert torch.equal(out.fc1.weight[i], model.fc1.weight[i] if i in keep else torch.zeros(6))
