"""Multi-level files: bytes on disk, every level against the single-level compression computed
independently (lccompress.compress by DC, top-k masks, truncated SVD), BatchNorm recalibration."""

import json
import os

import pytest
import torch
from torch import nn

import lccompress as lcc
from lccompress import api, train
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
