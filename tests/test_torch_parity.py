"""Smaller differences from torch that a drop-in must not have: what torch accepts convkit
accepts (NumPy integers and 0-d tensors as sizes, autocast on the CPU), what torch refuses
convkit refuses with a clear error (bool groups, string momentum, mixed-dtype parameters,
running statistics that require grad, empty spatial sizes), and what convert and
torch.jit.script do with hooks and scripting."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import convkit


@pytest.mark.parametrize("stride", [np.int64(2), torch.tensor(2), (np.int32(2), 1), [torch.tensor(2), 2]])
def test_sizes_as_numpy_ints_and_0d_tensors(stride):
    x, w = torch.randn(2, 3, 9, 9, dtype=torch.float64), torch.randn(4, 3, 3, 3, dtype=torch.float64)
    kwargs = dict(stride=stride, padding=np.int64(1), dilation=torch.tensor(1), groups=np.int64(1))
    torch.testing.assert_close(convkit.conv2d(x, w, **kwargs), F.conv2d(x, w, **kwargs))


@pytest.mark.parametrize("groups", [True, 1.0, "1", torch.tensor([1])])
def test_groups_must_be_an_int(groups):
    with pytest.raises(TypeError, match="expected groups to be an int"):
        convkit.conv2d(torch.randn(1, 2, 5, 5), torch.randn(2, 2, 3, 3), groups=groups)


@pytest.mark.parametrize("name, value", [("momentum", "0.1"), ("momentum", True), ("eps", "1e-5"),
                                         ("eps", None)])
def test_batch_norm_float_arguments_must_be_numbers(name, value):
    kwargs = {name: value}
    with pytest.raises(TypeError, match=f"expected {name} to be a float"):
        convkit.batch_norm(torch.randn(4, 3, 2, 2), torch.zeros(3), torch.ones(3), training=True, **kwargs)


@pytest.mark.parametrize("which", ["weight", "bias", "running_mean", "running_var"])
def test_batch_norm_parameters_of_another_dtype_are_refused(which):
    args = dict(weight=torch.ones(3), bias=torch.zeros(3), running_mean=torch.zeros(3),
                running_var=torch.ones(3))
    args[which] = args[which].double()
    with pytest.raises(RuntimeError, match=rf"expected {which} of dtype Float \(the input's\), but got Double"):
        convkit.batch_norm(torch.randn(4, 3, 2, 2), args["running_mean"], args["running_var"],
                           args["weight"], args["bias"], training=False)
    with pytest.raises(RuntimeError):  # torch refuses it too
        F.batch_norm(torch.randn(4, 3, 2, 2), args["running_mean"], args["running_var"],
                     args["weight"], args["bias"], training=False)


def test_float32_parameters_with_half_input_are_mixed_precision():
    x = torch.randn(4, 3, 2, 2).bfloat16()
    out = convkit.batch_norm_relu(x, torch.zeros(3), torch.ones(3), torch.ones(3), torch.zeros(3), training=True)
    assert out.dtype == torch.bfloat16
    with pytest.raises(RuntimeError, match=r"expected weight of dtype BFloat16 \(the input's\) or Float, but got Double"):
        convkit.batch_norm(x, None, None, torch.ones(3, dtype=torch.float64), training=True)


@pytest.mark.parametrize("training", [True, False])
def test_running_statistics_that_require_grad_are_refused(training):
    with pytest.raises(RuntimeError, match="running_mean requires grad, but running statistics are not differentiable"):
        convkit.batch_norm(torch.randn(4, 3, 2, 2), torch.zeros(3, requires_grad=True), torch.ones(3),
                           training=training)


@pytest.mark.parametrize("shape", [(1, 1, 0, 5), (2, 3, 4, 0)])
def test_conv2d_with_empty_spatial_sizes_is_refused_as_torch_does(shape):
    x, w = torch.randn(shape), torch.randn(1, shape[1], 1, 1)
    with pytest.raises(RuntimeError):
        F.conv2d(x, w, padding=1)
    with pytest.raises(RuntimeError, match="expected an input with non-zero height and width"):
        convkit.conv2d(x, w, padding=1)
    # An empty batch is fine, as in torch.
    assert convkit.conv2d(torch.randn(0, 3, 0, 5), torch.randn(2, 3, 1, 1), padding=1).shape == (0, 2, 2, 7)


def test_autocast_on_the_cpu_runs_conv_in_bfloat16():
    x = torch.randn(4, 3, 9, 9)
    layer = convkit.nn.Conv2d(3, 8, 3, padding=1)
    reference = nn.Conv2d(3, 8, 3, padding=1)
    reference.load_state_dict(layer.state_dict())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours, theirs = layer(x), reference(x)
        bn = convkit.batch_norm(ours, None, None, training=True)
    assert ours.dtype == theirs.dtype == torch.bfloat16
    assert bn.dtype == F.batch_norm(theirs, None, None, training=True).dtype
    torch.testing.assert_close(ours.float(), theirs.float(), rtol=2e-2, atol=2e-2)
    ours.float().sum().backward()
    assert layer.weight.grad is not None and layer.weight.grad.dtype == torch.float32


@pytest.mark.parametrize("where", ["relu forward", "relu forward pre", "bn forward"])
def test_convert_leaves_hooked_pairs_apart(where):
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
    seen = []
    hook = lambda module, *args: seen.append(type(module).__name__)  # noqa: E731
    if where == "relu forward":
        model[2].register_forward_hook(hook)
    elif where == "relu forward pre":
        model[2].register_forward_pre_hook(hook)
    else:
        model[1].register_forward_hook(hook)
    converted = convkit.nn.convert(model)
    assert type(converted[1]) is convkit.nn.BatchNorm2d and type(converted[2]) is nn.ReLU
    x = torch.randn(2, 3, 6, 6)
    torch.testing.assert_close(converted(x), model(x))
    assert len(seen) == 2
    plain = convkit.nn.convert(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()))
    assert type(plain[1]) is convkit.nn.BatchNormReLU2d  # without hooks the pair is fused


def test_torch_jit_script_gives_a_clear_error():
    model = convkit.nn.convert(nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.ReLU()))
    with pytest.raises(RuntimeError, match="cannot be compiled by torch.jit.script.*torch.compile or torch.export"):
        torch.jit.script(model)
