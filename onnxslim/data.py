"""Datasets as plain numpy arrays, usable by PyTorch training and onnxruntime validation alike.

Sources (see :func:`load_dataset` for the spec strings):

* ``mnist`` — the bundled MNIST-10k (10,000 real digits, provenance in ``onnxslim/datasets/README.md``),
  with a deterministic shuffled train/test split; ``mnist:32`` pads the 28x28 digits to 32x32.
* ``path/to/arrays.npz`` — arrays ``images`` (N,H,W), (N,H,W,C) or (N,C,H,W) and ``labels`` (N,) or
  per-pixel (N,H,W).
* ``path/to/folder`` — ImageFolder layout: one sub-folder per class holding image files.
* ``synthetic:1,3,224,224`` — random inputs with zero labels, for latency only.
* ``fashion-mnist:DIR`` — Fashion-MNIST from the four original IDX files in ``DIR`` (gzip-compressed or
  not; the upstream repository's ``data/fashion`` and Debian's ``/usr/share/datasets/fashion-mnist``
  work as they are). The folder is the user's: nothing is downloaded or copied.

In Python, :meth:`ArrayDataset.from_arrays` wraps ``(images, labels)`` arrays; the trainer also takes any
map-style ``torch.utils.data.Dataset`` (see :mod:`onnxslim.training.batches`).

Images come out as float32 NCHW, scaled to [0, 1] and then normalised with the dataset's mean/std.
"""

from __future__ import annotations

import dataclasses
from importlib import resources
from pathlib import Path

import numpy as np

from onnxslim.errors import OnnxSlimError

MNIST_MEAN, MNIST_STD = 0.1307, 0.3081
_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}


@dataclasses.dataclass(frozen=True)
class ArrayDataset:
    """Preprocessed inputs ``images`` (N,C,H,W float32) and ``labels`` ((N,) or (N,H,W) int64)."""

    images: np.ndarray
    labels: np.ndarray
    num_classes: int
    name: str
    class_names: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if len(self.images) != len(self.labels):
            raise OnnxSlimError(f"{self.name}: {len(self.images)} images but {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.images)

    @property
    def is_segmentation(self) -> bool:
        return self.labels.ndim == 3

    def subset(self, count: int | None) -> ArrayDataset:
        """The first ``count`` samples (all when ``count`` is None)."""
        if count is None or count >= len(self):
            return self
        return dataclasses.replace(self, images=self.images[:count], labels=self.labels[:count])

    @classmethod
    def from_arrays(cls, images, labels, name: str = "arrays", num_classes: int | None = None) -> ArrayDataset:
        """Wrap user arrays (numpy or torch): ``images`` (N,H,W), (N,H,W,C) or (N,C,H,W) — uint8 is scaled to
        [0, 1], other dtypes are taken as preprocessed — and integer ``labels`` (N,) or (N,H,W).
        ``num_classes`` defaults to ``max(labels) + 1``. Raises OnnxSlimError on other shapes."""
        images, labels = np.asarray(images), np.asarray(labels)
        if labels.dtype.kind not in "iu":
            raise OnnxSlimError(f"{name}: labels must be integers, got {labels.dtype}")
        y = labels.astype(np.int64)
        classes = num_classes if num_classes is not None else (int(y.max()) + 1 if y.size else 0)
        return cls(_to_nchw_float(images, name), y, classes, name)

    def batches(self, batch_size: int):
        """Yield ``(images, labels)`` slices in order."""
        for start in range(0, len(self), batch_size):
            yield self.images[start:start + batch_size], self.labels[start:start + batch_size]


def load_mnist10k_raw() -> tuple[np.ndarray, np.ndarray]:
    """The bundled digits as stored: uint8 images (10000, 28, 28) and uint8 labels (10000,)."""
    with resources.files("onnxslim.datasets").joinpath("mnist10k.npz").open("rb") as handle:
        with np.load(handle) as arrays:
            return arrays["images"], arrays["labels"]


def mnist_split(size: int = 28, test_fraction: float = 0.2, seed: int = 0) -> tuple[ArrayDataset, ArrayDataset]:
    """Deterministic shuffled train/test split of MNIST-10k (the file is sorted by digit).

    ``size`` > 28 zero-pads the digits symmetrically (32 for CIFAR-style networks).
    """
    images, labels = load_mnist10k_raw()
    order = np.random.default_rng(seed).permutation(len(images))
    images, labels = images[order], labels[order]
    if size < 28:
        raise OnnxSlimError(f"mnist size must be >= 28, got {size}")
    check_dataset_size(f"mnist:{size}", len(images) * size * size * 4)
    if size > 28:
        before = (size - 28) // 2
        images = np.pad(images, ((0, 0), (before, size - 28 - before), (before, size - 28 - before)))
    x = ((images.astype(np.float32) / 255.0 - MNIST_MEAN) / MNIST_STD)[:, None]
    y = labels.astype(np.int64)
    n_test = int(round(len(x) * test_fraction))
    names = tuple(str(d) for d in range(10))
    train = ArrayDataset(x[n_test:], y[n_test:], 10, f"mnist10k-train({size}px)", names)
    test = ArrayDataset(x[:n_test], y[:n_test], 10, f"mnist10k-test({size}px)", names)
    return train, test


def load_npz(path: str | Path, mean: float | None = None, std: float | None = None) -> ArrayDataset:
    """Arrays ``images`` and ``labels`` from an ``.npz``; uint8 images are scaled to [0, 1].

    Raises OnnxSlimError for a file that is not an ``.npz`` of both arrays, images holding NaN or
    infinite values, or labels that are not class indices (integers, >= 0 for classification; float arrays
    of whole numbers are accepted; per-pixel labels outside [0, K) are ignored by the metrics).
    """
    path = Path(path)
    try:
        with np.load(path) as arrays:
            if "images" not in arrays or "labels" not in arrays:
                raise OnnxSlimError(f"{path}: expected arrays 'images' and 'labels', found {sorted(arrays)}")
            images, labels = arrays["images"], arrays["labels"]
    except (OSError, ValueError) as exc:
        raise OnnxSlimError(f"{path}: not a readable .npz file ({exc})") from None
    x = _to_nchw_float(images, path)
    if not np.isfinite(x).all():
        raise OnnxSlimError(f"{path}: images hold NaN or infinite values")
    if mean is not None and std is not None:
        x = (x - np.float32(mean)) / np.float32(std)
    whole = labels.dtype.kind in "iub" or (labels.dtype.kind == "f" and np.array_equal(labels, np.round(labels)))
    if not whole or (labels.ndim == 1 and labels.size and labels.min() < 0):  # per-pixel: < 0 is "ignore"
        raise OnnxSlimError(f"{path}: labels must be class indices (integers >= 0), got {labels.dtype} values "
                            f"from {labels.min() if labels.size else '-'} to {labels.max() if labels.size else '-'}")
    y = labels.astype(np.int64)
    num_classes = int(y.max()) + 1 if y.size else 0
    return ArrayDataset(x, y, num_classes, path.name)


def load_image_folder(path: str | Path, size: tuple[int, int] | None = None, grayscale: bool = False,
                      mean: float | None = None, std: float | None = None) -> ArrayDataset:
    """ImageFolder layout: ``path/<class>/<image>``; classes sorted by name, images resized to ``size``."""
    from PIL import Image  # pillow ships with matplotlib; only needed for this loader

    root = Path(path)
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not classes:
        raise OnnxSlimError(f"{root}: no class sub-folders (expected ImageFolder layout root/<class>/<image>)")
    images, labels = [], []
    for index, name in enumerate(classes):
        for file in sorted((root / name).iterdir()):
            if file.suffix.lower() not in _IMAGE_SUFFIXES:
                continue
            with Image.open(file) as img:
                img = img.convert("L" if grayscale else "RGB")
                if size is not None:
                    img = img.resize((size[1], size[0]), Image.BILINEAR)
                images.append(np.asarray(img))
            labels.append(index)
    if not images:
        raise OnnxSlimError(f"{root}: no image files found under the class folders")
    if len({a.shape for a in images}) > 1:
        raise OnnxSlimError(f"{root}: images have different sizes; pass a size to resize them")
    x = _to_nchw_float(np.stack(images), root)
    if mean is not None and std is not None:
        x = (x - np.float32(mean)) / np.float32(std)
    return ArrayDataset(x, np.asarray(labels, np.int64), len(classes), root.name, tuple(classes))


# ----------------------------------------------------------------------------------------------------
# Fashion-MNIST from the original IDX files

FASHION_MEAN, FASHION_STD = 0.2860, 0.3530  # over the 60,000 training images, pixels scaled to [0, 1]
FASHION_CLASS_NAMES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                       "Ankle boot")
FASHION_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
                 "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
_IDX_UBYTE = 0x08


def read_idx(path: str | Path) -> np.ndarray:
    """An IDX file (LeCun's MNIST format), gzip-compressed when it ends in ``.gz``, as a uint8 array.

    Format: big-endian magic ``0x0000 TT DD`` (TT = 0x08 for unsigned bytes, DD = number of dimensions),
    one big-endian uint32 per dimension, then the values in C order. Raises OnnxSlimError for another
    magic, a type other than uint8, a missing or short file (fewer values than the header states) or
    trailing bytes.
    """
    import gzip

    path = Path(path)
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as handle:
            raw = handle.read()
    except FileNotFoundError:
        raise OnnxSlimError(f"IDX file not found: {path}") from None
    except (OSError, EOFError) as exc:  # gzip raises BadGzipFile (an OSError) or EOFError when truncated
        raise OnnxSlimError(f"{path}: not a readable IDX file ({exc})") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise OnnxSlimError(f"{path}: not an IDX file (bad magic number)")
    if raw[2] != _IDX_UBYTE:
        raise OnnxSlimError(f"{path}: IDX value type 0x{raw[2]:02x} is not supported (only 0x08, unsigned bytes)")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if ndim == 0 or len(raw) < header:
        raise OnnxSlimError(f"{path}: IDX header is short ({len(raw)} bytes, {ndim} dimensions)")
    shape = tuple(int(d) for d in np.frombuffer(raw, ">u4", count=ndim, offset=4))
    expected = int(np.prod(shape))
    if len(raw) - header != expected:
        raise OnnxSlimError(f"{path}: the header says {'x'.join(map(str, shape))} = {expected} values but the file "
                            f"holds {len(raw) - header} (truncated or corrupt)")
    return np.frombuffer(raw, np.uint8, offset=header).reshape(shape)


def fashion_mnist_files(folder: str | Path, split: str) -> tuple[Path, Path]:
    """The (images, labels) IDX files of ``split`` (train or test) in ``folder`` or its ``data/fashion``.

    Each file may be gzip-compressed (``.gz``, as published) or not. Raises OnnxSlimError naming what is
    missing.
    """
    if split not in FASHION_FILES:
        raise OnnxSlimError(f"unknown split {split!r} (use train or test)")
    root = Path(folder)
    if not root.is_dir():
        raise OnnxSlimError(f"fashion-mnist: folder not found: {root}")
    candidates = [root, root / "data" / "fashion"]  # the folder itself, or a clone of the upstream repository
    found, missing = [], []
    for stem in FASHION_FILES[split]:
        for base in candidates:
            hit = next((base / (stem + ext) for ext in (".gz", "") if (base / (stem + ext)).is_file()), None)
            if hit is not None:
                found.append(hit)
                break
        else:
            missing.append(stem + "[.gz]")
    if missing:
        raise OnnxSlimError(f"fashion-mnist: {root} lacks {', '.join(missing)} (expected the four original IDX "
                            f"files, e.g. Debian's /usr/share/datasets/fashion-mnist)")
    return found[0], found[1]


def load_fashion_mnist(folder: str | Path, split: str = "test") -> ArrayDataset:
    """One split of Fashion-MNIST (Xiao, Rasul, Vollgraf 2017) read from the user's ``folder``.

    Train: 60,000 images, test (``t10k``): 10,000; images (N, 1, 28, 28) float32, scaled to [0, 1] and
    normalised with :data:`FASHION_MEAN` / :data:`FASHION_STD`; labels (N,) int64 in 0-9
    (:data:`FASHION_CLASS_NAMES`). Raises OnnxSlimError for missing, short or inconsistent files.
    """
    image_file, label_file = fashion_mnist_files(folder, split)
    images, labels = read_idx(image_file), read_idx(label_file)
    if images.ndim != 3 or labels.ndim != 1:
        raise OnnxSlimError(f"fashion-mnist: {image_file.name} must be (N, H, W) and {label_file.name} (N,), got "
                            f"{images.shape} and {labels.shape}")
    if len(images) != len(labels):
        raise OnnxSlimError(f"fashion-mnist: {image_file.name} holds {len(images)} images but {label_file.name} "
                            f"{len(labels)} labels")
    if labels.size and int(labels.max()) >= len(FASHION_CLASS_NAMES):
        raise OnnxSlimError(f"fashion-mnist: {label_file.name} has label {int(labels.max())}; expected 0-9")
    x = ((images.astype(np.float32) / np.float32(255.0) - np.float32(FASHION_MEAN)) / np.float32(FASHION_STD))[:, None]
    return ArrayDataset(np.ascontiguousarray(x), labels.astype(np.int64), len(FASHION_CLASS_NAMES),
                        f"fashion-mnist-{split}", FASHION_CLASS_NAMES)


def synthetic(shape: tuple[int, ...], seed: int = 0) -> ArrayDataset:
    """Random normal inputs of ``shape`` (N,C,H,W) with zero labels: for latency measurements only."""
    x = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    return ArrayDataset(x, np.zeros(shape[0], np.int64), 1, "synthetic")


#: the most bytes a dataset built from a spec (mnist:SIZE, mnistseg:SIZE, synthetic:N,C,H,W) may take
MAX_DATASET_BYTES = 4 << 30


def check_dataset_size(spec: str, nbytes: int) -> None:
    """Refuse (:class:`OnnxSlimError`) a dataset spec whose arrays would take more than
    :data:`MAX_DATASET_BYTES` (``mnist:999999`` would ask for petabytes)."""
    if nbytes > MAX_DATASET_BYTES:
        raise OnnxSlimError(f"dataset {spec} would take {nbytes / (1 << 30):.3g} GiB of memory "
                            f"(at most {MAX_DATASET_BYTES >> 30} GiB); use a smaller size")


def load_dataset(spec: str, split: str = "test", seed: int = 0) -> ArrayDataset:
    """Resolve a dataset spec string: ``mnist``, ``mnist:32``, ``mnistseg``, ``mnistseg:SIZE``,
    ``fashion-mnist:DIR``, ``synthetic:N,C,H,W``, ``x.npz`` or a folder."""
    if spec in ("fashion-mnist", "fashion_mnist") or spec.startswith(("fashion-mnist:", "fashion_mnist:")):
        folder = spec.split(":", 1)[1] if ":" in spec else ""
        if not folder:
            raise OnnxSlimError("fashion-mnist needs its folder: fashion-mnist:DIR (the four IDX files)")
        return load_fashion_mnist(folder, split)
    if _is_mnistseg_spec(spec):
        return load_mnistseg(spec, split, seed)
    if spec == "mnist" or spec.startswith("mnist:"):
        try:
            size = int(spec.split(":", 1)[1]) if ":" in spec else 28
        except ValueError:
            raise OnnxSlimError(f"bad mnist spec {spec!r}; expected mnist or mnist:SIZE") from None
        train, test = mnist_split(size=size, seed=seed)
        if split not in ("train", "test"):
            raise OnnxSlimError(f"unknown split {split!r} (use train or test)")
        return train if split == "train" else test
    if spec.startswith("synthetic:"):
        try:
            shape = tuple(int(v) for v in spec.split(":", 1)[1].split(","))
        except ValueError:
            raise OnnxSlimError(f"bad synthetic spec {spec!r}; expected synthetic:N,C,H,W") from None
        if any(v < 1 for v in shape):
            raise OnnxSlimError(f"bad synthetic spec {spec!r}; every dim must be >= 1")
        check_dataset_size(spec, int(np.prod(shape, dtype=object)) * 4)
        return synthetic(shape, seed)
    path = Path(spec)
    if not path.exists():
        raise OnnxSlimError(f"dataset not found: {spec} (use mnist, mnist:32, mnistseg, fashion-mnist:DIR, synthetic:N,C,H,W, an .npz or a folder)")
    if path.is_dir():
        return load_image_folder(path)
    return load_npz(path)


def _to_nchw_float(images: np.ndarray, source: object) -> np.ndarray:
    if images.ndim == 3:
        images = images[:, None]
    elif images.ndim == 4 and images.shape[-1] in (1, 3, 4) and images.shape[1] not in (1, 3, 4):
        images = images.transpose(0, 3, 1, 2)
    elif images.ndim != 4:
        raise OnnxSlimError(f"{source}: images must be (N,H,W), (N,H,W,C) or (N,C,H,W), got {images.shape}")
    if images.dtype == np.uint8:
        return np.ascontiguousarray(images, dtype=np.float32) / np.float32(255.0)
    return np.ascontiguousarray(images, dtype=np.float32)


# ----------------------------------------------------------------------------------------------------
# MNIST segmentation: real digits composited onto a larger canvas, one class per digit plus background

MNISTSEG_CLASS_NAMES = ("background",) + tuple(str(d) for d in range(10))


@dataclasses.dataclass(frozen=True)
class DigitPlacement:
    """One digit pasted on a canvas: pool index, its digit class, top-left corner (y, x) of the 28x28 patch."""

    image: int
    pool_index: int
    digit: int
    y: int
    x: int


def mnist_digit_pools(test_fraction: float = 0.2, seed: int = 0) -> tuple[tuple[np.ndarray, np.ndarray],
                                                                            tuple[np.ndarray, np.ndarray]]:
    """The uint8 digits and labels of :func:`mnist_split`'s train and test sets (same order, same split)."""
    images, labels = load_mnist10k_raw()
    order = np.random.default_rng(seed).permutation(len(images))  # exactly mnist_split's shuffle
    images, labels = images[order], labels[order]
    n_test = int(round(len(images) * test_fraction))
    return (images[n_test:], labels[n_test:]), (images[:n_test], labels[:n_test])


def compose_digit_canvases(digits: np.ndarray, digit_labels: np.ndarray, count: int, size: int = 64,
                           digits_per_image: tuple[int, int] = (2, 3), ink_threshold: float = 0.5,
                           seed: int = 0, attempts: int = 30) -> tuple[np.ndarray, np.ndarray, list[DigitPlacement]]:
    """Paste 28x28 uint8 ``digits`` onto ``count`` blank ``size`` x ``size`` canvases.

    Each canvas gets between ``digits_per_image[0]`` and ``digits_per_image[1]`` (inclusive) digits drawn
    uniformly from the pool. A digit's corner is drawn uniformly; up to ``attempts`` corners are tried and
    the first whose *ink box* (the bounding box of its pixels >= the ink threshold) does not intersect the
    ink boxes already placed is taken, else the one with the smallest intersection ("non-overlapping-ish").
    Canvas pixels are the maximum of the pasted patches. Labels: 0 (background) where the canvas is below
    ``ink_threshold * 255``; elsewhere ``1 + digit`` of the digit with the largest ink value at that pixel
    (the earlier digit on ties). Returns canvases uint8 (N, size, size), labels int64 (N, size, size) and
    the placements. Deterministic in ``seed``.
    """
    if size < 28:
        raise OnnxSlimError(f"mnist segmentation canvas must be at least 28 pixels, got {size}")
    check_dataset_size(f"mnistseg:{size}", count * size * size * (1 + 8 + 4))  # canvas, labels, float image
    low, high = digits_per_image
    if not 1 <= low <= high:
        raise OnnxSlimError(f"digits per image must satisfy 1 <= min <= max, got {digits_per_image}")
    if not 0.0 < ink_threshold <= 1.0:
        raise OnnxSlimError(f"ink threshold must be in (0, 1], got {ink_threshold}")
    if len(digits) == 0:
        raise OnnxSlimError("no digits to compose")
    threshold = ink_threshold * 255.0
    ink = digits >= threshold
    rows, cols = ink.any(axis=2), ink.any(axis=1)  # (N, 28) each: ink present in a row / a column

    def ink_box(index: int) -> tuple[int, int, int, int]:  # (top, left, bottom, right), end exclusive
        r, c = np.flatnonzero(rows[index]), np.flatnonzero(cols[index])
        if len(r) == 0:
            return 0, 0, 0, 0
        return int(r[0]), int(c[0]), int(r[-1]) + 1, int(c[-1]) + 1

    rng = np.random.default_rng(seed)
    canvases = np.zeros((count, size, size), np.uint8)
    labels = np.zeros((count, size, size), np.int64)
    placements: list[DigitPlacement] = []
    span = size - 28 + 1
    for n in range(count):
        best_ink = np.zeros((size, size), np.uint8)
        boxes: list[tuple[int, int, int, int]] = []
        for _ in range(int(rng.integers(low, high + 1))):
            index = int(rng.integers(len(digits)))
            top, left, bottom, right = ink_box(index)
            best, best_overlap = (0, 0), None
            for _ in range(attempts):
                y, x = int(rng.integers(span)), int(rng.integers(span))
                box = (y + top, x + left, y + bottom, x + right)
                overlap = sum(max(0, min(box[2], b[2]) - max(box[0], b[0])) * max(0, min(box[3], b[3]) - max(box[1], b[1]))
                              for b in boxes)
                if best_overlap is None or overlap < best_overlap:
                    best, best_overlap = (y, x), overlap
                if overlap == 0:
                    break
            y, x = best
            boxes.append((y + top, x + left, y + bottom, x + right))
            patch = digits[index]
            window = (slice(y, y + 28), slice(x, x + 28))
            take = (patch >= threshold) & (patch > best_ink[window])
            labels[n][window][take] = int(digit_labels[index]) + 1
            best_ink[window] = np.maximum(best_ink[window], patch)
            placements.append(DigitPlacement(n, index, int(digit_labels[index]), y, x))
        canvases[n] = best_ink
    return canvases, labels, placements


def mnistseg_split_seed(seed: int, split: str) -> int:
    """The composition seed of one split of :func:`mnist_segmentation` (independent streams per split)."""
    return int(np.random.default_rng([seed, ("train", "test").index(split)]).integers(2 ** 62))


def mnist_segmentation(size: int = 64, train_images: int = 4000, test_images: int = 1000,
                       digits_per_image: tuple[int, int] = (2, 3), ink_threshold: float = 0.5,
                       test_fraction: float = 0.2, seed: int = 0) -> tuple[ArrayDataset, ArrayDataset]:
    """Segmentation data from real digits: MNIST-10k digits composited onto ``size`` x ``size`` canvases.

    Train canvases use only digits of :func:`mnist_split`'s train set and test canvases only digits of its
    test set (the same deterministic split, ``test_fraction`` and ``seed``), so no digit is shared.
    Per-pixel classes (11): 0 background, ``d + 1`` for digit ``d`` where its ink is >= ``ink_threshold``
    (see :func:`compose_digit_canvases`). Images are scaled to [0, 1] and normalised with the MNIST mean/std,
    shape (N, 1, size, size) float32; labels (N, size, size) int64. Deterministic in ``seed``.
    """
    (train_digits, train_labels), (test_digits, test_labels) = mnist_digit_pools(test_fraction, seed)
    out = []
    for split, digits, digit_labels, count in (("train", train_digits, train_labels, train_images),
                                               ("test", test_digits, test_labels, test_images)):
        canvases, labels, _ = compose_digit_canvases(digits, digit_labels, count, size, digits_per_image,
                                                     ink_threshold, seed=mnistseg_split_seed(seed, split))
        x = ((canvases.astype(np.float32) / np.float32(255.0) - np.float32(MNIST_MEAN)) / np.float32(MNIST_STD))[:, None]
        name = f"mnistseg-{split}({size}px)"
        out.append(ArrayDataset(np.ascontiguousarray(x), labels, len(MNISTSEG_CLASS_NAMES), name, MNISTSEG_CLASS_NAMES))
    return out[0], out[1]


def _is_mnistseg_spec(spec: str) -> bool:
    return spec in ("mnistseg", "mnist-seg") or spec.startswith(("mnistseg:", "mnist-seg:"))


def load_mnistseg(spec: str, split: str = "test", seed: int = 0) -> ArrayDataset:
    """``mnistseg`` / ``mnistseg:SIZE`` (also spelled ``mnist-seg``): one split of :func:`mnist_segmentation`."""
    if split not in ("train", "test"):
        raise OnnxSlimError(f"unknown split {split!r} (use train or test)")
    size = 64
    if ":" in spec:
        try:
            size = int(spec.split(":", 1)[1])
        except ValueError:
            raise OnnxSlimError(f"bad mnist segmentation spec {spec!r}; expected mnistseg or mnistseg:SIZE") from None
    train, test = mnist_segmentation(size=size, seed=seed)
    return train if split == "train" else test

