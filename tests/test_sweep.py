"""The sweep: curve.json and curve.svg are written, parse, and hold what independent runs give."""

import copy
import json
import math
import os
import xml.etree.ElementTree as ET

import pytest
import torch
from torch import nn

import lccompress as lcc
from lccompress import artifact, sweep


@pytest.fixture(scope="module")
def setup():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(128, 8, generator=g)
    y = (X[:, 0] - X[:, 3] > 0).long()
    loader = [(X[i:i + 32], y[i:i + 32]) for i in range(0, 128, 32)]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(20):
        for xb, yb in loader:
            opt.zero_grad()
            nn.functional.cross_entropy(model(xb), yb).backward()
            opt.step()
    return model, {"train": loader, "eval": loader}


def test_sweep_writes_parseable_json_and_svg(tmp_path, setup):
    model, data = setup
    before = {k: v.clone() for k, v in model.state_dict().items()}
    levels = [0.3, 0.1]
    cfg = lcc.LCConfig(steps=2, epochs=1, first_epochs=1)
    out = sweep.sweep(model, data, "keep", levels, ["dc", "lc", "sfw"], tmp_path, config=cfg, sfw={"epochs": 2})
    curve = json.loads((tmp_path / "curve.json").read_text())
    assert curve == json.loads(json.dumps(out))
    assert set(curve) == {"reference", "dc", "lc", "sfw"}
    for m in ("dc", "lc", "sfw"):
        assert [p["level"] for p in curve[m]] == levels
        for p in curve[m]:
            assert 0 <= p["metric"] <= 1 and p["error"] == pytest.approx(100 * (1 - p["metric"]), abs=1e-3)
            assert 0 < p["theta_bytes"] < curve["reference"][0]["bytes"]
            assert p["bytes"] == os.stat(tmp_path / p["artifact"]).st_size
    # DC points against global magnitude pruning done here: over 0.weight and 2.weight together keep
    # the κ = round(keep·n) largest |w| (at least 1), zero the rest, and count arg-max == y by hand
    names = ["0.weight", "2.weight"]
    flat = torch.cat([model.state_dict()[n].reshape(-1) for n in names])
    n = flat.numel()
    for p, keep in zip(curve["dc"], levels):
        kappa = max(1, round(keep * n))
        mask = torch.zeros(n, dtype=torch.bool)
        mask[flat.abs().sort(descending=True).indices[:kappa]] = True
        pruned = copy.deepcopy(model)
        with torch.no_grad():
            kept = torch.where(mask, flat, torch.zeros_like(flat))
            pruned[0].weight.copy_(kept[:256].reshape(32, 8))
            pruned[2].weight.copy_(kept[256:].reshape(2, 32))
            right = sum(int((pruned(x).argmax(1) == y).sum()) for x, y in data["eval"])
        total = sum(y.numel() for _, y in data["eval"])
        assert p["metric"] == pytest.approx(right / total)
        # the point's artifact holds these weights, and θ is κ float32 values plus positions (a bit
        # mask or κ indices of ⌈log2 n⌉ bits, the smaller) next to the dense biases (32 + 2 floats)
        stored = artifact.load(tmp_path / p["artifact"]).state_dict
        assert stored.keys() == pruned.state_dict().keys()
        assert all(torch.equal(stored[k], v) for k, v in pruned.state_dict().items())
        bits = kappa * 32 + min(n, kappa * math.ceil(math.log2(n)))
        assert p["theta_bytes"] == math.ceil(bits / 8) + (32 + 2) * 4
    assert curve["dc"][0]["bytes"] > curve["dc"][1]["bytes"]
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())

    svg = ET.parse(tmp_path / "curve.svg").getroot()
    ns = "{http://www.w3.org/2000/svg}"
    assert svg.tag == f"{ns}svg"
    assert len(svg.findall(f"{ns}polyline")) == 3  # one line per method
    texts = [t.text or "" for t in svg.iter(f"{ns}text")]
    assert any("log scale" in t for t in texts) and any("error" in t for t in texts)
    assert {"dc", "lc", "sfw", "reference"} <= set(texts)  # the legend
    assert [f for f in os.listdir(tmp_path) if f.endswith(".tmp")] == []


def test_sweep_rank_and_bits(tmp_path, setup):
    model, data = setup
    out = sweep.sweep(model, data, "rank", [2], ["dc", "sfw"], tmp_path / "r", sfw={"epochs": 1})
    assert out["dc"][0]["ratio"] > 1
    out = sweep.sweep(model, data, "bits", [1, 2], ["dc"], tmp_path / "b")
    assert out["dc"][0]["bytes"] < out["dc"][1]["bytes"]
    ET.parse(tmp_path / "b" / "curve.svg")


def test_sweep_bad_arguments_raise(tmp_path, setup):
    model, data = setup
    with pytest.raises(lcc.ConfigError, match="kind="):
        sweep.sweep(model, data, "pixels", [1], ["dc"], tmp_path)
    with pytest.raises(lcc.ConfigError, match="'magic'"):
        sweep.sweep(model, data, "keep", [0.1], ["magic"], tmp_path)
    with pytest.raises(lcc.ConfigError, match="evaluation"):
        sweep.sweep(model, data["train"], "keep", [0.1], ["dc"], tmp_path)


def test_plot_svg_with_a_custom_metric_and_no_points():
    curves = {"dc": [{"level": 1, "metric": 0.5, "bytes": 1000}, {"level": 2, "metric": 0.7, "bytes": 2000}]}
    ET.fromstring(sweep.plot_svg(curves, error=False))
    ET.fromstring(sweep.plot_svg({}, error=True))
