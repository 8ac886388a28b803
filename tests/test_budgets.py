"""Budgets in optimizer steps, fractional epochs, the proximal pull, AdamW, AMP and μ₀ measured on
the problem."""

from __future__ import annotations

import io

import pytest
import torch
from rich.console import Console
from torch.utils.data import DataLoader, TensorDataset

import lccompress as lcc
from lccompress.errors import ConfigError
from lccompress.lc_config import LCConfig, split
from lccompress.train import OptStepper, Pull

torch.set_num_threads(1)


def task(n=256, batch=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, 10, generator=g)
    y = (X[:, 0] + X[:, 1] > 0).long()
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(10, 32), torch.nn.ReLU(), torch.nn.Linear(32, 2))
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    for _ in range(100):  # a trained reference: DC raises its loss
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(X), y).backward()
        opt.step()
    return model, X, y


class Recording:
    """A loader over (X, y) that records which batches it hands out (rows' first feature)."""

    def __init__(self, X, y, batch):
        self.X, self.y, self.batch, self.seen = X, y, batch, []

    def __len__(self):
        return len(self.X) // self.batch

    def __iter__(self):
        for i in range(len(self)):
            self.seen.append(i)
            yield self.X[i * self.batch:(i + 1) * self.batch], self.y[i * self.batch:(i + 1) * self.batch]


RECIPE = lcc.Recipe.single(["0.weight", "2.weight"], lcc.Prune(keep=0.2))


# ----------------------------------------------------------------------------- plans
def test_split_is_proportional_whole_and_exact():
    for total, weights in [(100, [2, 1, 1, 1]), (7, [10, 5, 5]), (1000, [2] + [1] * 39), (41, [2] + [1] * 39)]:
        out = split(total, weights)
        assert sum(out) == total and all(o >= 1 for o in out)
        ideal = [total * w / sum(weights) for w in weights]
        assert all(abs(o - i) < 1 + 1e-9 for o, i in zip(out, ideal))
    assert split(120, [2, 1, 1, 1, 1]) == [40, 20, 20, 20, 20]


def test_plan_from_epochs_budget_and_cap():
    assert LCConfig(steps=3, epochs=0.5, first_epochs=1).plan(10) == [10, 5, 5]
    assert LCConfig(steps=4, budget=100).plan(10) == split(100, [10, 5, 5, 5])  # first L step: two shares
    assert LCConfig(steps=4, budget=100).plan(None) == split(100, [10, 5, 5, 5])
    # a loader without len(): whole epochs, each L step stopped at its share of the cap
    assert LCConfig(steps=4, cap=100).plan(None) is None
    assert LCConfig(steps=4, cap=100).limits(None) == split(100, [10, 5, 5, 5])
    assert LCConfig(steps=4, cap=100).limits(10) is None and LCConfig(steps=4).limits(None) is None
    assert sum(LCConfig(steps=40, cap=1000).plan(100)) == 1000  # 205 epochs of 100 batches, capped
    assert LCConfig(steps=40, cap=10**6).plan(100) == [1000] + [500] * 39  # under the cap: as asked
    assert LCConfig(steps=2, epochs=1).plan(None) is None  # whole passes of an unsized loader
    with pytest.raises(ConfigError, match="fractional epochs need"):
        LCConfig(steps=2, epochs=0.5).plan(None)
    with pytest.raises(ConfigError, match="less than one per LC step"):
        LCConfig(steps=5, budget=3)


def test_fractional_epochs_continue_the_pass_in_the_next_l_step():
    model, X, y = task()
    loader = Recording(X, y, 32)  # 8 batches per pass
    r = lcc.compress(model, RECIPE, {"train": loader}, config=LCConfig(steps=4, epochs=0.5, first_epochs=0.5),
                     device="cpu")
    # the μ₀ probe reads the first batches (PROBE_BATCHES = 8, a whole pass here) before training;
    # then 4 L steps of 4 batches each: two whole passes, in order, each batch once per pass
    assert loader.seen == list(range(8)) + list(range(8)) * 2
    assert r.budget == {"steps": 16, "samples": 16 * 32, "epochs": 2.0, "processes": 1}


class Unsized:
    """The same batches as a Recording loader, without len()."""

    def __init__(self, X, y, batch):
        self.inner = Recording(X, y, batch)

    def __iter__(self):
        return iter(self.inner)


def test_the_cap_bounds_an_endless_stream_and_spares_a_short_one():
    model, X, y = task()

    class Endless:
        def __iter__(self):
            while True:
                yield X[:32], y[:32]

    r = lcc.compress(model, RECIPE, {"train": Endless()}, config=LCConfig(steps=3, cap=40), device="cpu")
    assert r.budget["steps"] == 40 and r.budget["epochs"] is None
    r = lcc.compress(model, RECIPE, {"train": Unsized(X, y, 32)},
                     config=LCConfig(steps=3, epochs=1, first_epochs=1, cap=10**4), device="cpu")
    assert r.budget["steps"] == 3 * 8  # three whole passes: far under the cap


def test_budget_counts_optimizer_steps_over_passes():
    model, X, y = task()
    loader = Recording(X, y, 32)
    r = lcc.compress(model, RECIPE, {"train": loader}, config=LCConfig(steps=3, budget=20), device="cpu")
    assert r.budget["steps"] == 20
    assert loader.seen[8:] == (list(range(8)) * 3)[:20]  # after the μ₀ probe's 8


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_resume_mid_pass_is_byte_identical(optimizer, tmp_path):
    """Fractional epochs leave passes unfinished between steps; a resumed run rebuilds the pass
    (the shuffle of its seeded generator) and skips what was taken."""
    model, X, y = task()

    def data():
        gen = torch.Generator().manual_seed(3)
        return {"train": DataLoader(TensorDataset(X, y), batch_size=32, shuffle=True, generator=gen)}

    cfg = LCConfig(steps=5, epochs=0.75, first_epochs=0.75, optimizer=optimizer)
    full = lcc.compress(model, RECIPE, data(), config=cfg, device="cpu")

    def interrupt(rec):
        if rec.step == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        lcc.compress(model, RECIPE, data(), config=cfg, device="cpu", state_dir=tmp_path, callback=interrupt)
    res = lcc.compress(model, RECIPE, data(), config=cfg, device="cpu", state_dir=tmp_path, resume=True)
    for a, b in zip(full.model.state_dict().values(), res.model.state_dict().values()):
        assert torch.equal(a, b)
    assert res.budget == full.budget


# ----------------------------------------------------------------------------- the pull
def test_proximal_pull_is_the_closed_form_for_sgd_and_adamw():
    torch.manual_seed(0)
    w0, t, g = torch.randn(50), torch.randn(50), torch.randn(50)
    mu, lr = 3.0, 0.1
    # SGD without momentum: w ← (w − lr·g + lr·μ·t)/(1 + lr·μ)
    w = w0.clone().requires_grad_(True)
    s = OptStepper([([w], lr)], momentum=0.0, pull=Pull([w], [t], mu))
    w.grad = g.clone()
    s.step()
    assert torch.allclose(w.detach(), (w0 - lr * g + lr * mu * t) / (1 + lr * mu), atol=1e-6)
    # AdamW, first step: the Adam step is lr·sign(g) (m̂ = g, v̂ = g²); η = lr/(|g| + ε)
    w = w0.clone().requires_grad_(True)
    s = OptStepper([([w], lr)], optimizer="adamw", weight_decay=0.0, pull=Pull([w], [t], mu))
    w.grad = g.clone()
    s.step()
    a = w0 - lr * g / (g.abs() + 1e-8)
    eta = lr / (g.abs() + 1e-8)
    assert torch.allclose(w.detach(), (a + eta * mu * t) / (1 + eta * mu), atol=1e-5)


def test_prox_is_stable_where_a_gradient_penalty_would_diverge():
    """μ·lr far above 2: the pull in the gradient oscillates and grows; the prox lands on t."""
    w0, t = torch.ones(4), torch.zeros(4)
    w = w0.clone().requires_grad_(True)
    s = OptStepper([([w], 1.0)], momentum=0.0, pull=Pull([w], [t], 1e6))
    for _ in range(3):
        w.grad = torch.zeros(4)
        s.step()
    assert w.abs().max() < 1e-5


# ----------------------------------------------------------------------------- μ₀ and the loss's scale
def test_mu0_follows_the_loss_scale_and_adamw_lc_is_scale_free():
    """The same problem with its loss multiplied by 1e-3 (an embedder's MSE is tiny): μ₀ is measured
    1e-3 times smaller, and LC with AdamW ends at the same weights."""
    model, X, y = task()
    data = {"train": DataLoader(TensorDataset(X, y), batch_size=32), "eval": DataLoader(TensorDataset(X, y), batch_size=256)}
    ce = torch.nn.functional.cross_entropy
    cfg = LCConfig(steps=3, epochs=1, first_epochs=1, optimizer="adamw")
    big = lcc.compress(model, RECIPE, data, config=cfg, loss=lambda p, t: ce(p, t), device="cpu")
    small = lcc.compress(model, RECIPE, data, config=cfg, loss=lambda p, t: 1e-3 * ce(p, t), device="cpu")
    assert small.config.mu0 == pytest.approx(1e-3 * big.config.mu0, rel=1e-4)
    fixed = LCConfig(steps=3).resolve(RECIPE.groups(model)).mu0
    assert big.config.mu0 != fixed  # measured, not the family's constant
    dc = lcc.compress(model, RECIPE, data, method="dc", config=cfg, device="cpu")
    for name in ("0.weight", "2.weight"):  # LC moves them ~0.5 from DC; the two runs agree to < 2 % of that
        a, b, d = (r.model.get_parameter(name).detach() for r in (big, small, dc))
        assert torch.equal(a != 0, b != 0)
        assert (a - b).abs().max() < 0.02 * (a - d).abs().max()


def test_mu0_given_is_kept():
    model, X, y = task()
    r = lcc.compress(model, RECIPE, {"train": DataLoader(TensorDataset(X, y), batch_size=32)},
                     config=LCConfig(steps=2, epochs=1, mu0=0.5), device="cpu")
    assert r.config.mu0 == 0.5 and r.history[0].mu == 0.5


# ----------------------------------------------------------------------------- AMP
def test_bf16_autocast_trains_and_fp16_needs_cuda():
    model, X, y = task()
    data = {"train": DataLoader(TensorDataset(X, y), batch_size=32), "eval": DataLoader(TensorDataset(X, y), batch_size=256)}
    plain = lcc.compress(model, RECIPE, data, config=LCConfig(steps=3, epochs=1), device="cpu")
    bf16 = lcc.compress(model, RECIPE, data, config=LCConfig(steps=3, epochs=1, amp="bf16"), device="cpu")
    assert bf16.metric > 0.8 and abs(bf16.metric - plain.metric) < 0.05
    assert not torch.equal(bf16.model[0].weight, plain.model[0].weight)  # it did run in bf16
    with pytest.raises(ConfigError, match="fp16 needs a CUDA"):
        lcc.compress(model, RECIPE, data, config=LCConfig(steps=1, epochs=1, amp="fp16"), device="cpu")


# ----------------------------------------------------------------------------- progress
def test_progress_lines_without_a_terminal():
    from cli.render import Reporter

    out = io.StringIO()
    rep = Reporter(Console(file=out, force_terminal=False))
    rep.every = 0.0  # a line at every call (30 s in use)
    cb = rep.callbacks()
    cb.start("LC prune", 2)
    cb.progress(5, 40)
    text = out.getvalue()
    assert "step 1/2: 5/40 optimizer steps" in text


# ----------------------------------------------------------------------------- distillation by output kind
def test_distill_uses_mse_for_embeddings_and_kl_for_logits():
    from lccompress.api import make_task

    torch.manual_seed(0)
    X = torch.randn(64, 10)

    class Embedder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(10, 16)

        def forward(self, x):
            return torch.nn.functional.normalize(self.fc(x), dim=-1)

    emb = Embedder()
    data, loss, metric = make_task(emb, {"train": [X[:32], X[32:]], "eval": [X]}, loss="distill")
    assert loss.name == "distill-mse" and metric.name == "cosine"
    student = Embedder()
    x, t = next(iter(data["train"]))
    value, _ = loss.on(student, x, t)
    assert torch.allclose(value, ((student(X[:32]) - emb(X[:32])) ** 2).mean())  # against the reference's vectors
    _, _, m = make_task(emb, {"train": [X], "eval": [X]}, loss="distill-cosine")
    assert m.name == "cosine"
    # a classifier with labelled batches: KL on its logits, accuracy on the labels
    clf = torch.nn.Linear(10, 3)
    y = torch.randint(0, 3, (64,))
    _, loss, metric = make_task(clf, {"train": [(X, y)], "eval": [(X, y)]}, loss="distill")
    assert loss.name == "distill" and metric.name == "accuracy"
