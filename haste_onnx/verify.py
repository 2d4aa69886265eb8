"""Fidelity: original vs converted outputs, and the C++ kernel vs the numpy reference.

Both models run under onnxruntime on the same inputs. The converted run also captures every
HasteConv's input and output, so each layer is re-computed by the numpy reference on exactly
the tensor the C++ kernel saw: that gives the kernel agreement and the measured ``r`` and ``m``
the FLOPs report needs.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx

from haste_onnx import ir, runtime
from haste_onnx.errors import InputError
from haste_onnx.passes.rewrite import LayerPlan
from haste_onnx.reference import haste_conv

Progress = Callable[[str], None]


@dataclass(frozen=True)
class Tolerances:
    """Pass/fail bounds. ``None`` switches a check off."""

    min_cosine: float | None = 0.95
    max_rel_l2: float | None = None
    min_top1: float | None = None
    kernel_rtol: float = 1e-4
    max_kernel_mismatch: float = 1e-3

    def __post_init__(self) -> None:
        for name, value, low, high in (
            ("min_cosine", self.min_cosine, -1.0, 1.0),
            ("max_rel_l2", self.max_rel_l2, 0.0, math.inf),
            ("min_top1", self.min_top1, 0.0, 1.0),
            ("kernel_rtol", self.kernel_rtol, 0.0, math.inf),
            ("max_kernel_mismatch", self.max_kernel_mismatch, 0.0, 1.0),
        ):
            if value is not None and not low <= value <= high:  # NaN too: it would pass anything
                raise InputError(f"{name} = {value} is out of range: allowed is [{low}, {high}]")


@dataclass(frozen=True)
class OutputFidelity:
    """Original vs converted, one model output."""

    name: str
    max_abs: float
    rel_l2: float
    cosine: float
    # share of rows whose argmax agrees, for [N, classes] float outputs; of equal values for
    # integer and bool outputs (labels, as an ArgMax gives them)
    top1: float | None


@dataclass(frozen=True)
class LayerRun:
    """One HasteConv on the verification inputs: kernel agreement and measured statistics."""

    name: str
    out_h: int
    out_w: int
    ratio: float  # mean r over images and patches
    merging: float  # mean m
    kernel_rel_l2: float  # C++ vs numpy reference
    kernel_mismatch: float  # share of outputs outside kernel_rtol


@dataclass(frozen=True)
class Verification:
    inputs: str  # what the models ran on
    batch: int
    outputs: list[OutputFidelity]
    layers: list[LayerRun]
    failures: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.failures


def compare(name: str, reference: np.ndarray, actual: np.ndarray) -> OutputFidelity:
    a = reference.astype(np.float64).ravel()
    b = actual.astype(np.float64).ravel()
    diff = np.abs(a - b)
    norm_a, norm_b = np.linalg.norm(a), np.linalg.norm(b)
    top1 = None
    if not np.issubdtype(reference.dtype, np.floating):
        top1 = float(np.mean(reference == actual)) if reference.size else 1.0
    elif reference.ndim == 2 and reference.shape[1] > 1:
        top1 = float(np.mean(reference.argmax(axis=1) == actual.argmax(axis=1)))
    return OutputFidelity(
        name=name,
        max_abs=float(diff.max()) if diff.size else 0.0,
        rel_l2=float(np.linalg.norm(a - b) / norm_a) if norm_a > 0 else float(norm_b > 0),
        cosine=float(a @ b / (norm_a * norm_b)) if norm_a * norm_b > 0 else float(norm_a == norm_b),
        top1=top1,
    )


def _output_failures(results: Sequence[OutputFidelity], tol: Tolerances) -> list[str]:
    failures = []
    for r in results:
        if not np.isfinite([r.max_abs, r.rel_l2, r.cosine]).all():
            failures.append(
                f"output {r.name!r}: non-finite values or errors (max abs "
                f"{r.max_abs}, cosine {r.cosine})"
            )
            continue
        if tol.min_cosine is not None and r.cosine < tol.min_cosine:
            failures.append(
                f"output {r.name!r}: cosine similarity {r.cosine:.4f} < "
                f"{tol.min_cosine} (--min-cosine {np.floor(r.cosine * 1e4) / 1e4:g} "
                f"would pass)"
            )
        if tol.max_rel_l2 is not None and r.rel_l2 > tol.max_rel_l2:
            failures.append(
                f"output {r.name!r}: relative L2 error {r.rel_l2:.4g} > "
                f"{tol.max_rel_l2} (--max-rel-l2 {np.ceil(r.rel_l2 * 1e4) / 1e4:g} "
                f"would pass)"
            )
        if tol.min_top1 is not None and r.top1 is not None and r.top1 < tol.min_top1:
            failures.append(
                f"output {r.name!r}: top-1 agreement {r.top1:.4f} < {tol.min_top1} "
                f"(--min-top1 {np.floor(r.top1 * 1e4) / 1e4:g} would pass)"
            )
    return failures


def run_original(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    session = runtime.quiet_session(model, custom_ops=False)
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, runtime.run(session, names, feeds)))


def run_with_captures(
    model: onnx.ModelProto, feeds: dict[str, np.ndarray], capture: Sequence[str]
) -> dict[str, np.ndarray]:
    """Run a converted model, also returning the tensors named in ``capture``."""
    session = runtime.quiet_session(ir.with_outputs(model, capture, skip=feeds))
    names = [o.name for o in session.get_outputs()]
    results = dict(zip(names, runtime.run(session, names, feeds)))
    results.update(feeds)
    return results


def _layer_run(
    plan: LayerPlan,
    tensors: dict[str, np.ndarray],
    weights: dict[str, np.ndarray],
    node: onnx.NodeProto,
    tol: Tolerances,
) -> LayerRun:
    x, y = tensors[plan.input], tensors[plan.output]
    bias = weights[node.input[2]] if node.input[2] else None
    ref, stats = haste_conv(
        x,
        weights[node.input[1]],
        weights[node.input[3]],
        bias,
        pads=plan.pads,
        tile=plan.tile,
        relu=plan.fused_relu,
        return_stats=True,
    )
    ref64 = ref.astype(np.float64)
    diff = np.abs(ref64 - y)
    finite = np.isfinite(ref64)
    scale = max(float(np.sqrt(np.mean(ref64[finite] ** 2))) if finite.any() else 0.0, 1e-30)
    close = diff <= tol.kernel_rtol * np.maximum(np.abs(ref64), scale)
    same = (ref64 == y) | (np.isnan(ref64) & np.isnan(y))  # an overflow both sides make
    mismatch = float(np.mean(~(close | same)))
    return LayerRun(
        name=plan.name,
        out_h=int(y.shape[2]),
        out_w=int(y.shape[3]),
        ratio=float(stats.ratio.mean()),
        merging=float(stats.merging_buckets.mean()),
        kernel_rel_l2=float(np.linalg.norm(diff) / max(np.linalg.norm(ref64), 1e-30)),
        kernel_mismatch=mismatch,
    )


def verify(
    original: onnx.ModelProto,
    converted: onnx.ModelProto,
    plans: Sequence[LayerPlan],
    feeds: dict[str, np.ndarray],
    inputs_description: str,
    tol: Tolerances,
    progress: Progress | None = None,
) -> Verification:
    """Run both models on ``feeds`` and check fidelity and kernel agreement against ``tol``."""
    say = progress or (lambda _: None)
    say("running the original model")
    expected = run_original(original, feeds)
    say("running the converted model")
    capture = [name for p in plans for name in (p.input, p.output)]
    actual = run_with_captures(converted, feeds, capture)
    by_output = {n.output[0]: n for n in converted.graph.node}
    # W, B and planes of the layers (initializers or Constant nodes: rewrite.plans_of read them).
    read = {name for plan in plans for name in by_output[plan.output].input[1:] if name}
    weights = {
        name: value
        for name in read
        if (value := ir.constant_value(converted.graph, name)) is not None
    }
    layers = []
    # An output whose size follows the values (NonZero, NonMaxSuppression, a threshold) can come
    # out of the converted model with another size: nothing to compare element by element.
    resized = [name for name in expected if expected[name].shape != actual[name].shape]
    with np.errstate(all="ignore"):  # values beyond float32's range are found, not warned of
        outputs = [
            compare(name, expected[name], actual[name]) for name in expected if name not in resized
        ]
        for i, plan in enumerate(plans):
            say(f"checking layer {i + 1}/{len(plans)} against the reference: {plan.name}")
            layers.append(_layer_run(plan, actual, weights, by_output[plan.output], tol))
    failures = [
        f"the original model's output {name!r} has NaN or infinite values on these inputs "
        "(beyond float32's range?): there is nothing to compare with"
        for name, value in expected.items()
        if np.issubdtype(value.dtype, np.floating) and not np.isfinite(value).all()
    ]
    failures += [
        f"output {name!r} has shape {list(actual[name].shape)} after the conversion and "
        f"{list(expected[name].shape)} before: an output whose size depends on the values "
        "cannot be compared element by element"
        for name in resized
    ]
    failures += _output_failures(outputs, tol)
    for layer in layers:
        if layer.kernel_mismatch > tol.max_kernel_mismatch:
            failures.append(
                f"layer {layer.name!r}: the C++ kernel and the numpy reference disagree on "
                f"{layer.kernel_mismatch:.3%} of outputs (allowed {tol.max_kernel_mismatch:.3%})"
            )
    batch = next((array.shape[0] for array in feeds.values() if array.ndim), 0)
    return Verification(inputs_description, int(batch), outputs, layers, failures)
