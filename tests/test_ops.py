"""Every op passes torch.library.opcheck (schema, fake kernel, autograd registration,
dispatch); a model made of convkit layers runs under torch.compile and matches eager."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import convkit
from conftest import DEVICE_PARAMS


def _conv_cases(device):
    x = torch.randn(2, 4, 7, 6, device=device)
    w = torch.randn(6, 2, 3, 2, device=device)
    b = torch.randn(6, device=device)
    geometry = ([2, 1], [1, 0], [1, 2], 2)
    yield (x, w, b) + geometry
    yield (x.requires_grad_(), w.requires_grad_(), None) + geometry
    yield (
        torch.randn(3, 3, 5, 5, device=device, dtype=torch.float64, requires_grad=True),
        torch.randn(2, 3, 3, 3, device=device, dtype=torch.float64, requires_grad=True),
        torch.randn(2, device=device, dtype=torch.float64, requires_grad=True),
        [1, 1], [1, 1], [1, 1], 1,
    )
    yield (torch.randn(0, 4, 7, 6, device=device), w.detach(), b) + geometry


def _bn_cases(device):
    x = torch.randn(4, 3, 5, 5, device=device)
    w = torch.randn(3, device=device)
    b = torch.randn(3, device=device)
    rm = torch.randn(3, device=device)
    rv = torch.rand(3, device=device) + 0.5
    for act in (("relu", 0.0, 0.0), ("none", 0.0, 0.0)):
        yield (x.clone().requires_grad_(), w.clone().requires_grad_(), b.clone().requires_grad_(), None, None, True, 1e-5, *act)
        yield (x.clone().requires_grad_(), w, b, rm, rv, False, 1e-3, *act)
        yield (x.double().requires_grad_(), None, None, rm.double(), rv.double(), True, 1e-5, *act)
    # The activations with parameters, and one with none.
    yield (x.clone().requires_grad_(), w, b, None, None, True, 1e-5, "hardtanh", 0.0, 6.0)
    yield (x.clone().requires_grad_(), None, None, rm, rv, False, 1e-5, "leaky_relu", 0.1, 0.0)
    yield (x.clone().requires_grad_(), w, b, None, None, True, 1e-5, "silu", 0.0, 0.0)


@pytest.mark.parametrize("device", DEVICE_PARAMS)
def test_opcheck_conv2d_forward(device):
    for args in _conv_cases(device):
        torch.library.opcheck(torch.ops.convkit.conv2d_forward.default, args)


@pytest.mark.parametrize("device", DEVICE_PARAMS)
def test_opcheck_conv2d_backward(device):
    for x, w, b, stride, padding, dilation, groups in _conv_cases(device):
        out = torch.ops.convkit.conv2d_forward(x.detach(), w.detach(), None, stride, padding, dilation, groups)
        for mask in ([True, True, True], [True, False, False], [False, True, True]):
            torch.library.opcheck(
                torch.ops.convkit.conv2d_backward.default,
                (torch.randn_like(out), x.detach(), w.detach(), stride, padding, dilation, groups, mask),
            )


@pytest.mark.parametrize("device", DEVICE_PARAMS)
def test_opcheck_batch_norm_forward(device):
    for args in _bn_cases(device):
        torch.library.opcheck(torch.ops.convkit.batch_norm_forward.default, args)


@pytest.mark.parametrize("device", DEVICE_PARAMS)
def test_opcheck_batch_norm_backward(device):
    for x, w, b, rm, rv, training, eps, *act in _bn_cases(device):
        x = x.detach()
        w = w.detach() if w is not None else None
        b = b.detach() if b is not None else None
        out, mean, var = torch.ops.convkit.batch_norm_forward(x, w, b, rm, rv, training, eps, *act)
        for mask in ([True, True, True], [True, False, False], [False, True, True]):
            torch.library.opcheck(
                torch.ops.convkit.batch_norm_backward.default,
                (torch.randn_like(out), x, w, b, mean, var, training, eps, *act, mask),
            )


@pytest.mark.parametrize("device", DEVICE_PARAMS)
def test_opcheck_batch_norm_update_stats(device):
    for dtype in (torch.float32, torch.float64):
        rm = torch.randn(5, device=device, dtype=dtype)
        rv = torch.rand(5, device=device, dtype=dtype)
        mean = torch.randn(5, device=device, dtype=dtype)
        var = torch.rand(5, device=device, dtype=dtype)
        torch.library.opcheck(torch.ops.convkit.batch_norm_update_stats.default, (rm, rv, mean, var, 0.1, 40))


def _chapter_cnn() -> nn.Module:
    """The chapter's CNN with batch norm, made of convkit layers (smaller)."""
    def conv(ni, nf, ks=3, act=True):
        layers = [convkit.nn.Conv2d(ni, nf, ks, stride=2, padding=ks // 2)]
        layers.append(convkit.nn.BatchNormReLU2d(nf) if act else convkit.nn.BatchNorm2d(nf))
        return layers
    return nn.Sequential(*conv(1, 8, ks=5), *conv(8, 16), *conv(16, 10, act=False), nn.Flatten())


@pytest.mark.parametrize("device", DEVICE_PARAMS)
def test_torch_compile_matches_eager(device):
    torch._dynamo.reset()
    model = _chapter_cnn().double().to(device)
    compiled_model = _chapter_cnn().double().to(device)
    compiled_model.load_state_dict(model.state_dict())
    compiled = torch.compile(compiled_model, fullgraph=True)
    for step in range(2):
        x = torch.randn(8, 1, 16, 16, dtype=torch.float64, device=device)
        eager_out = model(x)
        compiled_out = compiled(x)
        torch.testing.assert_close(compiled_out, eager_out, rtol=1e-10, atol=1e-10)
        eager_out.square().sum().backward()
        compiled_out.square().sum().backward()
        for (name, p_eager), p_compiled in zip(model.named_parameters(), compiled_model.parameters()):
            torch.testing.assert_close(p_compiled.grad, p_eager.grad, rtol=1e-9, atol=1e-9, msg=name)
    # The running statistics were updated the same way inside the compiled graph.
    for (name, b_eager), b_compiled in zip(model.named_buffers(), compiled_model.buffers()):
        torch.testing.assert_close(b_compiled, b_eager, rtol=1e-10, atol=1e-10, msg=name)


def test_torch_func_grad_matches_torch():
    """convkit's layers under torch.func.grad (a functorch transform) give torch's gradients."""
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    w = torch.randn(4, 3, 3, 3, dtype=torch.float64)
    b = torch.randn(3, dtype=torch.float64)
    ours = torch.func.grad(lambda w: convkit.conv2d(x, w, None, 1, 1).square().sum())(w)
    theirs = torch.func.grad(lambda w: F.conv2d(x, w, None, 1, 1).square().sum())(w)
    torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-10)
    ours = torch.func.grad(
        lambda b: convkit.batch_norm_relu(x, None, None, None, b, True).square().sum())(b)
    theirs = torch.func.grad(
        lambda b: F.relu(F.batch_norm(x, None, None, None, b, True)).square().sum())(b)
    torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-10)
