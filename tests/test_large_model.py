"""A model past protobuf's 2 GB limit, converted end to end. It takes about two minutes and
11 GB of memory, so `pytest` skips it; `.ci/run` runs it with HASTE_LARGE_MODEL_TEST=1."""

import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from haste_onnx import convert, make_session

pytestmark = pytest.mark.skipif(
    os.environ.get("HASTE_LARGE_MODEL_TEST") != "1",
    reason="needs about 11 GB of memory: set HASTE_LARGE_MODEL_TEST=1",
)

FLOATS = 550_000_000  # 2.2 GB


def test_a_model_past_2_gb_converts_writes_and_runs(tmp_path):
    """A 16-channel Conv, and a 2.2 GB vector (zeros, in a sparse file) that a Gather reads."""
    big = TensorProto(name="big", data_type=TensorProto.FLOAT, dims=[FLOATS])
    big.data_location = TensorProto.EXTERNAL
    for key, value in (("location", "big.bin"), ("offset", "0"), ("length", str(4 * FLOATS))):
        big.external_data.add(key=key, value=value)
    with open(tmp_path / "big.bin", "wb") as data:
        data.truncate(4 * FLOATS)
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((16, 16, 3, 3)) * 0.2).astype(np.float32)
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["y"], name="conv", pads=[1] * 4),
        helper.make_node("Gather", ["big", "index"], ["z"], name="gather"),
    ]
    graph = helper.make_graph(
        nodes,
        "large",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16, 8, 8])],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 16, 8, 8]),
            helper.make_tensor_value_info("z", TensorProto.FLOAT, [1]),
        ],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.array([7]), "index"), big],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, tmp_path / "large.onnx")

    out = tmp_path / "out" / "large.haste.onnx"
    out.parent.mkdir()
    result = convert(tmp_path / "large.onnx", out)
    assert result.passed, result.verification.failures
    assert result.written == [out, out.with_name("large.haste.onnx.data")]
    assert out.stat().st_size < 10_000
    x = rng.standard_normal((1, 16, 8, 8)).astype(np.float32)
    y, z = make_session(out).run(None, {"x": x})
    original = ort.InferenceSession(
        str(tmp_path / "large.onnx"), providers=["CPUExecutionProvider"]
    )
    expected = original.run(None, {"x": x})[0]
    assert z.tolist() == [0.0]
    cosine = float(y.ravel() @ expected.ravel()) / np.linalg.norm(y) / np.linalg.norm(expected)
    assert cosine > 0.95
