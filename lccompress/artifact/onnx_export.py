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
    uniform    4-bit Linear / MatMul weights: com.microsoft.MatMulNBits over the packed codes;
               others: "qdq" DequantizeLinear (uint4 / uint8, per axis or blocked), or "fold"
               W = (codes − z)·s from codes bit-packed at b bits
    structured the model's layers shrink before the export (no decoder)

Every decoder input is a constant, so onnxruntime folds the decoders into dense initializers
when it loads the model: the file is small, memory and latency are those of the dense model —
except DequantizeLinear, which it keeps (so QDQ-aware runtimes see it) and runs at every call
(its memory and latency are then above the dense model's on the CPU). Split low-rank layers,
MatMulNBits and shrunk layers stay compressed in memory (and are faster). Sparse initializers
are not used: the ONNX checker requires int64 indices (8 bytes per kept weight), and
onnxruntime densifies them at load anyway.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import json
import os
import sys
import tempfile
import types
import warnings
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper, version_converter
from torch import Tensor, nn
from torch.nn import functional as F

from ..errors import ConfigError
from ..modelio import Inputs, as_inputs, prediction
from ..recipe import Group, UnitGroup
from ..schemes.base import Theta
from ..structure import shrink
from ..util import atomic_write, copy_module
from .container import META_KEY, encode_theta, split_lowrank_
from .size import SEAL_KEY, onnx_seal


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

    def qconst(self, a: np.ndarray, kind: str, hint: str = "q") -> str:
        """Integer codes 0 ≤ a < 2ᵇ as a "uint4" (two per byte, low nibble first) or "uint8" constant."""
        name = self.fresh(hint)
        a = np.asarray(a, np.uint8)
        if kind == "uint8":
            self.inits.append(numpy_helper.from_array(a, name))
            return name
        flat = a.reshape(-1)
        flat = np.concatenate([flat, np.zeros(flat.size % 2, np.uint8)]).reshape(-1, 2)
        packed = (flat[:, 0] | (flat[:, 1] << 4)).astype(np.uint8)
        self.inits.append(helper.make_tensor(name, onnx.TensorProto.UINT4, list(a.shape), packed.tobytes(), raw=True))
        return name


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


def _mha_forward(self: nn.MultiheadAttention, query: Tensor, key: Tensor, value: Tensor,
                 key_padding_mask: Tensor | None = None, need_weights: bool = True, attn_mask: Tensor | None = None,
                 average_attn_weights: bool = True, is_causal: bool = False) -> tuple[Tensor, Tensor | None]:
    """nn.MultiheadAttention's forward (eval, no bias_k / bias_v / zero attention), computed so that
    the TorchScript exporter keeps the sequence axes dynamic: torch's own reads the key's length
    from a tensor whose shape the exporter has made static, so its graph runs at the example's
    length only (pytorch/pytorch#120075). Anything else goes to torch's forward."""
    if query.dim() != 3 or (is_causal and attn_mask is None):
        return nn.MultiheadAttention.forward(self, query, key, value, key_padding_mask, need_weights, attn_mask,
                                             average_attn_weights, is_causal)
    if self.batch_first:
        query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
    L, N, E = query.shape  # (length, batch, embedding): unpacked, the exporter keeps them dynamic
    S = key.shape[0]
    H, d = self.num_heads, self.head_dim
    if self._qkv_same_embed_dim:
        w_q, w_k, w_v = self.in_proj_weight.chunk(3)
    else:
        w_q, w_k, w_v = self.q_proj_weight, self.k_proj_weight, self.v_proj_weight
    b_q, b_k, b_v = self.in_proj_bias.chunk(3) if self.in_proj_bias is not None else (None, None, None)
    q = F.linear(query, w_q, b_q).reshape(L, N * H, d).transpose(0, 1)  # (N·H, L, d)
    k = F.linear(key, w_k, b_k).reshape(S, N * H, d).transpose(0, 1)
    v = F.linear(value, w_v, b_v).reshape(S, N * H, d).transpose(0, 1)
    scores = torch.bmm(q * d ** -0.5, k.transpose(1, 2))  # (N·H, L, S)
    if attn_mask is not None:  # (L, S) or (N·H, L, S); True or −inf: not attended
        am = attn_mask if attn_mask.is_floating_point() else \
            torch.zeros_like(attn_mask, dtype=scores.dtype).masked_fill(attn_mask, float("-inf"))
        scores = scores + am.to(scores.dtype)
    if key_padding_mask is not None:  # (N, S)
        kpm = key_padding_mask if key_padding_mask.is_floating_point() else \
            torch.zeros_like(key_padding_mask, dtype=scores.dtype).masked_fill(key_padding_mask, float("-inf"))
        scores = (scores.reshape(N, H, L, S) + kpm.to(scores.dtype).reshape(N, 1, 1, S)).reshape(N * H, L, S)
    attn = torch.softmax(scores, -1)
    out = torch.bmm(attn, v).transpose(0, 1).reshape(L, N, E)
    out = F.linear(out, self.out_proj.weight, self.out_proj.bias)
    if self.batch_first:
        out = out.transpose(0, 1)
    if not need_weights:
        return out, None
    weights = attn.reshape(N, H, L, S)
    return out, (weights.mean(1) if average_attn_weights else weights)


def _traceable_attention_(m: nn.Module) -> None:
    """Give the model's plain nn.MultiheadAttention layers `_mha_forward` (the exported copy only)."""
    for mod in m.modules():
        if isinstance(mod, nn.MultiheadAttention) and type(mod).forward is nn.MultiheadAttention.forward and \
                mod.bias_k is None and mod.bias_v is None and not mod.add_zero_attn and \
                not (mod.training and mod.dropout > 0):
            mod.forward = types.MethodType(_mha_forward, mod)  # type: ignore[method-assign]


class _Graph(nn.Module):
    """What goes through the exporter: forward(*tensors) calls the model with the example's
    structure (positional and keyword arguments, non-tensor ones as constants) and returns the
    outputs that ONNX keeps (see `graph_outputs`)."""

    def __init__(self, model: nn.Module, example: Inputs, output: str | None) -> None:
        super().__init__()
        self.model, self.example, self.output = model, example, output
        self.slots = [("a", i) for i, v in enumerate(example.args) if isinstance(v, Tensor)] + \
                     [("k", k) for k, v in example.kwargs.items() if isinstance(v, Tensor)]

    def call(self, *tensors: Tensor) -> Any:
        args, kwargs = list(self.example.args), dict(self.example.kwargs)
        for (kind, key), t in zip(self.slots, tensors):
            if kind == "a":
                args[key] = t  # type: ignore[index]
            else:
                kwargs[key] = t  # type: ignore[index]
        return self.model(*args, **kwargs)

    def forward(self, *tensors: Tensor) -> Any:
        return graph_outputs(self.call(*tensors), self.output)[1]


def graph_outputs(out: Any, output: str | None = None) -> tuple[list[str], tuple[Tensor, ...]]:
    """(names, tensors) that an exported graph returns for a model output: `output` by name; a
    tensor; every tensor of a flat tuple or list; from a dict or ModelOutput its prediction
    ("logits", else the first tensor)."""
    if output is not None:
        return [output if not output.lstrip("-").isdigit() else "output"], (prediction(out, output),)
    if isinstance(out, Tensor):
        return ["output"], (out,)
    if isinstance(out, (tuple, list)) and out and all(isinstance(t, Tensor) for t in out):
        return [f"output{i}" for i in range(len(out))] if len(out) > 1 else ["output"], tuple(out)
    if isinstance(out, Mapping) and isinstance(out.get("logits"), Tensor):
        return ["logits"], (out["logits"],)
    return ["output"], (prediction(out),)


def onnx_input_names(model: nn.Module, example: Inputs) -> list[str]:
    """ONNX input names of the example's tensors: keyword arguments by their keys, positional ones
    by the forward's parameter names (`input`, `input1`, … where the signature does not say)."""
    params: list[str] = []
    try:
        schema = getattr(model.forward, "schema", None)  # TorchScript
        if schema is not None:
            params = [a.name for a in schema.arguments][1:]
        else:
            sig = inspect.signature(model.forward)
            params = [n for n, p in sig.parameters.items()
                      if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    except (TypeError, ValueError, AttributeError):
        params = []
    names = [(params[i] if i < len(params) else ("input" if i == 0 else f"input{i}"))
             for i, v in enumerate(example.args) if isinstance(v, Tensor)]
    names += [k for k, v in example.kwargs.items() if isinstance(v, Tensor)]
    if len(set(names)) != len(names):
        names = [f"input{i}" for i in range(len(names))]
    return names


def default_dynamic_axes(example: Inputs, names: Sequence[str],
                         call: Callable[..., Any] | None = None) -> dict[str, dict[int, str]]:
    """Axis 0 of every input is "batch". Axis 1 is "seq" where the model runs with it changed: the
    inputs whose axis 1 has the same length (token ids and their mask) are shortened (or lengthened)
    together and `call(*tensors)` tried; without `call`, axis 1 of integer and boolean inputs."""
    tensors = example.tensors()
    out: dict[str, dict[int, str]] = {n: ({0: "batch"} if t.dim() >= 1 else {}) for n, t in zip(names, tensors)}
    lengths = {int(t.shape[1]) for t in tensors if t.dim() >= 2}
    for length in sorted(lengths):
        members = [i for i, t in enumerate(tensors) if t.dim() >= 2 and t.shape[1] == length]
        if call is None:
            ok = all(not tensors[i].is_floating_point() for i in members)
        else:
            new = length - 1 if length >= 3 else length + 1
            changed = [(t.narrow(1, 0, new) if new < length else torch.cat([t, t.narrow(1, length - 1, 1)], 1))
                       if i in members else t for i, t in enumerate(tensors)]
            try:
                with torch.no_grad():
                    call(*changed)
                ok = True
            except Exception:  # noqa: BLE001 - the model refuses another length: axis 1 is not a sequence
                ok = False
        if ok:
            for i in members:
                out[names[i]][1] = "seq"
    return out


def feeds(names: Sequence[str], inputs: Inputs) -> dict[str, np.ndarray]:
    """An onnxruntime feed for `inputs`: keyword tensors by key, positional ones in the order of
    the remaining names."""
    free = [n for n in names if n not in inputs.kwargs]
    pos = [v for v in inputs.args if isinstance(v, Tensor)]
    if len(pos) > len(free):
        raise ConfigError(f"the ONNX model takes inputs {', '.join(names)}; the batch has {len(pos)} positional "
                          f"tensors and keywords {', '.join(inputs.kwargs) or 'none'}")
    out = {n: _np(t) for n, t in zip(free, pos)}
    out.update({k: _np(v) for k, v in inputs.kwargs.items() if k in names and isinstance(v, Tensor)})
    missing = [n for n in names if n not in out]
    if missing:
        raise ConfigError(f"the ONNX model needs inputs {', '.join(missing)} that the batch does not have")
    return out


def export_onnx(model: nn.Module, thetas: Mapping[str, Theta], groups: list[Group], example_input: Any,
                path: Any, *, sparse: str = "packed", split_lowrank: bool = True, opset: int | None = None,
                input_names: Sequence[str] | None = None, output_names: Sequence[str] | None = None,
                dynamic_batch: bool = True, dynamic_axes: Mapping[str, Mapping[int, str]] | None = None,
                output: str | None = None, matmul_nbits: bool = True, dequantize: str = "qdq") -> dict[str, str]:
    """Export `model` with weights Δ(θ) to a single ONNX file at `path` (written atomically).

    `example_input` is a tensor, a tuple of positional arguments, or `modelio.Inputs` (positional
    and keyword arguments; non-tensor ones are baked in as constants). Inputs are named after the
    forward's parameters and the keyword keys (`input_names` overrides); with `dynamic_batch`,
    `dynamic_axes` (default: `default_dynamic_axes`) and axis 0 of every output are dynamic.
    The outputs are `graph_outputs(model(…), output)`. `sparse` is "packed" or "dense" (see the
    module doc). With `matmul_nbits`, 4-bit uniform grids of Linear / MatMul weights run as ONNX
    Runtime's com.microsoft.MatMulNBits; other uniform grids are decoded by DequantizeLinear
    (`dequantize="qdq"`) or by plain arithmetic that onnxruntime folds at load ("fold"). `opset` defaults to the lowest the decoders need (18, or
    21 for DequantizeLinear). The input model is not changed. Returns the encoding used for each
    compressed parameter.
    """
    if sparse not in ("packed", "dense"):
        raise ConfigError(f"sparse={sparse!r} must be 'packed' or 'dense'")
    if dequantize not in ("qdq", "fold"):
        raise ConfigError(f"dequantize={dequantize!r} must be 'qdq' or 'fold'")
    need = max([18] + [g.scheme.onnx_opset for g in groups])  # BitwiseAnd (18); DequantizeLinear blocked, uint4 (21)
    if opset is None:
        opset = need
    elif opset < need:
        raise ConfigError(f"opset={opset} is too old for these decoders: they need opset ≥ {need}")
    example = as_inputs(example_input).to(torch.device("cpu"))
    if not example.tensors():
        raise ConfigError("the example input holds no tensor to export a graph for")
    m = copy_module(model).cpu().eval()
    th = {g.name: {k: v.detach().cpu() for k, v in thetas[g.name].items()} for g in groups}
    params = dict(m.named_parameters())
    with torch.no_grad():
        for g in groups:
            for p, t in g.decompress(th[g.name]).items():
                params[p].copy_(t)
    units = [g for g in groups if isinstance(g, UnitGroup)]
    groups = [g for g in groups if not isinstance(g, UnitGroup)]
    if units:  # structured pruning: the layers shrink
        m = _shrink(m, units, th, groups)
        params = dict(m.named_parameters())
    with torch.no_grad():
        deltas = {p: _np(params[p]) for g in groups for p in g.params}
    ins = list(input_names or onnx_input_names(m, example))
    split = set(split_lowrank_(m, th, groups)) if split_lowrank else set()
    _traceable_attention_(m)
    graph = _Graph(m, example, output)
    try:
        with torch.no_grad():
            outs_n, outs = graph_outputs(graph.call(*example.tensors()), output)
    except ConfigError:
        raise
    except Exception as e:  # noqa: BLE001 - the user's model on the user's example
        raise ConfigError(f"the model fails on the example input: {_first_line(e)}") from None
    outs_n = list(output_names or outs_n)
    axes: dict[str, dict[int, str]] = {}
    if dynamic_batch:
        axes = {k: dict(v) for k, v in (dynamic_axes or default_dynamic_axes(example, ins, graph.call)).items()}
        seq = {t.shape[d] for n, t in zip(ins, example.tensors()) for d, a in axes.get(n, {}).items() if a == "seq"}
        for name, t in zip(outs_n, outs):
            axes[name] = {0: "batch"} if t.dim() >= 1 else {}
            if t.dim() >= 3 and t.shape[1] in seq:
                axes[name][1] = "seq"
    buf = io.BytesIO()
    try:
        with warnings.catch_warnings(), _exporter_output_held():
            warnings.simplefilter("ignore")
            traced: nn.Module = graph
            if isinstance(m, torch.jit.ScriptModule):  # the exporter traces plain modules only: trace it first
                traced = torch.jit.trace(graph, tuple(example.tensors()), check_trace=False, strict=False)
            torch.onnx.export(traced, tuple(example.tensors()), buf, dynamo=False, opset_version=min(opset, 20),
                              do_constant_folding=False, input_names=ins, output_names=outs_n,
                              dynamic_axes=axes or None)
    except Exception as e:  # noqa: BLE001 - the exporter raises many kinds; name the operator or argument
        raise ConfigError(f"ONNX export failed: {_first_line(e)}") from None
    mp = onnx.load_from_string(buf.getvalue())
    if opset > 20:  # the TorchScript exporter stops at 20; 20 → 21 changes no operator used here
        mp = version_converter.convert_version(mp, opset)
    inits = {t.name: t for t in mp.graph.initializer}
    b, drop, enc, meta = _Builder(), set(), {}, {}
    nbits = matmul_nbits
    for g in units:
        _, entry = encode_theta(g, th[g.name])
        entry.pop("bits")
        entry.pop("units")
        used = [f"model.{p}" for p in g.params if f"model.{p}" in inits]
        enc.update({p: "structured/shrunk" for p in g.params})
        meta[g.name] = {**entry, "initializers": used, "parts": {p: {"enc": "structured/shrunk"} for p in g.params}}
    for g in groups:
        _, entry = encode_theta(g, th[g.name])
        entry.pop("bits")
        if g.name in split:
            mod = g.params[0].rpartition(".")[0]
            used = [f"model.{mod}.{i}.weight" for i in (0, 1) if f"model.{mod}.{i}.weight" in inits]
            enc[g.params[0]] = "lowrank/split"
            meta[g.name] = {**entry, "initializers": used, "parts": {g.params[0]: {"enc": "lowrank/split"}}}
            continue
        hits = {p: _find(inits, "model." + p, deltas[p]) for p in g.params}  # the graph wraps the model
        if not any(hits.values()):
            continue
        n0 = len(b.inits)
        first = hits[g.params[0]]
        if nbits and len(g.params) == 1 and first is not None:
            desc = _matmul_nbits(b, mp.graph, g.scheme, th[g.name], *first)
            if desc is not None:
                drop.add(first[0])
                enc[g.params[0]] = desc
                meta[g.name] = {**entry, "initializers": [t.name for t in b.inits[n0:]],
                                "parts": {g.params[0]: {"enc": desc}}}
                continue
        single = len(g.params) == 1 and first is not None and not first[1]  # decode straight into it
        flat = first[0] if single else b.fresh(g.name)
        desc = g.scheme.onnx_decode(b, th[g.name], tuple(g.shape), flat, sparse=sparse, dequantize=dequantize)
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
    if any(n.domain == "com.microsoft" for n in mp.graph.node) and not any(o.domain == "com.microsoft" for o in mp.opset_import):
        mp.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    text = json.dumps(meta, separators=(",", ":"))
    helper.set_model_props(mp, {META_KEY: text})  # the seal covers the model with this metadata
    helper.set_model_props(mp, {META_KEY: text, SEAL_KEY: onnx_seal(mp)})
    if mp.ByteSize() >= 2**31:
        raise ConfigError(f"the ONNX model is {mp.ByteSize()} bytes; files over 2 GiB need external data, not supported")
    onnx.checker.check_model(mp)
    atomic_write(path, mp.SerializeToString())
    return enc


def _shrink(m: nn.Module, units: list[UnitGroup], th: Mapping[str, Theta], others: list[Group]) -> nn.Module:
    """The model with the removed channels of structured groups cut out (`structure.shrink`); the
    model already holds Δ(θ), so the removed channels' producers are zero and the function is the same."""
    cgs, kept = [], []
    for g in units:
        rows = th[g.name]["rows"].long()
        start = 0
        for u in g.units:
            k = rows[(rows >= start) & (rows < start + u.channels)] - start
            # a group with nothing kept keeps one channel: its producers are zero, so it changes nothing
            cgs.append(u)
            kept.append(k if k.numel() else torch.zeros(1, dtype=torch.long))
            start += u.channels
    touched = {sl.name for u in cgs for sl in (*u.producers, *u.consumers)}
    clash = sorted(p for g in others for p in g.params if p in touched)
    if clash:
        raise ConfigError(f"{', '.join(clash)}: compressed by another scheme and resized by structured pruning; "
                          "the ONNX export supports one or the other on a layer")
    return shrink(m, cgs, kept)


MATMUL_NBITS = (4,)  # bit widths that run as MatMulNBits; ORT's other widths use slow reference kernels


def _matmul_nbits(b: _Builder, graph: onnx.GraphProto, scheme: Any, theta: Theta, name: str,
                  transposed: bool) -> str | None:
    """Replace every product with initializer `name` by com.microsoft.MatMulNBits over θ's packed
    codes, when the scheme offers that layout at a supported width and every use of the weight is
    Gemm(A, W, C, transB=1) or MatMul(A, Wᵀ); else None (nothing changed)."""
    layout = getattr(scheme, "matmul_nbits", None)
    if layout is None or getattr(scheme, "width", None) not in MATMUL_NBITS:
        return None
    users = [(i, n) for i, n in enumerate(graph.node) if name in n.input]
    via = None  # Linear without bias: Transpose(W) feeding MatMul
    if not transposed and len(users) == 1 and users[0][1].op_type == "Transpose" and \
            [helper.get_attribute_value(a) for a in users[0][1].attribute if a.name == "perm"] == [[1, 0]]:
        via = users[0][1]
        name, transposed = via.output[0], True
        users = [(i, n) for i, n in enumerate(graph.node) if name in n.input]

    # the product needs W as (N, K): the initializer holds it so (Linear), or its transpose (Linear's
    # MatMul form, or GPT-2's Conv1D whose θ the scheme keeps output-first: axis 1)
    as_nk = transposed != (getattr(scheme, "axis", 0) == 1)

    def fits(n: onnx.NodeProto) -> bool:
        at = {a.name: helper.get_attribute_value(a) for a in n.attribute}
        if n.op_type == "Gemm":
            return (list(n.input).index(name) == 1 and at.get("transB", 0) == (0 if as_nk else 1)
                    and at.get("transA", 0) == 0 and at.get("alpha", 1.0) == 1.0 and at.get("beta", 1.0) == 1.0)
        return n.op_type == "MatMul" and as_nk and list(n.input) == [n.input[0], name] and n.input[0] != name
    if not users or not all(fits(n) for _, n in users):
        return None
    lay = layout(theta)
    ins = [b.const(lay["B"], "nbits"), b.const(lay["scales"], "scales")]
    if not getattr(scheme, "symmetric", False):
        ins.append(b.const(lay["zero_points"], "zero_points"))
    for i, n in reversed(users):
        out = n.output[0]
        y = out if len(n.input) < 3 or not n.input[2] else b.fresh("MatMulNBits")
        new = [helper.make_node("MatMulNBits", [n.input[0], *ins], [y], domain="com.microsoft", **lay["attrs"])]
        if y != out:
            new.append(helper.make_node("Add", [y, n.input[2]], [out]))
        graph.node.remove(n)
        for k, node in enumerate(new):
            graph.node.insert(i + k, node)
    if via is not None:
        graph.node.remove(via)
    return f"matmulnbits/{lay['attrs']['bits']}bit/b{lay['attrs']['block_size']}"


def _c_flush() -> None:
    """Flush the C library's stdout buffer (where C++ std::cout writes), so that it lands before
    the file descriptor behind it changes."""
    try:
        import ctypes

        ctypes.CDLL(None).fflush(None)
    except (OSError, AttributeError, TypeError):  # no C library by that name (Windows): nothing to flush
        pass


@contextlib.contextmanager
def _exporter_output_held() -> Iterator[None]:
    """Hold back what is printed to stdout while the exporter runs, at the Python and the file
    descriptor level: passed on unchanged when the export succeeds, dropped when it fails.

    The TorchScript exporter turns its C++ ONNX log on and leaves it on (it tests the function
    `_jit_is_onnx_log_enabled` instead of calling it), so a failing export prints a ~20-line
    "Torch IR graph at exception" dump through std::cout, around the one-line error that names the
    operator. The log flag is also put back as it was."""
    log_was = getattr(torch._C, "_jit_is_onnx_log_enabled", lambda: None)()
    held = io.StringIO()
    sys.stdout.flush()
    _c_flush()
    try:
        saved: int | None = os.dup(1)
    except OSError:  # no file descriptor 1 (a detached process): Python-level output only
        saved = None
    tmp = tempfile.TemporaryFile()
    if saved is not None:
        os.dup2(tmp.fileno(), 1)
    ok = False
    try:
        with contextlib.redirect_stdout(held):
            yield
        ok = True
    finally:
        _c_flush()
        if saved is not None:
            os.dup2(saved, 1)
            os.close(saved)
        if log_was is not None:
            torch._C._jit_set_onnx_log_enabled(log_was)
        if ok:  # nothing went wrong: what was printed is not ours to drop
            tmp.seek(0)
            raw = tmp.read()
            while raw:
                raw = raw[os.write(1, raw):]
            if held.getvalue():
                sys.stdout.write(held.getvalue())
        tmp.close()


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def verify_onnx(path: Any, model: nn.Module, inputs: Any, *, threads: int | None = None,
                output: str | None = None) -> dict[str, float]:
    """Run the ONNX file in onnxruntime (CPU) and `model` in torch on the same inputs (a tensor, a
    tuple of positional arguments or `modelio.Inputs`, of any batch size and sequence length the
    graph's dynamic axes allow).

    Returns max_abs = max |o − t| and max_rel = max over outputs of max|o − t| / max|t|
    (ONNX output o, torch output t).
    """
    import onnxruntime as ort

    so = ort.SessionOptions()
    if threads:
        so.intra_op_num_threads = threads
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    x = as_inputs(inputs).to(torch.device("cpu"))
    got = sess.run(None, feeds([i.name for i in sess.get_inputs()], x))
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            ref = graph_outputs(x(model), output)[1]
    finally:
        model.train(was)
    refs = [_np(r) for r in ref]
    if len(refs) != len(got):
        raise ConfigError(f"the ONNX model has {len(got)} outputs, the torch model {len(refs)}")
    abs_ = [float(np.abs(o - t.astype(o.dtype)).max(initial=0.0)) for o, t in zip(got, refs)]
    rel = [a / max(float(np.abs(t).max(initial=0.0)), 1e-30) for a, t in zip(abs_, refs)]
    return {"max_abs": max(abs_), "max_rel": max(rel)}
