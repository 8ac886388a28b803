"""What a device sees when it serves an ONNX file with onnxruntime: resident memory and latency.

`measure_onnx(path, feeds)` starts a fresh Python child process (so that torch and whatever else
the caller has loaded do not show up in the numbers) which:

1. imports numpy and onnxruntime and loads the input feeds from a temporary .npz file;
2. creates and runs a one-node session first (onnxruntime's one-time environment: thread pools,
   allocators, kernel registry, about 10 MiB whatever the model), then reads its resident set
   size (RSS) — the baseline, which thus excludes the interpreter, numpy, onnxruntime's own
   start-up and the inputs;
3. creates an `InferenceSession` on the CPU provider with intra_op_num_threads = `threads`,
   inter_op_num_threads = 1, sequential execution and the default graph optimisation level
   (ORT_ENABLE_ALL), i.e. what a deployer gets without tuning;
4. runs the session once on the feed of the smallest batch size, drops the outputs and reads the
   RSS again. `session_bytes` is this RSS minus the baseline: the loaded model (initializers after
   constant folding, pre-packed weights, parser leftovers the allocator keeps) plus the buffers
   onnxruntime only allocates on the first run (arena, activations of that batch size);
5. for each batch size, runs `warmup` untimed inferences and then `repeats` timed ones
   (time.perf_counter around `session.run`, inputs already in memory); `latency_ms[b]` is the
   median in milliseconds.

RSS is read from /proc/self/statm (resident pages × page size) on Linux. Elsewhere it falls back
to resource.getrusage(RUSAGE_SELF).ru_maxrss, which is the *peak* RSS so far (kB on Linux, bytes
on macOS), so there `session_bytes` is the growth of the peak, an upper bound of the former.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from typing import Mapping

import numpy as np

from ..errors import ConfigError

__all__ = ["DeviceFigures", "batch_feed", "measure_onnx"]


@dataclass(frozen=True)
class DeviceFigures:
    file_bytes: int  # size of the .onnx file on disk
    session_bytes: int  # RSS increase from session creation + its first run (see module docstring)
    latency_ms: dict[int, float]  # batch size → median latency of session.run, ms


# Runs in the child: argv = [model path, npz path, spec JSON]; prints one JSON object on stdout.
_CHILD = r"""
import json, os, statistics, sys, time
import numpy as np
import onnxruntime as ort

def rss():
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        import resource
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024

path, npz, spec = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
with np.load(npz, allow_pickle=False) as z:
    feeds = {}
    for batch, name, key in spec["inputs"]:
        feeds.setdefault(batch, {})[name] = np.ascontiguousarray(z[key])
so = ort.SessionOptions()
so.intra_op_num_threads = spec["threads"]
so.inter_op_num_threads = 1
so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
warm = ort.InferenceSession(spec["empty"], sess_options=so, providers=["CPUExecutionProvider"])
warm.run(None, {"x": np.zeros(1, np.float32)})  # onnxruntime's one-time environment (~10 MiB) is not the model's
base = rss()
sess = ort.InferenceSession(path, sess_options=so, providers=["CPUExecutionProvider"])
out = sess.run(None, feeds[min(feeds)])
del out
session_bytes = rss() - base
latency = {}
for batch in sorted(feeds):
    feed = feeds[batch]
    for _ in range(spec["warmup"]):
        sess.run(None, feed)
    times = []
    for _ in range(spec["repeats"]):
        t = time.perf_counter()
        sess.run(None, feed)
        times.append(time.perf_counter() - t)
    latency[batch] = statistics.median(times) * 1e3
print(json.dumps({"session_bytes": session_bytes, "latency_ms": latency}))
"""


def _write_empty(path: str) -> None:
    """A one-node model (Relu of a float vector) that starts onnxruntime's environment in the child."""
    import onnx
    from onnx import TensorProto, helper

    vi = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1]) for n in ("x", "y")]
    g = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "empty", vi[:1], vi[1:])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)]), path)


def batch_feed(feed: Mapping[str, np.ndarray], batch: int) -> dict[str, np.ndarray]:
    """Each array of an example feed with axis 0 resized to `batch` by repeating its rows cyclically
    (row i of the result is row i mod n of the input; the first `batch` rows if n ≥ batch)."""
    if not isinstance(batch, int) or batch < 1:
        raise ConfigError(f"batch must be a positive int, got {batch!r}")
    out = {}
    for name, a in feed.items():
        a = np.asarray(a)
        if a.ndim == 0 or a.shape[0] == 0:
            raise ConfigError(f"feed {name!r} has shape {a.shape}: needs an axis 0 of length ≥ 1 to tile")
        out[name] = np.take(a, np.arange(batch) % a.shape[0], axis=0)
    return out


def measure_onnx(path, feeds: Mapping[int, Mapping[str, np.ndarray]], *, threads: int = 1, repeats: int = 50,
                 warmup: int = 5, timeout: float = 300) -> DeviceFigures:
    """Memory and latency of an onnxruntime CPU session on `path`, measured in a fresh process.

    feeds: batch size → input feed for the session (numpy arrays by input name). See the module
    docstring for exactly what is measured. Raises ConfigError (one line) if the file cannot be
    read, the child fails (its last stderr line is quoted) or it runs longer than `timeout` s.
    """
    path = os.fspath(path)
    try:
        file_bytes = os.path.getsize(path)
    except OSError as e:
        raise ConfigError(f"cannot read ONNX file {path!r}: {e.strerror}") from None
    if not feeds:
        raise ConfigError("feeds is empty: give at least one batch size → feed")
    for name, v, low in (("threads", threads, 1), ("repeats", repeats, 1), ("warmup", warmup, 0)):
        if not isinstance(v, int) or v < low:
            raise ConfigError(f"{name} must be an int ≥ {low}, got {v!r}")
    arrays, inputs = {}, []
    for batch, feed in feeds.items():
        if not isinstance(batch, int) or batch < 1:
            raise ConfigError(f"feeds keys must be positive int batch sizes, got {batch!r}")
        for name, a in feed.items():
            key = f"a{len(arrays)}"
            arrays[key] = np.asarray(a)
            inputs.append([batch, name, key])
    with tempfile.TemporaryDirectory(prefix="lccompress-rt-") as tmp:
        empty = os.path.join(tmp, "empty.onnx")
        _write_empty(empty)
        spec = json.dumps({"inputs": inputs, "threads": threads, "repeats": repeats, "warmup": warmup, "empty": empty})
        npz = os.path.join(tmp, "feeds.npz")
        np.savez(npz, **arrays)
        try:
            proc = subprocess.run([sys.executable, "-c", _CHILD, os.path.abspath(path), npz, spec],
                                  capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise ConfigError(f"measuring {path!r} took longer than timeout={timeout} s") from None
    if proc.returncode != 0:
        lines = [ln.strip() for ln in proc.stderr.splitlines() if ln.strip()]
        last = lines[-1] if lines else f"exit status {proc.returncode}"
        raise ConfigError(f"onnxruntime failed on {path!r}: {last}")
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    return DeviceFigures(file_bytes=file_bytes, session_bytes=int(res["session_bytes"]),
                         latency_ms={int(b): float(ms) for b, ms in res["latency_ms"].items()})

