"""The LC loop against problems whose optimum is known, plus its contracts (feasible result,
same seed → same bytes, NaN recovery, no mutation of the input model)."""

import itertools

import pytest
import torch
from torch import nn

import lccompress as lcc
from lccompress.train import accuracy, evaluate


def _exact_lstep(X, Y):
    """L step solved to convergence by L-BFGS on ½‖XWᵀ − Y‖² + penalty (a strongly convex quadratic)."""

    def lstep(model, penalty, ctx):
        opt = torch.optim.LBFGS(model.parameters(), lr=1, max_iter=500, tolerance_grad=1e-12,
                                tolerance_change=1e-15, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            obj = 0.5 * ((model(X) - Y) ** 2).sum() + penalty()
            obj.backward()
            return obj

        opt.step(closure)

    return lstep


def _problem(seed, n=60, d=8, p=6):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g, dtype=torch.float64) @ torch.randn(d, d, generator=g, dtype=torch.float64)
    Y = X @ torch.randn(d, p, generator=g, dtype=torch.float64) + 0.5 * torch.randn(n, p, generator=g, dtype=torch.float64)
    return X, Y


def _linear(W):
    m = nn.Linear(W.shape[1], W.shape[0], bias=False).double()
    with torch.no_grad():
        m.weight.copy_(W)
    return m


@pytest.mark.parametrize("seed", [0, 3])
def test_lc_reaches_reduced_rank_regression_optimum(seed):
    X, Y = _problem(seed)
    r = 2
    w_ols = torch.linalg.lstsq(X, Y).solution  # (d, p)
    # closed form (reduced-rank regression): project the fitted values on their top-r right singular vectors
    vr = torch.linalg.svd(X @ w_ols, full_matrices=False).Vh[:r].T  # (p, r)
    f = lambda W: 0.5 * float(((X @ W.T - Y) ** 2).sum())  # noqa: E731  W is (p, d)
    best = f((w_ols @ vr @ vr.T).T)
    model = _linear(w_ols.T)
    recipe = lcc.Recipe.single("weight", lcc.LowRank(r))
    cfg = lcc.LCConfig(steps=100, mu0=1.0, mu_growth=1.1, tol=0)
    lc = lcc.compress(model, recipe, lstep=_exact_lstep(X, Y), config=cfg, device="cpu")
    dc = lcc.compress(model, recipe, method="dc", device="cpu")
    assert torch.linalg.matrix_rank(lc.model.weight.detach()) <= r
    assert f(lc.model.weight.detach()) <= best * 1.01
    assert f(dc.model.weight.detach()) >= best * 1.2


def test_lc_reaches_best_subset_least_squares():
    g = torch.Generator().manual_seed(2)
    n, d, kappa = 40, 10, 3
    X = torch.randn(n, d, generator=g, dtype=torch.float64) @ torch.randn(d, d, generator=g, dtype=torch.float64)
    y = X @ torch.randn(d, 1, generator=g, dtype=torch.float64) + 0.3 * torch.randn(n, 1, generator=g, dtype=torch.float64)
    f = lambda w: 0.5 * float(((X @ w.reshape(-1, 1) - y) ** 2).sum())  # noqa: E731
    # brute force over all supports of size κ
    best = min(f(torch.zeros(d, dtype=torch.float64).index_put_((torch.tensor(s),),
                 torch.linalg.lstsq(X[:, s], y).solution.reshape(-1)))
               for s in itertools.combinations(range(d), kappa))
    model = _linear(torch.linalg.lstsq(X, y).solution.T)
    recipe = lcc.Recipe.single("weight", lcc.Prune(count=kappa))
    cfg = lcc.LCConfig(steps=100, mu0=1.0, mu_growth=1.1, tol=0)
    lc = lcc.compress(model, recipe, lstep=_exact_lstep(X, y), config=cfg, device="cpu")
    dc = lcc.compress(model, recipe, method="dc", device="cpu")
    w = lc.model.weight.detach()
    assert int((w != 0).sum()) <= kappa
    assert f(w) <= best * 1.001
    assert f(dc.model.weight.detach()) >= best * 1.2


SMALL = lcc.LCConfig(steps=5, epochs=1, first_epochs=2, mu0=0.02, mu_growth=2.5)
PRUNE = lcc.Recipe.single("fc*.weight", lcc.Prune(keep=0.05), joint=True)


def _err(model, data):
    acc, _, _ = evaluate(model, data["eval"], torch.device("cpu"), accuracy)
    return 1 - acc


def test_lc_on_digits_is_feasible_and_beats_dc(digits_ref):
    ref, data = digits_ref
    before = {k: v.clone() for k, v in ref.state_dict().items()}
    lc = lcc.compress(ref, PRUNE, data, config=SMALL, device="cpu")
    dc = lcc.compress(ref, PRUNE, method="dc", device="cpu")
    # the input model is untouched
    assert all(torch.equal(before[k], v) for k, v in ref.state_dict().items())
    # the answer is the feasible model: global top-κ over the three weights, κ = round(5 % of 50,200)
    ws = [lc.model.get_parameter(f"fc{i}.weight").detach() for i in (1, 2, 3)]
    assert sum(int((w != 0).sum()) for w in ws) == 2510
    g = lc.groups[0]
    for name, t in g.decompress(lc.thetas[g.name]).items():
        assert torch.equal(lc.model.get_parameter(name).detach(), t)
    # biases stayed dense and trained
    assert not torch.equal(lc.model.fc1.bias.detach(), ref.fc1.bias.detach())
    assert lc.metric == pytest.approx(1 - _err(lc.model, data))
    assert _err(lc.model, data) < _err(dc.model, data) - 0.05
    assert [(h.step, h.phase) for h in lc.history] == [(k, "lc") for k in range(5)] + [(5, "tail")]
    mus = [h.mu for h in lc.history if h.phase == "lc"]
    assert mus == pytest.approx([SMALL.mu0 * SMALL.mu_growth ** k for k in range(5)])
    assert lc.ratio == pytest.approx(50200 * 32 / (2510 * 32 + min(50200, 2510 * 16)))  # 16-bit positions


def test_same_seed_same_bytes(digits_ref):
    ref, data = digits_ref
    rec = lcc.Recipe.single("fc*.weight", lcc.Codebook(k=2))
    a = lcc.compress(ref, rec, data, config=SMALL, device="cpu", seed=3)
    b = lcc.compress(ref, rec, data, config=SMALL, device="cpu", seed=3)
    c = lcc.compress(ref, rec, data, config=SMALL, device="cpu", seed=4)
    sa, sb, sc = (r.model.state_dict() for r in (a, b, c))
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)
    assert [h.loss for h in a.history] == [h.loss for h in b.history]


def test_finetune_holds_the_compression_fixed(digits_ref):
    ref, data = digits_ref
    dc = lcc.compress(ref, PRUNE, method="dc", device="cpu")
    ft = lcc.compress(ref, PRUNE, data, method="finetune", config=SMALL, device="cpu")
    g = dc.groups[0]
    assert torch.equal(dc.thetas[g.name]["indices"], ft.thetas[g.name]["indices"])  # same mask
    assert not torch.equal(dc.thetas[g.name]["values"], ft.thetas[g.name]["values"])  # values trained
    assert _err(ft.model, data) < _err(dc.model, data)
    rec = lcc.Recipe.single("fc*.weight", lcc.Codebook(k=2))
    dq = lcc.compress(ref, rec, method="dc", device="cpu")
    fq = lcc.compress(ref, rec, data, method="finetune", config=SMALL, device="cpu")
    for name in ("fc1.weight", "fc2.weight"):
        assert torch.equal(dq.thetas[name]["codes"], fq.thetas[name]["codes"])
        assert fq.model.get_parameter(name).unique().numel() <= 2


def test_idc_and_qp_run_and_stay_feasible(digits_ref):
    ref, data = digits_ref
    rec = lcc.Recipe.single(["fc1.weight", "fc2.weight"], lcc.LowRank(8))
    for method, penalty in (("idc", "al"), ("lc", "qp")):
        r = lcc.compress(ref, rec, data, method=method, config=lcc.LCConfig(steps=2, epochs=1, penalty=penalty),
                         device="cpu")
        assert torch.linalg.matrix_rank(r.model.fc1.weight.detach()) <= 8
        assert [h.phase for h in r.history] == [method] * 2 + ["tail"] * (method == "lc")


def test_nan_restores_and_halves_then_gives_up(digits_ref):
    ref, data = digits_ref
    calls = {"n": 0}

    def flaky(out, y):  # non-finite on the first call only
        calls["n"] += 1
        loss = torch.nn.functional.cross_entropy(out, y)
        return loss * float("nan") if calls["n"] == 1 else loss

    r = lcc.compress(ref, PRUNE, data, config=SMALL, loss=flaky, device="cpu")
    assert r.recoveries == 1
    assert all(torch.isfinite(p).all() for p in r.model.parameters())
    assert r.history[0].lr == pytest.approx(1e-3)  # the default AdamW lr (not clipped: the pull is a prox) is reported before halving

    with pytest.raises(lcc.DivergenceError, match="non-finite"):
        lcc.compress(ref, PRUNE, data, config=SMALL, loss=lambda o, y: o.sum() * float("inf"), device="cpu")


def test_lr_is_clipped_to_one_over_mu(digits_ref):
    ref, data = digits_ref
    cfg = lcc.LCConfig(steps=3, epochs=1, first_epochs=1, mu0=100.0, mu_growth=2.0, lr=0.05, optimizer="sgd")
    r = lcc.compress(ref, PRUNE, data, config=cfg, device="cpu")
    assert [h.lr for h in r.history if h.phase == "lc"] == pytest.approx([0.01, 0.005, 0.0025])


def test_bad_configuration_is_named():
    with pytest.raises(lcc.ConfigError, match="penalty='xx'"):
        lcc.LCConfig(penalty="xx")
    with pytest.raises(lcc.ConfigError, match="mu0"):
        lcc.LCConfig(mu0=-1)
    with pytest.raises(lcc.ConfigError, match="method='magic'"):
        lcc.compress(nn.Linear(2, 2), lcc.Recipe.single("weight", lcc.Prune(keep=0.5)), method="magic")
    with pytest.raises(lcc.ConfigError, match="needs training data"):
        lcc.compress(nn.Linear(2, 2), lcc.Recipe.single("weight", lcc.Prune(keep=0.5)), method="lc")


def test_resume_continues_to_the_same_bytes(digits_ref, tmp_path):
    ref, data = digits_ref
    rec = lcc.Recipe.single("fc*.weight", lcc.Codebook(k=2))
    cfg = lcc.LCConfig(steps=4, epochs=1, first_epochs=1)
    whole = lcc.compress(ref, rec, data, config=cfg, device="cpu", seed=5)

    class Stop(Exception):
        pass

    def stop_after_two(record):
        if record.step == 1:
            raise Stop

    with pytest.raises(Stop):
        lcc.compress(ref, rec, data, config=cfg, device="cpu", seed=5, state_dir=tmp_path, callback=stop_after_two)
    resumed = lcc.compress(ref, rec, data, config=cfg, device="cpu", seed=5, state_dir=tmp_path, resume=True)
    assert [h.step for h in resumed.history] == [0, 1, 2, 3, 4]  # four LC steps and the tail
    sw, sr = whole.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(sw[k], sr[k]) for k in sw)
    with pytest.raises(lcc.ConfigError, match="other settings"):
        lcc.compress(ref, rec, data, config=cfg, device="cpu", seed=6, state_dir=tmp_path, resume=True)


def test_default_schedule_comes_from_the_scheme_family_and_scales_with_steps():
    lin = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    prune = lcc.Recipe.single("0.weight", lcc.Prune(keep=0.5)).groups(lin)
    low = lcc.Recipe.single("0.weight", lcc.LowRank(1)).groups(lin)
    both = lcc.Recipe((lcc.Rule(("0.weight",), lcc.Prune(keep=0.5)), lcc.Rule(("1.weight",), lcc.LowRank(1)))).groups(lin)
    c = lcc.LCConfig().resolve(prune)
    assert (c.mu0, c.mu_growth, c.weight_decay) == (1e-3, pytest.approx(1.15), 0.0)
    c = lcc.LCConfig().resolve(low)
    assert (c.mu0, c.mu_growth, c.weight_decay) == (1e-2, pytest.approx(1.1), 5e-4)
    c = lcc.LCConfig().resolve(both)
    assert (c.mu0, c.mu_growth, c.weight_decay) == (1e-3, pytest.approx(1.1), 5e-4)
    # LC's tail: a fifth of the budget, half with low rank (the longest of a mixed recipe)
    assert [lcc.LCConfig().resolve(g).tail for g in (prune, low, both)] == [0.2, 0.5, 0.5]
    assert lcc.LCConfig(tail=0).resolve(low).tail == 0
    short = lcc.LCConfig(steps=14).resolve(prune)
    assert short.mu(13) == pytest.approx(lcc.LCConfig().resolve(prune).mu(39))  # same final μ
    assert lcc.LCConfig(steps=14, mu_growth=1.2).resolve(prune).mu_growth == 1.2  # explicit wins


CODEBOOK = lcc.Recipe.single("fc*.weight", lcc.Codebook(k=2))


def test_tail_is_the_rest_of_the_budget_training_theta_from_the_lc_point(digits_ref):
    ref, data = digits_ref
    progress: list[int] = []
    cfg = lcc.LCConfig(steps=3, epochs=1, first_epochs=1, budget=60, tail=0.25)
    r = lcc.compress(ref, CODEBOOK, data, config=cfg, device="cpu", seed=1,
                     on_progress=lambda d, t: progress.append(t) if d == 1 else None)
    # 45 optimizer steps of LC (15 per L step), then the tail's 15: the whole budget, no more
    assert progress == [15, 15, 15, 15] and r.budget["steps"] == 60
    assert [h.phase for h in r.history] == ["lc"] * 3 + ["tail"]
    # the LC part is exactly an LC run with the budget less the tail, and no tail
    alone = lcc.compress(ref, CODEBOOK, data, config=lcc.LCConfig(steps=3, epochs=1, first_epochs=1, budget=45,
                                                                  tail=0), device="cpu", seed=1)
    assert [(h.mu, h.loss, h.gap, h.metric) for h in alone.history] == \
        [(h.mu, h.loss, h.gap, h.metric) for h in r.history[:3]]
    # the tail trains the codebook entries, with the assignments of LC's last C step held fixed
    for name in ("fc1.weight", "fc2.weight", "fc3.weight"):
        assert torch.equal(r.thetas[name]["codes"], alone.thetas[name]["codes"])
        assert not torch.equal(r.thetas[name]["codebook"], alone.thetas[name]["codebook"])
        assert torch.equal(r.model.get_parameter(name).detach(),
                           r.groups[[g.name for g in r.groups].index(name)].decompress(r.thetas[name])[name])
    assert r.history[-1].metric == pytest.approx(r.metric)
    assert r.metric > alone.metric  # the feasible model trained on: more accurate than where LC left it


def test_an_early_stop_gives_the_rest_of_the_budget_to_the_tail(digits_ref):
    ref, data = digits_ref
    progress: list[int] = []
    cfg = lcc.LCConfig(steps=3, epochs=1, first_epochs=1, budget=60, tail=0.25, tol=1.0)  # feasible at once
    r = lcc.compress(ref, CODEBOOK, data, config=cfg, device="cpu",
                     on_progress=lambda d, t: progress.append(t) if d == 1 else None)
    assert progress == [15, 45] and r.budget["steps"] == 60
    assert [h.phase for h in r.history] == ["lc", "tail"]
    with pytest.raises(lcc.ConfigError, match="tail=1"):
        lcc.LCConfig(tail=1)


def test_the_tail_keeps_ball_constraints(digits_ref):
    """ℓ1 balls bound θ's values themselves: fine-tuning (and LC's tail) leaves them fixed, so the
    result stays inside (whereas training the kept values would leave the ball)."""
    ref, data = digits_ref
    cfg = lcc.LCConfig(steps=2, epochs=1, first_epochs=1, tail=0.5)
    for scheme, norm, bound in ((lcc.L1Ball(radius=20.0), lambda w: float(w.abs().sum()), 20.0),
                                (lcc.RowL1Ball(kappa=0.9), lambda w: float(w.abs().sum(1).max()), 0.9)):
        for method in ("lc", "finetune"):
            r = lcc.compress(ref, lcc.Recipe.single("fc2.weight", scheme), data, method=method, config=cfg,
                             device="cpu")
            assert norm(r.model.fc2.weight.detach()) <= bound * (1 + 1e-5)
            assert not torch.equal(r.model.fc2.bias, ref.fc2.bias)  # the dense parameters did train


def test_progress_callbacks_follow_steps_and_epochs(digits_ref):
    ref, data = digits_ref
    steps, epochs = [], []
    lcc.compress(ref, PRUNE, data, config=lcc.LCConfig(steps=2, epochs=2, first_epochs=3, tail=0), device="cpu",
                 callback=lambda r: steps.append(r.step), on_progress=lambda d, t: epochs.append((d, t)))
    n = len(data["train"])
    assert steps == [0, 1]
    assert epochs == [(i, 3 * n) for i in range(1, 3 * n + 1)] + [(i, 2 * n) for i in range(1, 2 * n + 1)]


@pytest.mark.parametrize("scheme", ["prune", "codebook", "lowrank"])
@pytest.mark.parametrize("generator", [False, True], ids=["global-rng", "seeded-generator"])
def test_resume_after_an_interruption_mid_run_is_byte_identical(scheme, generator, tmp_path):
    """Interrupted inside step k (before its state is saved), resumed in a fresh call with a fresh
    loader: the same bytes as an unbroken run, also when the loader shuffles with its own seeded
    torch.Generator (its state is saved and restored with the LC state)."""
    from torch.utils.data import DataLoader, TensorDataset

    from lccompress import Codebook, LCConfig, LowRank, Prune, Recipe, compress

    g = torch.Generator().manual_seed(0)
    X = torch.randn(256, 10, generator=g)
    y = (X[:, 0] > 0).long()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(10, 32), torch.nn.ReLU(), torch.nn.Linear(32, 2))

    def data():
        gen = torch.Generator().manual_seed(5) if generator else None
        return {"train": DataLoader(TensorDataset(X, y), batch_size=32, shuffle=True, generator=gen)}

    s = {"prune": Prune(keep=0.1), "codebook": Codebook(k=2), "lowrank": LowRank(2)}[scheme]
    recipe = Recipe.single(["0.weight", "2.weight"], s)
    cfg = LCConfig(steps=6, epochs=1, first_epochs=1)
    full = compress(model, recipe, data(), config=cfg, device="cpu")
    for k in (1, 4):
        d = tmp_path / f"state{k}"

        def interrupt(rec, k=k):
            if rec.step == k:
                raise KeyboardInterrupt

        with pytest.raises(KeyboardInterrupt):
            compress(model, recipe, data(), config=cfg, device="cpu", state_dir=d, callback=interrupt)
        res = compress(model, recipe, data(), config=cfg, device="cpu", state_dir=d, resume=True)
        for (n, a), b in zip(full.model.state_dict().items(), res.model.state_dict().values()):
            assert torch.equal(a, b), (k, n)


class _HostRandomLoader:
    """Batches of (X, y) in an order drawn from Python's `random` or numpy's global RNG, with
    numpy noise added to the inputs: a user's pipeline that torch's RNGs do not cover."""

    def __init__(self, X, y, source, batch=32):
        self.X, self.y, self.source, self.batch = X, y, source, batch

    def __len__(self):
        return len(self.X) // self.batch

    def __iter__(self):
        import random

        import numpy as np

        n = len(self.X)
        order = random.sample(range(n), n) if self.source == "random" else np.random.permutation(n).tolist()
        for i in range(len(self)):
            idx = torch.tensor(order[i * self.batch:(i + 1) * self.batch])
            noise = torch.from_numpy(np.random.standard_normal((len(idx), self.X.shape[1])).astype("float32"))
            yield self.X[idx] + 0.1 * noise, self.y[idx]


@pytest.mark.parametrize("source", ["random", "numpy"])
def test_resume_restores_python_and_numpy_rngs_that_the_loader_draws_from(source, tmp_path):
    """A loader drawing its order from `random` (or numpy) and numpy noise, interrupted inside
    step k and resumed in a fresh call after the script seeded them again (as a new process
    would): the same bytes as an unbroken run, because the LC state holds both RNGs."""
    import random

    import numpy as np

    from lccompress import LCConfig, Prune, Recipe, compress

    g = torch.Generator().manual_seed(0)
    X = torch.randn(256, 10, generator=g)
    y = (X[:, 0] > 0).long()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(10, 32), torch.nn.ReLU(), torch.nn.Linear(32, 2))
    recipe = Recipe.single(["0.weight", "2.weight"], Prune(keep=0.1))
    cfg = LCConfig(steps=5, epochs=1, first_epochs=1)  # the tail's share: steps end inside passes

    def fresh():
        random.seed(7)
        np.random.seed(7)
        return {"train": _HostRandomLoader(X, y, source)}

    full = compress(model, recipe, fresh(), config=cfg, device="cpu")
    again = compress(model, recipe, fresh(), config=cfg, device="cpu")
    same = lambda a, b: all(torch.equal(u, v) for u, v in zip(a.model.state_dict().values(),  # noqa: E731
                                                               b.model.state_dict().values()))
    assert same(full, again)  # the loader is reproducible from its seeds
    for k in (1, 3):
        d = tmp_path / f"state{k}"

        def interrupt(rec, k=k):
            if rec.step == k:
                raise KeyboardInterrupt

        with pytest.raises(KeyboardInterrupt):
            compress(model, recipe, fresh(), config=cfg, device="cpu", state_dir=d, callback=interrupt)
        res = compress(model, recipe, fresh(), config=cfg, device="cpu", state_dir=d, resume=True)
        assert [h.step for h in res.history][:5] == list(range(5))
        assert same(full, res), k


def test_a_state_saved_without_host_rngs_still_resumes(tmp_path):
    """LC states written before Python's and numpy's RNGs were saved load and resume."""
    from lccompress import LCConfig, Prune, Recipe, compress
    from lccompress.lc_state import LCState

    g = torch.Generator().manual_seed(1)
    X = torch.randn(96, 6, generator=g)
    data = [(X[i:i + 32], (X[i:i + 32, 0] > 0).long()) for i in range(0, 96, 32)]
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    recipe, cfg = Recipe.single("0.weight", Prune(keep=0.25)), LCConfig(steps=3, epochs=1, first_epochs=1)
    full = compress(model, recipe, {"train": data}, config=cfg, device="cpu")

    def stop(rec):
        if rec.step == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        compress(model, recipe, {"train": data}, config=cfg, device="cpu", state_dir=tmp_path, callback=stop)
    path = tmp_path / LCState.FILE
    st = torch.load(path, weights_only=True)
    assert "host_rng" in st
    del st["host_rng"]
    torch.save(st, path)
    res = compress(model, recipe, {"train": data}, config=cfg, device="cpu", state_dir=tmp_path, resume=True)
    assert all(torch.equal(a, b) for a, b in zip(full.model.state_dict().values(), res.model.state_dict().values()))


def test_resume_with_another_number_of_loader_generators_is_refused(tmp_path):
    """The loaders on resume hold a torch.Generator the saved run's did not (or the reverse):
    the batches would come in another order, so --resume is refused in one line."""
    from torch.utils.data import DataLoader, TensorDataset

    from lccompress import ConfigError, LCConfig, Prune, Recipe, compress

    g = torch.Generator().manual_seed(0)
    X = torch.randn(128, 6, generator=g)
    ds = TensorDataset(X, (X[:, 0] > 0).long())
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    recipe, cfg = Recipe.single("0.weight", Prune(keep=0.25)), LCConfig(steps=3, epochs=1, first_epochs=1)

    def data(generators):
        gens = [torch.Generator().manual_seed(i) for i in range(generators)]
        if generators < 2:
            return {"train": DataLoader(ds, batch_size=32, shuffle=True, generator=gens[0] if gens else None)}
        return {"train": DataLoader(ds, batch_size=32, shuffle=True, generator=gens[0]),
                "eval": DataLoader(ds, batch_size=32, shuffle=True, generator=gens[1])}

    def stop(rec):
        if rec.step == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        compress(model, recipe, data(1), config=cfg, device="cpu", state_dir=tmp_path, callback=stop)
    for n, saved in ((0, 1), (2, 1)):
        with pytest.raises(ConfigError) as e:
            compress(model, recipe, data(n), config=cfg, device="cpu", state_dir=tmp_path, resume=True)
        msg = str(e.value)
        assert "\n" not in msg and msg.startswith("--resume: ") and \
            f"hold {n} random generators, the saved run {saved}" in msg
    res = compress(model, recipe, data(1), config=cfg, device="cpu", state_dir=tmp_path, resume=True)
    assert [h.step for h in res.history][:3] == [0, 1, 2]
