"""Writing results without ever losing one: atomic writes, and files that cannot be read
moved aside (never overwritten) with a name that says why."""
from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Callable, Union

PathLike = Union[str, os.PathLike]


def atomic_write(path: PathLike, write: Callable[[str], None]) -> Path:
    """Calls ``write(temporary_path)`` on a file beside ``path``, then renames it to ``path``: a
    crash or Ctrl-C mid-write leaves the previous file (or none), never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}-")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; results are as readable as any file
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def atomic_write_text(path: PathLike, text: str) -> Path:
    """:func:`atomic_write` of ``text``; returns the path."""

    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.write(text)

    return atomic_write(path, write)


def move_aside(path: PathLike, why: str) -> Path:
    """Renames an unreadable ``path`` to ``<path>.<why>-<UTC time>`` (kept for inspection,
    out of the way of the file that replaces it) and returns the new name."""
    path = Path(path)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    target = path.with_name(f"{path.name}.{why}-{stamp}")
    n = 1
    while target.exists():
        n += 1
        target = path.with_name(f"{path.name}.{why}-{stamp}-{n}")
    os.replace(path, target)
    return target


def check_writable_folder(folder: PathLike, files: tuple = ()) -> Path:
    """Creates ``folder`` if needed and makes sure files can be written in it, and that none
    of ``files`` (names inside it) is a folder; raises OSError naming the problem otherwise."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise NotADirectoryError(f"{folder} exists and is not a folder")
    folder.mkdir(parents=True, exist_ok=True)
    fd, probe = tempfile.mkstemp(dir=folder, prefix=".convkit-write-test-")
    os.close(fd)
    os.remove(probe)
    for name in files:
        if (folder / name).is_dir():
            raise IsADirectoryError(f"{folder / name} is a folder, not a file: move it away")
    return folder
