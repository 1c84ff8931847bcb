"""``python -m convkit chapter13``: every chosen experiment of :mod:`convkit.experiments.chapter13`
for every backend and seed, into one output folder.

Per run (data set, backend, seed) the output folder gets a sub-folder with the figures,
the epoch tables and checkpoints; ``results.json`` and ``report.md`` at the top gather every
run made into that folder, so a convkit run and a torch run fill both columns of one report.
"""
from __future__ import annotations

import ctypes
import dataclasses
import datetime
import gc
import os
import platform
import sys
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
import torch.distributed

import convkit
from convkit.experiments.chapter13 import EXPERIMENTS, Experiment, run_batch_size_one, run_edges, run_training
from convkit.experiments.models import BACKENDS
from convkit.experiments.report import write_report
from convkit.experiments.results import (
    ResultsError,
    entry_key,
    load_results,
    run_folder_name,
    store_entry,
    write_results,
    write_tables,
)
from convkit.train.data.datasets import (
    Dataset,
    describe,
    load_fashion_mnist,
    load_fashion_mnist_sample,
    load_mnist,
    load_mnist_sample,
)
from convkit.train.distributed import barrier, is_main
from convkit.train.files import check_writable_folder, move_aside

__all__ = ["RunConfig", "OutputError", "run", "run_dir"]


@dataclasses.dataclass
class RunConfig:
    """What ``python -m convkit chapter13`` was asked to do."""

    experiments: Sequence[int] = (1, 2, 3, 4, 5, 6, 7, 8)
    backends: Sequence[str] = ("convkit",)
    seeds: Sequence[int] = (0,)
    dataset: str = "mnist"
    out: Path = Path("chapter13-out")
    quick: bool = False
    resume: bool = False
    data_folder: Optional[Path] = None
    progress: Optional[bool] = None
    log: Callable[[str], None] = print


# Sizes of the --quick subsets: enough for every loader to have a few batches.
QUICK_TRAIN, QUICK_VALID = 640, 256
QUICK_SAMPLE_TRAIN, QUICK_SAMPLE_VALID = 256, 128
QUICK_MAX_BATCH = 64


def _load_data(config: RunConfig) -> dict[str, Dataset]:
    """The two data sets the experiments use: "full" and its two-class "sample". Under
    torchrun rank 0 fetches and caches them first, then the others read the cache."""
    if not is_main():
        barrier()
    datasets = _fetch_data(config)
    if is_main():
        barrier()
    return datasets


def _fetch_data(config: RunConfig) -> dict[str, Dataset]:
    if config.dataset == "mnist":
        full = load_mnist(config.data_folder, verbose=True)
        sample = load_mnist_sample(full)
    elif config.dataset == "fashion_mnist":
        full = load_fashion_mnist(config.data_folder)
        sample = load_fashion_mnist_sample(full)
    else:
        raise ValueError(f"unknown dataset {config.dataset!r}; expected mnist or fashion_mnist")
    if config.quick:
        full = full.subset(QUICK_TRAIN, QUICK_VALID)
        sample = sample.subset(QUICK_SAMPLE_TRAIN, QUICK_SAMPLE_VALID)
    return {"full": full, "sample": sample}


def run_dir(config: RunConfig, backend: str, seed: int) -> Path:
    """Where one run's figures, tables and checkpoints go."""
    return Path(config.out) / run_folder_name(config.dataset, backend, seed, config.quick)


def _batch_size(exp: Experiment, config: RunConfig) -> int:
    if config.quick:
        return min(exp.batch_size, QUICK_MAX_BATCH)
    return exp.batch_size


def _environment() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "torch": torch.__version__,
        "convkit": convkit.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "cpu": cpu,
        "cpu_kernels": convkit.cpu_capability(),
        "cpu_count": os.cpu_count(),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
    }


def _release_memory() -> None:
    """Hand freed memory back to the system between experiments. glibc keeps the large
    blocks a bs-512 epoch frees (about 0.5 GB per experiment here) in its heap, so a full
    run would otherwise grow to several GB without holding any of it."""
    gc.collect()
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass  # not glibc (musl, ...): nothing to trim


def _silent(line: str) -> None:
    """The log of the processes other than rank 0."""


class OutputError(OSError):
    """An output folder that cannot take the results."""


def run(config: RunConfig) -> dict:
    """Run the chosen experiments for every backend and seed; write figures, tables,
    ``results.json`` and ``report.md`` under ``config.out``. Returns the results.

    ``results.json`` is rewritten after every experiment, so an interrupted command keeps
    what it finished; with ``config.resume`` those experiments are skipped and the one
    interrupted continues from its last completed epoch (its checkpoint).
    """
    main = is_main()
    # Under torchrun only rank 0 prints and writes; every process trains.
    log = config.log if main else _silent
    for backend in config.backends:
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
    known = {e.id for e in EXPERIMENTS}
    for exp_id in config.experiments:
        if exp_id not in known:
            raise ValueError(f"unknown experiment {exp_id}; chapter 13 has {sorted(known)}")
    out = Path(config.out)
    # Before any work: an output folder that cannot take the results would lose them after
    # training.
    if main:
        try:
            check_writable_folder(out, files=("results.json", "report.md"))
        except OSError as error:
            raise OutputError(f"--out {out} cannot hold the results: {error}") from None
    results_path = out / "results.json"
    if not main:
        barrier()  # rank 0 has read (or moved aside) results.json: --resume skips alike
    try:
        results = load_results(results_path)
    except ResultsError as error:
        if main:
            moved = move_aside(results_path, "unreadable")
            log(f"convkit: {error}; moved it to {moved} and starting a new {results_path.name}")
        results = {"experiments": []}
    if main:
        barrier()
    datasets = _load_data(config)
    log(describe(datasets["full"]))
    environment = _environment()
    processes = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    if processes > 1:
        environment["processes"] = processes
        log(f"data-parallel on {processes} processes ({torch.distributed.get_backend()}): each "
            "training batch is split evenly between them")
    results["environment"] = environment
    done = {entry_key(e) for e in results["experiments"]}

    for seed in config.seeds:
        for backend in config.backends:
            folder = run_dir(config, backend, seed)
            if main:
                folder.mkdir(parents=True, exist_ok=True)
            for exp in EXPERIMENTS:
                if exp.id not in config.experiments:
                    continue
                entry = {
                    "id": exp.id, "variant": exp.variant, "backend": backend,
                    "dataset": config.dataset, "seed": seed, "quick": config.quick,
                }
                if config.resume and entry_key(entry) in done:
                    log(f"== {exp.key} ({backend}, seed {seed}): already in {results_path}, skipped")
                    continue
                log(f"\n== Experiment {exp.id}{' [' + exp.variant + ']' if exp.variant else ''}: "
                    f"{exp.title} - {backend}, seed {seed}")
                dataset = datasets[exp.data]
                start = time.perf_counter()
                if exp.id == 1:
                    body = run_edges(exp, backend, dataset, folder, log)
                elif exp.variant == "bn-batch-size-1":
                    body = run_batch_size_one(exp, backend, dataset, log)
                else:
                    body = run_training(
                        exp, backend, dataset, seed=seed, batch_size=_batch_size(exp, config),
                        folder=folder, resume=config.resume, log=log, progress=config.progress,
                    )
                entry.update(title=exp.title, data=dataset.name, published=exp.published,
                             wall_seconds=time.perf_counter() - start, threads=torch.get_num_threads())
                entry.update(body)
                if processes > 1:
                    entry["processes"] = processes
                store_entry(results, entry)
                if main:
                    write_results(results, results_path)
                    # Figures and tables go into the report as soon as they exist.
                    write_report(out, results)
                    write_tables(out, results)
                _release_memory()
    return results
