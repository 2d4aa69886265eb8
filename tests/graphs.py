"""Small ONNX models built in code for the converter's tests."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

IR_VERSION = 8
OPSET = 17


class Net:
    """Appends nodes and initializers; ``model()`` closes the graph."""

    def __init__(self, seed: int = 0, channels: int = 3, size: int | str = 16) -> None:
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.input_shape: list[int | str] = ["N", channels, size, size]
        self.count = 0

    def name(self, prefix: str) -> str:
        self.count += 1
        return f"{prefix}{self.count}"

    def const(self, array: np.ndarray, prefix: str = "c") -> str:
        name = self.name(prefix)
        self.inits.append(numpy_helper.from_array(np.asarray(array, np.float32), name))
        return name

    def weight(self, m: int, c: int, k: int) -> np.ndarray:
        """Filters with correlated output channels, so that the next layer's inputs merge."""
        base = self.rng.standard_normal((3, c, k, k))
        w = base[self.rng.integers(0, 3, m)] + 0.5 * self.rng.standard_normal((m, c, k, k))
        return (w * np.sqrt(2.0 / (c * k * k))).astype(np.float32)

    def conv(
        self,
        x: str,
        c: int,
        m: int,
        k: int = 3,
        stride: int = 1,
        group: int = 1,
        bias: bool = True,
        name: str | None = None,
        **attrs: object,
    ) -> str:
        name = name or self.name("conv")
        w = self.weight(m, c // group, k)
        inputs = [x, self.const(w, f"{name}.w")]
        if bias:
            inputs.append(self.const(self.rng.normal(0, 0.1, m), f"{name}.b"))
        if "auto_pad" not in attrs:
            attrs.setdefault("pads", [k // 2] * 4)
        self.nodes.append(
            helper.make_node(
                "Conv",
                inputs,
                [name + ".y"],
                name=name,
                kernel_shape=[k, k],
                strides=[stride] * 2,
                group=group,
                **attrs,
            )
        )
        return name + ".y"

    def bn(self, x: str, m: int) -> str:
        params = [
            self.const(self.rng.uniform(0.5, 1.5, m)),
            self.const(self.rng.normal(0, 0.2, m)),
            self.const(self.rng.normal(0, 0.2, m)),
            self.const(self.rng.uniform(0.5, 2.0, m)),
        ]
        out = self.name("bn")
        self.nodes.append(
            helper.make_node("BatchNormalization", [x, *params], [out], name=out, epsilon=1e-3)
        )
        return out

    def op(self, op_type: str, *inputs: str, **attrs: object) -> str:
        out = self.name(op_type.lower())
        self.nodes.append(helper.make_node(op_type, list(inputs), [out], name=out, **attrs))
        return out

    def head(self, x: str, c: int, classes: int = 10) -> str:
        pooled = self.op("Flatten", self.op("GlobalAveragePool", x))
        w = self.const(self.rng.standard_normal((classes, c)) / np.sqrt(c))
        return self.op("Gemm", pooled, w, self.const(np.zeros(classes)), transB=1)

    def model(self, output: str, out_shape: list[int | str] | None = None) -> onnx.ModelProto:
        return self.close(
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, self.input_shape)],
            [helper.make_tensor_value_info(output, TensorProto.FLOAT, out_shape)],
        )

    def close(
        self,
        inputs: list[onnx.ValueInfoProto],
        outputs: list[onnx.ValueInfoProto],
        opset: int = OPSET,
        functions: tuple[onnx.FunctionProto, ...] = (),
    ) -> onnx.ModelProto:
        """The checked model of the nodes so far, with these inputs and outputs."""
        graph = helper.make_graph(self.nodes, "test", inputs, outputs, self.inits)
        opsets = [helper.make_opsetid("", opset)]
        opsets += [helper.make_opsetid(f.domain, 1) for f in functions]
        model = helper.make_model(graph, opset_imports=opsets, functions=list(functions))
        model.ir_version = IR_VERSION
        onnx.checker.check_model(model)
        return model


def resnet_like(seed: int = 0) -> onnx.ModelProto:
    """Stem, two residual blocks with unfolded BN, a strided block with a 1x1 shortcut."""
    n = Net(seed)
    h = n.op("Relu", n.bn(n.conv("x", 3, 16, name="stem"), 16))
    for i in range(2):
        r = n.op("Relu", n.bn(n.conv(h, 16, 16, bias=False, name=f"block{i}.conv1"), 16))
        r = n.bn(n.conv(r, 16, 16, bias=False, name=f"block{i}.conv2"), 16)
        h = n.op("Relu", n.op("Add", h, r))
    r = n.op("Relu", n.bn(n.conv(h, 16, 32, stride=2, name="down.conv1"), 32))
    r = n.bn(n.conv(r, 32, 32, name="down.conv2"), 32)
    s = n.bn(n.conv(h, 16, 32, k=1, stride=2, name="down.shortcut", pads=[0] * 4), 32)
    h = n.op("Relu", n.op("Add", r, s))
    return n.model(n.head(h, 32), ["N", 10])


def bottleneck_like(seed: int = 13) -> onnx.ModelProto:
    """A stride-1 bottleneck block (ResNet-50's first): 1x1, 3x3, 1x1, and a 1x1 projection
    shortcut from the block's input, one with BN after it and one with BN folded."""
    n = Net(seed)
    h = n.op("Relu", n.conv("x", 3, 16, name="stem"))
    for i, folded in enumerate((False, True)):
        r = n.op("Relu", n.conv(h, 16, 8, k=1, pads=[0] * 4, name=f"block{i}.conv1"))
        r = n.op("Relu", n.conv(r, 8, 8, name=f"block{i}.conv2"))
        r = n.conv(r, 8, 32 if i == 0 else 16, k=1, pads=[0] * 4, name=f"block{i}.conv3")
        s = n.conv(h, 16, 32 if i == 0 else 16, k=1, pads=[0] * 4, name=f"block{i}.shortcut")
        h = n.op("Relu", n.op("Add", r, s if folded else n.bn(s, 32)))
        if i == 0:
            h = n.op("Relu", n.conv(h, 32, 16, k=1, pads=[0] * 4, name="squeeze"))
    return n.model(n.head(h, 16), ["N", 10])


def fpn_like(seed: int = 14) -> onnx.ModelProto:
    """Two backbone levels and an FPN top-down path: each level's lateral 1x1 Conv is added to
    the upsampled coarser level, which came from the same input down the backbone."""
    n = Net(seed, channels=16)
    c4 = n.op("Relu", n.conv("x", 16, 32, stride=2, name="backbone"))
    p4 = n.conv(c4, 32, 16, k=1, pads=[0] * 4, name="lateral4")
    scales = n.const(np.array([1, 1, 2, 2]))
    up = n.op("Resize", p4, "", scales, mode="nearest")
    p3 = n.op("Add", n.conv("x", 16, 16, k=1, pads=[0] * 4, name="lateral3"), up)
    return n.model(n.conv(p3, 16, 16, name="smooth"), ["N", 16, 16, 16])


def vgg_like(seed: int = 1) -> onnx.ModelProto:
    n = Net(seed)
    h, c = "x", 3
    for i, m in enumerate([16, 16, "pool", 32, 32]):
        if m == "pool":
            h = n.op("MaxPool", h, kernel_shape=[2, 2], strides=[2, 2])
            continue
        h = n.op("Relu", n.bn(n.conv(h, c, int(m), name=f"features.{i}"), int(m)))
        c = int(m)
    return n.model(n.head(h, c), ["N", 10])


def auto_padded(seed: int = 15) -> onnx.ModelProto:
    """Padding by auto_pad, as TensorFlow exporters write it: SAME_UPPER, SAME_LOWER, VALID."""
    n = Net(seed, channels=8, size=12)
    h = n.op("Relu", n.conv("x", 8, 16, k=5, name="same_upper", auto_pad="SAME_UPPER"))
    h = n.op("Relu", n.conv(h, 16, 16, name="same_lower", auto_pad="SAME_LOWER"))
    return n.model(n.conv(h, 16, 8, name="valid", auto_pad="VALID"), ["N", 8, 10, 10])


def odd_neighbours(seed: int = 16) -> onnx.ModelProto:
    """A scalar graph input listed first; a graph input named as the converter would name the
    Conv's new weight; an opset-7 BatchNormalization with ``spatial=0`` (one value per channel
    and position, which does not fold into the Conv's filters)."""
    n = Net(seed, channels=8, size=6)
    n.input_shape = [2, 8, 6, 6]
    h = n.conv(n.op("Mul", "x", "scale"), 8, 8, name="c")
    params = [n.rng.uniform(0.5, 1.5, (8, 6, 6)), n.rng.normal(0, 0.2, (8, 6, 6))]
    params += [n.rng.normal(0, 0.2, (8, 6, 6)), n.rng.uniform(0.5, 2.0, (8, 6, 6))]
    h = n.op("BatchNormalization", h, *map(n.const, params), spatial=0)
    out = n.op("Add", h, "c.haste.weight")
    inputs = [("scale", []), ("x", n.input_shape), ("c.haste.weight", n.input_shape)]
    return n.close(
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, s) for name, s in inputs],
        [helper.make_tensor_value_info(out, TensorProto.FLOAT, n.input_shape)],
        opset=7,
    )


def depthwise(seed: int = 2) -> onnx.ModelProto:
    """A 3x3 conv, a depthwise 3x3 conv and a pointwise 1x1 conv."""
    n = Net(seed)
    h = n.op("Relu", n.conv("x", 3, 16, name="stem"))
    h = n.op("Relu", n.conv(h, 16, 16, group=16, name="dw"))
    h = n.conv(h, 16, 24, k=1, pads=[0] * 4, name="pw")
    return n.model(h, ["N", 24, 16, 16])


def constant_node_weights(seed: int = 3) -> onnx.ModelProto:
    """Weights from Constant nodes and from a ConstantOfShape -> Mul subgraph."""
    n = Net(seed)
    h = n.op("Relu", n.conv("x", 3, 16, name="stem"))
    w = n.weight(16, 16, 3)
    n.nodes.append(
        helper.make_node(
            "Constant", [], ["w_const"], name="w_const", value=numpy_helper.from_array(w)
        )
    )
    n.nodes.append(
        helper.make_node(
            "Conv", [h, "w_const"], ["c1"], name="from_constant", kernel_shape=[3, 3], pads=[1] * 4
        )
    )
    shape = n.op("Constant", value=numpy_helper.from_array(np.array([16, 16, 3, 3], np.int64)))
    ones = n.op(
        "ConstantOfShape", shape, value=numpy_helper.from_array(np.array([0.01], np.float32))
    )
    scaled = n.op("Mul", ones, n.const(n.rng.standard_normal((16, 16, 3, 3))))
    n.nodes.append(
        helper.make_node(
            "Conv", ["c1", scaled], ["c2"], name="from_subgraph", kernel_shape=[3, 3], pads=[1] * 4
        )
    )
    return n.model("c2", ["N", 16, 16, 16])


def cast_like_bias(seed: int = 19) -> onnx.ModelProto:
    """A bias of zeros built as PyTorch's exporter does unoptimized (dynamo, optimize=False):
    Expand(CastLike(0, x), Shape(weight)[:1]), which reads the graph input's type only."""
    n = Net(seed, channels=16, size=8)
    w = n.const(n.weight(8, 16, 3), "w")
    zero = n.op("Constant", value=numpy_helper.from_array(np.array(0.0, np.float64)))
    like = n.op("CastLike", zero, "x")
    start, end = (
        n.op("Constant", value=numpy_helper.from_array(np.array([i], np.int64))) for i in (0, 1)
    )
    bias = n.op("Expand", like, n.op("Slice", n.op("Shape", w), start, end))
    n.nodes.append(helper.make_node("Conv", ["x", w, bias], ["y"], name="conv", pads=[1] * 4))
    return n.model("y", ["N", 8, 8, 8])


def runtime_weight(seed: int = 4) -> onnx.ModelProto:
    """A conv whose weight is computed from the graph input: it must be skipped."""
    n = Net(seed, channels=16, size=8)
    w = n.op("ReduceMean", "x", axes=[0, 2, 3], keepdims=1)  # [1, 16, 1, 1]
    n.nodes.append(helper.make_node("Conv", ["x", w], ["y"], name="dynamic", kernel_shape=[1, 1]))
    return n.model("y", ["N", 1, 8, 8])


def no_conv() -> onnx.ModelProto:
    n = Net()
    return n.model(n.op("Relu", "x"), ["N", 3, 16, 16])


def subgraph_reads(seed: int = 5) -> onnx.ModelProto:
    """Conv -> Relu whose Conv output, and whose weight (an initializer) and a Constant, are also
    read inside the branches of an If: nothing they read may be fused away or removed."""
    n = Net(seed, channels=16, size=8)
    y = n.conv("x", 16, 16, name="conv")
    weight = n.nodes[-1].input[1]
    relu = n.op("Relu", y)
    n.nodes.append(
        helper.make_node(
            "Constant", [], ["shift"], name="shift", value=numpy_helper.from_array(np.float32(1))
        )
    )
    total = n.op("ReduceSum", "x", keepdims=0)
    cond = n.op("Greater", total, n.const(np.float32(0)))
    out_info = [helper.make_tensor_value_info("branch_out", TensorProto.FLOAT, None)]
    then_branch = helper.make_graph(
        [helper.make_node("Add", [y, "shift"], ["branch_out"])], "then", [], out_info
    )
    else_branch = helper.make_graph(
        [helper.make_node("Conv", [relu, weight], ["branch_out"], pads=[1] * 4)],
        "else",
        [],
        out_info,
    )
    n.nodes.append(
        helper.make_node(
            "If", [cond], ["chosen"], name="if", then_branch=then_branch, else_branch=else_branch
        )
    )
    return n.model(n.op("Add", "chosen", relu), ["N", 16, 8, 8])


def initializers_as_inputs(seed: int = 6) -> onnx.ModelProto:
    """Every initializer also listed as a graph input (onnx export's keep_initializers_as_inputs),
    legal since IR 4, where a feed may override it."""
    model = vgg_like(seed)
    model.graph.input.extend(
        helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
        for t in model.graph.initializer
    )
    onnx.checker.check_model(model)
    return model


def conv_only_in_subgraph(seed: int = 7) -> onnx.ModelProto:
    """Its only Conv is inside an If branch, which the converter leaves alone."""
    model = subgraph_reads(seed)
    graph = model.graph
    main_convs = [n for n in graph.node if n.op_type == "Conv"]
    for node in main_convs:  # the main graph's Conv becomes an Identity of the input
        node.CopyFrom(helper.make_node("Identity", ["x"], list(node.output), name=node.name))
    onnx.checker.check_model(model)
    return model


def input_smaller_than_kernel(seed: int = 8) -> onnx.ModelProto:
    """A 3x3 Conv without padding on a 2x2 input: valid ONNX that onnxruntime refuses to run."""
    n = Net(seed, channels=16, size=2)
    return n.model(n.conv("x", 16, 16, pads=[0] * 4, name="conv"), ["N", 16, "h", "w"])


def sparse_constant_weights(seed: int = 9) -> onnx.ModelProto:
    """Weights from Constant nodes with a sparse_value, in linear and in coordinate indices."""
    n = Net(seed, channels=16, size=8)
    h = "x"
    for i, linear in enumerate([True, False]):
        w = n.weight(16, 16, 3)
        w[np.abs(w) < np.median(np.abs(w))] = 0  # half of the entries zero
        nonzero = np.flatnonzero(w) if linear else np.argwhere(w)
        sparse = helper.make_sparse_tensor(
            numpy_helper.from_array(w[w != 0]),
            numpy_helper.from_array(nonzero.astype(np.int64)),
            list(w.shape),
        )
        name = f"w{i}"
        n.nodes.append(helper.make_node("Constant", [], [name], name=name, sparse_value=sparse))
        conv = helper.make_node("Conv", [h, name], [f"conv{i}.y"], name=f"conv{i}", pads=[1] * 4)
        n.nodes.append(conv)
        h = n.op("Relu", f"conv{i}.y")
    return n.model(h, ["N", 16, 8, 8])


def shared_weight(seed: int = 10) -> onnx.ModelProto:
    """Two Convs with one weight and one bias, in sequence (a block applied twice)."""
    n = Net(seed, channels=16, size=8)
    h = n.op("Relu", n.conv("x", 16, 16, name="first"))
    first = n.nodes[-2]
    n.nodes.append(
        helper.make_node("Conv", [h, *first.input[1:]], ["second.y"], name="second", pads=[1] * 4)
    )
    return n.model("second.y", ["N", 16, 8, 8])


def tiny(seed: int = 11) -> onnx.ModelProto:
    """A 8 -> 2 channel 3x3 Conv: every tensor under 1 KB."""
    n = Net(seed, channels=8, size=6)
    return n.model(n.conv("x", 8, 2, name="conv"), ["N", 2, 6, 6])


def with_anchors(seed: int = 17) -> onnx.ModelProto:
    """tiny() with a second input, anchors [1000, 4], added to its output: a first dimension
    that is not the batch."""
    n = Net(seed, channels=8, size=6)
    out = n.op("Add", n.conv("x", 8, 2, name="conv"), n.op("ReduceSum", "anchors", keepdims=0))
    inputs = [
        helper.make_tensor_value_info("x", TensorProto.FLOAT, n.input_shape),
        helper.make_tensor_value_info("anchors", TensorProto.FLOAT, [1000, 4]),
    ]
    return n.close(inputs, [helper.make_tensor_value_info(out, TensorProto.FLOAT, ["N", 2, 6, 6])])


def value_sized_output(seed: int = 21) -> onnx.ModelProto:
    """Two 16-channel 3x3 Convs, then NonZero of the values above 0.3: an output whose size
    depends on the values (as a detection head's after its threshold), beside a sum of them."""
    n = Net(seed, channels=16, size=12)
    y = n.conv(n.conv("x", 16, 16, name="conv1"), 16, 16, name="conv2")
    hits = n.op("NonZero", n.op("Greater", y, n.const(np.array(0.3))))
    total = n.op("ReduceSum", y, keepdims=0)
    outputs = [
        helper.make_tensor_value_info(hits, TensorProto.INT64, [4, "hits"]),
        helper.make_tensor_value_info(total, TensorProto.FLOAT, []),
    ]
    return n.close([helper.make_tensor_value_info("x", TensorProto.FLOAT, n.input_shape)], outputs)


def local_functions(seed: int = 22, stem: bool = True) -> onnx.ModelProto:
    """A strided stem (or none), then two calls of a local function Block(x, w) =
    Relu(Conv(x, w)), as torch.onnx.export(..., export_modules_as_functions=...) or onnxscript
    write them."""
    n = Net(seed, channels=16, size=16 if stem else 8)
    out = n.conv("x", 16, 16, stride=2, name="stem") if stem else "x"
    block = helper.make_function(
        "blocks",
        "Block",
        ["x", "w"],
        ["y"],
        [
            helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
            helper.make_node("Relu", ["c"], ["y"]),
        ],
        opset_imports=[helper.make_opsetid("", OPSET)],
    )
    for name in ("block1", "block2"):
        w = n.const(n.weight(16, 16, 3), f"{name}.w")
        n.nodes.append(helper.make_node("Block", [out, w], [name], name=name, domain="blocks"))
        out = name
    return n.close(
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, n.input_shape)],
        [helper.make_tensor_value_info(out, TensorProto.FLOAT, ["N", 16, 8, 8])],
        functions=(block,),
    )


def squeeze_excitation(seed: int = 18) -> onnx.ModelProto:
    """A 3x3 Conv, then a squeeze-and-excitation block (EfficientNet's): global pooling, 1x1
    Convs 32 -> 16 -> 32 on the 1x1 map, a Sigmoid scaling the Conv's output. H and W are
    dynamic: the map after the pooling is 1x1 whatever they are."""
    n = Net(seed, channels=32, size="S")
    x = n.conv("x", 32, 32, name="conv")
    pooled = n.op("GlobalAveragePool", x)
    squeezed = n.op("Relu", n.conv(pooled, 32, 16, k=1, name="squeeze"))
    gate = n.op("Sigmoid", n.conv(squeezed, 16, 32, k=1, name="expand"))
    return n.model(n.op("Mul", x, gate), ["N", 32, "S", "S"])


def shape_inference_blind(seed: int = 20) -> onnx.ModelProto:
    """A Conv after a Reshape to a shape computed by Max, which onnx's shape inference does not
    follow (as the channel shuffle of a legacy-exported ShuffleNet): its shapes are unknown to
    inference, known to a run. All sizes fixed."""
    n = Net(seed, channels=8, size=6)
    n.input_shape = [2, 8, 6, 6]
    first = n.conv("x", 8, 8, name="first")
    shape = n.op("Shape", first)
    second = n.conv(n.op("Reshape", first, n.op("Max", shape, shape)), 8, 8, name="second")
    return n.model(n.op("Relu", second), [2, 8, 6, 6])  # its output is no graph output


def overridable_shape(seed: int = 12) -> onnx.ModelProto:
    """x [2, 4096] reshaped by ``target``, an initializer that is also a graph input (a feed may
    override it: [-1, 16, 16, 16] by default), into a 3x3 Conv; its output's height then
    reshapes the result: the Conv's spatial size is known only at run time."""
    n = Net(seed)
    n.inits.append(numpy_helper.from_array(np.array([-1, 16, 16, 16], np.int64), "target"))
    n.nodes.append(helper.make_node("Reshape", ["x", "target"], ["image"], name="reshape"))
    y = n.op("Relu", n.conv("image", 16, 16, name="conv"))
    n.inits += [
        numpy_helper.from_array(np.array([2], np.int64), "axis2"),
        numpy_helper.from_array(np.array([0, 16], np.int64), "front"),
        numpy_helper.from_array(np.array([-1], np.int64), "rest"),
    ]
    height = n.op("Gather", n.op("Shape", y), "axis2", axis=0)
    out = n.op("Reshape", y, n.op("Concat", "front", height, "rest", axis=0))
    return n.close(
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4096]),
            helper.make_tensor_value_info("target", TensorProto.INT64, [4]),
        ],
        [helper.make_tensor_value_info(out, TensorProto.FLOAT, [2, 16, None, None])],
    )
