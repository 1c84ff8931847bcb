"""Shared helpers: devices to run on (the CPU, a GPU, and the CUDA code under the CPU
emulator), float32 tolerances judged against PyTorch's own error."""
from __future__ import annotations

import contextlib
import zlib
from typing import ContextManager

import pytest
import torch
import torch.nn.functional as F

import convkit
from convkit.cuda_emulation import emulation_state

NEEDS_GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

# Every device-parametrized test runs on these. "cuda-emu" runs the test on CPU tensors with
# CUDA emulation on (the _cuda_emulation fixture): every convkit op in it takes the CUDA code
# path, kernels and launch plans included, under the emulator (csrc/cuda_emu/).
DEVICE_PARAMS = [
    "cpu",
    pytest.param("cuda", marks=NEEDS_GPU),
    pytest.param("cpu", id="cuda-emu", marks=pytest.mark.cuda_emu),
]

# The tests of the CUDA code itself (tests/test_cuda*.py) name their target explicitly.
CUDA_TARGETS = [pytest.param("cuda", marks=NEEDS_GPU), "cuda-emu"]


def emulating() -> bool:
    """Whether this thread runs convkit's ops through the emulated CUDA code (a cuda-emu test)."""
    return emulation_state().enabled


def _seed_of(request) -> int:
    return zlib.crc32(request.node.nodeid.encode())


class CudaTarget:
    """Where a CUDA test runs: the torch device of its tensors, and the context its convkit
    calls must run in (`with target.active():`, which turns emulation on for cuda-emu)."""

    def __init__(self, name: str, seed: int = 0, max_grid_stride_blocks: int = 2**20):
        if name not in ("cuda", "cuda-emu"):
            raise ValueError(name)
        self.emulated = name == "cuda-emu"
        self.device = "cpu" if self.emulated else "cuda"
        self._seed = seed
        self._max_grid_stride_blocks = max_grid_stride_blocks

    def active(self) -> ContextManager[None]:
        if self.emulated:
            return convkit.emulated_cuda(self._seed, self._max_grid_stride_blocks)
        return contextlib.nullcontext()


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    """Fresh but reproducible random inputs for every test (seeded from the test's id)."""
    torch.manual_seed(_seed_of(request))
    yield


@pytest.fixture(autouse=True)
def _cuda_emulation(request):
    """Runs a test marked cuda_emu with CUDA emulation on, its schedule seeded from the test's
    id (printed, so that a failure names it), and checks that its ops really took the
    emulated path."""
    if request.node.get_closest_marker("cuda_emu") is None:
        yield
        return
    seed = _seed_of(request) & 0x7FFFFFFF
    print(f"CUDA emulator schedule seed: {seed}")
    calls_before = emulation_state().calls
    with convkit.emulated_cuda(seed):
        yield
    assert emulation_state().calls > calls_before, (
        "a cuda-emu test called no convkit op: it tested nothing of the CUDA path"
    )


def pytest_terminal_summary(terminalreporter):
    """How many tests ran the CUDA code path under the emulator: a line of its own, and a
    count in pytest's final summary line ("... 460 on emulated CUDA ...")."""
    counts = {
        outcome: [report for report in terminalreporter.stats.get(outcome, [])
                  if "cuda-emu" in getattr(report, "nodeid", "")]
        for outcome in ("passed", "failed", "error")
    }
    ran = sum(len(reports) for reports in counts.values())
    if ran:
        terminalreporter.write_line(
            f"emulated CUDA (cuda-emu): {ran} tests ran the CUDA kernels and launches on the CPU "
            f"under the emulator: {len(counts['passed'])} passed, {len(counts['failed'])} failed, "
            f"{len(counts['error'])} errors"
        )
        # Any key of stats counts in the final line; these reports are counted under their
        # own outcome too.
        terminalreporter.stats["on emulated CUDA"] = [r for reports in counts.values() for r in reports]


@pytest.fixture(autouse=True)
def _junk_filled_cpu_outputs(monkeypatch):
    """Every CPU output and scratch buffer of our ops starts as NaN (csrc/cpu/block_cache.cpp),
    so a kernel that reads memory it has not written fails a test instead of reading whatever
    a reused block or a fresh zero page held."""
    monkeypatch.setenv("CONVKIT_CPU_JUNK_FILL", "1")
    yield


def make_layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    """The same values in another memory layout: 'contiguous', 'noncontiguous' (H and W
    strides swapped) or 'channels_last'."""
    if layout == "contiguous":
        return t.contiguous()
    if layout == "noncontiguous":
        return t.transpose(-1, -2).contiguous().transpose(-1, -2)
    if layout == "channels_last":
        return t.contiguous(memory_format=torch.channels_last)
    raise ValueError(layout)


def assert_close_to_reference(
    ours: torch.Tensor, theirs: torch.Tensor, reference: torch.Tensor, factor: float = 2.0,
    name: str = "",
) -> None:
    """Our error against a float64 reference is at most `factor` times PyTorch's own error
    (plus a floor of a few ulps of the result's scale, for results PyTorch gets exact)."""
    assert ours.shape == reference.shape, (name, ours.shape, reference.shape)
    assert ours.dtype == theirs.dtype, (name, ours.dtype, theirs.dtype)
    reference = reference.double()
    our_error = (ours.double() - reference).abs().max().item() if ours.numel() else 0.0
    their_error = (theirs.double() - reference).abs().max().item() if ours.numel() else 0.0
    scale = reference.abs().max().item() if reference.numel() else 0.0
    floor = 8 * torch.finfo(ours.dtype).eps * max(scale, 1.0)
    assert our_error <= factor * their_error + floor, (
        f"{name}: convkit error {our_error:.3e} vs PyTorch error {their_error:.3e} "
        f"(allowed {factor}x + {floor:.1e})"
    )


# Every fused activation, with parameters that put kinks where the data is.
ACTIVATIONS = ["none", "relu", "relu6", "hardtanh", "leaky_relu", "silu", "hardswish"]
TORCH_ACTIVATIONS = {
    "none": lambda z: z,
    "relu": F.relu,
    "relu6": F.relu6,
    "hardtanh": lambda z: F.hardtanh(z, -0.5, 1.5),
    "leaky_relu": lambda z: F.leaky_relu(z, 0.2),
    "silu": F.silu,
    "hardswish": F.hardswish,
}
ACTIVATION_ARGUMENTS = {"hardtanh": dict(min_val=-0.5, max_val=1.5),
                        "leaky_relu": dict(negative_slope=0.2)}
# Where each activation's derivative jumps (silu has none).
KINKS = {"none": [], "relu": [0.0], "relu6": [0.0, 6.0], "hardtanh": [-0.5, 1.5],
         "leaky_relu": [0.0], "silu": [], "hardswish": [-3.0, 3.0]}


def activation_spec(activation):
    """The activation as the ops take it: (kernel name, alpha, beta)."""
    return convkit.functional.activation_arguments(activation,
                                                   **ACTIVATION_ARGUMENTS.get(activation, {}))


def fused_batch_norm(activation):
    """convkit's function for the activation, with batch_norm's first eight arguments."""
    if activation == "none":
        return convkit.batch_norm
    if activation == "relu":
        return convkit.batch_norm_relu

    def fused(*args, **kwargs):
        return convkit.functional.batch_norm_activation(
            *args, **kwargs, activation=activation, **ACTIVATION_ARGUMENTS.get(activation, {}))

    return fused
