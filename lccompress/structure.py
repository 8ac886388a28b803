"""Channel groups for structured pruning, and the physical shrinking of a model.

`channel_groups(model, example)` traces the model with torch.fx (Conv / Linear / BatchNorm and
the other torch.nn layers stay leaves), runs the example once for the shapes, and follows the
output channels of every Conv and Linear through the graph. Channels that must be removed
together (a residual add, a depthwise conv passing channels through, a concatenation feeding
one conv) form one `ChannelGroup`; it names the parameter slices that produce a channel, the
buffers that go with it and the parameter slices that read it.

Every group returned satisfies the zero invariant: if every producer slice of a channel is zero,
the channel's value is exactly zero wherever it is read, so removing the channel together with
its consumer slices (`shrink`) computes the same function as zeroing the producers. A channel
that reaches a model output, passes an op that does not map 0 to 0 (sigmoid, a BatchNorm
without affine parameters, adding a constant), or flows into anything this module does not
follow (indexing, matmul, attention, a reshape with a hard-coded size, a grouped conv, ...)
is not prunable: its group is left out and a one-line reason says why.

torch-pruning was evaluated for the graph and not used: it treats every op it does not know
(sigmoid, indexing, adding a constant) as an elementwise pass-through and offers a model's
output layer unless told otherwise, so its groups break the zero invariant silently.
"""

from __future__ import annotations

import copy
import math
import operator
from collections import Counter
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn
from torch.fx.passes.shape_prop import ShapeProp, TensorMetadata

from .errors import ConfigError


@dataclass(frozen=True)
class Slice:
    """Entries of one parameter or buffer along one axis: channel c of the group ↔ indices
    [offset + c·per, offset + (c+1)·per) along `dim` (per > 1 for a Linear reading a flattened
    feature map, offset > 0 behind a concatenation)."""

    name: str
    dim: int
    per: int = 1
    offset: int = 0


@dataclass(frozen=True)
class ChannelGroup:
    """Channels removed together. If every producer slice of channel c is zero, the channel's
    value is identically zero wherever it is consumed."""

    channels: int
    producers: tuple[Slice, ...]
    buffers: tuple[Slice, ...]
    consumers: tuple[Slice, ...]
    modules: tuple[str, ...]


# ---------------------------------------------------------------------------------------------
# what the analysis knows about ops

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)

# elementwise layers that map 0 to 0
_ZERO_MODULES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.Mish, nn.Hardswish, nn.Tanh, nn.Hardtanh,
    nn.ELU, nn.SELU, nn.CELU, nn.Softsign, nn.Tanhshrink, nn.Softshrink, nn.Hardshrink,
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.Identity,
)
# layers acting on the last d axes (0: all axes after the first two) that map zero maps to zero maps
_SPATIAL_MODULES = {
    nn.MaxPool1d: 1, nn.MaxPool2d: 2, nn.MaxPool3d: 3, nn.AvgPool1d: 1, nn.AvgPool2d: 2, nn.AvgPool3d: 3,
    nn.AdaptiveAvgPool1d: 1, nn.AdaptiveAvgPool2d: 2, nn.AdaptiveAvgPool3d: 3,
    nn.AdaptiveMaxPool1d: 1, nn.AdaptiveMaxPool2d: 2, nn.AdaptiveMaxPool3d: 3, nn.Upsample: 0,
}
_NONZERO_MODULES = (
    nn.Sigmoid, nn.Hardsigmoid, nn.LogSigmoid, nn.Softplus, nn.Softmax, nn.LogSoftmax, nn.Softmin,
    nn.AlphaDropout, nn.FeatureAlphaDropout,
)


def _funcs(*names: str, where=F) -> frozenset:
    return frozenset(getattr(where, n) for n in names if hasattr(where, n))


_ZERO_FUNCS = _funcs(
    "relu", "relu_", "relu6", "leaky_relu", "leaky_relu_", "gelu", "silu", "mish", "hardswish", "tanh",
    "elu", "elu_", "selu", "celu", "softsign", "tanhshrink", "softshrink", "hardshrink",
    "dropout", "dropout1d", "dropout2d", "dropout3d",
) | _funcs("relu", "relu_", "tanh", "tanh_", "neg", "abs", "selu", "celu", where=torch) | {operator.neg, operator.pos}
_SPATIAL_FUNCS = {getattr(F, f"{kind}{d}d"): d for d in (1, 2, 3)
                  for kind in ("max_pool", "avg_pool", "adaptive_avg_pool", "adaptive_max_pool")} | {F.interpolate: 0}
_HARDTANH = _funcs("hardtanh", "hardtanh_")
_CLAMPS = _HARDTANH | _funcs("clamp", "clip", where=torch)
_NONZERO_FUNCS = _funcs("sigmoid", "hardsigmoid", "logsigmoid", "softplus", "softmax", "log_softmax", "softmin",
                        "alpha_dropout", "feature_alpha_dropout") | _funcs(
    "sigmoid", "exp", "cos", "softmax", "log_softmax", "special_expit", where=torch)

_ZERO_METHODS = frozenset({
    "relu", "relu_", "tanh", "tanh_", "neg", "neg_", "abs", "abs_", "contiguous", "clone", "detach",
    "float", "double", "half", "bfloat16", "to", "type_as", "cpu", "cuda",
})
_NONZERO_METHODS = frozenset({"sigmoid", "sigmoid_", "exp", "exp_", "cos", "softmax", "log_softmax"})

_ADD = frozenset({operator.add, operator.iadd, operator.sub, operator.isub, torch.add, torch.sub, torch.subtract})
_MUL = frozenset({operator.mul, operator.imul, torch.mul, torch.multiply})
_DIV = frozenset({operator.truediv, operator.itruediv, torch.div, torch.divide, torch.true_divide})
_METHOD_BINARY = {"add": "add", "add_": "add", "sub": "add", "sub_": "add", "mul": "mul", "mul_": "mul",
                  "div": "div", "div_": "div"}
_REDUCE = {"mean", "sum", "amax", "amin"}
_CAT = _funcs("cat", "concat", "concatenate", where=torch)


@dataclass(frozen=True)
class _Layout:
    """Where tracked channels sit in a tensor: along `axis`, segments (space, offset, per); the
    positions no segment covers carry untracked values."""

    axis: int
    segs: tuple[tuple[int, int, int], ...]

    def moved(self, axis: int) -> _Layout:
        return _Layout(axis, self.segs)

    def scaled(self, r: int) -> _Layout:
        return _Layout(self.axis, tuple((s, off * r, per * r) for s, off, per in self.segs))


@dataclass(frozen=True)
class _ShapeOf:
    """The value of x.size() / x.shape for a tensor x with tracked channels."""

    layout: _Layout
    ndim: int


class _Spaces:
    """Union-find over channel spaces (the outputs of one Conv / Linear call), each with the
    slices and reasons gathered for it."""

    def __init__(self) -> None:
        self.parent: list[int] = []
        self.channels: list[int] = []
        self.origin: list[list[str]] = []
        self.slices: list[dict[str, list[Slice]]] = []
        self.reasons: list[list[str]] = []

    def new(self, channels: int, origin: str) -> int:
        self.parent.append(len(self.parent))
        self.channels.append(channels)
        self.origin.append([origin])
        self.slices.append({"producers": [], "buffers": [], "consumers": []})
        self.reasons.append([])
        return len(self.parent) - 1

    def find(self, s: int) -> int:
        while self.parent[s] != s:
            self.parent[s] = self.parent[self.parent[s]]
            s = self.parent[s]
        return s

    def union(self, a: int, b: int) -> None:
        a, b = self.find(a), self.find(b)
        if a == b:
            return
        a, b = min(a, b), max(a, b)
        self.parent[b] = a
        self.origin[a] += self.origin[b]
        for k in self.slices[a]:
            self.slices[a][k] += self.slices[b][k]
        self.reasons[a] += self.reasons[b]
        if self.channels[a] != self.channels[b]:  # callers compare sizes first; never merge silently
            self.reasons[a].append(f"joins {self.channels[a]} with {self.channels[b]} channels")

    def add(self, kind: str, s: int, sl: Slice) -> None:
        self.slices[self.find(s)][kind].append(sl)

    def bad(self, s: int, why: str) -> None:
        self.reasons[self.find(s)].append(why)


def _shape(node: Any) -> tuple[int, ...] | None:
    """The shape of a node's value when it is a single tensor."""
    meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    return tuple(meta.shape) if isinstance(meta, TensorMetadata) else None


def _arg(n: fx.Node, i: int, name: str, default: Any = None) -> Any:
    return n.args[i] if len(n.args) > i else n.kwargs.get(name, default)


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}".rstrip(": ")


class _Analysis:
    def __init__(self, model: nn.Module, gm: fx.GraphModule) -> None:
        self.model = model
        self.gm = gm
        self.mods = dict(gm.named_modules())
        self.sp = _Spaces()
        self.val: dict[fx.Node, Any] = {}
        self.calls = Counter(n.target for n in gm.graph.nodes if n.op == "call_module")

    # --- helpers -----------------------------------------------------------------------------

    def lay(self, v: Any) -> _Layout | None:
        x = self.val.get(v) if isinstance(v, fx.Node) else None
        return x if isinstance(x, _Layout) else None

    def spaces_in(self, args: Any, skip: fx.Node | None = None) -> list[int]:
        found: list[int] = []

        def visit(node: fx.Node) -> fx.Node:
            x = self.val.get(node)
            if node is not skip and isinstance(x, (_Layout, _ShapeOf)):
                found.extend(s for s, _, _ in (x.layout if isinstance(x, _ShapeOf) else x).segs)
            return node

        fx.node.map_arg(args, visit)
        return found

    def bad(self, spaces: Any, why: str) -> None:
        if isinstance(spaces, _Layout):
            spaces = [s for s, _, _ in spaces.segs]
        for s in spaces:
            self.sp.bad(s, why)

    def what(self, n: fx.Node) -> str:
        if n.op == "call_module":
            return f"{n.target} ({type(self.mods[n.target]).__name__})"
        if n.op == "call_method":
            return f"Tensor.{n.target} ({n.name})"
        t = n.target
        mod = getattr(t, "__module__", None) or ""
        name = getattr(t, "__name__", None) or repr(t)
        if mod in ("_operator", "operator"):
            mod = "operator"
        mod = {"torch._C._nn": "torch.nn.functional", "torch._C._VariableFunctions": "torch"}.get(mod, mod)
        return f"{mod}.{name} ({n.name})" if mod and mod != "builtins" else f"{name} ({n.name})"

    def opaque(self, n: fx.Node, why: str | None = None) -> None:
        self.bad(self.spaces_in((n.args, n.kwargs)), why or f"flows into {self.what(n)}, which is not supported")
        return None

    def extras_ok(self, n: fx.Node, main: Any) -> bool:
        """True when no argument besides the main input carries tracked channels."""
        return not self.spaces_in((n.args, n.kwargs), skip=main if isinstance(main, fx.Node) else None)

    def passthrough(self, n: fx.Node, x: Any, spatial: int | None = None) -> _Layout | None:
        """An op that keeps the channel axis and maps zero channels to zero channels; `spatial`:
        it works on the last `spatial` axes (0: all but the first two), which must not hold the
        channels."""
        if isinstance(x, fx.Node) and x in (n.args[1:] if n.args else ()):  # the input also as an option
            return self.opaque(n)
        if not self.extras_ok(n, x):
            return self.opaque(n)
        lay = self.lay(x)
        if lay is None:
            return None
        sin, sout = _shape(x), _shape(n)
        if sin is None or sout is None or len(sin) != len(sout) or sin[lay.axis] != sout[lay.axis]:
            return self.opaque(n, f"{self.what(n)} changes the channel axis")
        if spatial is not None and lay.axis >= len(sin) - (spatial or len(sin) - 2):
            return self.opaque(n, f"{self.what(n)} works along the channel axis")
        return lay

    # --- the walk ----------------------------------------------------------------------------

    def run(self) -> None:
        for n in self.gm.graph.nodes:
            self.val[n] = self.visit(n)

    def visit(self, n: fx.Node) -> Any:
        if n.op in ("placeholder", "get_attr"):
            return None
        if n.op == "output":
            self.bad(self.spaces_in(n.args), "reaches the model output")
            return None
        if n.op == "call_module":
            return self.module(n)
        if n.op == "call_function":
            return self.function(n)
        if n.op == "call_method":
            return self.method(n)
        return self.opaque(n)

    def module(self, n: fx.Node) -> Any:
        name, mod = n.target, self.mods[n.target]
        t = type(mod)
        if mod._forward_hooks or mod._forward_pre_hooks or hasattr(mod, "parametrizations"):
            return self.refuse(n, mod, "has forward hooks or parametrizations")
        if len(n.args) != 1 or n.kwargs:
            return self.refuse(n, mod)
        x = n.args[0]
        if t in _CONVS:
            return self.conv(n, name, mod, x)
        if t is nn.Linear:
            return self.linear(n, name, mod, x)
        if t in _BATCHNORMS:
            return self.batchnorm(n, name, mod, x)
        if t is nn.Flatten:
            return self.flatten(n, x, mod.start_dim, mod.end_dim)
        if t in _SPATIAL_MODULES:
            return self.passthrough(n, x, _SPATIAL_MODULES[t])
        if t in _ZERO_MODULES:
            lo, hi = (mod.min_val, mod.max_val) if isinstance(mod, nn.Hardtanh) else (0, 0)
            if lo <= 0 <= hi:
                return self.passthrough(n, x)
        if t in _NONZERO_MODULES or t in _ZERO_MODULES:
            return self.opaque(n, f"passes through {self.what(n)}, which does not map 0 to 0")
        return self.refuse(n, mod)

    def refuse(self, n: fx.Node, mod: nn.Module, why: str = "is not supported") -> None:
        """A layer this analysis does not follow: its inputs are not prunable, and the output
        channels of a Conv / Linear kind of layer are listed as not prunable."""
        self.opaque(n, f"flows into {self.what(n)}, which {why}")
        if isinstance(mod, (nn.modules.conv._ConvNd, nn.Linear)):
            out = getattr(mod, "out_channels", None) or getattr(mod, "out_features", 0)
            self.sp.bad(self.sp.new(out, n.target), f"{self.what(n)} {why}")
        return None

    def function(self, n: fx.Node) -> Any:
        f = n.target
        x = n.args[0] if n.args else None
        if f in _ZERO_FUNCS:
            return self.passthrough(n, x)
        if f in _SPATIAL_FUNCS:
            return self.passthrough(n, x, _SPATIAL_FUNCS[f])
        if f in _CLAMPS:
            if f in _HARDTANH:
                return self.clamp(n, x, _arg(n, 1, "min_val", -1.0), _arg(n, 2, "max_val", 1.0))
            return self.clamp(n, x, _arg(n, 1, "min"), _arg(n, 2, "max"))
        if f in _NONZERO_FUNCS:
            return self.opaque(n, f"passes through {self.what(n)}, which does not map 0 to 0")
        if f in _ADD or f in _MUL or f in _DIV:
            kind = "add" if f in _ADD else "mul" if f in _MUL else "div"
            return self.binary(n, kind)
        if f in _CAT:
            return self.cat(n)
        if f is torch.flatten:
            return self.flatten(n, x, _arg(n, 1, "start_dim", 0), _arg(n, 2, "end_dim", -1))
        if f is torch.reshape:
            return self.reshape(n, x, _arg(n, 1, "shape"))
        if f is torch.permute:
            return self.permute(n, x, _arg(n, 1, "dims"))
        if f in (torch.transpose, torch.swapaxes, torch.swapdims):
            return self.transpose(n, x, _arg(n, 1, "dim0"), _arg(n, 2, "dim1"))
        if f in (torch.mean, torch.sum, torch.amax, torch.amin):
            return self.reduce(n, x, _arg(n, 1, "dim"), _arg(n, 2, "keepdim", False))
        if f is torch.unsqueeze:
            return self.unsqueeze(n, x, _arg(n, 1, "dim"))
        if f is torch.squeeze:
            return self.squeeze(n, x, _arg(n, 1, "dim"))
        if f is getattr and len(n.args) == 2:
            return self.attribute(n, x, n.args[1])
        if f is operator.getitem:
            return self.getitem(n, x, n.args[1])
        return self.opaque(n)

    def method(self, n: fx.Node) -> Any:
        m, x = n.target, n.args[0]
        if m in _ZERO_METHODS:
            return self.passthrough(n, x)
        if m in ("clamp", "clamp_", "clip", "clip_"):
            return self.clamp(n, x, _arg(n, 1, "min"), _arg(n, 2, "max"))
        if m in _NONZERO_METHODS:
            return self.opaque(n, f"passes through {self.what(n)}, which does not map 0 to 0")
        if m in _METHOD_BINARY:
            return self.binary(n, _METHOD_BINARY[m])
        if m == "flatten":
            return self.flatten(n, x, _arg(n, 1, "start_dim", 0), _arg(n, 2, "end_dim", -1))
        if m in ("view", "reshape"):
            shape = list(n.args[1:]) or n.kwargs.get("shape") or n.kwargs.get("size")
            if len(n.args) == 2 and isinstance(n.args[1], (tuple, list)):
                shape = n.args[1]
            return self.reshape(n, x, shape)
        if m == "permute":
            dims = list(n.args[1:]) or n.kwargs.get("dims")
            if len(n.args) == 2 and isinstance(n.args[1], (tuple, list)):
                dims = n.args[1]
            return self.permute(n, x, dims)
        if m in ("transpose", "swapaxes", "swapdims"):
            return self.transpose(n, x, _arg(n, 1, "dim0"), _arg(n, 2, "dim1"))
        if m in _REDUCE:
            return self.reduce(n, x, _arg(n, 1, "dim"), _arg(n, 2, "keepdim", False))
        if m == "unsqueeze":
            return self.unsqueeze(n, x, _arg(n, 1, "dim"))
        if m == "squeeze":
            return self.squeeze(n, x, _arg(n, 1, "dim"))
        if m == "size":
            return self.size(n, x, _arg(n, 1, "dim"))
        if m == "dim":
            return None
        return self.opaque(n)

    # --- layers ------------------------------------------------------------------------------

    def conv(self, n: fx.Node, name: str, mod: nn.Module, x: Any) -> _Layout | None:
        d = len(mod.kernel_size)
        sin, sout = _shape(x), _shape(n)
        lay = self.lay(x)
        if sin is None or sout is None:
            return self.opaque(n)
        if lay is not None and lay.axis != len(sin) - d - 1:
            self.bad(lay, f"reaches {name} along an axis that is not its channel axis")
            lay = None
        calls = self.calls[name]
        shared = f"{name} is called {calls} times" if calls > 1 else None
        out_axis = len(sout) - d - 1
        g = mod.groups
        if g == 1:
            for s, off, per in lay.segs if lay else ():
                self.sp.add("consumers", s, Slice(f"{name}.weight", 1, per, off))
                if shared:
                    self.sp.bad(s, shared)
            return self.producer(name, mod, mod.out_channels, out_axis, shared)
        if g == mod.in_channels:  # depthwise: channel c makes output channels [c·k, (c+1)·k)
            k = mod.out_channels // mod.in_channels
            if lay is None:
                return None
            for s, off, per in lay.segs:
                self.sp.add("producers", s, Slice(f"{name}.weight", 0, per * k, off * k))
                if mod.bias is not None:
                    self.sp.add("producers", s, Slice(f"{name}.bias", 0, per * k, off * k))
                if shared:
                    self.sp.bad(s, shared)
            return lay.scaled(k).moved(out_axis)
        why = f"{name} is a grouped convolution (groups={g}) whose groups must keep equal sizes"
        if lay is not None:
            self.bad(lay, why)
        out = self.producer(name, mod, mod.out_channels, out_axis, why)
        return out

    def linear(self, n: fx.Node, name: str, mod: nn.Linear, x: Any) -> _Layout | None:
        sin, sout = _shape(x), _shape(n)
        if sin is None or sout is None:
            return self.opaque(n)
        lay = self.lay(x)
        calls = self.calls[name]
        shared = f"{name} is called {calls} times" if calls > 1 else None
        if lay is not None and lay.axis != len(sin) - 1:
            self.bad(lay, f"reaches {name} along an axis that is not its feature axis")
            lay = None
        for s, off, per in lay.segs if lay else ():
            self.sp.add("consumers", s, Slice(f"{name}.weight", 1, per, off))
            if shared:
                self.sp.bad(s, shared)
        return self.producer(name, mod, mod.out_features, len(sout) - 1, shared)

    def producer(self, name: str, mod: nn.Module, channels: int, axis: int, why: str | None) -> _Layout:
        s = self.sp.new(channels, name)
        self.sp.add("producers", s, Slice(f"{name}.weight", 0))
        if mod.bias is not None:
            self.sp.add("producers", s, Slice(f"{name}.bias", 0))
        if why:
            self.sp.bad(s, why)
        return _Layout(axis, ((s, 0, 1),))

    def batchnorm(self, n: fx.Node, name: str, mod: nn.Module, x: Any) -> _Layout | None:
        lay = self.passthrough(n, x)
        if lay is None:
            return None
        calls = self.calls[name]
        if lay.axis != 1:
            self.bad(lay, f"reaches {name} along an axis that is not its channel axis")
        elif not mod.affine:
            self.bad(lay, f"passes through {name}, a BatchNorm without affine parameters (it does not map 0 to 0)")
        elif calls > 1:
            self.bad(lay, f"{name} is called {calls} times")
        for s, off, per in lay.segs:
            if mod.affine:
                self.sp.add("producers", s, Slice(f"{name}.weight", 0, per, off))
                self.sp.add("producers", s, Slice(f"{name}.bias", 0, per, off))
            if mod.running_mean is not None:
                self.sp.add("buffers", s, Slice(f"{name}.running_mean", 0, per, off))
                self.sp.add("buffers", s, Slice(f"{name}.running_var", 0, per, off))
        return lay

    # --- elementwise arithmetic --------------------------------------------------------------

    def clamp(self, n: fx.Node, x: Any, lo: Any, hi: Any) -> _Layout | None:
        ok = all(v is None or isinstance(v, (int, float)) for v in (lo, hi))
        if ok and (lo is None or lo <= 0) and (hi is None or hi >= 0):
            return self.passthrough(n, x)
        return self.opaque(n, f"passes through {self.what(n)}, which does not map 0 to 0")

    def binary(self, n: fx.Node, kind: str) -> _Layout | None:
        if len(n.args) != 2 or set(n.kwargs) - {"alpha", "rounding_mode"}:
            return self.opaque(n)
        a, b = n.args
        la, lb = self.lay(a), self.lay(b)
        out = _shape(n)
        if la is None and lb is None:
            return None if not self.spaces_in(n.args) else self.opaque(n)
        if out is None:
            return self.opaque(n)
        if kind == "div" and lb is not None:
            return self.opaque(n, f"divides by tracked channels at {self.what(n)}")
        if la is not None and lb is not None:
            return self.align(n, [(la, _shape(a)), (lb, _shape(b))], len(out))
        (lay, x), other = ((la, a), b) if la is not None else ((lb, b), a)
        result = lay.moved(lay.axis + len(out) - len(_shape(x)))
        if isinstance(other, fx.Node) and isinstance(self.val.get(other), _ShapeOf):
            return self.opaque(n)
        number = isinstance(other, (int, float)) and not isinstance(other, bool)
        runtime_number = isinstance(other, fx.Node) and _shape(other) is None
        if kind == "add":
            if number and other == 0:
                return result
            self.bad(lay, f"is added to values outside the group at {self.what(n)}")
            return result
        if kind == "div":
            if (number and other != 0) or runtime_number:
                return result
            return self.opaque(n, f"is divided by a tensor at {self.what(n)}")
        if number or runtime_number:  # mul by a number
            return result
        so = _shape(other)
        pos = result.axis - (len(out) - len(so)) if so is not None else -1
        if so is not None and (pos < 0 or so[pos] == 1):  # broadcast along the channels: 0·y = 0
            return result
        return self.opaque(n, f"is multiplied by a tensor with its own channels at {self.what(n)}")

    def align(self, n: fx.Node, items: list[tuple[_Layout, tuple[int, ...]]], out_nd: int) -> _Layout | None:
        """Tensors combined elementwise: their channels must coincide, and then merge."""
        axes = {lay.axis + out_nd - len(s) for lay, s in items}
        sizes = {s[lay.axis] for lay, s in items}
        sigs = {tuple((off, per, self.sp.channels[sp]) for sp, off, per in lay.segs) for lay, _ in items}
        if len(axes) != 1 or len(sizes) != 1 or len(sigs) != 1:
            for lay, _ in items:
                self.bad(lay, f"meets differently arranged channels at {self.what(n)}")
            return None
        first = items[0][0]
        for lay, _ in items[1:]:
            for (s, _, _), (t, _, _) in zip(first.segs, lay.segs):
                self.sp.union(s, t)
        return first.moved(axes.pop())

    def cat(self, n: fx.Node) -> _Layout | None:
        xs, dim = _arg(n, 0, "tensors"), _arg(n, 1, "dim", 0)
        out = _shape(n)
        if not isinstance(xs, (list, tuple)) or not isinstance(dim, int) or out is None or \
                any(_shape(x) is None for x in xs) or set(n.kwargs) - {"tensors", "dim"}:
            return self.opaque(n)
        dim %= len(out)
        segs: list[tuple[int, int, int]] = []
        start = 0
        for x in xs:
            lay = self.lay(x)
            if lay is not None:
                if lay.axis != dim:
                    return self.opaque(n, f"is concatenated along another axis at {self.what(n)}")
                segs += [(s, start + off, per) for s, off, per in lay.segs]
            start += _shape(x)[dim]
        if any(isinstance(self.val.get(x), _ShapeOf) for x in xs):
            return self.opaque(n)
        return _Layout(dim, tuple(segs)) if segs else None

    # --- shapes ------------------------------------------------------------------------------

    def flatten(self, n: fx.Node, x: Any, start: Any, end: Any) -> _Layout | None:
        if not self.extras_ok(n, x):
            return self.opaque(n)
        lay = self.lay(x)
        if lay is None:
            return None
        sin, sout = _shape(x), _shape(n)
        if sin is None or sout is None or not isinstance(start, int) or not isinstance(end, int):
            return self.opaque(n)
        if not sin:
            return self.opaque(n)
        start, end = start % len(sin), end % len(sin)
        ax = lay.axis
        if start >= end or ax < start:
            return lay
        if ax > end:
            return lay.moved(ax - (end - start))
        if ax != start:
            return self.opaque(n, f"{self.what(n)} flattens the channel axis into the axes before it")
        return lay.scaled(math.prod(sin[ax + 1:end + 1]))

    def reshape(self, n: fx.Node, x: Any, shape: Any) -> _Layout | None:
        lay = self.lay(x)
        if lay is None:
            return None if self.extras_ok(n, x) else self.opaque(n)
        sin, sout = _shape(x), _shape(n)
        if sin is None or sout is None or not isinstance(shape, (list, tuple)) or len(shape) != len(sout) \
                or not self.extras_ok(n, x):
            return self.opaque(n)
        ax = lay.axis
        p = 0
        while p < min(len(sin), len(sout)) and sin[p] == sout[p]:
            p += 1
        hard = f"flows into {self.what(n)} with a hard-coded size (use -1 or torch.flatten)"
        if ax < p:  # the axes up to the channels are unchanged
            return lay if shape[ax] == -1 else self.opaque(n, hard)
        q = len(sin) - (len(sout) - ax - 1)
        if ax != p or q <= ax or tuple(sin[q:]) != tuple(sout[ax + 1:]) or math.prod(sin[ax:q]) != sout[ax]:
            return self.opaque(n, f"{self.what(n)} reshapes the channel axis in a way that is not a flatten")
        if shape[ax] != -1:
            return self.opaque(n, hard)
        return lay.scaled(math.prod(sin[ax + 1:q]))

    def permute(self, n: fx.Node, x: Any, dims: Any) -> _Layout | None:
        lay = self.lay(x)
        if lay is None:
            return None if self.extras_ok(n, x) else self.opaque(n)
        if not isinstance(dims, (list, tuple)) or not all(isinstance(d, int) for d in dims):
            return self.opaque(n)
        dims = [d % len(dims) for d in dims]
        return lay.moved(dims.index(lay.axis))

    def transpose(self, n: fx.Node, x: Any, a: Any, b: Any) -> _Layout | None:
        lay, sin = self.lay(x), _shape(x)
        if lay is None:
            return None if self.extras_ok(n, x) else self.opaque(n)
        if sin is None or not isinstance(a, int) or not isinstance(b, int):
            return self.opaque(n)
        a, b = a % len(sin), b % len(sin)
        return lay.moved(b if lay.axis == a else a if lay.axis == b else lay.axis)

    def reduce(self, n: fx.Node, x: Any, dim: Any, keepdim: Any) -> _Layout | None:
        lay, sin = self.lay(x), _shape(x)
        if lay is None:
            return None if self.extras_ok(n, x) else self.opaque(n)
        if isinstance(dim, int):
            dim = [dim]
        if sin is None or not isinstance(dim, (list, tuple)) or not dim or not isinstance(keepdim, bool) \
                or not all(isinstance(d, int) for d in dim) or _shape(n) is None:
            return self.opaque(n, f"{self.what(n)} reduces over the channel axis")
        dims = {d % len(sin) for d in dim}
        if lay.axis in dims:
            return self.opaque(n, f"{self.what(n)} reduces over the channel axis")
        return lay if keepdim else lay.moved(lay.axis - sum(d < lay.axis for d in dims))

    def unsqueeze(self, n: fx.Node, x: Any, d: Any) -> _Layout | None:
        lay, sout = self.lay(x), _shape(n)
        if lay is None:
            return None if self.extras_ok(n, x) else self.opaque(n)
        if sout is None or not isinstance(d, int):
            return self.opaque(n)
        d %= len(sout)
        return lay.moved(lay.axis + (d <= lay.axis))

    def squeeze(self, n: fx.Node, x: Any, d: Any) -> _Layout | None:
        lay, sin, sout = self.lay(x), _shape(x), _shape(n)
        if lay is None:
            return None if self.extras_ok(n, x) else self.opaque(n)
        if sin is None or sout is None:
            return self.opaque(n)
        if d is None:
            dims = {i for i, s in enumerate(sin) if s == 1}
        elif isinstance(d, int):
            dims = {d % len(sin)} if sin[d % len(sin)] == 1 else set()
        elif isinstance(d, (tuple, list)) and all(isinstance(i, int) for i in d):
            dims = {i % len(sin) for i in d if sin[i % len(sin)] == 1}
        else:
            return self.opaque(n)
        if lay.axis in dims or len(sout) != len(sin) - len(dims):
            return self.opaque(n, f"{self.what(n)} squeezes the channel axis")
        return lay.moved(lay.axis - sum(i < lay.axis for i in dims))

    def size(self, n: fx.Node, x: Any, d: Any) -> Any:
        lay, sin = self.lay(x), _shape(x)
        if lay is None:
            return None if self.extras_ok(n, x) else self.opaque(n)
        if sin is None:
            return self.opaque(n)
        if d is None:
            return _ShapeOf(lay, len(sin))
        if not isinstance(d, int) or d % len(sin) == lay.axis:
            return self.opaque(n, f"its channel count is read by {self.what(n)}")
        return None

    def attribute(self, n: fx.Node, x: Any, attr: Any) -> Any:
        lay, sin = self.lay(x), _shape(x)
        if attr in ("dtype", "device", "ndim", "is_cuda", "requires_grad"):
            return None
        if attr == "shape" and lay is not None and sin is not None:
            return _ShapeOf(lay, len(sin))
        return None if lay is None and self.extras_ok(n, None) else self.opaque(n)

    def getitem(self, n: fx.Node, x: Any, index: Any) -> Any:
        v = self.val.get(x) if isinstance(x, fx.Node) else None
        if isinstance(v, _ShapeOf):
            if isinstance(index, int):
                picked = {index % v.ndim}
            elif isinstance(index, slice) and all(i is None or isinstance(i, int)
                                                  for i in (index.start, index.stop, index.step)):
                picked = set(range(v.ndim)[index])
            else:
                return self.opaque(n)
            if v.layout.axis in picked and n.users:
                return self.opaque(n, f"its channel count is read by {self.what(n)}")
            return None
        if isinstance(v, _Layout):
            return self.opaque(n, f"is indexed by {self.what(n)}")
        return None if not self.spaces_in(n.args) else self.opaque(n)

    # --- result ------------------------------------------------------------------------------

    def groups(self) -> tuple[list[ChannelGroup], list[str]]:
        params = dict(self.model.named_parameters(remove_duplicate=False))
        buffers = dict(self.model.named_buffers(remove_duplicate=False))
        names_of: dict[int, list[str]] = {}
        for name, p in params.items():
            names_of.setdefault(id(p), []).append(name)
        direct = sorted({str(n.target) for n in self.gm.graph.nodes if n.op == "get_attr"})
        roots = sorted({self.sp.find(s) for s in range(len(self.sp.parent))})
        found: list[tuple[ChannelGroup, list[str], list[str]]] = []
        for r in roots:
            sl = {k: tuple(dict.fromkeys(v)) for k, v in self.sp.slices[r].items()}
            reasons = list(self.sp.reasons[r])
            c = self.sp.channels[r]
            for kind, table in (("producers", params), ("consumers", params), ("buffers", buffers)):
                for s in sl[kind]:
                    used = [a for a in direct if s.name == a or s.name.startswith(a + ".")]
                    if used:
                        reasons.append(f"{s.name} is used directly by the forward code ({used[0]})")
                    t = table.get(s.name)
                    if t is None:
                        reasons.append(f"{s.name} is not a plain {'buffer' if kind == 'buffers' else 'parameter'}")
                    elif s.dim >= t.dim() or t.shape[s.dim] < s.offset + c * s.per:
                        reasons.append(f"{s.name} does not have the expected shape")
                    elif kind != "buffers" and len(names_of[id(t)]) > 1:
                        others = [m for m in names_of[id(t)] if m != s.name]
                        reasons.append(f"{s.name} is shared with {others[0]}")
            mods = tuple(dict.fromkeys(s.name.rpartition(".")[0] for k in ("producers", "buffers", "consumers")
                                       for s in sl[k]))
            g = ChannelGroup(c, sl["producers"], sl["buffers"], sl["consumers"], mods)
            found.append((g, reasons, list(dict.fromkeys(self.sp.origin[r]))))
        # safety net: no prunable group may slice entries that another group also claims
        claims: dict[tuple[str, int], list[tuple[int, int, int]]] = {}
        for i, (g, _, _) in enumerate(found):
            for s in g.producers + g.buffers + g.consumers:
                claims.setdefault((s.name, s.dim), []).append((s.offset, s.offset + g.channels * s.per, i))
        for (name, _), spans in claims.items():
            for k, (a0, a1, i) in enumerate(spans):
                if any(m != k and b0 < a1 and a0 < b1 for m, (b0, b1, _) in enumerate(spans)):
                    found[i][1].append(f"{name} is claimed twice")
        good, notes = [], []
        for g, reasons, origin in found:
            if not reasons:
                good.append(g)
                continue
            label = ", ".join(origin[:3]) + (f" and {len(origin) - 3} more" if len(origin) > 3 else "")
            uniq = list(dict.fromkeys(reasons))
            more = f" (and {len(uniq) - 2} more reasons)" if len(uniq) > 2 else ""
            notes.append(f"{label} ({g.channels} channels): " + "; ".join(uniq[:2]) + more)
        return good, notes


def channel_groups(model: nn.Module, example: tuple[Tensor, ...]) -> tuple[list[ChannelGroup], list[str]]:
    """The prunable channel groups of a model, plus one-line reasons for channels found but not prunable.

    `example` holds the model's positional inputs (one batch); it is run once, in eval mode and
    without gradients, for the shapes. The model itself is not changed."""
    if isinstance(example, Tensor):
        example = (example,)
    if not isinstance(example, tuple) or not all(isinstance(e, Tensor) for e in example):
        raise ConfigError("example must be a tuple of tensors (the model's positional inputs)")
    if isinstance(model, torch.jit.ScriptModule) or not isinstance(model, nn.Module):
        raise ConfigError(f"channel_groups needs a plain nn.Module (TorchScript cannot be traced), "
                          f"got {type(model).__name__}")
    try:
        gm = fx.symbolic_trace(model)
    except Exception as e:  # noqa: BLE001 - any tracing failure means: cannot analyse
        raise ConfigError(f"cannot trace {type(model).__name__} with torch.fx ({_first_line(e)})") from None
    modes = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        with torch.no_grad():
            ShapeProp(gm).propagate(*(e.clone() for e in example))  # clones: the model may write into its input
    except Exception as e:  # noqa: BLE001
        raise ConfigError(f"the example does not run through {type(model).__name__} ({_first_line(e)})") from None
    finally:
        for m, mode in modes:
            m.training = mode
    a = _Analysis(model, gm)
    a.run()
    return a.groups()


# ---------------------------------------------------------------------------------------------
# shrinking


def _kept_indices(i: int, g: ChannelGroup, k: Any) -> Tensor:
    what = f"kept[{i}] (group of {g.modules[0] if g.modules else '?'}, {g.channels} channels)"
    if not isinstance(k, Tensor):
        try:
            k = torch.as_tensor(k)
        except Exception:  # noqa: BLE001
            raise ConfigError(f"{what} must be a 1-D tensor of channel indices") from None
    if k.dim() != 1 or k.dtype.is_floating_point or k.dtype.is_complex or k.dtype == torch.bool:
        raise ConfigError(f"{what} must be a 1-D integer tensor, got {k.dtype} of shape {tuple(k.shape)}")
    k = k.detach().to("cpu", torch.int64)
    if k.numel() == 0:
        raise ConfigError(f"{what} is empty: keep at least one channel")
    if k.numel() > g.channels:
        raise ConfigError(f"{what} has {k.numel()} indices, more than the group's channels")
    if int(k.min()) < 0 or int(k.max()) >= g.channels:
        raise ConfigError(f"{what} holds indices outside 0..{g.channels - 1}")
    if k.numel() > 1 and not bool((k[1:] > k[:-1]).all()):
        raise ConfigError(f"{what} must be sorted ascending without repeats")
    return k


def _resize(name: str, mod: nn.Module) -> None:
    """Set the size attributes of a layer from its (already sliced) tensors."""
    t = type(mod)
    if t in _CONVS:
        w = mod.weight
        if mod.groups == 1:
            mod.in_channels, mod.out_channels = w.shape[1], w.shape[0]
        elif mod.groups == mod.in_channels and w.shape[1] == 1:
            k = mod.out_channels // mod.in_channels
            if w.shape[0] % k:
                raise ConfigError(f"cannot shrink depthwise {name}: {w.shape[0]} filters for multiplier {k}")
            mod.out_channels = w.shape[0]
            mod.in_channels = mod.groups = w.shape[0] // k
        else:
            raise ConfigError(f"cannot shrink {name}: a grouped convolution (groups={mod.groups})")
        if mod.bias is not None and mod.bias.shape[0] != mod.out_channels:
            raise ConfigError(f"cannot shrink {name}: its bias and weight were sliced differently")
    elif t is nn.Linear:
        mod.in_features, mod.out_features = mod.weight.shape[1], mod.weight.shape[0]
        if mod.bias is not None and mod.bias.shape[0] != mod.out_features:
            raise ConfigError(f"cannot shrink {name}: its bias and weight were sliced differently")
    elif t in _BATCHNORMS:
        sizes = {x.shape[0] for x in (mod.weight, mod.bias, mod.running_mean, mod.running_var) if x is not None}
        if len(sizes) != 1:
            raise ConfigError(f"cannot shrink {name}: its parameters and running statistics were sliced differently")
        mod.num_features = sizes.pop()
    else:
        raise ConfigError(f"cannot shrink {name}: {t.__name__} is not a layer shrink knows how to resize")


def shrink(model: nn.Module, groups: Sequence[ChannelGroup], kept: Sequence[Tensor]) -> nn.Module:
    """A deep copy of the model whose layers are physically smaller: for group i only channels
    kept[i] (sorted int64 indices) remain — producers, buffers and consumers sliced, module
    attributes (in_channels/out_channels/in_features/out_features/num_features, groups of
    depthwise convs) updated. The input model is unchanged."""
    groups, kept = list(groups), list(kept)
    if len(kept) != len(groups):
        raise ConfigError(f"shrink got {len(kept)} kept sets for {len(groups)} channel groups")
    if isinstance(model, torch.jit.ScriptModule):
        raise ConfigError("shrink needs a plain nn.Module, not TorchScript")
    params = dict(model.named_parameters(remove_duplicate=False))
    buffers = dict(model.named_buffers(remove_duplicate=False))
    aliases = Counter(id(p) for p in params.values())
    drop: dict[tuple[str, int], list[Tensor]] = {}
    spans: dict[tuple[str, int], list[tuple[int, int]]] = {}
    for i, (g, k) in enumerate(zip(groups, kept)):
        if not isinstance(g, ChannelGroup):
            raise ConfigError(f"groups[{i}] is a {type(g).__name__}, not a ChannelGroup")
        idx = _kept_indices(i, g, k)
        mask = torch.ones(g.channels, dtype=torch.bool)
        mask[idx] = False
        removed = mask.nonzero().reshape(-1)
        for kind, table, slices in (("parameter", params, g.producers + g.consumers),
                                    ("buffer", buffers, g.buffers)):
            for s in slices:
                t = table.get(s.name)
                if t is None:
                    raise ConfigError(f"group {i}: {s.name} is not a {kind} of {type(model).__name__}")
                if kind == "parameter" and aliases[id(t)] > 1:
                    raise ConfigError(f"group {i}: {s.name} is shared with another layer; cannot shrink it alone")
                if s.per < 1 or s.offset < 0 or not 0 <= s.dim < t.dim() or \
                        t.shape[s.dim] < s.offset + g.channels * s.per:
                    raise ConfigError(f"group {i}: {s} does not fit {s.name} of shape {tuple(t.shape)}")
                span = (s.offset, s.offset + g.channels * s.per)
                taken = spans.setdefault((s.name, s.dim), [])
                if any(a < span[1] and span[0] < b for a, b in taken):
                    raise ConfigError(f"group {i}: {s.name} along dim {s.dim} overlaps another slice")
                taken.append(span)
                rows = s.offset + (removed[:, None] * s.per + torch.arange(s.per)).reshape(-1)
                drop.setdefault((s.name, s.dim), []).append(rows)
    new = copy.deepcopy(model)
    touched: dict[str, nn.Module] = {}
    for (name, dim) in sorted(drop):
        modname, _, attr = name.rpartition(".")
        mod = new.get_submodule(modname)
        t = getattr(mod, attr)
        keep = torch.ones(t.shape[dim], dtype=torch.bool)
        keep[torch.cat(drop[(name, dim)])] = False
        data = t.detach().index_select(dim, keep.nonzero().reshape(-1).to(t.device)).clone()
        if isinstance(t, nn.Parameter):
            setattr(mod, attr, nn.Parameter(data, requires_grad=t.requires_grad))
        elif attr in mod._buffers:
            mod._buffers[attr] = data
        else:
            raise ConfigError(f"cannot shrink {name}: neither a parameter nor a buffer of {modname}")
        touched[modname] = mod
    for modname, mod in touched.items():
        _resize(modname, mod)
    return new
