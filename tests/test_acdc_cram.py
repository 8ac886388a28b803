"""AC/DC and CrAM: CrAM's update against the formula computed here with autograd, AC/DC's phases
and budget, and AC/DC finding a support that fine-tuning with the DC mask cannot."""

import math

import pytest
import torch
from torch import nn

import lccompress as lcc
from lccompress.cram import cram_refine


def _regression(seed=0, n=64, d=6):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g)
    y = X @ torch.randn(d, 1, generator=g) + 0.1 * torch.randn(n, 1, generator=g)
    return X, y


def _loss(w, X, y):
    return ((X @ w.T - y) ** 2).mean()


def _top(a, count):
    """a with all but its `count` largest magnitudes set to zero (written here, not the library's)."""
    keep = torch.zeros(a.numel(), dtype=torch.bool)
    keep[torch.argsort(a.reshape(-1).abs(), descending=True)[:count]] = True
    return torch.where(keep.reshape(a.shape), a, torch.zeros_like(a))


@pytest.mark.parametrize("plus", [True, False])
def test_one_cram_step_is_the_formula(plus):
    X, y = _regression()
    torch.manual_seed(1)
    model = nn.Linear(6, 1, bias=False)
    w0 = model.weight.detach().clone()
    lr, rho = 0.1, 0.5
    got = cram_refine(model, [(X, y)], lcc.Recipe.single("weight", lcc.Prune(count=2)), iterations=1, lr=lr,
                      rho=rho, plus=plus, optimizer="sgd", momentum=0.0, loss="mse")
    w = w0.clone().requires_grad_(True)
    g0, = torch.autograd.grad(_loss(w, X, y), w)
    wt = _top(w0 + rho * g0, 2).requires_grad_(True)
    gt, = torch.autograd.grad(_loss(wt, X, y), wt)
    want = w0 - lr * (gt + g0 if plus else gt)
    assert torch.allclose(got.weight.detach(), want, atol=1e-6)
    assert torch.equal(model.weight.detach(), w0)  # the input model is not changed


def test_cram_cycles_through_its_levels():
    X, y = _regression(2)
    torch.manual_seed(3)
    model = nn.Linear(6, 1, bias=False)
    w = model.weight.detach().clone()
    levels = [lcc.Recipe.single("weight", lcc.Prune(count=1)), lcc.Recipe.single("weight", lcc.Prune(count=4))]
    got = cram_refine(model, [(X, y)], levels, iterations=2, lr=0.1, rho=0.3, optimizer="sgd", momentum=0.0,
                      loss="mse")
    for step, count in enumerate((1, 4)):  # step 2 at lr × ½(1 + cos(π/2)) = lr / 2 (the cosine)
        lr = 0.1 * 0.5 * (1 + math.cos(math.pi * step / 2))
        wg = w.clone().requires_grad_(True)
        g0, = torch.autograd.grad(_loss(wg, X, y), wg)
        wt = _top(w + 0.3 * g0, count).requires_grad_(True)
        gt, = torch.autograd.grad(_loss(wt, X, y), wt)
        w = w - lr * (gt + g0)
    assert torch.allclose(got.weight.detach(), w, atol=1e-6)


def test_cram_then_dc_at_the_budget_of_lc(digits_ref):
    ref, data = digits_ref
    names = ["fc1.weight", "fc2.weight", "fc3.weight"]
    recipe = lcc.Recipe.single(names, lcc.Prune(keep=0.05), joint=True)
    cfg = lcc.LCConfig(steps=4, budget=120, tail=0)
    seen = []
    got = lcc.compress(ref, recipe, data, method="cram", config=cfg, device="cpu", seed=0,
                       on_progress=lambda done, total: seen.append((done, total)))
    dc = lcc.compress(ref, recipe, {"eval": data["eval"]}, method="dc", device="cpu")
    assert got.method == "cram" and got.budget["steps"] == 120 and seen[-1] == (120, 120)
    flat = torch.cat([got.model.get_parameter(n).detach().reshape(-1) for n in names])
    assert int((flat != 0).sum()) == round(0.05 * flat.numel())  # one-shot DC at the recipe
    assert got.metric > dc.metric + 0.2  # accuracy: trained toward the compressed point, far above DC's
    again = lcc.compress(ref, recipe, data, method="cram", config=cfg, device="cpu", seed=0)
    assert all(torch.equal(a, b) for a, b in zip(got.model.state_dict().values(), again.model.state_dict().values()))


def test_acdc_regrows_the_support_that_the_dc_mask_misses():
    """y = X w* with w* on coordinates {0, 1, 2}; the 'reference' has its largest weights on {3, 4, 5},
    so DC's mask is wrong. Fine-tuning keeps that mask; AC/DC's dense phase lets the true weights grow
    back and its next compressed phase picks them."""
    g = torch.Generator().manual_seed(0)
    X = torch.randn(256, 10, generator=g)
    w_star = torch.tensor([[3.0, -2.0, 2.5, 0, 0, 0, 0, 0, 0, 0]])
    y = X @ w_star.T
    ref = nn.Linear(10, 1, bias=False)
    with torch.no_grad():
        ref.weight.copy_(torch.tensor([[0.1, 0.1, 0.1, 5.0, 5.0, 5.0, 0, 0, 0, 0]]))
    loader = [(X[i:i + 32], y[i:i + 32]) for i in range(0, 256, 32)]
    recipe = lcc.Recipe.single("weight", lcc.Prune(count=3))
    cfg = lcc.LCConfig(steps=4, budget=480, optimizer="sgd", lr=0.02, cycles=2)
    records = []
    acdc = lcc.compress(ref, recipe, {"train": loader, "eval": loader}, method="acdc", config=cfg, loss="mse", metric="mse",
                        device="cpu", callback=records.append)
    ft = lcc.compress(ref, recipe, {"train": loader, "eval": loader}, method="finetune", config=cfg, loss="mse", metric="mse",
                      device="cpu")
    support = lambda m: set(torch.nonzero(m.weight.detach()[0]).reshape(-1).tolist())  # noqa: E731
    assert support(ft.model) == {3, 4, 5}
    assert support(acdc.model) == {0, 1, 2}
    assert torch.allclose(acdc.model.weight.detach(), w_star, atol=1e-2)
    assert _loss(acdc.model.weight.detach(), X, y) < 1e-3 < _loss(ft.model.weight.detach(), X, y)
    # the phases: compressed / dense twice, then the final compressed phase of two shares
    assert [r.phase for r in records] == ["acdc-compressed", "acdc-dense"] * 2 + ["acdc-compressed"]
    assert acdc.budget["steps"] == 480
    assert [r.gap == 0 for r in records] == [True, False, True, False, True]


def test_acdc_and_cram_refuse_what_they_cannot_do(toy):
    model, loader = toy
    recipe = lcc.Recipe.single(["fc1.weight"], lcc.Prune(keep=0.5))
    with pytest.raises(lcc.ConfigError, match="too small for 4 AC/DC cycles"):
        lcc.compress(model, recipe, loader, method="acdc", config=lcc.LCConfig(steps=2, budget=5))
    with pytest.raises(lcc.ConfigError, match="cycles"):
        lcc.LCConfig(cycles=0)
    with pytest.raises(lcc.ConfigError, match="needs training data"):
        lcc.compress(model, recipe, method="cram")
    with pytest.raises(lcc.ConfigError, match="rho"):
        cram_refine(model, loader, recipe, iterations=2, rho=-1.0)
    with pytest.raises(lcc.ConfigError, match="iterations"):
        cram_refine(model, loader, recipe, iterations=0)


def test_cram_with_a_loader_without_len_needs_a_budget(toy):
    model, loader = toy
    recipe = lcc.Recipe.single(["fc1.weight"], lcc.Prune(keep=0.5))
    stream = lambda: (b for b in loader)  # noqa: E731 - a generator: no len()

    class NoLen:
        def __iter__(self):
            return stream()

    with pytest.raises(lcc.ConfigError, match="budget in optimizer steps"):
        lcc.compress(model, recipe, NoLen(), method="cram", config=lcc.LCConfig(steps=2, epochs=1.5))
    got = lcc.compress(model, recipe, NoLen(), method="cram", config=lcc.LCConfig(steps=2, budget=5))
    assert got.budget["steps"] == 5 and got.budget["epochs"] is None
