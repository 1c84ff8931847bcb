"""What a correct copy of a data set must satisfy (:class:`Facts`), and the checks every
source and every cache load goes through."""
from __future__ import annotations

import dataclasses
import hashlib
from typing import Optional

import numpy as np

__all__ = ["Facts", "check_arrays", "check_layout"]


@dataclasses.dataclass(frozen=True)
class Facts:
    """What a correct copy of a data set must satisfy.

    sha256 of the training / test pixel arrays ([N, 784] uint8, row-major, the data set's
    own order; None: not checked), the number of images per class, and the images' size.
    """

    train_sha256: Optional[str]
    test_sha256: Optional[str]
    train_counts: tuple[int, ...]
    test_counts: tuple[int, ...]
    image_shape: tuple[int, int] = (28, 28)


def check_arrays(
    train_x: np.ndarray,
    train_y: np.ndarray,
    test_x: np.ndarray,
    test_y: np.ndarray,
    facts: Facts,
    check_order: bool = True,
) -> None:
    """Raise ValueError unless the arrays match ``facts`` (types, shapes and class counts
    always; the sha256 of the pixel bytes when ``check_order``, i.e. when the source keeps the
    original order)."""
    check_layout(train_x, train_y, test_x, test_y, facts)
    for name, labels, counts in (("train", train_y, facts.train_counts), ("test", test_y, facts.test_counts)):
        found = tuple(int(c) for c in np.bincount(labels, minlength=len(counts)))
        if found != tuple(counts):
            raise ValueError(f"{name} class counts {list(found)} differ from the expected {list(counts)}")
    if not check_order:
        return
    for name, images, digest in (("train", train_x, facts.train_sha256), ("test", test_x, facts.test_sha256)):
        if digest is None:
            continue
        found = hashlib.sha256(np.ascontiguousarray(images, dtype=np.uint8).tobytes()).hexdigest()
        if found != digest:
            raise ValueError(f"sha256 of the {name} images is {found}, expected {digest}")


def check_layout(
    train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray, facts: Facts
) -> None:
    """Raise ValueError unless the images are uint8 [N, H, W] of the data set's size and the
    labels uint8/int [N] of its classes."""
    classes = len(facts.train_counts)
    for name, images, labels in (("train", train_x, train_y), ("test", test_x, test_y)):
        if images.dtype != np.uint8 or images.ndim != 3 or tuple(images.shape[1:]) != facts.image_shape:
            raise ValueError(
                f"{name} images are {images.dtype} of shape {list(images.shape)}, expected uint8 "
                f"[N, {facts.image_shape[0]}, {facts.image_shape[1]}]"
            )
        if labels.ndim != 1 or len(labels) != len(images) or not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(
                f"{name} labels are {labels.dtype} of shape {list(labels.shape)}, expected "
                f"{len(images)} integers"
            )
        if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= classes):
            raise ValueError(f"{name} labels outside 0-{classes - 1}")
