"""vmap rules (batching rules) of convkit's ops, so that ``torch.func.vmap`` runs them as
one call of our kernels instead of failing ("does not have vmap support").

Every rule is exact: the vmapped dimension (size B) is folded into a dimension the op already
treats independently.
- conv2d and its backward: into the groups. The images [N, B*C, H, W] against weights
  [B*O, C/g, kH, kW] with B*g groups give each vmapped slice its own weight and its own
  weight gradient (per-sample gradients). When only the images are vmapped and no weight or
  bias gradient is wanted, into the batch instead: [B*N, C, H, W], one GEMM as before.
- batch norm and its backward: into the channels, [N, B*C, *], so that every slice has its
  own statistics, as a loop over the slices would.
- im2col, col2im: into the batch.
- the running-statistics update: one update per slice, in place; vmapped batch statistics
  into shared running statistics are refused, as torch refuses them.
"""
from __future__ import annotations

from typing import Optional

import torch

from convkit import ops


def _with_batch(t: Optional[torch.Tensor], dim: Optional[int], size: int) -> Optional[torch.Tensor]:
    """t with its vmapped dimension first: [B, ...] (a broadcast view when t is not vmapped)."""
    if t is None:
        return None
    if dim is None:
        return t.unsqueeze(0).expand(size, *t.shape)
    return t.movedim(dim, 0)


def _images_into_channels(t: torch.Tensor, dim: Optional[int], size: int) -> torch.Tensor:
    """[B, N, C, *] -> [N, B*C, *]."""
    return _with_batch(t, dim, size).movedim(0, 1).flatten(1, 2)


def _per_channel(t: Optional[torch.Tensor], dim: Optional[int], size: int) -> Optional[torch.Tensor]:
    """[B, C] -> [B*C]."""
    if t is None:
        return None
    return _with_batch(t, dim, size).flatten(0, 1)


@torch.library.register_vmap("convkit::conv2d_forward")
def _conv2d_forward_vmap(info, in_dims, input, weight, bias, stride, padding, dilation, groups):
    input_dim, weight_dim, bias_dim = in_dims[:3]
    size = info.batch_size
    if weight_dim is None and bias_dim is None:
        x = input.movedim(input_dim, 0)
        out = ops.conv2d_forward(x.flatten(0, 1), weight, bias, stride, padding, dilation, groups)
        return out.unflatten(0, (size, x.shape[1])), 0
    out = ops.conv2d_forward(
        _images_into_channels(input, input_dim, size),
        _with_batch(weight, weight_dim, size).flatten(0, 1),
        _per_channel(bias, bias_dim, size),
        stride, padding, dilation, groups * size,
    )
    return out.unflatten(1, (size, -1)), 1


@torch.library.register_vmap("convkit::conv2d_backward")
def _conv2d_backward_vmap(info, in_dims, grad_output, input, weight, stride, padding, dilation,
                          groups, output_mask):
    grad_dim, input_dim, weight_dim = in_dims[:3]
    size = info.batch_size
    if weight_dim is None and not output_mask[1] and not output_mask[2]:
        dy = _with_batch(grad_output, grad_dim, size)
        x = _with_batch(input, input_dim, size)
        grad_input, grad_weight, grad_bias = ops.conv2d_backward(
            dy.flatten(0, 1), x.flatten(0, 1), weight, stride, padding, dilation, groups, output_mask
        )
        if output_mask[0]:
            grad_input = grad_input.unflatten(0, (size, x.shape[1]))
        return (grad_input, grad_weight, grad_bias), (0 if output_mask[0] else None, None, None)
    grad_input, grad_weight, grad_bias = ops.conv2d_backward(
        _images_into_channels(grad_output, grad_dim, size),
        _images_into_channels(input, input_dim, size),
        _with_batch(weight, weight_dim, size).flatten(0, 1),
        stride, padding, dilation, groups * size, output_mask,
    )
    outputs = (
        grad_input.unflatten(1, (size, -1)) if output_mask[0] else grad_input,
        grad_weight.unflatten(0, (size, -1)) if output_mask[1] else grad_weight,
        grad_bias.unflatten(0, (size, -1)) if output_mask[2] else grad_bias,
    )
    dims = (1 if output_mask[0] else None, 0 if output_mask[1] else None, 0 if output_mask[2] else None)
    return outputs, dims


@torch.library.register_vmap("convkit::batch_norm_forward")
def _batch_norm_forward_vmap(info, in_dims, input, weight, bias, running_mean, running_var,
                             training, eps, activation, alpha, beta):
    size = info.batch_size
    x = _with_batch(input, in_dims[0], size)
    channels = x.shape[2]
    per_channel = [_per_channel(t, d, size) for t, d in zip(
        (weight, bias, running_mean, running_var), in_dims[1:5])]
    out, mean, var = ops.batch_norm_forward(x.movedim(0, 1).flatten(1, 2), *per_channel,
                                            training, eps, activation, alpha, beta)
    return ((out.unflatten(1, (size, channels)), mean.unflatten(0, (size, channels)),
             var.unflatten(0, (size, channels))), (1, 0, 0))


@torch.library.register_vmap("convkit::batch_norm_backward")
def _batch_norm_backward_vmap(info, in_dims, grad_output, input, weight, bias, save_mean,
                              save_var, training, eps, activation, alpha, beta,
                              output_mask):
    size = info.batch_size
    x = _with_batch(input, in_dims[1], size)
    channels = x.shape[2]
    grad_input, grad_weight, grad_bias = ops.batch_norm_backward(
        _images_into_channels(grad_output, in_dims[0], size),
        x.movedim(0, 1).flatten(1, 2),
        *[_per_channel(t, d, size) for t, d in zip((weight, bias, save_mean, save_var), in_dims[2:6])],
        training, eps, activation, alpha, beta, output_mask,
    )
    outputs = (
        grad_input.unflatten(1, (size, channels)) if output_mask[0] else grad_input,
        grad_weight.unflatten(0, (size, channels)) if output_mask[1] else grad_weight,
        grad_bias.unflatten(0, (size, channels)) if output_mask[2] else grad_bias,
    )
    dims = (1 if output_mask[0] else None, 0 if output_mask[1] else None, 0 if output_mask[2] else None)
    return outputs, dims


@torch.library.register_vmap("convkit::batch_norm_update_stats")
def _batch_norm_update_stats_vmap(info, in_dims, running_mean, running_var, batch_mean, batch_var,
                                  momentum, count):
    running_dims, batch_dims = in_dims[:2], in_dims[2:4]
    if all(d is None for d in running_dims + batch_dims):
        ops.batch_norm_update_stats(running_mean, running_var, batch_mean, batch_var, momentum, count)
        return None, None
    if any(d is None for d in running_dims):
        raise RuntimeError(
            "convkit::batch_norm_update_stats under vmap: the batch statistics are vmapped but "
            "the running statistics are shared, so every slice would write into the same "
            "running statistics (torch refuses this too). Vmap the running statistics as well "
            "(torch.func.functional_call with batched buffers), or run the batch norm in eval "
            "mode or without running statistics."
        )
    size = info.batch_size
    means = _with_batch(running_mean, running_dims[0], size)
    variances = _with_batch(running_var, running_dims[1], size)
    batch_means = _with_batch(batch_mean, batch_dims[0], size)
    batch_variances = _with_batch(batch_var, batch_dims[1], size)
    for b in range(size):  # each slice's statistics are strided views, updated in place
        ops.batch_norm_update_stats(means[b], variances[b], batch_means[b], batch_variances[b],
                                    momentum, count)
    return None, None


@torch.library.register_vmap("convkit::im2col")
def _im2col_vmap(info, in_dims, input, kernel_size, dilation, padding, stride):
    x = input.movedim(in_dims[0], 0)
    columns = ops.im2col(x.flatten(0, 1), kernel_size, dilation, padding, stride)
    return columns.unflatten(0, (info.batch_size, x.shape[1])), 0


@torch.library.register_vmap("convkit::col2im")
def _col2im_vmap(info, in_dims, columns, output_size, kernel_size, dilation, padding, stride):
    c = columns.movedim(in_dims[0], 0)
    images = ops.col2im(c.flatten(0, 1), output_size, kernel_size, dilation, padding, stride)
    return images.unflatten(0, (info.batch_size, c.shape[1])), 0
