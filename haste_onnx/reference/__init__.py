"""Numpy reference implementations of the project's operators, one op per file."""

from haste_onnx.reference.haste_conv import (
    Geometry,
    HasteStats,
    extract_patches,
    geometry,
    hash_stats,
    haste_conv,
)
from haste_onnx.reference.op_haste_conv import HasteConv

__all__ = [
    "Geometry",
    "HasteConv",
    "HasteStats",
    "extract_patches",
    "geometry",
    "hash_stats",
    "haste_conv",
]
