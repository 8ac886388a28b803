"""The API behind the CLI (lccompress.api), called directly, checked against what this file
computes itself: accuracy by arg-max over the eval loader, global magnitude pruning by sorting,
sizes from os.stat and the safetensors header."""

import importlib.util
import json
import os
from pathlib import Path

import pytest
import torch
from torch import nn

from lccompress import api
from lccompress.api import Callbacks, CompressJob
from lccompress.artifact import load, load_into_, size_report
from lccompress.checkpoint import CheckpointError
from lccompress.digits import MLP
from lccompress.errors import ConfigError, LCError
from lccompress.recipe import Recipe
from lccompress.schemes import Prune

FC = ("fc1.weight", "fc2.weight", "fc3.weight")
# the 64-300-100-10 MLP in float32: (64·300 + 300 + 300·100 + 100 + 100·10 + 10) · 4 bytes
REFERENCE_BYTES = (64 * 300 + 300 + 300 * 100 + 100 + 100 * 10 + 10) * 4
WEIGHTS = 64 * 300 + 300 * 100 + 100 * 10  # 50,200


def prune(keep):
    return lambda names: Recipe.single(names, Prune(keep=keep), joint=True)


def data_module(fx):
    spec = importlib.util.spec_from_file_location("fx_data_for_api_tests", fx["dir"] / "data.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def reference(fx) -> dict[str, torch.Tensor]:
    return torch.load(fx["ckpt"], weights_only=True)


def model_with(state) -> nn.Module:
    m = MLP()
    m.load_state_dict(state)
    return m.eval()


@torch.no_grad()
def hand_eval(model, loader):
    """(accuracy, {class: accuracy}) by arg-max over the loader, counted here."""
    right = total = 0
    per: dict[int, list[int]] = {}
    for x, y in loader:
        hit = model(x).argmax(1) == y
        right += int(hit.sum())
        total += y.numel()
        for c, h in zip(y.tolist(), hit.tolist()):
            per.setdefault(c, [0, 0])
            per[c][0] += h
            per[c][1] += 1
    return right / total, {c: a / n for c, (a, n) in sorted(per.items())}


def global_prune(state, keep, names=FC):
    """Global magnitude pruning by sorting: keep the κ = round(keep·n) largest |w| over `names`."""
    flat = torch.cat([state[n].reshape(-1) for n in names])
    k = max(1, round(keep * flat.numel()))
    threshold = flat.abs().sort(descending=True).values[k - 1]
    mask = flat.abs() >= threshold
    assert int(mask.sum()) == k  # no ties at the threshold
    out = dict(state)
    pos = 0
    for n in names:
        size = state[n].numel()
        out[n] = torch.where(mask[pos:pos + size], flat[pos:pos + size], 0.0).reshape(state[n].shape)
        pos += size
    return out


def header_bytes(path) -> int:
    with open(path, "rb") as f:
        return 8 + int.from_bytes(f.read(8), "little")


class Recorder:
    def __init__(self):
        self.events = []

    def callbacks(self):
        return Callbacks(info=lambda m: self.events.append(("info", m)),
                         start=lambda label, steps: self.events.append(("start", label, steps)),
                         step=lambda r: self.events.append(("step", r)),
                         progress=lambda done, total: self.events.append(("progress", done, total)),
                         end=lambda: self.events.append(("end",)))

    def kinds(self):
        return [e[0] for e in self.events]


@pytest.fixture(scope="module")
def dc(fx, tmp_path_factory):
    """A DC prune of the fixture checkpoint (no --model, no --data), keep 0.1."""
    d = tmp_path_factory.mktemp("dc")
    rec = Recorder()
    job = CompressJob(checkpoint=fx["ckpt"], build_recipe=prune(0.1), out=str(d / "dc.safetensors"),
                      device="cpu", argv=["prune", fx["ckpt"], "--keep", "0.1"])
    return api.compress_checkpoint(job, rec.callbacks()), rec


# ----------------------------------------------------------------------------- compress
def test_compress_with_model_and_data_runs_lc_and_its_report_is_measured(fx, tmp_path):
    out, report_path = tmp_path / "lc.safetensors", tmp_path / "r.json"
    rec = Recorder()
    argv = ["prune", fx["ckpt"], "--keep", "0.1"]
    job = CompressJob(checkpoint=fx["ckpt"], build_recipe=prune(0.1), out=str(out), report_path=str(report_path),
                      steps=2, epochs=1, first_epochs=1, model_spec=fx["model"], data_spec=fx["data"],
                      device="cpu", argv=argv, tail=0)
    outcome = api.compress_checkpoint(job, rec.callbacks())
    r = outcome.report
    assert isinstance(outcome, api.CompressOutcome) and outcome.artifact == out
    assert r["method"] == "lc" and r["command"] == "lccompress " + " ".join(argv)
    # sizes: the file on disk, and the dense reference counted by hand
    assert r["artifact_bytes"] == os.stat(out).st_size
    assert r["reference_bytes"] == REFERENCE_BYTES
    assert r["compression_ratio"] == pytest.approx(REFERENCE_BYTES / os.stat(out).st_size)
    # the metric: the artifact loaded into a fresh model, accuracy counted here on the eval loader
    loader = data_module(fx).loaders()["eval"]
    ref_acc, ref_cls = hand_eval(model_with(reference(fx)), loader)
    new = load_into_(MLP(), out).eval()
    new_acc, new_cls = hand_eval(new, loader)
    assert r["metric"]["compressed"] == pytest.approx(new_acc, abs=1e-6)
    assert r["metric"]["reference"] == pytest.approx(ref_acc, abs=1e-6)
    assert r["metric"]["drop"] == pytest.approx(ref_acc - new_acc, abs=1e-6)
    assert r["metric"]["compressed"] > 0.5  # two short LC steps keep most of the accuracy
    assert [row["class"] for row in r["per_class"]] == list(new_cls)
    for row in r["per_class"]:
        assert row["reference"] == pytest.approx(ref_cls[row["class"]])
        assert row["compressed"] == pytest.approx(new_cls[row["class"]])
    # the artifact holds exactly κ = round(0.1 · 50,200) non-zero weights
    sd = new.state_dict()
    assert sum(int((sd[n] != 0).sum()) for n in FC) == round(0.1 * WEIGHTS)
    assert all(torch.equal(outcome.result.model.state_dict()[k].cpu(), v) for k, v in sd.items())
    [layer] = r["layers"]
    assert layer["name"] == "+".join(FC) and layer["summary"]["kept"] == round(0.1 * WEIGHTS)
    # progress: start(label, steps), then per LC step its optimizer steps and one step(), then end();
    # the budget in the report counts them
    ev = rec.events
    n = len(data_module(fx).loaders()["train"])
    assert ev[0] == ("start", "LC prune", 2) and ev[-1] == ("end",)
    assert rec.kinds() == ["start"] + ["progress"] * n + ["step"] + ["progress"] * n + ["step", "end"]
    assert [e[1:] for e in ev if e[0] == "progress"] == [(i, n) for i in range(1, n + 1)] * 2
    assert r["budget"]["steps"] == 2 * n and r["budget"]["epochs"] == 2
    assert r["budget"]["samples"] == 2 * len(data_module(fx).loaders()["train"].dataset)
    records = [e[1] for e in ev if e[0] == "step"]
    assert [x.step for x in records] == [0, 1] and len(r["history"]) == 2
    assert [h["step"] for h in r["history"]] == [0, 1]
    assert all(x.metric is not None and 0 <= x.metric <= 1 for x in records)
    # the resumable state is gone after success; the report file holds the same report
    assert not (tmp_path / "lc.safetensors.lcstate").exists()
    assert json.loads(report_path.read_text()) == json.loads(json.dumps(r))


def test_compress_without_data_is_dc_and_equals_global_magnitude_pruning(fx, dc):
    outcome, rec = dc
    r = outcome.report
    infos = [e[1] for e in rec.events if e[0] == "info"]
    assert len(infos) == 1 and "DC" in infos[0] and "--data" in infos[0]
    assert "step" not in rec.kinds() and "progress" not in rec.kinds()
    assert rec.kinds()[-1] == "end"
    assert r["method"] == "dc" and r["history"] == [] and r["per_class"] == []
    assert r["metric"]["reference"] is None and r["metric"]["compressed"] is None
    assert r["artifact_bytes"] == os.stat(outcome.artifact).st_size
    want = global_prune(reference(fx), 0.1)
    got = load(outcome.artifact).state_dict
    assert got.keys() == want.keys()
    for k in want:
        assert torch.equal(got[k], want[k]), k
    model = outcome.result.model.state_dict()
    assert all(torch.equal(model[k], want[k]) for k in want)


def test_compress_without_an_output_path_writes_into_the_working_directory(fx, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    outcome = api.compress_checkpoint(CompressJob(checkpoint=fx["ckpt"], build_recipe=prune(0.5), device="cpu",
                                                  argv=[]))
    assert outcome.artifact == Path("digits_mlp.compressed.safetensors")
    assert (tmp_path / "digits_mlp.compressed.safetensors").stat().st_size == outcome.report["artifact_bytes"]


def test_compress_errors_are_lcerrors_and_write_nothing(fx, tmp_path):
    out = tmp_path / "o.safetensors"
    base = dict(checkpoint=fx["ckpt"], build_recipe=prune(0.1), out=str(out), device="cpu", argv=[])
    with pytest.raises(ConfigError, match="--model"):  # training needs the model's code
        api.compress_checkpoint(CompressJob(**{**base, "data_spec": fx["data"]}))
    with pytest.raises(ConfigError, match="needs --data"):
        api.compress_checkpoint(CompressJob(**{**base, "method": "lc"}))
    with pytest.raises(ConfigError, match="'conv\\*' matches no parameter"):
        api.compress_checkpoint(CompressJob(**{**base, "include": ("conv*",)}))
    with pytest.raises(ConfigError, match=".json or .md"):
        api.compress_checkpoint(CompressJob(**{**base, "report_path": str(tmp_path / "r.txt")}))
    with pytest.raises(CheckpointError, match="no such file"):
        api.compress_checkpoint(CompressJob(**{**base, "checkpoint": str(tmp_path / "nope.pt")}))
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- check
def test_check_bytes_budget_against_the_file_size(dc):
    art = str(dc[0].artifact)
    size = os.stat(art).st_size
    ok = api.check(art, max_bytes=size)
    assert ok.ok and ok.checks == [{"budget": "bytes", "value": size, "limit": size, "ok": True, "over": 0}]
    over = api.check(art, max_bytes=size - 100)
    assert not over.ok and over.checks[0]["over"] == 100 and over.checks[0]["value"] == size
    assert over.to_dict() == {"artifact": art, "ok": False, "checks": over.checks}


def test_check_drop_budget_equals_a_hand_evaluation(fx, dc):
    art = str(dc[0].artifact)
    loader = data_module(fx).loaders()["eval"]
    ref_acc, _ = hand_eval(model_with(reference(fx)), loader)
    new_acc, _ = hand_eval(load_into_(MLP(), art).eval(), loader)
    drop = ref_acc - new_acc
    kw = dict(reference=fx["ckpt"], model_spec=fx["model"], data_spec=fx["data"])
    loose = api.check(art, max_drop=drop + 0.01, **kw)
    [c] = loose.checks
    assert loose.ok and c["budget"] == "drop"
    assert c["reference"] == pytest.approx(ref_acc, abs=1e-6) and c["compressed"] == pytest.approx(new_acc, abs=1e-6)
    assert c["value"] == pytest.approx(drop, abs=1e-6) and c["over"] == 0
    tight = api.check(art, max_drop=drop - 0.01, max_bytes=10 ** 9, **kw)
    assert not tight.ok and [x["ok"] for x in tight.checks] == [True, False]
    assert tight.checks[1]["over"] == pytest.approx(0.01, abs=1e-6)


def test_check_errors(fx, dc, tmp_path):
    with pytest.raises(LCError, match="no such file"):
        api.check(str(tmp_path / "missing.safetensors"), max_bytes=1)
    with pytest.raises(ConfigError, match="at least one budget"):
        api.check(str(dc[0].artifact))
    with pytest.raises(ConfigError, match="--reference"):
        api.check(str(dc[0].artifact), max_drop=0.1, model_spec=fx["model"], data_spec=fx["data"])


# ----------------------------------------------------------------------------- inspect
def test_inspect_an_artifact_rows_add_up_to_the_file(fx, dc):
    art = str(dc[0].artifact)
    info = api.inspect(art)
    size = os.stat(art).st_size
    assert info.file_bytes == size
    rows = {row["name"]: row for row in info.layers}
    group = rows.pop("+".join(FC))
    assert group["numel"] == WEIGHTS and group["scheme"] == "prune"
    assert group["detail"] == f"{round(0.1 * WEIGHTS):,} kept (10.00 %)"
    assert group["shape"] == "300×64 + 100×300 + 10×100"
    assert group["bytes"] * 8 == group["bits"]
    # the dense rows are the biases, 4 bytes each
    assert {n: (r["scheme"], r["bytes"], r["detail"]) for n, r in rows.items()} == {
        "fc1.bias": ("dense", 1200, "float32"), "fc2.bias": ("dense", 400, "float32"),
        "fc3.bias": ("dense", 40, "float32")}
    # header (8-byte length + JSON) + every row's bytes = the file; and the size report agrees
    assert header_bytes(art) + sum(r["bytes"] for r in info.layers) == size
    rep = size_report(art)
    assert group["bits"] == rep.theta_bits and sum(r["bits"] for r in rows.values()) == rep.dense_tensor_bits


def test_inspect_a_checkpoint(fx):
    info = api.inspect(fx["ckpt"])
    assert info.file_bytes == os.stat(fx["ckpt"]).st_size
    ref = reference(fx)
    assert [r["name"] for r in info.layers] == list(ref)
    for r in info.layers:
        assert r["bytes"] == ref[r["name"]].numel() * 4 and r["scheme"] == "dense"
    assert sum(r["bytes"] for r in info.layers) == REFERENCE_BYTES
    assert {r["name"]: r["shape"] for r in info.layers}["fc1.weight"] == "300×64"


def test_inspect_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="no such file"):
        api.inspect(str(tmp_path / "nope.pt"))


def test_inspect_and_check_of_a_corrupt_onnx_file_raise_lcerror(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"this is not an ONNX protobuf")
    with pytest.raises(LCError):
        api.inspect(str(bad))
    with pytest.raises(LCError):
        api.check(str(bad), max_bytes=10)


# ----------------------------------------------------------------------------- export
def test_export_matches_the_artifact_in_onnxruntime(fx, dc, tmp_path):
    import onnxruntime as ort

    onnx_path = tmp_path / "m.onnx"
    got = api.export(str(dc[0].artifact), str(onnx_path), fx["model"], input_shape="2,64")
    assert got.path == onnx_path and onnx_path.exists()
    assert got.bytes == os.stat(onnx_path).st_size
    assert got.max_rel < 1e-5
    # on real digits too (a batch size the export did not see)
    x, _ = torch.load(fx["dir"] / "digits_data.pt", weights_only=True)["test"]
    s = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    out = torch.from_numpy(s.run(None, {s.get_inputs()[0].name: x[:50].numpy()})[0])
    with torch.no_grad():
        want = load_into_(MLP(), dc[0].artifact).eval()(x[:50])
    assert torch.allclose(out, want, atol=1e-4, rtol=1e-4)
    with pytest.raises(ConfigError, match=".onnx"):
        api.export(str(dc[0].artifact), str(tmp_path / "m.zip"), fx["model"], input_shape="2,64")
    with pytest.raises(ConfigError, match="input"):
        api.export(str(dc[0].artifact), str(tmp_path / "n.onnx"), fx["model"])


# ----------------------------------------------------------------------------- multilevel / extract
def test_multilevel_then_extract_equals_global_magnitude_pruning(fx, tmp_path):
    multi = tmp_path / "multi.safetensors"
    ml = api.multilevel(fx["ckpt"], [0.5, 0.2, 0.1], str(multi))
    assert ml.path == multi and ml.bytes == os.stat(multi).st_size
    assert [(lv["level"], lv["units"]) for lv in ml.levels] == [
        (0, WEIGHTS), (1, round(0.5 * WEIGHTS)), (2, round(0.2 * WEIGHTS)), (3, round(0.1 * WEIGHTS))]
    out = tmp_path / "l2.safetensors"
    ex = api.extract(str(multi), 2, str(out))
    assert ex.path == out and ex.bytes == os.stat(out).st_size
    got = load(out).state_dict
    want = global_prune(reference(fx), 0.2)
    assert got.keys() == want.keys()
    for k in want:
        assert torch.equal(got[k], want[k]), k


def test_multilevel_per_layer_then_extract_prunes_each_layer_alone(fx, tmp_path):
    multi = tmp_path / "multi.safetensors"
    api.multilevel(fx["ckpt"], [0.5, 0.25], str(multi), per_layer=True)
    api.extract(str(multi), 1, str(tmp_path / "l1.safetensors"))
    got = load(tmp_path / "l1.safetensors").state_dict
    ref = reference(fx)
    for n in FC:
        assert torch.equal(got[n], global_prune(ref, 0.5, names=(n,))[n]), n
    assert all(torch.equal(got[k], ref[k]) for k in ref if k not in FC)


def test_extract_errors(fx, tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        api.extract(str(tmp_path / "nope.safetensors"), 1, str(tmp_path / "o.safetensors"))
    multi = tmp_path / "multi.safetensors"
    api.multilevel(fx["ckpt"], [0.5], str(multi))
    with pytest.raises(ConfigError, match="level=2"):
        api.extract(str(multi), 2, str(tmp_path / "o.safetensors"))
    assert not (tmp_path / "o.safetensors").exists()


# ----------------------------------------------------------------------------- pieces
def test_state_module_holds_the_state_dict():
    state = {"a.weight": torch.randn(3, 2), "a.b.bias": torch.randn(3), "steps": torch.tensor(5)}
    m = api.state_module(state)
    params = dict(m.named_parameters())
    assert set(params) == {"a.weight", "a.b.bias"}
    assert torch.equal(params["a.weight"], state["a.weight"]) and torch.equal(m.steps, state["steps"])
    with torch.no_grad():
        params["a.weight"].zero_()
    assert state["a.weight"].abs().sum() > 0  # a copy, not the caller's tensors


def test_default_targets_and_select():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.LayerNorm(2), nn.Flatten(), nn.Linear(4, 3), nn.Embedding(5, 2))
    assert api.default_targets(model, True) == ["0.weight", "3.weight", "4.weight"]  # not the LayerNorm
    bare = api.state_module(model.state_dict())  # weights only: every ≥2-D *.weight
    assert api.default_targets(bare, False) == ["0.weight", "3.weight", "4.weight"]
    from lccompress.implicit import ImplicitNet

    deq = nn.Sequential(nn.Linear(8, 8), ImplicitNet(8, 6, 3))
    assert api.default_targets(deq, True) == ["0.weight", "1.A", "1.B", "1.C", "1.D"]  # not the bias
    assert api.select(model, True, ["*.bias"], []) == ["0.bias", "1.bias", "3.bias"]
    assert api.select(model, True, [], ["4.*"]) == ["0.weight", "3.weight"]
    with pytest.raises(ConfigError, match="'fc\\*' matches no parameter"):
        api.select(model, True, ["fc*"], [])
    with pytest.raises(ConfigError, match="no parameter left"):
        api.select(model, True, ["3.weight"], ["3.*"])


def test_load_data(fx):
    d = fx["dir"] / "data.py"
    assert set(api.load_data(f"{d}:loaders")) == {"train", "eval"}
    assert set(api.load_data(f"{d}:missing_eval")) == {"train"}
    with pytest.raises(ConfigError, match="disk on fire"):
        api.load_data(f"{d}:broken")
    with pytest.raises(CheckpointError, match="no function"):
        api.load_data(f"{d}:nothere")


def test_report_certifies_implicit_layers(fx, tmp_path):
    """An implicit model compressed under the well-posedness constraint: the report's ‖A‖∞ is the
    artifact's largest row ℓ1 norm, below κ, and its residual that of a plain Picard loop."""
    from lccompress.implicit import ImplicitNet
    from lccompress.recipe import Rule
    from lccompress.schemes import SparseRowL1Ball

    (tmp_path / "imp.py").write_text("import torch\nfrom lccompress.implicit import ImplicitNet\n"
                                     "def make():\n    torch.manual_seed(0)\n    return ImplicitNet(64, 32, 10)\n")
    torch.manual_seed(0)
    net = ImplicitNet(64, 32, 10)
    torch.save(net.state_dict(), tmp_path / "imp.pt")
    recipe = Recipe((Rule(("A",), SparseRowL1Ball(kappa=0.4, keep=0.25)),))
    job = CompressJob(checkpoint=str(tmp_path / "imp.pt"), build_recipe=lambda names: recipe,
                      out=str(tmp_path / "imp.safetensors"), model_spec=f"{tmp_path / 'imp.py'}:make",
                      data_spec=fx["data"], steps=2, epochs=1, first_epochs=1, device="cpu",
                      argv=["compress"])
    [cert] = api.compress_checkpoint(job).report["implicit"]
    small = load_into_(ImplicitNet(64, 32, 10), str(tmp_path / "imp.safetensors"))
    A, B = small.A.detach().double(), small.B.detach().double()
    assert cert["module"] == "(model)" and cert["well_posed"]
    assert cert["norm_inf"] == pytest.approx(float(A.abs().sum(1).max()), rel=1e-6) and cert["norm_inf"] <= 0.4 + 1e-6
    assert int((A != 0).sum()) <= 32 * 8  # a quarter of each row
    u = next(iter(data_module(fx).loaders()["eval"]))[0].double()  # the batch the report used
    x = torch.zeros(len(u), 32, dtype=torch.float64)
    for _ in range(500):
        x = torch.relu(x @ A.T + u @ B.T)
    assert cert["residual"] <= 1e-5 and float((x - torch.relu(x @ A.T + u @ B.T)).norm()) <= 1e-9
