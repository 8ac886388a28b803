"""lccompress.compress: the LC family passes through; "cram", "sfw" and "fw-grow" are training
composed with DC here (lc and fw never import each other); one_shot is DC by magnitude or SVD."""

import pytest
import torch

import lccompress as lcc
from lccompress import fw, lc


def _hand_prune(model, names, keep):
    """Global magnitude pruning written here: the top round(keep·n) |w| over `names`, the rest zero."""
    flat = torch.cat([dict(model.named_parameters())[n].detach().reshape(-1) for n in names])
    kept = torch.zeros_like(flat, dtype=torch.bool)
    kept[torch.topk(flat.abs(), max(1, round(keep * flat.numel()))).indices] = True
    return torch.where(kept, flat, torch.zeros_like(flat))


def _flat(model, names):
    return torch.cat([dict(model.named_parameters())[n].detach().reshape(-1) for n in names])


def test_one_shot_prunes_to_the_global_magnitude_mask(toy):
    model, _ = toy
    names = ["fc1.weight", "fc2.weight"]
    res = lcc.one_shot(model, names, keep=0.25)
    assert torch.equal(_flat(res.model, names), _hand_prune(model, names, 0.25))
    assert res.bits() < res.dense_bits()


def test_one_shot_low_rank_is_the_truncated_svd(toy):
    model, _ = toy
    res = lcc.one_shot(model, "fc1.weight", rank=2)
    U, S, Vh = torch.linalg.svd(model.fc1.weight.detach().double())
    want = (U[:, :2] * S[:2]) @ Vh[:2]
    assert torch.allclose(res.model.fc1.weight.detach().double(), want, atol=1e-5)
    with pytest.raises(lcc.ConfigError):
        lcc.one_shot(model, "fc1.weight")


def test_sfw_is_frank_wolfe_then_dc(toy):
    model, loader = toy
    names = ["fc1.weight", "fc2.weight"]
    recipe = lcc.Recipe.single(names, lcc.Prune(keep=0.2), joint=True)
    opts = {"epochs": 2, "lr": 0.05}
    got = lcc.compress(model, recipe, loader, method="sfw", device="cpu", seed=3, sfw=opts)
    # the same two steps taken by hand: SFW in the matching k-sparse polytope, then magnitude pruning
    refined = fw.sfw_refine(model, loader, {tuple(names): fw.KSparsePolytope(k=0.2)}, device="cpu", seed=3,
                            **{**fw.SFW_DEFAULTS, **opts})
    assert torch.equal(_flat(got.model, names), _hand_prune(refined, names, 0.2))
    assert got.method == "sfw" and got.timings["lstep"] > 0
    assert torch.equal(got.model.fc1.bias, refined.fc1.bias)  # dense parameters keep their SFW values


def test_fw_grow_stays_within_its_budget_and_keeps_every_weight(toy):
    model, loader = toy
    recipe = lcc.Recipe.single(["fc1.weight", "fc2.weight"], lcc.Prune(count=20), joint=True)
    got = lcc.compress(model, recipe, loader, method="fw-grow", device="cpu")
    nnz = int((_flat(got.model, ["fc1.weight", "fc2.weight"]) != 0).sum())
    assert 0 < nnz <= 20 and got.method == "fw-grow"


def test_fw_grow_sets_follow_the_recipe():
    from lccompress.implicit import ImplicitNet
    from lccompress.methods import grow_sets

    net = ImplicitNet(6, 10, 3)
    recipe = lcc.Recipe((lcc.Rule(("A",), lcc.SparseRowL1Ball(0.9, keep=0.2)),
                         lcc.Rule(("B",), lcc.Prune(keep=0.1)),
                         lcc.Rule(("C",), lcc.SparseRowL1Ball(0.5, count=7, per_row=False)),
                         lcc.Rule(("D",), lcc.RowL1Ball(0.7))))
    assert grow_sets(recipe, net) == [fw.GrowSet(("A",), 20, kappa=0.9, row_count=2), fw.GrowSet(("B",), 6),
                                      fw.GrowSet(("C",), 7, kappa=0.5), fw.GrowSet(("D",), 18, kappa=0.7)]


def test_fw_grow_on_an_implicit_net_is_well_posed_and_within_budget():
    from lccompress.implicit import ImplicitNet

    g = torch.Generator().manual_seed(0)
    X = torch.randn(96, 6, generator=g)
    y = (X[:, 0] + X[:, 1] > 0).long() + (X[:, 2] > 1).long()
    loader = [(X[i:i + 32], y[i:i + 32]) for i in range(0, 96, 32)]
    torch.manual_seed(0)
    net = ImplicitNet(6, 10, 3)
    recipe = lcc.Recipe((lcc.Rule(("A",), lcc.SparseRowL1Ball(0.9, keep=0.2, per_row=False)),
                         lcc.Rule(("B",), lcc.Prune(keep=0.3))))
    got = lcc.compress(net, recipe, {"train": loader, "eval": loader}, method="fw-grow", device="cpu")
    A, B = got.model.A.detach(), got.model.B.detach()
    assert 0 < int((A != 0).sum()) <= 20 and 0 < int((B != 0).sum()) <= 18
    assert float(A.abs().sum(1).max()) <= 0.9 + 1e-6 and got.metric is not None


def test_method_errors_are_named(toy):
    model, loader = toy
    recipe = lcc.Recipe.single(["fc1.weight"], lcc.Prune(keep=0.5))
    with pytest.raises(lcc.ConfigError, match="method='magic'"):
        lcc.compress(model, recipe, loader, method="magic")
    with pytest.raises(lcc.ConfigError, match="needs training data"):
        lcc.compress(model, recipe, method="sfw")
    with pytest.raises(lcc.ConfigError, match="lstep= does not apply"):
        lcc.compress(model, recipe, loader, method="sfw", lstep=lambda m, p, c: None)
    with pytest.raises(lcc.ConfigError, match="not LowRank"):
        lcc.compress(model, lcc.Recipe.single(["fc1.weight"], lcc.LowRank(2)), loader, method="fw-grow")
    assert lc.METHODS == ("dc", "idc", "lc", "finetune", "acdc")
    assert set(lcc.METHODS) == set(lc.METHODS) | {"cram", "sfw", "fw-grow"}
