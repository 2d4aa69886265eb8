import numpy as np
import pytest

from haste_onnx.hashing import bucket_labels, center, hash_codes, make_planes, sparse_matmul


def test_planes_are_seed_deterministic():
    a = make_planes(14, 25, 2 / 3, rng=7)
    b = make_planes(14, 25, 2 / 3, rng=7)
    c = make_planes(14, 25, 2 / 3, rng=8)
    assert a.dtype == np.float32 and a.shape == (14, 25)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


@pytest.mark.parametrize("s", [0.0, 0.5, 2 / 3, 0.9])
def test_sparse_planes_have_zero_fraction_s_and_balanced_signs(s):
    planes = make_planes(63, 49, s, rng=1)
    draws = np.concatenate([make_planes(63, 49, s, rng=r).ravel() for r in range(40)])
    assert set(np.unique(planes)) <= {-1.0, 0.0, 1.0}
    zeros = np.mean(draws == 0)
    n = draws.size  # ~123k draws: 5 standard deviations is well under 0.01
    assert abs(zeros - s) < 5 * np.sqrt(s * (1 - s) / n) + 1e-12
    pos, neg = np.mean(draws == 1), np.mean(draws == -1)
    assert abs(pos - neg) < 0.01


def test_dense_planes_are_gaussian():
    planes = make_planes(63, 49, None, rng=3)
    assert np.all(planes != 0)
    assert abs(planes.mean()) < 0.05 and abs(planes.std() - 1) < 0.05


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_planes": 64, "dim": 25}, "L .* 64"),
        ({"num_planes": -1, "dim": 25}, "L .* -1"),
        ({"num_planes": 4, "dim": 25, "sparsity": 1.0}, r"s \(sparsity\) = 1.0"),
        ({"num_planes": 4, "dim": 25, "sparsity": -0.1}, r"s \(sparsity\) = -0.1"),
        ({"num_planes": 4, "dim": 0}, "dim"),
    ],
)
def test_plane_arguments_are_checked(kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_planes(**kwargs)


def test_planes_that_are_not_finite_are_refused():
    planes = np.ones((2, 4))
    planes[1, 2] = np.inf
    with pytest.raises(ValueError, match="planes must be finite"):
        hash_codes(np.zeros((3, 4)), planes)


def test_codes_use_all_36_bits_with_plane_0_least_significant():
    num_planes, dim = 36, 25
    planes = np.zeros((num_planes, dim), dtype=np.float32)
    for bit in range(num_planes):
        planes[bit, bit % dim] = 1.0 if bit < dim else -1.0
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((500, dim))
    codes = hash_codes(vectors, planes)
    expected = np.zeros(500, dtype=np.uint64)
    for bit in range(num_planes):
        on = vectors[:, bit % dim] * (1 if bit < dim else -1) > 0
        expected |= on.astype(np.uint64) << np.uint64(bit)
    np.testing.assert_array_equal(codes, expected)
    # every one of the 36 bits is set in some code and clear in another
    for bit in range(num_planes):
        column = (codes >> np.uint64(bit)) & np.uint64(1)
        assert 0 < column.sum() < 500
    assert codes.max() >= np.uint64(1) << np.uint64(35)


def test_zero_projection_gives_bit_zero_and_zero_planes_are_legal():
    planes = np.array([[1, -1, 0], [0, 0, 0]], dtype=np.float32)
    codes = hash_codes(np.array([[2.0, 2.0, 5.0], [3.0, 1.0, 0.0]]), planes)
    np.testing.assert_array_equal(codes, [0, 1])


def test_non_finite_values_count_only_where_the_plane_is_not_zero():
    """As the C++ kernel sums each projection over the plane's non-zero entries: a NaN or ±Inf
    under a zero entry does not make the projection NaN; a NaN projection gives bit 0."""
    planes = np.array([[1, 0, 0], [0, 1, -1], [1, 1, 0], [-1, 0, 1]], dtype=np.float32)
    vectors = np.array(
        [[np.nan, 2, 1], [np.inf, -1, 3], [np.inf, -np.inf, 0], [-np.inf, 0, 5]], dtype=np.float64
    )
    # projections: [NaN, 1, NaN, NaN], [Inf, -4, Inf, -Inf], [Inf, -Inf, NaN, -Inf],
    # [-Inf, -5, -Inf, Inf]
    np.testing.assert_array_equal(hash_codes(vectors, planes), [0b0010, 0b0101, 0b0001, 0b1000])


def test_sparse_matmul_drops_terms_with_a_zero_factor():
    onehot = np.array([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    v = np.array([[np.nan, 1.0], [2.0, np.inf], [3.0, -np.inf]])
    # bucket sums: NaN stays in its bucket; +Inf and -Inf only meet where both are summed
    np.testing.assert_array_equal(sparse_matmul(onehot, v), [[np.nan, -np.inf], [2.0, np.inf]])
    np.testing.assert_array_equal(sparse_matmul(v.T, onehot.T), [[np.nan, 2.0], [-np.inf, np.inf]])
    finite = np.arange(6.0).reshape(3, 2)
    np.testing.assert_array_equal(sparse_matmul(onehot, finite), onehot @ finite)


def test_centering_is_c_times_the_deviation_from_the_channel_mean_per_position():
    v = np.array([[1.0, 2.0], [3.0, 6.0]])
    np.testing.assert_array_equal(center(v), 2 * np.array([[-1.0, -2.0], [1.0, 2.0]]))
    # exact where v - mean is not (1/3 has no binary fraction)
    np.testing.assert_array_equal(center(np.array([[0.0], [0.0], [1.0]])), [[-1.0], [-1.0], [2.0]])


def test_bucket_labels_group_equal_codes():
    codes = np.array([[5, 3, 5, 9, 3], [1, 1, 1, 1, 1]], dtype=np.uint64)
    labels, count = bucket_labels(codes)
    np.testing.assert_array_equal(count, [3, 1])
    assert labels[0, 0] == labels[0, 2] and labels[0, 1] == labels[0, 4]
    assert len({labels[0, 0], labels[0, 1], labels[0, 3]}) == 3
    np.testing.assert_array_equal(labels[1], 0)
