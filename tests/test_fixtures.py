import hashlib
import importlib.util
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def _load(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "fixtures" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_fixtures_are_deterministic_and_load(tmp_path):
    make = _load("make")
    a = make.build(tmp_path / "a")
    b = make.build(tmp_path / "b")
    digest = lambda p: hashlib.sha256(p.read_bytes()).hexdigest()  # noqa: E731
    for key in a:
        assert digest(a[key]) == digest(b[key]), key
    model = _load("digits_model").mlp()
    model.load_state_dict(torch.load(a["checkpoint"], weights_only=True))
    data = _load("digits_model").loaders(a["data"])
    x, y = next(iter(data["eval"]))
    assert x.shape == (500, 64)
    assert float((model(x).argmax(1) == y).float().mean()) > 0.95  # a trained reference
