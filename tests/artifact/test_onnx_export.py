"""ONNX export: onnxruntime on the exported file against torch on a model holding Δ(θ) (built
here from the schemes), file sizes against a plain torch.onnx.export and os.stat."""

import copy
import os
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

import lccompress as lc
from lccompress.artifact import disk_bytes, export_onnx, size_report, verify_onnx
from nets import SCHEMES
from nets import make as nets_make




def make(kind):
    return nets_make(kind, 7)


SCHEMES = {
    **{k: v for k, v in SCHEMES.items() if k != "prune_joint"},
    "prune_1pct_joint": (lc.Prune(keep=0.01), True),
    "codebook_20_joint": (lc.Codebook(k=20), True),  # 5 bits: stored as uint8 in ONNX
}


def compressed(kind, name):
    """(reference model, groups, θ, torch model with weights Δ(θ), input)."""
    model, params, x = make(kind)
    scheme, joint = SCHEMES[name]
    groups = lc.Recipe.single(params, scheme, joint=joint).groups(model)
    named = dict(model.named_parameters())
    thetas = {g.name: g.compress(named, mu=1e-3) for g in groups}
    delta = copy.deepcopy(model).eval()
    with torch.no_grad():
        for g in groups:
            for p, t in g.scatter(g.scheme.decompress(thetas[g.name], g.shape)).items():
                delta.get_parameter(p).copy_(t)
    return model, groups, thetas, delta, x


def run_ort(path, x):
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]


def rel_err(got, want):
    return float(np.abs(got - want).max() / np.abs(want).max())


def plain_export(model, x, path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model.eval(), (x,), path, dynamo=False, input_names=["input"], output_names=["output"],
                          dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}})
    return os.stat(path).st_size


@pytest.mark.parametrize("kind", ["mlp", "conv"])
@pytest.mark.parametrize("name", list(SCHEMES))
def test_onnx_matches_torch(tmp_path, kind, name):
    model, groups, thetas, delta, x = compressed(kind, name)
    path = tmp_path / "m.onnx"
    enc = export_onnx(model, thetas, groups, x[:2], path)  # exported from the reference model + θ
    assert set(enc) == {p for g in groups for p in g.params}
    want = delta(x).detach().numpy()
    assert rel_err(run_ort(path, x), want) <= 1e-4
    check = verify_onnx(path, delta, x)
    assert check["max_rel"] <= 1e-4 and check["max_abs"] == pytest.approx(np.abs(run_ort(path, x) - want).max())
    assert len(os.listdir(tmp_path)) == 1  # one self-contained file
    rep = size_report(path)
    assert rep.file_bytes == os.stat(path).st_size and {g.name for g in rep.groups} == {g.name for g in groups}


def test_codebook_onnx_is_small(tmp_path):
    for k in (2, 4, 16):
        model, groups, thetas, delta, x = compressed("mlp", "codebook")
        groups = lc.Recipe.single(["fc1.weight", "fc2.weight", "fc3.weight"], lc.Codebook(k=k)).groups(model)
        named = dict(model.named_parameters())
        thetas = {g.name: g.compress(named) for g in groups}
        export_onnx(model, thetas, groups, x, tmp_path / "cb.onnx")
        dense = plain_export(model, x, tmp_path / "dense.onnx")
        ratio = os.stat(tmp_path / "cb.onnx").st_size / dense
        assert ratio <= 0.20, (k, ratio)


def test_lowrank_is_two_products_per_layer(tmp_path):
    for kind, op, n in (("mlp", ("Gemm", "MatMul"), 6), ("conv", ("Conv",), 4)):
        model, groups, thetas, delta, x = compressed(kind, "lowrank")
        enc = export_onnx(model, thetas, groups, x, tmp_path / "lr.onnx")
        assert set(enc.values()) == {"lowrank/split"}
        ops = [nd.op_type for nd in onnx.load(tmp_path / "lr.onnx").graph.node]
        assert sum(o in op for o in ops) == n, ops
        assert os.stat(tmp_path / "lr.onnx").st_size < plain_export(model, x, tmp_path / "dense.onnx")
        assert rel_err(run_ort(tmp_path / "lr.onnx", x), delta(x).detach().numpy()) <= 1e-4


def test_sparse_packed_is_smaller_than_dense(tmp_path):
    model, groups, thetas, delta, x = compressed("mlp", "prune")
    export_onnx(model, thetas, groups, x, tmp_path / "packed.onnx")
    export_onnx(model, thetas, groups, x, tmp_path / "dense.onnx", sparse="dense")
    want = delta(x).detach().numpy()
    for f in ("packed.onnx", "dense.onnx"):
        assert rel_err(run_ort(tmp_path / f, x), want) <= 1e-4
    assert os.stat(tmp_path / "packed.onnx").st_size < 0.3 * os.stat(tmp_path / "dense.onnx").st_size


def test_input_model_is_not_changed(tmp_path):
    model, groups, thetas, _, x = compressed("conv", "lowrank")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    export_onnx(model, thetas, groups, x, tmp_path / "m.onnx")
    assert isinstance(model.conv2, nn.Conv2d)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_disk_bytes_counts_external_data(tmp_path):
    model, _, x = make("mlp")
    plain_export(model, x, tmp_path / "m.onnx")
    m = onnx.load(tmp_path / "m.onnx")
    onnx.save_model(m, tmp_path / "ext.onnx", save_as_external_data=True, location="ext.onnx.data", size_threshold=0)
    want = os.stat(tmp_path / "ext.onnx").st_size + os.stat(tmp_path / "ext.onnx.data").st_size
    assert disk_bytes(tmp_path / "ext.onnx") == want


def test_wide_codes(tmp_path):
    """k = 300 codes (int32 in θ, uint16 in ONNX, 9-bit packed in the container); θ built directly."""
    from lccompress.artifact import load, save

    model, _, x = make("mlp")
    groups = lc.Recipe.single("fc1.weight", lc.Codebook(k=300)).groups(model)
    th = {"fc1.weight": {"codebook": torch.sort(torch.randn(300) * 0.1).values,
                         "codes": torch.randint(0, 300, (300, 64), dtype=torch.int32)}}
    export_onnx(model, th, groups, x, tmp_path / "m.onnx")
    delta = copy.deepcopy(model).eval()
    with torch.no_grad():
        delta.fc1.weight.copy_(th["fc1.weight"]["codebook"][th["fc1.weight"]["codes"].long()])
    assert rel_err(run_ort(tmp_path / "m.onnx", x), delta(x).detach().numpy()) <= 1e-4
    save(tmp_path / "m.safetensors", model, th, groups)
    got = load(tmp_path / "m.safetensors")
    assert torch.equal(got.thetas["fc1.weight"]["codes"], th["fc1.weight"]["codes"])
    assert torch.equal(got.state_dict["fc1.weight"], delta.fc1.weight)
    assert size_report(tmp_path / "m.safetensors").groups[0].encodings["codes"] == "bitpack"
