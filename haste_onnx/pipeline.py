"""The whole job: rewrite a model, verify it, measure its FLOPs and write it only if it passed."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import onnx

from haste_onnx import inputs, ir, opdef, report, speed
from haste_onnx.errors import HasteError, InputError, NothingFaster
from haste_onnx.inputs import PIXEL_SCALE, scale_values
from haste_onnx.passes.rewrite import (
    ConvDecision,
    HasteOptions,
    LayerPlan,
    decide,
    plans_of,
    rewrite,
)
from haste_onnx.staging import Staging, check_writable, real, real_destination
from haste_onnx.verify import Progress, Tolerances, Verification, verify


@dataclass(frozen=True)
class VerifyOptions:
    """What the verification runs on: the user's inputs, or seeded random tensors."""

    inputs: Path | None = None
    batch: int = 2
    dims: Mapping[str, int] = dataclasses.field(default_factory=dict)
    seed: int = 0
    mean: float | Sequence[float] = PIXEL_SCALE[0]  # an image folder's 0..255 pixels:
    std: float | Sequence[float] = PIXEL_SCALE[1]  # (pixel - mean) / std

    def __post_init__(self) -> None:
        for name, size in {"batch": self.batch, **self.dims}.items():
            if size < 1:
                raise InputError(f"{name} = {size}: sizes must be >= 1")
        if self.seed < 0:
            raise InputError(f"seed = {self.seed} must be >= 0")
        scale = scale_values(self.mean), scale_values(self.std)
        if self.inputs is None and scale != PIXEL_SCALE:
            raise InputError("--mean and --std scale an image folder given as --inputs")


@dataclass(frozen=True)
class ConversionResult:
    model: onnx.ModelProto
    decisions: list[ConvDecision]
    layers: list[LayerPlan]
    verification: Verification
    flops: report.FlopsReport
    written: list[Path]
    timing: speed.Comparison | None = None  # with only_faster: the converted model vs original
    target: Path = Path()  # where the model is (or would be) written
    external_data: bool = False  # whether its tensors go to a .data file beside it

    @property
    def passed(self) -> bool:
        return self.verification.passed


@dataclass(frozen=True)
class Inspection:
    decisions: list[ConvDecision]
    flops: report.FlopsReport  # baseline only: nothing is converted
    unsized: list[str] = dataclasses.field(default_factory=list)  # inputs of dynamic size not given


def default_output(path: Path) -> Path:
    return path.with_name(path.name.removesuffix(".onnx") + ".haste.onnx")


def check_output_path(
    source: Path, output: Path, source_data: set[Path], inputs: Path | None = None
) -> None:
    """Refuse outputs that would overwrite the input model, its external data files
    (``source_data``) or the ``inputs`` file, or land where nothing can be written (the output's
    own data file too, when the input has one: the output then has one as well)."""
    if str(output) == "-":
        raise InputError("a model cannot be written to stdout ('-'): name a file")
    written = real_destination(output)
    if written == real(source):
        raise InputError(f"output path is the input model: {output}; choose another output")
    if written in source_data:
        raise InputError(f"output path {output} holds the input model's tensors")
    if inputs is not None and written == real(inputs):
        raise InputError(f"output path is the --inputs file: {output}; choose another output")
    data = output.with_name(output.name + ".data")
    if real_destination(data) in source_data:
        raise InputError(
            f"the output's data file {data} holds the input model's tensors: choose another output"
        )
    check_writable(output)
    if source_data:
        check_writable(data, "the output's data file")


def load_original(path: str | Path) -> onnx.ModelProto:
    """Load a model to convert, inspect or evaluate: one that holds no HasteConv yet. Its local
    functions (torch.onnx.export's export_modules_as_functions, onnxscript) are inlined, so that
    the Convs inside them are converted and counted like the others."""
    model = ir.inline_functions(ir.load(path), path)
    if any(node.domain == opdef.DOMAIN for node in model.graph.node):
        raise InputError(
            f"{path} holds HasteConv nodes: it is a converted model; give the original one"
        )
    return model


def make_feeds(model: onnx.ModelProto, options: VerifyOptions) -> inputs.Feeds:
    inputs.check_dims(model, options.dims)
    if options.inputs is not None:
        return inputs.user_feeds(model, options.inputs, options.dims, options.mean, options.std)
    return inputs.random_feeds(model, options.batch, options.dims, options.seed)


def _no_conv(model: onnx.ModelProto, source: Path) -> InputError:
    functions = ir.local_functions(model)
    if any("Conv" in ir.function_op_types(functions, node) for node in model.graph.node):
        return InputError(
            f"{source} has no Conv node in its main graph, and the Convs of its local functions "
            "are not converted: past 2 GB the model's functions cannot be inlined"
        )
    if "Conv" in ir.nested_op_types(model.graph):
        return InputError(
            f"{source} has no Conv node in its main graph (Convs inside the subgraphs of If, "
            "Loop or Scan nodes are not converted): nothing to convert"
        )
    return InputError(f"{source} has no Conv node: nothing to convert")


def _require_convs(model: onnx.ModelProto, decisions: list[ConvDecision], source: Path) -> None:
    if not decisions:
        raise _no_conv(model, source)
    if not any(d.converted for d in decisions):
        reasons = "; ".join(f"{d.name}: {d.reason}" for d in decisions)
        raise InputError(f"no Conv in {source} is eligible for HASTE — {reasons}")


def convert(
    source: str | Path,
    output: str | Path | None = None,
    options: HasteOptions | None = None,
    verify_options: VerifyOptions | None = None,
    tolerances: Tolerances | None = None,
    force: bool = False,
    progress: Progress | None = None,
    only_faster: bool = False,
    threads: int = 1,
    write: bool = True,
) -> ConversionResult:
    """Convert the model at ``source`` and write it to ``output`` (default ``<name>.haste.onnx``)
    if the verification passed, or in any case with ``force``. Nothing is written on failure.
    With ``write`` unset nothing is written: :func:`stage` then writes the model together with
    other files.

    With ``only_faster``, every converted layer is timed alone against onnxruntime's Conv on the
    verification inputs, and those not faster as HasteConv stay Conv, then the model as a whole
    against the original, and while it is not faster the layer that saved least stays Conv too
    (:func:`haste_onnx.speed.keep_faster`), both sides with ``threads`` intra-op threads; the
    result then depends on the machine and its load."""
    if threads < 1:
        raise InputError(f"threads = {threads} must be >= 1")
    source = Path(source)
    target = Path(output) if output is not None else default_output(source)
    source_data = ir.external_data_files(source)
    verify_options = verify_options or VerifyOptions()
    check_output_path(source, target, source_data, verify_options.inputs)
    say = progress or (lambda _: None)
    say(f"loading {source}")
    original = load_original(source)
    options = options or HasteOptions()
    say("rewriting")
    converted, decisions, plans = rewrite(original, options)
    _require_convs(original, decisions, source)
    try:
        onnx.checker.check_model(ir.session_source(converted))
    except onnx.checker.ValidationError as exc:  # a defect of the rewrite, not of the input
        raise HasteError(f"the converted model fails onnx.checker (a defect): {exc}") from None
    feeds = make_feeds(original, verify_options)
    time_ratios = None  # each converted layer's, when timed
    model_timing = None
    if only_faster:
        say("timing each converted layer against Conv")
        converted, decisions, plans, layer_timings, model_timing = speed.keep_faster(
            original, options, (converted, decisions, plans), feeds.arrays, say, threads
        )
        time_ratios = {name: timing.ratio for name, timing in layer_timings.items()}
        if not plans:
            alone = ", ".join(f"{name} {t.ratio:.2f}" for name, t in layer_timings.items())
            whole = any(t.faster for t in layer_timings.values())
            raise NothingFaster(
                f"--only-faster: no layer of {source} makes it faster as HasteConv on this "
                f"machine, so nothing is written (HasteConv / Conv time, each layer alone: {alone}"
                + ("; those faster alone did not make the whole model faster)" if whole else ")")
            )
    verification = verify(
        original, converted, plans, feeds.arrays, feeds.description, tolerances or Tolerances(), say
    )
    flops_report = _measured(original, decisions, plans, verification, feeds, time_ratios)
    result = ConversionResult(
        converted,
        decisions,
        plans,
        verification,
        flops_report,
        [],
        model_timing,
        target,
        bool(source_data),
    )
    if write and (verification.passed or force):
        say(f"writing {target}")
        written = ir.save(converted, target, result.external_data)
        result = dataclasses.replace(result, written=written)
    return result


def stage(result: ConversionResult, staging: Staging) -> list[Path]:
    """Stage the converted model for its target (:func:`convert` with ``write`` unset), to be
    written with other files by ``staging.commit()``. Returns the files it will write."""
    return ir.stage(result.model, result.target, result.external_data, staging)


def _measured(
    original: onnx.ModelProto,
    decisions: list[ConvDecision],
    plans: list[LayerPlan],
    verification: Verification,
    feeds: inputs.Feeds,
    time_ratios: dict[str, float] | None = None,
) -> report.FlopsReport:
    """The FLOPs report of a verified conversion, measured on the inputs it ran on."""
    shapes = inputs.run_shapes(original, feeds.arrays)
    return report.build(
        original,
        decisions,
        plans,
        verification.layers,
        shapes,
        feeds.description,
        time_ratios,
        feeds.arrays,
    )


def inspect(
    source: str | Path,
    options: HasteOptions | None = None,
    verify_options: VerifyOptions | None = None,
) -> Inspection:
    """Every Conv's eligibility and reason, and the baseline FLOPs, without converting: FLOPs
    need only the inputs' shapes (of the user's inputs, or the model's with ``batch`` and
    ``dims``), and are left unknown where a dynamic size is not given."""
    model = load_original(source)
    _, decisions = decide(model, options or HasteOptions())
    if not decisions:
        raise _no_conv(model, Path(source))
    verify_options = verify_options or VerifyOptions()
    arrays = None  # the user's inputs, if any: a run on them gives shapes inference cannot
    unsized: list[str] = []
    if verify_options.inputs is not None:
        feeds = make_feeds(model, verify_options)
        arrays = feeds.arrays
        shapes = inputs.run_shapes(model, arrays)
        description = feeds.description
    else:
        inputs.check_dims(model, verify_options.dims)
        shapes = {}
        for value in ir.graph_inputs(model):
            try:
                shapes[value.name] = inputs.resolve_shape(
                    value, verify_options.batch, verify_options.dims
                )
            except InputError:  # a dynamic size not given: FLOPs that depend on it are unknown
                unsized.append(value.name)
        description = "input shapes: " + ", ".join(f"{k} {list(v)}" for k, v in shapes.items())
    flops_report = report.build(model, decisions, [], [], shapes, description, feeds=arrays)
    return Inspection(decisions, flops_report, unsized)


@dataclass(frozen=True)
class PairResult:
    """Verification and FLOPs of a model converted earlier, against its original."""

    layers: list[LayerPlan]
    verification: Verification
    flops: report.FlopsReport

    @property
    def passed(self) -> bool:
        return self.verification.passed


def _signature(model: onnx.ModelProto) -> str:
    """The graph's inputs and outputs, each by name, element type and shape: what a conversion
    keeps."""
    printable = onnx.helper.printable_value_info
    inputs = ", ".join(printable(v) for v in ir.graph_inputs(model))
    return f"{inputs} -> {', '.join(printable(v) for v in model.graph.output)}"


def verify_pair(
    original_path: str | Path,
    converted_path: str | Path,
    verify_options: VerifyOptions | None = None,
    tolerances: Tolerances | None = None,
    progress: Progress | None = None,
) -> PairResult:
    """Check an existing converted model against its original and measure its FLOPs."""
    original, converted = load_original(original_path), ir.load(converted_path)
    plans = plans_of(converted)
    if not plans:
        raise InputError(f"{converted_path} has no HasteConv node: it is not a converted model")
    if _signature(converted) != _signature(original):
        raise InputError(
            f"{converted_path} is not a conversion of {original_path}: their graph inputs or "
            f"outputs differ ({_signature(converted)}, against {_signature(original)})"
        )
    feeds = make_feeds(original, verify_options or VerifyOptions())
    verification = verify(
        original,
        converted,
        plans,
        feeds.arrays,
        feeds.description,
        tolerances or Tolerances(),
        progress,
    )
    names = {p.name for p in plans}
    decisions = [
        dataclasses.replace(
            d,
            converted=d.name in names,
            reason="" if d.name in names else "left as Conv in the converted model",
        )
        for d in decide(original, HasteOptions(min_channels=1))[1]
    ]
    return PairResult(
        plans, verification, _measured(original, decisions, plans, verification, feeds)
    )
