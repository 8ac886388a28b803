"""Structured pruning: the group-ℓ0 C step by brute force, coupled units, shrunk exports, the CLI."""

import itertools
import json
import os

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from test_structure import Concat, LeNet, ResNet, randomize

import lccompress as lcc
from lccompress.artifact import export_onnx, load, save, size_report, verify_onnx
from lccompress.cli import main
from lccompress.recipe import UnitGroup


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("count", [1, 2, 4])
def test_c_step_is_the_best_row_subset(seed, count):
    w = torch.randn(6, 2, 3, generator=torch.Generator().manual_seed(seed))
    th = lcc.StructuredPrune(count=count).compress(w)
    d = lcc.StructuredPrune(count=count).decompress(th, w.shape)
    rows = w.reshape(6, -1)
    best = min(float((rows ** 2).sum() - (rows[list(s)] ** 2).sum()) for s in itertools.combinations(range(6), count))
    assert abs(float(((w - d) ** 2).sum()) - best) < 1e-5
    kept = (d.reshape(6, -1) != 0).any(1)
    assert int(kept.sum()) == count and torch.equal(d.reshape(6, -1)[kept], rows[kept])


def _dc(model, x, keep=0.5):
    recipe = lcc.Recipe.structured(model, (x,), lcc.StructuredPrune(keep=keep))
    return recipe, lcc.compress(model, recipe, method="dc")


def test_coupled_layers_form_one_unit_and_lose_the_same_channels():
    """A residual add joins the convs feeding it (and their BatchNorms): one constraint, one set of rows."""
    torch.manual_seed(0)
    model, x = randomize(ResNet(), 0).eval(), torch.randn(2, 3, 8, 8)
    recipe, r = _dc(model, x)
    groups = {frozenset(g.params): g for g in r.groups}
    coupled = next(g for g in r.groups if "stem.weight" in g.params)
    assert isinstance(coupled, UnitGroup) and "b1.bn_b.weight" in coupled.params and "stem_bn.bias" in coupled.params
    sd = dict(r.model.named_parameters())
    zero = lambda n: (sd[n].reshape(sd[n].shape[0], -1) == 0).all(1)  # noqa: E731
    rows = zero("stem.weight")
    assert 0 < int(rows.sum()) < rows.numel()
    for p in coupled.params:
        assert torch.equal(zero(p), rows), p  # every producer of a removed channel is zero
    # gather / scatter is the identity on the coupled parameters
    w = coupled.gather(dict(model.named_parameters()))
    back = coupled.scatter(w)
    assert all(torch.equal(back[p], dict(model.named_parameters())[p]) for p in coupled.params)
    assert len(groups) == len(r.groups)


@pytest.mark.parametrize("net,shape", [(LeNet, (2, 1, 28, 28)), (ResNet, (2, 3, 8, 8)), (Concat, (2, 3, 8, 8))])
def test_onnx_export_shrinks_layers_and_matches_torch(tmp_path, net, shape):
    torch.manual_seed(0)
    model, x = randomize(net(), 0).eval(), torch.randn(*shape)
    _, r = _dc(model, x)
    enc = export_onnx(r.model, r.thetas, r.groups, x, tmp_path / "s.onnx")
    assert set(enc.values()) == {"structured/shrunk"}
    export_onnx(model, {}, [], x, tmp_path / "d.onnx")
    assert verify_onnx(tmp_path / "s.onnx", r.model, torch.randn(5, *shape[1:]))["max_rel"] < 1e-4
    count = lambda p: sum(int(np.prod(t.dims)) for t in onnx.load(str(p)).graph.initializer)  # noqa: E731
    assert count(tmp_path / "s.onnx") < 0.6 * count(tmp_path / "d.onnx")


def test_container_round_trip_keeps_the_units(tmp_path):
    torch.manual_seed(0)
    model, x = randomize(ResNet(), 0).eval(), torch.randn(2, 3, 8, 8)
    recipe, r = _dc(model, x)
    save(tmp_path / "s.safetensors", r.model, r.thetas, r.groups, recipe=recipe)
    art = load(tmp_path / "s.safetensors")
    assert [type(g) for g in art.groups] == [type(g) for g in r.groups]
    sd = r.model.state_dict()
    assert all(torch.equal(art.state_dict[k], sd[k]) for k in sd)
    size = size_report(tmp_path / "s.safetensors")
    assert size.theta_bits < 0.6 * size.dense_bits  # half the rows, plus their positions


def test_lc_ends_feasible():
    torch.manual_seed(0)
    model, x = randomize(LeNet(), 0), torch.randn(16, 1, 28, 28)
    y = torch.randint(0, 10, (16,))
    recipe = lcc.Recipe.structured(model, (x[:2],), lcc.StructuredPrune(keep=0.5))
    r = lcc.compress(model, recipe, {"train": [(x, y)] * 4}, method="lc", config=lcc.LCConfig(steps=3, epochs=1))
    for g in r.groups:
        w = g.gather(dict(r.model.named_parameters()))
        assert int((w != 0).any(1).sum()) <= round(0.5 * w.shape[0])


def run(*args, ok=True):
    res = CliRunner().invoke(main, [str(a) for a in args])
    if ok:
        assert res.exit_code == 0, (res.output, res.exception)
    return res


def test_cli_structured_onnx_with_device_figures(fx, tmp_path):
    out, rep = tmp_path / "s.onnx", tmp_path / "r.json"
    run("prune", fx["ckpt"], "--keep", "0.5", "--structured", "--model", fx["model"], "--data", fx["data"],
        "-o", out, "--report", rep, "--steps", "2", "--epochs", "0.5")
    r = json.loads(rep.read_text())
    assert {row["scheme"]["scheme"] for row in r["layers"]} == {"structured"}
    d = r["device_figures"]
    assert d["artifact"]["file_bytes"] == os.path.getsize(out) < d["reference"]["file_bytes"]
    assert set(d["artifact"]["latency_ms"]) == {"1", "32"} and d["artifact"]["session_bytes"] > 0
    assert r["onnx_max_rel_diff"] < 1e-4


def test_cli_structured_refusals(fx, tmp_path):
    res = run("prune", fx["ckpt"], "--keep", "0.5", "--structured", "--per-layer", "-o", tmp_path / "a.safetensors", ok=False)
    assert res.exit_code == 2 and "--structured" in res.output
    res = run("prune", fx["ckpt"], "--keep", "0.5", "--structured", "-o", tmp_path / "b.safetensors", ok=False)
    errors = [ln for ln in res.output.splitlines() if ln.startswith("Error")]
    assert res.exit_code != 0 and len(errors) == 1 and "--model" in errors[0] and "Traceback" not in res.output
    assert not (tmp_path / "b.safetensors").exists()


def test_global_keeps_the_largest_channels_over_all_layers():
    torch.manual_seed(0)
    model, x = randomize(ResNet(), 0).eval(), torch.randn(2, 3, 8, 8)
    recipe = lcc.Recipe.structured(model, (x,), lcc.StructuredPrune(keep=0.3), joint=True)
    r = lcc.compress(model, recipe, method="dc")
    assert len(r.groups) == 1
    sd = dict(model.named_parameters())
    norms, zero = [], []
    for u in r.groups[0].units:  # each channel's squared norm over its producers, from the slices themselves
        n2 = sum(sd[s.name].narrow(s.dim, s.offset, u.channels * s.per).movedim(s.dim, 0)
                 .reshape(u.channels, -1).pow(2).sum(1) for s in u.producers)
        norms.append(n2)
        new = dict(r.model.named_parameters())
        zero.append(sum(new[s.name].narrow(s.dim, s.offset, u.channels * s.per).movedim(s.dim, 0)
                        .reshape(u.channels, -1).abs().sum(1) for s in u.producers) == 0)
    norms, zero = torch.cat(norms), torch.cat(zero)
    kept = set(torch.topk(norms, round(0.3 * norms.numel())).indices.tolist())
    assert set((~zero).nonzero().reshape(-1).tolist()) == kept
