"""The CPU block cache (csrc/cpu/block_cache.cpp): the CPU ops' large outputs and scratch
buffers (>= 64 KiB) come from freed blocks kept mapped, bounded by CONVKIT_CPU_CACHE_MB.

Checked here: a freed output's block is what the next output of its size gets; live tensors
never share a block; the free blocks stay within the limit, whatever the shapes (0 turns the
cache off); empty_cpu_cache returns them; a bad limit is a clear error; outputs are ordinary,
resizable tensors; threads that allocate and free at once get correct results; torch.profiler
sees the blocks; and a forked child can use the cache it inherits.
"""
from __future__ import annotations

import threading

import pytest
import torch
import torch.nn.functional as F

import convkit

MIB = 2**20


@pytest.fixture(autouse=True)
def _empty_cache_around():
    convkit.empty_cpu_cache()
    yield
    convkit.empty_cpu_cache()


def _conv_output(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return torch.ops.convkit.conv2d_forward(x, weight, None, [1, 1], [1, 1], [1, 1], 1)


def _conv_input_grad(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    dy = torch.sin(x)  # the output's shape here: as many output as input channels
    return torch.ops.convkit.conv2d_backward(
        dy, x, weight, [1, 1], [1, 1], [1, 1], 1, [True, False, False])[0]


def _batch_norm_output(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return torch.ops.convkit.batch_norm_forward(x, None, None, None, None, True, 1e-5, "relu", 0.0, 0.0)[0]


def _im2col_output(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return torch.ops.convkit.im2col(x, [3, 3], [1, 1], [1, 1], [1, 1])


OUTPUTS = {
    "conv2d_forward": _conv_output,
    "conv2d_backward_input": _conv_input_grad,
    "batch_norm_forward": _batch_norm_output,
    "im2col": _im2col_output,
}


@pytest.mark.parametrize("make", list(OUTPUTS))
def test_freed_output_block_is_reused(make):
    """A 392 KiB output, dropped, goes to the cache; the next output of that size gets the
    same block back, and the values are right again (not the previous call's)."""
    x = torch.randn(16, 8, 28, 28)
    weight = torch.randn(8, 8, 3, 3)
    first = OUTPUTS[make](x, weight)
    assert first.numel() * first.element_size() >= 392 * 1024
    address = first.data_ptr()
    del first
    held = convkit.cpu_cache_bytes()
    assert held >= 392 * 1024
    x2 = torch.randn_like(x)
    second = OUTPUTS[make](x2, weight)
    assert second.data_ptr() == address
    assert convkit.cpu_cache_bytes() < held
    expected = OUTPUTS[make](x2.double(), weight.double())
    torch.testing.assert_close(second.double(), expected, rtol=1e-4, atol=1e-4)


def test_live_outputs_never_share_a_block():
    x = torch.randn(16, 8, 28, 28)
    weight = torch.randn(8, 8, 3, 3)
    outputs = [_conv_output(x * (i + 1), weight) for i in range(4)]
    snapshots = [out.clone() for out in outputs]
    assert len({out.data_ptr() for out in outputs}) == 4
    for i in range(8):  # more calls, with blocks freed and taken meanwhile
        _conv_output(x, weight)
    for out, snapshot in zip(outputs, snapshots):
        torch.testing.assert_close(out, snapshot, rtol=0, atol=0)
    torch.testing.assert_close(outputs[2], 3 * outputs[0], rtol=1e-5, atol=1e-4)


def _train_like_steps(shapes: list[tuple[int, int, int]]) -> None:
    for batch, channels, size in shapes:
        x = torch.randn(batch, channels, size, size, requires_grad=True)
        weight = torch.randn(channels, channels, 3, 3, requires_grad=True)
        y = convkit.batch_norm_relu(convkit.conv2d(x, weight, None, 1, 1), None, None,
                                    training=True)
        y.sum().backward()


@pytest.mark.parametrize("limit_mib", ["0", "1", "4"])
def test_free_blocks_stay_within_the_limit(limit_mib, monkeypatch):
    """Shapes that change every step (as a run whose batch size changes) leave at most
    CONVKIT_CPU_CACHE_MB in free blocks; 0 keeps none. (Blocks of 100-520 KiB.)"""
    monkeypatch.setenv("CONVKIT_CPU_CACHE_MB", limit_mib)
    shapes = [(8 + 2 * i, 8, 16 + i) for i in range(10)]
    for shape in shapes:
        _train_like_steps([shape])
        assert convkit.cpu_cache_bytes() <= float(limit_mib) * MIB
    if limit_mib == "0":
        assert convkit.cpu_cache_bytes() == 0
    else:
        assert convkit.cpu_cache_bytes() > 0


def test_lowered_limit_applies_at_the_next_large_allocation(monkeypatch):
    _train_like_steps([(32, 8, 28)])
    assert convkit.cpu_cache_bytes() > 1 * MIB
    monkeypatch.setenv("CONVKIT_CPU_CACHE_MB", "0")
    kept = _conv_output(torch.randn(16, 8, 28, 28), torch.randn(8, 8, 3, 3))
    assert convkit.cpu_cache_bytes() == 0
    del kept
    assert convkit.cpu_cache_bytes() == 0


def test_empty_cpu_cache_returns_every_free_block():
    _train_like_steps([(32, 8, 28), (16, 8, 14)])
    assert convkit.cpu_cache_bytes() > 0
    convkit.empty_cpu_cache()
    assert convkit.cpu_cache_bytes() == 0


@pytest.mark.parametrize("value", ["-1", "lots", "2MB", "inf", "nan", "1e30"])
def test_bad_limit_is_a_clear_error(value, monkeypatch):
    """Values beyond 2^42 MiB overflowed the conversion to bytes (undefined behaviour)."""
    monkeypatch.setenv("CONVKIT_CPU_CACHE_MB", value)
    with pytest.raises(RuntimeError, match=f"CONVKIT_CPU_CACHE_MB must be a non-negative "
                                           f"number of MiB.*'{value}'"):
        _conv_output(torch.randn(16, 8, 28, 28), torch.randn(8, 8, 3, 3))


def test_outputs_are_ordinary_resizable_tensors():
    """The storage is resizable like at::empty's: growing keeps the values, and the tensor
    works with in-place ops, numpy and pickling."""
    out = _conv_output(torch.randn(16, 8, 28, 28), torch.randn(8, 8, 3, 3))
    values = out.flatten().clone()
    out.resize_(values.numel() * 3)
    torch.testing.assert_close(out[: values.numel()], values, rtol=0, atol=0)
    out.zero_()
    assert out.numpy().sum() == 0
    restored = torch.load(_round_trip(out), weights_only=True)
    torch.testing.assert_close(restored, out, rtol=0, atol=0)


def _round_trip(t: torch.Tensor):
    import io
    buffer = io.BytesIO()
    torch.save(t, buffer)
    buffer.seek(0)
    return buffer


def test_threads_allocating_and_freeing_at_once_get_correct_results():
    """Four threads run fwd+bwd of their own layers at once: blocks are freed on one thread
    and taken on another. Every result matches F.conv2d's."""
    threads_before = torch.get_num_threads()
    torch.set_num_threads(1)
    failures: list[str] = []

    def work(seed: int) -> None:
        generator = torch.Generator().manual_seed(seed)
        x = torch.randn(12, 8, 24, 24, generator=generator, requires_grad=True)
        weight = torch.randn(16, 8, 3, 3, generator=generator, requires_grad=True)
        dy = torch.randn(12, 16, 24, 24, generator=generator)
        expected_y = F.conv2d(x, weight, None, 1, 1)
        expected = torch.autograd.grad(expected_y, (x, weight), dy)
        for _ in range(15):
            y = convkit.conv2d(x, weight, None, 1, 1)
            grads = torch.autograd.grad(y, (x, weight), dy)
            for name, ours, theirs in zip(("y", "dx", "dw"), (y,) + grads,
                                          (expected_y,) + expected):
                if not torch.allclose(ours, theirs, rtol=1e-4, atol=1e-3):
                    failures.append(f"thread {seed}: {name} differs")
                    return

    try:
        workers = [threading.Thread(target=work, args=(seed,)) for seed in range(4)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
    finally:
        torch.set_num_threads(threads_before)
    assert failures == []


def test_profiler_sees_the_cached_allocations():
    """torch.profiler's memory profiling counts our blocks as it counts torch's: the op
    allocated its output's bytes, and freeing it is reported."""
    from torch.profiler import ProfilerActivity, profile

    x = torch.randn(16, 8, 28, 28)
    weight = torch.randn(8, 8, 3, 3)
    nbytes = x.numel() * x.element_size()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = _conv_output(x, weight)
        del out
    usage = {event.key: event.self_cpu_memory_usage for event in prof.key_averages()}
    assert usage.get("convkit::conv2d_forward", 0) >= nbytes
    assert usage.get("[memory]", 0) <= -nbytes


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="needs os.fork")
def test_a_forked_child_can_use_the_cache():
    """A child forked while the parent holds free blocks (a DataLoader worker, say) takes
    and frees blocks itself. One thread in the child: GNU OpenMP cannot run a parallel region
    in a child forked after the parent ran one (PyTorch's workers set one thread too)."""
    import os

    x = torch.randn(16, 8, 28, 28)
    weight = torch.randn(8, 8, 3, 3)
    expected = F.conv2d(x, weight, None, 1, 1)
    _conv_output(x, weight)  # dropped at once: its block goes to the cache
    assert convkit.cpu_cache_bytes() > 0
    pid = os.fork()
    if pid == 0:  # the child: exit status 0 only if the results are right
        status = 1
        try:
            torch.set_num_threads(1)
            for _ in range(3):
                out = _conv_output(x, weight)
                if not torch.allclose(out, expected, rtol=1e-4, atol=1e-3):
                    break
            else:
                status = 0
        finally:
            os._exit(status)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
