import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator
from oracles import brute_force_haste, conv2d

from haste_onnx import opdef
from haste_onnx.hashing import make_planes
from haste_onnx.reference import HasteConv, extract_patches, geometry, hash_stats, haste_conv


def rel_l2(a, b):
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def random_case(rng, n=2, c=8, m=6, h=10, w=11, k=3):
    x = rng.standard_normal((n, c, h, w)).astype(np.float32)
    wt = rng.standard_normal((m, c, k, k)).astype(np.float32)
    return x, wt


def test_all_distinct_buckets_equal_conv():
    rng = np.random.default_rng(0)
    x, w = random_case(rng, c=16)
    planes = make_planes(63, 25, 0.5, rng=1)
    y, stats = haste_conv(x, w, planes, pads=(1, 1, 1, 1), return_stats=True)
    assert np.all(stats.num_buckets == 16)  # the premise: no two channels collide
    assert np.all(stats.merging_buckets == 0)
    assert rel_l2(y, conv2d(x, w, (1, 1, 1, 1))) < 1e-6


def test_repeated_channels_are_exact_with_r_three_quarters():
    rng = np.random.default_rng(1)
    base = rng.standard_normal((2, 4, 9, 9)).astype(np.float32)
    x = np.repeat(base, 4, axis=1)  # 4 distinct channels, each 4 times
    w = rng.standard_normal((5, 16, 3, 3)).astype(np.float32)
    planes = make_planes(40, 25, 2 / 3, rng=2)
    y, stats = haste_conv(x, w, planes, pads=(1, 1, 1, 1), return_stats=True)
    np.testing.assert_allclose(stats.ratio, 0.75)
    np.testing.assert_array_equal(stats.merging_buckets, 4)
    assert rel_l2(y, conv2d(x, w, (1, 1, 1, 1))) < 1e-6


def test_zero_planes_give_one_bucket_per_patch():
    rng = np.random.default_rng(2)
    x, w = random_case(rng)
    planes = make_planes(0, 25)
    y, stats = haste_conv(x, w, planes, pads=(1, 1, 1, 1), return_stats=True)
    np.testing.assert_array_equal(stats.num_buckets, 1)
    mean = np.broadcast_to(x.mean(axis=1, keepdims=True), x.shape)
    assert rel_l2(y, conv2d(mean, w, (1, 1, 1, 1))) < 1e-6
    # equivalently: the channel mean convolved with the channel-summed filter
    summed = conv2d(x.mean(axis=1, keepdims=True), w.sum(axis=1, keepdims=True), (1, 1, 1, 1))
    assert rel_l2(y, summed) < 1e-6


def test_identity_oracle_bucket_mean_replaced_patch():
    """Each tile's output is the plain conv of its patch with every channel replaced by its
    bucket's mean, computed here from the reported codes alone."""
    rng = np.random.default_rng(3)
    x, w = random_case(rng, n=1, c=12, m=4, h=8, w=7)
    pads, tile = (1, 0, 2, 1), 3
    planes = make_planes(3, 25, 2 / 3, rng=4)  # few planes: many merges
    y, stats = haste_conv(x, w, planes, pads=pads, tile=tile, return_stats=True)
    assert stats.ratio.mean() > 0.3  # the test is only meaningful if channels merge
    geo = geometry(x.shape, w.shape, pads, tile)
    patches = extract_patches(x, geo, pads)
    for iy in range(geo.tiles_y):
        for ix in range(geo.tiles_x):
            patch = patches[0, iy, ix].astype(np.float64)
            codes = stats.codes[0, iy, ix]
            replaced = np.empty_like(patch)
            for code in np.unique(codes):
                replaced[codes == code] = patch[codes == code].mean(axis=0)
            expect = conv2d(replaced[None], w)[0]
            got = y[0, :, iy * tile : (iy + 1) * tile, ix * tile : (ix + 1) * tile]
            np.testing.assert_allclose(got, expect[:, : got.shape[1], : got.shape[2]], atol=1e-4)


CASES = [
    # n, c, m, h, w, k, pads, tile, L, s, bias, relu
    (1, 8, 4, 9, 9, 3, (1, 1, 1, 1), 3, 6, 2 / 3, False, False),
    (2, 6, 5, 10, 7, 3, (0, 1, 2, 0), 3, 4, 0.5, True, True),
    (1, 9, 3, 8, 11, 1, (0, 0, 0, 0), 3, 5, 2 / 3, True, False),
    (2, 5, 4, 7, 8, 5, (2, 2, 2, 2), 3, 8, None, False, True),
    (1, 7, 2, 13, 6, 5, (1, 2, 0, 3), 4, 3, 0.5, True, False),
    (3, 4, 3, 5, 5, 3, (1, 1, 1, 1), 2, 1, 2 / 3, False, False),
    (1, 10, 6, 6, 9, 1, (1, 0, 0, 1), 5, 14, 2 / 3, True, True),
]


@pytest.mark.parametrize(
    ("n", "c", "m", "h", "w", "k", "pads", "tile", "L", "s", "bias", "relu"), CASES
)
def test_vectorized_reference_matches_brute_force(n, c, m, h, w, k, pads, tile, L, s, bias, relu):
    rng = np.random.default_rng(hash((n, c, m, h, w, k, pads)) % 2**32)
    x = rng.standard_normal((n, c, h, w)).astype(np.float32)
    # make some channels similar so buckets really merge
    x[:, c // 2 :] = x[:, : c - c // 2] + 0.1 * rng.standard_normal(x[:, c // 2 :].shape)
    wt = rng.standard_normal((m, c, k, k)).astype(np.float32)
    b = rng.standard_normal(m).astype(np.float32) if bias else None
    p = tile + k - 1
    planes = make_planes(L, p * p, s, rng=5)
    y, stats = haste_conv(x, wt, planes, b, pads=pads, tile=tile, relu=relu, return_stats=True)
    expect, buckets = brute_force_haste(x, wt, planes, b, pads, tile, relu)
    np.testing.assert_array_equal(stats.num_buckets, buckets)
    assert y.shape == expect.shape
    assert rel_l2(y, expect) < 1e-6
    assert (stats.num_buckets < c).any()  # some merging happened


def test_relu_and_bias_are_applied_after_the_merge():
    rng = np.random.default_rng(6)
    x, w = random_case(rng)
    b = rng.standard_normal(6).astype(np.float32)
    planes = make_planes(8, 25, rng=0)
    plain = haste_conv(x, w, planes, pads=(1, 1, 1, 1))
    full = haste_conv(x, w, planes, b, pads=(1, 1, 1, 1), relu=True)
    np.testing.assert_allclose(full, np.maximum(plain + b[None, :, None, None], 0), atol=1e-5)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"planes": np.ones((64, 25), np.float32)}, "64"),
        ({"planes": make_planes(4, 9, rng=0)}, r"\[L, 25\]"),
        ({"w": np.zeros((6, 5, 3, 3), np.float32)}, "W has 5 input channels but X has 8"),
        ({"w": np.zeros((6, 8, 3, 2), np.float32)}, "square"),
        ({"x": np.zeros((1, 0, 10, 11), np.float32)}, "at least one channel"),
        ({"x": np.zeros((1, 8, 10, 11), np.float64)}, "float32"),
        ({"bias": np.zeros(5, np.float32)}, r"B must have shape \[6\]"),
        ({"pads": (1, 1, 1)}, "pads"),
        ({"pads": (1, -1, 1, 1)}, "pad"),
        ({"tile": 0}, "tile"),
        ({"tile": 65}, r"tile \(T\) must be an integer in \[1, 64\]"),
        ({"pads": (0, 0, 0, 2**62)}, "the sizes overflow 64-bit integers"),
        ({"pads": (2**62,) * 4}, "the sizes overflow 64-bit integers"),
    ],
)
def test_argument_errors_name_the_argument(change, message):
    rng = np.random.default_rng(0)
    x, w = random_case(rng)
    args = {"x": x, "w": w, "planes": make_planes(4, 25, rng=0), "bias": None, "pads": (1,) * 4}
    args.update(change)
    tile = args.pop("tile", 3)
    with pytest.raises(ValueError, match=message):
        haste_conv(args["x"], args["w"], args["planes"], args["bias"], pads=args["pads"], tile=tile)


def test_empty_batch_gives_empty_output_and_statistics():
    rng = np.random.default_rng(9)
    x, w = random_case(rng, n=0)
    planes = make_planes(6, 25, rng=1)
    y, stats = haste_conv(x, w, planes, pads=(1, 1, 1, 1), return_stats=True)
    assert y.shape == (0, 6, 10, 11) and y.dtype == np.float32
    assert stats.codes.shape == (0, 4, 4, 8)
    assert stats.num_buckets.shape == stats.merging_buckets.shape == (0, 4, 4)
    assert hash_stats(x, planes, kernel=3, pads=(1, 1, 1, 1)).codes.shape == (0, 4, 4, 8)


def _model_with_haste_nodes(rng):
    """x -> HasteConv(3x3, bias, relu) -> HasteConv(1x1) -> y."""
    w1 = rng.standard_normal((8, 6, 3, 3)).astype(np.float32)
    b1 = rng.standard_normal(8).astype(np.float32)
    w2 = rng.standard_normal((4, 8, 1, 1)).astype(np.float32)
    p1, p2 = make_planes(2, 25, rng=1), make_planes(10, 9, rng=2)  # few planes: merges
    inits = [
        numpy_helper.from_array(a, name)
        for a, name in [(w1, "w1"), (b1, "b1"), (w2, "w2"), (p1, "p1"), (p2, "p2")]
    ]
    nodes = [
        opdef.make_node(
            "x",
            "w1",
            "p1",
            "h",
            bias="b1",
            kernel=3,
            pads=(1, 1, 1, 1),
            activation="Relu",
            name="conv1",
        ),
        opdef.make_node("h", "w2", "p2", "y", kernel=1, name="conv2"),
    ]
    graph = helper.make_graph(
        nodes,
        "haste",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 6, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 8, 8])],
        inits,
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(opdef.DOMAIN, 1)]
    )
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model, (w1, b1, w2, p1, p2)


def test_reference_evaluator_runs_a_model_with_haste_nodes():
    rng = np.random.default_rng(7)
    model, (w1, b1, w2, p1, p2) = _model_with_haste_nodes(rng)
    x = rng.standard_normal((2, 6, 8, 8)).astype(np.float32)
    (y,) = ReferenceEvaluator(model, new_ops=[HasteConv]).run(None, {"x": x})
    h = haste_conv(x, w1, p1, b1, pads=(1, 1, 1, 1), relu=True)
    expect = haste_conv(h, w2, p2)
    assert y.shape == (2, 4, 8, 8)
    np.testing.assert_array_equal(y, expect)
    assert rel_l2(h, np.maximum(conv2d(x, w1, (1,) * 4) + b1[None, :, None, None], 0)) > 1e-3


def test_hash_stats_match_the_full_operator_and_brute_force():
    rng = np.random.default_rng(8)
    x, w = random_case(rng, n=2, c=10, h=9, w=10)
    x[:, 5:] = x[:, :5] + 0.05 * rng.standard_normal(x[:, 5:].shape).astype(np.float32)
    planes = make_planes(6, 25, rng=3)
    _, full = haste_conv(x, w, planes, pads=(1, 1, 1, 1), return_stats=True)
    cheap = hash_stats(x, planes, kernel=3, pads=(1, 1, 1, 1))
    np.testing.assert_array_equal(cheap.codes, full.codes)
    np.testing.assert_array_equal(cheap.merging_buckets, full.merging_buckets)
    _, buckets = brute_force_haste(x, w, planes, pads=(1, 1, 1, 1))
    np.testing.assert_array_equal(cheap.num_buckets, buckets)
    # m counts buckets with more than one channel: recount from the codes
    for index in np.ndindex(cheap.num_buckets.shape):
        _, counts = np.unique(cheap.codes[index], return_counts=True)
        assert cheap.merging_buckets[index] == np.sum(counts > 1)
    assert cheap.merging_buckets.max() > 0
