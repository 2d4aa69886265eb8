"""Independent implementations used as oracles in tests: plain Conv, brute-force HasteConv."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def conv2d(x: np.ndarray, w: np.ndarray, pads: Sequence[int] = (0, 0, 0, 0)) -> np.ndarray:
    """Stride-1 cross-correlation in float64 by explicit shifts (no HASTE code involved)."""
    n, c, h, wd = x.shape
    m, _, k, _ = w.shape
    pt, pl, pb, pr = pads
    xp = np.zeros((n, c, h + pt + pb, wd + pl + pr))
    xp[:, :, pt : pt + h, pl : pl + wd] = x
    ho, wo = xp.shape[2] - k + 1, xp.shape[3] - k + 1
    y = np.zeros((n, m, ho, wo))
    for dy in range(k):
        for dx in range(k):
            y += np.einsum("nchw,mc->nmhw", xp[:, :, dy : dy + ho, dx : dx + wo], w[:, :, dy, dx])
    return y


def brute_force_haste(
    x: np.ndarray,
    w: np.ndarray,
    planes: np.ndarray,
    bias: np.ndarray | None = None,
    pads: Sequence[int] = (0, 0, 0, 0),
    tile: int = 3,
    relu: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """HasteConv by loops over images, tiles and buckets, straight from the definition.

    Returns ``y [N, M, Ho, Wo]`` and the per-tile bucket counts ``[N, ty, tx]``.
    """
    n, c, h, wd = x.shape
    m, _, k, _ = w.shape
    pt, pl, pb, pr = pads
    ho, wo = h + pt + pb - k + 1, wd + pl + pr - k + 1
    p = tile + k - 1
    ty, tx = -(-ho // tile), -(-wo // tile)
    big = np.zeros((n, c, ty * tile + k - 1 + p, tx * tile + k - 1 + p))
    big[:, :, pt : pt + h, pl : pl + wd] = x
    y = np.zeros((n, m, ty * tile, tx * tile))
    buckets = np.zeros((n, ty, tx), dtype=np.int64)
    for b in range(n):
        for iy in range(ty):
            for ix in range(tx):
                oy, ox = iy * tile, ix * tile
                patch = big[b, :, oy : oy + p, ox : ox + p]
                vec = patch.reshape(c, -1)
                u = vec - vec.mean(axis=0)
                codes = []
                for ch in range(c):
                    code = 0
                    for bit in range(planes.shape[0]):
                        if float(np.dot(planes[bit].astype(np.float64), u[ch])) > 0:
                            code |= 1 << bit
                    codes.append(code)
                groups: dict[int, list[int]] = {}
                for ch, code in enumerate(codes):
                    groups.setdefault(code, []).append(ch)
                buckets[b, iy, ix] = len(groups)
                out = np.zeros((m, tile, tile))
                for members in groups.values():
                    merged_in = patch[members].mean(axis=0)
                    merged_w = w[:, members].astype(np.float64).sum(axis=1)
                    for dy in range(k):
                        for dx in range(k):
                            window = merged_in[dy : dy + tile, dx : dx + tile]
                            out += merged_w[:, dy, dx, None, None] * window[None]
                y[b, :, oy : oy + tile, ox : ox + tile] = out
    if bias is not None:
        y += bias[None, :, None, None]
    if relu:
        y = np.maximum(y, 0)
    return y[:, :, :ho, :wo], buckets
