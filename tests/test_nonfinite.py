"""NaN and Inf go through convkit's ops as they go through torch's: a NaN in a batch norm's
input, parameters or running statistics gives NaN where torch's relu(batch_norm(x)) does
(the fused ReLU does not turn it into 0), Inf gives inf where torch gives inf, the running
statistics and the gradients follow torch's, in training and eval, on the CPU and on the CUDA
code path."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import convkit
from conftest import ACTIVATIONS, DEVICE_PARAMS, TORCH_ACTIVATIONS, fused_batch_norm

SHAPE = (4, 3, 5, 6)


def _poisoned(device, where: str, value: float) -> dict:
    """Inputs of a batch norm with one non-finite value where `where` says."""
    x = torch.randn(SHAPE, dtype=torch.float64, device=device) * 2 + 1
    weight = torch.rand(3, dtype=torch.float64, device=device) + 0.5
    bias = torch.randn(3, dtype=torch.float64, device=device)
    running_mean = torch.randn(3, dtype=torch.float64, device=device)
    running_var = torch.rand(3, dtype=torch.float64, device=device) + 0.5
    if where == "input":
        x[1, 0, 2, 3] = value
    elif where == "input_plane":
        x[:, 1] = value
    elif where == "weight":
        weight[2] = value
    elif where == "bias":
        bias[2] = value
    elif where == "running_var":
        running_var[0] = value
    return dict(x=x, weight=weight, bias=bias, running_mean=running_mean, running_var=running_var)


def _run(fn, inputs: dict, training: bool, activation: str, dy):
    x = inputs["x"].clone().requires_grad_()
    w = inputs["weight"].clone().requires_grad_()
    b = inputs["bias"].clone().requires_grad_()
    rm, rv = inputs["running_mean"].clone(), inputs["running_var"].clone()
    out = fn(x, rm, rv, w, b, training=training)
    if fn is F.batch_norm:
        out = TORCH_ACTIVATIONS[activation](out)
    out.backward(dy)
    return {"output": out.detach(), "grad_input": x.grad, "grad_weight": w.grad,
            "grad_bias": b.grad, "running_mean": rm, "running_var": rv}


CASES = [("input", float("nan")), ("input", float("inf")), ("input", float("-inf")),
         ("input_plane", float("nan")), ("input_plane", float("inf")), ("weight", float("nan")),
         ("bias", float("inf")), ("running_var", float("nan"))]


@pytest.mark.parametrize("device", DEVICE_PARAMS)
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("where, value", CASES, ids=[f"{w}-{v}" for w, v in CASES])
def test_batch_norm_propagates_like_torch(where, value, training, activation, device):
    inputs = _poisoned(device, where, value)
    dy = torch.randn(SHAPE, dtype=torch.float64, device=device)
    ours = _run(fused_batch_norm(activation), inputs, training, activation, dy)
    theirs = _run(F.batch_norm, inputs, training, activation, dy)
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], rtol=1e-10, atol=1e-10,
                                   equal_nan=True, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("device", DEVICE_PARAMS)
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("training", [True, False])
def test_fused_activation_keeps_nan_in_every_dtype(dtype, training, activation, device):
    """The vectorised passes too (float32: the AVX-512 loops; 64 values per plane)."""
    x = torch.randn(8, 4, 8, 8, device=device).to(dtype)
    x[3, 2, 5, 1] = float("nan")
    rm, rv = torch.zeros(4, device=device), torch.ones(4, device=device)
    ours = fused_batch_norm(activation)(x, rm.clone(), rv.clone(), training=training)
    theirs = TORCH_ACTIVATIONS[activation](F.batch_norm(x, rm.clone(), rv.clone(), training=training))
    assert torch.equal(ours.isnan(), theirs.isnan())
    finite = ~theirs.isnan()
    torch.testing.assert_close(ours[finite].float(), theirs[finite].float(), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("device", DEVICE_PARAMS)
def test_conv2d_propagates_nan_and_inf(device):
    x = torch.randn(2, 3, 7, 7, dtype=torch.float64, device=device)
    x[0, 1, 3, 3] = float("nan")
    x[1, 2, 0, 0] = float("inf")
    w = torch.randn(4, 3, 3, 3, dtype=torch.float64, device=device)
    ours = convkit.conv2d(x, w, padding=1)
    theirs = F.conv2d(x, w, padding=1)
    torch.testing.assert_close(ours, theirs, equal_nan=True)
