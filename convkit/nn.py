"""Drop-in modules running on convkit's kernels, and ``convert`` to move a model onto them.

``Conv2d`` and ``BatchNorm2d`` subclass torch's, so they have the same constructor
arguments, parameters, buffers, initialisation, ``state_dict`` keys and ``repr``: weights
load both ways, and code that checks ``isinstance(m, torch.nn.Conv2d)`` keeps working.
Only the arithmetic differs.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from convkit import functional
from convkit.sync_batch_norm import Handshake, sync_batch_norm

__all__ = ["Conv2d", "BatchNorm2d", "BatchNormReLU2d", "BatchNormActivation2d", "SyncBatchNorm",
           "SyncBatchNormReLU2d", "SyncBatchNormActivation2d", "convert", "fusion_summary"]


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

    # The activation fused after the normalisation, as the ops take it: (name, alpha, beta).
    fused_activation: tuple[str, float, float] = ("none", 0.0, 0.0)

    def __prepare_scriptable__(self):
        _refuse_torchscript(self)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(input)
        return functional._batch_norm(input, *_local_arguments(self), self.fused_activation)


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


def _activation_repr(activation: tuple[str, float, float]) -> str:
    name = functional.activation_name(activation)
    _, alpha, beta = activation
    if name == "hardtanh":
        return f"hardtanh(min_val={alpha}, max_val={beta})"
    if name == "leaky_relu":
        return f"leaky_relu(negative_slope={alpha})"
    return name


class BatchNormReLU2d(BatchNorm2d):
    """``relu(BatchNorm2d(x))`` in one fused kernel. Same arguments, parameters, buffers and
    ``state_dict`` keys as ``torch.nn.BatchNorm2d``.

    input [N, C, H, W] -> [N, C, H, W], every value >= 0.
    """

    fused_activation = ("relu", 0.0, 0.0)


class BatchNormActivation2d(BatchNorm2d):
    """``f(BatchNorm2d(x))`` in one fused kernel, forward and backward, for f one of "relu",
    "relu6", "hardtanh" (``min_val``, ``max_val``), "leaky_relu" (``negative_slope``), "silu",
    "hardswish": the values and gradients of ``nn.BatchNorm2d`` followed by torch's activation.
    Same parameters, buffers and ``state_dict`` keys as ``torch.nn.BatchNorm2d``.

    input [N, C, H, W] -> [N, C, H, W].
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1,
                 affine: bool = True, track_running_stats: bool = True, device=None, dtype=None,
                 *, activation: str = "relu", negative_slope: float = 0.01, min_val: float = -1.0,
                 max_val: float = 1.0) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device,
                         dtype=dtype)
        self.fused_activation = functional.activation_arguments(
            activation, negative_slope=negative_slope, min_val=min_val, max_val=max_val)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, activation={_activation_repr(self.fused_activation)}"


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

    fused_activation: tuple[str, float, float] = ("none", 0.0, 0.0)

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
                                       eps, self.fused_activation, group, world_size, handshake)
        return functional._batch_norm(input, *arguments, self.fused_activation)

    @classmethod
    def convert_sync_batchnorm(cls, module: nn.Module, process_group=None) -> nn.Module:
        """``module`` with every batch norm of an exact torch or convkit type (BatchNorm1d/2d/3d,
        torch's SyncBatchNorm, convkit's BatchNorm2d) turned into a convkit ``SyncBatchNorm``, and
        convkit's BatchNormReLU2d and BatchNormActivation2d into ``SyncBatchNormReLU2d`` and
        ``SyncBatchNormActivation2d``, in place (their parameters, buffers, hooks, mode and fused
        activation are kept); a batch norm given as ``module`` itself is converted
        and returned. Subclasses, which may change forward, are left alone."""
        _to_sync(module, process_group)
        for child in module.modules():
            _to_sync(child, process_group)
        return module


class SyncBatchNormReLU2d(SyncBatchNorm):
    """``relu(SyncBatchNorm(x))`` in one fused kernel, for [N, C, H, W] input. Same arguments,
    parameters, buffers and ``state_dict`` keys as ``torch.nn.SyncBatchNorm``."""

    fused_activation = ("relu", 0.0, 0.0)

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() != 4:
            raise ValueError(f"expected 4D input (got {input.dim()}D input)")


class SyncBatchNormActivation2d(SyncBatchNorm):
    """``f(SyncBatchNorm(x))`` in one fused kernel, for [N, C, H, W] input and the activations
    of :class:`BatchNormActivation2d` (same keyword arguments). Same parameters, buffers and
    ``state_dict`` keys as ``torch.nn.SyncBatchNorm``."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1,
                 affine: bool = True, track_running_stats: bool = True, process_group=None,
                 device=None, dtype=None, *, activation: str = "relu",
                 negative_slope: float = 0.01, min_val: float = -1.0, max_val: float = 1.0) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, process_group,
                         device=device, dtype=dtype)
        self.fused_activation = functional.activation_arguments(
            activation, negative_slope=negative_slope, min_val=min_val, max_val=max_val)

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() != 4:
            raise ValueError(f"expected 4D input (got {input.dim()}D input)")

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, activation={_activation_repr(self.fused_activation)}"


_SYNC_OF = {
    nn.BatchNorm1d: SyncBatchNorm,
    nn.BatchNorm2d: SyncBatchNorm,
    nn.BatchNorm3d: SyncBatchNorm,
    nn.SyncBatchNorm: SyncBatchNorm,
    BatchNorm2d: SyncBatchNorm,
    BatchNormReLU2d: SyncBatchNormReLU2d,
    BatchNormActivation2d: SyncBatchNormActivation2d,
}


def _to_sync(module: nn.Module, process_group) -> None:
    """Swaps an exact batch-norm type for its synchronised counterpart, in place."""
    target = _SYNC_OF.get(type(module))
    if target is not None:
        module.__class__ = target
        module.process_group = process_group
    elif isinstance(module, SyncBatchNorm) and process_group is not None:
        module.process_group = process_group


# convert lives with the fusion passes; imported last, as it builds on the modules above.
from convkit.conversion import convert, fusion_summary  # noqa: E402
