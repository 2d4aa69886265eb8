"""The HasteConv onnxruntime custom operator against the numpy reference (the oracle).

Runs against the installed package's library; HASTE_ONNX_TEST_LIBRARY points the tests at another
build of it (custom_ops/tests/run_sanitizer.sh uses that for the sanitizer build), and
HASTE_ONNX_TEST_PORTABLE_BUILD=1 says that build has only the portable kernel (HASTE_PORTABLE).
"""

from __future__ import annotations

import ctypes
import itertools
import os
import subprocess
import sys
import threading
from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator
from onnxruntime.capi.onnxruntime_pybind11_state import Fail, InvalidArgument, RuntimeException

import haste_onnx
from haste_onnx import runtime
from haste_onnx.errors import InputError
from haste_onnx.hashing import make_planes
from haste_onnx.opdef import DOMAIN, make_node
from haste_onnx.reference import HasteConv, haste_conv
from haste_onnx.reference.haste_conv import extract_patches, geometry
from haste_onnx.runtime import get_library_path, make_session

LIBRARY = os.environ.get("HASTE_ONNX_TEST_LIBRARY") or get_library_path()
ORT_ERRORS = (Fail, InvalidArgument, RuntimeException)
Pads = Sequence[int]


# --- building and running models ------------------------------------------------------------


def haste_model(
    w: np.ndarray,
    planes: np.ndarray,
    bias: np.ndarray | None = None,
    *,
    pads: Pads = (0, 0, 0, 0),
    tile: int = 3,
    activation: str = "",
    x_type: int = TensorProto.FLOAT,
    overrides: dict[str, object] | None = None,
) -> onnx.ModelProto:
    """One HasteConv with constant W, B and planes; ``overrides`` replace node attributes."""
    overrides = overrides or {}
    node = make_node(
        "X",
        "W",
        "planes",
        "Y",
        bias=None if bias is None else "B",
        kernel=w.shape[-1],
        pads=pads,
        tile=tile,
        activation=activation,
    )
    attributes = [a for a in node.attribute if a.name not in overrides]
    attributes += [
        value if isinstance(value, onnx.AttributeProto) else helper.make_attribute(name, value)
        for name, value in overrides.items()
    ]
    del node.attribute[:]
    node.attribute.extend(attributes)
    constants = {"W": w, "planes": planes} | ({} if bias is None else {"B": bias})
    graph = helper.make_graph(
        [node],
        "haste_conv",
        [helper.make_tensor_value_info("X", x_type, None)],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)],
        initializer=[numpy_helper.from_array(v, k) for k, v in constants.items()],
    )
    return _model(graph, DOMAIN)


def conv_model(w: np.ndarray, pads: Pads) -> onnx.ModelProto:
    """onnxruntime's own Conv, the oracle of the exact cases."""
    node = helper.make_node("Conv", ["X", "W"], ["Y"], pads=list(pads))
    graph = helper.make_graph(
        [node],
        "conv",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, None)],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)],
        initializer=[numpy_helper.from_array(w, "W")],
    )
    return _model(graph)


def _model(graph: onnx.GraphProto, *domains: str) -> onnx.ModelProto:
    opsets = [helper.make_opsetid("", 17)] + [helper.make_opsetid(d, 1) for d in domains]
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = 10  # onnx stamps a newer IR than onnxruntime reads
    return model


def session(model: onnx.ModelProto, threads: int = 1) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.register_custom_ops_library(LIBRARY)
    options.intra_op_num_threads = threads
    options.log_severity_level = 4  # the error tests provoke errors on purpose
    return ort.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )


def run(model: onnx.ModelProto, x: np.ndarray, threads: int = 1) -> np.ndarray:
    return session(model, threads).run(None, {"X": x})[0]


_library = ctypes.CDLL(LIBRARY)
_library.HasteConvTileCodes.restype = ctypes.c_int


def kernel_codes(
    x: np.ndarray, planes: np.ndarray, kernel: int, tile: int, pads: Pads, shape: tuple
) -> np.ndarray:
    """The codes the C++ kernel computes, ``[N, tiles_y, tiles_x, C]`` (its test hook)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    planes = np.ascontiguousarray(planes, dtype=np.float32)
    codes = np.zeros(shape, dtype=np.uint64)
    as_ints = ctypes.c_int64 * 4
    status = _library.HasteConvTileCodes(
        x.ctypes.data_as(ctypes.c_void_p),
        as_ints(*x.shape),
        planes.ctypes.data_as(ctypes.c_void_p),
        ctypes.c_int64(planes.shape[0]),
        ctypes.c_int64(kernel),
        ctypes.c_int64(tile),
        as_ints(*pads),
        codes.ctypes.data_as(ctypes.c_void_p),
    )
    assert status == 0
    return codes


def relative_l2(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


class Comparison:
    """The C++ op and the reference on one input: code agreement and output error."""

    def __init__(self, x, w, planes, bias=None, *, pads=(0, 0, 0, 0), tile=3, relu=False):
        k = w.shape[-1]
        self.y = run(
            haste_model(w, planes, bias, pads=pads, tile=tile, activation="Relu" if relu else ""), x
        )
        self.y_ref, self.stats = haste_conv(
            x, w, planes, bias, pads=pads, tile=tile, relu=relu, return_stats=True
        )
        codes = kernel_codes(x, planes, k, tile, pads, self.stats.codes.shape)
        agree = codes == self.stats.codes
        self.codes_total = agree.size
        self.codes_agreeing = int(agree.sum())
        # Output pixels of tiles whose codes all agree: there the outputs must match.
        n, ty, tx, _ = agree.shape
        tile_ok = np.broadcast_to(
            agree.all(axis=-1)[:, None, :, None, :, None], (n, 1, ty, tile, tx, tile)
        ).reshape(n, 1, ty * tile, tx * tile)
        mask = np.broadcast_to(tile_ok[:, :, : self.y.shape[2], : self.y.shape[3]], self.y.shape)
        self.error = relative_l2(self.y[mask], self.y_ref[mask])

    @property
    def agreement(self) -> float:
        return self.codes_agreeing / self.codes_total


# --- agreement with the reference -------------------------------------------------------------


def _grid_cases() -> list:
    """K x L x (symmetric, asymmetric pads); the other parameters vary from case to case."""
    rng = np.random.default_rng(3)
    sparsities = [2 / 3, 1 / 2, 0.0, None, 1 / 3]
    cases = []
    grid = itertools.product((1, 3, 5), (0, 1, 14, 36), (True, False))
    for i, (k, num_planes, symmetric) in enumerate(grid):
        pads = [k // 2] * 4 if symmetric else [int(p) for p in rng.integers(0, k + 1, size=4)]
        if not symmetric and len(set(pads)) == 1:
            pads[0] += 1
        case = dict(
            seed=i,
            n=int(rng.integers(1, 4)),
            c=int(rng.choice([1, 3, 8, 16, 24])),
            m=int(rng.integers(1, 40)),
            h=int(rng.integers(k, k + 14)),
            w=int(rng.integers(k, k + 14)),
            k=k,
            num_planes=num_planes,
            pads=tuple(pads),
            bias=i % 2 == 0,
            relu=i % 4 < 2,
            sparsity=sparsities[i % len(sparsities)],
            tile=3 if i % 3 else int(rng.choice([2, 4])),
        )
        cases.append(pytest.param(case, id=f"K{k}-L{num_planes}-{'sym' if symmetric else 'asym'}"))
    return cases


def _inputs(rng: np.random.Generator, case: dict) -> tuple:
    x = rng.standard_normal((case["n"], case["c"], case["h"], case["w"])).astype(np.float32)
    w = rng.standard_normal((case["m"], case["c"], case["k"], case["k"])).astype(np.float32)
    bias = rng.standard_normal(case["m"]).astype(np.float32) if case["bias"] else None
    p = case["tile"] + case["k"] - 1
    planes = make_planes(case["num_planes"], p * p, case["sparsity"], rng)
    return x, w, bias, planes


@pytest.mark.parametrize("case", _grid_cases())
def test_matches_reference(case: dict) -> None:
    x, w, bias, planes = _inputs(np.random.default_rng(case["seed"]), case)
    cmp = Comparison(x, w, planes, bias, pads=case["pads"], tile=case["tile"], relu=case["relu"])
    assert cmp.y.shape == cmp.y_ref.shape
    assert cmp.agreement >= 0.9999, f"{cmp.codes_agreeing}/{cmp.codes_total} codes agree"
    assert cmp.error <= 1e-4


def test_every_kind_of_bucket_matches_reference() -> None:
    """Single channels, pairs, buckets of three or four and larger ones: the 3x3 kernel has a
    loop for each, and few planes on many channels give them all in every tile."""
    rng = np.random.default_rng(12)
    case = dict(n=2, c=48, m=19, h=12, w=12, k=3, num_planes=5, bias=True, sparsity=2 / 3, tile=3)
    x, w, bias, planes = _inputs(rng, case)
    cmp = Comparison(x, w, planes, bias, pads=(1, 1, 1, 1), relu=True)
    codes = cmp.stats.codes.reshape(-1, case["c"])
    sizes = {int(size) for tile in codes for size in np.unique(tile, return_counts=True)[1]}
    assert {1, 2, 3, 4} <= sizes and max(sizes) > 4, sizes
    assert cmp.agreement >= 0.9999, f"{cmp.codes_agreeing}/{cmp.codes_total} codes agree"
    assert cmp.error <= 1e-4


@pytest.mark.parametrize(
    ("h", "w", "pads"),
    [
        (7, 7, (1, 1, 1, 1)),  # a row and a column of tiles one output wide, and their corner
        (4, 10, (1, 1, 1, 1)),  # one of each: 4 = 3 + 1 rows, 10 = 3 * 3 + 1 columns
        (10, 4, (0, 0, 2, 2)),  # the padding all below and beside: 10 x 4 outputs
        (5, 5, (2, 2, 0, 0)),  # the padding all above and to the left: 3 x 3 outputs, one tile
        (6, 6, (1, 1, 2, 2)),  # 7 x 7 outputs, the last row and column two rows of padding deep
        (6, 6, (0, 0, 0, 0)),  # 4 x 4 outputs, whose last row and column read X, not padding
        (8, 8, (1, 0, 0, 1)),  # 7 x 7 outputs: the last row reads X, the last column padding
    ],
)
def test_tiles_beside_the_padding_match_reference(h: int, w: int, pads: tuple) -> None:
    """The 3x3 kernel leaves out the kernel row (column) of a one-row (one-column) tile that reads
    only padding: the outputs must stay those of the reference."""
    rng = np.random.default_rng(h * 100 + w)
    case = dict(n=2, c=40, m=20, h=h, w=w, k=3, num_planes=4, bias=True, sparsity=2 / 3, tile=3)
    x, weight, bias, planes = _inputs(rng, case)
    cmp = Comparison(x, weight, planes, bias, pads=pads)
    assert cmp.agreement == 1.0, f"{cmp.codes_agreeing}/{cmp.codes_total} codes agree"
    assert cmp.error <= 1e-6


@pytest.mark.parametrize(
    ("h", "w", "tile"),
    [
        (4, 9, 6),  # 4 x 9 outputs: tiles 4 x 6 and 4 x 3, every one cut by the bottom of Y
        (9, 2, 5),  # 9 x 2 outputs: tiles 5 x 2 and 4 x 2
        (3, 5, 40),  # one tile, far larger than Y
    ],
)
def test_tiles_larger_than_the_output_match_reference(h: int, w: int, tile: int) -> None:
    """Where Y is smaller than a tile, the generic kernel lays out inputs for the outputs a tile
    can have (fewer rows or columns than T), and must still put each where it belongs."""
    rng = np.random.default_rng(h * 100 + w)
    case = dict(n=2, c=24, m=20, h=h, w=w, k=3, num_planes=6, bias=True, sparsity=2 / 3, tile=tile)
    x, weight, bias, planes = _inputs(rng, case)
    cmp = Comparison(x, weight, planes, bias, pads=(1, 1, 1, 1), tile=tile, relu=True)
    assert cmp.agreement >= 0.9999, f"{cmp.codes_agreeing}/{cmp.codes_total} codes agree"
    assert cmp.error <= 1e-5


def test_random_shapes_sweep() -> None:
    """Many small random shapes, tiles and planes: codes agree on >= 99.99 % of (tile, channel)."""
    rng = np.random.default_rng(11)
    agreeing = total = 0
    worst = 0.0
    for _ in range(300):
        k = int(rng.choice([1, 2, 3, 5]))
        case = dict(
            n=int(rng.integers(1, 3)),
            c=int(rng.integers(1, 13)),
            m=int(rng.integers(1, 40)),
            h=int(rng.integers(1, 16)),
            w=int(rng.integers(1, 16)),
            k=k,
            num_planes=int(rng.choice([0, 1, 5, 14, 36, 63])),
            bias=bool(rng.integers(2)),
            sparsity=[2 / 3, 1 / 2, None][int(rng.integers(3))],
            tile=int(rng.integers(1, 6)),
        )
        pads = [int(p) for p in rng.integers(0, k + 1, size=4)]
        pads[2] = max(pads[2], k - case["h"] - pads[0])  # keep the output non-empty
        pads[3] = max(pads[3], k - case["w"] - pads[1])
        x, w, bias, planes = _inputs(rng, case)
        cmp = Comparison(
            x, w, planes, bias, pads=pads, tile=case["tile"], relu=bool(rng.integers(2))
        )
        agreeing += cmp.codes_agreeing
        total += cmp.codes_total
        worst = max(worst, cmp.error)
    print(f"codes agreeing: {agreeing}/{total}; worst relative L2 where codes agree: {worst:.2e}")
    assert agreeing / total >= 0.9999
    assert worst <= 1e-4


# --- the spec's exact cases (100 % code agreement) ----------------------------------------------


def _exact(x, w, planes, pads) -> Comparison:
    cmp = Comparison(x, w, planes, pads=pads)
    assert cmp.codes_agreeing == cmp.codes_total
    return cmp


def test_exact_all_channels_distinct_equals_conv() -> None:
    rng = np.random.default_rng(5)
    x = rng.standard_normal((2, 8, 13, 11)).astype(np.float32)
    w = rng.standard_normal((6, 8, 3, 3)).astype(np.float32)
    pads = (1, 1, 1, 1)
    cmp = _exact(x, w, make_planes(36, 25, 2 / 3, rng), pads)
    assert (cmp.stats.num_buckets == 8).all()
    assert relative_l2(cmp.y, run(conv_model(w, pads), x)) <= 1e-5


def test_exact_duplicated_channels_ratio_three_quarters() -> None:
    rng = np.random.default_rng(6)
    distinct = rng.standard_normal((1, 4, 12, 12)).astype(np.float32)
    x = np.repeat(distinct, 4, axis=1)  # 16 channels, each of 4 distinct ones 4 times
    w = rng.standard_normal((5, 16, 3, 3)).astype(np.float32)
    pads = (0, 1, 2, 1)
    cmp = _exact(x, w, make_planes(36, 25, 1 / 2, rng), pads)
    np.testing.assert_array_equal(cmp.stats.ratio, 0.75)
    assert relative_l2(cmp.y, run(conv_model(w, pads), x)) <= 1e-5


def test_exact_no_planes_is_conv_of_channel_mean() -> None:
    rng = np.random.default_rng(7)
    x = rng.standard_normal((2, 6, 10, 9)).astype(np.float32)
    w = rng.standard_normal((4, 6, 5, 5)).astype(np.float32)
    pads = (2, 2, 2, 2)
    cmp = _exact(x, w, np.zeros((0, 49), np.float32), pads)
    expected = run(conv_model(w.sum(axis=1, keepdims=True), pads), x.mean(axis=1, keepdims=True))
    assert relative_l2(cmp.y, expected) <= 1e-5
    # and it is not the plain Conv: this kernel merged
    assert relative_l2(cmp.y, run(conv_model(w, pads), x)) > 0.1


def test_exact_ties_on_integer_valued_inputs() -> None:
    """Small integers (quantized or binary data) project exactly on 0 for many planes, and an
    exact 0 gives bit 0: both implementations must find those ties exactly, not by rounding."""
    rng = np.random.default_rng(12)
    x = rng.integers(0, 3, (2, 24, 12, 12)).astype(np.float32)
    w = rng.standard_normal((5, 24, 3, 3)).astype(np.float32)
    planes = make_planes(14, 25, 2 / 3, rng)
    pads = (1, 1, 1, 1)
    cmp = _exact(x, w, planes, pads)
    # The codes in integer arithmetic: C times the centered vectors is C v_c - sum_c v_c.
    patches = extract_patches(x, geometry(x.shape, w.shape, pads, 3), pads)
    v = patches.reshape(-1, 24, 25).astype(np.int64)
    projections = (24 * v - v.sum(axis=1, keepdims=True)) @ planes.astype(np.int64).T
    assert (projections == 0).sum() > 100  # ties are common here
    bits = (projections > 0).astype(np.uint64) << np.arange(14, dtype=np.uint64)
    np.testing.assert_array_equal(cmp.stats.codes.reshape(-1, 24), bits.sum(axis=-1))


def test_one_hot_inputs_give_exactly_conv() -> None:
    """One hot pixel: its channel gets its own bucket and the zero channels, merged, add nothing,
    so HasteConv is exactly Conv. Power-of-two weights keep every sum exact: any slip in patch
    or output indexing shows."""
    rng = np.random.default_rng(10)
    shape = (5, 8, 3, 3)
    w = (rng.choice([-1, 1], shape) * 2.0 ** rng.integers(-3, 4, shape)).astype(np.float32)
    pads = (2, 0, 1, 1)
    haste = session(haste_model(w, make_planes(14, 25, 1 / 2, rng), pads=pads))
    conv = session(conv_model(w, pads))
    for c, y, x in [(0, 0, 0), (3, 6, 10), (7, 9, 0), (5, 4, 5), (1, 9, 10)]:
        image = np.zeros((1, 8, 10, 11), np.float32)
        image[0, c, y, x] = 1.0
        expected = conv.run(None, {"X": image})[0]
        np.testing.assert_array_equal(haste.run(None, {"X": image})[0], expected)


@pytest.mark.parametrize(
    "values",
    [{(0, 2, 4, 4): np.nan}, {(0, 5, 9, 1): np.inf, (1, 1, 1, 10): -np.inf}],
    ids=["nan", "inf"],
)
def test_non_finite_inputs_agree_with_reference_and_conv(values: dict) -> None:
    """A NaN or ±Inf in X: both implementations hash and merge over non-zero terms only, so they
    agree on every code and output; the outputs that read it are non-finite exactly where Conv's
    are (NaN where Conv's are NaN for a NaN), and the tile's other outputs stay finite."""
    rng = np.random.default_rng(14)
    x = rng.standard_normal((2, 8, 12, 12)).astype(np.float32)
    for index, value in values.items():
        x[index] = value
    w = rng.standard_normal((5, 8, 3, 3)).astype(np.float32)
    pads = (1, 1, 1, 1)
    with np.errstate(invalid="ignore"):  # its error over all outputs is NaN: not used here
        cmp = Comparison(x, w, make_planes(14, 25, 2 / 3, rng), pads=pads)
    assert cmp.codes_agreeing == cmp.codes_total
    conv = run(conv_model(w, pads), x)
    finite = np.isfinite(conv)
    assert (~finite).sum() == 9 * 5 * len(values)  # the 3x3 outputs that read each, 5 channels
    for y in (cmp.y, cmp.y_ref):
        np.testing.assert_array_equal(np.isfinite(y), finite)
    np.testing.assert_array_equal(cmp.y[~finite], cmp.y_ref[~finite])  # NaN, or Inf of one sign
    if any(np.isnan(v) for v in values.values()):
        np.testing.assert_array_equal(np.isnan(cmp.y), ~finite)
    assert relative_l2(cmp.y[finite], cmp.y_ref[finite]) <= 1e-5


@pytest.mark.parametrize("tile", [2, 3])  # the generic kernel's inputs, and the 3x3 kernel's
def test_a_bucket_of_channels_near_the_float32_limit_has_a_finite_mean(tile: int) -> None:
    """16 channels of 1e38 in one bucket (L = 0): their sum is beyond float32, their mean and
    the outputs (as Conv's) are not."""
    x = np.full((1, 16, 6, 6), 1e38, np.float32)
    x[0, :, 2, 3] = -2e38
    w = np.full((2, 16, 3, 3), 1e-3, np.float32)
    planes = np.zeros((0, (tile + 2) ** 2), np.float32)
    y = run(haste_model(w, planes, pads=(1, 1, 1, 1), tile=tile), x)
    expected = haste_conv(x, w, planes, pads=(1, 1, 1, 1), tile=tile)
    assert np.isfinite(expected).all() and np.isfinite(run(conv_model(w, (1, 1, 1, 1)), x)).all()
    np.testing.assert_allclose(y, expected, rtol=1e-5)


# --- threads ----------------------------------------------------------------------------------


def _threads_case() -> tuple[onnx.ModelProto, list[np.ndarray]]:
    rng = np.random.default_rng(8)
    w = rng.standard_normal((16, 16, 3, 3)).astype(np.float32)
    bias = rng.standard_normal(16).astype(np.float32)
    model = haste_model(
        w, make_planes(14, 25, 2 / 3, rng), bias, pads=(1, 1, 1, 1), activation="Relu"
    )
    xs = [rng.standard_normal((2, 16, 28, 26)).astype(np.float32) for _ in range(8)]
    return model, xs


def assert_threads_identical_to_one(model: onnx.ModelProto, xs, threads: int) -> None:
    one, more = session(model, threads=1), session(model, threads=threads)
    for x in xs:
        np.testing.assert_array_equal(one.run(None, {"X": x})[0], more.run(None, {"X": x})[0])


@pytest.mark.parametrize("threads", [2, 5])  # 5: more threads than the machine has cores
def test_intra_op_threads_identical_to_one(threads: int) -> None:
    model, xs = _threads_case()
    assert_threads_identical_to_one(model, xs[:3], threads)


@pytest.mark.parametrize("threads", [2, 5])
def test_threads_hash_only_once_every_pixel_is_summed(threads: int) -> None:
    """Wide inputs, whose sums over channels take the threads long enough to overlap: a thread
    that hashed before every unit of sums was done would read partial sums (a build without the
    wait differed in about one run of three)."""
    rng = np.random.default_rng(9)
    w = rng.standard_normal((4, 1024, 3, 3)).astype(np.float32)
    model = haste_model(w, make_planes(14, 25, 0.5, rng), pads=(1, 1, 1, 1))
    xs = (rng.standard_normal((4, 1024, 24, 24)).astype(np.float32) for _ in range(10))
    assert_threads_identical_to_one(model, xs, threads)


def test_concurrent_runs_on_one_session_identical_to_serial() -> None:
    model, xs = _threads_case()
    sess = session(model, threads=2)
    serial = [sess.run(None, {"X": x})[0] for x in xs]
    results: dict[tuple[int, int], np.ndarray] = {}

    def worker(t: int) -> None:
        for i in range(len(xs)):
            j = (i + t) % len(xs)
            results[t, j] = sess.run(None, {"X": xs[j]})[0]

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 4 * len(xs)
    for (_, j), y in results.items():
        np.testing.assert_array_equal(y, serial[j])


# --- invalid inputs ---------------------------------------------------------------------------

_W = np.ones((4, 3, 3, 3), np.float32)
_PLANES = np.ones((2, 25), np.float32)
_X = np.ones((1, 3, 8, 8), np.float32)

INVALID = {
    "planes width": (
        haste_model(_W, np.ones((2, 24), np.float32)),
        _X,
        r"planes must be \[L, P\*P\] = \[L, 25\] .* got shape \[2, 24\]",
    ),
    "L over 63": (
        haste_model(_W, np.ones((64, 25), np.float32)),
        _X,
        r"planes has L = 64 hyperplanes.*at most 63",
    ),
    "channel mismatch": (
        haste_model(_W, _PLANES),
        np.ones((1, 5, 8, 8), np.float32),
        r"W has 3 input channels but X has 5: W shape \[4, 3, 3, 3\]",
    ),
    "stride": (
        haste_model(_W, _PLANES, overrides={"strides": [2, 2]}),
        _X,
        r"strides must be \[1, 1\].*got \[2, 2\]",
    ),
    "dilation": (
        haste_model(_W, _PLANES, overrides={"dilations": [1, 2]}),
        _X,
        r"dilations must be \[1, 1\].*got \[1, 2\]",
    ),
    "group": (haste_model(_W, _PLANES, overrides={"group": 3}), _X, r"group must be 1 .*got 3"),
    "non-float X": (
        haste_model(_W, _PLANES, x_type=TensorProto.DOUBLE),
        _X.astype(np.float64),
        r"X must be float32, got float64 with shape \[1, 3, 8, 8\]",
    ),
    "non-finite planes": (
        haste_model(
            _W, np.where(np.arange(50).reshape(2, 25) == 31, np.inf, _PLANES).astype(np.float32)
        ),
        _X,
        r"planes must be finite: plane 1 has inf at 6",
    ),
    "non-float planes": (
        haste_model(_W, _PLANES.astype(np.int64)),
        _X,
        r"planes must be float32, got int64",
    ),
    "no channels": (  # Conv refuses too (with its default optimizations)
        haste_model(np.ones((4, 0, 3, 3), np.float32), _PLANES),
        np.ones((1, 0, 8, 8), np.float32),
        r"X and W need at least one channel: X shape \[1, 0, 8, 8\]",
    ),
    "bias length": (
        haste_model(_W, _PLANES, np.ones(5, np.float32)),
        _X,
        r"B must have shape \[4\] .* got shape \[5\]",
    ),
    "activation": (
        haste_model(_W, _PLANES, overrides={"activation": "Sigmoid"}),
        _X,
        r'activation must be "" or "Relu", got "Sigmoid"',
    ),
    "kernel_shape": (
        haste_model(_W, _PLANES, overrides={"kernel_shape": [5, 5]}),
        _X,
        r"kernel_shape \[5, 5\] does not match W shape \[4, 3, 3, 3\]",
    ),
    "X rank": (
        haste_model(_W, _PLANES),
        np.ones((3, 8, 8), np.float32),
        r"X must be 4-D \[N, C, H, W\], got shape \[3, 8, 8\]",
    ),
    "empty output": (
        haste_model(_W, _PLANES),
        np.ones((1, 3, 2, 8), np.float32),
        r"the output would be empty: X shape \[1, 3, 2, 8\]",
    ),
    "tile too large": (  # P*P overflowed, and SplitPixels divided by zero
        haste_model(_W, np.zeros((0, 0), np.float32), tile=2**32 - 2),
        _X,
        r"tile must be in \[1, 64\], got 4294967294",
    ),
    "output size overflows": (
        haste_model(_W, _PLANES, pads=(0, 0, 0, 2**62)),
        _X,
        r"the sizes overflow 64-bit integers: .* pads \[0, 0, 0, 4611686018427387904\], tile 3",
    ),
    "pads overflow": (  # H + pads wrapped around
        haste_model(_W, _PLANES, pads=(2**62,) * 4),
        _X,
        r"the sizes overflow 64-bit integers: X shape \[1, 3, 8, 8\]",
    ),
}


@pytest.mark.parametrize("name", INVALID)
def test_invalid_input_fails_with_message(name: str) -> None:
    model, x, message = INVALID[name]
    with pytest.raises(ORT_ERRORS, match="HasteConv: " + message):
        run(model, x)
    # the process survives and the operator still works
    assert run(haste_model(_W, _PLANES), _X).shape == (1, 4, 6, 6)


def test_empty_batch_gives_empty_output_as_conv() -> None:
    rng = np.random.default_rng(13)
    w = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    bias = rng.standard_normal(4).astype(np.float32)
    pads = (1, 0, 2, 1)
    x = np.zeros((0, 3, 8, 7), np.float32)
    y = run(haste_model(w, make_planes(14, 25, 2 / 3, rng), bias, pads=pads, activation="Relu"), x)
    expected = run(conv_model(w, pads), x)
    assert y.shape == expected.shape == (0, 4, 9, 6)
    assert y.dtype == np.float32
    assert haste_conv(x, w, make_planes(14, 25), bias, pads=pads).shape == (0, 4, 9, 6)


# Attributes of the wrong type, which onnxruntime does not check: the kernel read them as absent.
# And empty lists, which the reference read as absent.
WRONG_ATTRIBUTES = {
    "activation strings": ("activation", ["Relu"], "activation must be a string, got"),
    "activation int": ("activation", 1, "activation must be a string, got an int"),
    "group float": ("group", 2.0, "group must be an int, got a float"),
    "group ints": ("group", [2], "group must be an int, got ints"),
    "tile float": ("tile", 4.0, "tile must be an int, got a float"),
    "kernel_shape floats": ("kernel_shape", [5.0, 5.0], "kernel_shape must be ints, got floats"),
    "strides floats": ("strides", [2.0, 2.0], "strides must be ints, got floats"),
    "kernel_shape tensor": (
        "kernel_shape",
        numpy_helper.from_array(np.array([3, 3], np.int64)),
        "kernel_shape must be ints, got a tensor",
    ),
    "pads tensor": (
        "pads",
        numpy_helper.from_array(np.zeros(4, np.int64)),
        "pads must be ints, got a tensor",
    ),
    "empty pads": (
        "pads",
        helper.make_attribute("pads", [], attr_type=onnx.AttributeProto.INTS),
        r"pads must be .*, got \[\]",
    ),
    "empty strides": (
        "strides",
        helper.make_attribute("strides", [], attr_type=onnx.AttributeProto.INTS),
        r"strides must be .*, got \[\]",
    ),
}


@pytest.mark.parametrize("name", WRONG_ATTRIBUTES)
def test_wrong_attribute_fails_in_both_implementations(name: str) -> None:
    attribute, value, message = WRONG_ATTRIBUTES[name]
    model = haste_model(_W, _PLANES, overrides={attribute: value})
    with pytest.raises(ORT_ERRORS, match="HasteConv: " + message):
        session(model)
    with pytest.raises(ValueError, match=message):  # and so does the reference
        ReferenceEvaluator(model, new_ops=[HasteConv]).run(None, {"X": _X})


@pytest.mark.skipif("HASTE_ONNX_ISA" in os.environ, reason="a run of a narrower kernel already")
@pytest.mark.parametrize("isa", ["avx2", "portable"])
def test_the_narrower_kernels_pass_these_tests_too(isa: str) -> None:
    """The library runs the widest kernel this CPU has (AVX-512, AVX2 or portable); the narrower
    ones run every test of this file too, in a process of their own with HASTE_ONNX_ISA set."""
    env = {**os.environ, "HASTE_ONNX_ISA": isa, "HASTE_ONNX_TEST_LIBRARY": LIBRARY}
    # -P: the package as installed, not the source tree beside the tests
    command = [sys.executable, "-P", "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert " passed" in result.stdout and "skipped" in result.stdout  # this test, skipped there


def cpu_flags() -> set[str]:
    with open("/proc/cpuinfo") as info:
        flags = next((line for line in info if line.startswith("flags")), "flags :")
    return set(flags.split(":")[1].split())


@pytest.mark.skipif(not Path("/proc/cpuinfo").exists(), reason="reads the CPU's flags from Linux")
def test_the_kernel_is_the_widest_the_cpu_has_within_haste_onnx_isa(monkeypatch) -> None:
    _library.HasteConvLanes.restype = ctypes.c_int64
    flags = set() if os.environ.get("HASTE_ONNX_TEST_PORTABLE_BUILD") else cpu_flags()
    avx2 = 8 if {"avx2", "fma"} <= flags else 4
    widest = 16 if avx2 == 8 and "avx512f" in flags else avx2
    for cap, lanes in [(None, widest), ("avx512", widest), ("avx2", avx2), ("portable", 4)]:
        if cap is None:
            monkeypatch.delenv("HASTE_ONNX_ISA", raising=False)
        else:
            monkeypatch.setenv("HASTE_ONNX_ISA", cap)
        assert _library.HasteConvLanes() == lanes, cap
    monkeypatch.setenv("HASTE_ONNX_ISA", "AVX2")
    assert _library.HasteConvLanes() == 0


def test_an_unknown_isa_fails_when_the_session_is_created(monkeypatch) -> None:
    """And only then: a session made before keeps the kernel it chose, whatever the variable
    holds later (it was read again on every run)."""
    model = haste_model(_W, np.ones((2, 25), np.float32))
    made = session(model, 1)
    expected = made.run(None, {"X": _X})[0]
    monkeypatch.setenv("HASTE_ONNX_ISA", "avx1024")
    with pytest.raises(ORT_ERRORS, match="HASTE_ONNX_ISA must be avx512, avx2 or portable"):
        run(model, _X)
    np.testing.assert_array_equal(made.run(None, {"X": _X})[0], expected)


# --- the Python side --------------------------------------------------------------------------


def test_library_is_installed_in_the_package() -> None:
    path = Path(get_library_path())
    assert path.parent == Path(haste_onnx.__file__).resolve().parent
    assert path.name == "libhaste_onnx_ops.so"


def test_a_source_tree_import_uses_the_installed_library(tmp_path, monkeypatch) -> None:
    installed = get_library_path()
    monkeypatch.setattr(runtime, "__file__", str(tmp_path / "haste_onnx" / "runtime.py"))
    assert get_library_path() == installed  # Python started in a checkout: no build beside it

    def missing(name: str) -> None:
        raise PackageNotFoundError(name)

    monkeypatch.setattr(runtime, "distribution", missing)
    with pytest.raises(FileNotFoundError, match="no installed haste-onnx has it"):
        get_library_path()


def test_make_session_says_when_the_options_have_the_library_already() -> None:
    options = ort.SessionOptions()
    options.register_custom_ops_library(get_library_path())  # as the README's first snippet
    model = haste_model(np.ones((3, 4, 3, 3), np.float32), np.ones((2, 25), np.float32))
    with pytest.raises(InputError, match="had the HasteConv library registered already"):
        make_session(model, sess_options=options)


def test_make_session_registers_the_library(tmp_path: Path) -> None:
    rng = np.random.default_rng(9)
    w = rng.standard_normal((3, 4, 3, 3)).astype(np.float32)
    planes = make_planes(8, 25, 2 / 3, rng)
    model = haste_model(w, planes, pads=(1, 1, 1, 1))
    x = rng.standard_normal((1, 4, 7, 7)).astype(np.float32)
    expected = haste_conv(x, w, planes, pads=(1, 1, 1, 1))
    path = tmp_path / "haste.onnx"
    onnx.save(model, path)
    options = ort.SessionOptions()  # reused: registered once
    for source in (model, path, model.SerializeToString()):
        sess = make_session(source, intra_op_num_threads=1, sess_options=options)
        assert sess.get_session_options().intra_op_num_threads == 1
        assert relative_l2(sess.run(None, {"X": x})[0], expected) <= 1e-5
    assert relative_l2(make_session(model).run(None, {"X": x})[0], expected) <= 1e-5


@pytest.mark.parametrize("tile", [3, 4], ids=["compact", "generic"])
def test_inputs_larger_than_one_chunk_match_conv_of_the_mean(tile: int) -> None:
    """3 x 64 x 96 x 96 lays out several chunks of tile rows (the last one partial), for the T = 3
    kernel and for the generic one; with no planes every tile is one bucket, so the output is
    exactly Conv of the channel mean with the summed filters, wherever the chunk starts."""
    rng = np.random.default_rng(40)
    x = rng.standard_normal((3, 64, 96, 96)).astype(np.float32)
    w = rng.standard_normal((5, 64, 3, 3)).astype(np.float32)
    pads = (1, 1, 1, 1)
    model = haste_model(w, np.zeros((0, (tile + 2) ** 2), np.float32), pads=pads, tile=tile)
    y = run(model, x)
    expected = run(conv_model(w.sum(axis=1, keepdims=True), pads), x.mean(axis=1, keepdims=True))
    assert relative_l2(y, expected) <= 1e-5
    np.testing.assert_array_equal(run(model, x, threads=3), y)  # chunk after chunk, shared


def _runtime_w_model(planes: np.ndarray, bias: np.ndarray, pads, tile: int) -> onnx.ModelProto:
    """``haste_model`` with W a graph input instead of a constant."""
    w = np.zeros((bias.size, 1, 3, 3), np.float32)  # only its kernel size is read
    model = haste_model(w, planes, bias, pads=pads, tile=tile, activation="Relu")
    constants = [t for t in model.graph.initializer if t.name != "W"]
    del model.graph.initializer[:]
    model.graph.initializer.extend(constants)
    model.graph.input.append(helper.make_tensor_value_info("W", TensorProto.FLOAT, None))
    return model


@pytest.mark.parametrize("tile", [3, 2])
def test_w_given_at_run_time_is_packed_by_the_run(tile: int) -> None:
    """W a graph input: each run packs it (a second W, new values, is packed again), and every
    output equals the one with W a constant (packed once at session creation)."""
    rng = np.random.default_rng(41)
    p = tile + 2
    planes = make_planes(14, p * p, 2 / 3, rng)
    bias = rng.standard_normal(11).astype(np.float32)
    pads = (1, 1, 1, 1)
    sess = session(_runtime_w_model(planes, bias, pads, tile))
    x = rng.standard_normal((2, 8, 10, 9)).astype(np.float32)
    for _ in range(2):
        w = rng.standard_normal((11, 8, 3, 3)).astype(np.float32)
        got = sess.run(None, {"X": x, "W": w})[0]
        want = run(haste_model(w, planes, bias, pads=pads, tile=tile, activation="Relu"), x)
        np.testing.assert_array_equal(got, want)
        ref = haste_conv(x, w, planes, bias, pads=pads, tile=tile, relu=True)
        assert relative_l2(got, ref) <= 1e-4


@pytest.mark.parametrize(
    "planes, message",
    [
        (np.ones((2, 25, 1), np.float32), r"got shape \[2, 25, 1\]"),
        (np.ones((2, 25, 3), np.float32), r"got shape \[2, 25, 3\]"),
    ],
    ids=["3-D fits the data", "3-D"],
)
def test_planes_of_rank_other_than_two_fail_with_message(planes, message) -> None:
    with pytest.raises(ORT_ERRORS, match=r"HasteConv: planes must be \[L, P\*P\].*" + message):
        run(haste_model(_W, planes), _X)


def test_bias_of_rank_two_fails_with_message() -> None:
    with pytest.raises(
        ORT_ERRORS, match=r"HasteConv: B must have shape \[4\] .*got shape \[4, 1\]"
    ):
        run(haste_model(_W, np.ones((2, 25), np.float32), np.ones((4, 1), np.float32)), _X)


@pytest.mark.parametrize("m", [72, 100])
@pytest.mark.parametrize("tile", [3, 2])
@pytest.mark.parametrize("threads", [1, 2])
def test_many_output_channels_match_reference(m: int, tile: int, threads: int) -> None:
    """M = 72 or 100 is 5 or 7 blocks of 16 lanes (9 or 13 of 8, 18 or 25 of 4), the last one
    part full: several block ranges per row group, whose union must cover every output channel,
    on one thread or two."""
    rng = np.random.default_rng(42)
    case = dict(
        n=2, c=12, m=m, h=11, w=10, k=3, num_planes=14, bias=True, sparsity=2 / 3, tile=tile
    )
    x, w, bias, planes = _inputs(rng, case)
    pads = (1, 1, 1, 1)
    model = haste_model(w, planes, bias, pads=pads, tile=tile, activation="Relu")
    y = run(model, x, threads=threads)
    cmp = Comparison(x, w, planes, bias, pads=pads, tile=tile, relu=True)
    assert cmp.agreement >= 0.9999 and cmp.error <= 1e-4
    if cmp.codes_agreeing == cmp.codes_total:
        assert relative_l2(y, cmp.y_ref) <= 1e-4
    np.testing.assert_array_equal(y, cmp.y)  # threads change nothing


@pytest.mark.parametrize("tile", [1, 3])
def test_seven_by_seven_kernels_match_reference(tile):
    case = dict(n=2, c=8, m=6, h=13, w=12, k=7, num_planes=14, bias=True, sparsity=2 / 3)
    case.update(pads=(3, 3, 3, 3), relu=True, tile=tile)
    x, w, bias, planes = _inputs(np.random.default_rng(70), case)
    cmp = Comparison(x, w, planes, bias, pads=case["pads"], tile=tile, relu=True)
    assert cmp.y.shape == cmp.y_ref.shape
    assert cmp.agreement >= 0.9999, f"{cmp.codes_agreeing}/{cmp.codes_total} codes agree"
    assert cmp.error <= 1e-4


@pytest.mark.parametrize("tile, k", [(3, 3), (2, 3), (3, 5)])
def test_a_nan_input_stays_nan_through_the_fused_relu(tile: int, k: int) -> None:
    """Relu of NaN is NaN, as in the reference, on the 3x3 kernel and the generic one."""
    rng = np.random.default_rng(14)
    x = rng.standard_normal((2, 8, 12, 12)).astype(np.float32)
    x[0, 2, 4, 4] = np.nan
    w = rng.standard_normal((5, 8, k, k)).astype(np.float32)
    p = tile + k - 1
    planes = make_planes(14, p * p, 2 / 3, rng)
    with np.errstate(invalid="ignore"):
        cmp = Comparison(x, w, planes, pads=(k // 2,) * 4, tile=tile, relu=True)
    assert np.isnan(cmp.y_ref).sum() == 5 * k * k  # every output that reads the NaN
    np.testing.assert_array_equal(np.isnan(cmp.y), np.isnan(cmp.y_ref))
