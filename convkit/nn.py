"""Drop-in modules running on convkit's kernels, and ``convert`` to move a model onto them.

``Conv2d`` and ``BatchNorm2d`` subclass torch's, so they have the same constructor
arguments, parameters, buffers, initialisation, ``state_dict`` keys and ``repr``: weights
load both ways, and code that checks ``isinstance(m, torch.nn.Conv2d)`` keeps working.
Only the arithmetic differs.
"""
from __future__ import annotations

import copy
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from convkit import functional
from convkit.sync_batch_norm import Handshake, sync_batch_norm

__all__ = ["Conv2d", "BatchNorm2d", "BatchNormReLU2d", "SyncBatchNorm", "SyncBatchNormReLU2d",
           "convert"]


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
        kernel = functional.batch_norm_relu if self.fuse_relu else functional.batch_norm
        return kernel(input, *_local_arguments(self))


def _local_arguments(module: nn.modules.batchnorm._BatchNorm) -> tuple:
    """(running_mean, running_var, weight, bias, training, momentum, eps) of a batch-norm
    module's forward, with the same bookkeeping as torch's ``_BatchNorm.forward`` (counting
    batches, the cumulative average when momentum is None), so both behave identically."""
    if module.momentum is None:
        exponential_average_factor = 0.0
    else:
        exponential_average_factor = module.momentum
    if module.training and module.track_running_stats and module.num_batches_tracked is not None:
        module.num_batches_tracked.add_(1)
        if module.momentum is None:
            exponential_average_factor = 1.0 / float(module.num_batches_tracked)
        else:
            exponential_average_factor = module.momentum
    if module.training:
        bn_training = True
    else:
        bn_training = (module.running_mean is None) and (module.running_var is None)
    use_running = not module.training or module.track_running_stats
    return (
        module.running_mean if use_running else None,
        module.running_var if use_running else None,
        module.weight,
        module.bias,
        bn_training,
        exponential_average_factor,
        module.eps,
    )


class BatchNormReLU2d(BatchNorm2d):
    """``relu(BatchNorm2d(x))`` in one fused kernel. Same arguments, parameters, buffers and
    ``state_dict`` keys as ``torch.nn.BatchNorm2d``.

    input [N, C, H, W] -> [N, C, H, W], every value >= 0.
    """

    fuse_relu = True


class SyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """``torch.nn.SyncBatchNorm`` on convkit's kernels, on the CPU (gloo) as well as CUDA
    (nccl); torch's refuses CPU tensors. Same constructor (``process_group`` included),
    parameters, buffers and ``state_dict`` keys as torch's.

    input [N, C, *] -> [N, C, *]. In training, with ``torch.distributed`` initialised and more
    than one process in the group (``process_group``, else the default group), normalises with
    the statistics of every process's batch, weighted by their sizes, and updates the running
    statistics with them, identically on every process (see ``convkit.sync_batch_norm``).
    Otherwise, as torch's, it is a local batch norm: in eval, and when not distributed or alone
    in its group.

    It is not a subclass of ``torch.nn.SyncBatchNorm``: DistributedDataParallel refuses those
    on the CPU ("SyncBatchNorm layers only work with GPU modules").
    """

    fuse_relu = False

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1,
                 affine: bool = True, track_running_stats: bool = True, process_group=None,
                 device=None, dtype=None, **kwargs) -> None:
        # kwargs: what torch's batch norm takes beyond these in this torch (bias=, 2.14).
        super().__init__(num_features, eps, momentum, affine, track_running_stats,
                         device=device, dtype=dtype, **kwargs)
        self.process_group = process_group

    def __prepare_scriptable__(self):
        _refuse_torchscript(self)

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def _check_non_zero_input_channels(self, input: torch.Tensor) -> None:
        if input.size(1) == 0:
            raise ValueError("SyncBatchNorm number of input channels should be non-zero")

    def _group_and_size(self):
        """The process group to synchronise over and its size, or (None, 1) to run locally."""
        if not (dist.is_available() and dist.is_initialized()):
            if self.process_group is not None:
                raise RuntimeError(
                    f"{type(self).__name__} was given a process_group, but torch.distributed is "
                    "not initialised (or was destroyed): call torch.distributed."
                    "init_process_group first, or set process_group=None to normalise locally"
                )
            return None, 1
        group = self.process_group if self.process_group is not None else dist.group.WORLD
        if dist.get_rank(group) < 0:
            raise RuntimeError(
                f"{type(self).__name__}: this process (global rank {dist.get_rank()}) is not a "
                "member of the layer's process_group"
            )
        return group, dist.get_world_size(group)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(input)
        self._check_non_zero_input_channels(input)
        arguments = _local_arguments(self)
        running_mean, running_var, weight, bias, bn_training, momentum, eps = arguments
        if bn_training and self.training:
            group, world_size = self._group_and_size()
            if world_size > 1:
                # Kept on the layer, outside its state (it holds no tensor).
                handshake = self.__dict__.setdefault("_sync_handshake", Handshake())
                return sync_batch_norm(input, running_mean, running_var, weight, bias, momentum,
                                       eps, self.fuse_relu, group, world_size, handshake)
        kernel = functional.batch_norm_relu if self.fuse_relu else functional.batch_norm
        return kernel(input, *arguments)

    @classmethod
    def convert_sync_batchnorm(cls, module: nn.Module, process_group=None) -> nn.Module:
        """``module`` with every batch norm of an exact torch or convkit type (BatchNorm1d/2d/3d,
        torch's SyncBatchNorm, convkit's BatchNorm2d) turned into a convkit ``SyncBatchNorm``, and
        convkit's BatchNormReLU2d into ``SyncBatchNormReLU2d``, in place (their parameters,
        buffers, hooks and mode are kept); a batch norm given as ``module`` itself is converted
        and returned. Subclasses, which may change forward, are left alone."""
        _to_sync(module, process_group)
        for child in module.modules():
            _to_sync(child, process_group)
        return module


class SyncBatchNormReLU2d(SyncBatchNorm):
    """``relu(SyncBatchNorm(x))`` in one fused kernel, for [N, C, H, W] input. Same arguments,
    parameters, buffers and ``state_dict`` keys as ``torch.nn.SyncBatchNorm``."""

    fuse_relu = True

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() != 4:
            raise ValueError(f"expected 4D input (got {input.dim()}D input)")


_SYNC_OF = {
    nn.BatchNorm1d: SyncBatchNorm,
    nn.BatchNorm2d: SyncBatchNorm,
    nn.BatchNorm3d: SyncBatchNorm,
    nn.SyncBatchNorm: SyncBatchNorm,
    BatchNorm2d: SyncBatchNorm,
    BatchNormReLU2d: SyncBatchNormReLU2d,
}


def _to_sync(module: nn.Module, process_group) -> None:
    """Swaps an exact batch-norm type for its synchronised counterpart, in place."""
    target = _SYNC_OF.get(type(module))
    if target is not None:
        module.__class__ = target
        module.process_group = process_group
    elif isinstance(module, SyncBatchNorm) and process_group is not None:
        module.process_group = process_group


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


def convert(module: nn.Module, inplace: bool = False, sync_batchnorm: bool = False,
            process_group=None) -> nn.Module:
    """The model with every ``nn.Conv2d`` and ``nn.BatchNorm2d`` running on convkit.

    A BatchNorm2d immediately followed by a ReLU in an ``nn.Sequential`` becomes one fused
    ``BatchNormReLU2d`` and the ReLU an ``nn.Identity`` (it has no state, so the
    ``state_dict`` keys do not change), unless either has hooks (which fusing would lose or
    change). With ``sync_batchnorm=True`` the batch norms become ``SyncBatchNorm`` and
    ``SyncBatchNormReLU2d`` instead (``SyncBatchNorm.convert_sync_batchnorm``), synchronised
    over ``process_group`` (default: the whole world) when trained under torch.distributed.
    Weights, buffers, dtype, device and train/eval mode are carried over. Works on a deep copy
    unless ``inplace=True``.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"convert: expected an nn.Module, got {type(module).__name__}")
    model = module if inplace else copy.deepcopy(module)
    if type(model) is nn.Conv2d:
        model.__class__ = Conv2d
    elif type(model) is nn.BatchNorm2d:
        model.__class__ = BatchNorm2d
    _convert_children(model)
    if sync_batchnorm:
        SyncBatchNorm.convert_sync_batchnorm(model, process_group)
    return model
