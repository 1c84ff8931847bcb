"""Shared helpers: devices to run on, float32 tolerances judged against PyTorch's own error."""
from __future__ import annotations

import zlib

import pytest
import torch

import convkit  # noqa: F401  (registers the ops)


def available_devices() -> list[str]:
    devices = ["cpu"]
    if torch.cuda.is_available():
        devices.append("cuda")
    return devices


DEVICES = available_devices()
# Every test module parametrizes over these; CUDA shows up as skipped without a GPU.
DEVICE_PARAMS = [
    "cpu",
    pytest.param(
        "cuda",
        marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    ),
]


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    """Fresh but reproducible random inputs for every test (seeded from the test's id)."""
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))
    yield


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
