"""Autograd for convkit's forward ops, defined once.

Each ``torch.autograd.Function`` below is usable directly (``Conv2dFunction.apply(...)``),
and its ``setup_context``/``backward`` are also registered on the forward op with
``torch.library.register_autograd``, which makes ``torch.ops.convkit.conv2d_forward`` and
``batch_norm_forward`` differentiable themselves (and traceable by ``torch.compile``).
Both paths call the same backward op.

``conv2d`` and ``batch_norm`` at the end are the eager entry points that
``convkit.functional`` uses: in eager mode they call the Functions directly and run the
forward op below the autograd dispatch key, which skips the per-call Python work of the
op-level registration (about 25 us per forward and 40 us per backward, measured: a third
of a chapter-sized layer at batch 64). Under ``torch.compile`` they call the registered op,
whose autograd formula is the same Function's.
"""
from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import torch

from convkit import ops


def _grad_or_none(grad: torch.Tensor, wanted: bool) -> Optional[torch.Tensor]:
    return grad if wanted else None


class Conv2dFunction(torch.autograd.Function):
    """conv2d with gradients from ``convkit::conv2d_backward``.

    apply(input [N, C, H, W], weight [O, C/groups, kH, kW], bias [O] or None,
          stride (2,), padding (2,), dilation (2,), groups) -> [N, O, oH, oW]
    """

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
        ctx.conv_args = (list(stride), list(padding), list(dilation), groups)
        ctx.has_bias = bias is not None

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


class BatchNormFunction(torch.autograd.Function):
    """Batch norm (+ fused ReLU when ``relu``) with gradients from
    ``convkit::batch_norm_backward``.

    apply(input [N, C, *], weight [C] or None, bias [C] or None, running_mean [C] or None,
          running_var [C] or None, training, eps, relu)
        -> (output [N, C, *], save_mean [C], save_var [C])

    Running statistics are only read here (eval mode); updating them is
    ``convkit.functional.batch_norm``'s job.
    """

    @staticmethod
    def forward(
        input: torch.Tensor,
        weight: Optional[torch.Tensor],
        bias: Optional[torch.Tensor],
        running_mean: Optional[torch.Tensor],
        running_var: Optional[torch.Tensor],
        training: bool,
        eps: float,
        relu: bool,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        with torch._C._AutoDispatchBelowAutograd():
            return ops.batch_norm_forward(
                input, weight, bias, running_mean, running_var, training, eps, relu
            )

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
        input, weight, bias, running_mean, running_var, training, eps, relu = inputs
        _, save_mean, save_var = output
        ctx.mark_non_differentiable(save_mean, save_var)
        # bias is needed only for the ReLU mask, which is recomputed from x instead of stored.
        ctx.save_for_backward(input, weight, bias if relu else None, save_mean, save_var)
        ctx.bn_args = (bool(training), float(eps), bool(relu))

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor, grad_mean: Any = None, grad_var: Any = None):
        input, weight, bias, save_mean, save_var = ctx.saved_tensors
        training, eps, relu = ctx.bn_args
        needs = ctx.needs_input_grad
        mask = [bool(needs[0]), bool(needs[1]), bool(needs[2])]
        if not any(mask):
            return (None,) * 8
        grad_input, grad_weight, grad_bias = ops.batch_norm_backward(
            grad_output.contiguous(),
            input,
            weight,
            bias,
            save_mean,
            save_var,
            training,
            eps,
            relu,
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
torch.library.register_autograd(
    "convkit::conv2d_forward", Conv2dFunction.backward, setup_context=Conv2dFunction.setup_context
)
torch.library.register_autograd(
    "convkit::batch_norm_forward",
    BatchNormFunction.backward,
    setup_context=BatchNormFunction.setup_context,
)


class _Conv2dEager(torch.autograd.Function):
    """Conv2dFunction in the old style (forward takes ctx): ``apply`` then goes straight to
    C++, where a Function with ``setup_context`` binds default arguments in Python first."""

    @staticmethod
    def forward(ctx: Any, input, weight, bias, stride, padding, dilation, groups):
        output = Conv2dFunction.forward(input, weight, bias, stride, padding, dilation, groups)
        Conv2dFunction.setup_context(
            ctx, (input, weight, bias, stride, padding, dilation, groups), output
        )
        return output

    backward = Conv2dFunction.backward


class _BatchNormEager(torch.autograd.Function):
    """BatchNormFunction in the old style, for the same reason as _Conv2dEager."""

    @staticmethod
    def forward(ctx: Any, input, weight, bias, running_mean, running_var, training, eps, relu):
        inputs = (input, weight, bias, running_mean, running_var, training, eps, relu)
        output = BatchNormFunction.forward(*inputs)
        BatchNormFunction.setup_context(ctx, inputs, output)
        return output

    backward = BatchNormFunction.backward


def _records_graph(*tensors: Optional[torch.Tensor]) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _functorch() -> bool:
    """Inside a torch.func transform (grad, jacrev, ...): those need a Function with
    setup_context, which Conv2dFunction/BatchNormFunction are and the eager ones are not."""
    return torch._C._are_functorch_transforms_active()


def _forward_with_autograd(
    op: Callable[..., Any],
    function: type[torch.autograd.Function],
    eager_function: type[torch.autograd.Function],
    differentiable: Sequence[Optional[torch.Tensor]],
    args: tuple,
) -> Any:
    """op(*args) with autograd, the cheapest way the context allows: the registered op under
    torch.compile, ``function`` under torch.func transforms, ``eager_function`` when a graph
    is recorded (some of ``differentiable`` requires grad), else the op below autograd."""
    if torch.compiler.is_compiling():
        return op(*args)
    if _functorch():
        return function.apply(*args)
    if _records_graph(*differentiable):
        return eager_function.apply(*args)
    with torch._C._AutoDispatchBelowAutograd():
        return op(*args)


def conv2d(
    input: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    groups: int,
) -> torch.Tensor:
    """``convkit::conv2d_forward`` with autograd: [N, C, H, W] -> [N, O, oH, oW]."""
    return _forward_with_autograd(
        ops.conv2d_forward, Conv2dFunction, _Conv2dEager, (input, weight, bias),
        (input, weight, bias, stride, padding, dilation, groups),
    )


def batch_norm(
    input: torch.Tensor,
    weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    running_mean: Optional[torch.Tensor],
    running_var: Optional[torch.Tensor],
    training: bool,
    eps: float,
    relu: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``convkit::batch_norm_forward`` with autograd: (output, save_mean, save_var)."""
    return _forward_with_autograd(
        ops.batch_norm_forward, BatchNormFunction, _BatchNormEager, (input, weight, bias),
        (input, weight, bias, running_mean, running_var, training, eps, relu),
    )
