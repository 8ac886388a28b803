"""Multi-level files: bytes on disk, every level against the single-level compression computed
independently (lccompress.compress by DC, top-k masks, truncated SVD), BatchNorm recalibration."""

import json
import os

import pytest
import torch
from torch import nn

import lccompress as lcc
from lccompress import api, train
from lccompress.artifact import ArtifactError
from lccompress.artifact import multilevel as ml
from lccompress.digits import MLP

KEEPS = [0.5, 0.2, 0.1, 0.05]
LAYERS = ["fc1.weight", "fc2.weight", "fc3.weight"]


@pytest.fixture(scope="module")
def mlp():
    torch.manual_seed(0)
    return MLP()  # 64-300-100-10, 50,200 weights: random weights are enough for masks


def _dc(model, recipe):
    return lcc.compress(model, recipe, method="dc", device="cpu").model.state_dict()


@pytest.mark.parametrize("scope", ["global", "layer"])
def test_every_level_equals_single_level_magnitude_pruning(tmp_path, mlp, scope):
    path = tmp_path / "m.safetensors"
    ml.save_multilevel(path, mlp, ml.build_levels(mlp, LAYERS, KEEPS, scope=scope))
    for j, keep in enumerate(KEEPS, start=1):
        want = _dc(mlp, lcc.Recipe.single(LAYERS, lcc.Prune(keep=keep), joint=scope == "global"))
        got = ml.extract(path, j)
        assert set(got) == set(want)
        for k in want:
            assert torch.equal(got[k], want[k]), (j, k)
    dense = ml.extract(path, 0)
    assert all(torch.equal(dense[k], v) for k, v in mlp.state_dict().items())


def test_bytes_on_disk_are_one_dense_copy_plus_a_byte_per_weight(tmp_path, mlp):
    path = tmp_path / "m.safetensors"
    written = ml.save_multilevel(path, mlp, ml.build_levels(mlp, LAYERS, KEEPS))
    dense = sum(v.numel() * v.element_size() for v in mlp.state_dict().values())
    weights = sum(dict(mlp.named_parameters())[n].numel() for n in LAYERS)
    size = os.stat(path).st_size
    assert size == written
    assert dense + weights < size <= 1.02 * (dense + weights)


def test_levels_are_nested_and_metadata_lists_them(tmp_path, mlp):
    path = tmp_path / "m.safetensors"
    ml.save_multilevel(path, mlp, ml.build_levels(mlp, LAYERS, KEEPS))
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()[ml.META_KEY])
        assert f.get_tensor("fc1.weight.level").dtype == torch.uint8
    assert [lv["keep"] for lv in meta["levels"]] == KEEPS
    prev = None
    for j in range(len(KEEPS) + 1):
        nz = torch.cat([ml.extract(path, j)[n].reshape(-1) != 0 for n in LAYERS])
        assert int(nz.sum()) == (50200 if j == 0 else round(KEEPS[j - 1] * 50200))
        if prev is not None:
            assert not bool((nz & ~prev).any())  # level j keeps a subset of level j − 1
        prev = nz


def test_filter_levels_keep_the_rows_of_largest_norm(tmp_path):
    torch.manual_seed(1)
    conv = nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Conv2d(16, 8, 3))
    names = ["0.weight", "2.weight"]
    path = tmp_path / "f.safetensors"
    ml.save_multilevel(path, conv, ml.build_levels(conv, names, [0.5, 0.25], scope="layer", structure="filter"))
    for j, keep in enumerate([0.5, 0.25], start=1):
        got = ml.extract(path, j)
        for n in names:
            w = conv.state_dict()[n]
            top = set(torch.topk(w.reshape(w.shape[0], -1).norm(dim=1), round(keep * w.shape[0])).indices.tolist())
            for i in range(w.shape[0]):
                assert torch.equal(got[n][i], w[i] if i in top else torch.zeros_like(w[i]))


def test_rank_levels_equal_truncated_svd(tmp_path, mlp):
    path = tmp_path / "r.safetensors"
    ml.save_multilevel(path, mlp, ml.build_levels(mlp, LAYERS[:2], [0.5, 0.125], scope="layer", structure="rank"))
    for j, keep in enumerate([0.5, 0.125], start=1):
        got = ml.extract(path, j)
        for n in LAYERS[:2]:
            w = mlp.state_dict()[n]
            r = round(keep * min(w.shape))
            U, S, Vh = torch.linalg.svd(w.double(), full_matrices=False)
            want = ((U[:, :r] * S[:r]) @ Vh[:r]).float()  # the truncated SVD, exact
            torch.testing.assert_close(got[n], want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ml.extract(path, 0)["fc1.weight"], mlp.fc1.weight.detach(), atol=1e-5, rtol=1e-5)


def test_load_level_fills_a_model_and_bad_levels_raise(tmp_path, mlp):
    path = tmp_path / "m.safetensors"
    ml.save_multilevel(path, mlp, ml.build_levels(mlp, LAYERS, KEEPS))
    m = api.load_level_(MLP(), path, 2)
    assert int((m.fc1.weight != 0).sum() + (m.fc2.weight != 0).sum() + (m.fc3.weight != 0).sum()) == round(0.2 * 50200)
    with pytest.raises(lcc.ConfigError, match="level=5"):
        ml.extract(path, 5)
    with pytest.raises(lcc.ConfigError, match="decreasing"):
        ml.build_levels(mlp, LAYERS, [0.1, 0.2])
    with pytest.raises(lcc.ConfigError, match="structure="):
        ml.build_levels(mlp, LAYERS, KEEPS, structure="blocks")


def test_save_is_atomic_on_failure(tmp_path, mlp, monkeypatch):
    path = tmp_path / "m.safetensors"
    ml.save_multilevel(path, mlp, ml.build_levels(mlp, LAYERS, KEEPS))
    before = path.read_bytes()

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        ml.save_multilevel(path, mlp, ml.build_levels(mlp, LAYERS, [0.3]))
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]  # no temp file left


def test_recalibrate_bn_estimates_the_data_statistics():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2))
    model.eval()
    g = torch.Generator().manual_seed(3)
    batches = [(torch.randn(16, 5, generator=g) * 3 + 1, torch.zeros(16)) for _ in range(4)]
    train.recalibrate_bn_(model, batches, batches=3)
    with torch.no_grad():
        pre = [model[0](x) for x, _ in batches[:3]]  # the BatchNorm's inputs
    torch.testing.assert_close(model[1].running_mean, torch.cat(pre).mean(0))
    torch.testing.assert_close(model[1].running_var, torch.stack([p.var(0) for p in pre]).mean(0))
    assert not model.training and model[1].momentum == 0.1


# ----------------------------------------------------------------------------- tied weights
V, D = 300, 32  # the embedding (9,600 weights, 38,400 bytes) dwarfs every header


class TiedLM(nn.Module):
    """Embedding → Linear → output layer whose weight is the embedding's (one Parameter)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(4)
        self.emb, self.mid, self.head = nn.Embedding(V, D), nn.Linear(D, D), nn.Linear(D, V)
        self.head.weight = self.emb.weight

    def forward(self, x):
        return self.head(torch.relu(self.mid(self.emb(x))))


def tied_lm():
    return TiedLM()


TIED = ["emb.weight", "mid.weight"]
ALIAS = {"head.weight": "emb.weight"}


def _topk(w, keep):
    """Magnitude pruning of one tensor: its round(keep·N) largest |w| kept, the rest zero."""
    flat = w.detach().reshape(-1)
    idx = torch.topk(flat.abs(), round(keep * flat.numel())).indices
    return torch.zeros_like(flat).index_copy_(0, idx, flat[idx]).reshape(w.shape)


def _stored(path):
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return set(f.keys())


def _reseal(path, edit):
    """Edit a multi-level file's metadata and write it back with a valid seal."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from lccompress.artifact.container import seal, unseal

    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(unseal(f.metadata()[ml.META_KEY]))
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    edit(meta)
    save_file(tensors, str(path), metadata={ml.META_KEY: seal(json.dumps(meta, separators=(",", ":")))})


def _untied_copy(model):
    """The model with its tie cut: what save_multilevel stored before ties were recorded."""
    import copy

    m = copy.deepcopy(model)
    m.head.weight = nn.Parameter(m.emb.weight.detach().clone())
    return m


def test_a_tied_weight_is_stored_once_and_every_level_keeps_the_tie(tmp_path):
    from lccompress.artifact import load, load_into_

    model = tied_lm()
    path = tmp_path / "t.safetensors"
    size = ml.save_multilevel(path, model, ml.build_levels(model, TIED, KEEPS, scope="layer"))
    assert ml.read_meta(path)["aliases"] == ALIAS
    assert _stored(path) == {"emb.weight", "emb.weight.level", "mid.weight", "mid.weight.level", "mid.bias",
                             "head.bias"}
    untied = tmp_path / "u.safetensors"
    copy_ = _untied_copy(model)
    ml.save_multilevel(untied, copy_, ml.build_levels(copy_, TIED, KEEPS, scope="layer"))
    assert os.stat(untied).st_size - size >= V * D * 4  # the tied copy is the difference
    for j, keep in enumerate([1.0, *KEEPS]):
        want = _topk(model.emb.weight, keep)
        sd = ml.extract(path, j)
        assert sd["head.weight"] is sd["emb.weight"] and torch.equal(sd["emb.weight"], want)
        for order in (list(sd), list(reversed(sd))):  # whichever name load_state_dict copies last
            m = tied_lm()
            m.load_state_dict({k: sd[k] for k in order})
            assert m.head.weight is m.emb.weight and torch.equal(m.emb.weight, want)
        m = api.load_level_(tied_lm(), path, j)
        assert int((m.emb.weight != 0).sum()) == round(keep * V * D) and torch.equal(m.emb.weight, want)
        if j == 0:
            continue
        out = tmp_path / f"l{j}.safetensors"
        api.extract_artifact(path, j, out)
        art = load(out)
        assert art.manifest["aliases"] == ALIAS and "head.weight" not in _stored(out)
        m = load_into_(tied_lm(), out)
        assert m.head.weight is m.emb.weight and torch.equal(m.emb.weight, want)
        assert all(torch.equal(v, sd[k]) for k, v in m.state_dict().items())


def test_the_extracted_artifact_exports_to_onnx_with_one_embedding(tmp_path):
    import onnx
    from onnx import numpy_helper

    from lccompress.artifact import export_onnx, load, load_into_, verify_onnx

    model = tied_lm()
    path = tmp_path / "t.safetensors"
    ml.save_multilevel(path, model, ml.build_levels(model, TIED, KEEPS))
    api.extract_artifact(path, 2, tmp_path / "l2.safetensors")
    art = load(tmp_path / "l2.safetensors")
    m = load_into_(tied_lm(), tmp_path / "l2.safetensors")
    x = torch.randint(0, V, (2, 5))
    export_onnx(m, art.thetas, art.groups, x, tmp_path / "l2.onnx")
    assert verify_onnx(tmp_path / "l2.onnx", m, x)["max_rel"] < 1e-4
    big = [t.name for t in onnx.load(str(tmp_path / "l2.onnx")).graph.initializer
           if numpy_helper.to_array(t).size >= V * D and numpy_helper.to_array(t).dtype.kind == "f"]
    assert big == []  # no dense copy of the embedding for the output layer


@pytest.mark.parametrize("structure", ["filter", "rank"])
def test_every_structure_fills_the_alias_with_the_level(tmp_path, structure):
    model = tied_lm()
    path = tmp_path / "t.safetensors"
    ml.save_multilevel(path, model, ml.build_levels(model, TIED, [0.5, 0.25], scope="layer", structure=structure))
    assert "head.weight" not in _stored(path) and ml.read_meta(path)["aliases"] == ALIAS
    for j in range(3):
        sd = ml.extract(path, j)
        assert sd["head.weight"] is sd["emb.weight"]
        m = api.load_level_(tied_lm(), path, j)
        assert m.head.weight is m.emb.weight and torch.equal(m.emb.weight, sd["emb.weight"])


def test_a_bare_state_dict_keeps_its_tie_through_multilevel_and_extract(tmp_path):
    from lccompress.artifact import load, load_into_

    model = tied_lm()
    ckpt = tmp_path / "ckpt.pt"
    torch.save(model.state_dict(), ckpt)  # one storage under both names
    multi = tmp_path / "m.safetensors"
    api.multilevel(str(ckpt), KEEPS, str(multi), per_layer=True)
    meta = ml.read_meta(multi)
    assert meta["aliases"] == ALIAS and set(meta["params"]) == {"emb.weight", "mid.weight"}
    assert "head.weight" not in _stored(multi)
    for j, keep in enumerate(KEEPS, start=1):
        out = tmp_path / f"l{j}.safetensors"
        api.extract(str(multi), j, str(out))
        assert load(out).manifest["aliases"] == ALIAS
        m = load_into_(tied_lm(), out)
        assert m.head.weight is m.emb.weight and torch.equal(m.emb.weight, _topk(model.emb.weight, keep))


def test_extract_with_a_model_and_data_keeps_the_tie(tmp_path):
    from lccompress.artifact import load, load_into_

    model = tied_lm()
    path = tmp_path / "t.safetensors"
    ml.save_multilevel(path, model, ml.build_levels(model, TIED, KEEPS, scope="layer"))
    batches = [(torch.randint(0, V, (4, 3)), torch.zeros(4)) for _ in range(2)]
    api.extract_artifact(path, 3, tmp_path / "l3.safetensors", model=tied_lm(), loader=batches)
    assert load(tmp_path / "l3.safetensors").manifest["aliases"] == ALIAS
    m = load_into_(tied_lm(), tmp_path / "l3.safetensors")
    assert m.head.weight is m.emb.weight and torch.equal(m.emb.weight, _topk(model.emb.weight, KEEPS[2]))


def test_files_without_the_alias_record_still_read(tmp_path):
    """A file written before ties were recorded holds the tie as a second dense tensor: it reads as
    it did, and a tied model loaded from it gets the level in both names."""
    model = tied_lm()
    path = tmp_path / "old.safetensors"
    old = _untied_copy(model)
    ml.save_multilevel(path, old, ml.build_levels(old, TIED, KEEPS, scope="layer"))
    assert "aliases" not in ml.read_meta(path) and "head.weight" in _stored(path)
    for j, keep in enumerate(KEEPS, start=1):
        sd = ml.extract(path, j)
        assert torch.equal(sd["head.weight"], model.emb.weight)  # as stored: dense
        want = _topk(model.emb.weight, keep)
        m = api.load_level_(tied_lm(), path, j)
        assert m.head.weight is m.emb.weight and torch.equal(m.emb.weight, want)
        api.extract_artifact(path, j, tmp_path / "l.safetensors")  # writes, as before


@pytest.mark.parametrize("aliases,match", [
    ({"head.weight": "nope.weight"}, "alias 'head.weight' of 'nope.weight' does not name one stored tensor"),
    ({"x.weight": "head.weight", "head.weight": "emb.weight"}, "alias 'x.weight' of 'head.weight'"),  # dangling
    ({"mid.bias": "emb.weight"}, "alias 'mid.bias' of 'emb.weight'"),  # a stored tensor
    ({"emb.weight.level": "mid.weight"}, "alias 'emb.weight.level'"),  # a level tensor
    ({"emb.weight": "mid.weight"}, "alias 'emb.weight'"),  # a parameter
    ({"head.weight": 3}, "aliases are malformed"),
    (["head.weight"], "aliases are malformed"),
    ({f"a{i}": "emb.weight" for i in range(ml.MAX_ALIASES + 1)}, "aliases are malformed"),
])
def test_bad_aliases_are_one_line_errors(tmp_path, aliases, match):
    model = tied_lm()
    path = tmp_path / "t.safetensors"
    ml.save_multilevel(path, model, ml.build_levels(model, TIED, KEEPS))
    _reseal(path, lambda m: m.update(aliases=aliases))
    for read in (ml.read_meta, lambda p: ml.extract(p, 1), lambda p: api.extract_artifact(p, 1, tmp_path / "o.st")):
        with pytest.raises(ArtifactError, match=match) as e:
            read(path)
        assert "\n" not in str(e.value)


def test_a_tied_name_is_leveled_once():
    model = tied_lm()
    with pytest.raises(lcc.ConfigError, match="'head.weight' is tied to 'emb.weight'"):
        ml.build_levels(model, ["head.weight"], KEEPS)
    ids = ml.build_levels(model, ["emb.weight"], KEEPS).ids
    levels = ml.Levels(tuple(KEEPS), {**ids, "head.weight": ids["emb.weight"]})
    with pytest.raises(lcc.ConfigError, match="one tensor"):
        ml.save_multilevel("unused.safetensors", model, levels)


def test_gpt2_multilevel_keeps_its_tied_embedding(tmp_path):
    """The audit's case: a Hugging Face GPT-2 (fixtures/realnets.py), lm_head tied to wte."""
    pytest.importorskip("transformers")
    import sys
    from pathlib import Path

    from lccompress.artifact import load, load_into_

    root = Path(__file__).resolve().parents[2]
    sys.path.insert(0, str(root / "fixtures"))
    import realnets

    nets = root / "fixtures" / "realnets.py"
    model = realnets.gpt2()
    ckpt = tmp_path / "g.pt"
    torch.save(model.state_dict(), ckpt)
    multi = tmp_path / "g.safetensors"
    api.multilevel(str(ckpt), [0.5, 0.2], str(multi), per_layer=True, model_spec=f"{nets}:gpt2")
    assert ml.read_meta(multi)["aliases"] == {"lm_head.weight": "transformer.wte.weight"}
    assert "lm_head.weight" not in _stored(multi)
    wte = model.transformer.wte.weight
    for j, keep in enumerate([0.5, 0.2], start=1):
        want = _topk(wte, keep)
        m = api.load_level_(realnets.gpt2(), multi, j)
        assert m.lm_head.weight is m.transformer.wte.weight
        assert int((m.transformer.wte.weight != 0).sum()) == round(keep * wte.numel())
        assert torch.equal(m.transformer.wte.weight, want)
        out = tmp_path / f"l{j}.safetensors"
        api.extract(str(multi), j, str(out))
        assert load(out).manifest["aliases"] == {"lm_head.weight": "transformer.wte.weight"}
        m = load_into_(realnets.gpt2(), out)
        assert m.lm_head.weight is m.transformer.wte.weight and torch.equal(m.transformer.wte.weight, want)
