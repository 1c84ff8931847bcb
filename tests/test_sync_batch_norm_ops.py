"""The ops of synchronised batch norm on their own (batch_norm_stats, batch_norm_combine_stats,
batch_norm_backward_reduce, batch_norm_backward_elemt), on the CPU, a GPU and the CUDA code
under the emulator: a batch cut into parts and put back together gives what convkit's batch
norm gives on the whole, in float64; opcheck; the errors."""
from __future__ import annotations

import pytest
import torch

from conftest import DEVICE_PARAMS
from convkit import ops

F64 = torch.float64
SHAPES = [(6, 3, 5, 5), (9, 8, 7, 7), (5, 2, 40, 40), (7, 4)]  # rows, rows, planes, 2-D


def split_sizes(n: int, parts: int, generator: torch.Generator) -> list[int]:
    """n cut into `parts` sizes (some may be 0)."""
    cuts = sorted(torch.randint(0, n + 1, (parts - 1,), generator=generator).tolist())
    bounds = [0] + cuts + [n]
    return [b - a for a, b in zip(bounds, bounds[1:])]


def combined(parts: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, list[int], int]:
    means, variances, counts = [], [], []
    for part in parts:
        mean, var = ops.batch_norm_stats(part)
        means.append(mean)
        variances.append(var)
        counts.append(part.numel() // part.shape[1])
    mean, var = ops.batch_norm_combine_stats(torch.stack(means), torch.stack(variances), counts)
    return mean, var, counts, sum(counts)


@pytest.mark.parametrize("device", DEVICE_PARAMS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("processes", [1, 2, 3])
def test_statistics_of_the_parts_combine_into_those_of_the_whole(device, shape, processes):
    x = torch.randn(shape, dtype=F64, device=device) * 3 + 5
    sizes = split_sizes(shape[0], processes, torch.Generator().manual_seed(processes))
    mean, var, _, _ = combined(list(torch.split(x, sizes)))
    dims = [0] + list(range(2, x.dim()))
    torch.testing.assert_close(mean, x.mean(dims), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(var, x.var(dims, unbiased=False), rtol=1e-12, atol=1e-12)
    assert mean.dtype == F64 and var.dtype == F64


@pytest.mark.parametrize("device", DEVICE_PARAMS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_statistics_are_float64_and_accurate_for_a_large_mean(device, dtype):
    # |mean| = 1000 std: sums of x and x^2 in float32 would lose most of the variance.
    x = (torch.randn(8, 4, 6, 6, dtype=F64) + (1000.0 if dtype == torch.float32 else 30.0))
    x = x.to(dtype).to(device)
    mean, var = ops.batch_norm_stats(x)
    exact = x.to(F64)
    assert mean.dtype == F64
    torch.testing.assert_close(mean, exact.mean((0, 2, 3)), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(var, exact.var((0, 2, 3), unbiased=False), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("device", DEVICE_PARAMS)
def test_empty_parts_contribute_nothing_and_an_empty_whole_gives_zeros(device):
    x = torch.randn(4, 3, 2, 2, dtype=F64, device=device)
    empty = x[:0]
    mean, var = ops.batch_norm_stats(empty)
    assert torch.equal(mean, torch.zeros(3, dtype=F64)) and torch.equal(var, torch.zeros(3, dtype=F64))
    # A process with no values may send anything: it is not weighed.
    junk = torch.full((3,), float("nan"), dtype=F64)
    m, v = ops.batch_norm_stats(x)
    mean, var = ops.batch_norm_combine_stats(torch.stack([junk, m]), torch.stack([junk, v]), [0, 16])
    torch.testing.assert_close(mean, m, rtol=0, atol=0)
    torch.testing.assert_close(var, v, rtol=0, atol=0)
    mean, var = ops.batch_norm_combine_stats(torch.stack([m, m]), torch.stack([v, v]), [0, 0])
    assert torch.equal(mean, torch.zeros(3, dtype=F64)) and torch.equal(var, torch.zeros(3, dtype=F64))


@pytest.mark.parametrize("device", DEVICE_PARAMS)
def test_non_finite_values_propagate_as_in_one_batch(device):
    x = torch.randn(4, 3, 2, 2, dtype=F64, device=device)
    x[0, 0, 0, 0] = float("inf")
    x[3, 1, 1, 1] = float("nan")
    mean, var, _, _ = combined([x[:2], x[2:]])
    whole_mean, _, whole_var = ops.batch_norm_forward(x, None, None, None, None, True, 1e-5, "none", 0.0, 0.0)
    assert mean[0] == float("inf") and torch.isnan(var[0])
    assert torch.isnan(mean[1]) and torch.isnan(var[1])
    assert torch.isfinite(mean[2]) and torch.isfinite(var[2])
    assert torch.isnan(whole_var[0]) and torch.isnan(whole_var[1])


@pytest.mark.parametrize("device", DEVICE_PARAMS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("activation", [("none", 0.0, 0.0), ("relu", 0.0, 0.0),
                                        ("hardtanh", 0.0, 6.0), ("leaky_relu", 0.1, 0.0),
                                        ("silu", 0.0, 0.0), ("hardswish", 0.0, 0.0)], ids=str)
@pytest.mark.parametrize("affine", [True, False])
def test_backward_of_the_parts_equals_the_backward_of_the_whole(device, shape, activation, affine):
    x = torch.randn(shape, dtype=F64, device=device)
    dy = torch.randn(shape, dtype=F64, device=device)
    channels = shape[1]
    weight = torch.rand(channels, dtype=F64, device=device) + 0.5 if affine else None
    bias = torch.randn(channels, dtype=F64, device=device) if affine else None
    eps = 1e-5
    output, save_mean, save_var = ops.batch_norm_forward(x, weight, bias, None, None, True, eps,
                                                         *activation)
    grad_input, grad_weight, grad_bias = ops.batch_norm_backward(
        dy, x, weight, bias, save_mean, save_var, True, eps, *activation, [True, affine, affine])

    sizes = split_sizes(shape[0], 3, torch.Generator().manual_seed(shape[0]))
    parts, grads = torch.split(x, sizes), torch.split(dy, sizes)
    mean, var, _, total = combined(list(parts))
    outputs = [ops.batch_norm_forward(p, weight, bias, mean, var, False, eps, *activation)[0]
               for p in parts]
    torch.testing.assert_close(torch.cat(outputs), output, rtol=1e-12, atol=1e-12)
    reduced = [ops.batch_norm_backward_reduce(g, p, mean, var, weight, bias, eps, *activation)
               for p, g in zip(parts, grads)]
    sum_dy = sum(r[0] for r in reduced)
    sum_dy_xmu = sum(r[1] for r in reduced)
    assert sum_dy.dtype == F64 and sum_dy_xmu.dtype == F64
    if affine:
        torch.testing.assert_close(sum(r[2] for r in reduced), grad_weight, rtol=1e-11, atol=1e-11)
        torch.testing.assert_close(sum(r[3] for r in reduced), grad_bias, rtol=1e-11, atol=1e-11)
    inputs = [ops.batch_norm_backward_elemt(g, p, mean, var, weight, bias, sum_dy, sum_dy_xmu,
                                            total, eps, *activation) for p, g in zip(parts, grads)]
    torch.testing.assert_close(torch.cat(inputs), grad_input, rtol=1e-10, atol=1e-11)


@pytest.mark.parametrize("threads", [1, 2])
def test_results_do_not_depend_on_the_thread_count(threads):
    x = torch.randn(33, 6, 24, 24)
    dy = torch.randn_like(x)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = ops.batch_norm_stats(x), ops.batch_norm_backward_reduce(
            dy, x, x.mean((0, 2, 3)), x.var((0, 2, 3)), None, None, 1e-5, "relu", 0.0, 0.0)
        torch.set_num_threads(threads)
        many = ops.batch_norm_stats(x), ops.batch_norm_backward_reduce(
            dy, x, x.mean((0, 2, 3)), x.var((0, 2, 3)), None, None, 1e-5, "relu", 0.0, 0.0)
    finally:
        torch.set_num_threads(before)
    for a, b in zip(one[0] + one[1], many[0] + many[1]):
        assert torch.equal(a, b)


@pytest.mark.parametrize("device", DEVICE_PARAMS)
@pytest.mark.parametrize("dtype", [F64, torch.float32, torch.float16])
def test_opcheck_sync_batch_norm_ops(device, dtype):
    x = torch.randn(4, 3, 5, 5, device=device, dtype=dtype)
    dy = torch.randn_like(x)
    param_dtype = torch.float32 if dtype == torch.float16 else dtype
    weight = torch.rand(3, device=device, dtype=param_dtype) + 0.5
    bias = torch.randn(3, device=device, dtype=param_dtype)
    torch.library.opcheck(torch.ops.convkit.batch_norm_stats.default, (x,))
    mean, var = ops.batch_norm_stats(x)
    torch.library.opcheck(torch.ops.convkit.batch_norm_combine_stats.default,
                          (torch.stack([mean, mean]), torch.stack([var, var]), [100, 0]))
    stats = mean.to(param_dtype), var.to(param_dtype)
    for w, b in ((weight, bias), (None, None)):
        torch.library.opcheck(torch.ops.convkit.batch_norm_backward_reduce.default,
                              (dy, x, *stats, w, b, 1e-5, "relu", 0.0, 0.0))
        sums = ops.batch_norm_backward_reduce(dy, x, *stats, w, b, 1e-5, "none", 0.0, 0.0)
        torch.library.opcheck(torch.ops.convkit.batch_norm_backward_elemt.default,
                              (dy, x, *stats, w, b, sums[0], sums[1], 200, 1e-5, "none", 0.0, 0.0))


BAD_CALLS = [
    ("stats of a 1-D input", lambda: ops.batch_norm_stats(torch.randn(4)),
     "at least 2 dimensions"),
    ("stats of an integer input", lambda: ops.batch_norm_stats(torch.ones(4, 3, dtype=torch.long)),
     "floating-point"),
    ("combine of 1-D statistics", lambda: ops.batch_norm_combine_stats(
        torch.zeros(3, dtype=F64), torch.zeros(3, dtype=F64), [1]), r"\[processes, channels\]"),
    ("combine of mismatched var", lambda: ops.batch_norm_combine_stats(
        torch.zeros(2, 3, dtype=F64), torch.zeros(2, 4, dtype=F64), [1, 1]), "var of mean's shape"),
    ("combine with mixed dtypes", lambda: ops.batch_norm_combine_stats(
        torch.zeros(2, 3, dtype=F64), torch.zeros(2, 3), [1, 1]), "same dtype"),
    ("combine with too few counts", lambda: ops.batch_norm_combine_stats(
        torch.zeros(2, 3, dtype=F64), torch.zeros(2, 3, dtype=F64), [1]), "one count per process"),
    ("combine with a negative count", lambda: ops.batch_norm_combine_stats(
        torch.zeros(2, 3, dtype=F64), torch.zeros(2, 3, dtype=F64), [1, -2]), "non-negative"),
    ("reduce with mismatched grad_output", lambda: ops.batch_norm_backward_reduce(
        torch.randn(4, 3, 2), torch.randn(4, 3, 3), torch.zeros(3), torch.ones(3), None, None,
        1e-5, "none", 0.0, 0.0), "grad_output of shape"),
    ("elemt with float32 sums", lambda: ops.batch_norm_backward_elemt(
        torch.randn(4, 3), torch.randn(4, 3), torch.zeros(3), torch.ones(3), None, None,
        torch.zeros(3), torch.zeros(3), 8, 1e-5, "none", 0.0, 0.0), "1-D float64 tensor of 3"),
    ("elemt with a count below the local one", lambda: ops.batch_norm_backward_elemt(
        torch.randn(4, 3), torch.randn(4, 3), torch.zeros(3), torch.ones(3), None, None,
        torch.zeros(3, dtype=F64), torch.zeros(3, dtype=F64), 3, 1e-5, "none", 0.0, 0.0),
     "at least this process's 4"),
]


@pytest.mark.parametrize("device", ["cpu", "meta"])
@pytest.mark.parametrize("call", BAD_CALLS, ids=[c[0] for c in BAD_CALLS])
def test_bad_arguments_are_clear_errors(device, call):
    _, run, message = call
    with torch.device(device):
        with pytest.raises(RuntimeError, match=message):
            run()


@pytest.mark.parametrize("device", DEVICE_PARAMS)
def test_forward_variance_is_accurate_for_a_large_mean(device):
    # Regression: the CUDA statistics took Welford's float mean about 0, which for |mean| =
    # 5000 std lost 2e-3 of the variance; they are now taken about each channel's first value.
    x = (torch.randn(16, 3, 9, 9, dtype=F64) * 2 + 1e4).float().to(device)
    _, mean, var = ops.batch_norm_forward(x, None, None, None, None, True, 1e-5, "none", 0.0, 0.0)
    exact = x.to(F64)
    torch.testing.assert_close(var.to(F64), exact.var((0, 2, 3), unbiased=False), rtol=1e-5,
                               atol=0)
    torch.testing.assert_close(mean.to(F64), exact.mean((0, 2, 3)), rtol=1e-7, atol=0)
