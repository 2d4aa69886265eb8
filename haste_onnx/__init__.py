"""haste-onnx: data-free, training-free HASTE channel merging for ONNX CNNs."""

from haste_onnx.hashing import bucket_labels, hash_codes, make_planes
from haste_onnx.opdef import DOMAIN, OP_TYPE
from haste_onnx.reference import HasteConv, HasteStats, haste_conv

__version__ = "0.1.0"

__all__ = [
    "DOMAIN",
    "OP_TYPE",
    "HasteConv",
    "HasteStats",
    "bucket_labels",
    "hash_codes",
    "haste_conv",
    "make_planes",
]
