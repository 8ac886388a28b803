"""A few hundred mutations of each kind of file lccompress reads (fixtures/fuzzing.py): byte flips,
truncations and metadata edits resealed with a valid checksum (ONNX edits too: `resealed_onnx`).
Only library errors may come out, and no flip or truncation may decode silently to other values.
(`benchmarks/fuzz.py --n 10000` is the long run.) Then the resealed edits that the readers
refuse because they would decode to other weights: a group or a multi-level parameter's entry
removed, a part or group dtype that its codec never writes."""

import random
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from lccompress import Codebook, LCError, Prune, Recipe, Rule, compress
from lccompress.artifact import ArtifactError, export_onnx, load, save
from lccompress.artifact.container import META_KEY
from lccompress.artifact.multilevel import META_KEY as ML_KEY
from lccompress.artifact.multilevel import build_levels, extract, save_multilevel
from lccompress.artifact.size import SEAL_KEY, load_onnx

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "fixtures"))
import fuzzing  # noqa: E402

def resealed_onnx(data: bytes, rng: random.Random) -> bytes:
    return fuzzing._edited_onnx(data, rng)


def files(d: Path) -> dict[str, Path]:
    """One compressed artifact, one multi-level file and one ONNX export of a small MLP."""
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(16, 12), torch.nn.ReLU(), torch.nn.Linear(12, 4))
    recipe = Recipe((Rule(("0.weight",), Codebook(k=4)), Rule(("2.weight",), Prune(keep=0.3))))
    r = compress(m, recipe, method="dc", device="cpu")
    save(d / "a.safetensors", r.model, r.thetas, r.groups, recipe=recipe)
    export_onnx(r.model, r.thetas, r.groups, torch.randn(2, 16), d / "a.onnx")
    save_multilevel(d / "m.safetensors", m, build_levels(m, ["0.weight", "2.weight"], [0.5, 0.2]))
    return {"artifact": d / "a.safetensors", "multilevel": d / "m.safetensors", "onnx": d / "a.onnx"}


def test_mutated_files_give_library_errors_only(tmp_path):
    counts = fuzzing.fuzz(files(tmp_path), 300, seed=1, work=tmp_path)
    examples = counts.pop("_examples")
    for kind, c in counts.items():
        assert c["tried"] == 300
        assert c["unhandled"] == 0 and c["different"] == 0, (kind, c, examples)
        assert c["rejected"] > 225, (kind, c)  # most mutations are caught, not read as they are


def test_the_unmutated_files_read_back_the_same(tmp_path):
    for kind, path in files(tmp_path).items():
        assert fuzzing.verdict(path, kind, fuzzing.READERS[kind](path))[0] == "same"


def test_onnx_edits_are_resealed_so_only_validation_can_catch_them(tmp_path):
    """Every edited ONNX file passes its seal (the old harness kept the original seal, so the
    checksum caught every edit and the resealed-edit row tested nothing)."""
    path = files(tmp_path)["onnx"]
    data, rng, target = path.read_bytes(), random.Random(3), tmp_path / "edited.onnx"
    for _ in range(60):
        target.write_bytes(resealed_onnx(data, rng))
        try:
            m = load_onnx(str(target))
        except ArtifactError as e:  # validation may refuse the edit, never the checksum
            assert "checksum" not in str(e), e
        else:
            assert {p.key for p in m.metadata_props} >= {META_KEY, SEAL_KEY}
    stale = onnx.load_from_string(fuzzing._edited_onnx(data, random.Random(5), reseal=False))
    target.write_bytes(stale.SerializeToString())
    if stale.SerializeToString() != data:
        with pytest.raises(ArtifactError, match="fails its checksum"):
            load_onnx(str(target))


def test_resealed_onnx_edits_are_refused_or_run_as_the_original(tmp_path):
    """Every ONNX file with a resealed edit that the readers accept runs in onnxruntime and
    computes what the original computes (the edit touched descriptive metadata only)."""
    import onnxruntime as ort

    path = files(tmp_path)["onnx"]
    x = np.random.default_rng(0).standard_normal((2, 16), dtype=np.float32)

    def run(p):
        s = ort.InferenceSession(str(p), providers=["CPUExecutionProvider"])
        return s.run(None, {s.get_inputs()[0].name: x})[0]

    want, data, rng, target = run(path), path.read_bytes(), random.Random(4), tmp_path / "edited.onnx"
    bad = []
    for i in range(200):
        target.write_bytes(resealed_onnx(data, rng))
        if fuzzing.verdict(target, "onnx", None)[0] == "rejected":
            continue
        try:
            same = np.array_equal(run(target), want)
        except Exception as e:  # noqa: BLE001 - onnxruntime refuses what the readers accepted
            same, why = False, f"onnxruntime: {str(e).splitlines()[0][:120]}"
        else:
            why = "other outputs"
        if not same:
            bad.append(f"#{i}: {why}")
    assert not bad, bad


# ----------------------------------------------------------------------------- resealed edits refused
def _reseal(path: Path, key: str, edit) -> None:
    path.write_bytes(fuzzing.resealed(path.read_bytes(), key, edit))


def _refused(path: Path, match: str, read=load) -> str:
    with pytest.raises(ArtifactError, match=match) as e:
        read(path)
    assert "\n" not in str(e.value)
    return str(e.value)


@pytest.mark.parametrize("group", ["0.weight", "2.weight"])
def test_a_removed_group_is_refused_not_read_as_dense_tensors(tmp_path, group):
    path = files(tmp_path)["artifact"]
    sd = load(path).state_dict
    assert group in sd and f"{group}.codes" not in sd
    _reseal(path, META_KEY, lambda m: m["groups"].pop(group))
    msg = _refused(path, "tensors are not part of any group, the manifest counts 2 dense")
    assert f"{group}." in msg  # names the orphaned part tensors


@pytest.mark.parametrize("param", ["0.weight", "2.weight"])
def test_a_removed_multilevel_parameter_is_refused(tmp_path, param):
    path = files(tmp_path)["multilevel"]
    assert param in extract(path, 1)
    _reseal(path, ML_KEY, lambda m: m["params"].pop(param))
    _refused(path, f"belong to no parameter.*counts 2 dense.*{param}", lambda p: extract(p, 1))


@pytest.mark.parametrize("dense", [3, 1, "2", None, True])
def test_the_dense_count_itself_is_checked(tmp_path, dense):
    path = files(tmp_path)["artifact"]
    _reseal(path, META_KEY, lambda m: m.update(dense=dense))
    if dense is None:  # as in files written before the count: not checked
        assert load(path).state_dict.keys() == {"0.weight", "0.bias", "2.weight", "2.bias"}
    else:
        _refused(path, "not part of any group")


def test_files_without_the_dense_count_still_read(tmp_path):
    path = files(tmp_path)["artifact"]
    want = {k: v.clone() for k, v in load(path).state_dict.items()}  # not views of the file rewritten below
    _reseal(path, META_KEY, lambda m: m.pop("dense"))
    got = load(path).state_dict
    assert all(torch.equal(got[k], v) for k, v in want.items())
    mpath = files(tmp_path)["multilevel"]
    want = {k: v.clone() for k, v in extract(mpath, 2).items()}
    _reseal(mpath, ML_KEY, lambda m: m.pop("dense"))
    assert all(torch.equal(extract(mpath, 2)[k], v) for k, v in want.items())


@pytest.mark.parametrize("group,part,dtype,match", [
    ("0.weight", None, "int8", "has dtype int8; compressed parameters are floating point"),
    ("2.weight", None, "int64", "has dtype int64; compressed parameters are floating point"),
    ("0.weight", "codes", "float32", "is bitpack-encoded, which holds integers, but the manifest gives it dtype float32"),
    ("2.weight", "indices", "bfloat16", "is mask-encoded, which holds integers, but the manifest gives it dtype bfloat16"),
    ("2.weight", "indices", "bool", "is mask-encoded, which holds integers, but the manifest gives it dtype bool"),
    ("0.weight", "codes", "qint8", "is bitpack-encoded, which holds integers, but the manifest gives it dtype qint8"),
])
def test_a_dtype_no_codec_writes_is_refused(tmp_path, group, part, dtype, match):
    path = files(tmp_path)["artifact"]

    def edit(m):
        e = m["groups"][group]
        (e["parts"][part] if part else e)["dtype"] = dtype
    _reseal(path, META_KEY, edit)
    _refused(path, match)


def _wide_codebook(d: Path) -> Path:
    """A 20×40 layer quantized to 200 entries: its codes run to 199, stored at 8 bits as uint8."""
    torch.manual_seed(0)
    m = torch.nn.Linear(40, 20)
    recipe = Recipe.single("weight", Codebook(k=200))
    r = compress(m, recipe, method="dc", device="cpu")
    save(d / "w.safetensors", r.model, r.thetas, r.groups, recipe=recipe)
    return d / "w.safetensors"


@pytest.mark.parametrize("dtype,ok", [("int8", False), ("int16", True), ("int64", True)])
def test_codes_in_a_dtype_too_narrow_are_refused_not_wrapped(tmp_path, dtype, ok):
    """Codes up to 199 read with a manifest dtype of int8 would wrap around to negative codes, which
    index the codebook from its end: other weights, silently. A dtype that holds them decodes
    the same weights (only θ's dtype differs)."""
    path = _wide_codebook(tmp_path)
    art = load(path)
    want, codes = art.state_dict["weight"].clone(), art.thetas["weight"]["codes"]
    assert codes.dtype == torch.uint8 and int(codes.max()) > 127

    def edit(m):
        m["groups"]["weight"]["parts"]["codes"]["dtype"] = dtype
    _reseal(path, META_KEY, edit)
    if ok:
        art = load(path)
        assert torch.equal(art.state_dict["weight"], want) and art.thetas["weight"]["codes"].dtype == getattr(torch, dtype)
    else:
        _refused(path, f"'weight.codes' holds values up to {int(codes.max())}, which its manifest dtype {dtype} "
                       "cannot hold")


@pytest.mark.parametrize("params", ["x", "2.weight"])
def test_params_that_are_not_a_list_are_refused(tmp_path, params):
    """A string where the list of parameter names belongs would be read as one name per character
    ("x" → the weights stored as parameter "x")."""
    path = files(tmp_path)["artifact"]
    _reseal(path, META_KEY, lambda m: m["groups"]["2.weight"].update(params=params))
    _refused(path, f"group '2.weight': params {params!r} and shapes .* are not lists")


def test_every_refusal_is_a_library_error(tmp_path):
    path = files(tmp_path)["artifact"]
    _reseal(path, META_KEY, lambda m: m["groups"]["2.weight"]["parts"].update(values={}))
    with pytest.raises(LCError, match=r"'2\.weight\.values' has manifest entry \{\}, without the encoding and dtype"):
        load(path)
