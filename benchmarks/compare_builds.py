"""Compare builds of the HasteConv library side by side, each as a ratio to onnxruntime's Conv.

For telling kernel variants apart on a noisy machine: every session (Conv, then each library in
the order given) runs in turn, repetition after repetition, on one thread; a sample is the
calling thread's CPU time over a few runs (`haste_onnx.speed.interleaved_samples`), and each
cell is the minimum over the repetitions divided by Conv's minimum. Give a library twice to see
the spread between two alternations. With --threads N above 1 the sessions run on N threads and
a sample is wall time (the calling thread's CPU time would miss the others').

    python benchmarks/compare_builds.py OLD.so NEW.so OLD.so NEW.so \\
        [--case 128:28:0.5 ...] [--layer features.21 ...] [--batch 8] [--repeats 20] [--threads 1]

A case is C:H:r_target, a single 3x3 layer with C = M on an input of controlled redundancy (as
in bench_conv.py); a layer is a 3x3 layer of the trained Fashion-MNIST models by node name, fed
with its real activations (--batch images, 8 by default). The last columns give the largest
output difference against the first library.
"""

# ruff: noqa: E402  (the BLAS thread count must be set before numpy is imported)
from __future__ import annotations

import argparse
import os
import time
from collections.abc import Sequence
from functools import partial

for _variable in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_variable, "1")

import numpy as np
import onnx
import onnxruntime as ort
from bench_conv import (
    SPARSITY,
    chosen_layers,
    kernel_name,
    measured_r,
    one_layer_model,
    session_options,
)

from haste_onnx.hashing import make_planes
from haste_onnx.opdef import DEFAULT_TILE
from haste_onnx.speed import interleaved_samples

DEFAULT_CASES = ("128:28:0.5", "256:14:0.5", "512:7:0.5")


def session(model: onnx.ModelProto, library: str | None, threads: int = 1) -> ort.InferenceSession:
    options = session_options(threads)
    if library:
        options.register_custom_ops_library(library)
    return ort.InferenceSession(
        model.SerializeToString(), sess_options=options, providers=["CPUExecutionProvider"]
    )


def compare(
    label: str,
    x: np.ndarray,
    w: np.ndarray,
    b: np.ndarray | None,
    libraries: Sequence[str],
    repeats: int,
    threads: int,
) -> None:
    planes = make_planes(14, (DEFAULT_TILE + 2) ** 2, SPARSITY, 0)
    feed = {"X": x}
    sessions = [session(one_layer_model(x.shape, w, b, None), None, threads)]
    sessions += [session(one_layer_model(x.shape, w, b, planes), lib, threads) for lib in libraries]
    outputs = [s.run(None, feed)[0] for s in sessions[1:]]
    diffs = [float(np.abs(y - outputs[0]).max()) for y in outputs[1:]]
    runs = [partial(s.run, None, feed) for s in sessions]
    clock = time.thread_time if threads == 1 else time.perf_counter
    times = [min(t) for t in interleaved_samples(runs, repeats, clock=clock)]
    ratios = " | ".join(f"{t / times[0]:.3f}" for t in times[1:])
    r = measured_r(x, planes, DEFAULT_TILE)
    print(f"| {label} | {r:.2f} | {times[0] * 1e3:.2f} | {ratios} | {diffs} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("libraries", nargs="+", help="builds of libhaste_onnx_ops.so")
    parser.add_argument("--case", action="append", help="C:H:r_target (default: three cases)")
    parser.add_argument("--layer", action="append", default=[], help="a Fashion model's layer")
    parser.add_argument("--batch", type=int, default=8, help="images fed to --layer (default 8)")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads (default 1)")
    args = parser.parse_args()
    cases = args.case or ([] if args.layer else list(DEFAULT_CASES))
    if missing := [library for library in args.libraries if not os.path.isfile(library)]:
        parser.error(f"no such library: {', '.join(missing)}")

    if args.threads < 1:
        parser.error("--threads must be at least 1")
    clock = "thread CPU time" if args.threads == 1 else "wall time"
    print(f"onnxruntime {ort.__version__}; HasteConv time / Conv time, minimum of")
    print(f"{args.repeats} interleaved samples of {clock}, {args.threads} thread(s), L = 14\n")
    columns = " | ".join(f"{os.path.basename(lib)} ({kernel_name(lib)})" for lib in args.libraries)
    print(f"| layer | r | Conv ms | {columns} | max difference to the first |")
    print("|" + "---|" * (4 + len(args.libraries)))
    for label, x, w, b in chosen_layers(cases, args.layer, args.batch):
        compare(label, x, w, b, args.libraries, args.repeats, args.threads)


if __name__ == "__main__":
    main()
