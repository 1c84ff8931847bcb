"""Synchronised batch norm(+ReLU) across processes, on convkit's kernels.

Training, with W processes of a ``torch.distributed`` process group, each holding its own part
of the batch:

forward
    1. ``batch_norm_stats``: this process's per-channel mean and biased variance (float64).
    2. ``all_gather`` of a header (channels, dtype, values per channel) from every process: if
       they disagree, every process raises the same error instead of running collectives of
       different sizes. The counts weight each process's statistics (local batches may differ).
    3. ``all_gather`` of the statistics, ``batch_norm_combine_stats`` merges them (Chan's
       formula in double: no cancellation, unlike gathering sums and sums of squares), the
       running statistics take the combined ones (the same values on every process), and
       ``batch_norm_forward``'s eval pass normalises with them (+ ReLU), rounded once to
       float32 (float64 input: float64) as one process's forward rounds its own.
backward
    4. ``batch_norm_backward_reduce``: this process's sum(dy') and sum(dy' * (x - mean)) in
       double (dy' masked by the ReLU, recomputed from x) and its grad_weight / grad_bias.
    5. ``all_reduce`` (sum) of the two sums; ``batch_norm_backward_elemt`` gives grad_input.

grad_weight and grad_bias are this process's own, as torch's SyncBatchNorm returns them:
DistributedDataParallel then averages them with the other parameters' gradients. The header
costs one small collective and one host synchronisation per layer and step; that is the price
of an error instead of a hang when processes disagree.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.distributed as dist

from convkit import ops

__all__ = ["sync_batch_norm", "SyncBatchNormError"]

# Codes of the input dtypes in the header (processes must agree on one).
_DTYPE_CODES = {torch.float64: 0, torch.float32: 1, torch.float16: 2, torch.bfloat16: 3}
_DTYPE_NAMES = {code: str(dtype).replace("torch.", "") for dtype, code in _DTYPE_CODES.items()}


class SyncBatchNormError(RuntimeError):
    """The processes of a synchronised batch norm disagree (channels, dtype), or together hold
    too few values to normalise: raised on every process alike."""


def _gather(tensor: torch.Tensor, group: Any, world_size: int) -> torch.Tensor:
    """[*] on every process -> [world_size, *], in rank order."""
    parts = [torch.empty_like(tensor) for _ in range(world_size)]
    dist.all_gather(parts, tensor, group=group)
    return torch.stack(parts)


def _agreed_counts(input: torch.Tensor, group: Any, world_size: int) -> list[int]:
    """Every process's values per channel, after checking that all of them have the same number
    of channels and the same dtype (every process sees the same table, so all raise alike)."""
    channels = input.shape[1]
    count = input.numel() // channels
    header = torch.tensor([channels, _DTYPE_CODES[input.dtype], count], dtype=torch.int64,
                          device=input.device)
    table = _gather(header, group, world_size).tolist()
    if any(row[:2] != table[0][:2] for row in table):
        described = ", ".join(
            f"rank {rank}: {row[0]} channels, {_DTYPE_NAMES.get(row[1], '?')}"
            for rank, row in enumerate(table)
        )
        raise SyncBatchNormError(
            "SyncBatchNorm: the processes disagree on the input's channels or dtype "
            f"({described}); every process must run the same model on the same dtype"
        )
    return [row[2] for row in table]


class _SyncBatchNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input, weight, bias, running_mean, running_var, momentum, eps, relu, group,
                world_size):
        input = input.contiguous()
        channels = input.shape[1]
        counts = _agreed_counts(input, group, world_size)
        total = sum(counts)
        if total <= 1:
            raise SyncBatchNormError(
                "SyncBatchNorm: expected more than 1 value per channel when training, but the "
                f"{world_size} processes hold {total} in all (values per channel by rank: "
                f"{counts})"
            )
        mean, var = ops.batch_norm_stats(input)
        stats = _gather(torch.cat([mean, var]), group, world_size)
        mean, var = ops.batch_norm_combine_stats(
            stats[:, :channels], stats[:, channels:], counts
        )
        if running_mean is not None:
            ops.batch_norm_update_stats(running_mean, running_var, mean, var, momentum, total)
        # Rounded once, as one process's forward rounds its statistics.
        stats_dtype = torch.float64 if input.dtype == torch.float64 else torch.float32
        mean = mean.to(stats_dtype)
        var = var.to(stats_dtype)
        output, _, _ = ops.batch_norm_forward(input, weight, bias, mean, var, False, eps, relu)
        ctx.save_for_backward(input, weight, bias, mean, var)
        ctx.total = total
        ctx.eps = eps
        ctx.relu = relu
        ctx.group = group
        return output

    @staticmethod
    def backward(ctx, grad_output):
        input, weight, bias, mean, var = ctx.saved_tensors
        grad_output = grad_output.contiguous()
        channels = input.shape[1]
        sum_dy, sum_dy_xmu, grad_weight, grad_bias = ops.batch_norm_backward_reduce(
            grad_output, input, mean, var, weight, bias, ctx.eps, ctx.relu
        )
        grad_input = None
        if ctx.needs_input_grad[0]:
            sums = torch.cat([sum_dy, sum_dy_xmu])
            dist.all_reduce(sums, group=ctx.group)
            grad_input = ops.batch_norm_backward_elemt(
                grad_output, input, mean, var, weight, bias, sums[:channels], sums[channels:],
                ctx.total, ctx.eps, ctx.relu,
            )
        return (
            grad_input,
            grad_weight if weight is not None and ctx.needs_input_grad[1] else None,
            grad_bias if bias is not None and ctx.needs_input_grad[2] else None,
            None, None, None, None, None, None, None,
        )


def sync_batch_norm(
    input: torch.Tensor,
    running_mean: Optional[torch.Tensor],
    running_var: Optional[torch.Tensor],
    weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    momentum: float,
    eps: float,
    relu: bool,
    group: Any,
    world_size: int,
) -> torch.Tensor:
    """Training batch norm (+ ReLU when ``relu``) with the statistics of every process of
    ``group`` (``world_size`` of them; each passes its own part of the batch).

    input [N, C, *] -> [N, C, *]; running_mean, running_var, weight, bias [C] or None. The
    running statistics are updated in place with the combined batch statistics (variance
    unbiased by the total count), identically on every process. Every process of the group
    must call it, with the same C and dtype (else SyncBatchNormError on all of them).
    """
    if input.dtype not in _DTYPE_CODES:
        raise TypeError(
            "SyncBatchNorm: expected a floating-point input (float64, float32, float16 or "
            f"bfloat16), but got {input.dtype}"
        )
    return _SyncBatchNormFunction.apply(input, weight, bias, running_mean, running_var,
                                        float(momentum), float(eps), relu, group, world_size)
