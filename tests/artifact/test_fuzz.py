"""A few hundred mutations of each kind of file lccompress reads (fixtures/fuzzing.py): byte flips,
truncations and metadata edits resealed with a valid checksum. Only library errors may come out,
and no flip or truncation may decode silently to other values. (`benchmarks/fuzz.py --n 10000`
is the long run.)"""

import sys
from pathlib import Path

import torch

from lccompress import Codebook, Prune, Recipe, Rule, compress
from lccompress.artifact import export_onnx, save
from lccompress.artifact.multilevel import build_levels, save_multilevel

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "fixtures"))
import fuzzing  # noqa: E402


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
        assert c["rejected"] > 250, (kind, c)  # most mutations are caught, not read as they are


def test_the_unmutated_files_read_back_the_same(tmp_path):
    for kind, path in files(tmp_path).items():
        assert fuzzing.verdict(path, kind, fuzzing.READERS[kind](path))[0] == "same"
