"""Fashion-MNIST from IDX files (tiny files written here, and the real ones when ../shared/data has them),
and user arrays as datasets."""

from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path

import numpy as np
import pytest

from onnxslim.data import (
    FASHION_FILES,
    FASHION_MEAN,
    FASHION_STD,
    ArrayDataset,
    load_dataset,
    load_fashion_mnist,
    read_idx,
)
from onnxslim.errors import OnnxSlimError

# beside the checkout (../shared/data), or wherever ONNXSLIM_FASHION_MNIST says (a fresh clone elsewhere)
SHARED = Path(os.environ.get("ONNXSLIM_FASHION_MNIST",
                             Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "fashion-mnist"))


def idx_bytes(array: np.ndarray) -> bytes:
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_split(folder: Path, split: str, images: np.ndarray, labels: np.ndarray, compress: bool) -> None:
    for stem, array in zip(FASHION_FILES[split], (images, labels)):
        data = idx_bytes(array)
        if compress:
            (folder / f"{stem}.gz").write_bytes(gzip.compress(data))
        else:
            (folder / stem).write_bytes(data)


@pytest.fixture()
def tiny(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {"train": (rng.integers(0, 256, (6, 28, 28)), np.arange(6) % 10),
              "test": (rng.integers(0, 256, (4, 28, 28)), np.array([9, 0, 3, 7]))}
    write_split(tmp_path, "train", *arrays["train"], compress=True)
    write_split(tmp_path, "test", *arrays["test"], compress=False)  # plain IDX files work as well
    return tmp_path, arrays


def test_idx_files_are_parsed_and_normalised(tiny):
    folder, arrays = tiny
    for split in ("train", "test"):
        data = load_dataset(f"fashion-mnist:{folder}", split)
        images, labels = arrays[split]
        assert data.images.shape == (len(images), 1, 28, 28) and data.images.dtype == np.float32
        expected = (images.astype(np.float32) / 255.0 - FASHION_MEAN) / FASHION_STD
        np.testing.assert_allclose(data.images[:, 0], expected, rtol=1e-6, atol=1e-6)
        np.testing.assert_array_equal(data.labels, labels)
        assert data.num_classes == 10 and data.class_names[9] == "Ankle boot"


def test_upstream_repository_layout_is_found(tiny, tmp_path_factory):
    folder, arrays = tiny
    clone = tmp_path_factory.mktemp("clone")
    (clone / "data" / "fashion").mkdir(parents=True)
    for file in folder.iterdir():
        (clone / "data" / "fashion" / file.name).write_bytes(file.read_bytes())
    assert len(load_fashion_mnist(clone, "test")) == 4


def test_missing_short_and_inconsistent_files_are_clear_errors(tiny, tmp_path_factory):
    folder, arrays = tiny
    with pytest.raises(OnnxSlimError, match="t10k-labels-idx1-ubyte"):
        (folder / "t10k-labels-idx1-ubyte").rename(folder / "elsewhere")
        load_fashion_mnist(folder, "test")
    short = folder / "t10k-labels-idx1-ubyte"
    short.write_bytes(idx_bytes(np.arange(4))[:-1])
    with pytest.raises(OnnxSlimError, match="truncated"):
        load_fashion_mnist(folder, "test")
    short.write_bytes(idx_bytes(np.arange(3)))
    with pytest.raises(OnnxSlimError, match="4 images but t10k-labels-idx1-ubyte 3 labels"):
        load_fashion_mnist(folder, "test")
    cut = folder / "train-images-idx3-ubyte.gz"
    cut.write_bytes(cut.read_bytes()[:40])
    with pytest.raises(OnnxSlimError, match="train-images"):
        load_fashion_mnist(folder, "train")
    bad = tmp_path_factory.mktemp("bad") / "x"
    bad.write_bytes(b"\x08\x03\x00\x00")
    with pytest.raises(OnnxSlimError, match="bad magic"):
        read_idx(bad)
    with pytest.raises(OnnxSlimError, match="folder not found"):
        load_dataset(f"fashion-mnist:{folder / 'nope'}")
    with pytest.raises(OnnxSlimError, match="fashion-mnist:DIR"):
        load_dataset("fashion-mnist")


def test_user_arrays_become_a_dataset():
    images = np.full((5, 8, 8), 255, np.uint8)
    data = ArrayDataset.from_arrays(images, np.array([0, 1, 2, 1, 0]))
    assert data.images.shape == (5, 1, 8, 8) and float(data.images.max()) == 1.0 and data.num_classes == 3
    with pytest.raises(OnnxSlimError, match="labels must be integers"):
        ArrayDataset.from_arrays(images, np.zeros(5, np.float32))


@pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/data/fashion-mnist is not there")
def test_the_real_files():
    test = load_dataset(f"fashion-mnist:{SHARED}", "test")
    assert test.images.shape == (10000, 1, 28, 28)
    assert np.bincount(test.labels).tolist() == [1000] * 10
    assert abs(float(test.images.mean())) < 0.05  # normalised with the training set's mean and std
