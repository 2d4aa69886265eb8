"""Sparse random hyperplanes, locality-sensitive hash codes and buckets (pure numpy).

Conventions follow the operator's definition (see ``docs/operator.md``): a code is the
little-endian bit pattern of ``dot(plane_l, u) > 0`` with plane 0 as the least significant bit,
and the sums are taken in float64 so that every implementation agrees on the sign.
"""

from __future__ import annotations

import numpy as np

MAX_PLANES = 63
"""Codes are 64-bit; 63 planes keep every code a non-negative int64 as well."""


def check_num_planes(num_planes: int) -> None:
    """Raise ``ValueError`` unless ``num_planes`` is a valid number of hyperplanes."""
    if isinstance(num_planes, bool) or not isinstance(num_planes, (int, np.integer)):
        raise ValueError(f"L (num_planes) must be an integer, got {num_planes!r}")
    if not 0 <= num_planes <= MAX_PLANES:
        raise ValueError(
            f"L (num_planes) = {num_planes} is out of range: codes are 64-bit, "
            f"so L must be in [0, {MAX_PLANES}]"
        )


def make_planes(
    num_planes: int,
    dim: int,
    sparsity: float | None = 2 / 3,
    rng: np.random.Generator | int | None = 0,
) -> np.ndarray:
    """Draw ``num_planes`` random hyperplanes of length ``dim`` as float32 ``[L, dim]``.

    With ``sparsity = s`` every entry is 0 with probability ``s`` and +1 or -1 with probability
    ``(1 - s) / 2`` each (sparse random projections, Achlioptas 2003; Li et al. 2006).
    ``sparsity=None`` draws dense Gaussian planes instead (the paper's ablation). Only the sign
    of a projection matters, so the planes are not scaled.
    """
    check_num_planes(num_planes)
    if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)) or dim < 1:
        raise ValueError(f"dim must be a positive integer, got {dim!r}")
    if sparsity is not None and not (0.0 <= sparsity < 1.0):
        raise ValueError(f"s (sparsity) = {sparsity!r} is out of range: allowed is [0, 1) or None")
    gen = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    shape = (num_planes, dim)
    if sparsity is None:
        return gen.standard_normal(shape).astype(np.float32)
    u = gen.random(shape)
    half = (1.0 - sparsity) / 2.0
    planes = np.zeros(shape, dtype=np.float32)
    planes[u < half] = 1.0
    planes[(u >= half) & (u < 2 * half)] = -1.0
    return planes


def sparse_matmul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``a @ b`` in float64, each sum over the terms whose factors are both non-zero.

    A zero factor drops its term even where the other factor is NaN or ±Inf (IEEE arithmetic
    makes that product NaN), as a sum over a sparse operand's non-zero entries does: the C++
    kernel's projections over each plane's non-zero entries, its bucket sums over the bucket's
    channels. A sum is then NaN if a term is NaN or the terms hold both +Inf and -Inf, else ±Inf
    if a term is, else the finite sum. Non-finite values may be in ``a`` or in ``b``, not in both.
    Only operands with non-finite values cost more than ``a @ b``.
    """
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    a_finite, b_finite = np.isfinite(a), np.isfinite(b)
    if a_finite.all():
        if b_finite.all():
            return a @ b
        return np.swapaxes(sparse_matmul(np.swapaxes(b, -1, -2), np.swapaxes(a, -1, -2)), -1, -2)

    def meet(in_a: np.ndarray, in_b: np.ndarray) -> np.ndarray:  # any term with both factors?
        return (in_a.astype(np.float64) @ in_b.astype(np.float64)) > 0

    out = np.where(a_finite, a, 0.0) @ b
    plus = meet(a == np.inf, b > 0) | meet(a == -np.inf, b < 0)
    minus = meet(a == np.inf, b < 0) | meet(a == -np.inf, b > 0)
    out[plus] = np.inf
    out[minus] = -np.inf
    out[meet(np.isnan(a), b != 0) | (plus & minus)] = np.nan
    return out


def hash_codes(vectors: np.ndarray, planes: np.ndarray) -> np.ndarray:
    """64-bit LSH codes of ``vectors [..., D]`` against ``planes [L, D]`` -> uint64 ``[...]``.

    ``bit_l = dot(planes[l], v) > 0`` (exactly 0 gives 0, and so does NaN), summed in float64
    over the non-zero entries of ``planes[l]`` (:func:`sparse_matmul`: a NaN or ±Inf in ``v``
    where the plane is 0 does not count).
    """
    planes = np.asarray(planes)
    if planes.ndim != 2:
        raise ValueError(f"planes must be 2-D [L, D], got shape {planes.shape}")
    check_num_planes(planes.shape[0])
    if not np.isfinite(planes).all():
        raise ValueError("planes must be finite (entries in {-1, 0, 1}, or Gaussian)")
    if vectors.shape[-1] != planes.shape[1]:
        raise ValueError(
            f"vectors have length {vectors.shape[-1]} but planes have length {planes.shape[1]}"
        )
    proj = sparse_matmul(vectors, planes.T)
    bits = (proj > 0).astype(np.uint64)
    weights = np.left_shift(np.uint64(1), np.arange(planes.shape[0], dtype=np.uint64))
    return (bits * weights).sum(axis=-1, dtype=np.uint64)


def center(vectors: np.ndarray) -> np.ndarray:
    """C times the vectors centered on their mean over the channel axis (-2), in float64.

    ``C v_c - sum_c v_c``, position by position: the same signs of projections as ``v_c - mean``,
    but ``C v_c`` is exact, and so is the rest wherever the exact sums fit float64's 53-bit
    significand (small integers, quantized values): projections that are 0 in exact arithmetic
    then come out as exact zeros (bit 0) instead of rounding noise. The sum runs over the
    channels in order.
    """
    v = np.asarray(vectors, dtype=np.float64)
    with np.errstate(invalid="ignore"):  # Inf - Inf: a position that holds ±Inf is NaN or ±Inf
        return v.shape[-2] * v - v.sum(axis=-2, keepdims=True)


def bucket_labels(codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Group equal codes along the last axis.

    Returns ``labels`` (same shape as ``codes``, each channel's bucket index, numbered by first
    appearance order of sorted codes, ``0 .. buckets-1``) and ``num_buckets`` (shape
    ``codes.shape[:-1]``).
    """
    order = np.argsort(codes, axis=-1, kind="stable")
    sorted_codes = np.take_along_axis(codes, order, axis=-1)
    new_bucket = np.ones(sorted_codes.shape, dtype=np.int64)
    new_bucket[..., 1:] = sorted_codes[..., 1:] != sorted_codes[..., :-1]
    sorted_labels = np.cumsum(new_bucket, axis=-1) - 1
    labels = np.empty_like(sorted_labels)
    np.put_along_axis(labels, order, sorted_labels, axis=-1)
    return labels, sorted_labels[..., -1] + 1
