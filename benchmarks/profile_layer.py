"""Where HasteConv's time goes in one layer, phase by phase, in units of onnxruntime's Conv time.

Needs a build of the library that times its phases (the clock ticks of each, added up over the
runs, and counts of the work done):

    cmake -S custom_ops -B build/profile -DHASTE_PROFILE=ON && cmake --build build/profile
    python benchmarks/profile_layer.py build/profile/libhaste_onnx_ops.so \\
        [--case 128:28:0.5 ...] [--layer features.21 ...] [--batch 8] [--repeats 20]

Cases and layers as in compare_builds.py. HasteConv and Conv run interleaved on one thread; every
figure is a mean over the HasteConv runs (the profiling build itself is a few per cent slower than
a plain one). For the convolution phases the table gives the rate of 8-wide multiply-adds next to
Conv's own (its multiply-adds over its time); the multiply-adds done, as a fraction of Conv's, are
also the convolution's share of the Conv time if it ran at Conv's rate with nothing else to do:
the op-count limit of the kernel's design.
"""

# ruff: noqa: E402  (the BLAS thread count must be set before numpy is imported)
from __future__ import annotations

import argparse
import ctypes
import os
import statistics
from functools import partial

for _variable in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_variable, "1")

import numpy as np
import onnxruntime as ort
from bench_conv import SPARSITY, chosen_layers, measured_r, one_layer_model
from compare_builds import DEFAULT_CASES, session

from haste_onnx.hashing import make_planes
from haste_onnx.opdef import DEFAULT_TILE
from haste_onnx.speed import interleaved_samples

# The totals HasteConvProfile returns, in order (custom_ops/haste_conv.cc: Phase, then Count).
PHASES = {
    "patch": "each tile's zero-padded patches, and the channel sums",
    "hash": "hashing",
    "group": "grouping channels into buckets",
    "means": "bucket means",
    "conv_full": "convolution, full 3x3 tiles",
    "conv_edge": "convolution, tiles cut by the edge of Y",
    "store": "writing Y",
    "job": "the whole run",
}
COUNTS = "full_tiles full_buckets full_merged edge_tiles edge_fmas jobs job_nanos".split()
LANES = 8  # rates are of 8-wide multiply-adds, whatever the kernel's width


class Profile:
    """The profiling hook of a library built with -DHASTE_PROFILE=ON."""

    def __init__(self, library: str) -> None:
        loaded = ctypes.CDLL(library)
        loaded.HasteConvLanes.restype = ctypes.c_int64
        self.lanes = loaded.HasteConvLanes()  # of the kernel it runs, whose work it counts
        self._read = loaded.HasteConvProfile
        self._read.restype = ctypes.c_int64
        self._read.argtypes = [ctypes.POINTER(ctypes.c_uint64), ctypes.c_int64, ctypes.c_int]
        if self._read(None, 0, 0) != len(PHASES) + len(COUNTS):
            raise SystemExit(
                f"{library} does not time its phases: build it with -DHASTE_PROFILE=ON"
            )

    def take(self) -> dict[str, int]:
        """The totals since the last call, by name."""
        names = list(PHASES) + list(COUNTS)
        totals = (ctypes.c_uint64 * len(names))()
        self._read(totals, len(names), 1)
        return dict(zip(names, totals))


def profile(
    label: str,
    x: np.ndarray,
    w: np.ndarray,
    b: np.ndarray | None,
    library: str,
    hook: Profile,
    repeats: int,
) -> None:
    planes = make_planes(14, (DEFAULT_TILE + 2) ** 2, SPARSITY, 0)
    feed = {"X": x}
    conv = session(one_layer_model(x.shape, w, b, None), None)
    haste = session(one_layer_model(x.shape, w, b, planes), library)
    for _ in range(3):
        haste.run(None, feed)  # warm-up: the first runs allocate the kernel's scratch
    hook.take()
    runs = [partial(conv.run, None, feed), partial(haste.run, None, feed)]
    conv_s, haste_s = (statistics.mean(t) for t in interleaved_samples(runs, repeats))
    t = hook.take()
    jobs = t["jobs"]
    ticks_per_s = t["job"] / (t["job_nanos"] * 1e-9)

    def share(ticks: float) -> float:  # of the Conv time, per run
        return ticks / jobs / ticks_per_s / conv_s

    n, c, h, w_ = x.shape
    m = w.shape[0]
    conv_fmas = n * h * w_ * m * c * 9 / LANES
    conv_rate = conv_fmas / (conv_s * 1e9)
    scale = hook.lanes / LANES  # the kernel's multiply-adds, in 8-wide ones
    full_fmas = t["full_buckets"] * 81 * scale
    edge_fmas = t["edge_fmas"] * scale
    r = measured_r(x, planes, DEFAULT_TILE)
    print(f"\n### {label}: C = {c}, M = {m}, {h}x{w_}, batch {n}, r = {r:.2f}\n")
    print(
        f"Conv {conv_s * 1e3:.3f} ms, {conv_rate:.2f} 8-wide multiply-adds per ns; "
        f"HasteConv {haste_s * 1e3:.3f} ms = {haste_s / conv_s:.2f} x Conv\n"
    )
    print("| phase | x Conv time | share of HasteConv | 8-wide multiply-adds per ns |")
    print("|---|---|---|---|")
    rates = {
        "conv_full": full_fmas / (t["conv_full"] / ticks_per_s * 1e9 or 1),
        "conv_edge": edge_fmas / (t["conv_edge"] / ticks_per_s * 1e9 or 1),
    }
    rows = [(text, t[key], rates.get(key)) for key, text in PHASES.items() if key != "job"]
    rest = t["job"] - sum(ticks for _, ticks, _ in rows)
    rows.append(("rest of the run (thread pool, bookkeeping)", rest, None))
    for text, ticks, rate in rows:
        cell = f"{rate:.2f}" if rate is not None else ""
        print(f"| {text} | {share(ticks):.3f} | {share(ticks) * conv_s / haste_s:.1%} | {cell} |")
    outside = haste_s - t["job"] / jobs / ticks_per_s
    print(
        "| outside the kernel's run (the run call, checks, allocating Y; Conv pays its own) | "
        f"{outside / conv_s:.3f} | {outside / haste_s:.1%} | |"
    )
    work = (full_fmas + edge_fmas) / jobs / conv_fmas
    merged = t["full_merged"] / max(t["full_buckets"], 1)
    print(
        f"\nmultiply-adds done: {work:.2f} of Conv's; "
        f"full tiles: {t['full_buckets'] / max(t['full_tiles'], 1):.1f} buckets per tile and "
        f"filter block, {merged:.2f} merged channels per bucket; "
        f"{t['edge_tiles'] / max(t['full_tiles'] + t['edge_tiles'], 1):.0%} of the tiles cut by "
        "the edge of Y"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("library", help="a build of libhaste_onnx_ops.so with -DHASTE_PROFILE=ON")
    parser.add_argument("--case", action="append", help="C:H:r_target (default: three cases)")
    parser.add_argument("--layer", action="append", default=[], help="a Fashion model's layer")
    parser.add_argument("--batch", type=int, default=8, help="images fed to --layer (default 8)")
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    cases = args.case or ([] if args.layer else list(DEFAULT_CASES))
    if missing := [library for library in [args.library] if not os.path.isfile(library)]:
        parser.error(f"no such library: {', '.join(missing)}")
    hook = Profile(os.path.abspath(args.library))
    print(
        f"onnxruntime {ort.__version__}; 1 thread, L = 14, T = {DEFAULT_TILE}; means of "
        f"{args.repeats} interleaved samples"
    )
    for label, x, w, b in chosen_layers(cases, args.layer, args.batch):
        profile(label, x, w, b, os.path.abspath(args.library), hook, args.repeats)


if __name__ == "__main__":
    main()
