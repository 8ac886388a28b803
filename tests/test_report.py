"""The report (lccompress.report): per-class accuracy, per-layer rows, JSON / Markdown written
atomically, against numbers worked out by hand here."""

import json
import math
import os

import pytest
import torch
from torch import nn

import lccompress as lcc
from lccompress import report as rep
from lccompress.artifact import save, size_report


# ----------------------------------------------------------------------------- per_class
def logits(pred: list[int], classes: int = 4) -> torch.Tensor:
    """Rows whose arg-max is `pred` (a clear margin, plus a little noise that never changes it)."""
    g = torch.Generator().manual_seed(0)
    return torch.eye(classes)[pred] * 3 + 0.1 * torch.rand(len(pred), classes, generator=g)


def test_per_class_by_hand():
    y = torch.tensor([0, 0, 1, 1, 1, 2])
    ref = logits([0, 1, 1, 1, 0, 2])  # class 0: 1 of 2 right, class 1: 2 of 3, class 2: 1 of 1
    new = logits([0, 0, 1, 2, 2, 0])  # class 0: 2 of 2, class 1: 1 of 3, class 2: 0 of 1
    rows = rep.per_class(ref.argmax(-1), new.argmax(-1), y)  # predicted classes
    # class 3 exists in the outputs but not in the targets: no row for it
    assert [r["class"] for r in rows] == [0, 1, 2]
    want = [(0.5, 1.0), (2 / 3, 1 / 3), (1.0, 0.0)]
    for r, (a, b) in zip(rows, want):
        assert r["reference"] == pytest.approx(a) and r["compressed"] == pytest.approx(b)
        assert r["delta"] == pytest.approx(b - a)
        assert isinstance(r["class"], int)
    json.dumps(rows)  # plain Python numbers


@pytest.mark.parametrize("targets", [torch.tensor([0.0, 1.0]), torch.tensor([[0], [1]]), [0, 1], None],
                         ids=["float", "2-D", "list", "none"])
def test_per_class_is_empty_without_integer_class_targets(targets):
    assert rep.per_class(logits([0, 1]), logits([1, 0]), targets) == []


# ----------------------------------------------------------------------------- layers
@pytest.fixture
def compressed():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 3))
    recipe = lcc.Recipe((lcc.Rule(("0.weight",), lcc.Prune(keep=0.25)),
                         lcc.Rule(("2.weight",), lcc.LowRank(1)),
                         lcc.Rule(("0.bias", "2.bias"), lcc.Codebook(k=2), joint=True)))
    return lcc.compress(model, recipe, method="dc", device="cpu"), recipe


# bits worked out by hand, 32-bit floats:
#   prune 0.weight (4×8 = 32 weights, keep 0.25 → 8): 8 values × 32 + positions min(32-bit mask,
#       8 × ⌈log2 32⌉ = 40) = 256 + 32 = 288 bits = 36 bytes
#   lowrank 2.weight (3×4, rank 1): U 3×1 + V 1×4 = 7 floats = 224 bits = 28 bytes
#   codebook over 0.bias + 2.bias (4 + 3 = 7 weights, k = 2): 2 entries × 32 + 7 codes × 1 bit
#       = 71 bits → ⌈71 / 8⌉ = 9 bytes
HAND = {
    "0.weight": dict(params=["0.weight"], shape=[[4, 8]], numel=32, scheme="prune",
                     summary={"kept": 8, "density": 0.25}, bits=288, bytes=36),
    "2.weight": dict(params=["2.weight"], shape=[[3, 4]], numel=12, scheme="lowrank",
                     summary={"rank": 1}, bits=224, bytes=28),
    "0.bias+2.bias": dict(params=["0.bias", "2.bias"], shape=[[4], [3]], numel=7, scheme="codebook",
                          summary={"k": 2, "bits_per_weight": 1}, bits=71, bytes=9),
}


def test_layers_rows_without_a_size_report_count_the_schemes_bits(compressed):
    r, _ = compressed
    rows = rep.layers(r.groups, r.thetas, None)
    assert [row["name"] for row in rows] == list(HAND)
    for row in rows:
        want = HAND[row["name"]]
        assert row["params"] == want["params"] and row["shape"] == want["shape"]
        assert row["numel"] == want["numel"] and row["scheme"]["scheme"] == want["scheme"]
        assert row["summary"] == want["summary"]
        assert row["bits"] == want["bits"] and row["bytes"] == want["bytes"]
    assert rows[0]["scheme"] == {"scheme": "prune", "keep": 0.25, "count": None}
    json.dumps(rows)


def test_layers_rows_with_a_size_report_give_the_bytes_on_disk(compressed, tmp_path):
    r, recipe = compressed
    path = tmp_path / "a.safetensors"
    save(path, r.model, r.thetas, r.groups, recipe=recipe)
    rows = rep.layers(r.groups, r.thetas, size_report(path))
    # every parameter is compressed, so the file is its header (8-byte length + JSON) and the rows' bytes
    raw = path.read_bytes()
    header = 8 + int.from_bytes(raw[:8], "little")
    assert header + sum(row["bytes"] for row in rows) == os.stat(path).st_size
    for row in rows:
        assert row["bits"] == 8 * row["bytes"]  # stored as whole bytes
        assert row["summary"] == HAND[row["name"]]["summary"]


# ----------------------------------------------------------------------------- summary_text
@pytest.mark.parametrize("summary,text", [
    ({"kept": 1234, "density": 0.1}, "1,234 kept (10.00 %)"),
    ({"rank": 7}, "rank 7"),
    ({"k": 16, "bits_per_weight": 4}, "k = 16"),
    ({"terms": [{"scheme": "codebook", "k": 2}, {"scheme": "prune", "kept": 50, "density": 0.005}]},
     "k = 2 + 50 kept (0.50 %)"),
    ({}, ""),
])
def test_summary_text_for_each_kind(summary, text):
    assert rep.summary_text(summary) == text


def test_summary_text_of_the_schemes_own_summaries(compressed):
    r, _ = compressed
    texts = {g.name: rep.summary_text(g.scheme.summary(r.thetas[g.name], g.shape)) for g in r.groups}
    assert texts == {"0.weight": "8 kept (25.00 %)", "2.weight": "rank 1", "0.bias+2.bias": "k = 2"}


# ----------------------------------------------------------------------------- write
def a_report(**over):
    r = {
        **rep.versions(), "command": "lccompress prune ck.pt", "method": "lc", "seed": 0, "device": "cpu",
        "artifact": "out.safetensors", "artifact_bytes": 12345, "reference_bytes": 200800,
        "compression_ratio": 200800 / 12345,
        "metric": {"name": "accuracy", "reference": 0.975, "compressed": 0.9, "onnx": None, "drop": 0.075},
        "timings": {"total": 1.234, "lstep": 0.56},
        "layers": [
            {"name": "fc1.weight", "params": ["fc1.weight"], "scheme": {"scheme": "prune", "keep": 0.1},
             "shape": [[300, 64]], "numel": 19200, "summary": {"kept": 1920, "density": 0.1},
             "bits": 75000, "bytes": 9375},
            {"name": "fc2.weight+fc3.weight", "params": ["fc2.weight", "fc3.weight"],
             "scheme": {"scheme": "codebook", "k": 4}, "shape": [[100, 300], [10, 100]], "numel": 31000,
             "summary": {"k": 4, "bits_per_weight": 2}, "bits": 62128, "bytes": 7766},
        ],
        "per_class": [{"class": 0, "reference": 0.5, "compressed": 1.0, "delta": 0.5},
                      {"class": 1, "reference": 2 / 3, "compressed": 1 / 3, "delta": -1 / 3}],
        "history": [],
    }
    return {**r, **over}


def test_versions():
    assert rep.versions() == {"lccompress_version": lcc.__version__, "torch_version": torch.__version__}


def test_write_json_round_trips(tmp_path):
    r = a_report()
    rep.write(tmp_path / "r.json", r)
    text = (tmp_path / "r.json").read_text()
    assert json.loads(text) == r and text.endswith("\n")


def test_write_json_turns_non_finite_floats_into_null(tmp_path):
    r = a_report(history=[{"step": 0, "loss": float("nan"), "gap": float("inf"), "metric": 0.5}],
                 metric={"name": "accuracy", "reference": float("-inf"), "compressed": 0.9, "onnx": None,
                         "drop": float("nan")})
    rep.write(tmp_path / "r.json", r)
    text = (tmp_path / "r.json").read_text()

    def strict(name):  # what a strict JSON reader (a browser, jq) does with NaN / Infinity
        raise ValueError(f"{name} is not JSON")

    back = json.loads(text, parse_constant=strict)
    assert back["history"] == [{"step": 0, "loss": None, "gap": None, "metric": 0.5}]
    assert back["metric"]["reference"] is None and back["metric"]["drop"] is None
    assert back["metric"]["compressed"] == 0.9


def test_write_json_writes_other_objects_as_text(tmp_path):
    rep.write(tmp_path / "r.json", a_report(artifact=tmp_path / "out.safetensors"))
    assert json.loads((tmp_path / "r.json").read_text())["artifact"] == str(tmp_path / "out.safetensors")


def test_write_markdown_tables(tmp_path):
    rep.write(tmp_path / "r.md", a_report())
    lines = (tmp_path / "r.md").read_text().splitlines()
    assert lines[0] == "# lccompress report: out.safetensors"
    assert "- method: lc, seed 0, device cpu" in lines
    assert "- artifact: 12,345 bytes on disk; reference 200,800 bytes dense; ratio 16.27×" in lines
    assert "- accuracy: reference 97.50 %, compressed 90.00 %, ONNX –, worse by 7.50 points" in lines
    assert "- time: total 1.2 s, lstep 0.6 s" in lines
    i = lines.index("| layer | scheme | shape | params | kept / k / rank | bits | bytes |")
    assert lines[i + 1:i + 4] == [
        "|---|---|---|---|---|---|---|",
        "| fc1.weight | prune | 300×64 | 19,200 | 1,920 kept (10.00 %) | 75,000 | 9,375 |",
        "| fc2.weight+fc3.weight | codebook | 100×300 + 10×100 | 31,000 | k = 4 | 62,128 | 7,766 |",
    ]
    j = lines.index("| class | reference | compressed | change |")
    assert lines[j + 1:] == ["|---|---|---|---|",
                             "| 0 | 50.00 % | 100.00 % | +50.00 |",
                             "| 1 | 66.67 % | 33.33 % | -33.33 |"]


def test_markdown_without_evaluation_has_no_metric_line_and_no_class_table():
    text = rep.markdown(a_report(metric={"name": "accuracy", "reference": None, "compressed": None,
                                         "onnx": None, "drop": None}, per_class=[], timings={}))
    assert "accuracy:" not in text and "| class |" not in text and "- time:" not in text
    assert "| fc1.weight | prune |" in text


@pytest.mark.parametrize("name", ["r.json", "r.md"])
def test_write_is_atomic_when_the_rename_fails(tmp_path, monkeypatch, name):
    target = tmp_path / name
    rep.write(target, a_report())
    before = target.read_bytes()

    def fail(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="No space"):
        rep.write(target, a_report(method="dc", artifact_bytes=1))
    assert target.read_bytes() == before  # the old report is whole, not half-written
    assert os.listdir(tmp_path) == [name]  # and no temporary file is left beside it
    target.unlink()
    with pytest.raises(OSError):
        rep.write(target, a_report())
    assert os.listdir(tmp_path) == []


def test_write_replaces_an_existing_report_and_leaves_no_temporary_file(tmp_path):
    rep.write(tmp_path / "r.json", a_report())
    rep.write(tmp_path / "r.json", a_report(method="dc"))
    assert json.loads((tmp_path / "r.json").read_text())["method"] == "dc"
    assert os.listdir(tmp_path) == ["r.json"]
    assert math.isclose(json.loads((tmp_path / "r.json").read_text())["compression_ratio"], 200800 / 12345)
