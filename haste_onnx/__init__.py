"""haste-onnx: data-free, training-free HASTE channel merging for ONNX CNNs.

Convert with :func:`convert` (or the ``haste-onnx`` command); run converted models in
onnxruntime with :func:`make_session`, or register :func:`get_library_path` on your own
``SessionOptions``.

The names below are imported when first used, so that importing the package (as the command
line does first) loads neither onnx nor onnxruntime.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from haste_onnx.hashing import bucket_labels, hash_codes, make_planes
    from haste_onnx.opdef import DOMAIN, OP_TYPE
    from haste_onnx.passes.rewrite import HasteOptions
    from haste_onnx.pipeline import ConversionResult, VerifyOptions, convert, inspect, verify_pair
    from haste_onnx.reference import HasteConv, HasteStats, haste_conv
    from haste_onnx.runtime import get_library_path, make_session
    from haste_onnx.verify import Tolerances

__version__ = "0.1.0"

_MODULES = {
    "haste_onnx.hashing": ("bucket_labels", "hash_codes", "make_planes"),
    "haste_onnx.opdef": ("DOMAIN", "OP_TYPE"),
    "haste_onnx.passes.rewrite": ("HasteOptions",),
    "haste_onnx.pipeline": (
        "ConversionResult",
        "VerifyOptions",
        "convert",
        "inspect",
        "verify_pair",
    ),
    "haste_onnx.reference": ("HasteConv", "HasteStats", "haste_conv"),
    "haste_onnx.runtime": ("get_library_path", "make_session"),
    "haste_onnx.verify": ("Tolerances",),
}
_HOME = {name: module for module, names in _MODULES.items() for name in names}

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


if not TYPE_CHECKING:  # type checkers see the imports above, and a misspelt name stays an error

    def __getattr__(name: str) -> Any:
        """A name of ``__all__``, or a submodule (``haste_onnx.speed``), imported on first use."""
        if name in _HOME:
            value = getattr(importlib.import_module(_HOME[name]), name)
        elif importlib.util.find_spec(f"haste_onnx.{name}") is not None:
            value = importlib.import_module(f"haste_onnx.{name}")
        else:
            raise AttributeError(f"module 'haste_onnx' has no attribute {name!r}")
        globals()[name] = value  # imported once
        return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_HOME})
