"""Time HasteConv against onnxruntime's own Conv: single layers, real activations, whole models.

Every number printed is a ratio of medians, HasteConv time / Conv time (below 1: HasteConv is
faster), from runs of both interleaved in one process so that both see the same machine load.
The Conv side is onnxruntime's CPU Conv (MLAS) with its default graph optimizations. Run after
`pip install .`:

    python benchmarks/bench_conv.py [--quick] [--plot docs/speed.png]

Sections (each can be left out with --skip): `layers` (one 3x3 layer, C = M, at the spatial
sizes a ResNet has at that width, inputs of controlled redundancy), `real` (the 3x3 layers of the
trained Fashion-MNIST models fed with their real activations, for several tile edges T) and
`models` (whole models, original vs converted at L = 14 and L = 10).
"""

# ruff: noqa: E402  (the BLAS thread count must be set before numpy is imported)
from __future__ import annotations

import argparse
import ctypes
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

for _variable in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_variable, "1")  # before numpy loads its BLAS

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from haste_onnx import ir
from haste_onnx.hashing import make_planes
from haste_onnx.opdef import DEFAULT_TILE, DOMAIN, make_node
from haste_onnx.passes.rewrite import HasteOptions, rewrite
from haste_onnx.reference import hash_stats
from haste_onnx.runtime import get_library_path, make_session
from haste_onnx.speed import interleaved_medians, keep_faster, time_model

ROOT = Path(__file__).resolve().parent.parent
FASHION_MODELS = {
    "resnet18_fashion": ROOT / "models/fashion/resnet18_fashion.onnx",
    "vgg_fashion": ROOT / "models/fashion/vgg_fashion.onnx",
}
RESNET8 = ROOT / "models/mltk_resnet8/resnet8_cifar10.onnx"
FASHION_DATA = ROOT / "tests/data/fashion_mnist_test_500.npz"
FASHION_MEAN, FASHION_STD = 0.2860 * 255, 0.3530 * 255
PADS = (1, 1, 1, 1)
SPARSITY = 2 / 3

# (C = M, spatial size): ImageNet-style and CIFAR-style ResNet stages.
LAYERS = [(64, 56), (128, 28), (256, 14), (512, 7), (64, 32), (128, 16), (256, 8), (512, 4)]
QUICK_LAYERS = [(64, 32), (128, 16), (256, 8), (128, 28), (256, 14)]
TARGET_RATIOS = (0.0, 0.25, 0.375, 0.5, 0.625, 0.75)


def session_options(threads: int) -> ort.SessionOptions:
    """The same options for both sides: default graph optimizations, sequential execution; with
    more than one thread, workers that sleep when out of work (haste_onnx.speed: interleaved, an
    idle session's spinning workers take cores from the one being timed)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    if threads > 1:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


def one_layer_model(
    x_shape: Sequence[int],
    w: np.ndarray,
    b: np.ndarray | None,
    planes: np.ndarray | None,
    tile: int = DEFAULT_TILE,
    relu: bool = False,
) -> onnx.ModelProto:
    """A model of one 3x3 'same' layer: onnxruntime's Conv (planes None) or HasteConv."""
    inits = [numpy_helper.from_array(w, "W")]
    if b is not None:
        inits.append(numpy_helper.from_array(b, "B"))
    out = "Z" if relu else "Y"
    if planes is None:
        node = helper.make_node(
            "Conv", ["X", "W"] + (["B"] if b is not None else []), ["Y"], pads=list(PADS)
        )
        nodes = [node] + ([helper.make_node("Relu", ["Y"], ["Z"])] if relu else [])
        opsets = [helper.make_opsetid("", 17)]
    else:
        inits.append(numpy_helper.from_array(planes, "planes"))
        node = make_node(
            "X",
            "W",
            "planes",
            out,
            bias="B" if b is not None else None,
            kernel=w.shape[2],
            pads=PADS,
            tile=tile,
            activation="Relu" if relu else "",
        )
        nodes = [node]
        opsets = [helper.make_opsetid("", 17), helper.make_opsetid(DOMAIN, 1)]
    graph = helper.make_graph(
        nodes,
        "layer",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, list(x_shape))],
        [helper.make_tensor_value_info(out, TensorProto.FLOAT, None)],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = 10
    return model


def redundant_input(
    channels: int, size: int, target: float, rng: np.random.Generator
) -> np.ndarray:
    """[1, C, size, size]: each channel a scaled noisy copy of one of round(C * (1 - target))
    random base patterns, so that about `target` of the channels are redundant (the r it
    really produces is measured, not assumed)."""
    bases = max(1, round(channels * (1.0 - target)))
    patterns = rng.standard_normal((bases, size, size))
    which = np.arange(channels) % bases
    scale = rng.uniform(0.8, 1.25, size=(channels, 1, 1))
    noise = 0.02 * rng.standard_normal((channels, size, size))
    x = scale * patterns[which] + noise
    return x[rng.permutation(channels)][None].astype(np.float32)


@dataclass
class Timing:
    haste: float
    conv: float

    @property
    def ratio(self) -> float:
        return self.haste / self.conv


def time_layer(
    x: np.ndarray,
    w: np.ndarray,
    b: np.ndarray | None,
    planes: np.ndarray,
    threads: int,
    repeats: int,
    tile: int = DEFAULT_TILE,
    relu: bool = False,
) -> Timing:
    conv = ort.InferenceSession(
        one_layer_model(x.shape, w, b, None, relu=relu).SerializeToString(),
        sess_options=session_options(threads),
        providers=["CPUExecutionProvider"],
    )
    haste = make_session(
        one_layer_model(x.shape, w, b, planes, tile, relu), sess_options=session_options(threads)
    )
    return time_sessions(haste, conv, {"X": x}, repeats)


def time_sessions(
    haste: ort.InferenceSession,
    conv: ort.InferenceSession,
    feed: dict[str, np.ndarray],
    repeats: int,
) -> Timing:
    """Median time of each session on feed, the two interleaved."""
    t_haste, t_conv = interleaved_medians(
        [lambda: haste.run(None, feed), lambda: conv.run(None, feed)], repeats
    )
    return Timing(t_haste, t_conv)


def measured_r(x: np.ndarray, planes: np.ndarray, tile: int) -> float:
    return float(hash_stats(x, planes, kernel=3, pads=PADS, tile=tile).ratio.mean())


@dataclass
class LayerPoint:
    channels: int
    size: int
    threads: int
    target: float
    r: float
    ratio: float


def bench_layers(
    layers: Sequence[tuple[int, int]],
    targets: Sequence[float],
    threads: Sequence[int],
    repeats: int,
    num_planes: int,
) -> list[LayerPoint]:
    rng = np.random.default_rng(0)
    points = []
    print(f"\n## Single 3x3 layers, C = M, batch 1, L = {num_planes}, T = {DEFAULT_TILE}")
    print("HasteConv time / Conv time; r = the mean per-patch r the input really produced\n")
    header = "| C = M | H = W | threads | " + " | ".join(f"r~{t:.2f}" for t in targets) + " |"
    print(header)
    print("|" + "---|" * (3 + len(targets)))
    for channels, size in layers:
        w = (rng.standard_normal((channels, channels, 3, 3)) / np.sqrt(9 * channels)).astype(
            np.float32
        )
        b = rng.standard_normal(channels).astype(np.float32)
        planes = make_planes(num_planes, (DEFAULT_TILE + 2) ** 2, SPARSITY, rng)
        inputs = [redundant_input(channels, size, t, rng) for t in targets]
        rs = [measured_r(x, planes, DEFAULT_TILE) for x in inputs]
        for n_threads in threads:
            cells = []
            for target, x, r in zip(targets, inputs, rs):
                timing = time_layer(x, w, b, planes, n_threads, repeats)
                points.append(LayerPoint(channels, size, n_threads, target, r, timing.ratio))
                cells.append(f"{timing.ratio:.2f} (r={r:.2f})")
            print(f"| {channels} | {size} | {n_threads} | " + " | ".join(cells) + " |", flush=True)
    return points


def break_even(points: Sequence[LayerPoint]) -> float | None:
    """r where the ratio crosses 1, linearly interpolated between measured points."""
    ordered = sorted(points, key=lambda p: p.r)
    for lo, hi in zip(ordered, ordered[1:]):
        if lo.ratio >= 1.0 >= hi.ratio and hi.r > lo.r:
            return lo.r + (lo.ratio - 1.0) * (hi.r - lo.r) / (lo.ratio - hi.ratio)
    if ordered and ordered[0].ratio < 1.0:
        return ordered[0].r  # already faster at the smallest r measured
    return None


def fashion_images(count: int) -> np.ndarray:
    data = np.load(FASHION_DATA)
    images = data["images"][:count].astype(np.float32)
    return (images - FASHION_MEAN) / FASHION_STD


def constants(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def eligible_convs(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """3x3, stride-1, group-1 Convs with constant W and at least 8 input channels."""
    inits = constants(model)
    found = []
    for node in model.graph.node:
        if node.op_type != "Conv" or node.input[1] not in inits:
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        w = inits[node.input[1]]
        if w.shape[2:] != (3, 3) or w.shape[1] < 8 or attrs.get("group", 1) != 1:
            continue
        if list(attrs.get("strides", [1, 1])) != [1, 1]:
            continue
        if list(attrs.get("pads", [0, 0, 0, 0])) != list(PADS):
            continue
        found.append(node)
    return found


def only_outputs(model: onnx.ModelProto, names: Sequence[str]) -> onnx.ModelProto:
    """A copy of the model whose outputs are exactly `names`."""
    bare = onnx.ModelProto()
    bare.CopyFrom(model)
    del bare.graph.output[:]
    return ir.with_outputs(bare, names)


def capture_inputs(
    model: onnx.ModelProto, names: Sequence[str], feed: dict[str, np.ndarray]
) -> list[np.ndarray]:
    """The values of `names` when the model runs on feed (each added as a graph output)."""
    probe = only_outputs(model, names)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(
        probe.SerializeToString(), sess_options=options, providers=["CPUExecutionProvider"]
    )
    return session.run(None, feed)


def chosen_layers(
    cases: Sequence[str], names: Sequence[str], batch: int = 8
) -> Iterator[tuple[str, np.ndarray, np.ndarray, np.ndarray | None]]:
    """(label, X, W, B) of each layer asked for on the command line of the kernel tools: a case
    C:H:r_target is a 3x3 layer with C = M on an input of controlled redundancy; a name is a 3x3
    layer of the trained Fashion-MNIST models, fed with its real activations (batch images)."""
    rng = np.random.default_rng(0)
    for case in cases:
        try:
            channels, size, target = (float(v) for v in case.split(":"))
        except ValueError:
            raise SystemExit(f"--case {case}: expected C:H:r_target, e.g. 128:28:0.5") from None
        c = int(channels)
        w = (rng.standard_normal((c, c, 3, 3)) / np.sqrt(9 * c)).astype(np.float32)
        b = rng.standard_normal(c).astype(np.float32)
        yield f"{c} x {int(size)}x{int(size)}", redundant_input(c, int(size), target, rng), w, b
    found = set()
    for path in FASHION_MODELS.values() if names else ():
        model = onnx.load(path)
        inits = constants(model)
        convs = [n for n in eligible_convs(model) if n.name in names]
        if not convs:
            continue
        xs = capture_inputs(model, [n.input[0] for n in convs], {"input": fashion_images(batch)})
        for node, x in zip(convs, xs):
            b = inits[node.input[2]] if len(node.input) > 2 and node.input[2] else None
            yield node.name, x, inits[node.input[1]], b
            found.add(node.name)
    if missing := sorted(set(names) - found):
        raise SystemExit(f"no eligible 3x3 layer named {', '.join(missing)} in the Fashion models")


@dataclass
class RealPoint:
    model: str
    layer: str
    channels: int
    size: int
    tile: int
    r: float
    ratio: float


def bench_real(
    tiles: Sequence[int], batch: int, repeats: int, num_planes: int, every: int
) -> list[RealPoint]:
    print(f"\n## 3x3 layers fed with real activations, batch {batch}, L = {num_planes}, 1 thread")
    print("HasteConv time / Conv time (each layer alone, bias, no Relu) and the r it found\n")
    print("| model | layer | C -> M | H = W | " + " | ".join(f"T={t}" for t in tiles) + " |")
    print("|" + "---|" * (4 + len(tiles)))
    images = fashion_images(batch)
    points = []
    for label, path in FASHION_MODELS.items():
        model = onnx.load(path)
        inits = constants(model)
        convs = eligible_convs(model)[::every]
        xs = capture_inputs(model, [n.input[0] for n in convs], {"input": images})
        for node, x in zip(convs, xs):
            w = inits[node.input[1]]
            b = inits[node.input[2]] if len(node.input) > 2 and node.input[2] else None
            cells = []
            for tile in tiles:
                planes = make_planes(num_planes, (tile + 2) ** 2, SPARSITY, 0)
                r = measured_r(x, planes, tile)
                timing = time_layer(x, w, b, planes, 1, repeats, tile)
                points.append(
                    RealPoint(label, node.name, w.shape[1], x.shape[2], tile, r, timing.ratio)
                )
                cells.append(f"{timing.ratio:.2f} (r={r:.2f})")
            print(
                f"| {label} | {node.name} | {w.shape[1]} -> {w.shape[0]} | {x.shape[2]} | "
                + " | ".join(cells)
                + " |",
                flush=True,
            )
    return points


def bench_models(
    planes_list: Sequence[int], threads: Sequence[int], batch: int, repeats: int
) -> None:
    print(f"\n## Whole models, original vs converted, batch {batch}")
    print("HasteConv model time / original model time, same session options and threads\n")
    print("| model | L | threads | ratio | mean r of the converted layers |")
    print("|---|---|---|---|---|")
    rng = np.random.default_rng(0)
    cases = [
        (label, path, {"input": fashion_images(batch)}) for label, path in FASHION_MODELS.items()
    ]
    cifar = rng.uniform(-1.0, 1.0, (batch, 3, 32, 32)).astype(np.float32)
    cases.append(("resnet8_cifar10 (random input)", RESNET8, {"input": cifar}))
    for label, path, feed in cases:
        original = onnx.load(path)
        input_name = original.graph.input[0].name
        feed = {input_name: next(iter(feed.values()))}
        for num_planes, only_faster in [(L, False) for L in planes_list] + [(planes_list[0], True)]:
            options = HasteOptions(num_planes=num_planes)
            converted, decisions, plans = rewrite(original, options)
            if only_faster:  # as `convert --only-faster` does, timed on this feed
                conversion = (converted, decisions, plans)
                converted, _, plans, _, _ = keep_faster(original, options, conversion, feed)
                if not plans:
                    print(f"| {label} | {num_planes}, only faster | - | no layer faster | - |")
                    continue
            r = mean_r(converted, feed)
            name = f"{num_planes}, only faster ({len(plans)} layers)" if only_faster else num_planes
            for n_threads in threads:
                ratio = time_model(original, converted, feed, repeats, n_threads).ratio
                print(f"| {label} | {name} | {n_threads} | {ratio:.2f} | {r:.2f} |", flush=True)


def mean_r(converted: onnx.ModelProto, feed: dict[str, np.ndarray]) -> float:
    """The per-patch r of every HasteConv of the converted model, averaged over its layers."""
    nodes = [n for n in converted.graph.node if n.domain == DOMAIN]
    inits = constants(converted)
    xs = capture_inputs_haste(converted, [n.input[0] for n in nodes], feed)
    rs = []
    for node, x in zip(nodes, xs):
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        planes = inits[node.input[3]]
        stats = hash_stats(
            x, planes, kernel=attrs["kernel_shape"][0], pads=attrs["pads"], tile=attrs["tile"]
        )
        rs.append(float(stats.ratio.mean()))
    return float(np.mean(rs)) if rs else 0.0


def capture_inputs_haste(
    model: onnx.ModelProto, names: Sequence[str], feed: dict[str, np.ndarray]
) -> list[np.ndarray]:
    return make_session(only_outputs(model, names)).run(None, feed)


def plot(layer_points: Sequence[LayerPoint], real_points: Sequence[RealPoint], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for channels in sorted({p.channels for p in layer_points}):
        for size in sorted({p.size for p in layer_points if p.channels == channels}):
            sel = [
                p
                for p in layer_points
                if p.channels == channels and p.size == size and p.threads == 1
            ]
            if sel:
                sel.sort(key=lambda p: p.r)
                ax.plot(
                    [p.r for p in sel],
                    [1 / p.ratio for p in sel],
                    "o-",
                    ms=3,
                    label=f"C=M={channels}, {size}x{size}",
                )
    real = [p for p in real_points if p.tile == DEFAULT_TILE]
    if real:
        ax.plot(
            [p.r for p in real],
            [1 / p.ratio for p in real],
            "k*",
            ms=8,
            label="real activations (Fashion)",
        )
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.axhline(1 / 0.67, color="gray", lw=0.8, ls="--")
    ax.set_xlabel("measured r (mean per-patch fraction of channels merged away)")
    ax.set_ylabel("speedup = Conv time / HasteConv time")
    ax.set_title(f"HasteConv vs onnxruntime Conv, 3x3, 1 thread, T = {DEFAULT_TILE}")
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"\nplot written to {path}")


KERNELS = {16: "AVX-512", 8: "AVX2", 4: "portable"}


def kernel_name(library: str) -> str:
    """The kernel a session with ``library`` runs here: the widest the CPU has, within
    HASTE_ONNX_ISA (the library's test hook says its width)."""
    try:
        lanes = ctypes.CDLL(library).HasteConvLanes
    except AttributeError:  # a build from before the hook
        return "unknown"
    lanes.restype = ctypes.c_int64
    return KERNELS.get(lanes(), "unknown")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer layers, cases, repetitions")
    parser.add_argument("--repeats", type=int, help="repetitions per median (default 15, quick 7)")
    parser.add_argument("--planes", type=int, default=14, help="L for the layer sections")
    parser.add_argument(
        "--skip", nargs="*", default=[], choices=["layers", "real", "models"], help="sections"
    )
    parser.add_argument("--plot", type=Path, help="write the speedup-vs-r plot (PNG) here")
    args = parser.parse_args()
    repeats = args.repeats or (7 if args.quick else 15)
    if args.plot is not None:  # before the run, not after it
        if "layers" in args.skip:
            parser.error("--plot draws the layers section: do not skip it")
        if not args.plot.parent.is_dir():
            parser.error(f"--plot: no directory {args.plot.parent}")
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            parser.error("--plot needs matplotlib")

    print(
        f"onnxruntime {ort.__version__}; HasteConv's {kernel_name(get_library_path())} kernel; "
        f"ratios are HasteConv time / Conv time, medians of {repeats} interleaved repetitions"
    )
    layer_points: list[LayerPoint] = []
    real_points: list[RealPoint] = []
    if "layers" not in args.skip:
        layer_points = bench_layers(
            QUICK_LAYERS if args.quick else LAYERS,
            TARGET_RATIOS[::2] + (0.75,) if args.quick else TARGET_RATIOS,
            (1,) if args.quick else (1, 2),
            repeats,
            args.planes,
        )
        ones = [p for p in layer_points if p.threads == 1 and p.channels >= 128]
        print("\nbreak-even r* (1 thread, interpolated where the ratio crosses 1):")
        for channels, size in sorted({(p.channels, p.size) for p in ones}):
            r_star = break_even([p for p in ones if p.channels == channels and p.size == size])
            text = f"{r_star:.2f}" if r_star is not None else "not reached"
            print(f"  C = M = {channels}, {size}x{size}: r* = {text}")
    if "real" not in args.skip:
        real_points = bench_real(
            (DEFAULT_TILE,) if args.quick else (2, 3, 4),
            8,
            repeats,
            args.planes,
            every=3 if args.quick else 1,
        )
    if "models" not in args.skip:
        bench_models((14, 10), (1,) if args.quick else (1, 2), 16, repeats)
        if not args.quick:  # one image at a time: latency, where the reorders weigh most
            bench_models((14,), (1,), 1, repeats)
    if args.plot is not None and layer_points:
        plot(layer_points, real_points, args.plot)


if __name__ == "__main__":
    main()
