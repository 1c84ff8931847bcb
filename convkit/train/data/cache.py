"""The data cache: each data set once as ``<cache>/<name>.npz`` (uncompressed, with the
sha256 of every array), so later loads take a few tens of milliseconds."""
from __future__ import annotations

import hashlib
import os
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Optional, Union

import numpy as np

from convkit.train.data.checks import Facts, check_layout
from convkit.train.files import move_aside

PathLike = Union[str, os.PathLike]

__all__ = ["CACHE_VERSION", "cache_dir", "cache_file", "save_cache", "load_cache"]

# Bumped when the cache layout changes, so an old cache is rebuilt instead of misread.
# Version 2 stores the sha256 of every array, checked at every load.
CACHE_VERSION = 2


def cache_dir() -> Path:
    """Where downloaded and converted data live: ``$CONVKIT_DATA`` or ``~/.cache/convkit``."""
    override = os.environ.get("CONVKIT_DATA")
    if override:
        return Path(override).expanduser()
    return Path.home() / ".cache" / "convkit"


def _sha256(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()


def cache_file(name: str, root: Optional[Path] = None) -> Path:
    """Where data set ``name`` is cached (under ``root``, else :func:`cache_dir`)."""
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
    path = cache_file(name, Path(root) if root is not None else None)
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


def load_cache(name: str, facts: Facts) -> Optional[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, str]]:
    """The cached arrays and 'cache <path> (<where they came from>)', or None when there is
    no cache (or one of an older layout, rebuilt). A cache that cannot be read, or whose
    arrays are not what was written (their sha256) or not of the data set's layout, is moved
    aside with a message, and None returned: the data set is fetched again."""
    path = cache_file(name)
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
