"""Every command through Click's CliRunner; bad input gives one line and no output file."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from lccompress.cli import main

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()


def run(*args, ok=True):
    r = CliRunner().invoke(main, [str(a) for a in args])
    if ok:
        assert r.exit_code == 0, (r.output, r.exception)
    return r


FAST = ["--steps", "3", "--epochs", "1", "--first-epochs", "1"]


def test_every_command_has_help_with_an_example_and_a_readme_entry():
    for name in main.commands:
        out = run(name, "--help")
        assert "Example: lccompress " + name in out.output, name
        assert f"lccompress {name}" in README, name


def test_prune_a_state_dict_alone_is_dc(fx, tmp_path):
    out, rep = tmp_path / "out.safetensors", tmp_path / "r.json"
    r = run("prune", fx["ckpt"], "--keep", "0.1", "-o", out, "--report", rep)
    assert "method is DC" in r.output
    report = json.loads(rep.read_text())
    assert report["artifact_bytes"] == os.stat(out).st_size
    assert report["method"] == "dc"
    from lccompress.artifact import load

    sd = load(out).state_dict
    weights = [sd[f"fc{i}.weight"] for i in (1, 2, 3)]
    nnz = sum(int((w != 0).sum()) for w in weights)
    assert nnz / sum(w.numel() for w in weights) <= 0.1
    # the kept weights are the reference's largest (global top-k), independent check with torch.topk
    ref = torch.load(fx["ckpt"], weights_only=True)
    flat = torch.cat([ref[f"fc{i}.weight"].reshape(-1) for i in (1, 2, 3)])
    kept = torch.cat([w.reshape(-1) for w in weights]) != 0
    assert set(kept.nonzero().reshape(-1).tolist()) == set(torch.topk(flat.abs(), 5020).indices.tolist())


def test_prune_with_model_and_data_runs_lc_and_reports(fx, tmp_path):
    out, rep = tmp_path / "out.safetensors", tmp_path / "r.json"
    run("prune", fx["ckpt"], "--keep", "0.1", "--model", fx["model"], "--data", fx["data"], "-o", out,
        "--report", rep, *FAST)
    r = json.loads(rep.read_text())
    assert r["method"] == "lc" and [h["phase"] for h in r["history"]] == ["lc"] * 3 + ["tail"]
    assert r["artifact_bytes"] == os.stat(out).st_size
    assert r["metric"]["compressed"] > 0.8 and r["metric"]["reference"] > 0.95
    assert len(r["per_class"]) == 10
    for key in ("reference_bytes", "compression_ratio", "layers", "timings", "lccompress_version"):
        assert key in r
    assert not (tmp_path / "out.safetensors.lcstate").exists()  # state removed after success


def test_tail_share_is_an_option(fx, tmp_path):
    rep = tmp_path / "r.json"
    run("prune", fx["ckpt"], "--keep", "0.1", "--model", fx["model"], "--data", fx["data"], "-o",
        tmp_path / "t.safetensors", "--report", rep, "--steps", "2", "--budget", "40", "--tail", "0.5")
    r = json.loads(rep.read_text())
    assert [h["phase"] for h in r["history"]] == ["lc", "lc", "tail"] and r["budget"]["steps"] == 40
    run("prune", fx["ckpt"], "--keep", "0.1", "--model", fx["model"], "--data", fx["data"], "-o",
        tmp_path / "n.safetensors", "--report", rep, "--steps", "2", "--budget", "40", "--tail", "0")
    assert [h["phase"] for h in json.loads(rep.read_text())["history"]] == ["lc", "lc"]
    bad = run("prune", fx["ckpt"], "--keep", "0.1", "--tail", "1", "-o", tmp_path / "x.safetensors", ok=False)
    assert bad.exit_code == 2 and "--tail" in bad.output


def test_distill_needs_no_labels(fx, tmp_path):
    rep = tmp_path / "r.json"
    run("quantize", fx["ckpt"], "--codebook", "2", "--loss", "distill", "--model", fx["model"], "--data",
        f"{fx['dir'] / 'data.py'}:unlabelled", "-o", tmp_path / "q.safetensors", "--report", rep, *FAST)
    r = json.loads(rep.read_text())
    # without labels the metric is agreement with the reference: the reference agrees with itself
    assert r["metric"]["reference"] == 1.0 and 0.5 < r["metric"]["compressed"] <= 1.0
    assert r["history"][-1]["loss"] >= 0  # a KL divergence


def test_onnx_output_is_measured_in_onnxruntime(fx, tmp_path):
    out, rep = tmp_path / "m.onnx", tmp_path / "r.md"
    run("quantize", fx["ckpt"], "--codebook", "2", "--model", fx["model"], "--data", fx["data"], "-o", out,
        "--report", rep, *FAST)
    text = rep.read_text()
    assert "ONNX" in text and "| fc1.weight | codebook" in text
    import onnxruntime as ort

    d = torch.load(fx["dir"] / "digits_data.pt", weights_only=True)
    x, y = d["test"]
    s = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    acc = float((torch.from_numpy(s.run(None, {s.get_inputs()[0].name: x.numpy()})[0]).argmax(1) == y).float().mean())
    assert f"{100 * acc:.2f} %" in text  # the report's ONNX accuracy is what onnxruntime gives


def test_quantize_bits_lowrank_and_recipe(fx, tmp_path):
    from lccompress.artifact import load

    run("quantize", fx["st"], "--bits", "1", "-o", tmp_path / "q.safetensors")
    sd = load(tmp_path / "q.safetensors").state_dict
    assert sd["fc1.weight"].unique().numel() == 2
    run("lowrank", fx["ckpt"], "--rank", "8", "--exclude", "fc3.weight", "-o", tmp_path / "l.safetensors")
    sd = load(tmp_path / "l.safetensors").state_dict
    assert torch.linalg.matrix_rank(sd["fc1.weight"]) == 8
    assert torch.equal(sd["fc3.weight"], torch.load(fx["ckpt"], weights_only=True)["fc3.weight"])
    run("lowrank", fx["ckpt"], "--select", "1e-4", "--include", "fc2.weight", "-o", tmp_path / "s.safetensors")
    (tmp_path / "r.toml").write_text(
        '[[rule]]\nparams = ["fc1.weight", "fc2.weight"]\nscheme = "lowrank"\nrank = 4\n\n'
        '[[rule]]\nparams = ["fc3.weight"]\nscheme = "additive"\n'
        'terms = [{scheme = "codebook", k = 2}, {scheme = "prune", keep = 0.05}]\n')
    run("compress", fx["ckpt"], "--recipe", tmp_path / "r.toml", "-o", tmp_path / "c.safetensors")
    art = load(tmp_path / "c.safetensors")
    assert torch.linalg.matrix_rank(art.state_dict["fc2.weight"]) == 4
    assert {g.scheme.name for g in art.groups} == {"lowrank", "additive"}


def test_export_inspect_and_check(fx, tmp_path):
    art = tmp_path / "p.safetensors"
    run("prune", fx["ckpt"], "--keep", "0.05", "-o", art)
    r = run("export", art, "--onnx", tmp_path / "p.onnx", "--model", fx["model"], "--input-shape", "2,64")
    assert "max rel diff" in r.output and (tmp_path / "p.onnx").exists()
    r = run("inspect", art, "--json")
    info = json.loads(r.output)
    assert info["file_bytes"] == os.stat(art).st_size
    assert {row["name"] for row in info["layers"]} >= {"fc1.weight+fc2.weight+fc3.weight", "fc1.bias"}
    assert "fc1.weight" in run("inspect", fx["ckpt"]).output
    size = os.stat(art).st_size
    ok = run("check", art, "--max-bytes", str(size), "--json")
    assert json.loads(ok.output)["ok"] is True
    over = run("check", art, "--max-bytes", str(size - 100), ok=False)
    assert over.exit_code == 1 and "over by 100" in over.output
    usage = run("check", art, "--max-bytes", "lots", ok=False)
    assert usage.exit_code == 2
    assert run("check", tmp_path / "nope.safetensors", "--max-bytes", "1", ok=False).exit_code == 2
    drop = run("check", art, "--max-drop", "0.5", "--reference", fx["ckpt"], "--model", fx["model"],
               "--data", fx["data"], "--json")
    d = json.loads(drop.output)["checks"][0]
    assert d["budget"] == "drop" and d["value"] == pytest.approx(d["reference"] - d["compressed"], abs=1e-6)
    tight = run("check", art, "--max-drop", "0.0", "--reference", fx["ckpt"], "--model", fx["model"],
                "--data", fx["data"], ok=False)
    assert tight.exit_code == (0 if d["value"] <= 0 else 1)


def test_checkpoint_kinds(fx, tmp_path):
    from lccompress.digits import MLP

    m = MLP()
    m.load_state_dict(torch.load(fx["ckpt"], weights_only=True))
    torch.jit.save(torch.jit.script(m), tmp_path / "ts.pt")
    torch.export.save(torch.export.export(m, (torch.randn(2, 64),)), tmp_path / "ep.pt2")
    torch.save(m, tmp_path / "whole.pt")
    for f in ("ts.pt", "ep.pt2"):
        run("prune", tmp_path / f, "--keep", "0.1", "-o", tmp_path / f"{f}.safetensors")
    r = run("prune", tmp_path / "whole.pt", "--keep", "0.1", "-o", tmp_path / "w.safetensors", ok=False)
    assert r.exit_code != 0 and "--trust-checkpoint" in r.output and not (tmp_path / "w.safetensors").exists()
    run("prune", tmp_path / "whole.pt", "--keep", "0.1", "--trust-checkpoint", "--data", fx["data"], *FAST,
        "-o", tmp_path / "w.safetensors")
    # a TorchScript module trains too (its code comes with it)
    run("prune", tmp_path / "ts.pt", "--keep", "0.1", "--data", fx["data"], *FAST, "-o", tmp_path / "t2.safetensors")


class Payload:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_a_pickle_that_runs_code_is_never_unpickled_without_the_flag(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"x": Payload(str(marker))}, tmp_path / "evil.pt")
    for cmd in (["prune", tmp_path / "evil.pt", "--keep", "0.5", "-o", tmp_path / "o.safetensors"],
                ["inspect", tmp_path / "evil.pt"]):
        r = run(*cmd, ok=False)
        assert r.exit_code != 0 and "--trust-checkpoint" in r.output
        assert not marker.exists()


def _bad_cases(fx, tmp_path):
    trunc = tmp_path / "trunc.pt"
    trunc.write_bytes(Path(fx["ckpt"]).read_bytes()[:3000])
    text = tmp_path / "notes.pt"
    text.write_text("hello")
    data = fx["dir"] / "data.py"
    out = ["-o", tmp_path / "out.safetensors"]
    train = ["--model", fx["model"]]
    return {
        "missing file": (["prune", tmp_path / "nope.pt", "--keep", "0.1", *out], "no such file"),
        "not a checkpoint": (["prune", text, "--keep", "0.1", *out], "not a checkpoint"),
        "truncated": (["prune", trunc, "--keep", "0.1", *out], "corrupt"),
        "keep 0": (["prune", fx["ckpt"], "--keep", "0", *out], "(0, 1]"),
        "keep 1.5": (["prune", fx["ckpt"], "--keep", "1.5", *out], "(0, 1]"),
        "keep abc": (["prune", fx["ckpt"], "--keep", "abc", *out], "not a number"),
        "bits 0": (["quantize", fx["ckpt"], "--bits", "0", *out], "--bits"),
        "glob": (["prune", fx["ckpt"], "--keep", "0.1", "--include", "conv*", *out], "'conv*' matches no parameter"),
        "data missing": (["prune", fx["ckpt"], "--keep", "0.1", *train, "--data", f"{data}:nothere", *out], "no function"),
        "data file missing": (["prune", fx["ckpt"], "--keep", "0.1", *train, "--data", "nope.py:f", *out], "no such file"),
        "data raises": (["prune", fx["ckpt"], "--keep", "0.1", *train, "--data", f"{data}:broken", *out], "disk on fire"),
        "data shapes": (["prune", fx["ckpt"], "--keep", "0.1", *train, "--data", f"{data}:wrong_shape", *out],
                        "does not fit"),
        "no model": (["prune", fx["ckpt"], "--keep", "0.1", "--data", fx["data"], *out], "--model"),
        "unwritable": (["prune", fx["ckpt"], "--keep", "0.1", "-o", tmp_path / "no" / "dir" / "o.safetensors"],
                       "does not exist"),
        "report dir": (["prune", fx["ckpt"], "--keep", "0.1", *out, "--report", tmp_path / "no" / "r.json"],
                       "does not exist"),
        "bad suffix": (["prune", fx["ckpt"], "--keep", "0.1", "-o", tmp_path / "o.zip"], ".safetensors or .onnx"),
    }


def test_bad_input_gives_one_line_no_traceback_no_output(fx, tmp_path):
    for name, (args, needle) in _bad_cases(fx, tmp_path).items():
        r = run(*args, ok=False)
        assert r.exit_code != 0, name
        assert needle in r.output, (name, r.output)
        assert "Traceback" not in r.output, name
        assert not isinstance(r.exception, Exception) or isinstance(r.exception, SystemExit), (name, r.exception)
        lines = [line for line in r.stderr.splitlines() if line.strip()]
        assert len(lines) <= 3, (name, r.stderr)  # Click's usage lines + one error line at most
        assert not list(tmp_path.glob("out.safetensors*")), name


@pytest.mark.parametrize("command,sig", [(["quantize", "--codebook", "2"], signal.SIGKILL),
                                         (["prune", "--keep", "0.1"], signal.SIGINT),
                                         (["lowrank", "--rank", "4"], signal.SIGKILL)],
                         ids=["codebook-sigkill", "prune-sigint", "lowrank-sigkill"])
def test_interrupt_mid_epoch_then_resume_gives_the_same_bytes(fx, tmp_path, command, sig):
    def cmd(out, *extra):
        return [sys.executable, "-m", "lccompress", command[0], fx["ckpt"], *command[1:], "--model",
                fx["model"], "--data", fx["data"], "--steps", "4", "--epochs", "8", "--first-epochs", "1",
                "--device", "cpu", "-o", str(out), *extra]

    env = {**os.environ, "OMP_NUM_THREADS": "1", "CI": "1"}
    whole = tmp_path / "whole.safetensors"
    subprocess.run(cmd(whole), check=True, env=env, capture_output=True)
    out = tmp_path / "cut.safetensors"
    state = tmp_path / "cut.safetensors.lcstate" / "lc_state.pt"
    # a shell's background job starts with SIGINT ignored; the child gets the default, as at a terminal
    p = subprocess.Popen(cmd(out), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    for line in p.stdout:  # interrupt inside step 2 of 4 (8 epochs), after step 1 was saved
        if line.startswith("step 1/4"):
            deadline = time.time() + 30
            while not state.exists() and time.time() < deadline:
                time.sleep(0.01)
            time.sleep(0.05)  # into the next L step's epochs
            os.kill(p.pid, sig)
            break
    said = p.stdout.read()
    p.wait()
    assert p.returncode != 0 and not out.exists() and state.exists()
    if sig == signal.SIGINT:
        assert "--resume" in said and "Traceback" not in said
    subprocess.run(cmd(out, "--resume"), check=True, env=env, capture_output=True)
    assert out.read_bytes() == whole.read_bytes()


def test_demo_runs_end_to_end(tmp_path):
    r = run("demo", "--out-dir", tmp_path, "--steps", "2")
    assert (tmp_path / "digits_mlp.onnx").exists() and (tmp_path / "report.md").exists()
    assert "accuracy: reference" in r.output


def test_multilevel_extract_and_sweep(fx, tmp_path):
    from lccompress.artifact import load
    from lccompress.artifact.multilevel import extract as extract_level

    multi = tmp_path / "multi.safetensors"
    run("multilevel", fx["ckpt"], "--keep", "0.5,0.2,0.1", "-o", multi)
    ref = torch.load(fx["ckpt"], weights_only=True)
    flat = torch.cat([ref[f"fc{i}.weight"].reshape(-1) for i in (1, 2, 3)])
    for level, keep in ((1, 0.5), (3, 0.1)):
        out = tmp_path / f"l{level}.safetensors"
        run("extract", multi, "--level", level, "-o", out)
        sd = load(out).state_dict
        got = torch.cat([sd[f"fc{i}.weight"].reshape(-1) for i in (1, 2, 3)])
        # the same as a single-level global magnitude prune at that fraction (brute force: torch.topk)
        mask = torch.zeros_like(flat, dtype=torch.bool)
        mask[torch.topk(flat.abs(), round(keep * flat.numel())).indices] = True
        assert torch.equal(got, torch.where(mask, flat, 0.0))
        assert all(torch.equal(sd[k], v) for k, v in extract_level(multi, level).items())
    assert run("extract", multi, "--level", "9", "-o", tmp_path / "x.safetensors", ok=False).exit_code != 0
    sweep_dir = tmp_path / "sw"
    run("sweep", fx["ckpt"], "--keep", "0.2,0.05", "--method", "dc,lc", "--model", fx["model"], "--data",
        fx["data"], "-o", sweep_dir, "--steps", "2", "--epochs", "1")
    curve = json.loads((sweep_dir / "curve.json").read_text())
    assert [p["level"] for p in curve["lc"]] == [0.2, 0.05]
    for p in curve["dc"] + curve["lc"]:
        assert p["bytes"] == os.stat(sweep_dir / p["artifact"]).st_size
    assert (sweep_dir / "curve.svg").read_text().lstrip().startswith("<svg")


def test_budget_and_fractional_epochs_from_the_command_line(fx, tmp_path):
    common = ["prune", fx["ckpt"], "--keep", "0.1", "--model", fx["model"], "--data", fx["data"], "--steps", "3",
              "--device", "cpu"]
    r = run(*common, "--budget", "7", "--optimizer", "sgd", "-o", tmp_path / "b.safetensors", "--report",
            tmp_path / "b.json")
    rep = json.loads((tmp_path / "b.json").read_text())
    assert rep["budget"]["steps"] == 7 and rep["config"]["optimizer"] == "sgd" and rep["config"]["budget"] == 7
    assert "budget: 7 optimizer steps" in r.output
    run(*common, "--epochs", "0.5", "-o", tmp_path / "e.safetensors", "--report", tmp_path / "e.json")
    rep = json.loads((tmp_path / "e.json").read_text())
    assert rep["budget"]["epochs"] == pytest.approx(2.0, abs=0.2)  # 1 + 0.5 + 0.5 passes
    assert rep["config"]["optimizer"] == "adamw" and rep["config"]["cap"] is None
    r = run(*common, "--amp", "fp16", "-o", tmp_path / "f.safetensors", ok=False)
    assert r.exit_code == 1 and "fp16 needs a CUDA" in r.output and not (tmp_path / "f.safetensors").exists()


def test_acdc_and_cram_from_the_command_line(fx, tmp_path):
    common = ["prune", fx["ckpt"], "--keep", "0.1", "--model", fx["model"], "--data", fx["data"], "--steps", "3",
              "--budget", "30", "--device", "cpu"]
    for method, extra in (("acdc", ["--cycles", "1"]), ("cram", ["--rho", "0.1"])):
        rep = tmp_path / f"{method}.json"
        r = run(*common, "--method", method, *extra, "-o", tmp_path / f"{method}.safetensors", "--report", rep)
        report = json.loads(rep.read_text())
        assert report["method"] == method and report["budget"]["steps"] == 30, r.output
        layers = report["layers"]
        assert sum(row["summary"]["kept"] for row in layers) <= round(0.1 * sum(row["numel"] for row in layers))
    out = run(*common, "--method", "acdc", "--cycles", "20", "-o", tmp_path / "x.safetensors", ok=False)
    assert out.exit_code == 1 and "too small for 20 AC/DC cycles" in out.output
    assert not (tmp_path / "x.safetensors").exists()


def test_multilevel_after_cram_stores_the_cram_trained_model(fx, tmp_path):
    from lccompress import Prune, Recipe
    from lccompress.artifact.multilevel import extract as extract_level
    from lccompress.checkpoint import load_callable
    from lccompress.cram import MULTILEVEL_DEFAULTS, cram_refine

    multi, plain = tmp_path / "cram.safetensors", tmp_path / "plain.safetensors"
    run("multilevel", fx["ckpt"], "--keep", "0.3,0.1", "--method", "cram", "--budget", "60", "--model", fx["model"],
        "--data", fx["data"], "-o", multi)
    run("multilevel", fx["ckpt"], "--keep", "0.3,0.1", "-o", plain)
    make, data = load_callable(fx["model"], "model"), load_callable(fx["data"], "data")()
    model = make()
    model.load_state_dict(torch.load(fx["ckpt"], weights_only=True))
    names = [n for n, p in model.named_parameters() if p.dim() >= 2]
    want = cram_refine(model, data, [Recipe.single(names, Prune(keep=k), joint=True) for k in (0.3, 0.1)],
                       iterations=60, device="cpu", **MULTILEVEL_DEFAULTS)
    dense = extract_level(multi, 0)
    assert all(torch.equal(dense[k], v) for k, v in want.state_dict().items())

    def accuracy(path, level):
        m = make()
        m.load_state_dict(extract_level(path, level))
        m.eval()
        with torch.no_grad():
            hits = sum(int((m(x).argmax(1) == y).sum()) for x, y in data["eval"])
        return hits / sum(len(y) for _, y in data["eval"])

    assert accuracy(multi, 2) > accuracy(plain, 2)  # keep 10 %: trained for it, not one-shot from the reference
    r = run("multilevel", fx["ckpt"], "--keep", "0.3", "--method", "cram", "-o", tmp_path / "y.safetensors", ok=False)
    assert r.exit_code == 1 and "--method cram trains" in r.output
