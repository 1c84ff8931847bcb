"""Runs a function on several spawned processes joined in a gloo process group (the CPU), and
hands their results back: the tests' stand-in for torchrun.

``run_ranks(worker, world_size, *args)`` calls ``worker(rank, world_size, *args)`` in each
process (one thread each) and returns the list of their return values, by rank. An exception
in a worker is re-raised here with its traceback; a process that exits without a result shows
as ``Exited(code)`` (when ``allow_exit``) or fails the call. No process outlives the call:
stragglers are killed at the deadline.
"""
from __future__ import annotations

import dataclasses
import datetime
import io
import os
import queue
import socket
import time
import traceback
from typing import Any, Callable

import torch.multiprocessing as mp


@dataclasses.dataclass
class Exited:
    """A worker process that ended without returning (os._exit, a crash)."""

    code: int


class WorkerError(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(worker: Callable, rank: int, world_size: int, port: int, results, timeout_s: float,
           args: tuple) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=timeout_s))
        value = worker(rank, world_size, *args)
        # As bytes: a tensor queued as shared memory would die with this process.
        buffer = io.BytesIO()
        torch.save(value, buffer)
        results.put((rank, "ok", buffer.getvalue()))
    except BaseException:  # noqa: BLE001 - handed to the parent
        results.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(worker: Callable, world_size: int, *args: Any, timeout_s: float = 120.0,
              group_timeout_s: float = 60.0, allow_exit: bool = False) -> list:
    """[worker(rank, world_size, *args) for each rank], each in its own spawned process."""
    context = mp.get_context("spawn")
    results = context.Queue()
    port = free_port()
    processes = [
        context.Process(target=_entry,
                        args=(worker, rank, world_size, port, results, group_timeout_s, args))
        for rank in range(world_size)
    ]
    for process in processes:
        process.start()
    deadline = time.monotonic() + timeout_s
    outcome: dict[int, tuple[str, Any]] = {}
    try:
        while len(outcome) < world_size and time.monotonic() < deadline:
            try:
                rank, status, value = results.get(timeout=0.5)
                outcome[rank] = (status, value)
            except queue.Empty:
                exited = [r for r, p in enumerate(processes)
                          if r not in outcome and p.exitcode is not None]
                for r in exited:
                    # A last look: the result may have been queued just before the exit.
                    try:
                        got_rank, status, value = results.get(timeout=0.5)
                        outcome[got_rank] = (status, value)
                    except queue.Empty:
                        pass
                    if r not in outcome:
                        outcome[r] = ("exited", processes[r].exitcode)
    finally:
        for process in processes:
            process.join(timeout=max(0.0, deadline - time.monotonic()) + 5)
            if process.is_alive():
                process.kill()
                process.join()
    missing = [r for r in range(world_size) if r not in outcome]
    if missing:
        raise WorkerError(f"ranks {missing} gave no result within {timeout_s} s (killed)")
    values = []
    for rank in range(world_size):
        status, value = outcome[rank]
        if status == "error":
            raise WorkerError(f"rank {rank} raised:\n{value}")
        if status == "exited":
            if not allow_exit:
                raise WorkerError(f"rank {rank} exited with code {value} without a result")
            values.append(Exited(value))
        else:
            import torch

            values.append(torch.load(io.BytesIO(value), weights_only=False))
    return values
