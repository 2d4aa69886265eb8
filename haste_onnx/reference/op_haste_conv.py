"""HasteConv for ``onnx.reference.ReferenceEvaluator(model, new_ops=[HasteConv])``."""

from __future__ import annotations

import numpy as np
from onnx import AttributeProto
from onnx.reference.op_run import OpRun

from haste_onnx.opdef import ACTIVATIONS, DEFAULT_TILE, DOMAIN
from haste_onnx.reference.haste_conv import haste_conv

_TYPES = {
    "kernel_shape": AttributeProto.INTS,
    "pads": AttributeProto.INTS,
    "strides": AttributeProto.INTS,
    "dilations": AttributeProto.INTS,
    "group": AttributeProto.INT,
    "tile": AttributeProto.INT,
    "activation": AttributeProto.STRING,
}
_NAMES: dict[int, str] = {
    AttributeProto.INT: "an int",
    AttributeProto.FLOAT: "a float",
    AttributeProto.STRING: "a string",
    AttributeProto.TENSOR: "a tensor",
}


def _type_name(attribute_type: int) -> str:
    return _NAMES.get(attribute_type, AttributeProto.AttributeType.Name(attribute_type).lower())


class HasteConv(OpRun):
    """HasteConv for onnx's reference evaluator: ``ReferenceEvaluator(model,
    new_ops=[HasteConv])`` runs a converted model with the numpy reference
    (:func:`haste_onnx.reference.haste_conv`) in place of the C++ operator."""

    op_domain = DOMAIN

    def _run(  # type: ignore[override]
        self,
        X: np.ndarray,
        W: np.ndarray,
        B: np.ndarray | None = None,
        planes: np.ndarray | None = None,
        kernel_shape: list[int] | None = None,
        pads: list[int] | None = None,
        strides: list[int] | None = None,
        dilations: list[int] | None = None,
        group: int = 1,
        tile: int = DEFAULT_TILE,
        activation: str | bytes = "",
    ) -> tuple[np.ndarray]:
        if planes is None:
            raise ValueError("HasteConv needs the planes input")
        for attribute in self.onnx_node.attribute:  # onnx converts values of any type
            expected = _TYPES.get(attribute.name)
            if expected is not None and attribute.type != expected:
                raise ValueError(
                    f"HasteConv: {attribute.name} must be {_type_name(expected)}, "
                    f"got {_type_name(attribute.type)}"
                )
        if isinstance(activation, bytes):
            activation = activation.decode()
        if activation not in ACTIVATIONS:
            raise ValueError(
                f"HasteConv: activation must be one of {ACTIVATIONS}, got {activation!r}"
            )
        for name, value in (("strides", strides), ("dilations", dilations)):
            if value is not None and list(value) != [1, 1]:
                raise ValueError(f"HasteConv: {name} must be 1, got {list(value)}")
        if group != 1:
            raise ValueError(f"HasteConv: group must be 1, got {group}")
        if kernel_shape is not None and list(kernel_shape) != list(W.shape[2:]):
            raise ValueError(
                f"HasteConv: kernel_shape {list(kernel_shape)} does not match W shape {W.shape}"
            )
        y = haste_conv(
            X,
            W,
            planes,
            B,
            pads=(0, 0, 0, 0) if pads is None else pads,
            tile=tile,
            relu=activation == "Relu",
        )
        assert isinstance(y, np.ndarray)  # no statistics were asked for
        return (y,)
