"""Model outputs and the layers around them: `--output NAME` picks the output that training,
evaluation and export use (checked against accuracy computed by hand); nn.MultiheadAttention's
projections are default targets, pruned exactly and exported to an ONNX graph that onnxruntime
runs like torch at other batch sizes and lengths; an unexportable model is one line and nothing
from torch."""

import importlib.util
import json
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner
from torch import nn

from lccompress import Prune, Recipe, api
from lccompress.artifact import load, load_into_, verify_onnx
from lccompress.artifact.onnx_export import _mha_forward, export_onnx
from lccompress.cli import main
from lccompress.modelio import Inputs


def run(*args, ok=True):
    r = CliRunner().invoke(main, [str(a) for a in args])
    if ok:
        assert r.exit_code == 0, (r.output, r.exception)
    return r


def _module(path, name):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


FAST = ["--steps", "2", "--epochs", "2", "--first-epochs", "2", "--lr", "0.05"]

# ----------------------------------------------------------------------------- --output NAME
TWO_HEADS = '''
import torch
from torch import nn


class TwoHeads(nn.Module):
    """{"aux": −scores, "scores": class scores}: "aux" comes first (what the default picks), and
    training or evaluating on it is the opposite of training or evaluating on "scores"."""

    def __init__(self):
        super().__init__()
        self.body = nn.Linear(6, 16)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        s = self.head(torch.relu(self.body(x)))
        return {"aux": -s, "scores": s}


def make():
    return TwoHeads()


def _xy(seed, n):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g)
    return x, (x[:, 0] + x[:, 1] > 0).long() + (x[:, 2] > 1).long()


def loaders():
    x, y = _xy(0, 256)
    xe, ye = _xy(1, 128)
    return {"train": [(x[i:i + 32], y[i:i + 32]) for i in range(0, 256, 32)],
            "eval": [(xe[i:i + 32], ye[i:i + 32]) for i in range(0, 128, 32)]}
'''


@pytest.fixture(scope="module")
def two_heads(tmp_path_factory):
    """net.py (TwoHeads, its data) and a checkpoint trained on "scores"."""
    d = tmp_path_factory.mktemp("two_heads")
    (d / "net.py").write_text(TWO_HEADS)
    net = _module(d / "net.py", "two_heads_net")
    torch.manual_seed(0)
    model = net.make()
    opt = torch.optim.Adam(model.parameters(), 0.02)
    for _ in range(30):
        for x, y in net.loaders()["train"]:
            opt.zero_grad()
            nn.functional.cross_entropy(model(x)["scores"], y).backward()
            opt.step()
    torch.save(model.state_dict(), d / "ref.pt")
    return {"dir": d, "net": net, "ckpt": d / "ref.pt", "model": f"{d / 'net.py'}:make",
            "data": f"{d / 'net.py'}:loaders"}


def _accuracy(model, net, key):
    """Accuracy on the eval set of the output `key`, by hand."""
    hits = total = 0
    with torch.no_grad():
        for x, y in net.loaders()["eval"]:
            hits += int((model.eval()(x)[key].argmax(1) == y).sum())
            total += len(y)
    return hits / total


def test_output_option_picks_the_output_that_training_evaluation_and_export_use(two_heads, tmp_path):
    net = two_heads["net"]
    ref = net.make()
    ref.load_state_dict(torch.load(two_heads["ckpt"], weights_only=True))
    ref_scores, ref_aux = _accuracy(ref, net, "scores"), _accuracy(ref, net, "aux")
    assert ref_scores > 0.85 and ref_aux < 0.2  # the outputs disagree: picking the wrong one shows

    common = [two_heads["ckpt"], "--keep", "0.5", "--model", two_heads["model"], "--data", two_heads["data"],
              "--metric", "accuracy", *FAST]
    # --output scores: trained and evaluated on scores; the report's accuracies are the hand-computed ones
    art, rep = tmp_path / "s.safetensors", tmp_path / "s.json"
    run("prune", *common, "--output", "scores", "-o", art, "--report", rep)
    m = json.loads(rep.read_text())["metric"]
    got = load_into_(net.make(), art)
    assert m["name"] == "accuracy"
    assert m["reference"] == pytest.approx(ref_scores, abs=1e-12)
    assert m["compressed"] == pytest.approx(_accuracy(got, net, "scores"), abs=1e-12)
    assert m["compressed"] > 0.8  # trained on scores, they stay right

    # without it the first tensor, "aux", is trained and evaluated: the scores are trained wrong
    art0, rep0 = tmp_path / "d.safetensors", tmp_path / "d.json"
    run("prune", *common, "-o", art0, "--report", rep0)
    m0 = json.loads(rep0.read_text())["metric"]
    got0 = load_into_(net.make(), art0)
    assert m0["reference"] == pytest.approx(ref_aux, abs=1e-12)
    assert m0["compressed"] == pytest.approx(_accuracy(got0, net, "aux"), abs=1e-12)
    assert _accuracy(got0, net, "scores") < m["compressed"] - 0.3

    # check evaluates the named output too
    r = run("check", art, "--max-drop", "1", "--reference", two_heads["ckpt"], "--model", two_heads["model"],
            "--data", two_heads["data"], "--output", "scores", "--json")
    drop = json.loads(r.output)["checks"][0]
    assert drop["reference"] == pytest.approx(ref_scores, abs=1e-12)
    assert drop["compressed"] == pytest.approx(_accuracy(got, net, "scores"), abs=1e-12)

    # export keeps that output alone, under its name; onnxruntime's accuracy is the hand-computed one
    import onnxruntime as ort

    path = tmp_path / "s.onnx"
    run("export", art, "--onnx", path, "--model", two_heads["model"], "--data", two_heads["data"],
        "--output", "scores")
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [o.name for o in sess.get_outputs()] == ["scores"]
    hits = total = 0
    for x, y in net.loaders()["eval"]:
        (o,) = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})
        hits += int((torch.from_numpy(o).argmax(1) == y).sum())
        total += len(y)
    assert hits / total == _accuracy(got, net, "scores")


def test_output_option_takes_an_index_of_a_tuple(two_heads, tmp_path):
    """A tuple output (aux, scores): `--output 1` is the second."""
    (tmp_path / "tup.py").write_text(
        f"import sys\nsys.path.insert(0, {str(two_heads['dir'])!r})\nimport torch\nfrom net import TwoHeads\n"
        "class Tup(TwoHeads):\n    def forward(self, x):\n        o = super().forward(x)\n"
        "        return o['aux'], o['scores']\n"
        "def make():\n    return Tup()\n")
    art, rep = tmp_path / "t.safetensors", tmp_path / "t.json"
    run("prune", two_heads["ckpt"], "--keep", "0.5", "--model", f"{tmp_path / 'tup.py'}:make", "--data",
        two_heads["data"], "--output", "1", "--metric", "accuracy", *FAST, "-o", art, "--report", rep)
    m = json.loads(rep.read_text())["metric"]
    net = two_heads["net"]
    ref = net.make()
    ref.load_state_dict(torch.load(two_heads["ckpt"], weights_only=True))
    assert m["reference"] == pytest.approx(_accuracy(ref, net, "scores"), abs=1e-12)
    assert m["compressed"] == pytest.approx(_accuracy(load_into_(net.make(), art), net, "scores"), abs=1e-12)
    bad = run("prune", two_heads["ckpt"], "--keep", "0.5", "--model", f"{tmp_path / 'tup.py'}:make", "--data",
              two_heads["data"], "--output", "logits", *FAST, "-o", tmp_path / "b.safetensors", ok=False)
    assert bad.exit_code == 1 and "--output 'logits'" in bad.output and "indices 0 … 1" in bad.output
    assert not (tmp_path / "b.safetensors").exists()


# ----------------------------------------------------------------------------- nn.MultiheadAttention
ATTN = '''
import torch
from torch import nn


class AttnNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        h, _ = self.attn(x, x, x)
        return self.head(h.mean(1))


class Encoder(nn.Module):
    """Token ids and a padding mask through a two-layer nn.TransformerEncoder."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, 16)
        layer = nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(16, 3)

    def forward(self, input_ids, attention_mask):
        return self.head(self.enc(self.emb(input_ids), src_key_padding_mask=attention_mask == 0)[:, 0])


def make():
    torch.manual_seed(0)
    return AttnNet()


def encoder():
    torch.manual_seed(0)
    return Encoder()
'''


@pytest.fixture(scope="module")
def attn(tmp_path_factory):
    d = tmp_path_factory.mktemp("attn")
    (d / "attn.py").write_text(ATTN)
    return d, _module(d / "attn.py", "attn_net")


def test_multihead_attention_projections_are_default_targets(attn):
    _, net = attn
    assert api.default_targets(net.make(), True) == ["attn.in_proj_weight", "attn.out_proj.weight", "head.weight"]
    separate = nn.MultiheadAttention(8, 2, kdim=5, vdim=6)  # q/k/v projections of their own
    assert api.default_targets(separate, True) == ["q_proj_weight", "k_proj_weight", "v_proj_weight",
                                                   "out_proj.weight"]


def test_multihead_attention_is_pruned_exactly_and_exports_at_other_shapes(attn, tmp_path):
    d, net = attn
    ref = net.make()
    torch.save(ref.state_dict(), tmp_path / "a.pt")
    art = tmp_path / "a.safetensors"
    job = api.CompressJob(checkpoint=str(tmp_path / "a.pt"), out=str(art), model_spec=f"{d / 'attn.py'}:make",
                          build_recipe=lambda names: Recipe.single(names, Prune(keep=0.25)), argv=[])
    api.compress_checkpoint(job)
    sd = load(art).state_dict
    # per layer, the 25 % largest weights kept (torch.topk), the rest zero; biases untouched
    for name, n in (("attn.in_proj_weight", 192), ("attn.out_proj.weight", 64), ("head.weight", 24)):
        w, w0 = sd[name], ref.state_dict()[name]
        assert w.numel() == n and int((w != 0).sum()) == n // 4
        top = set(torch.topk(w0.abs().reshape(-1), n // 4).indices.tolist())
        assert set(w.reshape(-1).nonzero().reshape(-1).tolist()) == top
        assert torch.equal(w.reshape(-1)[list(top)], w0.reshape(-1)[list(top)])
    for name in ("attn.in_proj_bias", "attn.out_proj.bias", "head.bias"):
        assert torch.equal(sd[name], ref.state_dict()[name])
    # ONNX: onnxruntime against torch at the example's shape and at other batch sizes and lengths
    import onnx

    path = tmp_path / "a.onnx"
    r = api.export(str(art), str(path), f"{d / 'attn.py'}:make", input_shape="2,5,8")
    assert r.max_rel < 1e-5
    model = load_into_(net.make(), art)
    g = torch.Generator().manual_seed(1)
    for shape in ((3, 7, 8), (1, 2, 8), (4, 5, 8)):
        assert verify_onnx(path, model, torch.randn(*shape, generator=g))["max_rel"] < 1e-5, shape
    inits = {t.name for t in onnx.load(str(path)).graph.initializer}
    assert "model.attn.in_proj_weight" not in inits  # decoded from the compact form, not stored dense


def test_a_transformer_encoder_with_a_padding_mask_exports_at_other_lengths(attn, tmp_path):
    """torch's own MultiheadAttention forward exports with the example's length baked in
    (pytorch/pytorch#120075); the exported graph must run at any length."""
    _, net = attn
    model = net.encoder().eval()

    def batch(n, length, seed):
        g = torch.Generator().manual_seed(seed)
        ids = torch.randint(0, 20, (n, length), generator=g)
        mask = torch.ones(n, length, dtype=torch.long)
        mask[0, length // 2:] = 0
        return Inputs((), {"input_ids": ids, "attention_mask": mask})

    export_onnx(model, {}, [], batch(2, 6, 0), tmp_path / "e.onnx")
    for n, length in ((2, 6), (3, 9), (1, 3)):
        assert verify_onnx(tmp_path / "e.onnx", model, batch(n, length, n))["max_rel"] < 1e-5, (n, length)


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("masks", ["none", "bool", "float"])
@pytest.mark.parametrize("need_weights,average", [(True, True), (True, False), (False, True)])
def test_exported_attention_computes_what_torch_computes(batch_first, masks, need_weights, average):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(8, 2, batch_first=batch_first, kdim=5, vdim=6).eval() if masks == "float" \
        else nn.MultiheadAttention(8, 2, batch_first=batch_first).eval()
    N, L, S = 3, 4, 6
    q = torch.randn(N, L, 8) if batch_first else torch.randn(L, N, 8)
    k = torch.randn(N, S, mha.kdim) if batch_first else torch.randn(S, N, mha.kdim)
    v = torch.randn(N, S, mha.vdim) if batch_first else torch.randn(S, N, mha.vdim)
    kw = {"need_weights": need_weights, "average_attn_weights": average}
    if masks == "bool":
        kw["key_padding_mask"] = torch.zeros(N, S, dtype=torch.bool)
        kw["key_padding_mask"][0, 4:] = True
        kw["attn_mask"] = torch.rand(L, S) > 0.8
        kw["attn_mask"][:, 0] = False  # every query attends to something
    elif masks == "float":
        kw["key_padding_mask"] = torch.randn(N, S)
        kw["attn_mask"] = torch.randn(N * 2, L, S)
    with torch.no_grad():
        want = mha(q, k, v, **kw)
        got = _mha_forward(mha, q, k, v, **kw)
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-6)
    if need_weights:
        torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=1e-6)
    else:
        assert got[1] is None and want[1] is None


# ----------------------------------------------------------------------------- unexportable models
EIG = '''
import torch


class Eig(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(4, 4)

    def forward(self, x):
        h = self.fc(x)
        return torch.linalg.eigvalsh(h.T @ h).unsqueeze(0).expand(x.shape[0], -1)


def make():
    torch.manual_seed(0)
    return Eig()
'''


def test_an_unexportable_model_is_one_line_naming_the_operator_and_nothing_from_torch(tmp_path):
    (tmp_path / "eig.py").write_text(EIG)
    torch.save(_module(tmp_path / "eig.py", "eig_net").make().state_dict(), tmp_path / "e.pt")
    run("prune", tmp_path / "e.pt", "--keep", "0.5", "-o", tmp_path / "e.safetensors")
    r = subprocess.run([sys.executable, "-m", "lccompress", "export", "e.safetensors", "--onnx", "e.onnx",
                        "--model", "eig.py:make", "--input-shape", "2,4"], cwd=tmp_path, capture_output=True,
                       text=True)
    assert r.returncode == 1
    assert r.stdout == ""  # torch's "Torch IR graph at exception" dump went to stdout
    assert r.stderr.splitlines() == ["Error: ONNX export failed: Exporting the operator 'aten::linalg_eigvalsh' "
                                     "to ONNX opset version 18 is not supported"]
    assert not (tmp_path / "e.onnx").exists()
    # the same through prune -o .onnx: no output file, stdout empty, the error the last line
    r = subprocess.run([sys.executable, "-m", "lccompress", "prune", "e.pt", "--keep", "0.5", "--model",
                        "eig.py:make", "--input-shape", "2,4", "-o", "p.onnx"], cwd=tmp_path,
                       capture_output=True, text=True)
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr.splitlines()[-1].startswith("Error: ONNX export failed: Exporting the operator "
                                                "'aten::linalg_eigvalsh'")
    assert "Torch IR" not in r.stderr and not (tmp_path / "p.onnx").exists()


class _Chatty(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        if torch.onnx.is_in_onnx_export():
            print("the model speaks while it is exported")
        return self.fc(x)


def test_a_successful_export_passes_what_was_printed_on_and_leaves_torchs_log_off(tmp_path, capfd):
    log = torch._C._jit_is_onnx_log_enabled()
    export_onnx(_Chatty(), {}, [], torch.randn(2, 4), tmp_path / "c.onnx")
    out, _ = capfd.readouterr()
    assert out == "the model speaks while it is exported\n"
    assert torch._C._jit_is_onnx_log_enabled() == log  # torch's exporter turns its log on and leaves it on
    net = _module_from_text(tmp_path, EIG, "eig_again")
    with pytest.raises(api.ConfigError, match="aten::linalg_eigvalsh"):
        export_onnx(net.make(), {}, [], torch.randn(2, 4), tmp_path / "e.onnx")
    out, err = capfd.readouterr()
    assert out == "" and "Torch IR" not in err


def _module_from_text(d, text, name):
    (d / f"{name}.py").write_text(text)
    return _module(d / f"{name}.py", name)
