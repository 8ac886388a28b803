"""Bad input and bad luck give one line, the right exit status, and never a changed input:
the size gate opens what it gates, outputs never overwrite inputs, fixed ranks that save nothing
are refused, a loader failing mid-epoch, a full disk and Ctrl-C are one line each."""

import errno
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from lccompress.cli import main


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture
def art(fx, tmp_path):
    out = tmp_path / "a.safetensors"
    r = run("prune", fx["ckpt"], "--keep", "0.2", "-o", out)
    assert r.exit_code == 0, r.output
    return out


def test_check_opens_what_it_gates(art, tmp_path):
    assert run("check", art, "--max-bytes", "1MB").exit_code == 0
    (tmp_path / "d").mkdir()
    (tmp_path / "rnd.safetensors").write_bytes(torch.randint(0, 256, (500,), dtype=torch.uint8).numpy().tobytes())
    (tmp_path / "trunc.safetensors").write_bytes(art.read_bytes()[:-100])
    flipped = bytearray(art.read_bytes())
    flipped[-50] ^= 0xFF
    (tmp_path / "flip.safetensors").write_bytes(bytes(flipped))
    (tmp_path / "bad.onnx").write_bytes(b"\x08\x07garbage" * 10)
    for bad in ("d", "rnd.safetensors", "trunc.safetensors", "flip.safetensors", "bad.onnx"):
        r = run("check", tmp_path / bad, "--max-bytes", "1GB")
        assert r.exit_code == 2, (bad, r.output)
        assert "Error:" in r.output and "Traceback" not in r.output and "ok" not in r.output.split("Error")[0]


@pytest.mark.parametrize("drop", ["nan", "-0.5", "inf"])
def test_check_refuses_budgets_that_are_not_numbers_at_least_zero(art, drop):
    r = run("check", art, "--max-drop", drop)
    assert r.exit_code == 2 and "--max-drop" in r.output


def test_an_output_never_overwrites_an_input(art, fx, tmp_path):
    before = art.read_bytes()
    r = run("prune", art, "--keep", "0.5", "-o", art)
    assert r.exit_code == 1 and "never overwrites an input" in r.output
    assert art.read_bytes() == before
    ck = Path(fx["st"])
    before = ck.read_bytes()
    assert run("quantize", ck, "--codebook", "2", "-o", ck).exit_code == 1 and ck.read_bytes() == before


def test_recipe_that_is_a_directory_is_one_line(fx, tmp_path):
    r = run("compress", fx["ckpt"], "--recipe", tmp_path, "-o", tmp_path / "o.safetensors")
    assert r.exit_code == 1 and "is a directory" in r.output and "Traceback" not in r.output


def test_a_rank_that_saves_nothing_is_refused_and_selection_says_so(tmp_path):
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(8, 9), torch.nn.ReLU(), torch.nn.Linear(9, 3))
    torch.save(m.state_dict(), tmp_path / "s.pt")
    out = tmp_path / "l.safetensors"
    r = run("lowrank", tmp_path / "s.pt", "--rank", "100000", "-o", out)
    # 9×8: r(9 + 8) < 72 only for r ≤ 4
    assert r.exit_code == 1 and "ranks ≤ 4 save space" in r.output and not out.exists()
    assert run("lowrank", tmp_path / "s.pt", "--rank", "4", "--exclude", "2.weight", "-o", out).exit_code == 0
    r = run("lowrank", tmp_path / "s.pt", "--select", "1e-9", "-o", out)
    assert r.exit_code == 0 and "notice: 0.weight takes" in r.output


def test_a_loader_that_fails_mid_epoch_is_one_line(fx, tmp_path):
    (tmp_path / "flaky.py").write_text(
        "import importlib.util\n"
        "spec = importlib.util.spec_from_file_location('fxdata', %r)\n"
        "fxdata = importlib.util.module_from_spec(spec)\nspec.loader.exec_module(fxdata)\n"
        "class Flaky:\n    def __init__(self, loader):\n        self.loader = loader\n"
        "    def __iter__(self):\n        for i, b in enumerate(self.loader):\n"
        "            if i == 3:\n                raise OSError('the network share went away')\n"
        "            yield b\n"
        "def loaders():\n    d = fxdata.loaders()\n    return {'train': Flaky(d['train']), 'eval': d['eval']}\n"
        % str(Path(fx["dir"]) / "data.py"))
    out = tmp_path / "o.safetensors"
    r = run("prune", fx["ckpt"], "--keep", "0.2", "--model", fx["model"], "--data", f"{tmp_path / 'flaky.py'}:loaders",
            "--steps", "2", "-o", out)
    assert r.exit_code == 1 and "raised OSError at batch 3: the network share went away" in r.output
    assert "Traceback" not in r.output and not out.exists()


def test_a_full_disk_is_one_line_and_leaves_no_file(fx, tmp_path, monkeypatch):
    import lccompress.artifact.container as container

    def full(path, data, mode=0o644):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(container, "atomic_write", full)
    out = tmp_path / "o.safetensors"
    r = run("prune", fx["ckpt"], "--keep", "0.2", "-o", out)
    assert r.exit_code == 1 and "No space left on device" in r.output and "Traceback" not in r.output
    assert not out.exists()


def test_ctrl_c_names_resume(fx, tmp_path, monkeypatch):
    from lccompress import api

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(api, "compress_checkpoint", interrupted)
    r = run("prune", fx["ckpt"], "--keep", "0.2", "-o", tmp_path / "o.safetensors")
    assert r.exit_code == 1 and "--resume" in r.output


def test_an_example_input_that_does_not_fit_fails_before_training(fx, tmp_path):
    out = tmp_path / "o.onnx"
    r = run("prune", fx["ckpt"], "--keep", "0.2", "--model", fx["model"], "--data", fx["data"], "--input-shape", "1,5",
            "--steps", "40", "-o", out)
    assert r.exit_code == 1 and "fails on the ONNX example input" in r.output
    assert "step 1/" not in r.output and not out.exists()  # no LC step ran
