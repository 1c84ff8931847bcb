"""``results.json``, the record of every run made into an output folder: reading it (and
refusing one of another shape), adding an entry, writing it atomically; and each run
folder's ``tables.txt``.

The file is ``{"experiments": [entry, ...], "environment": {...}}``; an entry is one
experiment on one backend, data set and seed (see :func:`entry_key`).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from convkit.train.files import atomic_write_text

__all__ = [
    "ResultsError",
    "entry_key",
    "load_results",
    "run_folder_name",
    "store_entry",
    "validate_results",
    "write_results",
    "write_tables",
]


class ResultsError(ValueError):
    """A results.json that cannot be read or is not of the shape this module writes."""


# The fields every experiment entry has, and their types (the report reads them).
_ENTRY_FIELDS = {"id": int, "backend": str, "dataset": str, "seed": int}


def validate_results(results: Any, path: Path) -> dict:
    """``results`` if it is ``{"experiments": [entry, ...]}`` with every entry's fields of
    the right types (epochs a list of records, final_accuracy a number or None); else
    ResultsError naming the first problem."""
    if not isinstance(results, dict) or not isinstance(results.get("experiments"), list):
        raise ResultsError(f"{path} is not a convkit results file (expected an object with an "
                           f"\"experiments\" list)")
    for i, entry in enumerate(results["experiments"]):
        where = f"{path}: experiment entry {i}"
        if not isinstance(entry, dict):
            raise ResultsError(f"{where} is {type(entry).__name__}, expected an object")
        for field, kind in _ENTRY_FIELDS.items():
            value = entry.get(field)
            if not isinstance(value, kind) or isinstance(value, bool):
                raise ResultsError(f"{where}: {field!r} is {value!r}, expected {kind.__name__}")
        epochs = entry.get("epochs", [])
        if not isinstance(epochs, list) or not all(isinstance(r, dict) for r in epochs):
            raise ResultsError(f"{where}: 'epochs' is not a list of epoch records")
        accuracy = entry.get("final_accuracy")
        if accuracy is not None and (not isinstance(accuracy, (int, float)) or isinstance(accuracy, bool)):
            raise ResultsError(f"{where}: 'final_accuracy' is {accuracy!r}, expected a number")
    return results


def load_results(path: Path) -> dict:
    """results.json as written by :func:`convkit.experiments.runner.run` (``{"experiments": []}`` when there is none).
    Raises ResultsError when it cannot be read or parsed, or is not of that shape."""
    path = Path(path)
    if not path.exists():
        return {"experiments": []}
    try:
        results = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise ResultsError(f"{path} cannot be read as JSON ({error})") from None
    return validate_results(results, path)


def entry_key(entry: dict) -> tuple:
    """What tells entries apart: (id, variant, backend, dataset, seed, quick). A new entry
    replaces the stored one with the same key."""
    return (entry["id"], entry.get("variant", ""), entry["backend"], entry["dataset"],
            entry["seed"], bool(entry.get("quick", False)))


def store_entry(results: dict, entry: dict) -> None:
    """Put ``entry`` into ``results`` in place of the one with its key, keeping the entries
    sorted by data set, quick, seed, id, variant and backend."""
    key = entry_key(entry)
    kept = [e for e in results["experiments"] if entry_key(e) != key]
    kept.append(entry)
    kept.sort(key=lambda e: (e["dataset"], bool(e.get("quick")), e["seed"], e["id"], e.get("variant", ""), e["backend"]))
    results["experiments"] = kept


def write_results(results: dict, path: Path) -> None:
    """Write ``results`` to ``path`` as JSON, atomically."""
    atomic_write_text(path, json.dumps(results, indent=1))


def run_folder_name(dataset: str, backend: str, seed: int, quick: bool) -> str:
    """The folder of one run (data set, backend, seed) inside the output folder."""
    return f"{dataset}-{backend}-seed{seed}" + ("-quick" if quick else "")


def write_tables(out: Path, results: dict) -> list[Path]:
    """``<run folder>/tables.txt`` for every run in ``results``: each experiment's epoch
    table as printed (or its error / checks)."""
    runs: dict[str, list[dict]] = {}
    for e in results["experiments"]:
        name = run_folder_name(e["dataset"], e["backend"], e["seed"], bool(e.get("quick")))
        runs.setdefault(name, []).append(e)
    written = []
    for name, entries in runs.items():
        blocks = []
        for e in entries:
            label = f"Experiment {e['id']}" + (f" ({e['variant']})" if e.get("variant") else "")
            body = e.get("table") or e.get("error") or json.dumps(e.get("checks", {}))
            blocks.append(f"{label}: {e.get('title', '')}\n{body}\n")
        path = atomic_write_text(Path(out) / name / "tables.txt", "\n".join(blocks))
        written.append(path)
    return written
