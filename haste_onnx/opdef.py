"""The HasteConv operator as it appears in an ONNX graph: domain, version, attributes.

Inputs: ``X [N, C, H, W]``, ``W [M, C, K, K]``, optional ``B [M]`` (empty name when absent),
``planes [L, P*P]``. Output: ``Y [N, M, Ho, Wo]``. See ``docs/operator.md``.
"""

from __future__ import annotations

from collections.abc import Sequence

import onnx

DOMAIN = "haste_onnx"
OPSET_VERSION = 1
OP_TYPE = "HasteConv"
DEFAULT_TILE = 3
MAX_TILE = 64
"""The largest tile edge the operator, the API and the CLI accept (``docs/operator.md``)."""
ACTIVATIONS = ("", "Relu")
RUNTIME_HINT = (
    "HasteConv nodes (domain haste_onnx) run in onnxruntime with the operator library of the "
    "haste-onnx package: SessionOptions.register_custom_ops_library(haste_onnx.get_library_path())"
)
"""What a converted model says of itself (its metadata entry ``haste_onnx``), for whoever
loads it without the library registered: onnxruntime's own error names the node only."""


def make_node(
    x: str,
    w: str,
    planes: str,
    y: str,
    *,
    bias: str | None = None,
    kernel: int,
    pads: Sequence[int] = (0, 0, 0, 0),
    tile: int = DEFAULT_TILE,
    activation: str = "",
    name: str = "",
) -> onnx.NodeProto:
    """A HasteConv node. ``pads`` are ONNX's ``[top, left, bottom, right]``."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    return onnx.helper.make_node(
        OP_TYPE,
        [x, w, bias or "", planes],
        [y],
        name=name,
        domain=DOMAIN,
        kernel_shape=[kernel, kernel],
        pads=list(pads),
        strides=[1, 1],
        dilations=[1, 1],
        group=1,
        tile=tile,
        activation=activation,
    )
