"""The file formats MNIST copies come in, read into uint8 numpy arrays: IDX files (gzipped or
not), fastai's ``mnist_png`` folders, and the classic ``mnist.pkl.gz`` pickle (read without
running any code it names)."""
from __future__ import annotations

import gzip
import io
import os
import pickle
import zlib
from pathlib import Path
from typing import Optional, Union

import numpy as np

PathLike = Union[str, os.PathLike]

__all__ = [
    "IDX_NAMES",
    "read_idx",
    "read_idx_folder",
    "read_png_folder",
    "png_folder_is_ordered",
    "read_mnist_pickle",
]

# The IDX file names inside a folder: (training images, training labels, test images, test labels).
IDX_NAMES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)


def read_idx(path: PathLike) -> np.ndarray:
    """An IDX file (gzipped when its name ends in .gz) as a numpy array.

    Only unsigned-byte data (type code 0x08) is accepted: MNIST's images [N, 28, 28] and
    labels [N] are stored that way.
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (EOFError, gzip.BadGzipFile, zlib.error) as error:
        raise ValueError(f"{path}: truncated or not a gzip file ({error})") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise ValueError(f"{path}: not an IDX file (bad magic number)")
    type_code, n_dims = data[2], data[3]
    if type_code != 0x08:
        raise ValueError(f"{path}: IDX type code {type_code:#04x}, expected 0x08 (unsigned byte)")
    header_end = 4 + 4 * n_dims
    if len(data) < header_end:
        raise ValueError(f"{path}: IDX header truncated")
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(n_dims))
    expected = int(np.prod(shape)) if shape else 0
    if len(data) - header_end != expected:
        raise ValueError(
            f"{path}: IDX header promises {expected} bytes of shape {shape}, "
            f"file holds {len(data) - header_end}"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header_end).reshape(shape).copy()


def _find_idx(folder: Path, stem: str) -> Optional[Path]:
    for name in (stem, stem + ".gz"):
        candidate = folder / name
        if candidate.is_file():
            return candidate
    # Some copies use a dot before "idx" (train-images.idx3-ubyte).
    dotted = stem.replace("-idx", ".idx")
    for name in (dotted, dotted + ".gz"):
        candidate = folder / name
        if candidate.is_file():
            return candidate
    return None


def read_idx_folder(folder: PathLike) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The four IDX files of an MNIST-format folder: train_x [N, 28, 28], train_y [N],
    test_x [M, 28, 28], test_y [M] (all uint8)."""
    folder = Path(folder)
    paths = []
    for stem in IDX_NAMES:
        found = _find_idx(folder, stem)
        if found is None:
            raise FileNotFoundError(f"{folder}: no {stem} (or {stem}.gz)")
        paths.append(found)
    arrays = [read_idx(p) for p in paths]
    train_x, train_y, test_x, test_y = arrays
    if train_x.ndim != 3 or test_x.ndim != 3 or train_y.ndim != 1 or test_y.ndim != 1:
        raise ValueError(f"{folder}: expected images [N, H, W] and labels [N] in the IDX files")
    if len(train_x) != len(train_y) or len(test_x) != len(test_y):
        raise ValueError(f"{folder}: the numbers of images and labels differ")
    return train_x, train_y, test_x, test_y


def read_png_folder(folder: PathLike) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """fastai's ``mnist_png`` layout: ``{training,testing}/<digit>/*.png``.

    Returns train_x [N, 28, 28], train_y [N], test_x [M, 28, 28], test_y [M] (uint8). fastai
    names each file by its index in MNIST (``training/3/12.png`` is training image 12), so
    numeric names are sorted across digits, which restores MNIST's own order; other names
    sort by digit, then name.
    """
    from PIL import Image  # matplotlib depends on Pillow; only this reader needs it

    folder = Path(folder)
    result = []
    for split in ("training", "testing"):
        split_dir = folder / split
        if not split_dir.is_dir():
            raise FileNotFoundError(f"{folder}: no {split}/ folder")
        entries = []
        for digit in range(10):
            digit_dir = split_dir / str(digit)
            if digit_dir.is_dir():
                entries.extend((png, digit) for png in digit_dir.glob("*.png"))
        if not entries:
            raise FileNotFoundError(f"{split_dir}: no <digit>/*.png files")
        if all(png.stem.isdigit() for png, _ in entries):
            entries.sort(key=lambda entry: int(entry[0].stem))
        else:
            entries.sort(key=lambda entry: (entry[1], entry[0].name))
        images = []
        for png, _ in entries:
            with Image.open(png) as image:
                images.append(np.asarray(image.convert("L"), dtype=np.uint8))
        result.append(np.stack(images))
        result.append(np.asarray([digit for _, digit in entries], dtype=np.uint8))
    return result[0], result[1], result[2], result[3]


def png_folder_is_ordered(folder: PathLike) -> bool:
    """Whether the png files of both splits are named 0..N-1 (fastai's layout, which keeps
    MNIST's order, so the order-sensitive sha256 can be checked)."""
    folder = Path(folder)
    for split in ("training", "testing"):
        stems = [p.stem for p in (folder / split).glob("*/*.png")]
        if not all(s.isdigit() for s in stems):
            return False
        if sorted(int(s) for s in stems) != list(range(len(stems))):
            return False
    return True


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays, tuples and lists only: the pickle comes from a download, and
    a general unpickler would run whatever code it names."""

    _allowed = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) in self._allowed:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name}")


def read_mnist_pickle(data: bytes) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The classic ``mnist.pkl.gz`` (gzipped pickle of (train 50k, valid 10k, test 10k), each
    (float32 [n, 784] = byte/256, int labels [n])) as exact bytes.

    Returns train_x [60000, 28, 28] (train then valid: MNIST's own 60k training images),
    train_y [60000], test_x [10000, 28, 28], test_y [10000], all uint8.
    """
    raw = gzip.decompress(data)
    # The pickle was written by Python 2: its byte strings decode as latin1.
    splits = _ArrayUnpickler(io.BytesIO(raw), encoding="latin1").load()
    if len(splits) != 3:
        raise ValueError(f"expected (train, valid, test) in the pickle, got {len(splits)} parts")

    def to_bytes(x: np.ndarray) -> np.ndarray:
        scaled = np.asarray(x, dtype=np.float64) * 256.0
        rounded = np.rint(scaled)
        # byte/256 is exact in float32, so anything off the integers is not that data.
        if not np.array_equal(scaled, rounded) or rounded.min() < 0 or rounded.max() > 255:
            raise ValueError("pickle pixels are not exact multiples of 1/256 in [0, 255/256]")
        return rounded.astype(np.uint8).reshape(-1, 28, 28)

    (train_x, train_y), (valid_x, valid_y), (test_x, test_y) = splits
    train = np.concatenate([to_bytes(train_x), to_bytes(valid_x)])
    labels = np.concatenate([np.asarray(train_y), np.asarray(valid_y)]).astype(np.uint8)
    return train, labels, to_bytes(test_x), np.asarray(test_y).astype(np.uint8)
