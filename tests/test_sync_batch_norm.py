"""convkit.nn.SyncBatchNorm(ReLU2d) on 2 spawned gloo processes against convkit's batch norm
on one process with the concatenated batch; DDP steps against single-process steps; the bad
cases; and the ops of the decomposition on their own (CPU and the CUDA code under the
emulator)."""
from __future__ import annotations

import contextlib
import copy
import functools

import pytest
import torch

import convkit
from convkit import ops
from convkit.experiments.models import simple_cnn

from distributed_harness import run_ranks
from distributed_workers import (bad_cases_worker, ddp_steps_worker, global_tensors,
                                 local_fallback_worker, sync_bn_worker)

F64 = torch.float64


def case(name, local_batches, relu=True, channels=3, spatial=(5, 5), affine=True, track=True,
         momentum=0.1, dtype=F64, shift=0.0, activation=None):
    """activation: another fused activation than ReLU (SyncBatchNormActivation2d's name)."""
    return dict(name=name, local_batches=local_batches, relu=relu, channels=channels,
                spatial=spatial, affine=affine, track=track, momentum=momentum, dtype=dtype,
                shift=shift, activation=activation)


CASES = [
    case("equal", (4, 4)),
    case("equal_no_relu", (4, 4), relu=False),
    case("different_sizes", (3, 6)),
    case("batch_of_one", (1, 5)),
    case("empty_rank", (0, 4), relu=False),
    case("no_affine", (2, 3), affine=False),
    case("cumulative_average", (3, 2), momentum=None),
    case("untracked", (2, 2), track=False),
    case("rows_layout", (3, 4), channels=8, spatial=(7, 7)),
    case("planes_layout", (2, 3), channels=2, spatial=(48, 48)),
    case("two_dimensional", (5, 3), relu=False, spatial=()),
    case("large_mean_float32", (4, 4), relu=False, dtype=torch.float32, shift=1e4),
    case("silu", (3, 4), activation="silu"),
    case("relu6_planes", (2, 3), channels=2, spatial=(48, 48), activation="relu6"),
]
STEPS = 2


def reference(case_: dict, steps: int, dtype: torch.dtype = F64) -> dict:
    """The same steps on one process with the whole batch, on convkit's local batch norm, in
    ``dtype``."""
    channels = case_["channels"]
    if case_["activation"] is not None:
        kernel = functools.partial(convkit.functional.batch_norm_activation,
                                   activation=case_["activation"])
    else:
        kernel = convkit.batch_norm_relu if case_["relu"] else convkit.batch_norm
    running_mean = torch.zeros(channels, dtype=dtype)
    running_var = torch.ones(channels, dtype=dtype)
    record: dict = {"outputs": [], "grad_inputs": [], "grad_weights": [], "grad_biases": []}
    for step in range(steps):
        tensors = {k: v.to(dtype) for k, v in global_tensors(case_, seed=1000 * step + 7).items()}
        x = tensors["x"].clone().requires_grad_(True)
        weight = tensors["weight"].clone().requires_grad_(True) if case_["affine"] else None
        bias = tensors["bias"].clone().requires_grad_(True) if case_["affine"] else None
        momentum = case_["momentum"] if case_["momentum"] is not None else 1.0 / (step + 1)
        tracked = case_["track"]
        y = kernel(x, running_mean if tracked else None, running_var if tracked else None,
                   weight, bias, training=True, momentum=momentum)
        y.backward(tensors["dy"])
        record["outputs"].append(y.detach())
        record["grad_inputs"].append(x.grad)
        if case_["affine"]:
            record["grad_weights"].append(weight.grad)
            record["grad_biases"].append(bias.grad)
    record["running_mean"] = running_mean
    record["running_var"] = running_var
    if case_["track"]:
        x = global_tensors(case_, seed=99)["x"].to(dtype)
        record["eval_output"] = kernel(x, running_mean, running_var,
                                       tensors["weight"] if case_["affine"] else None,
                                       tensors["bias"] if case_["affine"] else None)
    return record


@pytest.fixture(scope="module")
def two_rank_results():
    return run_ranks(sync_bn_worker, 2, CASES, STEPS, False)


@pytest.fixture(scope="module")
def two_rank_results_emulated():
    """The same, with both processes running the ops' CUDA code under the emulator."""
    return run_ranks(sync_bn_worker, 2, CASES, STEPS, True)


@pytest.mark.parametrize("target", ["cpu", "cuda-emu"])
@pytest.mark.parametrize("index", range(len(CASES)), ids=[c["name"] for c in CASES])
def test_sync_batch_norm_equals_one_process_on_the_whole_batch(request, target, index):
    fixture = "two_rank_results" if target == "cpu" else "two_rank_results_emulated"
    results = request.getfixturevalue(fixture)
    case_ = CASES[index]
    ranks = [per_rank[index] for per_rank in results]
    expected = reference(case_, STEPS)
    exact = case_["dtype"] == F64
    if not exact:
        # float32 with |mean| = 5000 std: the mean itself rounds by ~5e-4 in float32, so the
        # bar is one process's own float32 error on the same backend (sums of x and x^2 would
        # miss it by far).
        with convkit.emulated_cuda() if target == "cuda-emu" else contextlib.nullcontext():
            single = reference(case_, STEPS, case_["dtype"])
        for key in ("outputs", "grad_inputs"):
            for step in range(STEPS):
                got = torch.cat([r[key][step] for r in ranks]).to(F64)
                own_error = (single[key][step].to(F64) - expected[key][step]).abs().max()
                error = (got - expected[key][step]).abs().max()
                assert error <= 2 * own_error + 1e-6, (key, step, float(error), float(own_error))
    tol = dict(rtol=1e-10, atol=1e-10) if exact else dict(rtol=1e-3, atol=2e-3)

    def close(got, want):
        torch.testing.assert_close(got.to(F64), want, **tol)

    for step in range(STEPS):
        close(torch.cat([r["outputs"][step] for r in ranks]), expected["outputs"][step])
        close(torch.cat([r["grad_inputs"][step] for r in ranks]), expected["grad_inputs"][step])
        if case_["affine"]:
            # Each rank's parameter gradients are its own part (DDP sums and averages them).
            close(sum(r["grad_weights"][step] for r in ranks), expected["grad_weights"][step])
            close(sum(r["grad_biases"][step] for r in ranks), expected["grad_biases"][step])
    if case_["track"]:
        for r in ranks:
            close(r["running_mean"], expected["running_mean"])
            close(r["running_var"], expected["running_var"])
            assert r["num_batches_tracked"] == STEPS
        # Bit-identical on every rank.
        assert torch.equal(ranks[0]["running_mean"], ranks[1]["running_mean"])
        assert torch.equal(ranks[0]["running_var"], ranks[1]["running_var"])
        close(torch.cat([r["eval_output"] for r in ranks]), expected["eval_output"])


def test_ddp_steps_with_sync_batch_norm_relu_equal_single_process_steps():
    torch.manual_seed(0)
    model = convkit.nn.convert(simple_cnn(norm="batch")).to(F64)
    sync_model = convkit.nn.convert(model, sync_batchnorm=True)
    assert any(isinstance(m, convkit.nn.SyncBatchNormReLU2d) for m in sync_model.modules())
    steps, batch = 3, 8
    x = torch.randn(steps, batch, 1, 28, 28, dtype=F64)
    y = torch.randint(0, 10, (steps, batch))
    lr = 0.05
    ranks = run_ranks(ddp_steps_worker, 2, sync_model, x, y, steps, lr)

    single = copy.deepcopy(model)
    optimiser = torch.optim.SGD(single.parameters(), lr=lr, momentum=0.9)
    losses = []
    for step in range(steps):
        loss = torch.nn.functional.cross_entropy(single(x[step]), y[step])
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append(float(loss.detach()))
    expected = single.state_dict()
    for rank in ranks:
        assert rank["state"].keys() == expected.keys()
        for key, value in expected.items():
            torch.testing.assert_close(rank["state"][key], value, rtol=1e-9, atol=1e-10,
                                       msg=lambda m: f"{key}: {m}")
    # Each rank's loss is that of its half; their mean is the global batch's.
    for step in range(steps):
        mean_loss = (ranks[0]["losses"][step] + ranks[1]["losses"][step]) / 2
        assert mean_loss == pytest.approx(losses[step], rel=1e-9)


def test_bad_cases_raise_on_every_rank_and_a_dead_rank_fails_the_others():
    results = run_ranks(bad_cases_worker, 2, group_timeout_s=20, timeout_s=90, allow_exit=True)
    rank0 = results[0]
    assert results[1].code == 3  # the rank that died
    assert "disagree on the input's channels or dtype" in rank0["channels"]
    assert "rank 0: 3 channels, float32, rank 1: 4 channels, float32" in rank0["channels"]
    assert "rank 0: 3 channels, float64, rank 1: 3 channels, float32" in rank0["dtype"]
    assert "more than 1 value per channel" in rank0["one_value"]
    assert "[1, 0]" in rank0["one_value"]
    assert "rank 0: 3 channels, float64, rank 1: 3 channels, float32" in rank0["dtype_later"]
    assert rank0["moved_channels_error"] < 1e-6
    assert rank0["dead_rank"] is not None, "a dead peer went unnoticed"
    assert rank0["dead_rank_seconds"] < 25


def test_a_group_of_one_runs_the_local_kernel():
    [result] = run_ranks(local_fallback_worker, 1)
    torch.testing.assert_close(result["sync"], result["local"], rtol=0, atol=0)
    torch.testing.assert_close(result["sync_running_var"], result["local_running_var"])


def test_without_torch_distributed_sync_batch_norm_is_local_batch_norm():
    x = torch.randn(6, 4, 3, 3, dtype=F64, requires_grad=True)
    sync = convkit.nn.SyncBatchNormReLU2d(4, dtype=F64)
    local = convkit.nn.BatchNormReLU2d(4, dtype=F64)
    assert torch.equal(sync(x), local(x))
    assert torch.equal(sync.running_mean, local.running_mean)
    assert sync.state_dict().keys() == torch.nn.SyncBatchNorm(4).state_dict().keys()


def test_a_process_group_without_torch_distributed_is_an_error():
    layer = convkit.nn.SyncBatchNorm(4)
    layer.process_group = object()  # a group kept from a destroyed process group
    with pytest.raises(RuntimeError, match="not initialised"):
        layer(torch.randn(2, 4, 3, 3))


def test_sync_batch_norm_relu_2d_wants_4d_input():
    with pytest.raises(ValueError, match="expected 4D input"):
        convkit.nn.SyncBatchNormReLU2d(4)(torch.randn(2, 4, 3))
    with pytest.raises(ValueError, match="expected at least 2D input"):
        convkit.nn.SyncBatchNorm(4)(torch.randn(4))


def test_the_trainer_synchronises_every_fused_batch_norm():
    # Regression: synchronise_batch_norms left BatchNormActivation2d (convert's ReLU6, SiLU, ...
    # fusions) local, so under torchrun those layers kept per-process statistics.
    from convkit.train.distributed import synchronise_batch_norms
    model = convkit.nn.convert(torch.nn.Sequential(
        torch.nn.BatchNorm2d(3), torch.nn.SiLU(), torch.nn.BatchNorm2d(3), torch.nn.ReLU(),
        torch.nn.BatchNorm2d(3)))
    assert synchronise_batch_norms(model) == 3
    assert [type(m) for m in model if not isinstance(m, torch.nn.Identity)] == [
        convkit.nn.SyncBatchNormActivation2d, convkit.nn.SyncBatchNormReLU2d,
        convkit.nn.SyncBatchNorm]
    assert model[0].fused_activation == ("silu", 0.0, 0.0)


def test_convert_sync_batchnorm_converts_every_exact_batch_norm_in_place():
    model = torch.nn.Sequential(torch.nn.BatchNorm1d(3), convkit.nn.BatchNormReLU2d(3),
                                torch.nn.BatchNorm3d(3), torch.nn.SyncBatchNorm(3))
    model[0].eval()
    group = object()
    converted = convkit.nn.SyncBatchNorm.convert_sync_batchnorm(model, process_group=group)
    assert converted is model
    assert [type(m) for m in model] == [convkit.nn.SyncBatchNorm, convkit.nn.SyncBatchNormReLU2d,
                                        convkit.nn.SyncBatchNorm, convkit.nn.SyncBatchNorm]
    assert all(m.process_group is group for m in model)
    assert not model[0].training
    root = convkit.nn.SyncBatchNorm.convert_sync_batchnorm(torch.nn.BatchNorm2d(5))
    assert type(root) is convkit.nn.SyncBatchNorm and root.process_group is None
