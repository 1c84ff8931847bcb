"""convkit's functional API, with the signatures and semantics of ``torch.nn.functional``.

``conv2d`` mirrors ``F.conv2d`` (int/tuple/'same'/'valid' padding, unbatched 3-D input);
``batch_norm`` mirrors ``F.batch_norm``; ``batch_norm_activation`` is the same with a fused
activation (ReLU, ReLU6, Hardtanh, LeakyReLU, SiLU, Hardswish) and ``batch_norm_relu`` the
ReLU case. The arithmetic runs in convkit's kernels (``torch.ops.convkit``).
"""
from __future__ import annotations

import numbers
import operator
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F

from convkit import autograd, ops

IntPair = Union[int, Sequence[int]]


def _as_int(value) -> Optional[int]:
    """value as an int when it is one in all but type (a NumPy integer, a 0-d integer tensor:
    what operator.index accepts), else None; bools are not ints here (torch refuses them)."""
    if isinstance(value, bool) or type(value).__name__ == "bool_":  # Python's or NumPy's
        return None
    if isinstance(value, torch.Tensor) and (value.dim() != 0 or value.dtype == torch.bool):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


def _pair(value: IntPair, name: str, op: str = "conv2d") -> tuple[int, int]:
    """An int or a pair of ints (a 1-element sequence counts as a pair) as a pair; NumPy
    integers and 0-d integer tensors count as ints, as in torch."""
    # The common forms first, without the general checks below (~1 us of a small conv call).
    value_type = type(value)
    if value_type is int:
        return (value, value)
    is_sequence_of_two = (value_type is tuple or value_type is list) and len(value) == 2
    if is_sequence_of_two and type(value[0]) is int and type(value[1]) is int:
        return tuple(value)
    single = _as_int(value)
    if single is not None:
        return (single, single)
    values = value
    if isinstance(values, (list, tuple)) and len(values) == 1:
        values = tuple(values) * 2
    if isinstance(values, (list, tuple)) and len(values) == 2:
        pair = (_as_int(values[0]), _as_int(values[1]))
        if pair[0] is not None and pair[1] is not None:
            return pair
    raise ValueError(f"{op}: expected {name} to be an int or a pair of ints, got {value!r}")


def _groups(groups) -> int:
    value = _as_int(groups)
    if value is None:
        raise TypeError(f"conv2d: expected groups to be an int, got {groups!r} ({type(groups).__name__})")
    return value


def _real(value, name: str, allow_none: bool = False):
    """A float argument as torch's batch_norm takes it: a real number (or None)."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        expected = "a float or None" if allow_none else "a float"
        raise TypeError(f"batch_norm: expected {name} to be {expected}, got {value!r} ({type(value).__name__})")
    return float(value)


def _same_padding(
    input: torch.Tensor, weight: torch.Tensor, stride: tuple[int, int], dilation: tuple[int, int]
) -> tuple[torch.Tensor, tuple[int, int]]:
    """padding='same': the total padding d * (k - 1) split evenly, the odd one out on the
    bottom/right as PyTorch does; an uneven split pads the input explicitly."""
    if stride != (1, 1):
        raise RuntimeError(
            f"conv2d: padding='same' is not supported for strided convolutions, got stride={stride}"
        )
    if weight.dim() != 4:
        raise RuntimeError(
            f"conv2d: expected a 4-D weight [out_channels, in_channels / groups, kH, kW], "
            f"but got a {weight.dim()}-D tensor of shape {list(weight.shape)}"
        )
    total = [dilation[i] * (weight.shape[2 + i] - 1) for i in range(2)]
    before = (total[0] // 2, total[1] // 2)
    extra = (total[0] - 2 * before[0], total[1] - 2 * before[1])
    if extra != (0, 0):
        input = F.pad(input, [0, extra[1], 0, extra[0]])
    return input, before


def conv2d(
    input: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    stride: IntPair = 1,
    padding: Union[str, IntPair] = 0,
    dilation: IntPair = 1,
    groups: int = 1,
) -> torch.Tensor:
    """2-D convolution, as ``torch.nn.functional.conv2d``.

    input [N, C, H, W] or [C, H, W], weight [O, C / groups, kH, kW], bias [O] or None
    -> [N, O, oH, oW] (or [O, oH, oW] for unbatched input).
    padding: int, pair, 'valid' (no padding) or 'same' (output size = input size; stride 1).
    """
    if input.dim() not in (3, 4):
        raise RuntimeError(
            f"conv2d: expected a 3-D (unbatched) or 4-D (batched) input, but got a "
            f"{input.dim()}-D tensor of shape {list(input.shape)}"
        )
    stride = _pair(stride, "stride")
    dilation = _pair(dilation, "dilation")
    groups = groups if type(groups) is int else _groups(groups)
    unbatched = input.dim() == 3
    if unbatched:
        input = input.unsqueeze(0)
    if isinstance(padding, str):
        if padding == "valid":
            padding = (0, 0)
        elif padding == "same":
            input, padding = _same_padding(input, weight, stride, dilation)
        else:
            raise ValueError(
                f"conv2d: invalid padding string {padding!r}, expected 'same' or 'valid'"
            )
    else:
        padding = _pair(padding, "padding")
    if autograd.functorch_transform_active():
        output = autograd.Conv2dFunction.apply(input, weight, bias, stride, padding, dilation, groups)
    else:
        output = ops.conv2d_forward(input, weight, bias, stride, padding, dilation, groups)
    return output.squeeze(0) if unbatched else output


def im2col(
    input: torch.Tensor,
    kernel_size: IntPair,
    dilation: IntPair = 1,
    padding: IntPair = 0,
    stride: IntPair = 1,
) -> torch.Tensor:
    """The columns conv2d multiplies, as ``F.unfold``: every kernel window of the input
    laid out as a column.

    input [N, C, H, W] -> [N, C * kH * kW, oH * oW]; row (c * kH + i) * kW + j of column
    oh * oW + ow holds input[c, oh * sH - pH + i * dH, ow * sW - pW + j * dW] (0 outside).
    """
    return ops.im2col(
        input,
        _pair(kernel_size, "kernel_size", "im2col"),
        _pair(dilation, "dilation", "im2col"),
        _pair(padding, "padding", "im2col"),
        _pair(stride, "stride", "im2col"),
    )


def col2im(
    columns: torch.Tensor,
    output_size: IntPair,
    kernel_size: IntPair,
    dilation: IntPair = 1,
    padding: IntPair = 0,
    stride: IntPair = 1,
) -> torch.Tensor:
    """The adjoint of :func:`im2col`, as ``F.fold``: sums every column entry back into the
    pixel it was copied from.

    columns [N, C * kH * kW, L] -> [N, C, H, W] with (H, W) = output_size.
    """
    return ops.col2im(
        columns,
        _pair(output_size, "output_size", "col2im"),
        _pair(kernel_size, "kernel_size", "col2im"),
        _pair(dilation, "dilation", "col2im"),
        _pair(padding, "padding", "col2im"),
        _pair(stride, "stride", "col2im"),
    )


def _batch_norm(
    input: torch.Tensor,
    running_mean: Optional[torch.Tensor],
    running_var: Optional[torch.Tensor],
    weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    training: bool,
    momentum: Optional[float],
    eps: float,
    activation: tuple[str, float, float],
) -> torch.Tensor:
    if input.dim() < 2:
        raise RuntimeError(
            f"batch_norm: expected an input of at least 2 dimensions [N, C, ...], but got a "
            f"{input.dim()}-D tensor of shape {list(input.shape)}"
        )
    momentum = _real(momentum, "momentum", allow_none=True)
    eps = _real(eps, "eps")
    for name, t in (("running_mean", running_mean), ("running_var", running_var)):
        if t is not None and t.requires_grad:
            raise RuntimeError(
                f"batch_norm: {name} requires grad, but running statistics are not "
                "differentiable (as in torch): pass a tensor that does not require grad"
            )
    if (running_mean is None) != (running_var is None):
        raise ValueError(
            "batch_norm: expected running_mean and running_var both given or both None, got "
            f"running_mean={'None' if running_mean is None else 'a tensor'} and "
            f"running_var={'None' if running_var is None else 'a tensor'}"
        )
    update_running = False
    if training:
        count = input.numel() // input.shape[1] if input.shape[1] > 0 else 0
        if count == 1:
            raise ValueError(
                f"Expected more than 1 value per channel when training, got input size {input.size()}"
            )
        update_running = running_mean is not None
        if update_running and momentum is None:
            raise ValueError(
                "batch_norm: momentum=None (cumulative average) needs the number of batches "
                "seen; use convkit.nn.BatchNorm2d, or pass momentum=1/num_batches_tracked"
            )
    args = (input, weight, bias, running_mean, running_var, training, eps, *activation)
    if autograd.functorch_transform_active():
        output, save_mean, save_var = autograd.BatchNormFunction.apply(*args)
    else:
        output, save_mean, save_var = ops.batch_norm_forward(*args)
    if update_running:
        # No no_grad block (it cost ~1.5 us a call): the update op has no autograd kernel,
        # and the statistics it reads are non-differentiable outputs of the forward.
        ops.batch_norm_update_stats(
            running_mean, running_var, save_mean, save_var, float(momentum), count
        )
    return output


def batch_norm(
    input: torch.Tensor,
    running_mean: Optional[torch.Tensor],
    running_var: Optional[torch.Tensor],
    weight: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
    training: bool = False,
    momentum: Optional[float] = 0.1,
    eps: float = 1e-5,
) -> torch.Tensor:
    """Batch normalisation, as ``torch.nn.functional.batch_norm``.

    input [N, C, *]; running_mean, running_var, weight, bias [C] or None -> [N, C, *].
    Training normalises with the batch statistics (biased variance) and, when running
    statistics are given, updates them in place (unbiased variance, ``momentum``); eval
    normalises with the running statistics.
    """
    return _batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps,
                       _NO_ACTIVATION)


def batch_norm_relu(
    input: torch.Tensor,
    running_mean: Optional[torch.Tensor],
    running_var: Optional[torch.Tensor],
    weight: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
    training: bool = False,
    momentum: Optional[float] = 0.1,
    eps: float = 1e-5,
) -> torch.Tensor:
    """``relu(batch_norm(...))`` in one fused kernel; same arguments as :func:`batch_norm`.

    input [N, C, *] -> [N, C, *], every value >= 0.
    """
    return _batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps,
                       _RELU)


def batch_norm_activation(
    input: torch.Tensor,
    running_mean: Optional[torch.Tensor],
    running_var: Optional[torch.Tensor],
    weight: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
    training: bool = False,
    momentum: Optional[float] = 0.1,
    eps: float = 1e-5,
    activation: str = "relu",
    *,
    negative_slope: float = 0.01,
    min_val: float = -1.0,
    max_val: float = 1.0,
) -> torch.Tensor:
    """``f(batch_norm(...))`` in one fused kernel, forward and backward; the first eight
    arguments as :func:`batch_norm`.

    input [N, C, *] -> [N, C, *]. ``activation``: "relu", "relu6", "hardtanh" (``min_val``,
    ``max_val``), "leaky_relu" (``negative_slope``), "silu", "hardswish" or "none", with the
    values and gradients of torch's ``F.<activation>`` applied to ``F.batch_norm``'s output.
    """
    spec = activation_arguments(activation, negative_slope=negative_slope, min_val=min_val,
                                max_val=max_val)
    return _batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps,
                       spec)


def activation_name(activation: tuple[str, float, float]) -> str:
    """The user-facing name of a fused activation in the ops' form (activation_arguments'
    inverse, less the parameters): "relu6" for hardtanh(0, 6), else the kernel name."""
    name, alpha, beta = activation
    if name == "hardtanh" and (alpha, beta) == (0.0, 6.0):
        return "relu6"
    return name


_NO_ACTIVATION = ("none", 0.0, 0.0)
_RELU = ("relu", 0.0, 0.0)
ACTIVATION_NAMES = ("none", "relu", "relu6", "hardtanh", "leaky_relu", "silu", "hardswish")


def activation_arguments(activation: str, *, negative_slope: float = 0.01, min_val: float = -1.0,
                         max_val: float = 1.0) -> tuple[str, float, float]:
    """A fused activation's name and parameters as the batch-norm ops take them: (kernel name,
    alpha, beta), ReLU6 being hardtanh(0, 6) as in torch."""
    if not isinstance(activation, str) or activation not in ACTIVATION_NAMES:
        raise ValueError(
            f"batch_norm_activation: expected activation to be one of {', '.join(ACTIVATION_NAMES)}, "
            f"but got {activation!r}"
        )
    if activation == "relu6":
        return ("hardtanh", 0.0, 6.0)
    if activation == "hardtanh":
        min_val = _real(min_val, "min_val")
        max_val = _real(max_val, "max_val")
        if not min_val <= max_val:
            raise ValueError(
                f"batch_norm_activation: hardtanh expects min_val <= max_val, but got min_val="
                f"{min_val} and max_val={max_val}"
            )
        return ("hardtanh", min_val, max_val)
    if activation == "leaky_relu":
        return ("leaky_relu", _real(negative_slope, "negative_slope"), 0.0)
    return (activation, 0.0, 0.0)
