"""What synchronising batch norm costs: convkit's SyncBatchNormReLU2d training step (forward +
backward) on 2 gloo processes, one thread each, against the local fused kernel
(convkit.batch_norm_relu) on the same per-process batch, timed in the same processes.

The two processes must run the same collectives in the same order, so the timing is not the
Clock's adaptive one: rank 0 sizes the samples (calls per sample) and both run the same rounds,
each round one sample of the local step then one of the synchronised step (interleaved, as the
Clock does on one process). Each rank validates the synchronised step against the local kernel
on the gathered batch (float64) before timing it. Rank 0's medians are reported.
"""
from __future__ import annotations

import datetime
import os
import socket
import statistics
import tempfile
import time
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import convkit
from bench_cases import BN_TENSOR_PASSES
from bench_timing import Row

PROCESSES = 2
ROUNDS = 15


def sync_cases(quick: bool, tiny: bool) -> list[tuple[str, tuple[int, ...]]]:
    """(label, per-process shape): the chapter CNN's first BN at a global batch split in two,
    and ResNet-18's first stage."""
    if tiny:
        return [("chapter C=8 N=4", (2, 8, 14, 14))]
    cases = [("chapter C=8 N=64", (32, 8, 14, 14))]
    if not quick:
        cases += [("chapter C=8 N=512", (256, 8, 14, 14)), ("chapter C=64 N=512", (256, 64, 2, 2))]
    cases.append(("resnet18 C=64 N=32", (16, 64, 56, 56)))
    return cases


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _validate(shape: tuple[int, ...], rank: int) -> Optional[str]:
    """The synchronised step in float64 against the local kernel on the whole batch."""
    generator = torch.Generator().manual_seed(11)
    whole = torch.randn((PROCESSES * shape[0],) + shape[1:], generator=generator,
                        dtype=torch.float64)
    dy = torch.randn(whole.shape, generator=generator, dtype=torch.float64)
    part = slice(rank * shape[0], (rank + 1) * shape[0])
    layer = convkit.nn.SyncBatchNormReLU2d(shape[1], dtype=torch.float64)
    x = whole[part].clone().requires_grad_(True)
    layer(x).backward(dy[part])
    reference = whole.clone().requires_grad_(True)
    convkit.batch_norm_relu(reference, None, None, training=True).backward(dy)
    error = (x.grad - reference.grad[part]).abs().max().item()
    return None if error < 1e-10 else f"input gradient off by {error:.1e} against one process"


def _step(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
          dy: torch.Tensor) -> Callable[[], Any]:
    leaf = x.detach().requires_grad_(True)

    def run() -> Any:
        return torch.autograd.grad(fn(leaf), leaf, dy)
    return run


def _time_pair(local: Callable[[], Any], sync: Callable[[], Any], min_run_time: float) -> list[float]:
    """Medians (ms) of both steps over the same rounds on every rank."""
    for _ in range(3):
        local(), sync()
    start = time.perf_counter()
    sync()
    per_call = torch.tensor([time.perf_counter() - start], dtype=torch.float64)
    dist.broadcast(per_call, 0)
    number = max(1, int(min_run_time / 10 / max(float(per_call), 1e-9)))
    samples: list[list[float]] = [[], []]
    for _ in range(ROUNDS):
        for fn, times in ((local, samples[0]), (sync, samples[1])):
            start = time.perf_counter()
            for _ in range(number):
                fn()
            times.append((time.perf_counter() - start) / number)
    return [statistics.median(times) * 1e3 for times in samples]


def _worker(rank: int, port: int, cases: list, min_run_time: float, folder: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=PROCESSES,
                            timeout=datetime.timedelta(seconds=120))
    try:
        results = []
        for label, shape in cases:
            error = _validate(shape, rank)
            errors = [None] * PROCESSES
            dist.all_gather_object(errors, error)
            error = next((e for e in errors if e), None)
            timed = None
            if error is None:
                x = torch.randn(shape) * 1.5 + 0.3
                dy = torch.randn(shape)
                layer = convkit.nn.SyncBatchNormReLU2d(shape[1])
                local = _step(lambda v: convkit.batch_norm_relu(v, None, None, training=True), x, dy)
                timed = _time_pair(local, _step(layer, x, dy), min_run_time)
            results.append((label, shape, error, timed))
        if rank == 0:
            torch.save(results, os.path.join(folder, "results.pt"))
    finally:
        dist.destroy_process_group()


def bench_sync_batch_norm(quick: bool, tiny: bool, min_run_time: float) -> list[Row]:
    """One row per case: convkit column = synchronised, torch column = local fused kernel."""
    cases = sync_cases(quick, tiny)
    with tempfile.TemporaryDirectory() as folder:
        mp.spawn(_worker, args=(_free_port(), cases, min_run_time, folder), nprocs=PROCESSES,
                 join=True)
        results = torch.load(os.path.join(folder, "results.pt"))
    rows = []
    for label, shape, error, timed in results:
        numel = 1
        for size in shape:
            numel *= size
        row = Row("sync_bn", f"{label} x{PROCESSES} processes", "x".join(map(str, shape)),
                  error is None, rate_unit="GB/s",
                  work=float(BN_TENSOR_PASSES["train forward+backward"] * numel * 4), error=error,
                  extra={"processes": PROCESSES, "threads_per_process": 1})
        if timed is not None:
            row.ms_torch, row.ms_convkit = timed  # (local, sync)
        rows.append(row)
    return rows

