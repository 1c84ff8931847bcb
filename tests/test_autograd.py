"""The C++ autograd nodes of conv2d_forward and batch_norm_forward (csrc/autograd.cpp):
gradients for every subset of tensors that require grad (absent optional tensors shift the
node's edges), nothing recorded without grad, double backward refused with a clear error, and
the Python twins used under torch.func transforms."""
from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

import convkit
from conftest import DEVICE_PARAMS

REQUIRES_GRAD = list(itertools.product([True, False], repeat=3))


def _grads(output: torch.Tensor, tensors: list, grad_output: torch.Tensor) -> list:
    """Gradients of <output, grad_output> for each tensor that requires grad (None for the
    others), through torch.autograd.grad."""
    wanted = [t for t in tensors if t is not None and t.requires_grad]
    if not wanted:
        assert output.grad_fn is None
        return [None] * len(tensors)
    found = iter(torch.autograd.grad(output, wanted, grad_output))
    return [next(found) if t is not None and t.requires_grad else None for t in tensors]


def _assert_same_gradients(ours: torch.Tensor, theirs: torch.Tensor, tensors: list,
                           tolerance: float) -> None:
    """Both outputs' gradients for the same output gradient: present for the same tensors,
    and equal."""
    dy = torch.randn_like(theirs)
    for mine, ref in zip(_grads(ours, tensors, dy), _grads(theirs, tensors, dy)):
        if ref is None:
            assert mine is None
        else:
            torch.testing.assert_close(mine, ref, rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("device", DEVICE_PARAMS)
@pytest.mark.parametrize("has_bias", [True, False])
@pytest.mark.parametrize("requires_grad", REQUIRES_GRAD, ids=str)
def test_conv2d_gradients_for_each_subset(requires_grad, has_bias, device):
    x = torch.randn(3, 4, 7, 6, dtype=torch.float64, device=device)
    w = torch.randn(6, 2, 3, 2, dtype=torch.float64, device=device)
    b = torch.randn(6, dtype=torch.float64, device=device) if has_bias else None
    tensors = [x, w, b]
    for t, wanted in zip(tensors, requires_grad):
        if t is not None:
            t.requires_grad_(wanted)
    kwargs = dict(stride=(2, 1), padding=1, dilation=(1, 2), groups=2)
    _assert_same_gradients(convkit.conv2d(x, w, b, **kwargs), F.conv2d(x, w, b, **kwargs),
                           tensors, 1e-10)


@pytest.mark.parametrize("device", DEVICE_PARAMS)
@pytest.mark.parametrize("relu", [True, False])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("affine", ["both", "weight", "bias", "none"])
@pytest.mark.parametrize("requires_grad", REQUIRES_GRAD, ids=str)
def test_batch_norm_gradients_for_each_subset(requires_grad, affine, training, relu, device):
    """With weight absent, bias is the node's second edge: the masks must follow."""
    x = torch.randn(5, 3, 4, 4, dtype=torch.float64, device=device)
    w = torch.randn(3, dtype=torch.float64, device=device) if affine in ("both", "weight") else None
    b = torch.randn(3, dtype=torch.float64, device=device) if affine in ("both", "bias") else None
    tensors = [x, w, b]
    for t, wanted in zip(tensors, requires_grad):
        if t is not None:
            t.requires_grad_(wanted)
    rm = torch.randn(3, dtype=torch.float64, device=device)
    rv = torch.rand(3, dtype=torch.float64, device=device) + 0.5
    ours = convkit.functional._batch_norm(x, rm.clone(), rv.clone(), w, b, training, 0.1, 1e-5,
                                       ("relu", 0.0, 0.0) if relu else ("none", 0.0, 0.0))
    theirs = F.batch_norm(x, rm.clone(), rv.clone(), w, b, training, 0.1, 1e-5)
    if relu:
        theirs = F.relu(theirs)
    _assert_same_gradients(ours, theirs, tensors, 1e-9)


def test_eager_training_records_cpp_nodes():
    """Eager mode records the C++ nodes (an aten op's cost), not a Python Function."""
    x = torch.randn(2, 3, 6, 6, requires_grad=True)
    w = torch.randn(4, 3, 3, 3, requires_grad=True)
    y = convkit.conv2d(x, w, None, 1, 1)
    assert "CppNode<convkit::" in y.grad_fn.name() and "Conv2dFunction" in y.grad_fn.name()
    z = convkit.batch_norm_relu(y, None, None, None, None, True)
    assert "CppNode<convkit::" in z.grad_fn.name() and "BatchNormFunction" in z.grad_fn.name()
    with torch.no_grad():
        assert convkit.conv2d(x, w).grad_fn is None
        assert convkit.batch_norm_relu(x, None, None, training=True).grad_fn is None


@pytest.mark.parametrize("device", DEVICE_PARAMS)
def test_double_backward_is_refused(device):
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64, device=device, requires_grad=True)
    w = torch.randn(4, 3, 3, 3, dtype=torch.float64, device=device, requires_grad=True)
    weight = torch.randn(3, dtype=torch.float64, device=device, requires_grad=True)
    (grad_x,) = torch.autograd.grad(convkit.conv2d(x, w, None, 1, 1).square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward through convkit's conv2d"):
        torch.autograd.grad(grad_x.sum(), w)
    out = convkit.batch_norm_relu(x, None, None, weight, None, True)
    (grad_x,) = torch.autograd.grad(out.square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward through convkit's batch norm"):
        grad_x.sum().backward()
    # create_graph alone (no second differentiation) still gives the right first gradient.
    (grad_weight,) = torch.autograd.grad(out.sum(), weight, create_graph=True)
    (expected,) = torch.autograd.grad(F.relu(F.batch_norm(x, None, None, weight, None, True)).sum(), weight)
    torch.testing.assert_close(grad_weight, expected, rtol=1e-10, atol=1e-10)


def test_torch_func_uses_the_python_functions():
    """torch.func transforms refuse C++ autograd nodes; convkit.functional switches to the
    Python twins there (compare test_ops.test_torch_func_grad_matches_torch), while the raw op
    is refused with torch's own error."""
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    w = torch.randn(4, 3, 3, 3, dtype=torch.float64)
    grad = torch.func.grad(lambda w: convkit.conv2d(x, w).sum())(w)
    expected = torch.func.grad(lambda w: F.conv2d(x, w).sum())(w)
    torch.testing.assert_close(grad, expected, rtol=1e-10, atol=1e-10)
    with pytest.raises(RuntimeError, match="C\\+\\+ torch::autograd::Function with functorch"):
        torch.func.grad(
            lambda w: torch.ops.convkit.conv2d_forward(x, w, None, [1, 1], [0, 0], [1, 1], 1).sum()
        )(w)
