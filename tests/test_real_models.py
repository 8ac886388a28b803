"""Real architectures end to end (fixtures/realnets.py, built from configs, nothing downloads): a
Hugging Face GPT-2 LM (dict batches, Conv1D, tied embeddings) and BERT classifier, an LSTM + GRU
tagger and a TorchScript module with an extra int argument — each through DC and a short LC,
saved and reloaded bit for bit, exported to ONNX and checked in onnxruntime at another batch size
and sequence length than the example's."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lccompress import Codebook, Prune, Recipe, api
from lccompress.artifact import load, load_into_, verify_onnx
from lccompress.modelio import Inputs

pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[1]
NETS = ROOT / "fixtures" / "realnets.py"
sys.path.insert(0, str(ROOT / "fixtures"))
import realnets  # noqa: E402

FAST = dict(steps=2, epochs=1, first_epochs=1)

# name → (factory, metric the report should pick, expected targets (subset), inputs of another shape)
ARCH = {
    "gpt2": ("perplexity", {"transformer.wte.weight", "transformer.h.0.attn.c_attn.weight", "transformer.h.1.mlp.c_proj.weight"},
             lambda: Inputs((), {"input_ids": realnets._tokens(3, 7)[:, :11], "attention_mask": torch.ones(3, 11, dtype=torch.long)})),
    "bert": ("accuracy", {"bert.embeddings.word_embeddings.weight", "bert.encoder.layer.0.attention.self.query.weight", "classifier.weight"},
             lambda: Inputs((), {"input_ids": realnets._tokens(3, 7)[:, :11], "attention_mask": torch.ones(3, 11, dtype=torch.long)})),
    "tagger": ("accuracy", {"emb.weight", "lstm.weight_ih_l0", "lstm.weight_hh_l0_reverse", "gru.weight_hh_l0", "out.weight"},
               lambda: Inputs((realnets._tokens(3, 7)[:, :11],))),
    "audio": ("accuracy", {"conv.weight", "fc.weight"},
              lambda: Inputs((torch.randn(3, 57, generator=torch.Generator().manual_seed(3)), 16000))),
}


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """A checkpoint of each architecture as people save them: state_dicts, a TorchScript archive."""
    d = tmp_path_factory.mktemp("real")
    out = {}
    for name in ("gpt2", "bert", "tagger"):
        out[name] = d / f"{name}.pt"
        torch.save(getattr(realnets, name)().state_dict(), out[name])
    out["audio"] = d / "audio.pt"
    torch.jit.save(realnets.audio(), out["audio"])
    return out


def _job(name, ckpt, out, scheme, data=True, **kw):
    return api.CompressJob(checkpoint=str(ckpt), build_recipe=lambda names: Recipe.single(names, scheme),
                           out=str(out), model_spec=None if name == "audio" else f"{NETS}:{name}",
                           data_spec=f"{NETS}:{name}_data" if data else None, argv=[], **FAST, **kw)


def _fresh(name):
    return realnets.audio() if name == "audio" else getattr(realnets, name)()


def _same(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize("name", list(ARCH))
def test_dc_and_lc_save_reload_bit_for_bit_and_export_at_other_shapes(name, ckpts, tmp_path):
    metric, targets, other = ARCH[name]
    # DC, no data: every default target compressed
    dc = api.compress_checkpoint(_job(name, ckpts[name], tmp_path / "dc.safetensors", Codebook(k=4), data=False))
    names = {p for g in dc.result.groups for p in g.params}
    assert targets <= names, sorted(names)
    _same(load_into_(_fresh(name), dc.artifact), dc.result.model)
    # a short LC: the metric follows the loss, with its own unit; the artifact reloads bit for bit
    lc = api.compress_checkpoint(_job(name, ckpts[name], tmp_path / "lc.safetensors", Prune(keep=0.3)))
    m = lc.report["metric"]
    assert m["name"] == metric and m["unit"] == ("%" if metric == "accuracy" else "")
    assert m["reference"] is not None and m["compressed"] is not None
    _same(load_into_(_fresh(name), lc.artifact), lc.result.model)
    art = load(lc.artifact)
    for g in art.groups:  # each layer keeps 30 % of its weights (they are nonzero after LC)
        assert sum(int((art.state_dict[p] != 0).sum()) for p in g.params) == round(0.3 * g.shape.numel())
    # ONNX from the real eval batch (or --example), checked at another batch size and length
    onnx = tmp_path / "lc.onnx"
    extra = {"example": f"{NETS}:audio_example"} if name == "audio" else {"data_spec": f"{NETS}:{name}_data"}
    model_spec = f"{NETS}:audio" if name == "audio" else f"{NETS}:{name}"
    r = api.export(str(lc.artifact), str(onnx), model_spec, **extra)
    assert r.max_rel < 1e-4
    model = load_into_(_fresh(name), lc.artifact)
    assert verify_onnx(onnx, model, other())["max_rel"] < 1e-4
    assert r.bytes < 1.2 * sum(t.numel() * 4 for t in model.state_dict().values()) + 200_000


def test_tied_embedding_is_compressed_once_and_stays_tied(ckpts, tmp_path):
    out = tmp_path / "g.safetensors"
    res = api.compress_checkpoint(_job("gpt2", ckpts["gpt2"], out, Codebook(k=4), data=False))
    names = [p for g in res.result.groups for p in g.params]
    assert "transformer.wte.weight" in names and "lm_head.weight" not in names
    art = load(out)
    assert art.manifest["aliases"] == {"lm_head.weight": "transformer.wte.weight"}
    from safetensors import safe_open
    with safe_open(str(out), "pt") as f:
        assert "lm_head.weight" not in f.keys()  # stored once
    model = load_into_(realnets.gpt2(), out)
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()
    assert torch.equal(model.lm_head.weight, res.result.model.transformer.wte.weight)
    rows = {r["name"]: r for r in api.inspect(str(out)).layers}
    assert rows["lm_head.weight"]["scheme"] == "tied" and rows["lm_head.weight"]["bytes"] == 0
    # in ONNX the embedding is decoded once and the output layer uses it: no dense copy of it anywhere
    import onnx
    from onnx import numpy_helper

    path = tmp_path / "g.onnx"
    r = api.export(str(out), str(path), f"{NETS}:gpt2", data_spec=f"{NETS}:gpt2_data")
    assert r.max_rel < 1e-4
    big = [t.name for t in onnx.load(str(path)).graph.initializer
           if numpy_helper.to_array(t).size >= realnets.V * 32 and numpy_helper.to_array(t).dtype.kind == "f"]
    assert big == []


def test_hugging_face_defaults_pick_the_models_own_loss_and_perplexity(tmp_path):
    from lccompress.modelio import Perplexity, split_batch

    model, data = realnets.gpt2().eval(), realnets.gpt2_data(16)
    d, loss, metric = api.make_task(model, data)
    assert loss.own and isinstance(metric, Perplexity) and metric.shift == 1
    # perplexity from the logits (shifted as the model shifts) equals exp of the model's own mean loss
    x, y = split_batch(data["eval"][0])
    with torch.no_grad():
        out = x(model, y)
    assert metric.compute([(out, y)]) == pytest.approx(float(torch.exp(out.loss)), rel=1e-5)


def test_an_int_argument_is_baked_into_the_graph(ckpts, tmp_path):
    import onnx

    art = tmp_path / "a.safetensors"
    api.compress_checkpoint(_job("audio", ckpts["audio"], art, Codebook(k=4), data=False))
    r = api.export(str(art), str(tmp_path / "a.onnx"), f"{NETS}:audio", example=f"{NETS}:audio_example")
    assert r.max_rel < 1e-4
    graph = onnx.load(str(tmp_path / "a.onnx")).graph
    assert [i.name for i in graph.input] == ["x"]  # sr is a constant, x named after the forward's parameter
    dims = graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param == "batch" and dims[1].dim_param == "seq"  # the model runs at any length


def test_input_option_gives_names_dtypes_and_dynamic_axes(ckpts, tmp_path):
    import onnx

    art = tmp_path / "b.safetensors"
    api.compress_checkpoint(_job("bert", ckpts["bert"], art, Prune(keep=0.5), data=False))
    onnx_path = tmp_path / "b.onnx"
    api.export(str(art), str(onnx_path), f"{NETS}:bert",
               inputs=["input_ids:batch=2,seq=12:int64", "attention_mask:batch=2,seq=12:int64"])
    g = onnx.load(str(onnx_path)).graph
    assert [i.name for i in g.input] == ["input_ids", "attention_mask"]
    assert all(i.type.tensor_type.elem_type == onnx.TensorProto.INT64 for i in g.input)
    model = load_into_(realnets.bert(), art)
    assert verify_onnx(onnx_path, model, ARCH["bert"][2]())["max_rel"] < 1e-4


def test_cli_compresses_a_hugging_face_model_to_onnx(ckpts, tmp_path):
    from click.testing import CliRunner

    from lccompress.cli import main

    out, rep = tmp_path / "g.onnx", tmp_path / "g.json"
    r = CliRunner().invoke(main, ["quantize", str(ckpts["gpt2"]), "--codebook", "4", "--model", f"{NETS}:gpt2",
                                  "--data", f"{NETS}:gpt2_data", "--steps", "2", "--epochs", "1", "--first-epochs",
                                  "1", "-o", str(out), "--report", str(rep)])
    assert r.exit_code == 0, r.output
    report = json.loads(rep.read_text())
    assert report["metric"]["name"] == "perplexity" and "perplexity (lower is better)" in r.output
    assert report["metric"]["onnx"] == pytest.approx(report["metric"]["compressed"], rel=1e-3)


def test_mse_loss_defaults_to_a_regression_metric(tmp_path):
    """--loss mse on vector targets gets cosine (not accuracy, which cannot apply) before training."""
    from lccompress.modelio import Cosine

    torch.manual_seed(0)
    model = torch.nn.Linear(6, 4)
    x = torch.randn(16, 6)
    data = {"train": [(x, x[:, :4])], "eval": [(x, x[:, :4])]}
    _, loss, metric = api.make_task(model, data, loss="mse")
    assert loss.name == "mse" and isinstance(metric, Cosine)
    with pytest.raises(api.ConfigError, match="accuracy needs integer class targets"):
        api.make_task(model, data, loss="mse", metric="accuracy")


def test_fp16_checkpoint_stays_fp16(tmp_path):
    ck = tmp_path / "t16.pt"
    torch.save({k: v.half() for k, v in realnets.tagger().state_dict().items()}, ck)
    out = tmp_path / "t16.safetensors"
    res = api.compress_checkpoint(_job("tagger", ck, out, Codebook(k=4), data=False))
    sd = load(out).state_dict
    assert all(v.dtype == torch.float16 for v in sd.values() if v.is_floating_point())
    half = load_into_(realnets.tagger().half(), out)
    _same(half, res.result.model)
    out32 = tmp_path / "t32.safetensors"
    api.compress_checkpoint(_job("tagger", ck, out32, Codebook(k=4), data=False, dtype="float32"))
    assert all(v.dtype == torch.float32 for v in load(out32).state_dict.values() if v.is_floating_point())
    dense = sum(v.numel() for k, v in realnets.tagger().state_dict().items()
                if k not in {p for g in res.result.groups for p in g.params})
    assert out32.stat().st_size - out.stat().st_size >= 2 * dense  # 2 bytes saved per dense weight at least


def test_prefixed_and_nested_checkpoints(tmp_path):
    sd = realnets.tagger().state_dict()
    torch.save({f"module._orig_mod.{k}": v for k, v in sd.items()}, tmp_path / "p.pt")
    notes = []
    cb = api.Callbacks(info=notes.append)
    job = _job("tagger", tmp_path / "p.pt", tmp_path / "p.safetensors", Codebook(k=2), data=False)
    api.compress_checkpoint(job, cb)
    assert any("stripped the prefix 'module._orig_mod.'" in n for n in notes)
    torch.save({"net": sd, "ema": sd, "step": 3}, tmp_path / "n.pt")
    with pytest.raises(api.CheckpointError, match=r"\['net'\] \(\d+ tensors\), \['ema'\]"):
        api.compress_checkpoint(_job("tagger", tmp_path / "n.pt", tmp_path / "n.safetensors", Codebook(k=2),
                                     data=False))


def test_trusted_pickle_finds_its_class_in_the_working_directory(tmp_path):
    (tmp_path / "mynet.py").write_text("import torch\nclass Net(torch.nn.Module):\n"
                                       "    def __init__(self):\n        super().__init__()\n"
                                       "        self.fc = torch.nn.Linear(4, 3)\n"
                                       "    def forward(self, x):\n        return self.fc(x)\n")
    code = ("import torch, mynet; torch.save(mynet.Net(), 'whole.pt')")
    subprocess.run([sys.executable, "-c", code], cwd=tmp_path, check=True)
    r = subprocess.run([sys.executable, "-m", "lccompress", "prune", "whole.pt", "--keep", "0.5",
                        "--trust-checkpoint", "-o", "w.safetensors"], cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "w.safetensors").exists()
