"""Drop-in modules running on convkit's kernels, and ``convert`` to move a model onto them.

``Conv2d`` and ``BatchNorm2d`` subclass torch's, so they have the same constructor
arguments, parameters, buffers, initialisation, ``state_dict`` keys and ``repr``: weights
load both ways, and code that checks ``isinstance(m, torch.nn.Conv2d)`` keeps working.
Only the arithmetic differs.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from convkit import functional

__all__ = ["Conv2d", "BatchNorm2d", "BatchNormReLU2d", "convert"]


def _refuse_torchscript(module: nn.Module):
    raise RuntimeError(
        f"convkit's {type(module).__name__} cannot be compiled by torch.jit.script: its forward "
        "calls convkit's custom ops through Python. Use torch.compile or torch.export, which "
        "support convkit's ops (TorchScript is deprecated in torch)."
    )


class Conv2d(nn.Conv2d):
    """``torch.nn.Conv2d`` on convkit's im2col + GEMM kernels (all of its arguments,
    ``padding_mode`` 'zeros', 'reflect', 'replicate' and 'circular' included).

    input [N, C_in, H, W] or [C_in, H, W] -> [N, C_out, oH, oW] or [C_out, oH, oW].
    """

    def __prepare_scriptable__(self):
        _refuse_torchscript(self)

    def _conv_forward(self, input: torch.Tensor, weight: torch.Tensor, bias) -> torch.Tensor:
        if self.padding_mode != "zeros":
            padded = F.pad(input, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            return functional.conv2d(padded, weight, bias, self.stride, 0, self.dilation, self.groups)
        return functional.conv2d(
            input, weight, bias, self.stride, self.padding, self.dilation, self.groups
        )


class BatchNorm2d(nn.BatchNorm2d):
    """``torch.nn.BatchNorm2d`` on convkit's fused batch-norm kernel.

    input [N, C, H, W] -> [N, C, H, W]. Training uses batch statistics and updates the
    running ones (momentum, or a cumulative average when momentum is None); eval uses the
    running statistics (unless track_running_stats=False).
    """

    fuse_relu = False

    def __prepare_scriptable__(self):
        _refuse_torchscript(self)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(input)
        # The same bookkeeping as torch's _BatchNorm.forward, so both behave identically.
        if self.momentum is None:
            exponential_average_factor = 0.0
        else:
            exponential_average_factor = self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:
                exponential_average_factor = 1.0 / float(self.num_batches_tracked)
            else:
                exponential_average_factor = self.momentum
        if self.training:
            bn_training = True
        else:
            bn_training = (self.running_mean is None) and (self.running_var is None)
        use_running = not self.training or self.track_running_stats
        kernel = functional.batch_norm_relu if self.fuse_relu else functional.batch_norm
        return kernel(
            input,
            self.running_mean if use_running else None,
            self.running_var if use_running else None,
            self.weight,
            self.bias,
            bn_training,
            exponential_average_factor,
            self.eps,
        )


class BatchNormReLU2d(BatchNorm2d):
    """``relu(BatchNorm2d(x))`` in one fused kernel. Same arguments, parameters, buffers and
    ``state_dict`` keys as ``torch.nn.BatchNorm2d``.

    input [N, C, H, W] -> [N, C, H, W], every value >= 0.
    """

    fuse_relu = True


def _has_hooks(module: nn.Module) -> bool:
    hooks = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
    return any(getattr(module, name, None) for name in hooks)


def _convert_children(module: nn.Module) -> None:
    for child in module.children():
        _convert_children(child)
    # Swapping the class keeps every parameter, buffer, hook, dtype, device and the
    # train/eval flag exactly as they are: the modules differ only in forward. Exact type
    # checks leave user subclasses (which may change forward) alone.
    for child in module.children():
        if type(child) is nn.Conv2d:
            child.__class__ = Conv2d
        elif type(child) is nn.BatchNorm2d:
            child.__class__ = BatchNorm2d
    if isinstance(module, nn.Sequential):
        names = list(module._modules.keys())
        for name, next_name in zip(names, names[1:]):
            current, following = module._modules[name], module._modules[next_name]
            # A hook on the ReLU would be lost with it, and one on the batch norm would see
            # the ReLU's output: hooked pairs stay apart.
            if (type(current) is BatchNorm2d and type(following) is nn.ReLU
                    and not _has_hooks(current) and not _has_hooks(following)):
                current.__class__ = BatchNormReLU2d
                identity = nn.Identity()
                identity.train(following.training)
                module._modules[next_name] = identity


def convert(module: nn.Module, inplace: bool = False) -> nn.Module:
    """The model with every ``nn.Conv2d`` and ``nn.BatchNorm2d`` running on convkit.

    A BatchNorm2d immediately followed by a ReLU in an ``nn.Sequential`` becomes one fused
    ``BatchNormReLU2d`` and the ReLU an ``nn.Identity`` (it has no state, so the
    ``state_dict`` keys do not change), unless either has hooks (which fusing would lose or
    change). Weights, buffers, dtype, device and train/eval mode
    are carried over. Works on a deep copy unless ``inplace=True``.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"convert: expected an nn.Module, got {type(module).__name__}")
    model = module if inplace else copy.deepcopy(module)
    if type(model) is nn.Conv2d:
        model.__class__ = Conv2d
    elif type(model) is nn.BatchNorm2d:
        model.__class__ = BatchNorm2d
    _convert_children(model)
    return model
