"""What each spawned process of the distributed tests runs (distributed_harness.run_ranks);
importable by the spawned processes, so kept apart from the test modules."""
from __future__ import annotations

import copy
import os
import time

import torch
import torch.distributed as dist

import convkit
from convkit.sync_batch_norm import SyncBatchNormError


def global_tensors(case: dict, seed: int) -> dict:
    """The whole batch of a case, the same on every process: x, dy [sum(local), C, *], weight,
    bias [C]."""
    generator = torch.Generator().manual_seed(seed)
    shape = (sum(case["local_batches"]), case["channels"], *case["spatial"])
    dtype = case["dtype"]
    x = torch.randn(shape, generator=generator, dtype=torch.float64) * 2 + case["shift"]
    dy = torch.randn(shape, generator=generator, dtype=torch.float64)
    weight = torch.rand(case["channels"], generator=generator, dtype=torch.float64) + 0.5
    bias = torch.randn(case["channels"], generator=generator, dtype=torch.float64)
    return {"x": x.to(dtype), "dy": dy.to(dtype), "weight": weight.to(dtype),
            "bias": bias.to(dtype)}


def local_slice(case: dict, rank: int) -> slice:
    start = sum(case["local_batches"][:rank])
    return slice(start, start + case["local_batches"][rank])


def make_layer(case: dict) -> torch.nn.Module:
    arguments = dict(momentum=case["momentum"], affine=case["affine"],
                     track_running_stats=case["track"], dtype=case["dtype"])
    if case.get("activation") is not None:
        return convkit.nn.SyncBatchNormActivation2d(case["channels"], **arguments,
                                                    activation=case["activation"])
    kind = convkit.nn.SyncBatchNormReLU2d if case["relu"] else convkit.nn.SyncBatchNorm
    return kind(case["channels"], **arguments)


def sync_bn_worker(rank: int, world_size: int, cases: list[dict], steps: int,
                   emulated: bool) -> list[dict]:
    """Each case: `steps` training steps of a synchronised layer on this rank's part of the
    batch (fresh x and dy each step), then one eval forward; everything a test compares. With
    `emulated`, convkit's ops run their CUDA code under the emulator."""
    if emulated:
        with convkit.emulated_cuda(seed=rank):
            calls = convkit.cuda_emulation.emulation_state().calls
            results = sync_bn_worker(rank, world_size, cases, steps, False)
            assert convkit.cuda_emulation.emulation_state().calls > calls
        return results
    results = []
    for case in cases:
        layer = make_layer(case)
        record: dict = {"outputs": [], "grad_inputs": [], "grad_weights": [], "grad_biases": []}
        for step in range(steps):
            tensors = global_tensors(case, seed=1000 * step + 7)
            part = local_slice(case, rank)
            if case["affine"]:
                with torch.no_grad():
                    layer.weight.copy_(tensors["weight"])
                    layer.bias.copy_(tensors["bias"])
                layer.weight.grad = None
                layer.bias.grad = None
            x = tensors["x"][part].clone().requires_grad_(True)
            y = layer(x)
            y.backward(tensors["dy"][part])
            record["outputs"].append(y.detach())
            record["grad_inputs"].append(x.grad)
            if case["affine"]:
                record["grad_weights"].append(layer.weight.grad.clone())
                record["grad_biases"].append(layer.bias.grad.clone())
        if case["track"]:
            record["running_mean"] = layer.running_mean.clone()
            record["running_var"] = layer.running_var.clone()
            record["num_batches_tracked"] = int(layer.num_batches_tracked)
            layer.eval()
            tensors = global_tensors(case, seed=99)
            record["eval_output"] = layer(tensors["x"][local_slice(case, rank)]).detach()
        results.append(record)
    return results


def ddp_steps_worker(rank: int, world_size: int, model: torch.nn.Module, x: torch.Tensor,
                     y: torch.Tensor, steps: int, lr: float) -> dict:
    """`steps` SGD steps of DistributedDataParallel(model) on this rank's equal share of each
    global batch x[step], y[step]; the final state_dict."""
    model = copy.deepcopy(model)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    optimiser = torch.optim.SGD(ddp.parameters(), lr=lr, momentum=0.9)
    share = x.shape[1] // world_size
    losses = []
    for step in range(steps):
        part = slice(rank * share, (rank + 1) * share)
        loss = torch.nn.functional.cross_entropy(ddp(x[step, part]), y[step, part])
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append(float(loss.detach()))
    return {"state": model.state_dict(), "losses": losses}


def bad_cases_worker(rank: int, world_size: int) -> dict:
    """The disagreements every rank must report alike, then a rank that dies mid-training."""
    found: dict = {}

    def attempt(name: str, run) -> None:
        try:
            run()
            found[name] = None
        except SyncBatchNormError as error:
            found[name] = str(error)

    channels = 3 + rank  # rank 1 has one channel more
    attempt("channels", lambda: convkit.nn.SyncBatchNorm(channels)(torch.randn(4, channels, 2, 2)))
    dtype = torch.float64 if rank == 0 else torch.float32
    attempt("dtype", lambda: convkit.nn.SyncBatchNorm(3, dtype=dtype)(
        torch.randn(4, 3, 2, 2, dtype=dtype)))
    # One value per channel over both ranks: rank 0 holds [1, 3], rank 1 an empty batch.
    batch = 1 if rank == 0 else 0
    attempt("one_value", lambda: convkit.nn.SyncBatchNorm(3)(torch.randn(batch, 3)))
    # After the handshake: a layer whose input changes dtype on one rank only, then a free
    # layer (no weights or running statistics) whose channels change on every rank alike.
    layer = convkit.nn.SyncBatchNorm(3, dtype=torch.float64)
    layer(torch.randn(4, 3, 2, 2, dtype=torch.float64))
    later = torch.float64 if rank == 0 else torch.float32
    attempt("dtype_later", lambda: layer(torch.randn(4, 3, 2, 2, dtype=later)))
    free = convkit.nn.SyncBatchNorm(3, affine=False, track_running_stats=False)
    free(torch.randn(4, 3, 2, 2))
    whole = torch.randn(8, 5, 2, 2, generator=torch.Generator().manual_seed(1))
    moved = free(whole[4 * rank: 4 * rank + 4])
    found["moved_channels_error"] = float(
        (moved - convkit.batch_norm(whole, None, None, training=True)[4 * rank: 4 * rank + 4])
        .abs().max())
    # The group still works after those errors: a good step.
    convkit.nn.SyncBatchNorm(3)(torch.randn(2, 3, 2, 2)).sum().backward()
    dist.barrier()
    # Rank 1 dies; rank 0's next synchronised forward must fail, not hang.
    if rank == 1:
        os._exit(3)
    time.sleep(0.5)
    start = time.monotonic()
    try:
        for _ in range(50):  # every collective until the dead peer is noticed
            convkit.nn.SyncBatchNorm(3)(torch.randn(2, 3, 2, 2))
        found["dead_rank"] = None
    except RuntimeError as error:
        found["dead_rank"] = f"{type(error).__name__}: {error}"
    found["dead_rank_seconds"] = time.monotonic() - start
    return found


def local_fallback_worker(rank: int, world_size: int) -> dict:
    """A group of one process: SyncBatchNorm runs the local kernel."""
    torch.manual_seed(0)
    x = torch.randn(4, 3, 5, 5, dtype=torch.float64)
    sync = convkit.nn.SyncBatchNormReLU2d(3, dtype=torch.float64)
    local = convkit.nn.BatchNormReLU2d(3, dtype=torch.float64)
    return {"sync": sync(x).detach(), "local": local(x).detach(),
            "sync_running_var": sync.running_var, "local_running_var": local.running_var}


class ToFloat64(torch.nn.Module):
    """The loaders' float32 batches into a float64 model."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.double()


def tiny_learner_run(x: torch.Tensor, y: torch.Tensor, epochs: int, batch_size: int,
                     distributed: bool, folder: str = "") -> dict:
    """fit_one_cycle of a small float64 BN CNN on (x, y) with the chapter's loaders; what a
    test compares between 1 and 2 processes."""
    from convkit.experiments.models import conv
    from convkit.train.callbacks import Checkpoint
    from convkit.train.data.datasets import Dataset
    from convkit.train.data.loaders import make_dataloaders
    from convkit.train.learner import Learner

    torch.manual_seed(0)
    model = torch.nn.Sequential(ToFloat64(), conv(1, 4, norm="batch"), conv(4, 8, norm="batch"),
                                conv(8, 3, act=False, norm="batch"), torch.nn.Flatten(1),
                                torch.nn.LazyLinear(3)).double()
    model(torch.zeros(2, 1, 12, 12))  # materialise the lazy layer on every rank alike
    model = convkit.nn.convert(model)
    data = Dataset("tiny", x[:48], y[:48], x[48:], y[48:], ["a", "b", "c"])
    dls = make_dataloaders(data, batch_size, normalize=True, seed=3)
    lines: list[str] = []
    cbs = [Checkpoint(os.path.join(folder, "tiny.pt"))] if folder else []
    learn = Learner(dls, model, cbs=cbs, logger=lines.append, progress=False,
                    distributed=None if distributed else False)
    learn.fit_one_cycle(epochs, 0.01)
    return {"state": learn.model.state_dict(), "values": learn.recorder.values, "lines": lines,
            "validate": learn.validate(), "batch_size": learn.dls.train.batch_size,
            "synchronised": sum(isinstance(m, convkit.nn.SyncBatchNorm) for m in model.modules())}


def tiny_learner_worker(rank: int, world_size: int, x, y, epochs: int, batch_size: int,
                        folder: str) -> dict:
    torch.set_num_threads(1)
    return tiny_learner_run(x, y, epochs, batch_size, True, folder)
