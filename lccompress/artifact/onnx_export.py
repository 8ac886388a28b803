"""ONNX export of a compressed model: a single self-contained file, smaller than the dense one.

The model with weights Δ(θ) goes through torch.onnx.export (TorchScript exporter, no constant
folding, so initializers keep the parameter names); then each compressed weight's initializer
is replaced by a small decoder subgraph over compact initializers that computes Δ(θ) exactly:

    low rank   layers split into two (Linear(in, r) + Linear(r, out), Conv(in, r, k) + Conv1x1)
               so the graph holds U and V and runs r(m + n) instead of mn multiply-adds
    codes      W = reshape(T[z]): z bit-packed at 1/2/4/8 bits into uint8 (unpacked by BitShift
               and BitwiseAnd) or uint16; T (k,) = Δ of the codes 0..k−1 (codebook, scale·table)
    sparse     "packed": positions as gaps in uint8/16/32, W = ScatterElements(0, CumSum(gaps), v),
               or as a bit mask m, W = Where(m, v[CumSum(m) − 1], 0), whichever is smaller;
               "dense": Δ(θ) with its zeros as a plain initializer
    additive   the sum of the terms' decoders; low rank inside it: MatMul(U, V)

Every decoder input is a constant, so onnxruntime folds the decoders into dense initializers
when it loads the model: the file is small, memory and latency are those of the dense model.
Only split low-rank layers stay compressed in memory (and are faster). Sparse initializers are
not used: the ONNX checker requires int64 indices (8 bytes per kept weight), and onnxruntime
densifies them at load anyway.
"""

from __future__ import annotations

import copy
import io
import json
import warnings
from typing import Any, Mapping, Sequence

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import Tensor, nn

from ..errors import ConfigError
from ..recipe import Group
from ..schemes.base import Scheme, Theta, code_bits
from .container import META_KEY, atomic_write, encode_theta, levels, pack_bits, split_lowrank_


class _Builder:
    """Nodes and initializers of the decoders, with fresh names under a prefix."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.count = 0

    def fresh(self, hint: str) -> str:
        self.count += 1
        return f"lcc/{hint}/{self.count}"

    def const(self, a: Any, hint: str = "c") -> str:
        name = self.fresh(hint)
        self.inits.append(numpy_helper.from_array(np.asarray(a), name))
        return name

    def op(self, op_type: str, inputs: Sequence[str], out: str | None = None, **attrs: Any) -> str:
        out = out or self.fresh(op_type)
        self.nodes.append(helper.make_node(op_type, list(inputs), [out], **attrs))
        return out

    def i64(self, *v: int) -> str:
        return self.const(np.array(v, np.int64), "shape")


def _np(t: Tensor) -> np.ndarray:
    return t.detach().cpu().numpy()


def _unpack(b: _Builder, stream: np.ndarray, n: int, w: int) -> str:
    """Decoder of n codes packed at w ∈ {1, 2, 4, 8, 16} bits → (n,) int64."""
    if w >= 8:
        return b.op("Cast", [b.const(stream.astype(np.uint8 if w == 8 else np.uint16), "codes")], to=TensorProto.INT64)
    per = 8 // w
    x = b.op("Unsqueeze", [b.const(pack_bits(stream, w), "codes"), b.i64(1)])  # (bytes, 1)
    x = b.op("BitShift", [x, b.const(np.arange(per, dtype=np.uint8) * w, "shifts")], direction="RIGHT")  # (bytes, per)
    x = b.op("BitwiseAnd", [x, b.const(np.array((1 << w) - 1, np.uint8), "mask")])
    x = b.op("Slice", [b.op("Reshape", [x, b.i64(-1)]), b.i64(0), b.i64(n)])  # (n,)
    return b.op("Cast", [x], to=TensorProto.INT64)


def _decode(b: _Builder, scheme: Scheme, theta: Theta, shape: tuple[int, ...], out: str, sparse: str) -> str:
    """Nodes computing Δ(θ) with `shape` into tensor `out`; returns a description of the encoding."""
    keys, n = set(theta), int(np.prod(shape))
    terms = getattr(scheme, "terms", None)
    if isinstance(terms, tuple) and keys and all(k.partition(".")[0].isdigit() for k in keys):
        names = [b.fresh("term") for _ in terms]
        descs = [_decode(b, t, {k.partition(".")[2]: v for k, v in theta.items() if k.partition(".")[0] == str(i)},
                         shape, names[i], sparse) for i, t in enumerate(terms)]
        acc = names[0]
        for i, nm in enumerate(names[1:], 1):
            acc = b.op("Add", [acc, nm], out if i == len(names) - 1 else None)
        return "+".join(descs)
    if "codes" in keys and not theta["codes"].is_floating_point():
        codes = theta["codes"]
        k = max(levels(scheme, "codes") or 0, int(codes.max()) + 1 if codes.numel() else 1)
        table = scheme.decompress({**theta, "codes": torch.arange(k, dtype=codes.dtype)}, (k,))  # (k,) = Δ of each code
        w = next(w for w in (1, 2, 4, 8, 16) if w >= code_bits(k))
        idx = _unpack(b, _np(codes).reshape(-1), n, w)
        b.op("Reshape", [b.op("Gather", [b.const(_np(table), "table"), idx]), b.i64(*shape)], out)
        return f"codes/{w}bit"
    if keys == {"indices", "values"} and sparse == "packed":
        idx, v = _np(theta["indices"]).astype(np.int64), _np(theta["values"])
        if idx.size == 0:
            b.op("ConstantOfShape", [b.i64(*shape)], out, value=numpy_helper.from_array(np.zeros(1, v.dtype)))
            return "sparse/empty"
        gaps = np.diff(idx, prepend=0)  # (nnz,): i₀, then iⱼ − iⱼ₋₁ ≥ 1
        dt = next((d for d in (np.uint8, np.uint16, np.uint32) if gaps.max() <= np.iinfo(d).max), np.int64)
        vals = b.const(v, "values")
        if idx.size * np.dtype(dt).itemsize <= (n + 7) // 8:
            pos = b.op("CumSum", [b.op("Cast", [b.const(gaps.astype(dt), "gaps")], to=TensorProto.INT64), b.i64(0)])
            zeros = b.op("ConstantOfShape", [b.i64(n)], value=numpy_helper.from_array(np.zeros(1, v.dtype)))
            b.op("Reshape", [b.op("ScatterElements", [zeros, pos, vals]), b.i64(*shape)], out)
            return f"sparse/delta-{np.dtype(dt).name}"
        m = np.zeros(n, np.uint8)
        m[idx] = 1
        m64 = _unpack(b, m, n, 1)  # (n,) int64 ∈ {0, 1}
        rank = b.op("Max", [b.op("Sub", [b.op("CumSum", [m64, b.i64(0)]), b.i64(1)]), b.i64(0)])  # slot of each kept weight
        kept = b.op("Gather", [vals, rank])
        full = b.op("Where", [b.op("Cast", [m64], to=TensorProto.BOOL), kept, b.const(np.zeros((), v.dtype), "zero")])
        b.op("Reshape", [full, b.i64(*shape)], out)
        return "sparse/mask"
    if keys == {"U", "V"}:
        b.op("Reshape", [b.op("MatMul", [b.const(_np(theta["U"]), "U"), b.const(_np(theta["V"]), "V")]), b.i64(*shape)], out)
        return "lowrank/matmul"
    b.inits.append(numpy_helper.from_array(_np(scheme.decompress(theta, shape)), out))
    return "dense"


def _find(inits: Mapping[str, onnx.TensorProto], name: str, w: np.ndarray) -> tuple[str, bool] | None:
    """(initializer holding w, whether it holds wᵀ): by name first, else by exact content."""
    cands = ([inits[name]] if name in inits else []) + [t for t in inits.values() if t.name != name]
    for t in cands:
        if int(np.prod(t.dims)) != w.size:
            continue
        a = numpy_helper.to_array(t)
        if a.shape == w.shape and np.array_equal(a, w):
            return t.name, False
        if w.ndim == 2 and a.shape == w.T.shape and np.array_equal(a, w.T):
            return t.name, True
    return None


def export_onnx(model: nn.Module, thetas: Mapping[str, Theta], groups: list[Group], example_input: Any,
                path: Any, *, sparse: str = "packed", split_lowrank: bool = True, opset: int = 18,
                input_names: Sequence[str] | None = None, output_names: Sequence[str] | None = None,
                dynamic_batch: bool = True) -> dict[str, str]:
    """Export `model` with weights Δ(θ) to a single ONNX file at `path` (written atomically).

    `example_input` is a tensor or a tuple of tensors; with `dynamic_batch` dimension 0 of
    every input and output is dynamic. `sparse` is "packed" or "dense" (see the module doc).
    The input model is not changed. Returns the encoding used for each compressed parameter.
    """
    if sparse not in ("packed", "dense"):
        raise ConfigError(f"sparse={sparse!r} must be 'packed' or 'dense'")
    if opset < 18:
        raise ConfigError(f"opset={opset} must be ≥ 18 (the code decoders use BitwiseAnd)")
    m = copy.deepcopy(model).cpu().eval()
    th = {g.name: {k: v.detach().cpu() for k, v in thetas[g.name].items()} for g in groups}
    params = dict(m.named_parameters())
    with torch.no_grad():
        for g in groups:
            for p, t in g.decompress(th[g.name]).items():
                params[p].copy_(t)
        deltas = {p: _np(params[p]) for g in groups for p in g.params}
    split = set(split_lowrank_(m, th, groups)) if split_lowrank else set()
    args = tuple(a.cpu() for a in (example_input if isinstance(example_input, tuple) else (example_input,)))
    with torch.no_grad():
        outs = m(*args)
    n_out = len(outs) if isinstance(outs, (tuple, list)) else 1
    ins = list(input_names or (["input"] if len(args) == 1 else [f"input{i}" for i in range(len(args))]))
    outs_n = list(output_names or (["output"] if n_out == 1 else [f"output{i}" for i in range(n_out)]))
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(m, args, buf, dynamo=False, opset_version=opset, do_constant_folding=False,
                          input_names=ins, output_names=outs_n,
                          dynamic_axes={k: {0: "batch"} for k in ins + outs_n} if dynamic_batch else None)
    mp = onnx.load_from_string(buf.getvalue())
    inits = {t.name: t for t in mp.graph.initializer}
    b, drop, enc, meta = _Builder(), set(), {}, {}
    for g in groups:
        _, entry = encode_theta(g, th[g.name])
        entry.pop("bits")
        if g.name in split:
            mod = g.params[0].rpartition(".")[0]
            used = [f"{mod}.{i}.weight" for i in (0, 1) if f"{mod}.{i}.weight" in inits]
            enc[g.params[0]] = "lowrank/split"
            meta[g.name] = {**entry, "initializers": used, "parts": {g.params[0]: {"enc": "lowrank/split"}}}
            continue
        hits = {p: _find(inits, p, deltas[p]) for p in g.params}
        if not any(hits.values()):
            continue
        n0 = len(b.inits)
        first = hits[g.params[0]]
        single = len(g.params) == 1 and first is not None and not first[1]  # decode straight into it
        flat = first[0] if single else b.fresh(g.name)
        desc = _decode(b, g.scheme, th[g.name], tuple(g.shape), flat, sparse)
        start = 0
        for p, s in zip(g.params, g.shapes):
            hit, end = hits[p], start + s.numel()
            if hit is not None and not single:
                name, transposed = hit
                x = flat if len(g.params) == 1 else b.op(
                    "Reshape", [b.op("Slice", [flat, b.i64(start), b.i64(end)]), b.i64(*s)], None if transposed else name)
                if transposed:
                    b.op("Transpose", [x], name, perm=[1, 0])
            if hit is not None:
                drop.add(hit[0])
            enc[p], start = desc if hit is not None else "absent", end
        meta[g.name] = {**entry, "initializers": [t.name for t in b.inits[n0:]],
                        "parts": {p: {"enc": enc[p]} for p in g.params}}
    keep = [t for t in mp.graph.initializer if t.name not in drop]
    del mp.graph.initializer[:]
    mp.graph.initializer.extend(keep + b.inits)
    nodes = b.nodes + list(mp.graph.node)
    del mp.graph.node[:]
    mp.graph.node.extend(nodes)
    helper.set_model_props(mp, {META_KEY: json.dumps(meta, separators=(",", ":"))})
    if mp.ByteSize() >= 2**31:
        raise ConfigError(f"the ONNX model is {mp.ByteSize()} bytes; files over 2 GiB need external data, not supported")
    onnx.checker.check_model(mp)
    atomic_write(path, mp.SerializeToString())
    return enc


def verify_onnx(path: Any, model: nn.Module, inputs: Any, *, threads: int | None = None) -> dict[str, float]:
    """Run the ONNX file in onnxruntime (CPU) and `model` in torch on the same inputs.

    Returns max_abs = max |o − t| and max_rel = max over outputs of max|o − t| / max|t|
    (ONNX output o, torch output t).
    """
    import onnxruntime as ort

    so = ort.SessionOptions()
    if threads:
        so.intra_op_num_threads = threads
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    args = inputs if isinstance(inputs, tuple) else (inputs,)
    got = sess.run(None, {i.name: _np(a) for i, a in zip(sess.get_inputs(), args)})
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            ref = model(*args)
    finally:
        model.train(was)
    refs = [_np(r) for r in (ref if isinstance(ref, (tuple, list)) else (ref,))]
    if len(refs) != len(got):
        raise ConfigError(f"the ONNX model has {len(got)} outputs, the torch model {len(refs)}")
    abs_ = [float(np.abs(o - t).max(initial=0.0)) for o, t in zip(got, refs)]
    rel = [a / max(float(np.abs(t).max(initial=0.0)), 1e-30) for a, t in zip(abs_, refs)]
    return {"max_abs": max(abs_), "max_rel": max(rel)}
