"""The FLOPs model of the paper (Appendix B.1), per image.

A multiply-add counts as two FLOPs. HASTE's cost depends on the measured mean compression
ratio ``r`` and mean number ``m`` of buckets merging more than one channel, so the FLOPs of a
converted layer are always those of the inputs it was measured on. Patches are counted as the
real number of output tiles (the paper approximates it as ``(H + P_H)/K * (W + P_W)/K``), and
the hashing term counts the real non-zero plane entries, ``L * P^2 * (1 - s)`` in expectation:
one addition each for planes of -1, 0 and +1, a multiply-add (two) each for dense Gaussian ones.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import onnx

from haste_onnx import ir
from haste_onnx.errors import InputError


@dataclass(frozen=True)
class HasteFlops:
    """FLOPs of one HasteConv per image, split as the paper's Eq. 6-10."""

    baseline: float  # Eq. 5: the plain Conv
    centering: float  # Eq. 6
    hashing: float  # Eq. 7
    merge_inputs: float  # Eq. 8
    merge_filters: float  # Eq. 9
    reduced_conv: float  # Eq. 10

    @property
    def total(self) -> float:
        return (
            self.centering
            + self.hashing
            + self.merge_inputs
            + self.merge_filters
            + self.reduced_conv
        )

    @property
    def reduction(self) -> float:
        """Fraction of the baseline saved (negative when HASTE costs more)."""
        return 1.0 - self.total / self.baseline


def conv_flops(
    out_h: int, out_w: int, kernel_area: int, in_channels: int, out_channels: int, group: int = 1
) -> float:
    """Eq. 5, generalised to groups: ``2 * Ho * Wo * K^2 * C/group * M``."""
    return 2.0 * out_h * out_w * kernel_area * (in_channels // group) * out_channels


def projection_flops(planes: np.ndarray) -> int:
    """FLOPs of one channel's projections on all planes (Eq. 7 without ``n_p * C``)."""
    ternary = bool(np.isin(planes, (-1.0, 0.0, 1.0)).all())
    return int(np.count_nonzero(planes)) * (1 if ternary else 2)


def haste_flops(
    *,
    in_channels: int,
    out_channels: int,
    kernel: int,
    out_h: int,
    out_w: int,
    tile: int,
    projection_flops: int,
    ratio: float,
    merging: float,
) -> HasteFlops:
    """Eq. 5-10 for one layer, per image, from the measured mean ``ratio`` (r) and ``merging``
    (m)."""
    c, m, k2 = in_channels, out_channels, kernel * kernel
    patch_area = (tile + kernel - 1) ** 2
    n_p = -(-out_h // tile) * -(-out_w // tile)
    return HasteFlops(
        baseline=conv_flops(out_h, out_w, k2, c, m),
        centering=2.0 * n_p * c * patch_area,
        hashing=float(n_p * c * projection_flops),
        merge_inputs=n_p * patch_area * (c * ratio + merging),
        merge_filters=n_p * m * c * ratio * k2,
        reduced_conv=2.0 * out_h * out_w * k2 * c * (1.0 - ratio) * m,
    )


def static_shapes(
    model: onnx.ModelProto,
    input_shapes: dict[str, tuple[int, ...]],
    feeds: Mapping[str, np.ndarray] | None = None,
) -> dict[str, list[int]]:
    """Every tensor's shape with the graph inputs fixed to ``input_shapes`` (shape inference, on
    the model without its weights: a model past 2 GB cannot be serialized for it); where that
    leaves a counted node's shapes unknown, from a run on ``feeds`` (zeros if none)."""
    fixed = ir.shapes_only(model)
    for value in fixed.graph.input:
        if value.name in input_shapes:
            dims = value.type.tensor_type.shape.dim
            for dim, size in zip(dims, input_shapes[value.name]):
                dim.Clear()
                dim.dim_value = int(size)
    inferred = onnx.shape_inference.infer_shapes(fixed, data_prop=True)
    shapes: dict[str, list[int]] = {}
    graph = inferred.graph
    for value in [*graph.input, *graph.value_info, *graph.output]:
        dims = value.type.tensor_type.shape.dim
        if dims and all(d.HasField("dim_value") for d in dims):
            shapes[value.name] = [d.dim_value for d in dims]
    for t in graph.initializer:
        shapes[t.name] = list(t.dims)
    counted = [n for n in model.graph.node if n.op_type in COUNTED and n.domain in ("", "ai.onnx")]
    missing = [name for n in counted for name in (n.input[0], n.output[0]) if name not in shapes]
    if missing:
        shapes.update(_shapes_of_a_run(model, input_shapes, missing, feeds))
    return shapes


COUNTED = ("Conv", "Gemm", "MatMul")
"""The nodes whose FLOPs the reports count."""


def _shapes_of_a_run(
    model: onnx.ModelProto,
    input_shapes: dict[str, tuple[int, ...]],
    names: list[str],
    feeds: Mapping[str, np.ndarray] | None,
) -> dict[str, list[int]]:
    """The shapes of tensors ``names`` in a run of the model on ``feeds``, or on zeros of
    ``input_shapes``: where shape inference cannot follow the graph (a shape computed by an op
    it does not propagate, as in the channel shuffle of a legacy-exported ShuffleNet),
    onnxruntime can. Nothing if an input's size is unknown, an input is not a tensor, or the
    run fails."""
    from haste_onnx import runtime  # onnxruntime only where inference falls short

    try:
        if feeds is None:
            feeds = {
                i.name: np.zeros(
                    input_shapes[i.name],
                    onnx.helper.tensor_dtype_to_np_dtype(i.type.tensor_type.elem_type),
                )
                for i in ir.graph_inputs(model)
            }
        session = runtime.quiet_session(ir.with_outputs(model, names), custom_ops=False)
        asked = set(names)
        wanted = [o.name for o in session.get_outputs() if o.name in asked]
        one_run = {  # the inputs of one run: a model of fixed batch takes several in turn
            k: v[: input_shapes[k][0]] if k in input_shapes and v.ndim else v
            for k, v in feeds.items()
        }
        results = session.run(wanted, one_run)
        return {k: list(v.shape) for k, v in zip(wanted, results)}
    except Exception:  # a size unknown (KeyError), not a tensor, onnxruntime's own errors
        return {}


def node_flops(node: onnx.NodeProto, shapes: dict[str, list[int]]) -> float | None:
    """FLOPs of a Conv, Gemm or MatMul node for the whole batch, or None if unknown."""
    if node.op_type == "Conv":
        w, y = shapes.get(node.input[1]), shapes.get(node.output[0])
        if w is None or y is None or len(y) < 3:
            return None
        if min(y[2:]) <= 0:  # shape inference's word for a padded input smaller than the kernel
            raise InputError(
                f"Conv {node.name!r} cannot run at these input sizes: its output would be "
                f"{'x'.join(map(str, y[2:]))} (a padded input smaller than its kernel)"
            )
        spatial = int(np.prod(y[2:]))
        return y[0] * 2.0 * spatial * int(np.prod(w[2:])) * w[1] * w[0]
    if node.op_type == "Gemm":
        a, y = shapes.get(node.input[0]), shapes.get(node.output[0])
        if a is None or y is None:
            return None
        inner = a[0] if ir.attribute(node, "transA", 0) else a[1]
        return 2.0 * y[0] * y[1] * inner
    if node.op_type == "MatMul":
        a, y = shapes.get(node.input[0]), shapes.get(node.output[0])
        if a is None or y is None:
            return None
        return 2.0 * float(np.prod(y)) * a[-1]
    return None
