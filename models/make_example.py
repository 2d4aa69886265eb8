"""Build ``models/example.onnx``: a small CIFAR-shaped CNN to try haste-onnx on.

Stem conv 3->32 (3x3, BN, Relu), conv 32->64 (3x3, BN, Relu), a residual block of two 3x3
convs with BN, a 1x1 conv 64->64, a strided 3x3 conv 64->64, global average pooling and a
linear classifier over 10 classes. Input ``[N, 3, 32, 32]`` (dynamic batch), output logits
``[N, 10]``. The weights are seeded random (He initialisation, with the channels of each
filter bank drawn around a few shared directions so that feature maps are correlated, as in
trained networks), so the model is for demonstration and testing, not for accuracy.

    python models/make_example.py [--out models/example.onnx]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

IR_VERSION = 8
OPSET = 17


class _Builder:
    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []

    def const(self, name: str, array: np.ndarray) -> str:
        self.inits.append(numpy_helper.from_array(array.astype(np.float32), name))
        return name

    def filters(self, m: int, c: int, k: int, groups: int = 4) -> np.ndarray:
        """He-initialised filters whose output channels cluster around a few directions."""
        std = np.sqrt(2.0 / (c * k * k))
        centers = self.rng.standard_normal((groups, c, k, k))
        pick = self.rng.integers(0, groups, m)
        noise = self.rng.standard_normal((m, c, k, k))
        return (std * (0.8 * centers[pick] + 0.6 * noise)).astype(np.float32)

    def conv_bn(
        self, x: str, name: str, c: int, m: int, k: int, stride: int = 1, relu: bool = True
    ) -> str:
        w = self.const(f"{name}.weight", self.filters(m, c, k))
        pad = k // 2
        self.nodes.append(
            helper.make_node(
                "Conv",
                [x, w],
                [f"{name}.conv"],
                name=name,
                kernel_shape=[k, k],
                pads=[pad] * 4,
                strides=[stride, stride],
            )
        )
        bn = [
            self.const(f"{name}.bn.scale", self.rng.uniform(0.8, 1.2, m)),
            self.const(f"{name}.bn.bias", self.rng.normal(0.0, 0.1, m)),
            self.const(f"{name}.bn.mean", self.rng.normal(0.0, 0.1, m)),
            self.const(f"{name}.bn.var", self.rng.uniform(0.5, 1.5, m)),
        ]
        out = f"{name}.bn"
        self.nodes.append(
            helper.make_node(
                "BatchNormalization", [f"{name}.conv", *bn], [out], name=f"{name}.bn", epsilon=1e-5
            )
        )
        if relu:
            self.nodes.append(
                helper.make_node("Relu", [out], [f"{name}.relu"], name=f"{name}.relu")
            )
            out = f"{name}.relu"
        return out


def build(seed: int = 0) -> onnx.ModelProto:
    b = _Builder(seed)
    h = b.conv_bn("input", "stem", 3, 32, 3)
    h = b.conv_bn(h, "layer1", 32, 64, 3)
    r = b.conv_bn(h, "block.conv1", 64, 64, 3)
    r = b.conv_bn(r, "block.conv2", 64, 64, 3, relu=False)
    b.nodes.append(helper.make_node("Add", [h, r], ["block.add"], name="block.add"))
    b.nodes.append(helper.make_node("Relu", ["block.add"], ["block.out"], name="block.relu"))
    h = b.conv_bn("block.out", "layer2", 64, 64, 1)
    h = b.conv_bn(h, "down", 64, 64, 3, stride=2)
    b.nodes.append(helper.make_node("GlobalAveragePool", [h], ["pool"], name="pool"))
    b.nodes.append(helper.make_node("Flatten", ["pool"], ["flat"], name="flatten"))
    fc_w = b.const("fc.weight", b.rng.standard_normal((10, 64)) / 8.0)
    fc_b = b.const("fc.bias", np.zeros(10))
    b.nodes.append(helper.make_node("Gemm", ["flat", fc_w, fc_b], ["logits"], name="fc", transB=1))
    graph = helper.make_graph(
        b.nodes,
        "example_cnn",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 32, 32])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])],
        b.inits,
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        producer_name="haste-onnx models/make_example.py",
    )
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model, full_check=True)
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("example.onnx"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    onnx.save(build(args.seed), args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
