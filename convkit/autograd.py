"""Autograd for convkit's ops that Python registers.

The forward ops that training calls on every layer, ``conv2d_forward`` and
``batch_norm_forward``, get their gradients from C++ autograd nodes registered on the
Autograd key (``csrc/autograd.cpp``), which eager mode and ``torch.compile`` use: a Python
Function around them cost ~80 us per batch-norm training step at the chapter's batch 64,
more than the two kernels. torch.func transforms (grad, vjp, ...) refuse C++ autograd nodes,
so under a transform ``convkit.functional`` applies the Python Functions below instead; they
call the same backward ops. They also carry the forward-mode derivatives (``jvp``: for
torch.func.jvp, jacfwd and torch.autograd.forward_ad), computed by convkit's own ops, and
vmap them through the ops' batching rules (``convkit.batching``).

im2col and col2im are building blocks no training step calls, so their autograd is
registered here with ``torch.library.register_autograd``.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
import torch.autograd.forward_ad as _forward_ad

from convkit import batching, ops  # noqa: F401  (batching registers the ops' vmap rules)


def _grad_or_none(grad: torch.Tensor, wanted: bool) -> Optional[torch.Tensor]:
    return grad if wanted else None


class Conv2dFunction(torch.autograd.Function):
    """conv2d with gradients from ``convkit::conv2d_backward``, for torch.func transforms:
    the Python twin of ``Conv2dFunction`` in csrc/autograd.cpp (same saved tensors and mask).
    Forward mode: conv2d is bilinear, so its tangent is conv(dx, w) + conv(x, dw) + db.

    apply(input [N, C, H, W], weight [O, C/groups, kH, kW], bias [O] or None,
          stride (2,), padding (2,), dilation (2,), groups) -> [N, O, oH, oW]
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(
        input: torch.Tensor,
        weight: torch.Tensor,
        bias: Optional[torch.Tensor],
        stride: Sequence[int],
        padding: Sequence[int],
        dilation: Sequence[int],
        groups: int,
    ) -> torch.Tensor:
        with torch._C._AutoDispatchBelowAutograd():
            return ops.conv2d_forward(input, weight, bias, stride, padding, dilation, groups)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: torch.Tensor) -> None:
        input, weight, bias, stride, padding, dilation, groups = inputs
        # The backward op needs both tensors: each gradient reads the other operand, and
        # both give the geometry.
        ctx.save_for_backward(input, weight)
        ctx.save_for_forward(input, weight)
        ctx.conv_args = (list(stride), list(padding), list(dilation), groups)
        ctx.has_bias = bias is not None

    @staticmethod
    def jvp(ctx: Any, input_t, weight_t, bias_t, *_) -> Optional[torch.Tensor]:
        input, weight = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.conv_args
        tangent = None
        if input_t is not None:
            tangent = ops.conv2d_forward(input_t, weight, None, stride, padding, dilation, groups)
        if weight_t is not None or bias_t is not None:
            w_t = weight_t if weight_t is not None else torch.zeros_like(weight)
            term = ops.conv2d_forward(input, w_t, bias_t, stride, padding, dilation, groups)
            tangent = term if tangent is None else tangent + term
        return tangent

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor):
        input, weight = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.conv_args
        needs = ctx.needs_input_grad
        mask = [bool(needs[0]), bool(needs[1]), bool(needs[2]) and ctx.has_bias]
        if not any(mask):
            return None, None, None, None, None, None, None
        grad_input, grad_weight, grad_bias = ops.conv2d_backward(
            grad_output, input, weight, stride, padding, dilation, groups, mask
        )
        return (
            _grad_or_none(grad_input, mask[0]),
            _grad_or_none(grad_weight, mask[1]),
            _grad_or_none(grad_bias, mask[2]),
            None,
            None,
            None,
            None,
        )


def _activation_tangent(activation: str, alpha: float, beta: float, z: torch.Tensor,
                        tangent: torch.Tensor) -> torch.Tensor:
    """f'(z) * tangent for the fused activation, with torch's choices at the kinks (its own
    activations' backward rules, which are the forward-mode derivative too)."""
    aten = torch.ops.aten
    if activation == "relu":
        return aten.threshold_backward(tangent, torch.relu(z), 0)
    if activation == "hardtanh":
        return aten.hardtanh_backward(tangent, z, alpha, beta)
    if activation == "leaky_relu":
        return aten.leaky_relu_backward(tangent, z, alpha, False)
    if activation == "silu":
        return aten.silu_backward(tangent, z)
    if activation == "hardswish":
        return aten.hardswish_backward(tangent, z)
    return tangent


class BatchNormFunction(torch.autograd.Function):
    """Batch norm with a fused activation and gradients from ``convkit::batch_norm_backward``,
    for torch.func transforms: the Python twin of ``BatchNormFunction`` in csrc/autograd.cpp.

    apply(input [N, C, *], weight [C] or None, bias [C] or None, running_mean [C] or None,
          running_var [C] or None, training, eps, activation, alpha, beta)
        -> (output [N, C, *], save_mean [C], save_var [C])

    Running statistics are only read here (eval mode); updating them is
    ``convkit.functional.batch_norm``'s job. Forward mode: the input's part of the Jacobian
    is symmetric, so its tangent is the backward op applied to the input's tangent; the
    affine part is the normalisation with the parameters' tangents; the activation multiplies
    the sum by f'(z), z recomputed by the unactivated op (as torch's activation's own forward
    derivative). The running statistics are constants (torch does not differentiate them
    either).
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(
        input: torch.Tensor,
        weight: Optional[torch.Tensor],
        bias: Optional[torch.Tensor],
        running_mean: Optional[torch.Tensor],
        running_var: Optional[torch.Tensor],
        training: bool,
        eps: float,
        activation: str,
        alpha: float,
        beta: float,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        with torch._C._AutoDispatchBelowAutograd():
            return ops.batch_norm_forward(
                input, weight, bias, running_mean, running_var, training, eps, activation, alpha,
                beta
            )

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
        input, weight, bias, running_mean, running_var, training, eps, activation, alpha, beta = (
            inputs
        )
        _, save_mean, save_var = output
        ctx.mark_non_differentiable(save_mean, save_var)
        # bias is needed only for f'(z), which is recomputed from x instead of stored.
        activated = activation != "none"
        ctx.save_for_backward(input, weight, bias if activated else None, save_mean, save_var)
        ctx.save_for_forward(input, weight, bias, save_mean, save_var)
        ctx.bn_args = (bool(training), float(eps), str(activation), float(alpha), float(beta))

    @staticmethod
    def jvp(ctx: Any, input_t, weight_t, bias_t, *_):
        input, weight, bias, save_mean, save_var = ctx.saved_tensors
        training, eps, activation, alpha, beta = ctx.bn_args
        tangent = None
        if input_t is not None:
            tangent = ops.batch_norm_backward(input_t, input, weight, bias, save_mean,
                                              save_var, training, eps, "none", 0.0, 0.0,
                                              [True, False, False])[0]
        if weight_t is not None or bias_t is not None:
            if weight_t is None:
                weight_t = torch.zeros(input.shape[1], dtype=save_mean.dtype, device=input.device)
            # (x - mean) * invstd * dw + db: the normalisation with the batch's own statistics.
            term = ops.batch_norm_forward(input, weight_t, bias_t, save_mean, save_var, False, eps)[0]
            tangent = term if tangent is None else tangent + term
        if activation != "none" and tangent is not None:
            # z as the forward computed it: the saved statistics are the ones it normalised by.
            z = ops.batch_norm_forward(input, weight, bias, save_mean, save_var, False, eps)[0]
            tangent = _activation_tangent(activation, alpha, beta, z, tangent)
        return tangent, None, None

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor, grad_mean: Any = None, grad_var: Any = None):
        input, weight, bias, save_mean, save_var = ctx.saved_tensors
        training, eps, activation, alpha, beta = ctx.bn_args
        needs = ctx.needs_input_grad
        mask = [bool(needs[0]), bool(needs[1]), bool(needs[2])]
        if not any(mask):
            return (None,) * 10
        grad_input, grad_weight, grad_bias = ops.batch_norm_backward(
            grad_output,
            input,
            weight,
            bias,
            save_mean,
            save_var,
            training,
            eps,
            activation,
            alpha,
            beta,
            mask,
        )
        return (
            _grad_or_none(grad_input, mask[0]),
            _grad_or_none(grad_weight, mask[1]),
            _grad_or_none(grad_bias, mask[2]),
            None,
            None,
            None,
            None,
            None,
            None,
            None,
        )


def _im2col_setup_context(ctx: Any, inputs: tuple, output: torch.Tensor) -> None:
    input, kernel_size, dilation, padding, stride = inputs
    ctx.window = (list(input.shape[-2:]), list(kernel_size), list(dilation), list(padding), list(stride))


def _im2col_backward(ctx: Any, grad_columns: torch.Tensor):
    """im2col copies every input element into the columns that read it, so its gradient
    sums those columns back: col2im."""
    output_size, kernel_size, dilation, padding, stride = ctx.window
    grad_input = ops.col2im(grad_columns, output_size, kernel_size, dilation, padding, stride)
    return grad_input, None, None, None, None


def _col2im_setup_context(ctx: Any, inputs: tuple, output: torch.Tensor) -> None:
    columns, output_size, kernel_size, dilation, padding, stride = inputs
    ctx.window = (list(kernel_size), list(dilation), list(padding), list(stride))


def _col2im_backward(ctx: Any, grad_output: torch.Tensor):
    """col2im sums column entries into pixels; its gradient copies each pixel's gradient
    back to every entry: im2col."""
    kernel_size, dilation, padding, stride = ctx.window
    grad_columns = ops.im2col(grad_output, kernel_size, dilation, padding, stride)
    return grad_columns, None, None, None, None, None


torch.library.register_autograd(
    "convkit::im2col", _im2col_backward, setup_context=_im2col_setup_context
)
torch.library.register_autograd(
    "convkit::col2im", _col2im_backward, setup_context=_col2im_setup_context
)


def functorch_transform_active() -> bool:
    """Inside a torch.func transform (grad, vmap, jvp, jacrev, ...) or a forward-mode AD
    level (torch.autograd.forward_ad), where only the Python Functions above give gradients,
    tangents and batching."""
    return torch._C._are_functorch_transforms_active() or _forward_ad._current_level >= 0
