"""ONNX export of a compressed model: a single self-contained file, smaller than the dense one.

The model with weights Δ(θ) goes through torch.onnx.export (TorchScript exporter, no constant
folding, so initializers keep the parameter names); then each compressed weight's initializer
is replaced by a small decoder subgraph over compact initializers that computes Δ(θ) exactly.
Each scheme builds its own decoder (`Scheme.onnx_decode`, through the `_Builder` here); the
built-in ones are:

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
from onnx import helper, numpy_helper
from torch import Tensor, nn

from ..errors import ConfigError
from ..recipe import Group
from ..schemes.base import Theta
from ..util import atomic_write
from .container import META_KEY, encode_theta, split_lowrank_


class _Builder:
    """Nodes and initializers of the decoders, with fresh names under a prefix (the
    `schemes.codecs.GraphBuilder` that schemes build their decoders with)."""

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
        """A node; numpy arrays as attributes become tensors, numpy types (Cast's `to`) ONNX types."""
        out = out or self.fresh(op_type)
        for k, v in attrs.items():
            if isinstance(v, np.ndarray):
                attrs[k] = numpy_helper.from_array(v)
            elif isinstance(v, type) and issubclass(v, np.generic):
                attrs[k] = helper.np_dtype_to_tensor_dtype(np.dtype(v))
        self.nodes.append(helper.make_node(op_type, list(inputs), [out], **attrs))
        return out

    def i64(self, *v: int) -> str:
        return self.const(np.array(v, np.int64), "shape")

    def initializer(self, name: str, a: np.ndarray) -> None:
        self.inits.append(numpy_helper.from_array(np.asarray(a), name))


def _np(t: Tensor) -> np.ndarray:
    return t.detach().cpu().numpy()


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
        desc = g.scheme.onnx_decode(b, th[g.name], tuple(g.shape), flat, sparse=sparse)
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
