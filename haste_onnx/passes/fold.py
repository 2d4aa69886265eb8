"""Folding that readies a Conv for HASTE: constant weights, a following BatchNormalization."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import numpy_helper
from onnx_graphsurgeon.logger import G_LOGGER

from haste_onnx import ir


def fold_constant_inputs(model: onnx.ModelProto, names: set[str]) -> dict[str, np.ndarray]:
    """Values of ``names`` that are constant but computed by nodes (e.g. ConstantOfShape).

    onnx-graphsurgeon folds a copy of the graph (evaluating with onnxruntime); the model itself is
    left untouched. Names computed from graph inputs are absent from the result.
    """
    if not names:
        return {}
    severity = G_LOGGER.severity
    G_LOGGER.severity = G_LOGGER.ERROR  # the library prints nothing
    try:
        graph = gs.import_onnx(model)
        _cast_likes_as_casts(graph)
        graph.fold_constants(error_ok=True)
    finally:
        G_LOGGER.severity = severity
    tensors = graph.tensors()
    return {
        name: np.asarray(tensors[name].values)
        for name in names
        if name in tensors and isinstance(tensors[name], gs.Constant)
    }


def _cast_likes_as_casts(graph: gs.Graph) -> None:
    """CastLike(value, like) as Cast(value, to=like's type) where that type is known: CastLike
    reads only the type of ``like``, which may be a graph input (a bias of zeros that PyTorch's
    exporter builds as Expand(CastLike(0, input), Shape(weight)) unoptimized), and a graph input
    would stop the subgraph from folding."""
    for node in graph.nodes:
        if (
            node.op != "CastLike"
            or node.domain not in (None, "", "ai.onnx")
            or len(node.inputs) != 2
        ):
            continue
        dtype = node.inputs[1].dtype
        if dtype is None:
            continue
        to = (
            dtype
            if isinstance(dtype, int)
            else onnx.helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
        )
        node.op, node.attrs, node.inputs = "Cast", {"to": to}, [node.inputs[0]]


def fold_batchnorm(
    weight: np.ndarray, bias: np.ndarray | None, bn: onnx.NodeProto, graph: onnx.GraphProto
) -> tuple[np.ndarray, np.ndarray] | None:
    """Fold inference-mode BatchNormalization ``bn`` into a Conv's weight and bias (exact).

    Returns None when a BN parameter is not constant or not one value per output channel (an
    opset-7 BN with ``spatial=0`` has one per position).
    """
    params = [ir.constant_value(graph, name) for name in bn.input[1:5]]
    if any(p is None or p.shape != weight.shape[:1] for p in params):
        return None
    scale, shift, mean, var = (np.asarray(p, dtype=np.float64) for p in params)  # type: ignore[arg-type]
    eps = float(ir.attribute(bn, "epsilon", 1e-5))  # type: ignore[arg-type]
    factor = scale / np.sqrt(var + eps)
    w = weight.astype(np.float64) * factor[:, None, None, None]
    b = np.zeros(weight.shape[0]) if bias is None else bias.astype(np.float64)
    return w.astype(np.float32), ((b - mean) * factor + shift).astype(np.float32)


def as_initializer(array: np.ndarray, name: str) -> onnx.TensorProto:
    return numpy_helper.from_array(np.ascontiguousarray(array), name)
