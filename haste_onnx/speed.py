"""Timing HasteConv layers against onnxruntime's own Conv, side by side.

Used by ``convert --only-faster`` (keep as Conv the layers that would run slower here) and by
``benchmarks/bench_conv.py``. The two sides run in alternation, round after round, so that both
see the same machine load; only the ratio of their times is meaningful. "Faster" means faster
beyond the machine's noise: the HasteConv side won so many rounds that two sides of equal speed
would win as many less than one time in twenty (a one-sided sign test). With more than one
thread, both sides' worker threads sleep when they run out of work instead of spinning:
interleaved, an idle session's spinning workers would take cores from the session being timed.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import time
from collections.abc import Callable, Sequence
from functools import partial

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

from haste_onnx import ir, runtime
from haste_onnx.errors import InputError
from haste_onnx.opdef import DOMAIN
from haste_onnx.passes.rewrite import ConvDecision, HasteOptions, LayerPlan, rewrite

Conversion = tuple[onnx.ModelProto, list[ConvDecision], list[LayerPlan]]

#: Each timed sample repeats its call for at least this long.
SAMPLE_SECONDS = 0.005
#: Rounds of each side-by-side timing that --only-faster decides on.
ROUNDS = 9
#: The sign test's level: how often two sides of equal speed may pass for "faster".
SIGNIFICANCE = 0.05


@dataclasses.dataclass(frozen=True)
class Comparison:
    """A HasteConv side timed against its Conv side, in rounds that alternate the two."""

    ratio: float  # median time of the HasteConv side / median time of the Conv side
    wins: int  # rounds in which the HasteConv side took less time than the Conv side
    rounds: int

    @property
    def faster(self) -> bool:
        """Faster beyond chance: a lower median, and so many rounds won that two sides of equal
        speed would win as many with a probability under SIGNIFICANCE (each round times both
        sides under the same load, so the machine's drifts cancel)."""
        chance = sum(math.comb(self.rounds, k) for k in range(self.wins, self.rounds + 1))
        return self.ratio < 1.0 and chance / 2**self.rounds < SIGNIFICANCE

    def __str__(self) -> str:
        return f"{self.ratio:.2f}, faster in {self.wins} of {self.rounds} rounds"


def compare(
    haste: Callable[[], object], conv: Callable[[], object], rounds: int = ROUNDS
) -> Comparison:
    """Time ``haste`` against ``conv`` in ``rounds`` alternating rounds."""
    t_haste, t_conv = interleaved_samples([haste, conv], rounds)
    wins = sum(h < c for h, c in zip(t_haste, t_conv))
    return Comparison(statistics.median(t_haste) / statistics.median(t_conv), wins, rounds)


def interleaved_samples(
    runs: Sequence[Callable[[], object]],
    repeats: int,
    clock: Callable[[], float] = time.perf_counter,
) -> list[list[float]]:
    """``repeats`` samples of seconds per call of each run, on ``clock``; the runs take turns in
    a fixed order, so that all see the same load and each follows the same other run every time
    (reversing the order every round would let one run twice in a row, its data still in cache:
    at batch 1, a 512-channel layer's 9.4 MB of weights made either side up to 40 % faster
    then). Each sample times enough calls to last about ``SAMPLE_SECONDS``."""
    for run in runs:
        run()  # warm-up
    batches = []
    for run in runs:
        start = clock()
        run()
        elapsed = max(clock() - start, 1e-6)
        batches.append(max(1, int(SAMPLE_SECONDS / elapsed)))
    samples: list[list[float]] = [[] for _ in runs]
    for _ in range(repeats):
        for run, batch, times in zip(runs, batches, samples):
            start = clock()
            for _ in range(batch):
                run()
            times.append((clock() - start) / batch)
    return samples


def interleaved_medians(runs: Sequence[Callable[[], object]], repeats: int) -> list[float]:
    """Median wall seconds per call of each run, from :func:`interleaved_samples`."""
    return [statistics.median(times) for times in interleaved_samples(runs, repeats)]


def layer_models(
    model: onnx.ModelProto, node: onnx.NodeProto
) -> tuple[onnx.ModelProto, onnx.ModelProto]:
    """Two one-layer models of the HasteConv ``node`` of ``model``, input X and output Y: the
    same layer as onnxruntime's Conv (with its Relu, if fused) and as HasteConv."""
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    weights = {name: ir.constant_value(model.graph, name) for name in node.input[1:] if name}
    inits = [onnx.numpy_helper.from_array(np.asarray(v), k) for k, v in weights.items()]
    conv_inputs = ["X", node.input[1]] + ([node.input[2]] if node.input[2] else [])
    relu = attrs.get("activation", b"") in (b"Relu", "Relu")
    conv_nodes = [
        helper.make_node(
            "Conv",
            conv_inputs,
            ["Z" if relu else "Y"],
            kernel_shape=list(attrs["kernel_shape"]),
            pads=list(attrs["pads"]),
        )
    ] + ([helper.make_node("Relu", ["Z"], ["Y"])] if relu else [])
    haste = onnx.NodeProto()
    haste.CopyFrom(node)
    haste.input[0], haste.output[0] = "X", "Y"

    def one_layer(nodes: list[onnx.NodeProto], domains: list[str]) -> onnx.ModelProto:
        graph = helper.make_graph(
            nodes,
            "layer",
            [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["N", "C", "H", "W"])],
            [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["N", "M", "H", "W"])],
            initializer=inits,
        )
        opsets = [o for o in model.opset_import if o.domain in domains]
        layer = helper.make_model(graph, opset_imports=opsets)
        layer.ir_version = model.ir_version
        return layer

    return one_layer(conv_nodes, [""]), one_layer([haste], ["", DOMAIN])


def _timed_session(
    model: onnx.ModelProto, threads: int, custom_ops: bool = True
) -> ort.InferenceSession:
    """A session to time with ``threads`` threads; with more than one, its workers sleep when out
    of work instead of spinning (see the module's docstring)."""
    return runtime.quiet_session(
        model, custom_ops=custom_ops, threads=threads, spinning=threads == 1
    )


def _check_timing(rounds: int, threads: int) -> None:
    if rounds < 1 or threads < 1:
        raise InputError(f"rounds = {rounds} and threads = {threads} must be >= 1")


def time_model(
    original: onnx.ModelProto,
    converted: onnx.ModelProto,
    feeds: dict[str, np.ndarray],
    rounds: int = ROUNDS,
    threads: int = 1,
) -> Comparison:
    """The converted model timed against the original, both run on ``feeds`` by onnxruntime with
    the same session options (its default graph optimizations, ``threads`` threads, and the
    operator's library, so that the baseline may be a model converted earlier)."""
    _check_timing(rounds, threads)
    before = _timed_session(original, threads)
    after = _timed_session(converted, threads)
    return compare(
        partial(runtime.run, after, None, feeds), partial(runtime.run, before, None, feeds), rounds
    )


def time_layers(
    model: onnx.ModelProto,
    feeds: dict[str, np.ndarray],
    rounds: int = ROUNDS,
    threads: int = 1,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Comparison]:
    """Every HasteConv node of the converted ``model`` timed against the same layer as Conv, by
    the node's output name: each layer alone, fed the input it gets when ``model`` runs on
    ``feeds``."""
    _check_timing(rounds, threads)
    nodes = [n for n in model.graph.node if n.domain == DOMAIN]
    session = runtime.quiet_session(ir.with_outputs(model, [n.input[0] for n in nodes]))
    names = [o.name for o in session.get_outputs()]
    tensors = dict(zip(names, runtime.run(session, names, feeds)))
    tensors.update(feeds)
    timings = {}
    for node in nodes:
        conv_model, haste_model = layer_models(model, node)
        conv = _timed_session(conv_model, threads, custom_ops=False)
        haste = _timed_session(haste_model, threads)
        feed = {"X": tensors[node.input[0]]}
        timing = timings[node.output[0]] = compare(
            partial(haste.run, None, feed), partial(conv.run, None, feed), rounds
        )
        if progress:
            progress(f"timed {node.name or node.output[0]}: HasteConv / Conv time {timing}")
    return timings


def keep_faster(
    original: onnx.ModelProto,
    options: HasteOptions,
    conversion: Conversion,
    feeds: dict[str, np.ndarray],
    progress: Callable[[str], None] | None = None,
    threads: int = 1,
) -> tuple[
    onnx.ModelProto, list[ConvDecision], list[LayerPlan], dict[str, Comparison], Comparison | None
]:
    """``conversion`` (``rewrite(original, options)``) again without the layers that do not make
    the model faster here, each with that as its reason; the timing of every layer timed, by
    layer name; and the timing of the model so converted against the original (None if no layer
    is left).

    First every converted layer is timed alone (:func:`time_layers`) and those not faster as
    HasteConv (:attr:`Comparison.faster`) stay Conv. Then the model is timed as a whole: a layer
    that is faster alone can still cost more than it saves there (onnxruntime reorders the data
    around a node it does not know, which matters most at small batches), so while the whole is
    not faster, the layer that saved least alone goes back to Conv and the whole is timed again.
    Both sides run with ``threads`` intra-op threads."""
    say = progress or (lambda _: None)
    converted, decisions, plans = conversion
    timings = time_layers(converted, feeds, threads=threads, progress=progress)
    by_name = {p.name: timings[p.output] for p in plans}
    reasons = {
        name: f"not faster as HasteConv here (time / Conv time {timing})"
        for name, timing in by_name.items()
        if not timing.faster
    }
    while True:
        if reasons:
            excluded = dataclasses.replace(  # an --include'd layer too: the user asked for speed
                options,
                include=tuple(name for name in options.include if name not in reasons),
                exclude=options.exclude + tuple(reasons),
                layer_planes={k: v for k, v in options.layer_planes.items() if k not in reasons},
            )
            converted, decisions, plans = rewrite(original, excluded)
        if not plans:
            model = None
            break
        say("timing the converted model against the original")
        model = time_model(original, converted, feeds, threads=threads)
        if model.faster:
            break
        least = max(plans, key=lambda p: by_name[p.name].ratio)
        say(f"the model is not faster as a whole ({model}): {least.name} stays Conv")
        reasons[least.name] = (
            f"not faster in the whole model here (model time / original {model} with it; "
            f"alone {by_name[least.name].ratio:.2f})"
        )
    decisions = [
        dataclasses.replace(d, reason=reasons[d.name]) if d.name in reasons else d
        for d in decisions
    ]
    return converted, decisions, plans, by_name, model
