import importlib.util
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def digits_ref():
    """B1's reference MLP (trained for 20 epochs to keep the suite quick) and its loaders."""
    from lccompress import digits

    data = digits.loaders(0)
    return digits.train_reference(0, epochs=20, data=data), data


@pytest.fixture(scope="module")
def toy():
    """A ToyNet (seed 0) and three batches of a 3-class problem on 6 features."""
    from nets import ToyNet

    g = torch.Generator().manual_seed(0)
    X = torch.randn(96, 6, generator=g)
    y = (X[:, 0] + X[:, 1] > 0).long() + (X[:, 2] > 1).long()
    torch.manual_seed(0)
    return ToyNet(), [(X[i:i + 32], y[i:i + 32]) for i in range(0, 96, 32)]


@pytest.fixture(scope="session")
def fx(tmp_path_factory):
    """The fixture checkpoint and data (fixtures/make.py), plus --model / --data specs for them."""
    d = tmp_path_factory.mktemp("fx")
    spec = importlib.util.spec_from_file_location("make", ROOT / "fixtures" / "make.py")
    make = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make)
    paths = make.build(d)
    (d / "data.py").write_text(
        "import sys\nsys.path.insert(0, %r)\nimport digits_model\n"
        "def loaders():\n    return digits_model.loaders(%r)\n"
        "def missing_eval():\n    return digits_model.loaders(%r)['train']\n"
        "def broken():\n    raise RuntimeError('disk on fire')\n"
        "def unlabelled():\n    d = digits_model.loaders(%r)\n"
        "    return {'train': [x for x, _ in d['train']], 'eval': [x for x, _ in d['eval']]}\n"
        "def wrong_shape():\n    import torch\n    x = torch.zeros(8, 10)\n"
        "    return {'train': [(x, torch.zeros(8, dtype=torch.long))]}\n"
        % (str(ROOT / "fixtures"), str(paths["data"]), str(paths["data"]), str(paths["data"])))
    return {"dir": d, "ckpt": str(paths["checkpoint"]), "st": str(paths["safetensors"]),
            "model": f"{ROOT / 'fixtures' / 'digits_model.py'}:mlp", "data": f"{d / 'data.py'}:loaders"}
