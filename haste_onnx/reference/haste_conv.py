"""The numpy reference of HasteConv: the oracle for the C++ kernel and for every conversion.

It follows ``docs/operator.md`` step by step and computes the *reduced* convolution literally
(merged inputs, summed filters), in float64, vectorized over tiles and chunked to bound memory.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from haste_onnx.hashing import (
    bucket_labels,
    center,
    check_num_planes,
    hash_codes,
    sparse_matmul,
)
from haste_onnx.opdef import MAX_TILE

_CHUNK_ELEMENTS = 1 << 22
"""Upper bound on the elements of the per-chunk merged-filter tensor (float64)."""


@dataclass(frozen=True)
class HasteStats:
    """What one HasteConv run found, per image and tile (``[N, tiles_y, tiles_x]``)."""

    codes: np.ndarray  # uint64 [N, ty, tx, C]
    num_buckets: np.ndarray  # int64 [N, ty, tx]
    merging_buckets: np.ndarray  # int64 [N, ty, tx]: buckets holding more than one channel (m)
    channels: int

    @property
    def ratio(self) -> np.ndarray:
        """Per-patch compression ratio ``r = 1 - buckets / C``."""
        return 1.0 - self.num_buckets / self.channels


@dataclass(frozen=True)
class Geometry:
    """Shapes of one HasteConv application."""

    kernel: int
    tile: int
    out_h: int
    out_w: int
    tiles_y: int
    tiles_x: int

    @property
    def patch(self) -> int:
        return self.tile + self.kernel - 1


def _check_int(name: str, value: object, minimum: int, maximum: int | None = None) -> int:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, np.integer))
        or value < minimum
        or (maximum is not None and value > maximum)
    ):
        bounds = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
        raise ValueError(f"{name} must be an integer {bounds}, got {value!r}")
    return int(value)


def geometry(
    x_shape: Sequence[int], w_shape: Sequence[int], pads: Sequence[int], tile: int
) -> Geometry:
    """Validate the shapes of a HasteConv and derive its output and tiling."""
    if len(x_shape) != 4:
        raise ValueError(f"X must be 4-D [N, C, H, W], got shape {tuple(x_shape)}")
    if len(w_shape) != 4:
        raise ValueError(f"W must be 4-D [M, C, K, K], got shape {tuple(w_shape)}")
    n, c, h, w = x_shape
    m, cw, kh, kw = w_shape
    if c < 1 or m < 1:
        raise ValueError(f"X and W need at least one channel: X {x_shape}, W {w_shape}")
    if cw != c:
        raise ValueError(
            f"W has {cw} input channels but X has {c}: W shape {tuple(w_shape)}, "
            f"X shape {tuple(x_shape)} (grouped convolution is not supported)"
        )
    if kh != kw or kh < 1:
        raise ValueError(f"W must have a square kernel, got {kh}x{kw}")
    if len(pads) != 4:
        raise ValueError(f"pads must be [top, left, bottom, right], got {list(pads)}")
    for p in pads:
        _check_int("each pad", p, 0)
    tile = _check_int("tile (T)", tile, 1, MAX_TILE)
    pt, pl, pb, pr = (int(p) for p in pads)
    out_h, out_w = h + pt + pb - kh + 1, w + pl + pr - kw + 1
    if out_h < 1 or out_w < 1:
        raise ValueError(
            f"output would be empty: input {h}x{w}, pads {list(pads)}, kernel {kh}x{kw}"
        )
    tiles_y, tiles_x = -(-out_h // tile), -(-out_w // tile)
    # The zero-padded input the tiles read (extract_patches) and Y, of one image and of the batch.
    rows, cols = tiles_y * tile + kh - 1, tiles_x * tile + kw - 1
    if max(n, 1) * max(c, m) * rows * cols > np.iinfo(np.int64).max:
        raise ValueError(
            f"the sizes overflow 64-bit integers: X shape {tuple(x_shape)}, "
            f"W shape {tuple(w_shape)}, pads {list(pads)}, tile {tile}"
        )
    return Geometry(kh, tile, out_h, out_w, tiles_y, tiles_x)


def extract_patches(x: np.ndarray, geo: Geometry, pads: Sequence[int]) -> np.ndarray:
    """The ``P x P`` input patch of every output tile: ``[N, ty, tx, C, P, P]`` (a view).

    Coordinates are those of the zero-padded input; anything outside the real input, including
    beyond a partial last tile, is zero.
    """
    n, c, h, w = x.shape
    pt, pl = int(pads[0]), int(pads[1])
    rows = geo.tiles_y * geo.tile + geo.kernel - 1
    cols = geo.tiles_x * geo.tile + geo.kernel - 1
    padded = np.zeros((n, c, rows, cols), dtype=x.dtype)
    padded[:, :, pt : pt + h, pl : pl + w] = x
    p = geo.patch
    win = sliding_window_view(padded, (p, p), axis=(2, 3))[:, :, :: geo.tile, :: geo.tile]
    return win.transpose(0, 2, 3, 1, 4, 5)


def _reduced_conv(
    v: np.ndarray, labels: np.ndarray, w_flat: np.ndarray, geo: Geometry
) -> np.ndarray:
    """Reduced convolution of a chunk of patches.

    ``v [np, C, P*P]``, ``labels [np, C]``, ``w_flat [C, M*K*K]`` -> ``out [np, M, T*T]``.
    """
    npatch, c, _ = v.shape
    k, t, p = geo.kernel, geo.tile, geo.patch
    m = w_flat.shape[1] // (k * k)
    nb = int(labels.max()) + 1
    onehot = (labels[:, None, :] == np.arange(nb)[None, :, None]).astype(np.float64)
    sizes = onehot.sum(axis=-1)  # [np, B]
    # Sums over each bucket's channels only: a NaN or ±Inf stays in its bucket.
    merged_in = sparse_matmul(onehot, v) / np.maximum(sizes, 1.0)[..., None]  # mean of each bucket
    merged_w = sparse_matmul(onehot, w_flat)  # each bucket's filter channels summed: [np, B, M*K*K]
    merged_w = merged_w.reshape(npatch, nb, m, k * k).transpose(0, 2, 1, 3)
    windows = sliding_window_view(merged_in.reshape(npatch, nb, p, p), (k, k), axis=(2, 3))
    cols = windows.reshape(npatch, nb, t * t, k * k).transpose(0, 1, 3, 2)
    return merged_w.reshape(npatch, m, nb * k * k) @ cols.reshape(npatch, nb * k * k, t * t)


def haste_conv(
    x: np.ndarray,
    w: np.ndarray,
    planes: np.ndarray,
    bias: np.ndarray | None = None,
    *,
    pads: Sequence[int] = (0, 0, 0, 0),
    tile: int = 3,
    relu: bool = False,
    return_stats: bool = False,
) -> np.ndarray | tuple[np.ndarray, HasteStats]:
    """HasteConv of ``x [N, C, H, W]`` with ``w [M, C, K, K]`` and ``planes [L, P*P]``.

    Returns ``y [N, M, Ho, Wo]`` (float32), and the run's :class:`HasteStats` when
    ``return_stats`` is set.
    """
    x = np.asarray(x)
    w = np.asarray(w)
    planes = np.asarray(planes)
    if x.dtype != np.float32 or w.dtype != np.float32:
        raise ValueError(f"X and W must be float32, got X {x.dtype} and W {w.dtype}")
    geo = geometry(x.shape, w.shape, pads, tile)
    n, c = x.shape[:2]
    m = w.shape[0]
    p2 = geo.patch * geo.patch
    if planes.ndim != 2 or planes.shape[1] != p2:
        raise ValueError(
            f"planes must be [L, P*P] = [L, {p2}] for kernel {geo.kernel} and tile {geo.tile}, "
            f"got shape {planes.shape}"
        )
    check_num_planes(planes.shape[0])
    if bias is not None:
        bias = np.asarray(bias)
        if bias.shape != (m,):
            raise ValueError(f"B must have shape [{m}] (one per output channel), got {bias.shape}")

    patches = extract_patches(x, geo, pads).reshape(-1, c, p2)
    codes = hash_codes(center(patches), planes)  # [NP, C]
    labels, num_buckets = bucket_labels(codes)
    y = _convolve(patches, labels, num_buckets, w, bias, geo, relu)
    if not return_stats:
        return y
    return y, _stats(codes, labels, num_buckets, (n, geo.tiles_y, geo.tiles_x))


def hash_stats(
    x: np.ndarray,
    planes: np.ndarray,
    *,
    kernel: int,
    pads: Sequence[int] = (0, 0, 0, 0),
    tile: int = 3,
) -> HasteStats:
    """The buckets HasteConv would form on ``x``, without convolving: cheap statistics."""
    x = np.asarray(x)
    geo = geometry(x.shape, (1, x.shape[1], kernel, kernel) if x.ndim == 4 else (), pads, tile)
    if planes.ndim != 2 or planes.shape[1] != geo.patch**2:
        raise ValueError(f"planes must be [L, {geo.patch**2}], got shape {planes.shape}")
    patches = extract_patches(x, geo, pads).reshape(-1, x.shape[1], geo.patch**2)
    codes = hash_codes(center(patches), planes)
    labels, num_buckets = bucket_labels(codes)
    return _stats(codes, labels, num_buckets, (x.shape[0], geo.tiles_y, geo.tiles_x))


def _stats(
    codes: np.ndarray, labels: np.ndarray, num_buckets: np.ndarray, grid: tuple[int, int, int]
) -> HasteStats:
    npatch, c = labels.shape
    offsets = (np.arange(npatch) * c)[:, None]
    sizes = np.bincount((labels + offsets).ravel(), minlength=npatch * c).reshape(npatch, c)
    return HasteStats(
        codes=codes.reshape(*grid, c),
        num_buckets=num_buckets.reshape(grid),
        merging_buckets=(sizes > 1).sum(axis=1).reshape(grid),
        channels=c,
    )


def _convolve(
    patches: np.ndarray,
    labels: np.ndarray,
    num_buckets: np.ndarray,
    w: np.ndarray,
    bias: np.ndarray | None,
    geo: Geometry,
    relu: bool,
) -> np.ndarray:
    """Steps 6-7 for every patch, then bias and activation; the tiles assembled into Y."""
    c = patches.shape[1]
    m = w.shape[0]
    w_flat = w.astype(np.float64).reshape(m, c, -1).transpose(1, 0, 2).reshape(c, -1)
    t2 = geo.tile * geo.tile
    out = np.empty((patches.shape[0], m, t2), dtype=np.float64)
    per_patch = m * int(num_buckets.max(initial=1)) * geo.kernel * geo.kernel + c * c
    step = max(1, _CHUNK_ELEMENTS // per_patch)
    for start in range(0, patches.shape[0], step):
        sl = slice(start, start + step)
        out[sl] = _reduced_conv(patches[sl].astype(np.float64), labels[sl], w_flat, geo)
    return assemble(out, bias, relu, geo)


def assemble(out: np.ndarray, bias: np.ndarray | None, relu: bool, geo: Geometry) -> np.ndarray:
    """Bias and activation on per-tile outputs ``[N*ty*tx, M, T*T]``, then the tiles put
    together into ``Y [N, M, Ho, Wo]`` (float32; partial tiles cropped)."""
    if bias is not None:
        out = out + bias.astype(np.float64)[None, :, None]
    if relu:
        out = np.maximum(out, 0.0)
    ty, tx, t = geo.tiles_y, geo.tiles_x, geo.tile
    n, m = out.shape[0] // (ty * tx), out.shape[1]
    y = out.reshape(n, ty, tx, m, t, t).transpose(0, 3, 1, 4, 2, 5).reshape(n, m, ty * t, tx * t)
    return np.ascontiguousarray(y[:, :, : geo.out_h, : geo.out_w], dtype=np.float32)
