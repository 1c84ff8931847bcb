"""Training on several processes (``torchrun``): the process group, the data shards, the batch
norms synchronised and the sums every process contributes to.

``torchrun --nproc-per-node W -m convkit chapter13`` starts W processes with RANK, WORLD_SIZE,
MASTER_ADDR and MASTER_PORT set; :func:`init_from_environment` joins them into one process
group (gloo on the CPU, nccl on CUDA). A :class:`Learner` made while a group of more than one
process is initialised trains data-parallel (:class:`Distributed`):

* the model is wrapped in ``DistributedDataParallel`` (gradients averaged) and its batch norms
  synchronised (:func:`synchronise_batch_norms`);
* each global training batch of B items is split into W per-process batches of B / W, by
  ``DistributedSampler`` over the same permutation a single process would use, so the W
  processes together see exactly the single process's batches; the incomplete last batch is
  dropped, as on one process. The validation set is split item by item (rank r takes items r,
  r + W, ...: no item twice, none left out), so the last batches of the ranks may differ by one;
* the metrics are sums over every process's items (exact, whatever the split), the training
  loss the mean of the processes' smoothed losses;
* only rank 0 prints and writes files (:func:`is_main`).
"""
from __future__ import annotations

import dataclasses
import datetime
import os
from typing import Optional, Sequence

import torch
import torch.distributed as dist
from torch import nn

import convkit.nn as ck

__all__ = ["Distributed", "current", "init_from_environment", "is_main", "barrier",
           "synchronise_batch_norms", "unsynchronised_batch_norms", "DEFAULT_TIMEOUT_S"]

# How long a collective waits for the other processes (CONVKIT_DIST_TIMEOUT seconds): a
# process that dies is noticed at once on a closed connection; one that hangs, after this.
DEFAULT_TIMEOUT_S = 300


def _timeout() -> datetime.timedelta:
    text = os.environ.get("CONVKIT_DIST_TIMEOUT", str(DEFAULT_TIMEOUT_S))
    try:
        seconds = float(text)
    except ValueError:
        raise ValueError(f"CONVKIT_DIST_TIMEOUT must be a number of seconds, got {text!r}") from None
    if seconds <= 0:
        raise ValueError(f"CONVKIT_DIST_TIMEOUT must be positive, got {text!r}")
    return datetime.timedelta(seconds=seconds)


def init_from_environment(device: str = "cpu") -> bool:
    """Join torchrun's process group when its environment says there is more than one process
    (WORLD_SIZE > 1) and none is initialised yet: gloo for the CPU, nccl for CUDA (the process
    then takes GPU LOCAL_RANK). Returns whether a group of more than one process is ready."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size() > 1
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return False
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this torch was built without torch.distributed")
    backend = "nccl" if str(device).startswith("cuda") else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend, timeout=_timeout())
    return True


def is_main() -> bool:
    """Whether this process prints and writes: rank 0, or the only process."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def barrier() -> None:
    """Wait for every process of the group (nothing when not distributed)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


@dataclasses.dataclass
class Distributed:
    """This process's place in the default process group."""

    rank: int
    world_size: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0

    def sum(self, values: Sequence[float]) -> list[float]:
        """Each value summed over every process (in float64)."""
        if not values:
            return []
        # nccl reduces CUDA tensors only; gloo, CPU ones.
        where = self.device if dist.get_backend() == "nccl" else torch.device("cpu")
        tensor = torch.tensor(list(values), dtype=torch.float64, device=where)
        dist.all_reduce(tensor)
        return tensor.tolist()

    def shard(self, dls):
        """``dls`` with this process's shards of its loaders (see the module's docstring):
        a training batch of B becomes B / world_size here."""
        train, valid = dls.train, dls.valid
        if not hasattr(train, "shard") or not hasattr(valid, "shard"):
            raise TypeError(
                "distributed training needs loaders that can be sharded (convkit.train.data's "
                f"TensorLoader), got {type(train).__name__} and {type(valid).__name__}"
            )
        return dataclasses.replace(dls, train=train.shard(self.rank, self.world_size),
                                   valid=valid.shard(self.rank, self.world_size))


def current(device: torch.device) -> Optional[Distributed]:
    """The initialised default group when it has more than one process, else None."""
    if not (dist.is_available() and dist.is_initialized()):
        return None
    world_size = dist.get_world_size()
    if world_size <= 1:
        return None
    return Distributed(dist.get_rank(), world_size, device)


def synchronise_batch_norms(model: nn.Module) -> int:
    """Turns the model's batch norms into synchronised ones, in place; returns how many.

    convkit's BatchNorm2d / BatchNormReLU2d / BatchNormActivation2d become convkit's
    SyncBatchNorm / SyncBatchNormReLU2d / SyncBatchNormActivation2d, their fused activation
    kept (CPU and CUDA). torch's batch norms stay on torch: torch's SyncBatchNorm
    on CUDA; on the CPU, which torch's SyncBatchNorm refuses, they keep per-process statistics.
    """
    converted = 0
    on_cuda = any(p.is_cuda for p in model.parameters())
    for module in list(model.modules()):
        if type(module) in (ck.BatchNorm2d, ck.BatchNormReLU2d, ck.BatchNormActivation2d):
            ck.SyncBatchNorm.convert_sync_batchnorm(module)
            converted += 1
    if on_cuda:
        torch_norms = [m for m in model.modules()
                       if isinstance(m, nn.modules.batchnorm._BatchNorm)
                       and not isinstance(m, (ck.SyncBatchNorm, nn.SyncBatchNorm))]
        converted += len(torch_norms)
        if torch_norms:
            _replace_torch_norms(model)
    return converted


def unsynchronised_batch_norms(model: nn.Module) -> int:
    """How many of the model's batch norms keep per-process statistics (torch's, on the CPU)."""
    return sum(1 for m in model.modules()
               if isinstance(m, nn.modules.batchnorm._BatchNorm)
               and not isinstance(m, (ck.SyncBatchNorm, nn.SyncBatchNorm)))


def _replace_torch_norms(model: nn.Module) -> None:
    for name, child in model.named_children():
        if (isinstance(child, nn.modules.batchnorm._BatchNorm)
                and not isinstance(child, (ck.SyncBatchNorm, nn.SyncBatchNorm))):
            setattr(model, name, nn.SyncBatchNorm.convert_sync_batchnorm(child))
        else:
            _replace_torch_norms(child)
