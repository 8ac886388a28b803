"""Device figures of an ONNX file: the session's RSS growth tracks the initializer bytes (known
independently: rows × cols × 4), latencies are positive and finite, batch_feed tiles axis 0,
and failures come back as one-line ConfigErrors."""

import math
import os

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from lccompress.artifact.runtime import DeviceFigures, batch_feed, measure_onnx
from lccompress.errors import ConfigError

MiB = 1 << 20
IN = 2048


def matmul_model(path, out_features):
    """Y = X @ W with W a random fp32 (IN, out_features) initializer; X is (batch, IN)."""
    w = np.random.default_rng(0).standard_normal((IN, out_features), dtype=np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["X", "W"], ["Y"])], "mm",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["N", IN])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["N", out_features])],
        [numpy_helper.from_array(w, "W")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path, w.nbytes


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("rt")
    x = np.random.default_rng(1).standard_normal((1, IN), dtype=np.float32)
    feeds = {b: batch_feed({"X": x}, b) for b in (1, 8)}
    out = {}
    for name, cols in (("big", 2048), ("small", 256)):
        path, nbytes = matmul_model(tmp / f"{name}.onnx", cols)
        out[name] = (path, nbytes, measure_onnx(path, feeds, repeats=10, warmup=2))
    return out


def test_session_bytes_track_initializer_bytes(measured):
    (_, big_w, big), (_, small_w, small) = measured["big"], measured["small"]
    assert big_w == 16 * MiB and small_w == 2 * MiB
    assert isinstance(big, DeviceFigures)
    assert big.session_bytes - small.session_bytes >= 10 * MiB, (big, small)
    assert big.session_bytes >= big_w // 2  # the weights are resident, whatever else is counted


def test_file_bytes_and_latencies(measured):
    for path, _, fig in measured.values():
        assert fig.file_bytes == os.path.getsize(path)
        assert sorted(fig.latency_ms) == [1, 8]
        assert all(math.isfinite(ms) and ms > 0 for ms in fig.latency_ms.values()), fig


def test_batch_feed_tiles_axis0():
    a = np.arange(6, dtype=np.float32).reshape(3, 2)
    b = np.array([[7], [8]], dtype=np.int64)
    out = batch_feed({"a": a, "b": b}, 7)
    assert out["a"].shape == (7, 2) and out["b"].shape == (7, 1)
    assert out["a"].dtype == np.float32 and out["b"].dtype == np.int64
    for i in range(7):
        np.testing.assert_array_equal(out["a"][i], a[i % 3])
        np.testing.assert_array_equal(out["b"][i], b[i % 2])
    np.testing.assert_array_equal(batch_feed({"a": a}, 2)["a"], a[:2])
    with pytest.raises(ConfigError):
        batch_feed({"a": a}, 0)
    with pytest.raises(ConfigError):
        batch_feed({"s": np.float32(1.0)}, 2)


def test_corrupt_file_is_one_line_config_error(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x08\x07 this is not a protobuf model \xff\xfe" * 10)
    with pytest.raises(ConfigError) as e:
        measure_onnx(bad, {1: {"X": np.zeros((1, IN), np.float32)}}, repeats=1, warmup=0)
    msg = str(e.value)
    assert "\n" not in msg and "bad.onnx" in msg, msg


def test_missing_file_and_bad_arguments(tmp_path):
    feed = {1: {"X": np.zeros((1, IN), np.float32)}}
    with pytest.raises(ConfigError, match="cannot read"):
        measure_onnx(tmp_path / "absent.onnx", feed)
    path, _ = matmul_model(tmp_path / "m.onnx", 8)
    with pytest.raises(ConfigError):
        measure_onnx(path, {})
    with pytest.raises(ConfigError):
        measure_onnx(path, feed, repeats=0)


def test_timeout_is_config_error(tmp_path):
    path, _ = matmul_model(tmp_path / "m.onnx", 8)
    with pytest.raises(ConfigError, match="timeout"):
        measure_onnx(path, {1: {"X": np.zeros((1, IN), np.float32)}}, timeout=0.01)
