"""Accuracy against FLOPs on labeled data, the way the paper measures it (Tables 2-5, 6).

For each number of planes ``L`` and each seed, the model is converted in memory and run under
onnxruntime on the whole data set (top-1 accuracy); the compression ratio ``r`` and merging
count ``m`` of every HasteConv are measured by hashing the layer inputs captured on the first
``stats_images`` images, and turned into FLOPs with the paper's model. The ablation of Table 6
merges the same number of channels per patch as LSH does, but chooses them at random.
"""

from __future__ import annotations

import dataclasses
import textwrap
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from numpy.lib.stride_tricks import sliding_window_view
from onnx import numpy_helper
from onnx.reference import ReferenceEvaluator
from onnx.reference.op_run import OpRun

from haste_onnx import ir, opdef, report, runtime
from haste_onnx.hashing import bucket_labels, center, check_num_planes, hash_codes
from haste_onnx.inputs import declared_shape, fits
from haste_onnx.passes.rewrite import HasteOptions, LayerPlan, decide, rewrite
from haste_onnx.reference.haste_conv import assemble, extract_patches, geometry, hash_stats
from haste_onnx.staging import Staging
from haste_onnx.verify import LayerRun

Progress = Callable[[str], None]


@dataclass(frozen=True)
class Run:
    """One converted model on the data: accuracy and FLOPs."""

    num_planes: int
    seed: int
    accuracy: float
    reduction: float  # whole-model FLOPs reduction
    mean_ratio: float  # mean r, weighted by the converted layers' baseline FLOPs
    layer_ratios: dict[str, float]


@dataclass(frozen=True)
class Row:
    """The runs of one L over the seeds, as the paper's Table 4 reports them."""

    num_planes: int
    runs: list[Run]

    def _stat(self, field: str) -> tuple[float, float]:
        values = np.array([getattr(r, field) for r in self.runs])
        return float(values.mean()), float(values.std())

    @property
    def accuracy(self) -> tuple[float, float]:
        return self._stat("accuracy")

    @property
    def reduction(self) -> tuple[float, float]:
        return self._stat("reduction")

    @property
    def mean_ratio(self) -> tuple[float, float]:
        return self._stat("mean_ratio")


@dataclass(frozen=True)
class Ablation:
    """LSH vs random grouping with the same bucket sizes, on the same images (Table 6)."""

    num_planes: int
    images: int
    lsh_accuracy: float
    random_accuracy: float
    mean_ratio: float


@dataclass(frozen=True)
class Evaluation:
    data: str
    images: int
    stats_images: int
    baseline_accuracy: float
    baseline_flops: float
    rows: list[Row]
    ablation: list[Ablation]


def _accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean(logits.argmax(axis=1) == labels))


def _check_classes(logits: np.ndarray, labels: np.ndarray) -> None:
    """Refuse a model that does not classify into ``[N, classes]`` scores, or labels beyond its
    classes: either would give a meaningless accuracy."""
    if logits.ndim != 2:
        raise ValueError(
            "evaluation needs a classifier whose first output is [N, classes], this model's is "
            f"{list(logits.shape)}"
        )
    if labels.min() < 0 or labels.max() >= logits.shape[1]:
        raise ValueError(
            f"the labels run from {labels.min()} to {labels.max()}, the model has "
            f"{logits.shape[1]} classes"
        )


def image_format(model: onnx.ModelProto) -> dict[str, Any]:
    """How to read an image folder for ``model`` (``datasets.load_dataset``'s ``mode`` and
    ``size``): grey or RGB as its one input has 1 or 3 channels, resized to its height and width
    where they are fixed; nothing for other inputs (the images are then checked as they are)."""
    inputs = ir.graph_inputs(model)
    dims = [] if len(inputs) != 1 else inputs[0].type.tensor_type.shape.dim
    sizes = [d.dim_value if d.HasField("dim_value") else 0 for d in dims]
    if len(sizes) != 4 or sizes[1] not in (1, 3):
        return {}
    return {
        "mode": "L" if sizes[1] == 1 else "RGB",
        "size": (sizes[3], sizes[2]) if all(sizes[2:]) else None,
    }


def _single_input(model: onnx.ModelProto, images: np.ndarray) -> str:
    """The name of the model's only input, once ``images`` are known to fit its fixed sizes."""
    inputs = ir.graph_inputs(model)
    if len(inputs) != 1:
        names = [i.name for i in inputs]
        raise ValueError(f"evaluation needs a one-input classifier, the model has inputs {names}")
    if not fits(inputs[0], images.shape, first_axis=1):  # any batch: the images go in batches
        raise ValueError(
            f"the images are {list(images.shape)}, the model's input {inputs[0].name!r} takes "
            f"{declared_shape(inputs[0])}"
        )
    return inputs[0].name


def _batch_size(model: onnx.ModelProto, images: np.ndarray, size: int) -> int:
    """``size``, or the model's own batch size when its input fixes one (then ``images`` must
    come in whole batches of it)."""
    first = ir.graph_inputs(model)[0].type.tensor_type.shape.dim[0]
    if not first.HasField("dim_value") or first.dim_value < 1:
        return size
    if len(images) % first.dim_value:
        raise ValueError(
            f"the model takes batches of exactly {first.dim_value} images, and {len(images)} "
            "is not a multiple of it: choose the number of images (--limit, --ablation-images)"
        )
    return first.dim_value


def _batches(n: int, size: int) -> list[slice]:
    return [slice(start, min(start + size, n)) for start in range(0, n, size)]


def _run(
    session: ort.InferenceSession,
    name: str,
    images: np.ndarray,
    batch: int,
    outputs: Sequence[str] | None = None,
) -> list[list[np.ndarray]]:
    return [session.run(outputs, {name: images[sl]}) for sl in _batches(len(images), batch)]


def measure(
    original: onnx.ModelProto,
    options: HasteOptions,
    images: np.ndarray,
    labels: np.ndarray,
    stats_images: int = 500,
    batch: int = 250,
    threads: int | None = None,
) -> Run:
    """Convert with ``options`` and measure top-1 accuracy and FLOPs on ``images``."""
    name = _single_input(original, images)
    batch = _batch_size(original, images, batch)
    converted, decisions, plans = rewrite(original, options)
    logits_name = converted.graph.output[0].name
    probe = ir.with_outputs(converted, [plan.input for plan in plans])
    session = runtime.quiet_session(probe, threads=threads)
    weights = {t.name: t for t in converted.graph.initializer}
    planes = {}
    for node in converted.graph.node:
        if node.op_type == opdef.OP_TYPE:
            planes[node.output[0]] = numpy_helper.to_array(weights[node.input[3]])
    stats_images = min(stats_images, len(images))
    correct = 0
    sums = {p.name: np.zeros(2) for p in plans}
    counted = {p.name: 0 for p in plans}
    shapes: dict[str, tuple[int, int]] = {}
    for sl in _batches(len(images), batch):
        want_stats = sl.start < stats_images
        outputs = [logits_name] + ([p.input for p in plans] if want_stats else [])
        result = session.run(outputs, {name: images[sl]})
        correct += int(np.sum(result[0].argmax(axis=1) == labels[sl]))
        if not want_stats:
            continue
        take = min(sl.stop, stats_images) - sl.start
        for plan, x in zip(plans, result[1:]):
            st = hash_stats(
                x[:take], planes[plan.output], kernel=plan.kernel, pads=plan.pads, tile=plan.tile
            )
            sums[plan.name] += [st.ratio.sum(), st.merging_buckets.sum()]
            counted[plan.name] += st.ratio.size
            shapes[plan.name] = _out_size(x.shape, plan)
    runs = [
        LayerRun(
            plan.name,
            *shapes[plan.name],
            ratio=sums[plan.name][0] / counted[plan.name],
            merging=sums[plan.name][1] / counted[plan.name],
            kernel_rel_l2=float("nan"),
            kernel_mismatch=float("nan"),
        )
        for plan in plans
    ]
    flops = report.build(
        original, decisions, plans, runs, {name: (1, *images.shape[1:])}, f"{stats_images} images"
    )
    return Run(
        options.num_planes,
        options.seed,
        correct / len(images),
        float(flops.reduction),
        float(flops.mean_ratio),
        {r.name: float(r.ratio) for r in runs},
    )


def _out_size(x_shape: tuple[int, ...], plan: LayerPlan) -> tuple[int, int]:
    geo = geometry(x_shape, (1, x_shape[1], plan.kernel, plan.kernel), plan.pads, plan.tile)
    return geo.out_h, geo.out_w


def random_grouping_conv(
    x: np.ndarray,
    w: np.ndarray,
    planes: np.ndarray,
    bias: np.ndarray | None,
    pads: Sequence[int],
    tile: int,
    relu: bool,
    rng: np.random.Generator,
) -> np.ndarray:
    """HasteConv whose buckets have LSH's sizes but random members (the paper's Table 6).

    Uses the operator's identity: each tile's output is the plain convolution of its patch with
    every channel replaced by its bucket's mean.
    """
    geo = geometry(x.shape, w.shape, pads, tile)
    c = x.shape[1]
    m, k, t, p = w.shape[0], geo.kernel, geo.tile, geo.patch
    patches = extract_patches(x, geo, pads).reshape(-1, c, p * p).astype(np.float64)
    labels, num_buckets = bucket_labels(hash_codes(center(patches), planes))
    shuffle = np.argsort(rng.random(labels.shape), axis=1)
    labels = np.take_along_axis(labels, shuffle, axis=1)  # same sizes, random members
    nb = int(num_buckets.max())
    onehot = (labels[:, None, :] == np.arange(nb)[None, :, None]).astype(np.float64)
    means = (onehot @ patches) / np.maximum(onehot.sum(-1), 1.0)[..., None]
    replaced = np.take_along_axis(means, labels[..., None], axis=1).reshape(-1, c, p, p)
    cols = sliding_window_view(replaced, (k, k), axis=(2, 3)).reshape(-1, c, t * t, k * k)
    cols = cols.transpose(0, 1, 3, 2).reshape(-1, c * k * k, t * t)
    out = w.reshape(m, c * k * k).astype(np.float64) @ cols  # [NP, M, T*T]
    return assemble(out, bias, relu, geo)


def _random_grouping_op(seed: int) -> type[OpRun]:
    """An op class for the ReferenceEvaluator that runs HasteConv nodes with random grouping."""
    rng = np.random.default_rng(seed)

    class HasteConv(OpRun):
        op_domain = opdef.DOMAIN

        def _run(
            self,
            X,
            W,
            B=None,
            planes=None,
            kernel_shape=None,
            pads=None,  # noqa: N803
            strides=None,
            dilations=None,
            group=1,
            tile=3,
            activation="",
        ):
            relu = activation in ("Relu", b"Relu")
            return (random_grouping_conv(X, W, planes, B, pads, tile, relu, rng),)

    return HasteConv


def ablation(
    original: onnx.ModelProto,
    options: HasteOptions,
    images: np.ndarray,
    labels: np.ndarray,
    batch: int = 100,
    threads: int | None = None,
) -> Ablation:
    """Accuracy of LSH and of random grouping at the same bucket sizes, on ``images``."""
    name = _single_input(original, images)
    batch = _batch_size(original, images, batch)
    converted, _, _ = rewrite(original, options)
    session = runtime.quiet_session(converted, threads=threads)
    lsh = _run(session, name, images, batch)
    evaluator = ReferenceEvaluator(converted, new_ops=[_random_grouping_op(options.seed)])
    random = []
    for sl in _batches(len(images), batch):
        outputs = evaluator.run(None, {name: images[sl]})
        assert isinstance(outputs, list)  # a list when all outputs are asked for
        random.append(outputs[0])
    run = measure(original, options, images, labels, stats_images=len(images), threads=threads)
    return Ablation(
        num_planes=options.num_planes,
        images=len(images),
        lsh_accuracy=_accuracy(np.concatenate([r[0] for r in lsh]), labels),
        random_accuracy=_accuracy(np.concatenate(random), labels),
        mean_ratio=float(run.mean_ratio),
    )


def evaluate(
    model: onnx.ModelProto,
    images: np.ndarray,
    labels: np.ndarray,
    data: str,
    planes: Sequence[int] = (8, 12, 14, 16, 20, 24),
    seeds: Sequence[int] = (0, 1, 2),
    options: HasteOptions | None = None,
    stats_images: int = 500,
    ablation_images: int = 0,
    progress: Progress | None = None,
    threads: int | None = None,
) -> Evaluation:
    """The sweep: baseline, then every L with every seed; optionally the random ablation at
    each L on the first ``ablation_images`` images."""
    say = progress or (lambda _: None)
    options = options or HasteOptions()
    for num_planes in planes:  # before the sweep, not when it reaches a bad L
        check_num_planes(num_planes)
    if twice := sorted({n for n in planes if list(planes).count(n) > 1}):
        raise ValueError(f"L = {', '.join(map(str, twice))} given twice")
    if len(images) == 0:
        raise ValueError("no images to evaluate on")
    if len(labels) != len(images):
        raise ValueError(f"{len(images)} images but {len(labels)} labels")
    if not seeds:
        raise ValueError("no seeds: give at least one")
    if stats_images < 1 or ablation_images < 0:
        raise ValueError(
            f"stats_images = {stats_images} must be >= 1, ablation_images = {ablation_images} >= 0"
        )
    if not np.isfinite(images).all():
        raise ValueError("the images have NaN or infinite values")
    name = _single_input(model, images)
    if not any(d.converted for d in decide(model, options)[1]):
        raise ValueError("no Conv of the model is eligible for HASTE with these options")
    say("baseline")
    session = runtime.quiet_session(model, custom_ops=False, threads=threads)
    batch = _batch_size(model, images, 250)
    _batch_size(model, images[:ablation_images], 250)  # before the sweep, not after it
    logits = np.concatenate([r[0] for r in _run(session, name, images, batch)])
    _check_classes(logits, labels)
    baseline = _accuracy(logits, labels)
    rows, ablations = [], []
    for num_planes in planes:
        runs = []
        for seed in seeds:
            say(f"L={num_planes} seed={seed}")
            runs.append(
                measure(
                    model,
                    dataclasses.replace(options, num_planes=num_planes, seed=seed),
                    images,
                    labels,
                    stats_images,
                    threads=threads,
                )
            )
        rows.append(Row(num_planes, runs))
        if ablation_images:
            say(f"L={num_planes}: random grouping ablation on {ablation_images} images")
            ablations.append(
                ablation(
                    model,
                    dataclasses.replace(options, num_planes=num_planes),
                    images[:ablation_images],
                    labels[:ablation_images],
                    threads=threads,
                )
            )
    _, decisions = decide(model, options)
    baseline_flops = report.build(model, decisions, [], [], {name: (1, *images.shape[1:])}, data)
    return Evaluation(
        data,
        len(images),
        min(stats_images, len(images)),
        baseline,
        baseline_flops.baseline_total,
        rows,
        ablations,
    )


def to_json(ev: Evaluation) -> dict[str, object]:
    """The evaluation as a JSON-ready dict (docs/report.md, "inspect and evaluate")."""
    return {
        "data": ev.data,
        "images": ev.images,
        "stats_images": ev.stats_images,
        "baseline": {"accuracy": ev.baseline_accuracy, "flops": ev.baseline_flops},
        "sweep": [
            {
                "num_planes": row.num_planes,
                "accuracy": dict(zip(("mean", "std"), row.accuracy)),
                "flops_reduction": dict(zip(("mean", "std"), row.reduction)),
                "mean_ratio": dict(zip(("mean", "std"), row.mean_ratio)),
                "runs": [dataclasses.asdict(run) for run in row.runs],
            }
            for row in ev.rows
        ],
        "ablation": [dataclasses.asdict(a) for a in ev.ablation],
    }


def table(ev: Evaluation) -> str:
    """The sweep as the paper's Table 4 columns, plus the ablation."""
    seeds = len(ev.rows[0].runs) if ev.rows else 0
    lines = [
        f"{ev.data}: {ev.images} images, FLOPs measured on {ev.stats_images}, {seeds} seeds",
        f"{'L':>4} {'top-1 acc (%)':>16} {'drop (pt)':>10} {'FLOPs red. (%)':>16} "
        f"{'mean r (%)':>14}",
        f"{'base':>4} {100 * ev.baseline_accuracy:>16.2f} {'':>10} {'':>16} {'':>14}",
    ]
    for row in ev.rows:
        (acc, acc_sd), (red, red_sd), (r, r_sd) = row.accuracy, row.reduction, row.mean_ratio
        lines.append(
            f"{row.num_planes:>4} {100 * acc:>9.2f} ± {100 * acc_sd:<4.2f} "
            f"{100 * (ev.baseline_accuracy - acc):>10.2f} {100 * red:>9.2f} ± {100 * red_sd:<4.2f} "
            f"{100 * r:>7.2f} ± {100 * r_sd:<4.2f}"
        )
    if ev.ablation:
        lines.append("random grouping at the same bucket sizes (paper Table 6):")
        for a in ev.ablation:
            lines.append(
                f"  L={a.num_planes}: {a.images} images, mean r {100 * a.mean_ratio:.1f} %: "
                f"LSH {100 * a.lsh_accuracy:.2f} %, random {100 * a.random_accuracy:.2f} %"
            )
    return "\n".join(lines)


def plot(ev: Evaluation, path: str, staging: Staging | None = None) -> None:
    """Top-1 accuracy against FLOPs reduction, one point per L with seed std (paper Fig. 3b)."""
    fig, ax = report.pyplot().subplots(figsize=(6, 4.2))
    red = [100 * row.reduction[0] for row in ev.rows]
    acc = [100 * row.accuracy[0] for row in ev.rows]
    ax.errorbar(
        red,
        acc,
        xerr=[100 * row.reduction[1] for row in ev.rows],
        yerr=[100 * row.accuracy[1] for row in ev.rows],
        marker="o",
        capsize=3,
        label="HASTE",
    )
    for row, x, y in zip(ev.rows, red, acc):
        ax.annotate(
            f"L={row.num_planes}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8
        )
    ax.axhline(100 * ev.baseline_accuracy, color="gray", linestyle="--", label="baseline")
    ax.set_xlabel("FLOPs reduction (%)")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_title(textwrap.fill(ev.data, 80), fontsize=9)
    ax.legend()
    fig.tight_layout()
    report.save_figure(fig, path, staging)
