"""The compressed safetensors container and size accounting, checked against independent truths:
Δ(θ) from the scheme itself, a numpy-only decoder of the raw file written here from the documented
encodings, a fresh interpreter, os.stat, and hand-made broken files."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import safetensors.torch
import torch
from safetensors import safe_open
from torch import nn

import lccompress as lc
from lccompress.artifact import ArtifactError, load, load_into_, save, size_report, split_lowrank_
from lccompress.artifact.container import META_KEY, seal, unseal
from lccompress.schemes.codecs import delta_decode, delta_encode
from lccompress.digits import MLP
from nets import SCHEMES, ConvNet, make



def dc(kind, name):
    model, params, x = make(kind)
    scheme, joint = SCHEMES[name]
    recipe = lc.Recipe.single(params, scheme, joint=joint)
    return model, recipe, lc.compress(model, recipe, method="dc", device="cpu"), x


def truth(result):
    """Δ(θ) per compressed parameter, straight from the schemes."""
    out = {}
    for g in result.groups:
        full = g.scheme.decompress(result.thetas[g.name], g.shape)
        out.update(g.scatter(full))
    return out


def same(a, b):
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)


# ----------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("kind", ["mlp", "conv"])
@pytest.mark.parametrize("name", list(SCHEMES))
def test_round_trip_is_exact(tmp_path, kind, name):
    model, recipe, res, _ = dc(kind, name)
    path = tmp_path / "m.safetensors"
    save(path, res.model, res.thetas, res.groups, recipe=recipe)
    thetas, groups, sd = load(path)
    want = truth(res)
    dense = {k: v for k, v in model.state_dict().items() if k not in want}
    assert sd.keys() == want.keys() | dense.keys()
    for k, v in want.items():
        assert same(sd[k], v.detach()), k
    for k, v in dense.items():
        assert same(sd[k], v), k
    assert [g.name for g in groups] == [g.name for g in res.groups]
    for g, g0 in zip(groups, res.groups):
        assert g.scheme == g0.scheme and g.params == g0.params and g.shapes == g0.shapes
        assert thetas[g.name].keys() == res.thetas[g.name].keys()
        assert all(same(thetas[g.name][k], v) for k, v in res.thetas[g.name].items())
    assert load(path).recipe == recipe
    fresh = make(kind)[0]
    load_into_(fresh, path)
    assert all(same(fresh.state_dict()[k], v) for k, v in sd.items())


# ----------------------------------------------------------------------------- an independent reader
# A second reader of the format, from its documentation only (numpy, no lccompress code): the
# part encodings (schemes/codecs.py docstring) and each scheme's Δ(θ) written out by hand.
_U32 = 2.0 ** -24  # unit roundoff of float32
_SPARSE = {"prune", "l1_ball", "l0_penalty", "l1_penalty", "row_l1_ball", "sparse_row_l1_ball"}
_TABLES = {"scaled_binarize": (-1.0, 1.0), "scaled_ternary": (-1.0, 0.0, 1.0)}


def _np_positions(a, info, n):
    """Sorted positions from a bit mask (bit i mod 8 of byte ⌊i/8⌋) or from escaped gaps."""
    if info["enc"] == "mask":
        assert a.dtype == np.uint8 and a.shape == (math.ceil(n / 8),)
        bits = np.unpackbits(a, bitorder="little")
        assert not bits[n:].any()  # padding bits are zero
        return np.flatnonzero(bits[:n])
    assert info["enc"] == "delta" and a.dtype in (np.uint8, np.uint16, np.uint32) and a.ndim == 1
    M = int(np.iinfo(a.dtype).max)
    out, pos, run = [], -1, 0
    for x in a.tolist():  # a gap g ≥ M is ⌊g/M⌋ escapes M, then g mod M
        if x == M:
            run += M
            continue
        pos += run + x + 1  # iⱼ = Σ_{t≤j}(gₜ + 1) − 1
        out.append(pos)
        run = 0
    assert run == 0, "the gap stream ends in an escape"
    return np.array(out, dtype=np.int64)


def _np_codes(a, info):
    """Codes at b bits each, least significant bit first."""
    b, count = info["bits"], math.prod(info["shape"])
    assert a.dtype == np.uint8 and a.shape == (math.ceil(count * b / 8),)
    bits = np.unpackbits(a, bitorder="little")
    assert not bits[count * b:].any()
    return bits[:count * b].reshape(count, b).astype(np.int64) @ (1 << np.arange(b, dtype=np.int64))


def _np_part(a, info, n):
    """One θ part as an array of the manifest's dtype and shape."""
    enc = info["enc"]
    if enc == "raw":
        out = a
    elif enc in ("mask", "delta"):
        out = _np_positions(a, info, n)
    else:
        assert enc == "bitpack", enc
        out = _np_codes(a, info)
    out = out.astype(np.dtype(info["dtype"]))
    assert out.shape == (math.prod(info["shape"]),) or out.shape == tuple(info["shape"])
    return out.reshape(info["shape"])


def _code_bits(k):
    return max(1, math.ceil(math.log2(k)))


def _np_delta(scheme, parts, manifest_parts, shape, dtype):
    """Δ(θ) (n,) by the scheme's math, and an elementwise bound on float32 rounding of the
    library's result (None: it must be bit-exact). Checks each part has the encoding expected."""
    name, n = scheme["scheme"], math.prod(shape)
    encs = {k: v["enc"] for k, v in manifest_parts.items()}
    if name in _SPARSE:
        i, v = parts["indices"], parts["values"]
        assert encs["values"] == "raw" and encs["indices"] in (("mask", "delta") if i.size else ("raw",))
        assert i.size == 0 or (np.diff(i) > 0).all() and 0 <= i[0] and i[-1] < n
        out = np.zeros(n, dtype)
        out[i] = v
        return out, None
    if name in ("lowrank", "rank_selection"):
        U, V = parts["U"].astype(np.float64), parts["V"].astype(np.float64)  # (m, r), (r, q)
        assert encs == {"U": "raw", "V": "raw"} and U.shape[0] == shape[0] and U.shape[0] * V.shape[1] == n
        # |fl(UV) − UV| ≤ γ_r |U||V| for any summation order, fused or not
        return (U @ V).reshape(-1), (U.shape[1] + 1) * _U32 * (np.abs(U) @ np.abs(V)).reshape(-1)
    if name == "additive":
        terms = [_np_delta(t, {k[len(f"{j}."):]: v for k, v in parts.items() if k.startswith(f"{j}.")},
                           {k[len(f"{j}."):]: v for k, v in manifest_parts.items() if k.startswith(f"{j}.")},
                           shape, dtype) for j, t in enumerate(scheme["terms"])]
        assert sum(len([k for k in parts if k.startswith(f"{j}.")]) for j in range(len(terms))) == len(parts)
        if all(tol is None for _, tol in terms):
            out = terms[0][0]
            for d, _ in terms[1:]:
                out = out + d  # the same float32 additions in the same order
            return out, None
        out = sum(d.astype(np.float64) for d, _ in terms)
        return out, sum(np.zeros(n) if tol is None else tol for _, tol in terms) + len(terms) * _U32 * np.abs(out)
    z = parts["codes"].reshape(-1).astype(np.int64)
    if name == "codebook":
        assert encs == {"codebook": "raw", "codes": "bitpack"}
        assert manifest_parts["codes"]["bits"] == _code_bits(scheme["k"]) and parts["codebook"].shape == (scheme["k"],)
        return parts["codebook"][z], None
    if name in ("fixed_codebook", "binarize"):
        table = np.sort(np.array(scheme["values"], np.float64)).astype(dtype)
        assert encs == {"codes": "bitpack"} and manifest_parts["codes"]["bits"] == _code_bits(table.size)
        return table[z], None
    if name == "uniform":  # Δ = s · (q − z) per block of group_size columns of the (out, K) matrix
        bits, g = scheme["bits"], scheme["group_size"]
        q = parts["codes"].astype(dtype)
        m, k = q.shape
        col = np.arange(k) // (g or k)
        s = parts["scale"].astype(dtype)
        z = (np.full(s.shape, 2 ** (bits - 1)) if scheme["symmetric"] else parts["zero"]).astype(dtype)
        assert encs == ({"codes": "bitpack", "scale": "raw"} | ({} if scheme["symmetric"] else {"zero": "bitpack"}))
        assert manifest_parts["codes"]["bits"] == bits and s.shape == (m, -(-k // (g or k)))
        return (s[:, col] * (q - z[:, col])).reshape(-1), None
    table = np.array(_TABLES[name], dtype)
    assert encs == {"scale": "raw", "codes": "bitpack"} and manifest_parts["codes"]["bits"] == _code_bits(table.size)
    assert parts["scale"].shape == (1,)
    return parts["scale"] * table[z], None


def np_read(path):
    """{param: (Δ as an array of its shape, rounding bound or None)} for the compressed
    params, and {name: array} for the dense tensors, from the raw file with numpy only."""
    with safe_open(path, framework="np") as f:
        meta, raw = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    m = json.loads(meta[META_KEY])  # plain JSON; its last field is the manifest's own digest
    compressed, used = {}, set()
    for gname, e in m["groups"].items():
        shapes = [tuple(s) for s in e["shapes"]]
        n = sum(math.prod(s) for s in shapes)
        shape = shapes[0] if len(shapes) == 1 else (n,)  # a joint group is the params flattened, concatenated
        parts = {k: _np_part(raw[f"{gname}.{k}"], info, n) for k, info in e["parts"].items()}
        used |= {f"{gname}.{k}" for k in e["parts"]}
        flat, tol = _np_delta(e["scheme"], parts, e["parts"], shape, np.dtype(e["dtype"]))
        assert flat.shape == (n,)
        start = 0
        for p, s in zip(e["params"], shapes):
            end = start + math.prod(s)
            compressed[p] = (flat[start:end].reshape(s), None if tol is None else tol[start:end].reshape(s))
            start = end
    dense = {k: v for k, v in raw.items() if k not in used}
    assert not dense.keys() & compressed.keys()
    return compressed, dense


def _matches(t, want):
    """A torch tensor t against the independent (array, bound): bit-exact, or within the bound."""
    a, tol = want
    t = t.detach().cpu()
    if tol is None:
        return t.dtype == torch.from_numpy(a).dtype and torch.equal(t, torch.from_numpy(a).reshape(t.shape))
    return tuple(t.shape) == a.shape and bool((np.abs(t.double().numpy() - a) <= tol).all())


@pytest.mark.parametrize("kind", ["mlp", "conv"])
@pytest.mark.parametrize("name", list(SCHEMES))
def test_stored_parts_decode_independently(tmp_path, kind, name):
    """Decoded by hand from the raw file, the weights are load()'s and the ones DC produced."""
    model, recipe, res, _ = dc(kind, name)
    path = tmp_path / "m.safetensors"
    save(path, res.model, res.thetas, res.groups, recipe=recipe)
    compressed, dense = np_read(path)
    assert compressed.keys() == {p for g in res.groups for p in g.params}
    loaded, produced = load(path).state_dict, res.model.state_dict()
    for p, want in compressed.items():
        assert _matches(loaded[p], want), p
        assert _matches(produced[p], want), p
        assert same(loaded[p], produced[p]), p
    orig = model.state_dict()
    assert dense.keys() == orig.keys() - compressed.keys()
    for k, a in dense.items():
        assert same(torch.from_numpy(a), orig[k]) and same(loaded[k], orig[k]), k


def test_independent_reader_catches_a_wrong_encoding(tmp_path):
    """The reader above is not vacuous: it rebuilds known weights from hand-made θ of every
    encoding (mask, delta with escapes, bitpack at 3 bits), and a flipped stored bit changes them."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(40, 30), nn.Linear(30, 7))  # 1200 and 210 weights
    w0 = torch.zeros(1200)
    idx = torch.tensor([0, 3, 300, 301, 1199])  # gaps 0, 2, 296, 0, 897: escapes at uint8
    w0[idx] = torch.tensor([1.5, -2.0, 0.25, 3.0, -0.5])
    book = torch.tensor([-1.0, -0.5, 0.0, 0.5, 1.0])
    codes = torch.randint(0, 5, (7, 30), dtype=torch.uint8)
    recipe = lc.Recipe((lc.Rule(("0.weight",), lc.Prune(count=5)), lc.Rule(("1.weight",), lc.Codebook(k=5))))
    groups = recipe.groups(model)
    thetas = {"0.weight": {"indices": idx, "values": w0[idx]}, "1.weight": {"codebook": book, "codes": codes}}
    path = tmp_path / "m.safetensors"
    save(path, model, thetas, groups)
    m = json.loads(safe_open(path, framework="np").metadata()[META_KEY])
    assert m["groups"]["0.weight"]["parts"]["indices"]["enc"] == "delta"
    assert m["groups"]["1.weight"]["parts"]["codes"]["bits"] == 3
    compressed, _ = np_read(path)
    assert np.array_equal(compressed["0.weight"][0], w0.reshape(30, 40).numpy())
    assert np.array_equal(compressed["1.weight"][0], book[codes.long()].numpy())
    with safe_open(path, framework="np") as f:
        stored = f.get_tensor("0.weight.indices")
    assert stored.dtype == np.uint8 and list(stored) == [0, 2, 255, 41, 0, 255, 255, 255, 132]
    assert list(_np_positions(stored, {"enc": "delta"}, 1200)) == idx.tolist()
    bad = stored.copy()
    bad[3] ^= 1
    assert list(_np_positions(bad, {"enc": "delta"}, 1200)) != idx.tolist()


def test_read_back_in_a_fresh_interpreter(tmp_path):
    _, _, res, _ = dc("conv", "additive")
    path, out = tmp_path / "m.safetensors", tmp_path / "sd.safetensors"
    save(path, res.model, res.thetas, res.groups)
    code = ("import sys, safetensors.torch; from lccompress.artifact import load; "
            "safetensors.torch.save_file(load(sys.argv[1]).state_dict, sys.argv[2])")
    subprocess.run([sys.executable, "-c", code, str(path), str(out)], check=True, timeout=60)
    sd = safetensors.torch.load_file(out)
    for k, v in truth(res).items():
        assert same(sd[k], v.detach()), k


def test_plain_safetensors_readers_open_it(tmp_path):
    _, _, res, _ = dc("mlp", "codebook")
    save(tmp_path / "m.safetensors", res.model, res.thetas, res.groups)
    with safe_open(tmp_path / "m.safetensors", framework="pt") as f:
        keys, meta = set(f.keys()), f.metadata()
    assert {"fc1.bias", "fc1.weight.codes", "fc1.weight.codebook"} <= keys and "fc1.weight" not in keys
    m = json.loads(meta[META_KEY])
    assert m["lccompress_version"] == lc.__version__ and m["groups"]["fc1.weight"]["parts"]["codes"]["enc"] == "bitpack"


def test_delta_coding_with_escapes():
    idx = torch.tensor([0, 1, 254, 255, 600, 100_000, 100_001, 5_000_000]).numpy()
    for dt in ("uint8", "uint16", "uint32"):
        enc = delta_encode(idx, getattr(__import__("numpy"), dt))
        assert (delta_decode(enc) == idx).all()


def test_split_lowrank_layers_are_smaller_and_agree(tmp_path):
    for kind in ("mlp", "conv"):
        model, _, res, x = dc(kind, "lowrank")
        path = tmp_path / f"{kind}.safetensors"
        save(path, res.model, res.thetas, res.groups)
        dense = load_into_(make(kind)[0], path).eval()
        split = load_into_(make(kind)[0], path, split_lowrank=True).eval()
        names = [g.params[0].rpartition(".")[0] for g in res.groups]
        assert all(isinstance(split.get_submodule(n), nn.Sequential) for n in names)
        assert sum(p.numel() for p in split.parameters()) < sum(p.numel() for p in dense.parameters())
        with torch.no_grad():
            torch.testing.assert_close(split(x), dense(x), rtol=1e-5, atol=1e-6)


def test_split_skips_layers_it_cannot_shrink():
    model = nn.Sequential(nn.Linear(4, 4))
    g = lc.Recipe.single("0.weight", lc.LowRank(rank=3)).groups(model)
    th = {g[0].name: g[0].compress(dict(model.named_parameters()))}
    assert split_lowrank_(model, th, g) == [] and isinstance(model[0], nn.Linear)  # 3·8 ≥ 16


# ----------------------------------------------------------------------------- sizes
def _big(name):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1000, 1000))
    w = model[0].weight
    if name.startswith("k="):  # a θ of k codes, built directly (k-means on 10⁶ weights is slow)
        k = int(name[2:])
        scheme = lc.Codebook(k=k)
        th = {"codebook": torch.sort(torch.randn(k)).values, "codes": torch.randint(0, k, w.shape, dtype=torch.uint8)}
    else:
        scheme = {"keep 10%": lc.Prune(keep=0.1), "keep 1%": lc.Prune(keep=0.01), "rank 32": lc.LowRank(rank=32)}[name]
        th = scheme.compress(w.detach())
    groups = lc.Recipe.single("0.weight", scheme).groups(model)
    return model, {"0.weight": th}, groups


@pytest.mark.parametrize("name", ["keep 10%", "keep 1%", "k=2", "k=16", "rank 32"])
def test_file_size_matches_accounted_bits(tmp_path, name):
    model, thetas, groups = _big(name)
    path = tmp_path / "big.safetensors"
    save(path, model, thetas, groups)
    accounted = groups[0].scheme.bits(thetas["0.weight"], groups[0].shape) / 8
    on_disk = os.stat(path).st_size
    assert abs(on_disk - accounted) <= 0.02 * accounted + 16 * 1024, (on_disk, accounted)
    rep = size_report(path)
    assert rep.file_bytes == on_disk == rep.header_bytes + rep.payload_bits // 8
    assert rep.dense_tensor_bits == 1000 * 32  # the bias
    assert size_report(thetas, groups, state_dict=model.state_dict()).payload_bits == rep.payload_bits
    g = rep.groups[0]
    assert g.scheme_bits == accounted * 8 and g.dense_bits == 32 * 10**6 and g.numel == 10**6


# ----------------------------------------------------------------------------- broken files
@pytest.fixture
def artifact(tmp_path):
    _, recipe, res, _ = dc("mlp", "codebook")
    path = tmp_path / "m.safetensors"
    save(path, res.model, res.thetas, res.groups, recipe=recipe)
    return path


def _rewrite(path, edit_manifest=None, edit_tensors=None):
    """Re-save with an edited manifest or tensors, recomputing the manifest checksum: an
    internally consistent file from a faulty writer."""
    with safe_open(path, framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    m = json.loads(unseal(meta[META_KEY]))
    if edit_manifest:
        edit_manifest(m)
    if edit_tensors:
        edit_tensors(tensors)
    text = json.dumps(m)
    safetensors.torch.save_file(tensors, path, metadata={META_KEY: seal(text)})


def _raises(path, match, fn=load):
    with pytest.raises(ArtifactError, match=match) as e:
        fn(path)
    assert isinstance(e.value, lc.LCError) and "\n" not in str(e.value)


def test_truncated_file(artifact):
    data = artifact.read_bytes()
    for cut in (len(data) - 1, len(data) // 2, 100, 4):
        artifact.write_bytes(data[:cut])
        _raises(artifact, "not a readable safetensors file")


def test_tampered_payload(artifact):
    data = bytearray(artifact.read_bytes())
    data[-3] ^= 0x10  # inside the last tensor's bytes
    artifact.write_bytes(bytes(data))
    _raises(artifact, "fails its checksum")


def test_tampered_manifest(artifact):
    data = artifact.read_bytes()
    i = data.index(b'\\"shapes\\":[[300,64]]')  # JSON inside the JSON header
    artifact.write_bytes(data[:i] + data[i:].replace(b"[[300,64]]", b"[[300,65]]", 1))
    _raises(artifact, "manifest fails its checksum")


def test_manifest_names_a_missing_tensor(artifact):
    _rewrite(artifact, edit_tensors=lambda t: t.pop("fc2.weight.codes"))
    _raises(artifact, "'fc2.weight.codes', which is not in the file")


def test_tensor_not_in_manifest(artifact):
    _rewrite(artifact, edit_tensors=lambda t: t.update(extra=torch.zeros(3)))
    _raises(artifact, "'extra' is in the file but not in the manifest")


def test_wrong_shape_in_manifest(artifact):
    def edit(m):
        m["groups"]["fc1.weight"]["shapes"] = [[300, 65]]
    _rewrite(artifact, edit_manifest=edit)
    _raises(artifact, r"group 'fc1\.weight'.*does not rebuild a tensor of shape \(300, 65\)")


def test_wrong_tensor_shape(artifact):
    from lccompress.artifact.container import digest as _digest

    short = torch.sort(torch.randn(3)).values  # a 3-entry codebook where the manifest says 4

    def edit(m):
        m["digests"]["fc1.weight.codebook"] = _digest(short)
    _rewrite(artifact, edit_manifest=edit, edit_tensors=lambda t: t.update({"fc1.weight.codebook": short}))
    _raises(artifact, r"'fc1\.weight\.codebook' is float32 \(3,\), the manifest says float32 \(4,\)")


def test_model_of_the_wrong_shape(artifact):
    _raises(artifact, r"fc1\.weight.*\(300, 64\).*\(300, 65\)", lambda p: load_into_(MLP((65, 300, 100, 10)), p))
    _raises(artifact, "does not fit the model", lambda p: load_into_(ConvNet(), p))


def test_unknown_scheme(artifact):
    def edit(m):
        m["groups"]["fc2.weight"]["scheme"]["scheme"] = "zip"
    _rewrite(artifact, edit_manifest=edit)
    _raises(artifact, "group 'fc2.weight'.*unknown scheme 'zip'")


def test_newer_format_and_foreign_files(artifact, tmp_path):
    _rewrite(artifact, edit_manifest=lambda m: m.update(format_version=99))
    _raises(artifact, "format_version 99")
    plain = tmp_path / "plain.safetensors"
    safetensors.torch.save_file({"w": torch.zeros(2)}, plain)
    _raises(plain, "not an lccompress artifact")


def test_write_is_atomic(artifact, monkeypatch):
    before = artifact.read_bytes()
    _, _, res, _ = dc("mlp", "prune")

    def boom(*a):
        raise OSError("disk full")
    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        save(artifact, res.model, res.thetas, res.groups)
    assert artifact.read_bytes() == before and os.listdir(artifact.parent) == [artifact.name]
    with pytest.raises(ArtifactError, match="no θ for group"):
        save(artifact, res.model, {}, res.groups)


def test_float64_model_keeps_its_dtype(tmp_path):
    model = MLP().double()
    recipe = lc.Recipe((lc.Rule(("fc1.weight",), lc.Binarize()), lc.Rule(("fc2.weight",), lc.Prune(keep=0.1))))
    res = lc.compress(model, recipe, method="dc", device="cpu")
    save(tmp_path / "m.safetensors", res.model, res.thetas, res.groups)
    sd = load(tmp_path / "m.safetensors").state_dict
    assert all(same(sd[k], v) for k, v in res.model.state_dict().items())


def test_a_manifest_claiming_a_huge_shape_is_refused_before_decoding(artifact):
    """A resealed manifest (valid checksum) saying a pruned layer is 2^20 × 2^20: refused from the
    stored bytes alone, without allocating the claimed 4 TiB."""
    def huge(m):
        for e in m["groups"].values():
            e["shapes"] = [[1 << 20, 1 << 20] for _ in e["shapes"]]

    _rewrite(artifact, edit_manifest=huge)
    _raises(artifact, r"claims [\d,]{17,} weights from [\d,]+ stored bytes")
