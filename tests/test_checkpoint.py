"""Reading checkpoints (lccompress.checkpoint): every kind gives back the tensors saved; pickled
code never runs without trust; damaged files raise CheckpointError and nothing else; user code
named FILE.py:FUNC / module:FUNC is loaded or refused in one clear error."""

import io
import json
import sys
import types
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from lccompress.checkpoint import Checkpoint, CheckpointError, build_model, call_factory, load_callable, \
    read_checkpoint
from lccompress.errors import LCError


def tiny() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))


@pytest.fixture
def net():
    return tiny()


def expected(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def same(got: dict, want: dict) -> bool:
    return got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


# ----------------------------------------------------------------------------- kinds
@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_state_dict_reads_back_the_tensors_saved(tmp_path, net, legacy):
    want = expected(net)
    torch.save(net.state_dict(), tmp_path / "sd.pt", _use_new_zipfile_serialization=not legacy)
    ck = read_checkpoint(tmp_path / "sd.pt")
    assert isinstance(ck, Checkpoint) and ck.kind == "state_dict" and ck.module is None
    assert ck.path == tmp_path / "sd.pt"
    assert same(ck.state_dict, want)


@pytest.mark.parametrize("key", ["state_dict", "model", "model_state_dict"])
def test_a_state_dict_nested_under_a_usual_key(tmp_path, net, key):
    want = expected(net)
    # a training checkpoint: the weights beside other things (an epoch, an optimizer state)
    torch.save({"epoch": 7, key: net.state_dict(), "optimizer": {"lr": 0.1}}, tmp_path / "ck.pt")
    ck = read_checkpoint(tmp_path / "ck.pt")
    assert ck.kind == "state_dict" and same(ck.state_dict, want)


def test_non_tensor_entries_are_left_out(tmp_path, net):
    want = expected(net)
    torch.save({**net.state_dict(), "note": "hello", "step": 3}, tmp_path / "ck.pt")
    assert same(read_checkpoint(tmp_path / "ck.pt").state_dict, want)


@pytest.mark.parametrize("name", ["w.safetensors", "weights.bin"], ids=["suffix", "sniffed"])
def test_safetensors(tmp_path, net, name):
    want = expected(net)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, tmp_path / name)
    ck = read_checkpoint(tmp_path / name)
    assert ck.kind == "safetensors" and ck.module is None
    assert same(ck.state_dict, want)


def test_torchscript_gives_its_weights_and_its_module(tmp_path, net):
    want = expected(net)
    torch.jit.save(torch.jit.script(net), tmp_path / "ts.pt")
    ck = read_checkpoint(tmp_path / "ts.pt")
    assert ck.kind == "torchscript" and isinstance(ck.module, torch.jit.ScriptModule)
    assert same(ck.state_dict, want)
    x = torch.randn(5, 4)
    assert torch.equal(ck.module(x), net(x))


def test_exported_program_without_trust_reads_the_raw_weights(tmp_path, net):
    want = expected(net)
    torch.export.save(torch.export.export(net, (torch.randn(2, 4),)), tmp_path / "ep.pt2")
    ck = read_checkpoint(tmp_path / "ep.pt2")
    assert ck.kind == "exported" and ck.module is None  # nothing unpickled: weights only
    assert same(ck.state_dict, want)
    trusted = read_checkpoint(tmp_path / "ep.pt2", trust=True)
    assert trusted.kind == "exported" and trusted.module is not None
    assert same(trusted.state_dict, want)
    x = torch.randn(2, 4)  # the program was exported for a batch of 2
    assert torch.allclose(trusted.module(x), net(x))


def _rewrite_zip(src: Path, dst: Path, change) -> None:
    """Copy a zip archive member by member, `change(name, bytes) -> bytes` on each."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            zout.writestr(info.filename, change(info.filename, zin.read(info.filename)))


class Payload:
    """Unpickling it opens (creates) a file: proof that code from the file ran."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_exported_program_with_a_pickled_weight_needs_trust_and_is_not_unpickled(tmp_path, net):
    marker = tmp_path / "ran"
    torch.export.save(torch.export.export(net, (torch.randn(2, 4),)), tmp_path / "ep.pt2")

    def change(name, data):
        if name.endswith("model_weights_config.json"):
            cfg = json.loads(data)
            cfg["config"]["0.weight"]["use_pickle"] = True
            return json.dumps(cfg).encode()
        if name.endswith("weights/weight_0"):
            return torch.serialization.pickle.dumps(Payload(str(marker)))
        return data

    _rewrite_zip(tmp_path / "ep.pt2", tmp_path / "evil.pt2", change)
    with pytest.raises(CheckpointError, match="--trust-checkpoint"):
        read_checkpoint(tmp_path / "evil.pt2")
    assert not marker.exists()


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_a_pickled_module_needs_trust(tmp_path, net, legacy):
    want = expected(net)
    torch.save(net, tmp_path / "whole.pt", _use_new_zipfile_serialization=not legacy)
    with pytest.raises(CheckpointError, match="--trust-checkpoint"):
        read_checkpoint(tmp_path / "whole.pt")
    ck = read_checkpoint(tmp_path / "whole.pt", trust=True)
    assert ck.kind == "module" and isinstance(ck.module, nn.Sequential)
    assert same(ck.state_dict, want)
    x = torch.randn(5, 4)
    assert torch.equal(ck.module(x), net(x))


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_a_pickle_that_runs_code_never_runs_without_trust(tmp_path, legacy):
    marker = tmp_path / "ran"
    torch.save({"w": torch.ones(2), "x": Payload(str(marker))}, tmp_path / "evil.pt",
               _use_new_zipfile_serialization=not legacy)
    with pytest.raises(CheckpointError, match="--trust-checkpoint"):
        read_checkpoint(tmp_path / "evil.pt")
    assert not marker.exists()
    # the control: with trust the payload does run (so the check above means something)
    read_checkpoint(tmp_path / "evil.pt", trust=True)
    assert marker.exists()


# ----------------------------------------------------------------------------- damaged input
def _saved(tmp_path: Path, kind: str) -> bytes:
    net = tiny()
    p = tmp_path / f"src-{kind}"
    if kind == "zip":
        torch.save(net.state_dict(), p)
    elif kind == "legacy":
        torch.save(net.state_dict(), p, _use_new_zipfile_serialization=False)
    elif kind == "module":
        torch.save(net, p, _use_new_zipfile_serialization=False)
    elif kind == "torchscript":
        torch.jit.save(torch.jit.script(net), p)
    elif kind == "exported":
        torch.export.save(torch.export.export(net, (torch.randn(2, 4),)), p)
    elif kind == "safetensors":
        save_file({k: v.contiguous() for k, v in net.state_dict().items()}, p)
    return p.read_bytes()


def _raises_checkpoint_error(path, trust=False, match=None):
    """read_checkpoint raises CheckpointError (an LCError), and no other exception type."""
    try:
        read_checkpoint(path, trust=trust)
    except CheckpointError as e:
        assert isinstance(e, LCError)
        assert str(path) in str(e) or Path(path).name in str(e)
        if match is not None:
            assert match in str(e), str(e)
        return
    except Exception as e:  # noqa: BLE001 - the point of the test
        pytest.fail(f"read_checkpoint({Path(path).name}, trust={trust}) raised {type(e).__name__}: {e}")
    pytest.fail(f"read_checkpoint({Path(path).name}) read a damaged file without an error")


@pytest.mark.parametrize("kind", ["zip", "legacy", "torchscript", "exported", "safetensors"])
@pytest.mark.parametrize("fraction", [0.1, 0.5, 0.9])
def test_truncated_files_raise_checkpoint_error(tmp_path, kind, fraction):
    data = _saved(tmp_path, kind)
    name = "cut.safetensors" if kind == "safetensors" else "cut.pt2" if kind == "exported" else "cut.pt"
    (tmp_path / name).write_bytes(data[: int(len(data) * fraction)])
    _raises_checkpoint_error(tmp_path / name)


def test_a_file_holding_one_pickle_byte_raises_checkpoint_error(tmp_path):
    # the first byte of every legacy torch.save file (the pickle PROTO opcode), and nothing after it
    (tmp_path / "one.pt").write_bytes(b"\x80")
    _raises_checkpoint_error(tmp_path / "one.pt")


@pytest.mark.parametrize("fraction", [0.1, 0.5, 0.9])
def test_a_truncated_pickled_module_with_trust_raises_checkpoint_error(tmp_path, fraction):
    data = _saved(tmp_path, "module")
    (tmp_path / "cut.pt").write_bytes(data[: int(len(data) * fraction)])
    _raises_checkpoint_error(tmp_path / "cut.pt", trust=True)


def test_a_pickled_module_whose_class_is_gone_with_trust_raises_checkpoint_error(tmp_path):
    # a whole model saved from a module that the reading process cannot import (e.g. a training
    # script's __main__): unpickling fails to find the class
    gone = types.ModuleType("lcc_test_gone_module")

    class Net(nn.Linear):
        pass

    Net.__module__ = gone.__name__
    Net.__qualname__ = "Net"
    gone.Net = Net
    sys.modules[gone.__name__] = gone
    try:
        torch.save(Net(2, 2), tmp_path / "whole.pt")
    finally:
        del sys.modules[gone.__name__]
    _raises_checkpoint_error(tmp_path / "whole.pt", trust=True)


def test_a_flipped_tensor_byte_fails_the_archive_checksum(tmp_path):
    net = tiny()
    torch.save(net.state_dict(), tmp_path / "sd.pt")
    data = bytearray((tmp_path / "sd.pt").read_bytes())
    at = data.find(net[0].weight.detach().numpy().tobytes())
    assert at > 0
    data[at + 5] ^= 0xFF
    (tmp_path / "bad.pt").write_bytes(bytes(data))
    _raises_checkpoint_error(tmp_path / "bad.pt", match="checksum")


def _stored_zip(member: str = "archive/data.pkl", payload: bytes = b"\xff" * 64) -> bytearray:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as z:
        z.writestr(member, payload)
    return bytearray(buf.getvalue())


def _damaged_zips() -> dict[str, bytes]:
    out = {}
    # a member whose compression method (central directory) is one zipfile does not support
    d = _stored_zip()
    c = d.find(b"PK\x01\x02")
    d[c + 10:c + 12] = (99).to_bytes(2, "little")
    out["unknown compression method"] = bytes(d)
    # a member said to be deflated whose bytes are not a deflate stream
    d = _stored_zip()
    d[8:10] = (8).to_bytes(2, "little")
    d[c + 10:c + 12] = (8).to_bytes(2, "little")
    out["bad deflate stream"] = bytes(d)
    # a member name in the local header that is not UTF-8 though the header says it is
    d = _stored_zip()
    d[6:8] = (int.from_bytes(d[6:8], "little") | 0x800).to_bytes(2, "little")
    d[c + 8:c + 10] = (int.from_bytes(d[c + 8:c + 10], "little") | 0x800).to_bytes(2, "little")
    d[30] = 0xFF
    out["name not utf-8"] = bytes(d)
    # a zip that is not a torch archive at all
    out["plain zip"] = bytes(_stored_zip("readme.txt", b"hello"))
    return out


@pytest.mark.parametrize("case", list(_damaged_zips()))
def test_damaged_zip_archives_raise_checkpoint_error(tmp_path, case):
    (tmp_path / "bad.pt").write_bytes(_damaged_zips()[case])
    _raises_checkpoint_error(tmp_path / "bad.pt")


@pytest.mark.parametrize("config", [{"config": []}, {"config": "x"}, [1], {"config": {"w": "x"}}, "{"],
                         ids=["list", "string", "top-list", "entry-string", "bad-json"])
def test_an_exported_program_with_a_malformed_weights_config_raises_checkpoint_error(tmp_path, config):
    with zipfile.ZipFile(tmp_path / "bad.pt2", "w") as z:
        z.writestr("a/archive_format", "pt2")
        text = config if isinstance(config, str) else json.dumps(config)
        z.writestr("a/data/weights/model_weights_config.json", text)
    _raises_checkpoint_error(tmp_path / "bad.pt2")


def test_an_exported_program_without_weights_config_raises_checkpoint_error(tmp_path):
    with zipfile.ZipFile(tmp_path / "bad.pt2", "w") as z:
        z.writestr("a/archive_format", "pt2")
    _raises_checkpoint_error(tmp_path / "bad.pt2", match=".pt2")


def test_a_torchscript_archive_with_garbage_code_raises_checkpoint_error(tmp_path):
    with zipfile.ZipFile(tmp_path / "ts.pt", "w") as z:
        z.writestr("archive/code/__torch__.py", "this is not python (")
        z.writestr("archive/constants.pkl", b"\x80\x02garbage")
        z.writestr("archive/data.pkl", b"\x80\x02garbage")
    _raises_checkpoint_error(tmp_path / "ts.pt", match="TorchScript")


@pytest.mark.parametrize("content,needle", [
    (b"", "empty"),
    (b"hello, these are my notes", "not a checkpoint"),
    (b"\x00" * 64, "not a checkpoint"),
    (b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all", "safetensors"),
])
def test_empty_and_unknown_files_raise_checkpoint_error(tmp_path, content, needle):
    (tmp_path / "f.pt").write_bytes(content)
    _raises_checkpoint_error(tmp_path / "f.pt", match=needle)


def test_missing_paths_and_directories_raise_checkpoint_error(tmp_path):
    _raises_checkpoint_error(tmp_path / "nope.pt", match="no such file")
    _raises_checkpoint_error(tmp_path, match="not a file")


@pytest.mark.parametrize("obj", [torch.ones(3), [torch.ones(3)], {"epoch": 3}, {1: torch.ones(2)}],
                         ids=["tensor", "list", "no-tensors", "int-keys"])
def test_a_file_without_named_tensors_raises_checkpoint_error(tmp_path, obj):
    torch.save(obj, tmp_path / "x.pt")
    _raises_checkpoint_error(tmp_path / "x.pt", match="no tensors")


# ----------------------------------------------------------------------------- user code
def test_load_callable_from_a_file_and_its_sibling_modules(tmp_path):
    (tmp_path / "helper_for_lcc_test.py").write_text("FACTOR = 6\n")
    (tmp_path / "user.py").write_text("import helper_for_lcc_test\n"
                                      "def f(x):\n    return x * helper_for_lcc_test.FACTOR\n")
    before = list(sys.path)
    fn = load_callable(f"{tmp_path / 'user.py'}:f", "--model")
    assert fn(7) == 42
    assert sys.path == before  # the file's folder was on sys.path only while importing it


def test_load_callable_from_a_module():
    import os.path

    assert load_callable("os.path:join", "--data") is os.path.join
    from lccompress.digits import MLP

    assert load_callable("lccompress.digits:MLP", "--model") is MLP


@pytest.mark.parametrize("spec,needle", [
    ("no_colon_here", "FILE.py:FUNC"),
    ("{dir}/missing.py:f", "no such file"),
    ("{dir}/user.py:nothere", "no function 'nothere'"),
    ("{dir}/user.py:VALUE", "no function 'VALUE'"),
    ("{dir}/raises.py:f", "ZeroDivisionError"),
    ("{dir}/syntax.py:f", "SyntaxError"),
    ("{dir}/imports.py:f", "ModuleNotFoundError"),
    ("lcc_no_such_module_anywhere:f", "ModuleNotFoundError"),
    ("math:pi", "no function 'pi'"),
])
def test_load_callable_errors_are_checkpoint_errors(tmp_path, spec, needle):
    (tmp_path / "user.py").write_text("VALUE = 3\ndef f():\n    return 1\n")
    (tmp_path / "raises.py").write_text("1 / 0\ndef f():\n    return 1\n")
    (tmp_path / "syntax.py").write_text("def f(:\n")
    (tmp_path / "imports.py").write_text("import lcc_no_such_module_anywhere\ndef f():\n    return 1\n")
    spec = spec.format(dir=tmp_path)
    with pytest.raises(CheckpointError) as e:
        load_callable(spec, "--data")
    assert needle in str(e.value) and "--data" in str(e.value)


def test_call_factory(tmp_path):
    (tmp_path / "m.py").write_text(
        "import torch\n"
        "def good():\n    return torch.nn.Linear(2, 3)\n"
        "def not_a_module():\n    return 42\n"
        "def boom():\n    raise RuntimeError('no GPU here')\n")
    m = call_factory(f"{tmp_path / 'm.py'}:good")
    assert isinstance(m, nn.Linear) and m.weight.shape == (3, 2)
    with pytest.raises(CheckpointError, match="returned int, not an nn.Module"):
        call_factory(f"{tmp_path / 'm.py'}:not_a_module")
    with pytest.raises(CheckpointError, match="RuntimeError: no GPU here"):
        call_factory(f"{tmp_path / 'm.py'}:boom")


def _factory_file(tmp_path: Path) -> Path:
    (tmp_path / "fac.py").write_text(
        "from torch import nn\n"
        "def same():\n    return nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))\n"
        "def renamed():\n    return nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Identity(), nn.Linear(3, 2))\n"
        "def wider():\n    return nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 2))\n")
    return tmp_path / "fac.py"


def test_build_model_loads_the_checkpoint_into_the_factorys_module(tmp_path, net):
    want = expected(net)
    torch.save(net.state_dict(), tmp_path / "sd.pt")
    ck = read_checkpoint(tmp_path / "sd.pt")
    model = build_model(ck, f"{_factory_file(tmp_path)}:same")
    assert same(model.state_dict(), want)
    # without a factory the module is the checkpoint's own (None for weights only)
    assert build_model(ck, None) is None
    torch.jit.save(torch.jit.script(net), tmp_path / "ts.pt")
    ts = read_checkpoint(tmp_path / "ts.pt")
    assert build_model(ts, None) is ts.module


def test_build_model_with_mismatched_keys_names_them(tmp_path, net):
    torch.save(net.state_dict(), tmp_path / "sd.pt")
    ck = read_checkpoint(tmp_path / "sd.pt")
    with pytest.raises(CheckpointError) as e:
        build_model(ck, f"{_factory_file(tmp_path)}:renamed")  # its last layer is "3.", not "2."
    msg = str(e.value)
    assert "missing" in msg and "unexpected" in msg
    assert "3.weight" in msg and "2.weight" in msg and "does not fit" in msg


def test_build_model_with_mismatched_shapes_raises_checkpoint_error(tmp_path, net):
    torch.save(net.state_dict(), tmp_path / "sd.pt")
    ck = read_checkpoint(tmp_path / "sd.pt")
    with pytest.raises(CheckpointError, match="does not fit"):
        build_model(ck, f"{_factory_file(tmp_path)}:wider")
