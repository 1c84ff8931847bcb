"""The CUDA code path against the CPU one and against float64 references: on a GPU ("cuda")
and, on every machine, under the CPU emulator of CUDA's execution model ("cuda-emu"). Then
what only a GPU can show: autocast, work on the current stream, CUDA graphs through
torch.compile's reduce-overhead mode. The device-parametrized tests of the other modules run
on both CUDA targets as well.

References on the GPU are float64 (or computed with TF32 off): cuDNN convolutions use TF32 by
default, whose error (~1e-3) is far above ours."""
from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import convkit
from conftest import CUDA_TARGETS, NEEDS_GPU, CudaTarget, assert_close_to_reference

CONFIGS = [
    # (N, C, H, W, O, kernel, stride, padding, dilation, groups)
    (4, 3, 28, 28, 8, (5, 5), 2, 2, 1, 1),
    (8, 16, 14, 14, 32, (3, 3), 2, 1, 1, 1),
    (2, 8, 9, 11, 8, (3, 3), 1, 1, 1, 8),
    (3, 6, 10, 10, 4, (2, 3), (1, 2), (0, 1), (2, 1), 2),
    (0, 4, 8, 8, 4, (3, 3), 1, 1, 1, 1),
]


def _conv_step(x, w, b, kwargs, dy, fn=convkit.conv2d):
    x = x.detach().clone().requires_grad_()
    w = w.detach().clone().requires_grad_()
    b = b.detach().clone().requires_grad_()
    out = fn(x, w, b, **kwargs)
    out.backward(dy)
    return out.detach(), x.grad, w.grad, b.grad


@pytest.mark.parametrize("target", CUDA_TARGETS)
@pytest.mark.parametrize("config", CONFIGS)
def test_conv2d_cpu_and_cuda_agree(config, target):
    n, c, h, w, o, k, stride, padding, dilation, groups = config
    kwargs = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
    x = torch.randn(n, c, h, w, dtype=torch.float64)
    weight = torch.randn(o, c // groups, *k, dtype=torch.float64)
    bias = torch.randn(o, dtype=torch.float64)
    dy = torch.randn_like(F.conv2d(x, weight, bias, **kwargs))
    on_cpu = _conv_step(x, weight, bias, kwargs, dy)
    cuda = CudaTarget(target)
    with cuda.active():
        on_cuda = _conv_step(*(t.to(cuda.device) for t in (x, weight, bias)), kwargs, dy.to(cuda.device))
    for cpu_value, cuda_value in zip(on_cpu, on_cuda):
        torch.testing.assert_close(cuda_value.cpu(), cpu_value, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("target", CUDA_TARGETS)
@pytest.mark.parametrize("relu", [True, False])
@pytest.mark.parametrize("training", [True, False])
def test_batch_norm_cpu_and_cuda_agree(training, relu, target):
    x = torch.randn(16, 8, 7, 5, dtype=torch.float64) * 2 + 1
    weight, bias = torch.randn(8, dtype=torch.float64), torch.randn(8, dtype=torch.float64)
    dy = torch.randn_like(x)
    results = []
    for where in ("cpu", target):
        cuda = CudaTarget(where) if where != "cpu" else None
        device = cuda.device if cuda else "cpu"
        rm = torch.zeros(8, dtype=torch.float64, device=device)
        rv = torch.ones(8, dtype=torch.float64, device=device)
        xs = x.to(device).requires_grad_()
        w = weight.to(device).requires_grad_()
        b = bias.to(device).requires_grad_()
        fn = convkit.batch_norm_relu if relu else convkit.batch_norm
        with cuda.active() if cuda else contextlib.nullcontext():
            out = fn(xs, rm, rv, w, b, training=training)
            out.backward(dy.to(device))
        results.append([t.detach().cpu() for t in (out, xs.grad, w.grad, b.grad, rm, rv)])
    for cpu_value, cuda_value in zip(*results):
        torch.testing.assert_close(cuda_value, cpu_value, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("target", CUDA_TARGETS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("config", CONFIGS[:4])
def test_conv2d_half_precision(config, dtype, target):
    """Half types accumulate in float: our error against a float64 reference stays within a
    small multiple of PyTorch's (cuDNN's on a GPU)."""
    n, c, h, w, o, k, stride, padding, dilation, groups = config
    kwargs = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
    cuda = CudaTarget(target)
    x = torch.randn(n, c, h, w, device=cuda.device)
    weight = torch.randn(o, c // groups, *k, device=cuda.device) / (c * k[0] * k[1]) ** 0.5
    bias = torch.randn(o, device=cuda.device)
    dy = torch.randn_like(F.conv2d(x, weight, bias, **kwargs))
    with cuda.active():
        ours = _conv_step(x.to(dtype), weight.to(dtype), bias.to(dtype), kwargs, dy.to(dtype))
    theirs = _conv_step(x.to(dtype), weight.to(dtype), bias.to(dtype), kwargs, dy.to(dtype), F.conv2d)
    ref = _conv_step(*(t.to(dtype).double() for t in (x, weight, bias)), kwargs, dy.to(dtype).double(),
                     F.conv2d)
    for name, o_value, t_value, r_value in zip(("output", "input", "weight", "bias"), ours, theirs, ref):
        assert o_value.dtype == dtype
        assert_close_to_reference(o_value, t_value, r_value, factor=4.0, name=name)


@pytest.mark.parametrize("target", CUDA_TARGETS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("training", [True, False])
def test_batch_norm_half_precision(dtype, training, target):
    cuda = CudaTarget(target)
    x = (torch.randn(32, 16, 9, 9, device=cuda.device) * 2 + 1).to(dtype)
    weight = torch.randn(16, device=cuda.device)
    bias = torch.randn(16, device=cuda.device)
    rm = torch.randn(16, device=cuda.device)
    rv = torch.rand(16, device=cuda.device) + 0.5
    dy = torch.randn_like(x)
    outs = []
    reference = lambda *a, **k: F.relu(F.batch_norm(*a, **k))  # noqa: E731
    for fn, context in ((convkit.batch_norm_relu, cuda.active()), (reference, contextlib.nullcontext())):
        xs = x.clone().requires_grad_()
        w = weight.clone().requires_grad_()
        b = bias.clone().requires_grad_()
        with context:
            out = fn(xs, rm.clone(), rv.clone(), w, b, training=training)
            out.backward(dy)
        outs.append((out.detach().float(), xs.grad.float(), w.grad, b.grad))
    tolerance = 1e-2 if dtype == torch.float16 else 5e-2
    for ours, theirs in zip(*outs):
        torch.testing.assert_close(ours, theirs, rtol=tolerance, atol=tolerance)


@NEEDS_GPU
def test_autocast_runs_conv_in_half():
    x = torch.randn(4, 3, 16, 16, device="cuda")
    layer = convkit.nn.Conv2d(3, 8, 3, padding=1).cuda()
    reference = nn.Conv2d(3, 8, 3, padding=1).cuda()
    reference.load_state_dict(layer.state_dict())
    with torch.autocast("cuda"):
        ours = layer(x)
        theirs = reference(x)
    assert ours.dtype == theirs.dtype == torch.float16
    torch.testing.assert_close(ours, theirs, rtol=2e-3, atol=2e-3)
    ours.float().sum().backward()
    assert layer.weight.grad is not None and layer.weight.grad.dtype == torch.float32
    with torch.autocast("cuda", dtype=torch.bfloat16):
        assert layer(x).dtype == torch.bfloat16


@NEEDS_GPU
def test_work_runs_on_the_current_stream():
    """Kernels launched on the default stream instead of the current one would race with
    the producer of x on this side stream. The reference is float64: cuDNN's float32
    convolution uses TF32 by default."""
    stream = torch.cuda.Stream()
    layer = convkit.nn.Conv2d(8, 8, 3, padding=1).cuda()
    bn = convkit.nn.BatchNormReLU2d(8).cuda()
    with torch.cuda.stream(stream):
        for _ in range(3):
            x = torch.randn(64, 8, 32, 32, device="cuda") * 3
            y = bn(layer(x))
            conv64 = F.conv2d(x.double(), layer.weight.double(), layer.bias.double(), padding=1)
            expected = F.relu(F.batch_norm(conv64, None, None, bn.weight.double(), bn.bias.double(), True))
            torch.testing.assert_close(y.double(), expected, rtol=1e-4, atol=1e-4)
    torch.cuda.synchronize()


@NEEDS_GPU
def test_torch_compile_reduce_overhead():
    """CUDA graphs capture only work issued on the capturing stream: a kernel launched on
    another stream breaks the capture or gives stale results."""
    torch._dynamo.reset()
    model = nn.Sequential(
        convkit.nn.Conv2d(1, 8, 5, stride=2, padding=2), convkit.nn.BatchNormReLU2d(8),
        convkit.nn.Conv2d(8, 16, 3, stride=2, padding=1), convkit.nn.BatchNormReLU2d(16),
        nn.Flatten(),
    ).cuda().eval()
    compiled = torch.compile(model, mode="reduce-overhead")
    for _ in range(4):
        x = torch.randn(16, 1, 28, 28, device="cuda")
        torch.testing.assert_close(compiled(x).clone(), model(x), rtol=1e-4, atol=1e-4)
