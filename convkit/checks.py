"""The argument checks of ``csrc/checks.h``, for the fake kernels (``convkit.ops``).

A fake kernel runs instead of the real one on meta tensors, under ``torch.compile`` and
whenever one of the arguments is on the meta device, so it must refuse what the real kernel
refuses, with the same message (``tests/test_fake_checks.py`` compares them case by case).
Sizes may be symbolic (``torch.SymInt``): every condition goes through ``torch._check``.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

_INT64_MAX = 2**63 - 1

# c10's names of the dtypes, as the C++ messages print them.
_DTYPE_NAMES = {
    torch.float64: "Double", torch.float32: "Float", torch.float16: "Half",
    torch.bfloat16: "BFloat16", torch.int64: "Long", torch.int32: "Int", torch.int16: "Short",
    torch.int8: "Char", torch.uint8: "Byte", torch.bool: "Bool", torch.complex64: "ComplexFloat",
    torch.complex128: "ComplexDouble",
}


def _dtype(dtype: torch.dtype) -> str:
    return _DTYPE_NAMES.get(dtype, str(dtype))


def _sizes(t: torch.Tensor) -> str:
    return str(list(t.shape))


def _ints(values: Sequence[int]) -> str:
    return "[" + ", ".join(str(v) for v in values) + "]"


def _check(condition, message: str) -> None:
    torch._check(condition, lambda: message)


def checked_product(op: str, what: str, factors: Sequence[int]) -> int:
    product = 1
    for factor in factors:
        product = product * factor
        if isinstance(product, int):
            _check(-_INT64_MAX - 1 <= product <= _INT64_MAX,
                   f"{op}: {what} ({_ints(factors)}) overflows a 64-bit size")
    return product


def checked_sum(op: str, what: str, a: int, b: int) -> int:
    total = a + b
    if isinstance(total, int):
        _check(total <= _INT64_MAX, f"{op}: {what} ({a} + {b}) overflows a 64-bit size")
    return total


def check_same_device_and_dtype(op: str, reference: torch.Tensor, reference_name: str,
                                other: torch.Tensor, other_name: str) -> None:
    _check(other.device == reference.device,
           f"{op}: expected {other_name} on the same device as {reference_name} "
           f"({reference.device}), but got {other_name} on {other.device}")
    _check(other.dtype == reference.dtype,
           f"{op}: expected {other_name} to have the same dtype as {reference_name} "
           f"({_dtype(reference.dtype)}), but got {_dtype(other.dtype)}")


def check_floating(op: str, t: torch.Tensor, name: str) -> None:
    _check(t.dtype.is_floating_point,
           f"{op}: expected {name} to be a floating-point tensor (float64, float32, bfloat16 or "
           f"float16), but got {_dtype(t.dtype)}")


def window_output_size(op: str, batch, channels, in_h, in_w, kernel_h, kernel_w,
                       stride: Sequence[int], padding: Sequence[int],
                       dilation: Sequence[int]) -> tuple:
    """make_window_geometry: checks the window arguments, returns (out_h, out_w)."""
    _check(len(stride) == 2 and len(padding) == 2 and len(dilation) == 2,
           f"{op}: expected stride, padding and dilation of 2 values each, but got "
           f"{_ints(stride)}, {_ints(padding)}, {_ints(dilation)}")
    _check(stride[0] > 0 and stride[1] > 0, f"{op}: expected a positive stride, but got {_ints(stride)}")
    _check(dilation[0] > 0 and dilation[1] > 0,
           f"{op}: expected a positive dilation, but got {_ints(dilation)}")
    _check(padding[0] >= 0 and padding[1] >= 0,
           f"{op}: expected a non-negative padding, but got {_ints(padding)}")
    _check(kernel_h > 0 and kernel_w > 0,
           f"{op}: expected a positive kernel size, but got ({kernel_h}, {kernel_w})")
    padded = [checked_sum(op, f"the padded input {side}", size,
                          checked_product(op, "the padding", [2, pad]))
              for side, size, pad in (("height", in_h, padding[0]), ("width", in_w, padding[1]))]
    dilated = [checked_sum(op, f"the dilated kernel {side}",
                           checked_product(op, f"the dilated kernel {side}", [d, k - 1]), 1)
               for side, d, k in (("height", dilation[0], kernel_h), ("width", dilation[1], kernel_w))]
    _check(dilated[0] <= padded[0] and dilated[1] <= padded[1],
           f"{op}: the (dilated) kernel size ({dilated[0]} x {dilated[1]}) is larger than the "
           f"padded input size ({padded[0]} x {padded[1]}); expected a kernel no larger than "
           "the padded input")
    out_h = (padded[0] - dilated[0]) // stride[0] + 1
    out_w = (padded[1] - dilated[1]) // stride[1] + 1
    checked_product(op, "the column rows channels x kernel height x kernel width",
                    [channels, kernel_h, kernel_w])
    checked_product(op, "one image's column entries", [channels, kernel_h, kernel_w, out_h, out_w, 8])
    checked_product(op, "the output size", [batch, channels, out_h, out_w])
    return out_h, out_w


def conv2d_output_shape(op: str, input: torch.Tensor, weight: torch.Tensor,
                        stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int],
                        groups: int) -> tuple:
    """make_conv2d_geometry: checks a conv2d call, returns the output's shape."""
    _check(input.dim() == 4, f"{op}: expected a 4-D input [N, C, H, W], but got a {input.dim()}-D "
                             f"tensor of shape {_sizes(input)}")
    _check(weight.dim() == 4,
           f"{op}: expected a 4-D weight [out_channels, in_channels / groups, kH, kW], but got a "
           f"{weight.dim()}-D tensor of shape {_sizes(weight)}")
    check_floating(op, input, "input")
    check_same_device_and_dtype(op, input, "input", weight, "weight")
    _check(groups > 0, f"{op}: expected a positive number of groups, but got {groups}")
    out_channels = weight.shape[0]
    _check(out_channels > 0 and weight.shape[2] > 0 and weight.shape[3] > 0,
           f"{op}: expected a weight with positive out_channels and kernel size, but got shape "
           f"{_sizes(weight)}")
    _check(out_channels % groups == 0,
           f"{op}: expected out_channels ({out_channels}) to be divisible by groups ({groups})")
    _check(input.shape[1] == weight.shape[1] * groups,
           f"{op}: expected input of shape {_sizes(input)} to have {weight.shape[1] * groups} "
           f"channels (weight.size(1) = {weight.shape[1]} times groups = {groups}), but got "
           f"{input.shape[1]} channels")
    n, c, h, w = input.shape
    _check((h > 0 and w > 0) or n == 0 or c == 0,
           f"{op}: expected an input with non-zero height and width (only the batch or the "
           f"channels may be empty), but got input of shape {_sizes(input)}")
    out_h, out_w = window_output_size(op, n, c, h, w, weight.shape[2], weight.shape[3], stride,
                                      padding, dilation)
    checked_product(op, "the output size", [n, out_channels, out_h, out_w])
    return (n, out_channels, out_h, out_w)


def check_conv2d_bias(op: str, input: torch.Tensor, bias: Optional[torch.Tensor],
                      out_channels) -> None:
    if bias is None:
        return
    check_same_device_and_dtype(op, input, "input", bias, "bias")
    _check(bias.dim() == 1 and bias.shape[0] == out_channels,
           f"{op}: expected a 1-D bias of {out_channels} elements (one per output channel), but "
           f"got shape {_sizes(bias)}")


def check_conv2d_grad_output(op: str, input: torch.Tensor, grad_output: torch.Tensor,
                             output_shape: tuple) -> None:
    check_same_device_and_dtype(op, input, "input", grad_output, "grad_output")
    _check(grad_output.dim() == 4 and tuple(grad_output.shape) == tuple(output_shape),
           f"{op}: expected grad_output of shape {_ints(output_shape)}, but got {_sizes(grad_output)}")


def im2col_output_size(op: str, input: torch.Tensor, kernel_size: Sequence[int],
                       dilation: Sequence[int], padding: Sequence[int],
                       stride: Sequence[int]) -> tuple:
    """make_im2col_geometry: returns (out_h, out_w)."""
    _check(input.dim() == 4, f"{op}: expected a 4-D input [N, C, H, W], but got a {input.dim()}-D "
                             f"tensor of shape {_sizes(input)}")
    check_floating(op, input, "input")
    _check(len(kernel_size) == 2, f"{op}: expected a kernel_size of 2 values, but got {_ints(kernel_size)}")
    n, c, h, w = input.shape
    _check(c > 0 and h > 0 and w > 0,
           f"{op}: expected an input with non-zero channels, height and width (only the batch may "
           f"be empty), but got input of shape {_sizes(input)}")
    return window_output_size(op, n, c, h, w, kernel_size[0], kernel_size[1], stride, padding,
                              dilation)


def col2im_channels(op: str, columns: torch.Tensor, output_size: Sequence[int],
                    kernel_size: Sequence[int], dilation: Sequence[int], padding: Sequence[int],
                    stride: Sequence[int]):
    """make_col2im_geometry: returns the output's channels."""
    _check(columns.dim() == 3, f"{op}: expected 3-D columns [N, C * kH * kW, L], but got a "
                               f"{columns.dim()}-D tensor of shape {_sizes(columns)}")
    check_floating(op, columns, "columns")
    _check(len(kernel_size) == 2 and len(output_size) == 2,
           f"{op}: expected kernel_size and output_size of 2 values each, but got "
           f"{_ints(kernel_size)} and {_ints(output_size)}")
    _check(kernel_size[0] > 0 and kernel_size[1] > 0,
           f"{op}: expected a positive kernel size, but got {_ints(kernel_size)}")
    area = checked_product(op, "the kernel area", [kernel_size[0], kernel_size[1]])
    _check(columns.shape[1] % area == 0,
           f"{op}: expected columns.size(1) ({columns.shape[1]}) to be divisible by the kernel "
           f"area {kernel_size[0]} x {kernel_size[1]}")
    _check(output_size[0] > 0 and output_size[1] > 0,
           f"{op}: expected a positive output_size, but got {_ints(output_size)}")
    channels = columns.shape[1] // area
    out_h, out_w = window_output_size(op, columns.shape[0], channels, output_size[0],
                                      output_size[1], kernel_size[0], kernel_size[1], stride,
                                      padding, dilation)
    _check(columns.shape[2] == out_h * out_w,
           f"{op}: expected columns.size(2) to be {out_h * out_w} ({out_h} x {out_w} windows for "
           f"output_size {_ints(output_size)}), but got {columns.shape[2]}")
    return channels


def check_per_channel(op: str, input: torch.Tensor, t: Optional[torch.Tensor], name: str,
                      channels) -> None:
    if t is None:
        return
    _check(t.device == input.device, f"{op}: expected {name} on the same device as input "
                                     f"({input.device}), but got {t.device}")
    check_floating(op, t, name)
    _check(t.dim() == 1 and t.numel() == channels,
           f"{op}: expected {name} to be a 1-D tensor of {channels} elements (one per channel of "
           f"input {_sizes(input)}), but got shape {_sizes(t)}")


def check_parameter_dtype(op: str, input: torch.Tensor, t: Optional[torch.Tensor], name: str) -> None:
    if t is None:
        return
    reduced = input.dtype in (torch.float16, torch.bfloat16)
    _check(t.dtype == input.dtype or (reduced and t.dtype == torch.float32),
           f"{op}: expected {name} of dtype {_dtype(input.dtype)}"
           f"{' (the input' + chr(39) + 's) or Float' if reduced else ' (the input' + chr(39) + 's)'}, "
           f"but got {_dtype(t.dtype)}")


ACTIVATIONS = ("none", "relu", "hardtanh", "leaky_relu", "silu", "hardswish")


def activation_spec(op: str, name: str, alpha: float, beta: float) -> tuple[str, float, float]:
    """The fused activation an op was asked for, checked as csrc/checks.h's activation_spec:
    one of ACTIVATIONS; hardtanh's (alpha, beta) = (min_val, max_val) with min_val <= max_val,
    leaky_relu's alpha its negative_slope."""
    _check(name in ACTIVATIONS, f"{op}: expected activation to be one of none, relu, hardtanh, "
           f"leaky_relu, silu or hardswish, but got '{name}'")
    if name == "hardtanh":
        _check(alpha <= beta, f"{op}: hardtanh expects min_val (alpha) <= max_val (beta), but got "
               f"{alpha} and {beta}")
    if name == "leaky_relu":
        _check(not math.isnan(alpha),
               f"{op}: leaky_relu expects a negative_slope (alpha), but got {alpha}")
    return name, float(alpha), float(beta)


def check_batch_norm_input(op: str, input: torch.Tensor) -> None:
    _check(input.dim() >= 2, f"{op}: expected an input of at least 2 dimensions [N, C, ...], but "
                             f"got a {input.dim()}-D tensor of shape {_sizes(input)}")
    check_floating(op, input, "input")
    _check(input.shape[1] > 0,
           f"{op}: expected at least one channel, but got input of shape {_sizes(input)}")


def check_batch_norm_forward(op: str, input, weight, bias, running_mean, running_var,
                             training: bool, eps: float) -> None:
    check_batch_norm_input(op, input)
    channels = input.shape[1]
    for t, name in ((weight, "weight"), (bias, "bias"), (running_mean, "running_mean"),
                    (running_var, "running_var")):
        check_per_channel(op, input, t, name, channels)
    for t, name in ((weight, "weight"), (bias, "bias"), (running_mean, "running_mean"),
                    (running_var, "running_var")):
        check_parameter_dtype(op, input, t, name)
    _check(eps >= 0, f"{op}: expected a non-negative eps, but got {eps:g}")
    _check(training or (running_mean is not None and running_var is not None),
           f"{op}: running_mean and running_var must be given in eval mode (training=False)")
    _check(not training or input.numel() != channels,
           f"{op}: expected more than 1 value per channel when training, but got input of shape "
           f"{_sizes(input)}")


def check_batch_norm_backward(op: str, grad_output, input, weight, bias, save_mean,
                              save_var) -> None:
    check_batch_norm_input(op, input)
    channels = input.shape[1]
    _check(tuple(grad_output.shape) == tuple(input.shape),
           f"{op}: expected grad_output of shape {_sizes(input)}, but got {_sizes(grad_output)}")
    check_same_device_and_dtype(op, input, "input", grad_output, "grad_output")
    for t, name in ((weight, "weight"), (bias, "bias"), (save_mean, "save_mean"),
                    (save_var, "save_var")):
        check_per_channel(op, input, t, name, channels)
    check_parameter_dtype(op, input, weight, "weight")
    check_parameter_dtype(op, input, bias, "bias")


def check_batch_norm_update_stats(op: str, running_mean, running_var, batch_mean, batch_var,
                                  count: int) -> None:
    channels = batch_mean.numel()
    _check(batch_mean.dim() == 1 and batch_var.dim() == 1 and batch_var.numel() == channels,
           f"{op}: expected 1-D batch_mean and batch_var of the same size, but got "
           f"{_sizes(batch_mean)} and {_sizes(batch_var)}")
    for t in (running_mean, running_var):
        _check(t.dim() == 1 and t.numel() == channels,
               f"{op}: expected running statistics of {channels} elements (one per channel), but "
               f"got shape {_sizes(t)}")
        _check(t.device == batch_mean.device,
               f"{op}: expected running statistics on {batch_mean.device}, but got {t.device}")
        _check(channels <= 1 or t.stride(0) != 0,
               f"{op}: expected running statistics whose elements are distinct in memory, but "
               "got an expanded tensor (stride 0)")
        check_floating(op, t, "running statistics")
    _check(count >= 0, f"{op}: expected a non-negative count, but got {count}")


def check_batch_norm_combine_stats(op: str, mean, var, count: Sequence[int]) -> None:
    _check(mean.dim() == 2,
           f"{op}: expected mean of shape [processes, channels], but got {_sizes(mean)}")
    check_floating(op, mean, "mean")
    check_same_device_and_dtype(op, mean, "mean", var, "var")
    _check(tuple(var.shape) == tuple(mean.shape),
           f"{op}: expected var of mean's shape {_sizes(mean)}, but got {_sizes(var)}")
    _check(len(count) == mean.shape[0],
           f"{op}: expected one count per process ({mean.shape[0]}), but got {len(count)}")
    for rank, n in enumerate(count):
        _check(n >= 0, f"{op}: expected non-negative counts, but got {n} for process {rank}")


def check_batch_norm_backward_elemt(op: str, input, sum_dy, sum_dy_xmu, count: int) -> None:
    channels = input.shape[1]
    for t, name in ((sum_dy, "sum_dy"), (sum_dy_xmu, "sum_dy_xmu")):
        _check(t.device == input.device, f"{op}: expected {name} on the same device as input "
                                         f"({input.device}), but got {t.device}")
        _check(t.dtype == torch.float64 and t.dim() == 1 and t.numel() == channels,
               f"{op}: expected {name} to be a 1-D float64 tensor of {channels} elements, but got "
               f"{_dtype(t.dtype)} of shape {_sizes(t)}")
    local_count = input.numel() // channels
    _check(count >= local_count,
           f"{op}: expected count (values per channel over all processes) of at least this "
           f"process's {local_count}, but got {count}")
