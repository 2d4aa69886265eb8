"""Time the HasteConv C++ operator against the numpy reference on one layer.

1x64x32x32 -> 64 channels, 3x3 kernel, pads 1, L = 14, s = 2/3, random inputs; prints the median
time of each and their ratio. Both run on one thread unless told otherwise (numpy's BLAS through
the usual environment variables, the operator through --threads), so that the ratio compares
the code and not how busy the machine's other cores are. Run after `pip install .`:

    python benchmarks/bench_kernel_vs_reference.py [--threads 1] [--repeats 20]
"""

# ruff: noqa: E402  (the BLAS thread count must be set before numpy is imported)
from __future__ import annotations

import argparse
import os

for _variable in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_variable, "1")  # before numpy loads its BLAS

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from haste_onnx.hashing import make_planes
from haste_onnx.opdef import DOMAIN, make_node
from haste_onnx.reference import haste_conv
from haste_onnx.runtime import make_session
from haste_onnx.speed import interleaved_medians

PADS = (1, 1, 1, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads")
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 64, 32, 32)).astype(np.float32)
    w = rng.standard_normal((64, 64, 3, 3)).astype(np.float32)
    planes = make_planes(14, 25, 2 / 3, rng)
    graph = helper.make_graph(
        [make_node("X", "W", "planes", "Y", kernel=3, pads=PADS)],
        "bench",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, x.shape)],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)],
        initializer=[numpy_helper.from_array(w, "W"), numpy_helper.from_array(planes, "planes")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid(DOMAIN, 1)])
    model.ir_version = 10
    session = make_session(model, intra_op_num_threads=args.threads)

    y = session.run(None, {"X": x})[0]
    y_ref = haste_conv(x, w, planes, pads=PADS)
    error = np.linalg.norm(y - y_ref) / np.linalg.norm(y_ref)

    kernel, reference = interleaved_medians(
        [lambda: session.run(None, {"X": x}), lambda: haste_conv(x, w, planes, pads=PADS)],
        args.repeats,
    )
    print(
        f"onnxruntime {ort.__version__}, {args.threads} intra-op thread(s), "
        f"median of {args.repeats} repetitions; relative L2 C++ vs reference {error:.1e}"
    )
    print(f"C++ operator:      {kernel * 1e3:8.2f} ms")
    print(f"numpy reference:   {reference * 1e3:8.2f} ms")
    print(f"speed-up:          {reference / kernel:8.1f}x")


if __name__ == "__main__":
    main()
