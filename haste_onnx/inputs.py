"""The tensors a verification runs on: seeded random ones shaped from the model, or the user's."""

from __future__ import annotations

import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from haste_onnx import datasets, ir
from haste_onnx.errors import InputError


@dataclass(frozen=True)
class Feeds:
    """Named input arrays and a sentence saying what they are."""

    arrays: dict[str, np.ndarray]
    description: str


def check_dims(model: onnx.ModelProto, dims: Mapping[str, int]) -> None:
    """Refuse a --dim NAME that no graph input has: a misspelt name would go unnoticed."""
    named = {d.dim_param for i in ir.graph_inputs(model) for d in i.type.tensor_type.shape.dim}
    named.discard("")
    if unknown := sorted(set(dims) - named):
        have = ", ".join(sorted(named)) or "none"
        raise InputError(
            f"--dim {unknown[0]}: no input of the model has a dimension named {unknown[0]!r} "
            f"(its named dimensions: {have})"
        )


def declared_shape(value: onnx.ValueInfoProto) -> list[int | str]:
    """The input's shape as the model declares it: sizes, dimension names, or "?"."""
    dims = value.type.tensor_type.shape.dim
    return [d.dim_value if d.HasField("dim_value") else d.dim_param or "?" for d in dims]


def fits(value: onnx.ValueInfoProto, shape: tuple[int, ...], first_axis: int = 0) -> bool:
    """Whether an array of ``shape`` has the input's rank and its fixed sizes (from axis
    ``first_axis`` on)."""
    dims = value.type.tensor_type.shape.dim
    return len(shape) == len(dims) and all(
        not d.HasField("dim_value") or d.dim_value == s
        for d, s in list(zip(dims, shape))[first_axis:]
    )


def _fixed_batch(value: onnx.ValueInfoProto) -> int:
    """The fixed first dimension of a 4-D (image) input, a batch: 0 if it has none."""
    dims = value.type.tensor_type.shape.dim
    return dims[0].dim_value if len(dims) == 4 and dims[0].HasField("dim_value") else 0


def _batches_of(value: onnx.ValueInfoProto, shape: tuple[int, ...]) -> bool:
    """Whether an array of ``shape`` holds several batches of an image input whose batch is
    fixed (a model exported for one image): run one at a time (runtime.run)."""
    first = _fixed_batch(value)
    return first > 0 and shape[0] % first == 0 and fits(value, shape, 1)


def run_shapes(
    model: onnx.ModelProto, arrays: Mapping[str, np.ndarray]
) -> dict[str, tuple[int, ...]]:
    """The input shapes of one run of the model on ``arrays``: a fixed first dimension where the
    arrays hold several batches of it."""
    shapes = {name: tuple(array.shape) for name, array in arrays.items()}
    for value in ir.graph_inputs(model):
        shape = shapes.get(value.name)
        if shape and (batch := _fixed_batch(value)):
            shapes[value.name] = (batch, *shape[1:])
    return shapes


def resolve_shape(
    value: onnx.ValueInfoProto, batch: int, dims: Mapping[str, int]
) -> tuple[int, ...]:
    """A concrete shape for a graph input: symbolic dims from ``dims``, axis 0 from ``batch``."""
    shape = []
    for axis, dim in enumerate(value.type.tensor_type.shape.dim):
        if dim.HasField("dim_value") and dim.dim_value > 0:
            shape.append(dim.dim_value)
        elif dim.dim_param and dim.dim_param in dims:
            shape.append(int(dims[dim.dim_param]))
        elif axis == 0:
            shape.append(batch)
        else:
            label = dim.dim_param or "?"
            raise InputError(
                f"input {value.name!r} has a dynamic dimension {label!r} at axis {axis}: "
                f"give its size, e.g. --dim {label if dim.dim_param else 'NAME'}=32"
            )
    return tuple(shape)


def random_feeds(
    model: onnx.ModelProto, batch: int = 2, dims: Mapping[str, int] | None = None, seed: int = 0
) -> Feeds:
    """Standard-normal float32 tensors for every graph input, from a seeded generator."""
    rng = np.random.default_rng(seed)
    arrays, shapes = {}, []
    for value in ir.graph_inputs(model):
        if value.type.tensor_type.elem_type != onnx.TensorProto.FLOAT:
            raise InputError(
                f"input {value.name!r} is not float32; give your own inputs (--inputs)"
            )
        shape = resolve_shape(value, batch, dims or {})
        arrays[value.name] = rng.standard_normal(shape).astype(np.float32)
        shapes.append(f"{value.name} {list(shape)}")
    return Feeds(arrays, f"seeded random normal tensors (seed {seed}): {', '.join(shapes)}")


def _load_images(folder: Path, shape: tuple[int, ...]) -> np.ndarray:
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in datasets.IMAGE_SUFFIXES)
    if not files:
        raise InputError(f"no images ({', '.join(sorted(datasets.IMAGE_SUFFIXES))}) in {folder}")
    if len(shape) != 4 or shape[1] not in (1, 3):
        raise InputError(
            f"an image folder feeds a [N, 1 or 3, H, W] input, the model has {list(shape)}"
        )
    mode = "L" if shape[1] == 1 else "RGB"
    return datasets.read_images(files, mode, (shape[3], shape[2])).astype(np.float32)


def _as_input(value: onnx.ValueInfoProto, array: np.ndarray) -> np.ndarray:
    """``array`` in the input's element type (floats convert to floats, nothing else converts),
    refused if it is empty or, for floats, not finite."""
    dtype = onnx.helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type)
    if array.dtype != dtype:
        if not (array.dtype.kind == dtype.kind == "f"):
            raise InputError(
                f"input {value.name!r}: array of {array.dtype}, the model takes {dtype}"
            )
        array = array.astype(dtype)
    if array.size == 0:
        raise InputError(f"input {value.name!r}: array of shape {list(array.shape)} is empty")
    if dtype.kind == "f" and not np.isfinite(array).all():
        raise InputError(f"input {value.name!r}: array has NaN or infinite values")
    return array


def _load_arrays(path: Path, names: list[str]) -> dict[str, np.ndarray]:
    """The arrays of ``names`` from a .npy (one name) or a .npz file."""
    try:
        if path.suffix == ".npy":
            return {names[0]: np.load(path, allow_pickle=False)}
        with np.load(path, allow_pickle=False) as data:
            missing = sorted(set(names) - set(data.files))
            if missing:
                raise InputError(f"{path} lacks arrays for inputs {missing} (it has {data.files})")
            return {name: data[name] for name in names}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:  # empty, corrupt, pickled
        raise InputError(f"cannot read inputs {path}: {exc or type(exc).__name__}") from None


PIXEL_SCALE = ((0.0,), (255.0,))
"""The default mean and std of image pixels: [0, 1]."""


def scale_values(values: float | Sequence[float]) -> tuple[float, ...]:
    """A mean or std, one value or one per channel, as a tuple of floats."""
    try:
        return tuple(float(v) for v in np.asarray(values, dtype=np.float64).reshape(-1))
    except (TypeError, ValueError):
        raise InputError(
            f"mean and std are numbers, one or one per channel: got {values!r}"
        ) from None


def _listed(values: Sequence[float]) -> str:
    text = ", ".join(f"{v:g}" for v in values)
    return text if len(values) == 1 else f"[{text}]"


def user_feeds(
    model: onnx.ModelProto,
    path: str | Path,
    dims: Mapping[str, int] | None = None,
    mean: float | Sequence[float] = PIXEL_SCALE[0],
    std: float | Sequence[float] = PIXEL_SCALE[1],
) -> Feeds:
    """Inputs from a .npy (one-input models), a .npz (keys are input names) or an image folder
    (resized to the input's height and width, grey or RGB as it has 1 or 3 channels, its 0..255
    pixels made ``(pixel - mean) / std``, one value or one per channel: [0, 1] by default)."""
    path = Path(path)
    inputs = ir.graph_inputs(model)
    names = [i.name for i in inputs]
    if not path.exists():
        raise InputError(f"inputs not found: {path}")
    mean, std = scale_values(mean), scale_values(std)
    scaled = (mean, std) != PIXEL_SCALE
    if scaled and not path.is_dir():
        raise InputError("--mean and --std scale image folders; arrays are used as they are")
    source = str(path)
    if path.is_dir():
        source += (
            f" (pixels (p - {_listed(mean)}) / {_listed(std)})" if scaled else " (pixels / 255)"
        )
        if len(inputs) != 1:
            raise InputError(f"an image folder can feed a one-input model; this one has {names}")
        images = _load_images(path, resolve_shape(inputs[0], 1, dims or {}))
        try:
            arrays = {names[0]: datasets.normalize(images, mean, std)}
        except ValueError as exc:  # the mean or std: not finite, or not one per channel
            raise InputError(f"--mean/--std: {exc}") from None
    elif path.suffix in (".npy", ".npz"):
        if path.suffix == ".npy" and len(inputs) != 1:
            raise InputError(
                f"a .npy file can feed a one-input model; this one has {names}: use .npz"
            )
        arrays = _load_arrays(path, names)
    else:
        raise InputError(f"inputs must be a .npy or .npz file or an image folder, got {path}")
    for value in inputs:
        arrays[value.name] = array = _as_input(value, arrays[value.name])
        if not (fits(value, array.shape) or _batches_of(value, array.shape)):
            batch = _fixed_batch(value)
            hint = (
                f" (exported for a batch of {batch}, it takes a multiple of {batch} images)"
                if batch > 1 and fits(value, array.shape, 1)
                else ""
            )
            raise InputError(
                f"input {value.name!r}: array of shape {list(array.shape)} does not "
                f"fit the model's {declared_shape(value)}{hint}"
            )
    shapes = ", ".join(f"{k} {list(v.shape)}" for k, v in arrays.items())
    return Feeds(arrays, f"user inputs from {source}: {shapes}")
