"""Running HasteConv models in onnxruntime: the custom-operator library and a session helper.

The library ``libhaste_onnx_ops.so`` is built by ``pip install`` and installed inside the
package; register it with ``SessionOptions.register_custom_ops_library(get_library_path())``,
or let :func:`make_session` do it.
"""

from __future__ import annotations

import os
import threading
import weakref
from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from haste_onnx import ir
from haste_onnx.errors import InputError

LIBRARY_NAME = "libhaste_onnx_ops.so"

# Options the library is registered on: onnxruntime refuses a second registration of the same
# operator domain on one SessionOptions, and callers may reuse theirs for several sessions.
_registered: weakref.WeakSet[ort.SessionOptions] = weakref.WeakSet()
_registered_lock = threading.Lock()


def get_library_path() -> str:
    """Path of the HasteConv custom-operator library inside the installed package.

    Imported from a source tree (Python started in a checkout), the package has no build of the
    library beside it; the library of the installed distribution is then used, if there is one.
    """
    path = Path(__file__).resolve().parent / LIBRARY_NAME
    if not path.is_file():
        try:
            installed = Path(
                str(distribution("haste-onnx").locate_file(f"haste_onnx/{LIBRARY_NAME}"))
            )
        except PackageNotFoundError:
            installed = path
        if not installed.is_file():
            raise FileNotFoundError(
                f"{path} is missing: the HasteConv operator library is built when the package "
                "is installed (`pip install .`), and no installed haste-onnx has it"
            )
        path = installed
    return str(path)


def make_session(
    model: onnx.ModelProto | str | os.PathLike[str] | bytes,
    providers: Sequence[str] = ("CPUExecutionProvider",),
    intra_op_num_threads: int | None = None,
    sess_options: ort.SessionOptions | None = None,
) -> ort.InferenceSession:
    """An onnxruntime session for ``model`` (a ModelProto, a path or serialized bytes) with the
    HasteConv library registered. HasteConv runs on the CPU whatever the providers.

    ``sess_options`` may be reused: the library is registered on them once, and they must not
    have it registered otherwise (onnxruntime refuses a second registration when the session is
    made). ``intra_op_num_threads``, when set, is set on them. A model with external data loads
    from its path, not as bytes (onnxruntime looks for the data files beside the model file).
    """
    options = sess_options if sess_options is not None else ort.SessionOptions()
    with _registered_lock:
        if options not in _registered:
            options.register_custom_ops_library(get_library_path())
            _registered.add(options)
    if intra_op_num_threads is not None:
        options.intra_op_num_threads = intra_op_num_threads
    if isinstance(model, onnx.ModelProto):
        model = model.SerializeToString()
    elif not isinstance(model, bytes):
        model = os.fspath(model)
    try:
        return ort.InferenceSession(model, sess_options=options, providers=list(providers))
    except ort.capi.onnxruntime_pybind11_state.Fail as exc:
        if "Domain already set in registry" not in str(exc):
            raise
        raise InputError(
            "these SessionOptions had the HasteConv library registered already, and "
            "make_session registered it again: onnxruntime cannot make a session with them any "
            "more; give make_session new options without the library"
        ) from None


def quiet_session(
    model: onnx.ModelProto,
    *,
    custom_ops: bool = True,
    threads: int | None = None,
    spinning: bool = True,
) -> ort.InferenceSession:
    """A session for the library's own runs (verification, evaluation, timing): onnxruntime's
    log is silenced, since the library prints nothing (its errors still raise, and the command
    line says them in one line); models past the protobuf limit
    load from a temporary file. ``spinning=False`` makes the worker threads sleep as soon as
    they run out of work, instead of spinning for more (see :mod:`haste_onnx.speed`)."""
    options = ort.SessionOptions()
    options.log_severity_level = 4
    if threads is not None:
        options.intra_op_num_threads = threads
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    source = ir.session_source(model)
    if custom_ops:
        return make_session(source, sess_options=options)
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def run(
    session: ort.InferenceSession, names: Sequence[str] | None, feeds: dict[str, np.ndarray]
) -> list[np.ndarray]:
    """``session.run``, also where the feeds hold several of the batches a fixed first dimension
    of a 4-D (image) input takes (a model exported for one image, fed several): then batch after
    batch, each 4-D input cut into as many equal parts, the others fed whole every time, and the
    outputs joined on their first axis."""
    images = {i.name: i.shape[0] for i in session.get_inputs() if len(i.shape) == 4}
    images = {k: v for k, v in images.items() if k in feeds and feeds[k].ndim == 4}
    counts = {
        feeds[name].shape[0] // size
        for name, size in images.items()
        if isinstance(size, int) and size > 0 and feeds[name].shape[0] % size == 0
    }
    if len(counts) != 1 or (count := counts.pop()) <= 1:
        return session.run(names, feeds)
    if any(feeds[name].shape[0] % count for name in images):
        sizes = ", ".join(f"{name} {feeds[name].shape[0]}" for name in images)
        raise InputError(
            f"the model takes these inputs in {count} batches, and not every image input holds "
            f"a multiple of {count} images ({sizes})"
        )

    def part(name: str, array: np.ndarray, i: int) -> np.ndarray:
        if name not in images:
            return array
        size = array.shape[0] // count
        return array[i * size : (i + 1) * size]

    parts = [session.run(names, {k: part(k, v, i) for k, v in feeds.items()}) for i in range(count)]
    if any(p.ndim == 0 for p in parts[0]):
        raise InputError(
            f"the model takes {count} batches of these inputs one at a time, and has an output "
            "without a batch axis to join them on: give inputs for one batch"
        )
    names = names or [output.name for output in session.get_outputs()]
    for name, outputs in zip(names, zip(*parts)):
        if len({output.shape[1:] for output in outputs}) > 1:
            shapes = ", ".join(str(list(output.shape)) for output in outputs)
            raise InputError(
                f"the model takes {count} batches of these inputs one at a time, and its output "
                f"{name!r} has another size in each batch ({shapes}), so they cannot be joined: "
                "give inputs for one batch"
            )
    return [np.concatenate(outputs) for outputs in zip(*parts)]
