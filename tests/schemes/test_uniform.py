"""Uniform integer grids: the C step against a dense grid search, the layout, the ONNX forms."""

import numpy as np
import pytest
import torch

import lccompress as lcc
from lccompress.artifact import size_report
from lccompress.artifact.onnx_export import export_onnx, verify_onnx
from lccompress.schemes.uniform import _fit


def _grid_search(x, bits, symmetric, scales=1500):
    """min over a dense grid of scales × every zero point of Σ (x − s(clamp(round(x/s + z)) − z))²."""
    top = 2 ** bits - 1
    r = float(max(x.max(), 0) - min(x.min(), 0))
    s = torch.linspace(r / top * 0.05, r if symmetric else 2.5 * r / top, scales, dtype=torch.float64)
    best = float("inf")
    for z in ([2 ** (bits - 1)] if symmetric else range(top + 1)):
        q = torch.clamp(torch.round(x[None] / s[:, None] + z), 0, top)
        best = min(best, float((x[None] - s[:, None] * (q - z)).pow(2).sum(1).min()))
    return best


def _min_max(x, bits, symmetric):
    """Round-to-nearest on the min–max grid (the range including 0): what every PTQ tool ships."""
    top = 2 ** bits - 1
    lo, hi = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
    if symmetric:
        h = 2 ** (bits - 1)
        s, z = (max(-lo, hi) / h if -lo >= hi else hi / max(h - 1, 1)), h
    else:
        s = (hi - lo) / top
        z = min(max(round(-lo / s), 0), top)
    q = torch.clamp(torch.round(x / s + z), 0, top)
    return float((x - s * (q - z)).pow(2).sum())


def _blocks(dist, g, n=6, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, g, generator=gen, dtype=torch.float64)
    if dist == "laplace":
        x = torch.sign(x) * torch.empty_like(x).exponential_(generator=gen)
    elif dist == "outlier":
        x[:, 0] *= 8
    elif dist == "positive":
        x = x.abs() + 0.5
    elif dist == "ties":
        x = torch.round(x * 2) / 2
    return x


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("g", [16, 32])
def test_c_step_within_1_percent_of_a_dense_grid_search_and_never_worse_than_min_max(bits, symmetric, g):
    for dist in ("normal", "laplace", "outlier", "positive", "ties"):
        x = _blocks(dist, g)
        _, _, err = _fit(x, bits, symmetric)
        for i in range(x.shape[0]):
            assert float(err[i]) <= _min_max(x[i], bits, symmetric) * (1 + 1e-9) + 1e-12, dist
            assert float(err[i]) <= _grid_search(x[i], bits, symmetric, 1500 if bits < 8 else 400) * 1.01 + 1e-12, dist


def test_reported_error_is_the_error_of_the_codes_it_implies():
    x = _blocks("laplace", 32, n=20, seed=3)
    s, z, err = _fit(x, 4, False)
    q = torch.clamp(torch.round(x / s[:, None] + z[:, None]), 0, 15)
    assert torch.allclose((x - s[:, None] * (q - z[:, None])).pow(2).sum(1), err, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("shape,g", [((5, 40), 16), ((4, 3, 3, 3), 0), ((3, 64), 32), ((6, 20), 32)])
@pytest.mark.parametrize("symmetric", [False, True])
def test_layout_matches_the_formula_blocks_along_the_input(shape, g, symmetric):
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    sch = lcc.Uniform(bits=4, group_size=g, symmetric=symmetric)
    th = sch.compress(w)
    m, k = shape[0], int(np.prod(shape[1:]))
    gs = g or k
    nb = -(-k // gs)
    assert th["codes"].shape == (m, k) and th["codes"].dtype == torch.uint8 and int(th["codes"].max()) <= 15
    assert th["scale"].shape == (m, nb) and bool((th["scale"] > 0).all())
    z = torch.full((m, nb), 8.0) if symmetric else th["zero"].float()
    assert symmetric == ("zero" not in th)
    want = torch.empty(m, k)
    for r in range(m):
        for c in range(k):
            want[r, c] = th["scale"][r, c // gs] * (th["codes"][r, c] - z[r, c // gs])
    assert torch.equal(sch.decompress(th, shape), want.reshape(shape))
    # each block independently optimal: compressing one block alone gives the same grid
    blk = w.reshape(m, k)[:, :gs]
    alone = lcc.Uniform(bits=4, group_size=0, symmetric=symmetric).compress(blk)
    assert torch.allclose(alone["scale"][:, 0], th["scale"][:, 0])
    bits = m * k * 4 + m * nb * (32 + (0 if symmetric else 4))
    assert sch.bits(th, shape) == bits


def test_half_precision_weights_keep_their_dtype():
    w = torch.randn(8, 64).half()
    th = lcc.Uniform(bits=4, group_size=32).compress(w)
    assert th["scale"].dtype == torch.float16
    d = lcc.Uniform(bits=4, group_size=32).decompress(th, w.shape)
    assert d.dtype == torch.float16 and float((d.float() - w.float()).norm() / w.float().norm()) < 0.15


def test_bad_hyperparameters_are_named():
    for kw, msg in (({"bits": 1}, "bits"), ({"bits": 9}, "bits"), ({"group_size": 24}, "group_size"),
                    ({"symmetric": "yes"}, "symmetric")):
        with pytest.raises(lcc.ConfigError, match=msg):
            lcc.Uniform(**kw)


class _Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 4, 3)
        self.fc1 = torch.nn.Linear(144, 48)  # 144 = 4.5 blocks of 32: a padded last block
        self.fc2 = torch.nn.Linear(48, 10, bias=False)  # exported as Transpose + MatMul

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(torch.relu(self.conv(x)).flatten(1))))


@pytest.mark.parametrize("scheme,linear,conv", [
    (lcc.Uniform(bits=4, group_size=32), "matmulnbits/4bit/b32", "dequantize/uint4/channel"),
    (lcc.Uniform(bits=4, symmetric=True), "matmulnbits/4bit/b256", "dequantize/uint4/channel"),
    (lcc.Uniform(bits=2, group_size=16), "dequantize/uint4/g16", "dequantize/uint4/channel"),
    (lcc.Uniform(bits=8, group_size=16), "dequantize/uint8/g16", "dequantize/uint8/channel"),
])
def test_onnx_forms_run_in_onnxruntime_like_torch(tmp_path, scheme, linear, conv):
    torch.manual_seed(0)
    model = _Net().eval()
    r = lcc.compress(model, lcc.Recipe.single(["conv.weight", "fc1.weight", "fc2.weight"], scheme), method="dc")
    enc = export_onnx(r.model, r.thetas, r.groups, torch.randn(2, 1, 8, 8), tmp_path / "m.onnx")
    assert enc == {"conv.weight": conv, "fc1.weight": linear, "fc2.weight": linear.replace("b256", "b64")
                   if "b256" in linear else linear}
    err = verify_onnx(tmp_path / "m.onnx", r.model, torch.randn(7, 1, 8, 8))
    assert err["max_rel"] < 1e-4


def test_matmul_nbits_on_a_sequence_input(tmp_path):
    """A Linear on (batch, seq, features) exports as MatMul(x, Wᵀ) + Add: also MatMulNBits."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.GELU(), torch.nn.Linear(32, 8)).eval()
    r = lcc.compress(model, lcc.Recipe.single(["0.weight", "2.weight"], lcc.Uniform(bits=4, group_size=16)), method="dc")
    enc = export_onnx(r.model, r.thetas, r.groups, torch.randn(2, 5, 64), tmp_path / "s.onnx")
    assert set(enc.values()) == {"matmulnbits/4bit/b16"}
    assert verify_onnx(tmp_path / "s.onnx", r.model, torch.randn(3, 9, 64))["max_rel"] < 1e-4


@pytest.mark.parametrize("bits", [2, 3, 8])
def test_folded_form_is_smaller_and_matches_torch(tmp_path, bits):
    """"fold": codes bit-packed at the grid's width, decoded by arithmetic that onnxruntime folds."""
    torch.manual_seed(0)
    model = _Net().eval()
    r = lcc.compress(model, lcc.Recipe.single(["conv.weight", "fc1.weight", "fc2.weight"],
                                             lcc.Uniform(bits=bits, group_size=16)), method="dc")
    x = torch.randn(2, 1, 8, 8)
    enc = export_onnx(r.model, r.thetas, r.groups, x, tmp_path / "f.onnx", dequantize="fold", matmul_nbits=False)
    width = {2: 2, 3: 4, 8: 8}[bits]
    assert set(enc.values()) == {f"codes/{width}bit-uniform"}
    assert verify_onnx(tmp_path / "f.onnx", r.model, torch.randn(7, 1, 8, 8))["max_rel"] < 1e-5
    export_onnx(r.model, r.thetas, r.groups, x, tmp_path / "q.onnx", matmul_nbits=False)
    if bits == 2:  # DequantizeLinear holds 2-bit codes in uint4: the folded weights are smaller
        fold, qdq = (sum(g.stored_bits for g in size_report(tmp_path / f).groups) for f in ("f.onnx", "q.onnx"))
        assert fold < 0.8 * qdq


class Conv1D(torch.nn.Module):
    """A layer stored as GPT-2 stores it: weight (in, out), y = x W + b."""

    def __init__(self, n_in, n_out):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(n_in, n_out) * 0.1)
        self.bias = torch.nn.Parameter(torch.randn(n_out) * 0.1)

    def forward(self, x):
        return torch.matmul(x, self.weight) + self.bias


def test_axis_1_quantizes_the_transpose():
    w = torch.randn(40, 24, generator=torch.Generator().manual_seed(2))  # (in, out)
    s1, s0 = lcc.Uniform(bits=4, group_size=16, axis=1), lcc.Uniform(bits=4, group_size=16)
    t1, t0 = s1.compress(w), s0.compress(w.T.contiguous())
    assert all(torch.equal(t1[k], t0[k]) for k in t0)  # θ is the (out, in) grid of the transpose
    assert torch.equal(s1.decompress(t1, w.shape), s0.decompress(t0, (24, 40)).T)
    assert lcc.scheme_from_dict(s1.to_dict()) == s1 and "axis" not in s0.to_dict()
    with pytest.raises(lcc.ConfigError, match="axis"):
        lcc.Uniform(axis=2)


def test_conv1d_layers_run_as_matmul_nbits(tmp_path):
    from lccompress.api import output_axes

    torch.manual_seed(0)
    model = torch.nn.Sequential(Conv1D(64, 48), torch.nn.GELU(), torch.nn.Linear(48, 8)).eval()
    recipe = output_axes(lcc.Recipe.single(["0.weight", "2.weight"], lcc.Uniform(bits=4, group_size=16)), model)
    assert {r.params: r.scheme.axis for r in recipe.rules} == {("2.weight",): 0, ("0.weight",): 1}
    r = lcc.compress(model, recipe, method="dc")
    enc = export_onnx(r.model, r.thetas, r.groups, torch.randn(2, 5, 64), tmp_path / "c.onnx")
    assert set(enc.values()) == {"matmulnbits/4bit/b16"}
    assert verify_onnx(tmp_path / "c.onnx", r.model, torch.randn(3, 7, 64))["max_rel"] < 1e-4
    enc = export_onnx(r.model, r.thetas, r.groups, torch.randn(2, 5, 64), tmp_path / "d.onnx", matmul_nbits=False)
    assert enc["0.weight"] == "dequantize/uint4/g16"
    assert verify_onnx(tmp_path / "d.onnx", r.model, torch.randn(3, 7, 64))["max_rel"] < 1e-4
    enc = export_onnx(r.model, r.thetas, r.groups, torch.randn(2, 5, 64), tmp_path / "f.onnx", matmul_nbits=False,
                      dequantize="fold")
    assert enc["0.weight"] == "codes/4bit-uniform"
    assert verify_onnx(tmp_path / "f.onnx", r.model, torch.randn(3, 7, 64))["max_rel"] < 1e-4
