"""Thin wrappers over ``torch.ops.convkit.*`` and their fake (meta) kernels.

The fake kernels describe each op's outputs (shape, dtype, device, strides) without
computing them, which is what ``torch.compile`` and ``torch.library.opcheck`` need. They
must agree exactly with the C++ kernels: outputs are in the memory format torch's own ops
give (csrc/memory_format.h: channels-last when conv2d's input or weight is, a batch norm's
input's format), statistics are float32 (float64 for float64 input); and they refuse what the C++ kernels refuse, with the same
messages (``convkit.checks``), since they also run whenever an argument is on the meta device.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch._prims_common import suggest_memory_format

from convkit import checks

try:
    from convkit import _C  # noqa: F401  (loading the library runs the op registrations)
except ImportError as error:  # pragma: no cover - only without a build
    raise ImportError(
        "convkit's compiled extension (convkit._C) could not be loaded. Build it with "
        "`pip install -e .` from the project's root (or `pip install --no-build-isolation "
        "-e .` to build against the torch already installed). Original error: " + str(error)
    ) from error
from convkit import cpu_kernels  # noqa: E402,F401  (installs this CPU's kernels for the CPU ops)

_ops = torch.ops.convkit
# Each op has one overload; calling it directly skips the packet's overload resolution
# (~0.7 us a call, a tenth of a small batch-norm call).
_conv2d_forward = _ops.conv2d_forward.default
_conv2d_backward = _ops.conv2d_backward.default
_im2col = _ops.im2col.default
_col2im = _ops.col2im.default
_batch_norm_forward = _ops.batch_norm_forward.default
_batch_norm_backward = _ops.batch_norm_backward.default
_batch_norm_update_stats = _ops.batch_norm_update_stats.default
_batch_norm_stats = _ops.batch_norm_stats.default
_batch_norm_combine_stats = _ops.batch_norm_combine_stats.default
_batch_norm_backward_reduce = _ops.batch_norm_backward_reduce.default
_batch_norm_backward_elemt = _ops.batch_norm_backward_elemt.default


def conv2d_forward(
    input: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    groups: int,
) -> torch.Tensor:
    """[N, C, H, W] x [O, C/groups, kH, kW] (+ [O]) -> [N, O, oH, oW]."""
    return _conv2d_forward(input, weight, bias, stride, padding, dilation, groups)


def conv2d_backward(
    grad_output: torch.Tensor,
    input: torch.Tensor,
    weight: torch.Tensor,
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    groups: int,
    output_mask: Sequence[bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients (input, weight, bias); a masked-off gradient comes back as an empty tensor."""
    return _conv2d_backward(
        grad_output, input, weight, stride, padding, dilation, groups, output_mask
    )


def im2col(
    input: torch.Tensor,
    kernel_size: Sequence[int],
    dilation: Sequence[int],
    padding: Sequence[int],
    stride: Sequence[int],
) -> torch.Tensor:
    """[N, C, H, W] -> [N, C * kH * kW, oH * oW], as F.unfold."""
    return _im2col(input, kernel_size, dilation, padding, stride)


def col2im(
    columns: torch.Tensor,
    output_size: Sequence[int],
    kernel_size: Sequence[int],
    dilation: Sequence[int],
    padding: Sequence[int],
    stride: Sequence[int],
) -> torch.Tensor:
    """[N, C * kH * kW, L] -> [N, C, H, W] (overlaps summed), as F.fold."""
    return _col2im(columns, output_size, kernel_size, dilation, padding, stride)


def batch_norm_forward(
    input: torch.Tensor,
    weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    running_mean: Optional[torch.Tensor],
    running_var: Optional[torch.Tensor],
    training: bool,
    eps: float,
    activation: str = "none",
    alpha: float = 0.0,
    beta: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[N, C, *] -> (output [N, C, *], save_mean [C], save_var [C]).

    output = f(batch_norm(input)) for the fused activation f: "none", "relu", "hardtanh"
    (alpha, beta = min_val, max_val), "leaky_relu" (alpha = negative_slope), "silu" or
    "hardswish"."""
    return _batch_norm_forward(
        input, weight, bias, running_mean, running_var, training, eps, activation, alpha, beta
    )


def batch_norm_backward(
    grad_output: torch.Tensor,
    input: torch.Tensor,
    weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    save_mean: torch.Tensor,
    save_var: torch.Tensor,
    training: bool,
    eps: float,
    activation: str,
    alpha: float,
    beta: float,
    output_mask: Sequence[bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients (input, weight, bias) through the fused activation (as batch_norm_forward's);
    a masked-off gradient comes back as an empty tensor."""
    return _batch_norm_backward(
        grad_output, input, weight, bias, save_mean, save_var, training, eps, activation, alpha,
        beta, output_mask
    )


def batch_norm_update_stats(
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    batch_mean: torch.Tensor,
    batch_var: torch.Tensor,
    momentum: float,
    count: int,
) -> None:
    """In place: running = (1 - momentum) * running + momentum * batch (variance unbiased)."""
    _batch_norm_update_stats(running_mean, running_var, batch_mean, batch_var, momentum, count)


def batch_norm_stats(input: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, C, *] -> this process's (mean [C], biased var [C]) in float64; 0 and 0 for an empty
    batch."""
    return _batch_norm_stats(input)


def batch_norm_combine_stats(
    mean: torch.Tensor, var: torch.Tensor, count: Sequence[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """The statistics of W processes, mean and var [W, C] with count[r] values per channel in
    process r -> their combined (mean [C], biased var [C])."""
    return _batch_norm_combine_stats(mean, var, count)


def batch_norm_backward_reduce(
    grad_output: torch.Tensor,
    input: torch.Tensor,
    mean: torch.Tensor,
    var: torch.Tensor,
    weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    eps: float,
    activation: str = "none",
    alpha: float = 0.0,
    beta: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """This process's (sum_dy [C], sum_dy_xmu [C]) in float64 and (grad_weight, grad_bias),
    through the fused activation (as batch_norm_forward's)."""
    return _batch_norm_backward_reduce(grad_output, input, mean, var, weight, bias, eps,
                                       activation, alpha, beta)


def batch_norm_backward_elemt(
    grad_output: torch.Tensor,
    input: torch.Tensor,
    mean: torch.Tensor,
    var: torch.Tensor,
    weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    sum_dy: torch.Tensor,
    sum_dy_xmu: torch.Tensor,
    count: int,
    eps: float,
    activation: str = "none",
    alpha: float = 0.0,
    beta: float = 0.0,
) -> torch.Tensor:
    """grad_input [N, C, *] from the sums over all processes, which hold ``count`` values per
    channel, through the fused activation (as batch_norm_forward's)."""
    return _batch_norm_backward_elemt(
        grad_output, input, mean, var, weight, bias, sum_dy, sum_dy_xmu, count, eps, activation,
        alpha, beta
    )


def cpu_cache_bytes() -> int:
    """Bytes the CPU block cache holds in freed blocks, kept mapped for the CPU ops' next large
    outputs and scratch buffers: at most ``CONVKIT_CPU_CACHE_MB`` MiB (default 64; 0 turns the
    cache off)."""
    return _ops.cpu_cache_bytes.default()


def empty_cpu_cache() -> None:
    """Returns the CPU block cache's free blocks to the system, as ``torch.cuda.empty_cache``
    does for CUDA; tensors still alive keep their memory."""
    _ops.empty_cpu_cache.default()


def _stats_dtype(input: torch.Tensor) -> torch.dtype:
    return torch.float64 if input.dtype == torch.float64 else torch.float32


def _conv2d_memory_format(input: torch.Tensor, weight: torch.Tensor) -> torch.memory_format:
    """conv2d's outputs are channels-last when its input or weight is (torch's rule)."""
    formats = (suggest_memory_format(input), suggest_memory_format(weight))
    if torch.channels_last in formats:
        return torch.channels_last
    return torch.contiguous_format


def _empty_in(like: torch.Tensor, shape: Sequence[int],
              memory_format: torch.memory_format) -> torch.Tensor:
    return torch.empty(shape, dtype=like.dtype, device=like.device, memory_format=memory_format)


@torch.library.register_fake("convkit::conv2d_forward")
def _conv2d_forward_fake(input, weight, bias, stride, padding, dilation, groups):
    op = "convkit::conv2d_forward"
    shape = checks.conv2d_output_shape(op, input, weight, stride, padding, dilation, groups)
    checks.check_conv2d_bias(op, input, bias, weight.shape[0])
    return _empty_in(input, shape, _conv2d_memory_format(input, weight))


@torch.library.register_fake("convkit::conv2d_backward")
def _conv2d_backward_fake(grad_output, input, weight, stride, padding, dilation, groups, output_mask):
    op = "convkit::conv2d_backward"
    shape = checks.conv2d_output_shape(op, input, weight, stride, padding, dilation, groups)
    checks.check_conv2d_grad_output(op, input, grad_output, shape)
    memory_format = _conv2d_memory_format(input, weight)
    grad_input = (
        _empty_in(input, input.shape, memory_format) if output_mask[0] else input.new_empty((0,))
    )
    grad_weight = (
        _empty_in(weight, weight.shape, suggest_memory_format(weight))
        if output_mask[1] else input.new_empty((0,))
    )
    grad_bias = input.new_empty((weight.shape[0],)) if output_mask[2] else input.new_empty((0,))
    return grad_input, grad_weight, grad_bias


@torch.library.register_fake("convkit::im2col")
def _im2col_fake(input, kernel_size, dilation, padding, stride):
    out_h, out_w = checks.im2col_output_size("convkit::im2col", input, kernel_size, dilation,
                                             padding, stride)
    rows = input.shape[1] * kernel_size[0] * kernel_size[1]
    return input.new_empty((input.shape[0], rows, out_h * out_w))


@torch.library.register_fake("convkit::col2im")
def _col2im_fake(columns, output_size, kernel_size, dilation, padding, stride):
    channels = checks.col2im_channels("convkit::col2im", columns, output_size, kernel_size,
                                      dilation, padding, stride)
    return columns.new_empty((columns.shape[0], channels, output_size[0], output_size[1]))


@torch.library.register_fake("convkit::batch_norm_forward")
def _batch_norm_forward_fake(input, weight, bias, running_mean, running_var, training, eps,
                             activation, alpha, beta):
    checks.activation_spec("convkit::batch_norm_forward", activation, alpha, beta)
    checks.check_batch_norm_forward("convkit::batch_norm_forward", input, weight, bias,
                                    running_mean, running_var, training, eps)
    channels = input.shape[1]
    stats_dtype = _stats_dtype(input)
    return (
        _empty_in(input, input.shape, suggest_memory_format(input)),
        input.new_empty((channels,), dtype=stats_dtype),
        input.new_empty((channels,), dtype=stats_dtype),
    )


@torch.library.register_fake("convkit::batch_norm_backward")
def _batch_norm_backward_fake(
    grad_output, input, weight, bias, save_mean, save_var, training, eps, activation, alpha, beta,
    output_mask
):
    checks.activation_spec("convkit::batch_norm_backward", activation, alpha, beta)
    checks.check_batch_norm_backward("convkit::batch_norm_backward", grad_output, input, weight,
                                     bias, save_mean, save_var)
    channels = input.shape[1]
    weight_dtype = weight.dtype if weight is not None else input.dtype
    bias_dtype = bias.dtype if bias is not None else input.dtype
    grad_input = (
        _empty_in(input, input.shape, suggest_memory_format(input))
        if output_mask[0] else input.new_empty((0,))
    )
    grad_weight = (
        input.new_empty((channels,), dtype=weight_dtype) if output_mask[1] else input.new_empty((0,))
    )
    grad_bias = (
        input.new_empty((channels,), dtype=bias_dtype) if output_mask[2] else input.new_empty((0,))
    )
    return grad_input, grad_weight, grad_bias


@torch.library.register_fake("convkit::batch_norm_update_stats")
def _batch_norm_update_stats_fake(running_mean, running_var, batch_mean, batch_var, momentum, count):
    checks.check_batch_norm_update_stats("convkit::batch_norm_update_stats", running_mean,
                                         running_var, batch_mean, batch_var, count)
    return None


@torch.library.register_fake("convkit::batch_norm_stats")
def _batch_norm_stats_fake(input):
    checks.check_batch_norm_input("convkit::batch_norm_stats", input)
    channels = input.shape[1]
    return (input.new_empty((channels,), dtype=torch.float64),
            input.new_empty((channels,), dtype=torch.float64))


@torch.library.register_fake("convkit::batch_norm_combine_stats")
def _batch_norm_combine_stats_fake(mean, var, count):
    checks.check_batch_norm_combine_stats("convkit::batch_norm_combine_stats", mean, var, count)
    return mean.new_empty((mean.shape[1],)), mean.new_empty((mean.shape[1],))


@torch.library.register_fake("convkit::batch_norm_backward_reduce")
def _batch_norm_backward_reduce_fake(grad_output, input, mean, var, weight, bias, eps,
                                     activation, alpha, beta):
    checks.activation_spec("convkit::batch_norm_backward_reduce", activation, alpha, beta)
    checks.check_batch_norm_backward("convkit::batch_norm_backward_reduce", grad_output, input,
                                     weight, bias, mean, var)
    channels = input.shape[1]
    weight_dtype = weight.dtype if weight is not None else input.dtype
    bias_dtype = bias.dtype if bias is not None else input.dtype
    return (
        input.new_empty((channels,), dtype=torch.float64),
        input.new_empty((channels,), dtype=torch.float64),
        input.new_empty((channels,), dtype=weight_dtype),
        input.new_empty((channels,), dtype=bias_dtype),
    )


@torch.library.register_fake("convkit::batch_norm_backward_elemt")
def _batch_norm_backward_elemt_fake(
    grad_output, input, mean, var, weight, bias, sum_dy, sum_dy_xmu, count, eps, activation,
    alpha, beta
):
    op = "convkit::batch_norm_backward_elemt"
    checks.activation_spec(op, activation, alpha, beta)
    checks.check_batch_norm_backward(op, grad_output, input, weight, bias, mean, var)
    checks.check_batch_norm_backward_elemt(op, input, sum_dy, sum_dy_xmu, count)
    return _empty_in(input, input.shape, suggest_memory_format(input))
