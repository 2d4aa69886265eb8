"""haste-onnx: data-free, training-free HASTE channel merging for ONNX CNNs.

Convert with :func:`convert` (or the ``haste-onnx`` command); run converted models in
onnxruntime with :func:`make_session`, or register :func:`get_library_path` on your own
``SessionOptions``.
"""

from haste_onnx.hashing import bucket_labels, hash_codes, make_planes
from haste_onnx.opdef import DOMAIN, OP_TYPE
from haste_onnx.passes.rewrite import HasteOptions
from haste_onnx.pipeline import ConversionResult, VerifyOptions, convert, inspect, verify_pair
from haste_onnx.reference import HasteConv, HasteStats, haste_conv
from haste_onnx.runtime import get_library_path, make_session
from haste_onnx.verify import Tolerances

__version__ = "0.1.0"

__all__ = [
    "DOMAIN",
    "OP_TYPE",
    "ConversionResult",
    "HasteConv",
    "HasteOptions",
    "HasteStats",
    "Tolerances",
    "VerifyOptions",
    "bucket_labels",
    "convert",
    "get_library_path",
    "hash_codes",
    "haste_conv",
    "inspect",
    "make_planes",
    "make_session",
    "verify_pair",
]
