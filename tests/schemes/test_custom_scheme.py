"""A scheme defined outside the library goes through every format without touching library code:
the container (its own codec), size accounting, inspect (API and CLI), and ONNX (its own decoder).

SignScale: θ = {"signs": uint8 (0/1) of w's shape, "scale": (out,)}, Δ(θ) = scale[:, None]·(2·signs − 1)
with the weight as a matrix (out, rest). Its C step (signs = [w ≥ 0], scale = mean |w| per row) is
checked against brute force; the formats against numpy, onnxruntime and os.stat.
"""

import itertools
import json
import math
import os
from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import safetensors.torch
import torch
from click.testing import CliRunner
from safetensors import safe_open
from torch import Tensor

import lccompress as lc
from lccompress import api
from lccompress.artifact import export_onnx, load, save, size_report
from lccompress.artifact.container import META_KEY
from lccompress.cli import main
from lccompress.digits import MLP
from lccompress.schemes.base import _REGISTRY
from lccompress.schemes.codecs import Codes

NAME = "test_sign_scale"
PARAMS = ["fc1.weight", "fc2.weight", "fc3.weight"]
SHAPES = {"fc1.weight": (300, 64), "fc2.weight": (100, 300), "fc3.weight": (10, 100)}


def define_sign_scale():
    """Define (and so register, by `Scheme.__init_subclass__`) the scheme. Done in a fixture, not at
    import: the registry is global, and tests/schemes/test_schemes.py checks it holds exactly the
    built-in schemes."""

    @dataclass(frozen=True)
    class SignScale(lc.Scheme):
        """Per-row scaled signs: Δ(θ) = diag(scale)·(2·signs − 1) of the weight as an (out, rest) matrix."""

        name = NAME
        joinable = False  # the rows are the tensor's own first dimension

        def compress(self, w: Tensor, init=None, *, mu=None):
            w2 = w.detach().reshape(w.shape[0], -1)  # (out, rest)
            return {"signs": (w >= 0).to(torch.uint8), "scale": w2.abs().mean(1)}

        def decompress(self, theta, shape):
            s, z = theta["scale"], theta["signs"]  # (out,), shape
            pm = z.to(s.dtype).reshape(s.shape[0], -1) * 2 - 1  # (out, rest) ∈ {−1, 1}
            return (s[:, None] * pm).reshape(shape)

        def bits(self, theta, shape):
            return math.prod(shape) + theta["scale"].numel() * theta["scale"].element_size() * 8

        def summary(self, theta, shape):
            return {"k": 2, "mean_scale": float(theta["scale"].mean())}

        def codecs(self, theta):
            return {"signs": Codes(2)}  # 1 bit per sign

        def onnx_decode(self, b, theta, shape, out, **options):
            """Signs bit-packed (8 per byte, LSB first), unpacked by BitShift and BitwiseAnd."""
            z = theta["signs"].detach().cpu().numpy().reshape(-1)
            s = theta["scale"].detach().cpu().numpy()
            n, rows = z.size, s.shape[0]
            x = b.op("Unsqueeze", [b.const(np.packbits(z, bitorder="little"), "signs"), b.i64(1)])  # (bytes, 1)
            x = b.op("BitShift", [x, b.const(np.arange(8, dtype=np.uint8), "shifts")], direction="RIGHT")  # (bytes, 8)
            x = b.op("BitwiseAnd", [x, b.const(np.array(1, np.uint8), "one")])
            x = b.op("Slice", [b.op("Reshape", [x, b.i64(-1)]), b.i64(0), b.i64(n)])  # (n,) ∈ {0, 1}
            pm = b.op("Sub", [b.op("Mul", [b.op("Cast", [x], to=np.float32), b.const(np.float32(2), "two")]),
                              b.const(np.float32(1), "one")])
            pm = b.op("Reshape", [pm, b.i64(rows, -1)])  # (out, rest)
            w = b.op("Mul", [pm, b.op("Unsqueeze", [b.const(s, "scale"), b.i64(1)])])
            b.op("Reshape", [w, b.i64(*shape)], out)
            return f"{NAME}/bits1"

    return SignScale


@pytest.fixture(scope="module")
def SignScale():
    assert NAME not in lc.registry(), f"a scheme named {NAME!r} is already registered"
    cls = define_sign_scale()
    yield cls
    _REGISTRY.pop(NAME, None)  # the library has no unregister; leave the registry as we found it


def np_scale(w):
    """mean |w| per row, in float64 (the library sums float32 in its own order: compare to ~1 ulp)."""
    return np.abs(w.astype(np.float64)).reshape(w.shape[0], -1).mean(1)


def np_delta(w, scale):
    """Δ the scheme must produce for w with the given per-row scale, in numpy: ±scale by sign."""
    w2 = w.reshape(w.shape[0], -1)
    return (scale[:, None] * np.where(w2 >= 0, 1, -1).astype(scale.dtype)).reshape(w.shape)


@pytest.fixture(scope="module")
def compressed(tmp_path_factory, SignScale):
    torch.manual_seed(0)
    model = MLP()
    recipe = lc.Recipe.single(PARAMS, SignScale())
    res = lc.compress(model, recipe, method="dc", device="cpu")
    d = tmp_path_factory.mktemp("custom")
    path = d / "m.safetensors"
    save(path, res.model, res.thetas, res.groups, recipe=recipe)
    return model, recipe, res, path, d


# ----------------------------------------------------------------------------- the scheme itself
def test_registered_by_name(SignScale):
    assert lc.registry()[NAME] is SignScale
    s = lc.scheme_from_dict({"scheme": NAME})
    assert type(s) is SignScale and s == SignScale() and SignScale().to_dict() == {"scheme": NAME}


def test_c_step_is_the_least_squares_optimum(SignScale):
    """On a 2×3 matrix: the C step's error equals a grid search over all 2³ sign patterns per row
    and scales in [−2, 2] (step 2·10⁻⁴), up to the grid's resolution, and is never above it."""
    w = torch.tensor([[0.3, -1.2, 0.05], [-0.7, -0.1, 0.9]], dtype=torch.float64)
    s = SignScale()
    th = s.compress(w)
    err = float(((w - s.decompress(th, w.shape)) ** 2).sum())
    grid = np.linspace(-2.0, 2.0, 20001)  # (g,)
    best = 0.0
    for row in w.numpy():
        pats = np.array(list(itertools.product((-1.0, 1.0), repeat=3)))  # (8, 3)
        e = ((row[None, None, :] - grid[:, None, None] * pats[None]) ** 2).sum(-1)  # (g, 8)
        best += float(e.min())
    h = grid[1] - grid[0]
    assert err <= best + 1e-12
    assert best - err <= 2 * 3 * (h / 2) ** 2 + 1e-12  # the grid misses the optimum by ≤ h/2 per row
    assert torch.equal(th["signs"], torch.tensor([[1, 0, 1], [0, 0, 1]], dtype=torch.uint8))
    torch.testing.assert_close(th["scale"], torch.tensor([1.55 / 3, 1.7 / 3], dtype=torch.float64), rtol=0, atol=1e-15)


def test_conv_kernels_are_rows_of_out_channels(SignScale):
    torch.manual_seed(1)
    w = torch.randn(4, 3, 2, 2)
    s = SignScale()
    th = s.compress(w)
    assert th["signs"].shape == w.shape and th["scale"].shape == (4,)
    np.testing.assert_allclose(th["scale"].numpy(), np_scale(w.numpy()), rtol=1e-6)
    assert torch.equal(s.decompress(th, w.shape), torch.from_numpy(np_delta(w.numpy(), th["scale"].numpy())))
    assert s.bits(th, w.shape) == 48 + 4 * 32


# ----------------------------------------------------------------------------- container
def test_dc_and_container_round_trip(compressed, SignScale):
    model, recipe, res, path, _ = compressed
    ref = model.state_dict()
    produced = res.model.state_dict()
    art = load(path)
    assert art.recipe == recipe and [g.name for g in art.groups] == PARAMS
    assert all(type(g.scheme) is SignScale for g in art.groups)
    for p in PARAMS:
        scale = art.thetas[p]["scale"].numpy()
        np.testing.assert_allclose(scale, np_scale(ref[p].numpy()), rtol=1e-6)
        want = torch.from_numpy(np_delta(ref[p].numpy(), scale))  # Δ(C(w)) of the original weights, by numpy
        assert torch.equal(produced[p], want), p
        assert torch.equal(art.state_dict[p], want) and art.state_dict[p].dtype == torch.float32, p
        assert torch.equal(art.thetas[p]["signs"], res.thetas[p]["signs"]), p
        assert art.thetas[p]["signs"].dtype == torch.uint8
    for k in ref.keys() - PARAMS:
        assert torch.equal(art.state_dict[k], ref[k]), k


def test_signs_are_stored_one_bit_each(compressed):
    model, _, res, path, d = compressed
    with safe_open(path, framework="np") as f:
        meta, raw = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    m = json.loads(meta[META_KEY])
    for p, (rows, cols) in SHAPES.items():
        n = rows * cols
        parts = m["groups"][p]["parts"]
        assert m["groups"][p]["scheme"] == {"scheme": NAME}
        assert parts["signs"] == {"enc": "bitpack", "dtype": "uint8", "shape": [rows, cols], "bits": 1}
        assert parts["scale"]["enc"] == "raw"
        packed = raw[f"{p}.signs"]
        assert packed.dtype == np.uint8 and packed.shape == (math.ceil(n / 8),)
        bits = np.unpackbits(packed, bitorder="little")
        assert np.array_equal(bits[:n], (model.state_dict()[p].numpy() >= 0).reshape(-1)) and not bits[n:].any()
        assert raw[f"{p}.scale"].dtype == np.float32 and np.array_equal(raw[f"{p}.scale"], res.thetas[p]["scale"].numpy())
    rep = size_report(path)
    assert rep.file_bytes == os.stat(path).st_size == rep.header_bytes + rep.payload_bits // 8
    by = {g.name: g for g in rep.groups}
    for p, (rows, cols) in SHAPES.items():
        g = by[p]
        assert g.scheme == NAME and g.encodings == {"signs": "bitpack", "scale": "raw"}
        assert g.stored_bits == 8 * math.ceil(rows * cols / 8) + 32 * rows
        assert g.scheme_bits == rows * cols + 32 * rows and g.dense_bits == 32 * rows * cols
    dense = d / "dense.safetensors"
    safetensors.torch.save_file(model.state_dict(), dense)
    assert os.stat(path).st_size < os.stat(dense).st_size / 10


# ----------------------------------------------------------------------------- inspect
def test_inspect_lists_the_scheme(compressed):
    _, _, res, path, _ = compressed
    ins = api.inspect(str(path))
    rows = {r["name"]: r for r in ins.layers}
    assert ins.file_bytes == os.stat(path).st_size
    for p, (r, c) in SHAPES.items():
        assert rows[p]["scheme"] == NAME and rows[p]["numel"] == r * c and rows[p]["shape"] == f"{r}×{c}"
        assert rows[p]["bits"] == 8 * math.ceil(r * c / 8) + 32 * r and rows[p]["detail"] == "k = 2"
    assert rows["fc1.bias"]["scheme"] == "dense"


def test_cli_inspect_prints_the_scheme(compressed):
    path = compressed[3]
    r = CliRunner().invoke(main, ["inspect", str(path), "--json"])
    assert r.exit_code == 0, (r.output, r.exception)
    layers = {row["name"]: row for row in json.loads(r.output)["layers"]}
    assert all(layers[p]["scheme"] == NAME for p in PARAMS)
    r = CliRunner().invoke(main, ["inspect", str(path)], env={"COLUMNS": "200"})
    assert r.exit_code == 0, (r.output, r.exception)
    lines = [ln for ln in r.output.splitlines() if NAME in ln]
    assert len(lines) == 3 and all(any(p in ln for ln in lines) for p in PARAMS)


# ----------------------------------------------------------------------------- ONNX
def test_onnx_uses_the_custom_decoder(compressed):
    model, _, res, _, d = compressed
    torch.manual_seed(2)
    x = torch.randn(6, 64)
    path = d / "m.onnx"
    enc = export_onnx(res.model, res.thetas, res.groups, x[:2], path)
    assert enc == {p: f"{NAME}/bits1" for p in PARAMS}
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        want = res.model.eval()(x).numpy()
    assert float(np.abs(got - want).max() / np.abs(want).max()) < 1e-5
    mp = onnx.load(str(path))
    meta = json.loads({p.key: p.value for p in mp.metadata_props}[META_KEY])
    inits = {t.name: t for t in mp.graph.initializer}
    assert not set(PARAMS) & inits.keys()  # the dense weights were replaced by decoders
    for p, (rows, cols) in SHAPES.items():
        e = meta[p]
        assert e["scheme"] == {"scheme": NAME} and e["parts"] == {p: {"enc": f"{NAME}/bits1"}}
        packed = [inits[t] for t in e["initializers"] if t.startswith("lcc/signs/")]
        assert len(packed) == 1 and list(packed[0].dims) == [math.ceil(rows * cols / 8)]
        assert packed[0].data_type == onnx.TensorProto.UINT8
    ops = {n.op_type for n in mp.graph.node}
    assert {"BitShift", "BitwiseAnd", "Cast", "Mul", "Sub", "Unsqueeze", "Reshape"} <= ops
    dense_weights = sum(4 * r * c for r, c in SHAPES.values())
    assert os.stat(path).st_size < dense_weights / 10
