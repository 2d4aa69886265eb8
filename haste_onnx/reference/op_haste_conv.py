"""HasteConv for ``onnx.reference.ReferenceEvaluator(model, new_ops=[HasteConv])``."""

from __future__ import annotations

import numpy as np
from onnx.reference.op_run import OpRun

from haste_onnx.opdef import ACTIVATIONS, DEFAULT_TILE, DOMAIN
from haste_onnx.reference.haste_conv import haste_conv


class HasteConv(OpRun):
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
        if isinstance(activation, bytes):
            activation = activation.decode()
        if activation not in ACTIVATIONS:
            raise ValueError(
                f"HasteConv: activation must be one of {ACTIVATIONS}, got {activation!r}"
            )
        for name, value in (("strides", strides), ("dilations", dilations)):
            if value is not None and any(v != 1 for v in value):
                raise ValueError(f"HasteConv: {name} must be 1, got {list(value)}")
        if group != 1:
            raise ValueError(f"HasteConv: group must be 1, got {group}")
        if kernel_shape is not None and list(kernel_shape) != list(W.shape[2:]):
            raise ValueError(
                f"HasteConv: kernel_shape {list(kernel_shape)} does not match W shape {W.shape}"
            )
        y = haste_conv(
            X, W, planes, B, pads=pads or (0, 0, 0, 0), tile=tile, relu=activation == "Relu"
        )
        assert isinstance(y, np.ndarray)  # no statistics were asked for
        return (y,)
