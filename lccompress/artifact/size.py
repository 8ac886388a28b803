"""Exact size accounting: θ bits as stored in the container encoding, and bytes on disk.

For a .safetensors artifact  file bytes = header (8 + JSON incl. manifest) + Σ tensor bytes,
with each group's stored bits = 8·Σ bytes of its `<group>.<part>` tensors. For an ONNX file
written by `export_onnx` the groups' initializers are named in its metadata, and the file
bytes include external data files (`.onnx.data`) when there are any.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass
from typing import Any, Mapping

import onnx
import torch
from torch import Tensor

from ..recipe import Group
from .container import META_KEY, ArtifactError, encode_theta, read_manifest

_DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "I16": 2, "F16": 2, "BF16": 2,
                "U32": 4, "I32": 4, "F32": 4, "U64": 8, "I64": 8, "F64": 8, "C64": 8}


@dataclass(frozen=True)
class GroupSize:
    """One group: dense bits (numel × dtype bits), the scheme's own count `scheme.bits(θ)`, and
    the bits of θ as actually stored (8 × bytes of its tensors, after encoding)."""

    name: str
    params: tuple[str, ...]
    scheme: str
    numel: int
    dense_bits: int
    scheme_bits: int
    stored_bits: int
    encodings: dict[str, str]

    @property
    def ratio(self) -> float:
        """Dense bits / stored bits."""
        return self.dense_bits / max(1, self.stored_bits)


@dataclass(frozen=True)
class SizeReport:
    """Per group and total sizes; `header_bytes` and `file_bytes` only when read from a file.

    For a file, header_bytes + (theta_bits + dense_tensor_bits)/8 == file_bytes == os.stat sizes.
    """

    groups: tuple[GroupSize, ...]
    dense_tensor_bits: int
    header_bytes: int | None = None
    file_bytes: int | None = None

    @property
    def theta_bits(self) -> int:
        return sum(g.stored_bits for g in self.groups)

    @property
    def payload_bits(self) -> int:
        return self.theta_bits + self.dense_tensor_bits

    @property
    def dense_bits(self) -> int:
        """Bits of the compressed parameters if they were stored dense."""
        return sum(g.dense_bits for g in self.groups)


SEAL_KEY = "lccompress.seal"  # BLAKE2b-64 of the rest of the model


def onnx_seal(model: onnx.ModelProto) -> str:
    """BLAKE2b-64 of the whole model (graph, opsets, metadata) without its seal property."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    keep = [p for p in m.metadata_props if p.key != SEAL_KEY]
    del m.metadata_props[:]
    m.metadata_props.extend(keep)
    return hashlib.blake2b(m.SerializeToString(), digest_size=8).hexdigest()


def load_onnx(path: str) -> onnx.ModelProto:
    """The ONNX model's protobuf (without external data), checked against its lccompress seal when
    it has one (files from `export_onnx`); ArtifactError when it does not parse or was changed."""
    try:
        m = onnx.load(path, load_external_data=False)
        props = {p.key: p.value for p in m.metadata_props}
    except (FileNotFoundError, PermissionError, IsADirectoryError):
        raise
    except Exception as e:  # noqa: BLE001 - protobuf's DecodeError, RuntimeError, UnicodeDecodeError, ...
        raise ArtifactError(f"{path} is not a readable ONNX file ({type(e).__name__})") from None
    if not all(isinstance(v, str) for v in props.values()):
        raise ArtifactError(f"{path}: its metadata is not text; the file is corrupted")
    if (SEAL_KEY in props or META_KEY in props) and props.get(SEAL_KEY) != onnx_seal(m):
        raise ArtifactError(f"{path}: the graph or its lccompress metadata fails its checksum; the file is "
                            "corrupted or was changed")
    for t in _onnx_tensors(m.graph):
        _check_tensor_size(path, t)
    return m


#: ONNX element types stored two to a byte
_PACKED_4BIT = {getattr(onnx.TensorProto, n) for n in ("INT4", "UINT4") if hasattr(onnx.TensorProto, n)}


def _check_tensor_size(path: str, t: onnx.TensorProto) -> None:
    """An initializer's stored bytes (raw_data) must be what its dims and type say; onnxruntime
    would refuse the model otherwise, so the readers do too, in one line."""
    if any(d < 0 for d in t.dims):
        raise ArtifactError(f"{path}: initializer {t.name!r} has negative dims {list(t.dims)}")
    if t.external_data or not t.raw_data or t.data_type in (onnx.TensorProto.STRING, onnx.TensorProto.UNDEFINED):
        return
    n = math.prod(t.dims)
    try:
        want = (n + 1) // 2 if t.data_type in _PACKED_4BIT else n * onnx.helper.tensor_dtype_to_np_dtype(
            t.data_type).itemsize
    except (KeyError, ValueError, TypeError):
        raise ArtifactError(f"{path}: initializer {t.name!r} has an unknown element type {t.data_type}") from None
    if len(t.raw_data) != want:
        raise ArtifactError(f"{path}: initializer {t.name!r} holds {len(t.raw_data):,} bytes, but its dims "
                            f"{list(t.dims)} need {want:,}; the file is corrupted or was changed")


def disk_bytes(path: str | os.PathLike) -> int:
    """Bytes on disk of an artifact: the file, plus for ONNX every external data file it names."""
    path = os.fspath(path)
    total = os.stat(path).st_size
    if path.endswith(".onnx"):
        m = load_onnx(path)
        locs = {e.value for t in _onnx_tensors(m.graph) for e in t.external_data if e.key == "location"}
        total += sum(os.stat(os.path.join(os.path.dirname(path), loc)).st_size for loc in locs)
    return total


def size_report(source: Any, groups: list[Group] | None = None, *,
                state_dict: Mapping[str, Tensor] | None = None) -> SizeReport:
    """Sizes of θ per group and in total.

    `source` is a path to a .safetensors artifact (reads its header only) or to an ONNX file
    from `export_onnx`, or θ per group (with `groups`, and optionally the `state_dict` whose
    other entries would be stored dense): then θ is encoded as `save` would store it.
    """
    if isinstance(source, (str, os.PathLike)):
        p = os.fspath(source)
        return _onnx_report(p) if p.endswith(".onnx") else _safetensors_report(p)
    if groups is None:
        raise ArtifactError("size_report of θ needs the groups")
    out = []
    for g in groups:
        stored, e = encode_theta(g, source[g.name])
        out.append(_group_size(g.name, e, sum(t.numel() * t.element_size() * 8 for t in stored.values())))
    compressed = {p for g in groups for p in g.params}
    dense = sum(t.numel() * t.element_size() * 8 for k, t in (state_dict or {}).items() if k not in compressed)
    return SizeReport(tuple(out), dense)


def _group_size(name: str, e: Mapping[str, Any], stored_bits: int) -> GroupSize:
    numel = sum(math.prod(s) for s in e["shapes"])
    return GroupSize(name, tuple(e["params"]), e["scheme"]["scheme"], numel,
                     numel * torch.empty(0, dtype=getattr(torch, e["dtype"])).element_size() * 8,
                     int(e["scheme_bits"]), stored_bits, {k: v["enc"] for k, v in e["parts"].items()})


def _safetensors_report(path: str) -> SizeReport:
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(n))
        manifest = read_manifest(header.pop("__metadata__", None), path)
        nbytes = {k: v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items()}
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{path} is not a readable safetensors file: {e}") from None
    out, claimed = [], set()
    try:
        for name, e in manifest["groups"].items():
            names = [f"{name}.{k}" for k in e["parts"]]
            claimed.update(names)
            out.append(_group_size(name, e, 8 * sum(nbytes.get(t, 0) for t in names)))
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise ArtifactError(f"{path}: a group's manifest entry is malformed ({type(e).__name__}: {e})") from None
    dense = 8 * sum(b for k, b in nbytes.items() if k not in claimed)
    return SizeReport(tuple(out), dense, 8 + n, disk_bytes(path))


def _onnx_tensors(g: onnx.GraphProto) -> list[onnx.TensorProto]:
    return list(g.initializer) + [t for s in g.sparse_initializer for t in (s.values, s.indices)]


def _tensor_bytes(t: onnx.TensorProto) -> int:
    ext = {e.key: e.value for e in t.external_data}
    if "length" in ext:
        return int(ext["length"])
    if t.raw_data:
        return len(t.raw_data)
    n = math.prod(t.dims)
    return n * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize


def _onnx_report(path: str) -> SizeReport:
    m = load_onnx(path)
    out, claimed = [], set()
    try:
        nbytes = {t.name: _tensor_bytes(t) for t in _onnx_tensors(m.graph)}
        meta = {p.key: p.value for p in m.metadata_props}
        entries = json.loads(meta[META_KEY]) if META_KEY in meta else {}
        for name, e in entries.items():
            claimed.update(e["initializers"])
            out.append(_group_size(name, e, 8 * sum(nbytes.get(t, 0) for t in e["initializers"])))
    except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{path}: its lccompress metadata is unreadable ({type(e).__name__}: {e})") from None
    total = disk_bytes(path)
    dense = 8 * sum(b for k, b in nbytes.items() if k not in claimed)
    return SizeReport(tuple(out), dense, total - sum(nbytes.values()), total)
