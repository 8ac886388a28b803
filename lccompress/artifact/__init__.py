"""Deployable artifacts: a compressed safetensors container, exact sizes, ONNX export.

    save(path, model, thetas, groups)     θ in compact encodings + dense tensors + manifest
    load(path) → Artifact                 thetas, groups, state_dict (compressed params = Δ(θ))
    load_into_(model, path)               fill a model; optionally split low-rank layers
    size_report(path | thetas, groups)    stored bits per group, header and file bytes
    export_onnx(model, thetas, groups, x, path) and verify_onnx(path, model, x)
    multilevel                            nested sparsity levels in one file (build, save, extract)

Formats only: they take θ and groups, and know nothing of training.
"""

from .container import Artifact, ArtifactError, load, load_into_, save, split_lowrank_
from .onnx_export import export_onnx, verify_onnx
from .size import GroupSize, SizeReport, disk_bytes, size_report

__all__ = [
    "Artifact", "ArtifactError", "GroupSize", "SizeReport", "disk_bytes", "export_onnx", "load", "load_into_",
    "save", "size_report", "split_lowrank_", "verify_onnx",
]
