"""Bad input and bad luck give one line, the right exit status, and never a changed input:
the size gate opens what it gates, outputs never overwrite inputs, fixed ranks that save nothing
are refused, a loader failing mid-epoch, a full disk and Ctrl-C are one line each, resealed
manifests that do not fit are refused in one line, and a run interrupted by SIGINT or SIGKILL
inside any L step resumes to the same bytes."""

import errno
import hashlib
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from lccompress.artifact import load
from lccompress.artifact.container import META_KEY
from lccompress.cli import main

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "fixtures"))
import fuzzing  # noqa: E402


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def one_line(r, *needles, notes=0):
    """The command failed with one line, an `Error:` naming every needle, after at most `notes`
    lines of progress and notices."""
    lines = [line for line in r.output.splitlines() if line.strip()]
    assert r.exit_code != 0 and 1 <= len(lines) <= 1 + notes and lines[-1].startswith("Error:"), (r.exit_code, r.output)
    assert sum(line.startswith("Error") for line in lines) == 1, r.output
    assert "Traceback" not in r.output and all(n in lines[-1] for n in needles), (needles, r.output)
    return lines[-1]


def reseal(path, edit):
    """Edit an artifact's manifest and seal it again with a valid checksum, the tensor bytes
    untouched (fixtures/fuzzing.py's `resealed`)."""
    Path(path).write_bytes(fuzzing.resealed(Path(path).read_bytes(), META_KEY, edit))


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


# ----------------------------------------------------------------------------- named regressions
def test_export_with_an_input_shape_that_does_not_fit_is_one_line(art, fx, tmp_path):
    out = tmp_path / "o.onnx"
    r = run("export", art, "--onnx", out, "--model", fx["model"], "--input-shape", "1,5")
    assert r.exit_code == 1
    one_line(r, "fails on the example input")
    assert not out.exists() and not list(tmp_path.glob("*.onnx*"))


def test_extract_on_a_file_that_is_not_multilevel_is_one_line(art, fx, tmp_path):
    out = tmp_path / "e.safetensors"
    one_line(run("extract", art, "--level", "1", "-o", out), "not a multi-level file")
    one_line(run("extract", fx["ckpt"], "--level", "1", "-o", out), "not a readable safetensors file")
    assert not out.exists()


def _group_part(art, part):
    g = load(art).groups[0].name
    return g, f"{g}.{part}"


def test_an_empty_part_entry_is_one_line_in_check_and_inspect(art):
    group, tensor = _group_part(art, "values")
    reseal(art, lambda m: m["groups"][group]["parts"].update(values={}))
    r = run("check", art, "--max-bytes", "1GB")
    assert r.exit_code == 2
    one_line(r, tensor, "has manifest entry {}")
    r = run("inspect", art)
    assert r.exit_code == 1
    one_line(r, "manifest entry is malformed", "'enc'")


@pytest.mark.parametrize("part,says", [("values", "the manifest says bfloat16"),
                                       ("indices", "encoded, which holds integers, but the manifest gives it dtype bfloat16")])
def test_a_part_dtype_changed_to_bfloat16_is_one_line_in_check_and_inspect(art, part, says):
    group, tensor = _group_part(art, part)

    def edit(m):
        m["groups"][group]["parts"][part]["dtype"] = "bfloat16"
    reseal(art, edit)
    r = run("check", art, "--max-bytes", "1GB")
    assert r.exit_code == 2
    one_line(r, tensor, says)
    r = run("inspect", art)
    assert r.exit_code == 1
    one_line(r, tensor, says)


def test_a_full_disk_while_writing_the_report_is_one_line_and_leaves_no_report(fx, tmp_path, monkeypatch):
    """ENOSPC half way through the report: the real atomic write runs and fails inside, so what
    it leaves (nothing: no report, no temp file) is what a user's disk would hold."""
    import lccompress.report as report
    from lccompress.util import atomic_write

    def full(path, data, mode=0o644):
        def half(f):
            f.write(data[: len(data) // 2])
            raise OSError(errno.ENOSPC, "No space left on device")
        atomic_write(path, half, mode)

    monkeypatch.setattr(report, "atomic_write", full)
    rep = tmp_path / "r.json"
    r = run("prune", fx["ckpt"], "--keep", "0.2", "-o", tmp_path / "o.safetensors", "--report", rep)
    assert r.exit_code == 1
    one_line(r, "No space left on device", notes=2)  # "no --data given: the method is DC" (wrapped)
    assert not rep.exists() and not [p.name for p in tmp_path.iterdir() if p.name.startswith(".r.json")]


# ----------------------------------------------------------------------------- SIGINT / SIGKILL, resume
SIGNAL_RUNS = {"prune": ["prune", "--keep", "0.1"], "codebook": ["quantize", "--codebook", "2"],
               "lowrank": ["lowrank", "--rank", "4"]}


def _cmd(fx, scheme, out, *extra):
    return [sys.executable, "-m", "lccompress", *SIGNAL_RUNS[scheme][:1], fx["ckpt"], *SIGNAL_RUNS[scheme][1:],
            "--model", fx["model"], "--data", fx["data"], "--steps", "4", "--epochs", "6", "--first-epochs", "1",
            "--device", "cpu", "-o", str(out), *extra]


ENV = {**os.environ, "OMP_NUM_THREADS": "1", "CI": "1"}


def _sha(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def uninterrupted(fx, tmp_path_factory):
    """sha256 of each scheme's uninterrupted run, made once (in this process) for all the
    interrupted ones."""
    done = {}

    def get(scheme):
        if scheme not in done:
            out = tmp_path_factory.mktemp("whole") / "whole.safetensors"
            r = run(*_cmd(fx, scheme, out)[3:])
            assert r.exit_code == 0, r.output
            done[scheme] = _sha(out)
        return done[scheme]
    return get


def _saved_step(state):
    try:
        return torch.load(state, weights_only=True)["step"]
    except Exception:  # noqa: BLE001 - not written yet
        return None


def _when_saved(state, step, poll):
    """Wait until LC step `step` − 1 is saved, then a moment into step `step`'s L step (6 epochs)."""
    deadline = time.time() + 120
    while _saved_step(state) != step - 1 and poll() and time.time() < deadline:
        time.sleep(0.005)
    time.sleep(0.05)


def _kill_inside(cmd, state, step):
    """Run `cmd` in a process of its own and SIGKILL it inside LC step `step` (0-based, as lc.py
    counts: after step − 1 was saved, before step is)."""
    p = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    _when_saved(state, step, lambda: p.poll() is None)
    os.kill(p.pid, signal.SIGKILL)
    said = p.communicate()[0]
    assert p.returncode == -signal.SIGKILL, said
    assert _saved_step(state) == step - 1, f"the signal came after step {step} was saved"


def _sigint_inside(args, state, step):
    """Run the command in this process and send it SIGINT (Ctrl-C) inside LC step `step`: the
    path a terminal's Ctrl-C takes, without a process start per run."""
    stop = threading.Event()

    def watch():
        _when_saved(state, step, lambda: not stop.is_set())
        if not stop.is_set():
            os.kill(os.getpid(), signal.SIGINT)

    t = threading.Thread(target=watch, daemon=True)
    t.start()
    try:
        r = run(*args)
    finally:
        stop.set()
        t.join()
    assert r.exit_code == 1, r.output
    one_line(r, "interrupted", "--resume", notes=8)  # the lines of the steps done
    assert _saved_step(state) == step - 1, f"the signal came after step {step} was saved"


@pytest.mark.parametrize("scheme", list(SIGNAL_RUNS))
@pytest.mark.parametrize("sig", ["SIGINT", "SIGKILL"])
def test_interrupted_inside_l_steps_1_and_3_then_resumed_gives_the_same_sha256(fx, tmp_path, uninterrupted,
                                                                              scheme, sig):
    """Each scheme is interrupted by SIGINT and by SIGKILL at two points, inside L step 1 and then,
    resumed, inside L step 3 (of 0…3); resumed again, it writes the uninterrupted run's bytes.
    SIGKILL hits a process of its own; SIGINT is sent to this process, running the CLI in place."""
    out = tmp_path / "cut.safetensors"
    state = tmp_path / "cut.safetensors.lcstate" / "lc_state.pt"
    for step, extra in ((1, []), (3, ["--resume"])):
        if sig == "SIGKILL":
            _kill_inside(_cmd(fx, scheme, out, *extra), state, step)
        else:
            _sigint_inside(_cmd(fx, scheme, out, *extra)[3:], state, step)
        assert not out.exists()
    r = run(*_cmd(fx, scheme, out, "--resume")[3:])
    assert r.exit_code == 0, r.output
    assert _sha(out) == uninterrupted(scheme)
