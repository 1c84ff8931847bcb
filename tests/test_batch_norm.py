"""convkit batch norm (+ each fused activation) against F.batch_norm (+ torch's activation):
outputs, gradients and running statistics, training and eval, affine on/off, momentum
0.1/None, several steps; gradcheck; dtypes and shapes."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import convkit
from convkit.autograd import BatchNormFunction
from conftest import (ACTIVATIONS, KINKS, DEVICE_PARAMS, TORCH_ACTIVATIONS, activation_spec as _spec,
                      assert_close_to_reference, fused_batch_norm as _ours, make_layout)


def _reference_bn(x, running_mean, running_var, weight, bias, training, momentum, eps, activation):
    out = F.batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps)
    return TORCH_ACTIVATIONS[activation](out)


def _run(fn, x, weight, bias, stats, training, momentum, eps, activation, grad_output=None):
    xs = x.detach().clone().requires_grad_()
    w = weight.detach().clone().requires_grad_() if weight is not None else None
    b = bias.detach().clone().requires_grad_() if bias is not None else None
    out = fn(xs, stats[0], stats[1], w, b, training, momentum, eps, activation)
    if grad_output is None:
        grad_output = torch.randn_like(out)
    out.backward(grad_output)
    grads = [xs.grad, w.grad if w is not None else None, b.grad if b is not None else None]
    return out.detach(), grads, grad_output


def _ours_fn(x, rm, rv, w, b, training, momentum, eps, activation):
    return _ours(activation)(x, rm, rv, w, b, training, momentum, eps)


@pytest.mark.parametrize("device", DEVICE_PARAMS)
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("affine", [True, False])
# The CPU kernel has two layouts: rows (C * H * W <= 4096) and planes (larger maps, here
# (2, 3, 40, 41), whose 1640-value planes also span two summation blocks); (70, 3, 4, 5) has
# three blocks of images and rows whose length is no multiple of the vector chunk.
@pytest.mark.parametrize("shape", [(4, 3, 5, 6), (1, 2, 3, 3), (7, 5, 1, 1), (6, 4), (3, 2, 9),
                                   (70, 3, 4, 5), (2, 3, 40, 41)])
def test_batch_norm_float64_matches_torch(shape, affine, training, activation, device):
    dtype = torch.float64
    channels = shape[1]
    x = torch.randn(shape, dtype=dtype, device=device) * 3 + 1.5
    weight = torch.randn(channels, dtype=dtype, device=device) if affine else None
    bias = torch.randn(channels, dtype=dtype, device=device) if affine else None
    stats_ours = [torch.randn(channels, dtype=dtype, device=device), torch.rand(channels, dtype=dtype, device=device) + 0.5]
    stats_theirs = [t.clone() for t in stats_ours]
    ours, our_grads, dy = _run(_ours_fn, x, weight, bias, stats_ours, training, 0.1, 1e-5, activation)
    theirs, their_grads, _ = _run(_reference_bn, x, weight, bias, stats_theirs, training, 0.1, 1e-5, activation, dy)
    torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-10)
    for name, g_ours, g_theirs in zip(("input", "weight", "bias"), our_grads, their_grads):
        if g_theirs is None:
            assert g_ours is None
        else:
            torch.testing.assert_close(g_ours, g_theirs, rtol=1e-9, atol=1e-9, msg=name)
    for s_ours, s_theirs in zip(stats_ours, stats_theirs):
        torch.testing.assert_close(s_ours, s_theirs, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("device", DEVICE_PARAMS)
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("layout", ["contiguous", "noncontiguous", "channels_last"])
@pytest.mark.parametrize("shape", [(8, 6, 7, 9), (40, 5, 3, 3), (3, 4, 33, 35)])  # rows, rows, planes
def test_batch_norm_float32_within_torch_error(shape, layout, training, activation, device):
    channels = shape[1]
    x = make_layout(torch.randn(shape, device=device) * 2 + 4, layout)
    weight = torch.randn(channels, device=device)
    bias = torch.randn(channels, device=device)
    stats = [torch.randn(channels, device=device), torch.rand(channels, device=device) + 0.5]
    ours, our_grads, dy = _run(_ours_fn, x, weight, bias, [s.clone() for s in stats], training, 0.1, 1e-5, activation)
    theirs, their_grads, _ = _run(_reference_bn, x, weight, bias, [s.clone() for s in stats], training, 0.1, 1e-5, activation, dy)
    ref, ref_grads, _ = _run(
        _reference_bn, x.double(), weight.double(), bias.double(), [s.double() for s in stats],
        training, 0.1, 1e-5, activation, dy.double(),
    )
    assert_close_to_reference(ours, theirs, ref, name="output")
    for name, g_ours, g_theirs, g_ref in zip(("input", "weight", "bias"), our_grads, their_grads, ref_grads):
        assert_close_to_reference(g_ours, g_theirs, g_ref, factor=2.0, name=name)


@pytest.mark.parametrize("device", DEVICE_PARAMS)
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("shape", [(4, 3, 6, 6), (2, 3, 40, 41)])  # rows, planes
def test_batch_norm_bfloat16(shape, training, activation, device):
    x = torch.randn(shape, device=device).bfloat16()
    weight = torch.randn(3, device=device).bfloat16()
    bias = torch.randn(3, device=device).bfloat16()
    stats = [torch.randn(3, device=device).bfloat16(), (torch.rand(3, device=device) + 0.5).bfloat16()]
    ours, our_grads, dy = _run(_ours_fn, x, weight, bias, [s.clone() for s in stats], training, 0.1, 1e-5, activation)
    theirs, their_grads, _ = _run(_reference_bn, x, weight, bias, [s.clone() for s in stats], training, 0.1, 1e-5, activation, dy)
    assert ours.dtype == torch.bfloat16
    torch.testing.assert_close(ours, theirs, rtol=2e-2, atol=2e-2)
    # Gradients: our error against a float64 run on the same inputs at most 2x PyTorch's
    # (whose bf16 autograd rounds in between: its weight gradient is off by up to ~3 where
    # ours is off by ~0.1). Where the pre-activation is within bf16 rounding of a kink, either
    # side's activation may pass or block the gradient (both are right): the input gradient is
    # compared elsewhere.
    _, ref_grads, _ = _run(
        _reference_bn, x.double(), weight.double(), bias.double(), [s.double() for s in stats],
        training, 0.1, 1e-5, activation, dy.double(),
    )
    x64 = x.double()
    if training:
        mean = x64.mean(dim=(0, 2, 3), keepdim=True)
        var = x64.var(dim=(0, 2, 3), unbiased=False, keepdim=True)
    else:
        mean, var = (s.double().view(1, -1, 1, 1) for s in stats)
    pre = (x64 - mean) / torch.sqrt(var + 1e-5) * weight.double().view(1, -1, 1, 1) + bias.double().view(1, -1, 1, 1)
    decided = torch.ones_like(pre, dtype=torch.bool)
    for kink in KINKS[activation]:
        decided &= (pre - kink).abs() > 0.05
    assert decided.float().mean() > 0.75
    for name, g_ours, g_theirs, g_ref in zip(("input", "weight", "bias"), our_grads, their_grads, ref_grads):
        assert g_ours.dtype == g_theirs.dtype == torch.bfloat16
        if name == "input":
            g_ours, g_theirs, g_ref = g_ours[decided], g_theirs[decided], g_ref[decided]
        assert_close_to_reference(g_ours, g_theirs, g_ref, factor=2.0, name=name)


@pytest.mark.parametrize("device", DEVICE_PARAMS)
@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("fused", [True, False])
def test_batch_norm_modules_over_several_steps(fused, affine, momentum, device):
    """Three training steps then eval: outputs, grads, running stats and
    num_batches_tracked follow torch's BatchNorm2d (+ ReLU) exactly (float64)."""
    ours = (convkit.nn.BatchNormReLU2d if fused else convkit.nn.BatchNorm2d)(
        5, momentum=momentum, affine=affine
    )
    theirs = nn.Sequential(nn.BatchNorm2d(5, momentum=momentum, affine=affine), nn.ReLU() if fused else nn.Identity())
    ours = ours.double().to(device)
    theirs = theirs.double().to(device)
    if affine:
        with torch.no_grad():
            ours.weight.copy_(torch.randn(5)); ours.bias.copy_(torch.randn(5))
            theirs[0].weight.copy_(ours.weight); theirs[0].bias.copy_(ours.bias)
    for step in range(4):
        training = step < 3
        ours.train(training)
        theirs.train(training)
        x = torch.randn(6, 5, 4, 3, dtype=torch.float64, device=device) * (step + 1) + step
        x_ours = x.clone().requires_grad_()
        x_theirs = x.clone().requires_grad_()
        y_ours = ours(x_ours)
        y_theirs = theirs(x_theirs)
        torch.testing.assert_close(y_ours, y_theirs, rtol=1e-10, atol=1e-10)
        dy = torch.randn_like(y_ours)
        y_ours.backward(dy)
        y_theirs.backward(dy)
        torch.testing.assert_close(x_ours.grad, x_theirs.grad, rtol=1e-9, atol=1e-9)
        if affine:
            torch.testing.assert_close(ours.weight.grad, theirs[0].weight.grad, rtol=1e-9, atol=1e-9)
            torch.testing.assert_close(ours.bias.grad, theirs[0].bias.grad, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(ours.running_mean, theirs[0].running_mean, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(ours.running_var, theirs[0].running_var, rtol=1e-12, atol=1e-12)
        assert int(ours.num_batches_tracked) == int(theirs[0].num_batches_tracked)


@pytest.mark.parametrize("device", DEVICE_PARAMS)
def test_batch_norm_without_running_stats(device):
    """track_running_stats=False: batch statistics in eval mode too, as torch does."""
    ours = convkit.nn.BatchNormReLU2d(3, track_running_stats=False).double().to(device).eval()
    theirs = nn.BatchNorm2d(3, track_running_stats=False).double().to(device).eval()
    x = torch.randn(4, 3, 5, 5, dtype=torch.float64, device=device)
    torch.testing.assert_close(ours(x), F.relu(theirs(x)), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("device", DEVICE_PARAMS)
def test_batch_norm_empty_batch(device):
    rm = torch.randn(3, device=device)
    rv = torch.rand(3, device=device) + 0.5
    rm0, rv0 = rm.clone(), rv.clone()
    x = torch.randn(0, 3, 4, 4, device=device, requires_grad=True)
    out = convkit.batch_norm_relu(x, rm, rv, torch.ones(3, device=device), torch.zeros(3, device=device), training=True)
    assert out.shape == (0, 3, 4, 4)
    out.sum().backward()
    assert x.grad.shape == x.shape
    assert torch.equal(rm, rm0) and torch.equal(rv, rv0)


@pytest.mark.parametrize("device", DEVICE_PARAMS)
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("affine", [True, False])
def test_batch_norm_gradcheck(affine, training, activation, device):
    x = torch.randn(3, 4, 3, 5, dtype=torch.float64, device=device).requires_grad_()
    rm = torch.randn(4, dtype=torch.float64, device=device)
    rv = torch.rand(4, dtype=torch.float64, device=device) + 0.5
    params = ()
    if affine:
        params = (torch.randn(4, dtype=torch.float64, device=device).requires_grad_(),
                  torch.randn(4, dtype=torch.float64, device=device).requires_grad_())
    fn = _ours(activation)

    def f(x, *p):
        w, b = p if p else (None, None)
        # No running stats in training: gradcheck calls f many times and must not move them.
        return fn(x, None if training else rm, None if training else rv, w, b, training)

    assert torch.autograd.gradcheck(f, (x,) + params)

    def g(x, *p):  # the op itself, whose autograd node (csrc/autograd.cpp) f goes through
        w, b = p if p else (None, None)
        return torch.ops.convkit.batch_norm_forward(x, w, b, None if training else rm, None if training else rv, training, 1e-5, *_spec(activation))[0]

    assert torch.autograd.gradcheck(g, (x,) + params)

    def h(x, *p):  # the Python twin used under torch.func transforms
        w, b = p if p else (None, None)
        return BatchNormFunction.apply(x, w, b, None if training else rm, None if training else rv, training, 1e-5, *_spec(activation))[0]

    assert torch.autograd.gradcheck(h, (x,) + params)


def test_batch_norm_relu_output_is_nonnegative():
    out = convkit.batch_norm_relu(torch.randn(8, 4, 5, 5), None, None, training=True)
    assert (out >= 0).all() and (out > 0).any()


# The streaming stores are written for none and relu; silu stands for the others.
@pytest.mark.parametrize("activation", ["none", "relu", "silu"])
@pytest.mark.parametrize("training", [True, False])
def test_batch_norm_large_output_cpu(training, activation):
    """Outputs of >= 16 MiB are written with non-temporal stores on the CPU: planes of an odd
    length (513 * 515), so most start off a 64-byte boundary and end in a partial vector."""
    shape = (2, 8, 513, 515)
    x = torch.randn(shape) * 2 + 1
    weight, bias = torch.randn(8), torch.randn(8)
    stats = [torch.randn(8), torch.rand(8) + 0.5]
    with torch.no_grad():
        ours = _ours(activation)(x, *[s.clone() for s in stats], weight, bias, training)
        theirs = _reference_bn(x, *[s.clone() for s in stats], weight, bias, training, 0.1, 1e-5, activation)
        ref = _reference_bn(x.double(), *[s.double() for s in stats], weight.double(),
                            bias.double(), training, 0.1, 1e-5, activation)
    assert ours.nbytes >= 16 << 20
    assert_close_to_reference(ours, theirs, ref, name="output")


@pytest.mark.parametrize("device", DEVICE_PARAMS)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_batch_norm_strided_running_statistics(activation, device):
    """Running statistics that are views with a stride (a column of a buffer) are updated in
    place, as torch updates them; the rest of the buffer is untouched."""
    x = torch.randn(6, 3, 4, 5, dtype=torch.float64, device=device) * 2 + 1
    buffers = [torch.randn(3, 2, dtype=torch.float64, device=device).abs() + 0.5 for _ in range(2)]
    ours = [b.clone() for b in buffers]
    theirs = [b.clone() for b in buffers]
    out = _ours(activation)(x, ours[0][:, 0], ours[1][:, 0], training=True)
    expected = _reference_bn(x, theirs[0][:, 0], theirs[1][:, 0], None, None, True, 0.1, 1e-5, activation)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    for o, t in zip(ours, theirs):
        torch.testing.assert_close(o, t, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("device", DEVICE_PARAMS)
@pytest.mark.parametrize("shape", [(32, 16, 2, 2), (64, 8, 14, 14), (4, 2, 48, 48)],
                         ids=["rows-2x2", "rows-14x14", "planes"])
def test_statistics_stay_accurate_when_the_first_value_is_far_from_the_mean(device, shape):
    # Regression: the statistics were taken about each channel's first value; with that value
    # 25 std from the mean (post-ReLU6 activations lie up to 20 off) the float block sums lost
    # 1e-5-1e-4 of the variance on the CPU and Welford's float mean 2.5e-6 on CUDA. They
    # are now taken about the mean of the channel's first 32 values.
    x = torch.randn(shape, dtype=torch.float64)
    x[0, :, 0, 0] = 25.0
    x = x.float().to(device)
    _, mean, var = convkit.ops.batch_norm_forward(x, None, None, None, None, True, 1e-5, "none", 0.0, 0.0)
    exact = x.double().var((0, 2, 3), unbiased=False)
    torch_var = x.var((0, 2, 3), unbiased=False)
    own = ((torch_var.double() - exact).abs() / exact).max().item()
    error = ((var.double() - exact).abs() / exact).max().item()
    assert error <= 1e-6, (error, own)
    torch.testing.assert_close(mean.double(), x.double().mean((0, 2, 3)), rtol=1e-6, atol=1e-6)
