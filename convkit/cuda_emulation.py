"""convkit's CUDA kernels on the CPU, under our emulation of CUDA's execution model.

Inside ``with convkit.emulated_cuda():`` every convkit op called on CPU tensors runs its CUDA
implementation instead of the CPU one: the same kernels (``csrc/cuda/*.cuh``) and the same host
code (launch plans, chunking, the GEMMs, with ``at::mm`` on the CPU standing in for cuBLAS),
compiled by the host compiler against ``csrc/cuda_emu/``. Every block's threads run one at a
time in a seeded random order that changes at each barrier, shared memory starts as junk and is
checked for reads nobody wrote and for races, warp shuffles check their masks, and launches
check the GPU's limits: a bug of that kind raises ``RuntimeError`` naming the kernel, block
and thread. Timing, occupancy and the memory model beyond barriers are not emulated.

The mode belongs to the calling thread. The test suite runs every device-parametrized test
this way under the id ``cuda-emu`` (``pytest -k emu``); a user can step through a CUDA kernel
with gdb the same way, on a machine without a GPU::

    with convkit.emulated_cuda(seed=3):
        y = convkit.nn.BatchNormReLU2d(8)(torch.randn(4, 8, 5, 5))
"""
from __future__ import annotations

import contextlib
from typing import Iterator, NamedTuple, Optional

import torch

from convkit import ops  # noqa: F401  (loads the extension)

MAX_GRID_STRIDE_BLOCKS = 2**20


class EmulationState(NamedTuple):
    """The calling thread's emulation mode, and what it has done since the thread started."""

    enabled: bool
    seed: int
    max_grid_stride_blocks: int
    calls: int  # convkit op calls routed to the emulated CUDA code
    launches: int  # kernels launched under the emulator


def emulation_state() -> EmulationState:
    return EmulationState(*torch.ops.convkit.cuda_emulation_state.default())


@contextlib.contextmanager
def emulated_cuda(seed: int = 0, max_grid_stride_blocks: int = MAX_GRID_STRIDE_BLOCKS) -> Iterator[None]:
    """Runs convkit's ops on CPU tensors through their CUDA code, in this thread, until the
    block ends (nesting restores the outer settings).

    seed: the schedule's seed (the order of blocks and of threads between barriers); the same
        seed and the same sequence of launches give the same interleavings.
    max_grid_stride_blocks: a bound on the blocks of the grid-stride kernels (the GPU's is
        2**20); lower it to run the loops' later rounds on small tensors.
    """
    previous = emulation_state()
    torch.ops.convkit.set_cuda_emulation.default(True, seed, max_grid_stride_blocks)
    try:
        yield
    finally:
        torch.ops.convkit.set_cuda_emulation.default(
            previous.enabled, previous.seed, previous.max_grid_stride_blocks
        )


def run_self_test(name: str) -> Optional[torch.Tensor]:
    """Runs one of the emulator's self-test kernels (``csrc/cuda_emu/self_test.cpp``): the
    deliberately wrong ones raise the emulator's error, their correct twins return (the cases
    with an output return it)."""
    return torch.ops.convkit.cuda_emulator_self_test.default(name)


def emulator_info() -> str:
    """How this build emulates: its context switch, and whether CUDA's headers (``__half``,
    ``__nv_bfloat16``, the vector types) were found at build time."""
    return torch.ops.convkit.cuda_emulator_info.default()
