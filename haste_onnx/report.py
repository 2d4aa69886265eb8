"""The FLOPs report: per-layer and whole-model numbers, as JSON, a text table and a PNG plot.

The JSON schema is documented in ``docs/report.md``; ``SCHEMA`` changes whenever a field
changes meaning or disappears.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from haste_onnx import flops, ir
from haste_onnx.errors import InputError
from haste_onnx.flops import HasteFlops
from haste_onnx.passes.rewrite import ConvDecision, LayerPlan
from haste_onnx.staging import Staging
from haste_onnx.verify import LayerRun

SCHEMA = "haste-onnx/report/1"


@dataclass(frozen=True)
class LayerReport:
    """A converted Conv: its shape, hyperparameters, measured statistics and FLOPs per image."""

    name: str
    in_channels: int
    out_channels: int
    kernel: int
    out_h: int
    out_w: int
    num_planes: int
    tile: int
    ratio: float
    merging: float
    flops: HasteFlops
    fused_batchnorm: bool | None
    fused_relu: bool
    time_ratio: float | None = None  # HasteConv / Conv time alone, when timed (--only-faster)


@dataclass(frozen=True)
class SkippedConv:
    name: str
    reason: str
    flops: float | None  # per image, None when shapes are unknown


@dataclass(frozen=True)
class FlopsReport:
    """FLOPs per image, measured on ``inputs``. Counted ops: Conv, Gemm, MatMul (and HasteConv)."""

    inputs: str
    layers: list[LayerReport]
    skipped: list[SkippedConv]
    other_flops: float  # Gemm and MatMul, left as they are
    uncounted: list[str]  # Conv/Gemm/MatMul nodes whose shapes could not be inferred
    nested: list[str] = dataclasses.field(default_factory=list)  # those inside subgraphs

    @property
    def converted_baseline(self) -> float:
        return sum(layer.flops.baseline for layer in self.layers)

    @property
    def converted_haste(self) -> float:
        return sum(layer.flops.total for layer in self.layers)

    @property
    def baseline_total(self) -> float:
        return self.converted_baseline + self.unchanged

    @property
    def haste_total(self) -> float:
        return self.converted_haste + self.unchanged

    @property
    def unchanged(self) -> float:
        return self.other_flops + sum(s.flops or 0.0 for s in self.skipped)

    @property
    def reduction(self) -> float:
        return 1.0 - self.haste_total / self.baseline_total if self.baseline_total else 0.0

    @property
    def mean_ratio(self) -> float:
        """Mean r over converted layers, weighted by their baseline FLOPs."""
        base = self.converted_baseline
        return (
            sum(layer.ratio * layer.flops.baseline for layer in self.layers) / base if base else 0.0
        )


def _batch(input_shapes: dict[str, tuple[int, ...]]) -> int:
    """The images per run that FLOPs are divided by: the first dimension of the first 4-D graph
    input (a CNN's [N, C, H, W]), else 1; not the largest first dimension of all inputs, which
    may be anchors [1000, 4] or, exported without their values, weights, nor that of an input
    without a batch axis ([C, H, W])."""
    first = next((shape for shape in input_shapes.values() if len(shape) == 4), (1,))
    return first[0] or 1


def build(
    original: onnx.ModelProto,
    decisions: Sequence[ConvDecision],
    plans: Sequence[LayerPlan],
    runs: Sequence[LayerRun],
    input_shapes: dict[str, tuple[int, ...]],
    inputs: str,
    time_ratios: Mapping[str, float] | None = None,
    feeds: Mapping[str, np.ndarray] | None = None,
) -> FlopsReport:
    """Assemble the report from the rewrite's decisions and the verification's measurements
    (``feeds``: the inputs they ran on, for shapes that shape inference cannot follow)."""
    batch = _batch(input_shapes)
    shapes = flops.static_shapes(original, input_shapes, feeds)
    run_by_name = {r.name: r for r in runs}
    layers = []
    for plan in plans:
        run = run_by_name[plan.name]
        layers.append(
            LayerReport(
                name=plan.name,
                in_channels=plan.in_channels,
                out_channels=plan.out_channels,
                kernel=plan.kernel,
                out_h=run.out_h,
                out_w=run.out_w,
                num_planes=plan.num_planes,
                tile=plan.tile,
                ratio=run.ratio,
                merging=run.merging,
                flops=flops.haste_flops(
                    in_channels=plan.in_channels,
                    out_channels=plan.out_channels,
                    kernel=plan.kernel,
                    out_h=run.out_h,
                    out_w=run.out_w,
                    tile=plan.tile,
                    projection_flops=plan.projection_flops,
                    ratio=run.ratio,
                    merging=run.merging,
                ),
                fused_batchnorm=plan.fused_batchnorm,
                fused_relu=plan.fused_relu,
                time_ratio=(time_ratios or {}).get(plan.name),
            )
        )
    converted = {p.name for p in plans}
    reasons = {d.name: d.reason for d in decisions}
    skipped, other, uncounted = [], 0.0, []
    conv_index = 0
    for index, node in enumerate(original.graph.node):
        if node.op_type not in flops.COUNTED or node.domain not in ("", "ai.onnx"):
            continue
        count = flops.node_flops(node, shapes)
        per_image = None if count is None else count / batch
        if count is None:
            uncounted.append(node.name or f"{node.op_type}_{index}")
        if node.op_type == "Conv":
            name = decisions[conv_index].name
            conv_index += 1
            if name not in converted:
                skipped.append(
                    SkippedConv(name, reasons[name] or "eligible, not converted", per_image)
                )
        elif per_image is not None:
            other += per_image
    functions = ir.local_functions(original)
    nested = [  # neither converted nor counted: the rewrite and the FLOPs see the main graph
        f"{op} inside {node.op_type} {node.name or node.output[0]!r}"
        for node in original.graph.node
        for op in sorted(
            (ir.inner_op_types(node) | ir.function_op_types(functions, node)) & set(flops.COUNTED)
        )
    ]
    return FlopsReport(inputs, layers, skipped, other, uncounted, nested)


def _round(value: object) -> object:
    if isinstance(value, float):
        if not math.isfinite(value):
            return None  # JSON has no NaN nor infinity (an output that overflows)
        if value.is_integer() and abs(value) < 2**53:
            return int(value)  # FLOPs counts stay exact
        return float(f"{value:.6g}")
    if isinstance(value, dict):
        return {k: _round(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_round(v) for v in value]
    return value


def flops_json(report: FlopsReport) -> dict[str, object]:
    layers = []
    for layer in report.layers:
        entry = dataclasses.asdict(layer)
        entry["flops"] = {
            **dataclasses.asdict(layer.flops),
            "total": layer.flops.total,
            "reduction": layer.flops.reduction,
        }
        layers.append(entry)
    return {
        "inputs": report.inputs,
        "layers": layers,
        "skipped": [dataclasses.asdict(s) for s in report.skipped],
        "totals": {
            "baseline_flops": report.baseline_total,
            "haste_flops": report.haste_total,
            "reduction": report.reduction,
            "converted_baseline_flops": report.converted_baseline,
            "converted_haste_flops": report.converted_haste,
            "unchanged_flops": report.unchanged,
            "mean_ratio": report.mean_ratio,
            "uncounted": report.uncounted,
            "nested": report.nested,
        },
    }


def dumps(document: dict[str, object]) -> str:
    return json.dumps(_round({"schema": SCHEMA, **document}), indent=2, allow_nan=False)


def _human(value: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.2f}{unit}"
    return f"{value:.0f}"


def _fewer(reduction: float) -> str:
    """A reduction in words: '40.5% fewer', or '12.9% more' when the overheads outweigh it."""
    return f"{reduction:.1%} fewer" if reduction >= 0 else f"{-reduction:.1%} more"


def table(report: FlopsReport) -> str:
    """A fixed-width text table of the report, for terminals."""
    header = (
        f"{'layer':<28} {'C':>5} {'M':>5} {'K':>2} {'out':>9} {'L':>3} {'r':>6} "
        f"{'m':>6} {'base':>9} {'haste':>9} {'saved':>7}"
    )
    lines = [f"FLOPs per image, measured on {report.inputs}", header, "-" * len(header)]
    for layer in report.layers:
        f = layer.flops
        lines.append(
            f"{layer.name[:28]:<28} {layer.in_channels:>5} {layer.out_channels:>5} "
            f"{layer.kernel:>2} {f'{layer.out_h}x{layer.out_w}':>9} {layer.num_planes:>3} "
            f"{layer.ratio:>6.1%} {layer.merging:>6.2f} {_human(f.baseline):>9} "
            f"{_human(f.total):>9} {f.reduction:>7.1%}"
        )
    for skip in report.skipped:
        flops_text = "?" if skip.flops is None else _human(skip.flops)
        lines.append(f"{skip.name[:28]:<28} skipped ({flops_text} FLOPs): {skip.reason}")
    lines.append("-" * len(header))
    lines.append(
        f"converted layers: {_human(report.converted_baseline)} -> "
        f"{_human(report.converted_haste)} FLOPs; whole model (Conv, Gemm, MatMul): "
        f"{_human(report.baseline_total)} -> {_human(report.haste_total)} "
        f"({_fewer(report.reduction)}), mean r {report.mean_ratio:.1%}"
    )
    if report.uncounted:
        lines.append(f"not counted (unknown shapes): {', '.join(report.uncounted)}")
    if report.nested:
        lines.append(f"neither converted nor counted: {', '.join(report.nested)}")
    return "\n".join(lines)


def pyplot() -> Any:
    """matplotlib.pyplot, drawing off screen; InputError if matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise InputError("--plot needs matplotlib: pip install matplotlib") from None
    return plt


def plot_formats() -> list[str]:
    """The file name extensions matplotlib draws to; InputError if it is not installed."""
    pyplot()
    import matplotlib
    from matplotlib.backend_bases import FigureCanvasBase

    formats = dict(FigureCanvasBase.get_supported_filetypes())  # a copy: this is the class's
    if shutil.which(matplotlib.rcParams["pgf.texsystem"]) is None:  # PGF is drawn by LaTeX
        formats.pop("pgf", None)
    return sorted(formats)


def save_figure(figure: Any, path: str | Path, staging: Staging | None = None) -> None:
    """Write ``figure`` to ``path`` as a PNG, whole or not at all (with ``staging``, when that
    commits), and close it."""
    try:
        with Staging() as own:
            (staging or own).write(Path(path), lambda staged: figure.savefig(staged, dpi=110))
            own.commit()
    finally:
        pyplot().close(figure)


def plot(report: FlopsReport, path: str | Path, staging: Staging | None = None) -> None:
    """Per-layer compression ratio and FLOPs, baseline vs HASTE, as a PNG (needs matplotlib)."""
    plt = pyplot()
    names = [layer.name for layer in report.layers]
    x = range(len(names))
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(max(6, 0.5 * len(names) + 3), 7), sharex=True)
    top.bar(x, [100 * layer.ratio for layer in report.layers], color="tab:blue")
    top.set_ylabel("compression ratio r (%)")
    top.set_title(f"HASTE per layer: {_fewer(report.reduction)} FLOPs in total")
    width = 0.4
    bottom.bar(
        [i - width / 2 for i in x],
        [layer.flops.baseline / 1e6 for layer in report.layers],
        width,
        label="Conv",
    )
    bottom.bar(
        [i + width / 2 for i in x],
        [layer.flops.total / 1e6 for layer in report.layers],
        width,
        label="HASTE",
    )
    bottom.set_ylabel("MFLOPs per image")
    bottom.set_xticks(list(x), names, rotation=60, ha="right", fontsize=8)
    bottom.legend()
    fig.tight_layout()
    save_figure(fig, path, staging)
