"""Synchronised batch norm(+ReLU) across processes, on convkit's kernels.

Training, with W processes of a ``torch.distributed`` process group, each holding its own part
of the batch:

forward
    1. ``batch_norm_stats``: this process's per-channel mean and biased variance (float64).
    2. one ``all_gather`` of [channels, dtype, values per channel, mean, var] from every
       process (sized by what the layer's processes agreed on, :class:`Handshake`): if the
       headers disagree, every process raises the same error instead of going on with
       collectives of different sizes. The counts weight each process's statistics (local
       batches may differ).
    3. ``batch_norm_combine_stats`` merges them (Chan's formula in double: no cancellation,
       unlike gathering sums and sums of squares), the running statistics take the combined
       ones (the same values on every process), and ``batch_norm_forward``'s eval pass
       normalises with them (+ ReLU), rounded once to float32 (float64 input: float64) as one
       process's forward rounds its own.
backward
    4. ``batch_norm_backward_reduce``: this process's sum(dy') and sum(dy' * (x - mean)) in
       double (dy' masked by the ReLU, recomputed from x) and its grad_weight / grad_bias.
    5. the two sums of every process (``all_gather``, summed in rank order);
       ``batch_norm_backward_elemt`` gives grad_input.

grad_weight and grad_bias are this process's own, as torch's SyncBatchNorm returns them:
DistributedDataParallel then averages them with the other parameters' gradients. Each step
costs a layer two collectives (as torch's SyncBatchNorm) and one host synchronisation (to read
the headers), plus one small collective on the layer's first step (the handshake).
"""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.distributed as dist

from convkit import ops

__all__ = ["sync_batch_norm", "SyncBatchNormError", "Handshake"]

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


class Handshake:
    """What a layer's processes agreed on: the channels of its statistics, over which group.

    The statistics of each forward travel in one all_gather of [channels, dtype, count, mean
    [C], var [C]] per process, a size every process must know beforehand. The first forward of
    a layer (and any after its group changes) first gathers the three header values alone, so
    that processes that disagree raise instead of running collectives of different sizes.
    Afterwards a process whose input has other channels or dtype still sends the agreed size,
    and the headers tell everyone to raise."""

    def __init__(self) -> None:
        self.channels: Optional[int] = None
        self.group_id: Optional[int] = None


def _header(input: torch.Tensor) -> list[int]:
    channels = input.shape[1]
    return [channels, _DTYPE_CODES[input.dtype], input.numel() // channels]


def _check_headers(table: list[list[int]]) -> None:
    """Every process's [channels, dtype code, count]: the same channels and dtype, or the same
    error on every process."""
    if any(row[:2] != table[0][:2] for row in table):
        described = ", ".join(
            f"rank {rank}: {row[0]} channels, {_DTYPE_NAMES.get(row[1], '?')}"
            for rank, row in enumerate(table)
        )
        raise SyncBatchNormError(
            "SyncBatchNorm: the processes disagree on the input's channels or dtype "
            f"({described}); every process must run the same model on the same dtype"
        )


def _shake_hands(input: torch.Tensor, group: Any, world_size: int, handshake: Handshake) -> None:
    header = torch.tensor(_header(input), dtype=torch.int64, device=input.device)
    table = [[int(v) for v in row] for row in _gather(header, group, world_size).tolist()]
    _check_headers(table)
    handshake.channels = table[0][0]
    handshake.group_id = id(group)


def _gather_statistics(input: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, group: Any,
                       world_size: int, handshake: Handshake):
    """Every process's (counts [W], mean [W, C], var [W, C]), after checking that they agree."""
    if handshake.channels is None or handshake.group_id != id(group):
        _shake_hands(input, group, world_size, handshake)
    agreed = handshake.channels
    header = _header(input)
    packed = torch.zeros(3 + 2 * agreed, dtype=torch.float64, device=input.device)
    packed[:3] = torch.tensor(header, dtype=torch.float64)
    if header[0] == agreed:
        packed[3:3 + agreed] = mean
        packed[3 + agreed:] = var
    gathered = _gather(packed, group, world_size)
    table = [[int(v) for v in row] for row in gathered[:, :3].tolist()]
    _check_headers(table)
    if table[0][0] != agreed:
        # Every process moved to other channels alike (the same layer on another input):
        # agree on the new size and send again.
        handshake.channels = table[0][0]
        return _gather_statistics(input, mean, var, group, world_size, handshake)
    counts = [row[2] for row in table]
    return counts, gathered[:, 3:3 + agreed], gathered[:, 3 + agreed:]


class _SyncBatchNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input, weight, bias, running_mean, running_var, momentum, eps, activation, group,
                world_size, handshake):
        mean, var = ops.batch_norm_stats(input)
        counts, means, variances = _gather_statistics(input, mean, var, group, world_size,
                                                      handshake)
        total = sum(counts)
        if total <= 1:
            raise SyncBatchNormError(
                "SyncBatchNorm: expected more than 1 value per channel when training, but the "
                f"{world_size} processes hold {total} in all (values per channel by rank: "
                f"{counts})"
            )
        mean, var = ops.batch_norm_combine_stats(means, variances, counts)
        if running_mean is not None:
            ops.batch_norm_update_stats(running_mean, running_var, mean, var, momentum, total)
        # Rounded once, as one process's forward rounds its statistics.
        stats_dtype = torch.float64 if input.dtype == torch.float64 else torch.float32
        mean = mean.to(stats_dtype)
        var = var.to(stats_dtype)
        output, _, _ = ops.batch_norm_forward(input, weight, bias, mean, var, False, eps,
                                             *activation)
        ctx.save_for_backward(input, weight, bias, mean, var)
        ctx.total = total
        ctx.eps = eps
        ctx.activation = activation
        ctx.group = group
        ctx.world_size = world_size
        return output

    @staticmethod
    def backward(ctx, grad_output):
        input, weight, bias, mean, var = ctx.saved_tensors
        channels = input.shape[1]
        sum_dy, sum_dy_xmu, grad_weight, grad_bias = ops.batch_norm_backward_reduce(
            grad_output, input, mean, var, weight, bias, ctx.eps, *ctx.activation
        )
        grad_input = None
        if ctx.needs_input_grad[0]:
            # An all_gather and a sum in rank order, not an all_reduce: the same bits on every
            # process, and gloo's all_gather of a few values takes 0.2 ms on two local
            # processes where its all_reduce took 1.7.
            gathered = _gather(torch.cat([sum_dy, sum_dy_xmu]), ctx.group, ctx.world_size)
            sums = gathered.sum(dim=0)
            grad_input = ops.batch_norm_backward_elemt(
                grad_output, input, mean, var, weight, bias, sums[:channels], sums[channels:],
                ctx.total, ctx.eps, *ctx.activation,
            )
        return (
            grad_input,
            grad_weight if weight is not None and ctx.needs_input_grad[1] else None,
            grad_bias if bias is not None and ctx.needs_input_grad[2] else None,
            None, None, None, None, None, None, None, None,
        )


def sync_batch_norm(
    input: torch.Tensor,
    running_mean: Optional[torch.Tensor],
    running_var: Optional[torch.Tensor],
    weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    momentum: float,
    eps: float,
    activation: tuple[str, float, float],
    group: Any,
    world_size: int,
    handshake: Optional[Handshake] = None,
) -> torch.Tensor:
    """Training batch norm, then the fused ``activation`` (kernel name, alpha, beta, as
    ``convkit.functional.activation_arguments`` gives it), with the statistics of every process
    of ``group`` (``world_size`` of them; each passes its own part of the batch).

    input [N, C, *] -> [N, C, *]; running_mean, running_var, weight, bias [C] or None. The
    running statistics are updated in place with the combined batch statistics (variance
    unbiased by the total count), identically on every process. Every process of the group
    must call it, with the same C and dtype (else SyncBatchNormError on all of them).
    ``handshake``: the layer's :class:`Handshake`, kept between calls (a fresh one costs one
    more collective).
    """
    if input.dtype not in _DTYPE_CODES:
        raise TypeError(
            "SyncBatchNorm: expected a floating-point input (float64, float32, float16 or "
            f"bfloat16), but got {input.dtype}"
        )
    if handshake is None:
        handshake = Handshake()
    return _SyncBatchNormFunction.apply(input, weight, bias, running_mean, running_var,
                                        float(momentum), float(eps), tuple(activation), group, world_size,
                                        handshake)
