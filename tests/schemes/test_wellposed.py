"""Well-posedness schemes (row ℓ1 balls, with and without sparsity) against independent truths:
a per-row loop over `project_l1_ball`, brute force over the faces of the ℓ1 ball, over supports
and over allocations of a global budget; then the contract, the container and ONNX."""

import copy
import functools
import itertools

import numpy as np
import onnxruntime as ort
import pytest
import torch

import lccompress as lcc
from lccompress.artifact import export_onnx, load, save
from lccompress.schemes import project_l1_ball, scheme_from_dict
from lccompress.schemes.wellposed import row_errors
from nets import make

F64 = torch.float64


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _dense(s, w):
    return s.decompress(s.compress(w), w.shape)


def _rowl1(d):
    return d.reshape(d.shape[0], -1).abs().sum(1)


# ------------------------------------------------------------------ brute force, written here
def _brute_l1(w, kappa):
    """Projection of the vector w onto {‖θ‖₁ ≤ κ} by enumeration: w itself when inside; else the
    projection lies in the relative interior of a face {θ_S·σ = κ, θ_j = 0 off S, sign θ_S = σ},
    whose affine hull's projection is θ_S = w_S − ((σ·w_S − κ)/|S|)σ. The nearest feasible
    candidate over all supports S and sign patterns σ (and θ = 0) is the projection."""
    return torch.tensor(_brute_l1_tuple(tuple(float(x) for x in w.reshape(-1)), kappa), dtype=F64)


@functools.lru_cache(maxsize=None)
def _brute_l1_tuple(w, kappa):
    if sum(abs(x) for x in w) <= kappa:
        return w
    n = len(w)
    best, best_err = (0.0,) * n, sum(x * x for x in w)
    for k in range(1, n + 1):
        for S in itertools.combinations(range(n), k):
            for sig in itertools.product([-1.0, 1.0], repeat=k):
                shift = (sum(g * w[i] for g, i in zip(sig, S)) - kappa) / k
                t = [w[i] - shift * g for g, i in zip(sig, S)]
                if all(g * x >= -1e-12 for g, x in zip(sig, t)):  # on the face: feasible, ‖θ‖₁ = κ
                    th = [0.0] * n
                    for i, x in zip(S, t):
                        th[i] = x
                    err = sum((a - b) ** 2 for a, b in zip(w, th))
                    if err < best_err:
                        best, best_err = tuple(th), err
    return best


def _brute_sparse_row(w, kappa, s):
    """min ‖w − θ‖² s.t. ‖θ‖₁ ≤ κ, ‖θ‖₀ ≤ s: every support of size ≤ s, projected by `_brute_l1`."""
    w = tuple(float(x) for x in w.reshape(-1))
    total = sum(x * x for x in w)
    best = total  # the empty support
    for k in range(1, s + 1):
        for S in itertools.combinations(range(len(w)), k):
            sub = tuple(w[i] for i in S)
            p = _brute_l1_tuple(sub, kappa)
            best = min(best, total - sum(x * x for x in sub) + sum((a - b) ** 2 for a, b in zip(sub, p)))
    return best


def _tiny(seed, shape, ties=False):
    w = torch.randn(*shape, generator=_gen(seed), dtype=F64)
    return torch.round(w * 2) / 2 if ties else w  # ties: equal magnitudes and zeros


# ------------------------------------------------------------------ RowL1Ball
@pytest.mark.parametrize("shape", [(17, 30), (8, 3, 3, 3), (5, 1), (1, 200)])
@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("kappa", [0.3, 2.0, 9.0])
def test_row_l1_ball_equals_per_row_project_l1_ball(shape, dtype, kappa):
    w = torch.randn(*shape, generator=_gen(1), dtype=dtype)
    got = _dense(lcc.RowL1Ball(kappa=kappa), w)
    want = torch.stack([project_l1_ball(r, kappa) for r in w.reshape(shape[0], -1)]).reshape(shape)
    assert got.dtype == dtype and got.shape == w.shape
    assert torch.allclose(got, want, rtol=0, atol=1e-12 if dtype == F64 else 1e-6)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("shape", [(6, 4), (5, 3), (4, 2), (3, 1)])
@pytest.mark.parametrize("kappa", [0.25, 1.0, 2.5])
def test_row_l1_ball_equals_brute_force_over_faces(seed, shape, kappa):
    w = _tiny(seed, shape, ties=seed % 2 == 1)
    got = _dense(lcc.RowL1Ball(kappa=kappa), w)
    want = torch.stack([_brute_l1(r, kappa) for r in w])
    assert torch.allclose(got, want, rtol=0, atol=1e-9)


def test_row_l1_ball_is_feasible_and_the_identity_inside():
    w = torch.randn(40, 64, generator=_gen(2))
    w[::3] *= 1e-3  # every third row already inside the ball: left exactly as it is
    d = _dense(lcc.RowL1Ball(kappa=0.7), w)
    assert bool((_rowl1(d) <= 0.7 + 1e-6).all())
    assert torch.equal(d[::3], w[::3])
    assert torch.allclose(_rowl1(d)[1::3], torch.tensor(0.7), atol=1e-5)  # active rows: on the sphere
    small = w * (0.5 / float(_rowl1(w).max()))
    assert torch.equal(_dense(lcc.RowL1Ball(kappa=0.5001), small), small)


# ------------------------------------------------------------------ SparseRowL1Ball
@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("shape", [(4, 6), (3, 5), (5, 3)])
@pytest.mark.parametrize("s", [1, 2, 3])
@pytest.mark.parametrize("kappa", [0.4, 1.5, 20.0])
def test_sparse_row_l1_ball_equals_brute_force_per_row(seed, shape, s, kappa):
    w = _tiny(seed, shape, ties=seed == 2)
    sch = lcc.SparseRowL1Ball(kappa=kappa, count=s)
    d = _dense(sch, w)
    assert bool(((d != 0).sum(1) <= s).all()) and bool((_rowl1(d) <= kappa + 1e-9).all())
    brute = sum(_brute_sparse_row(r, kappa, s) for r in w)
    assert float(((w - d) ** 2).sum()) == pytest.approx(brute, rel=1e-9, abs=1e-9)


def test_sparse_row_keep_is_a_fraction_of_each_row():
    w = torch.randn(7, 20, generator=_gen(3), dtype=F64)
    d = _dense(lcc.SparseRowL1Ball(kappa=100.0, keep=0.25), w)  # ℓ1 inactive: top 5 of each row
    want = torch.zeros_like(w)
    top = w.abs().topk(5, 1).indices
    want.scatter_(1, top, w.gather(1, top))
    assert torch.equal(d, want)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("kappa", [0.5, 1.5])
def test_row_errors_is_the_brute_force_table(seed, kappa):
    w = _tiny(seed, (3, 5), ties=seed == 1)
    f = row_errors(w, kappa)
    want = torch.tensor([[_brute_sparse_row(r, kappa, s) for s in range(6)] for r in w], dtype=F64)
    assert torch.allclose(f, want, rtol=0, atol=1e-9)
    dec = want[:, :-1] - want[:, 1:]
    assert bool((dec[:, :-1] >= dec[:, 1:] - 1e-9).all())  # the premise of the greedy: convex in s


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("shape", [(3, 4), (4, 3), (2, 5)])
@pytest.mark.parametrize("kappa", [0.4, 1.2])
def test_global_budget_equals_brute_force_over_allocations(seed, shape, kappa):
    w = _tiny(seed, shape, ties=seed == 3)
    m, D = shape
    table = [[_brute_sparse_row(r, kappa, s) for s in range(D + 1)] for r in w]
    for K in range(1, m * D + 1):
        d = _dense(lcc.SparseRowL1Ball(kappa=kappa, count=K, per_row=False), w)
        assert int((d != 0).sum()) <= K and bool((_rowl1(d) <= kappa + 1e-9).all())
        brute = min(sum(table[i][a[i]] for i in range(m))
                    for a in itertools.product(range(D + 1), repeat=m) if sum(a) <= K)
        assert float(((w - d) ** 2).sum()) == pytest.approx(brute, rel=1e-9, abs=1e-9), K


def test_global_budget_beats_an_even_split():
    w = torch.randn(30, 40, generator=_gen(4))
    w[:5] *= 4  # rows that deserve more of the budget
    err = lambda s: float(((w - _dense(s, w)) ** 2).sum())  # noqa: E731
    glob = lcc.SparseRowL1Ball(kappa=2.0, count=300, per_row=False)
    even = lcc.SparseRowL1Ball(kappa=2.0, count=10)
    assert int((_dense(glob, w) != 0).sum()) <= 300
    assert err(glob) <= err(even) * (1 + 1e-6)


# ------------------------------------------------------------------ hyperparameters and contract
@pytest.mark.parametrize("bad", [0, -1.0, float("nan"), float("inf"), True, "1", None])
def test_bad_kappa(bad):
    with pytest.raises(lcc.ConfigError, match="kappa"):
        lcc.RowL1Ball(kappa=bad)
    with pytest.raises(lcc.ConfigError, match="kappa"):
        lcc.SparseRowL1Ball(kappa=bad, keep=0.5)


@pytest.mark.parametrize("kw,what", [({"keep": 0.0}, "keep"), ({"keep": 1.5}, "keep"), ({"keep": -0.2}, "keep"),
                                     ({"keep": float("nan")}, "keep"), ({}, "keep"), ({"count": 0}, "count"),
                                     ({"count": 2.5}, "count"), ({"keep": 0.5, "count": 2}, "keep"),
                                     ({"keep": 0.5, "per_row": "yes"}, "per_row")])
def test_bad_sparsity(kw, what):
    with pytest.raises(lcc.ConfigError, match=what):
        lcc.SparseRowL1Ball(kappa=1.0, **kw)
    with pytest.raises(lcc.ConfigError, match=what):
        scheme_from_dict({"scheme": "sparse_row_l1_ball", "kappa": 1.0, **kw})


def test_count_above_the_row_length_is_an_error():
    with pytest.raises(lcc.ConfigError, match="count=9"):
        lcc.SparseRowL1Ball(kappa=1.0, count=9).compress(torch.randn(3, 8))


CASES = [lcc.RowL1Ball(kappa=0.8), lcc.SparseRowL1Ball(kappa=0.8, keep=0.3),
         lcc.SparseRowL1Ball(kappa=0.8, keep=0.2, per_row=False)]


@pytest.mark.parametrize("s", CASES, ids=lambda s: repr(s))
@pytest.mark.parametrize("shape", [(12, 10), (6, 3, 3, 3), (9,)])
def test_contract(s, shape):
    w = torch.randn(*shape, generator=_gen(5))
    w0 = w.clone()
    theta = s.compress(w)
    assert torch.equal(w, w0)
    assert theta["indices"].dtype == torch.int64 and bool((theta["indices"].diff() > 0).all())
    d = s.decompress(theta, w.shape)
    assert d.shape == w.shape and d.dtype == w.dtype and int((d != 0).sum()) == theta["values"].numel()
    assert torch.allclose(_dense(s, d), d, atol=1e-6)  # idempotent
    assert scheme_from_dict(s.to_dict()) == s and s.lc_defaults == lcc.Prune.lc_defaults
    assert 0 < s.bits(theta, w.shape)
    info = s.summary(theta, w.shape)
    rows = d.reshape(shape[0], -1) if d.dim() else d
    assert info["kept"] == theta["values"].numel() and info["kappa"] == 0.8
    assert info["max_row_l1"] == pytest.approx(float(rows.abs().sum(1).max()), rel=1e-6)
    assert info["max_row_l1"] <= 0.8 + 1e-6


def test_not_joinable():
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 3))
    with pytest.raises(lcc.ConfigError):
        lcc.Recipe.single("*.weight", lcc.RowL1Ball(kappa=0.5), joint=True).groups(model)


# ------------------------------------------------------------------ container and ONNX
@pytest.mark.parametrize("s", CASES[:2], ids=["row_l1_ball", "sparse_row_l1_ball"])
def test_container_and_onnx_round_trip(tmp_path, s):
    model, params, x = make("conv", 7)
    recipe = lcc.Recipe.single(params, s)
    res = lcc.compress(model, recipe, method="dc", device="cpu")
    want = {}
    for g in res.groups:
        assert bool((_rowl1(g.scheme.decompress(res.thetas[g.name], g.shape)) <= 0.8 + 1e-6).all())
        want.update(g.scatter(g.scheme.decompress(res.thetas[g.name], g.shape)))
    save(tmp_path / "m.safetensors", res.model, res.thetas, res.groups, recipe=recipe)
    sd = load(tmp_path / "m.safetensors").state_dict
    for k, v in want.items():
        assert torch.equal(sd[k], v.detach()), k
    enc = export_onnx(model, res.thetas, res.groups, x[:2], tmp_path / "m.onnx")
    assert set(enc) == set(want)
    delta = copy.deepcopy(model).eval()
    with torch.no_grad():
        for k, v in want.items():
            delta.get_parameter(k).copy_(v)
    sess = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    ref = delta(x).detach().numpy()
    assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max()
