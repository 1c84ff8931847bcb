"""channels_last: a channels-last input (or weight) gives what torch's ops give — the same
values and gradients, outputs and gradients in the same memory format with the same strides —
on the CPU (which computes in NHWC memory: no round trip through NCHW) and on the CUDA code
(which converts at the end); the fake kernels promise the same strides."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import convkit
from conftest import ACTIVATIONS, DEVICE_PARAMS, TORCH_ACTIVATIONS, fused_batch_norm

CL = torch.channels_last

# (N, C, H, W), O, kernel, stride, padding, dilation, groups
CONV_SHAPES = [
    ((2, 5, 9, 8), 7, (3, 3), 1, 1, 1, 1),
    ((2, 6, 9, 9), 4, (3, 3), 2, 1, 1, 1),
    ((3, 8, 6, 7), 12, (1, 1), 1, 0, 1, 1),
    ((2, 8, 7, 7), 6, (1, 1), 2, 0, 1, 1),
    ((2, 3, 15, 13), 5, (7, 7), 2, 3, 1, 1),
    ((2, 6, 8, 8), 4, (3, 3), 1, 2, 2, 2),
    ((2, 6, 9, 9), 6, (3, 3), 1, 1, 1, 6),
    ((2, 6, 9, 10), 6, (3, 3), 2, 1, 1, 6),
    ((2, 4, 8, 8), 8, (3, 3), 1, 1, 1, 4),
    ((1, 4, 5, 6), 3, (2, 3), (2, 1), (0, 1), (1, 2), 1),
    # 144 columns: the weight gradient's column ranges split taps between threads.
    ((2, 16, 6, 7), 8, (3, 3), 1, 1, 1, 1),
    # Weights of >= 2 MiB (in float64): tiles shared by all threads, the GEMM threaded.
    ((2, 128, 4, 4), 256, (3, 3), 1, 1, 1, 1),
    ((2, 128, 5, 5), 256, (3, 3), 2, 1, 1, 1),
]
SHAPE_IDS = [f"{s[0]}-{s[1]}-k{s[2]}-s{s[3]}-p{s[4]}-d{s[5]}-g{s[6]}" for s in CONV_SHAPES]


def _conv_inputs(shape, dtype, device, input_format=CL, weight_format=CL, bias=True):
    (n, c, h, w), o, kernel, stride, padding, dilation, groups = shape
    x = torch.randn(n, c, h, w, dtype=dtype, device=device).to(memory_format=input_format)
    weight = torch.randn(o, c // groups, *kernel, dtype=dtype, device=device)
    weight = weight.to(memory_format=weight_format)
    b = torch.randn(o, dtype=dtype, device=device) if bias else None
    return x, weight, b, dict(stride=stride, padding=padding, dilation=dilation, groups=groups)


def _run_conv(fn, x, weight, bias, args, grad):
    x = x.detach().clone().requires_grad_()
    weight = weight.detach().clone().requires_grad_()
    bias = bias.detach().clone().requires_grad_() if bias is not None else None
    out = fn(x, weight, bias, **args)
    out.backward(grad)
    grads = [x.grad, weight.grad] + ([bias.grad] if bias is not None else [])
    return out, grads


@pytest.mark.parametrize("device", DEVICE_PARAMS)
@pytest.mark.parametrize("shape", CONV_SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("bias", [True, False])
def test_conv2d_channels_last_matches_torch(shape, bias, device):
    x, weight, b, args = _conv_inputs(shape, torch.float64, device, bias=bias)
    grad = torch.randn_like(F.conv2d(x, weight, b, **args))
    theirs, their_grads = _run_conv(F.conv2d, x, weight, b, args, grad)
    ours, our_grads = _run_conv(convkit.conv2d, x, weight, b, args, grad)
    assert ours.is_contiguous(memory_format=CL)
    assert ours.stride() == theirs.stride()
    torch.testing.assert_close(ours, theirs)
    for mine, torch_grad in zip(our_grads, their_grads):
        assert mine.stride() == torch_grad.stride()
        torch.testing.assert_close(mine, torch_grad)


@pytest.mark.parametrize("device", DEVICE_PARAMS)
@pytest.mark.parametrize("formats", [(torch.contiguous_format, CL), (CL, torch.contiguous_format),
                                     (torch.contiguous_format, torch.contiguous_format)],
                         ids=["weight-cl", "input-cl", "neither"])
def test_conv2d_output_format_follows_torchs_rule(formats, device):
    """Channels-last when the input or the weight is, as torch's conv decides."""
    x, weight, b, args = _conv_inputs(CONV_SHAPES[0], torch.float64, device, *formats)
    grad = torch.randn_like(F.conv2d(x, weight, b, **args)).contiguous()  # an NCHW dY
    theirs, their_grads = _run_conv(F.conv2d, x, weight, b, args, grad)
    ours, our_grads = _run_conv(convkit.conv2d, x, weight, b, args, grad)
    assert ours.stride() == theirs.stride()
    torch.testing.assert_close(ours, theirs)
    for mine, torch_grad in zip(our_grads, their_grads):
        torch.testing.assert_close(mine, torch_grad)
    assert our_grads[0].stride() == their_grads[0].stride()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", CONV_SHAPES, ids=SHAPE_IDS)
def test_conv2d_channels_last_low_precision(shape, dtype):
    """Each dtype against the float64 result, within the error of the NCHW kernels' result."""
    x, weight, b, args = _conv_inputs(shape, dtype, "cpu")
    grad = torch.randn_like(F.conv2d(x.double(), weight.double(), b.double(), **args)).to(dtype)
    exact, exact_grads = _run_conv(F.conv2d, x.double(), weight.double(), b.double(), args,
                                   grad.double())
    ours, our_grads = _run_conv(convkit.conv2d, x, weight, b, args, grad)
    nchw, nchw_grads = _run_conv(convkit.conv2d, x.contiguous(), weight.contiguous(), b, args,
                                 grad.contiguous())
    assert ours.is_contiguous(memory_format=CL) and ours.dtype == dtype
    for mine, reference, truth in zip([ours] + our_grads, [nchw] + nchw_grads,
                                      [exact] + exact_grads):
        error = (mine.double() - truth).abs().max().item()
        reference_error = (reference.double() - truth).abs().max().item()
        scale = truth.abs().max().item()
        eps = torch.finfo(dtype).eps
        assert error <= 4 * reference_error + 8 * eps * scale, (error, reference_error)


@pytest.mark.parametrize("shape", [CONV_SHAPES[1], CONV_SHAPES[5], CONV_SHAPES[7]],
                         ids=[SHAPE_IDS[1], SHAPE_IDS[5], SHAPE_IDS[7]])
def test_conv2d_channels_last_gradcheck(shape):
    x, weight, b, args = _conv_inputs(shape, torch.float64, "cpu")
    x = x[:1, :, :6, :6].contiguous(memory_format=CL).requires_grad_()
    weight.requires_grad_()
    b.requires_grad_()
    assert torch.autograd.gradcheck(lambda *t: convkit.conv2d(*t, **args), (x, weight, b))


@pytest.mark.parametrize("shape, path", [(CONV_SHAPES[0], "channels_last"),
                                         (CONV_SHAPES[6], "channels_last_depthwise")],
                         ids=["gemm", "depthwise"])
def test_conv2d_cpu_plan_names_the_channels_last_paths(shape, path):
    x, weight, _, args = _conv_inputs(shape, torch.float32, "cpu")
    stride, padding, dilation = (args[k] for k in ("stride", "padding", "dilation"))
    as_pair = lambda v: [v, v] if isinstance(v, int) else list(v)  # noqa: E731
    plan = torch.ops.convkit.conv2d_cpu_plan(x, weight, as_pair(stride), as_pair(padding),
                                             as_pair(dilation), args["groups"], [True, True])
    assert tuple(plan) == (path, path, path)
    nchw = torch.ops.convkit.conv2d_cpu_plan(x.contiguous(),
                                             weight.clone(memory_format=torch.contiguous_format),
                                             as_pair(stride), as_pair(padding), as_pair(dilation),
                                             args["groups"], [True, True])
    assert path not in nchw


@pytest.mark.parametrize("shape", [((4, 16, 12, 12), 24, (3, 3), 1, 1, 1, 1),
                                   ((4, 256, 4, 4), 512, (3, 3), 2, 1, 1, 1)],
                         ids=["spread-tiles", "shared-tiles"])
def test_conv2d_channels_last_results_do_not_depend_on_threads(shape):
    x, weight, b, args = _conv_inputs(shape, torch.float32, "cpu")
    grad = torch.randn_like(F.conv2d(x, weight, b, **args))
    before = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            out, grads = _run_conv(convkit.conv2d, x, weight, b, args, grad)
            results.append([out] + grads)
    finally:
        torch.set_num_threads(before)
    for other in results[1:]:
        for a, b_ in zip(results[0], other):
            assert torch.equal(a, b_)


# ---- Batch norm.

# The wide one has more than 4096 values an image (NCHW: the planes layout; NHWC: rows).
BN_SHAPES = [(4, 6, 5, 7), (2, 4200, 1, 2), (2, 4, 3, 5, 6)]


def _bn_format(shape):
    return CL if len(shape) == 4 else torch.channels_last_3d


@pytest.mark.parametrize("device", DEVICE_PARAMS)
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("shape", BN_SHAPES, ids=["4d", "4d-wide", "5d"])
def test_batch_norm_channels_last_matches_torch(shape, training, activation, device):
    memory_format = _bn_format(shape)
    c = shape[1]
    x0 = (torch.randn(shape, dtype=torch.float64, device=device) * 2 + 0.5)
    x0 = x0.to(memory_format=memory_format)
    w0 = torch.rand(c, dtype=torch.float64, device=device) + 0.5
    b0 = torch.randn(c, dtype=torch.float64, device=device)
    outs, grads, stats = [], [], []
    for fn in (F.batch_norm, fused_batch_norm(activation)):
        x = x0.clone().requires_grad_()
        w, b = w0.clone().requires_grad_(), b0.clone().requires_grad_()
        rm = torch.linspace(-1, 1, c, dtype=torch.float64, device=device)
        rv = torch.linspace(0.5, 2, c, dtype=torch.float64, device=device)
        out = fn(x, rm, rv, w, b, training=training)
        if fn is F.batch_norm:
            out = TORCH_ACTIVATIONS[activation](out)
        dy = torch.linspace(-1, 1, out.numel(), dtype=torch.float64, device=device).view(shape)
        out.backward(dy.to(memory_format=memory_format))
        outs.append(out)
        grads.append((x.grad, w.grad, b.grad))
        stats.append((rm, rv))
    theirs, ours = outs
    assert ours.is_contiguous(memory_format=memory_format)
    assert ours.stride() == theirs.stride()
    torch.testing.assert_close(ours, theirs)
    assert grads[1][0].stride() == grads[0][0].stride()
    for mine, torch_grad in zip(grads[1], grads[0]):
        torch.testing.assert_close(mine, torch_grad)
    for mine, torch_stat in zip(stats[1], stats[0]):
        torch.testing.assert_close(mine, torch_stat)


def test_batch_norm_channels_last_gradcheck():
    x = torch.randn(3, 4, 3, 2, dtype=torch.float64).to(memory_format=CL).requires_grad_()
    w = (torch.rand(4, dtype=torch.float64) + 0.5).requires_grad_()
    b = torch.randn(4, dtype=torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(
        lambda *t: convkit.functional.batch_norm_activation(
            t[0], None, None, t[1], t[2], training=True, activation="silu"), (x, w, b))


@pytest.mark.parametrize("device", DEVICE_PARAMS)
def test_opcheck_channels_last(device):
    """The fake kernels' strides are the real ones' for channels-last arguments."""
    x = torch.randn(2, 4, 5, 5, device=device).to(memory_format=CL)
    w = torch.randn(6, 4, 3, 3, device=device)
    opcheck = torch.library.opcheck
    tests = ("test_schema", "test_faketensor")
    opcheck(torch.ops.convkit.conv2d_forward.default, (x, w, None, [1, 1], [1, 1], [1, 1], 1),
            test_utils=tests)
    dy = torch.randn(2, 6, 5, 5, device=device)
    opcheck(torch.ops.convkit.conv2d_backward.default,
            (dy, x.contiguous(), w.to(memory_format=CL), [1, 1], [1, 1], [1, 1], 1,
             [True, True, True]), test_utils=tests)
    weight, bias = torch.rand(4, device=device) + 0.5, torch.randn(4, device=device)
    opcheck(torch.ops.convkit.batch_norm_forward.default,
            (x, weight, bias, None, None, True, 1e-5, "relu", 0.0, 0.0), test_utils=tests)
    _, mean, var = torch.ops.convkit.batch_norm_forward(x, weight, bias, None, None, True, 1e-5,
                                                        "relu", 0.0, 0.0)
    opcheck(torch.ops.convkit.batch_norm_backward.default,
            (torch.randn_like(x), x, weight, bias, mean, var, True, 1e-5, "relu", 0.0, 0.0,
             [True, True, True]), test_utils=tests)


def _small_net() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1, groups=16, bias=False), nn.BatchNorm2d(16), nn.ReLU6(),
        nn.Conv2d(16, 24, 1, bias=False), nn.BatchNorm2d(24),
    )


def test_channels_last_model_trains_like_torch_without_nchw_copies():
    """A converted channels_last model: torch's outputs and gradients, channels-last
    activations throughout, and no activation-sized copy in forward or backward (the loss
    hands back a channels-last gradient; torch's pooling layers hand back NCHW ones, which
    the next op's backward converts, as torch's own do)."""
    torch.manual_seed(1)
    reference = _small_net().double().to(memory_format=CL)
    model = convkit.nn.convert(_small_net().double()).to(memory_format=CL)
    model.load_state_dict(reference.state_dict())
    x = torch.randn(4, 3, 16, 16, dtype=torch.float64).to(memory_format=CL)
    target = torch.randn(4, 24, 8, 8, dtype=torch.float64).to(memory_format=CL)
    feature_maps = []
    hooks = [m.register_forward_hook(lambda _m, _i, out: feature_maps.append(out))
             for m in model]
    with torch.profiler.profile(record_shapes=True) as profile:
        out = model(x)
        (out * target).sum().backward()
    for hook in hooks:
        hook.remove()
    their_out = reference(x)
    (their_out * target).sum().backward()
    torch.testing.assert_close(out, their_out)
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=name)
    assert feature_maps and all(t.is_contiguous(memory_format=CL) for t in feature_maps)
    activation_shapes = {tuple(t.shape) for t in feature_maps} | {tuple(x.shape)}
    copies = [event for event in profile.events()
              if event.name in ("aten::copy_", "aten::clone")
              and any(tuple(s) in activation_shapes for s in event.input_shapes if s)]
    assert not copies, [(e.name, e.input_shapes) for e in copies]


@pytest.mark.parametrize("device", DEVICE_PARAMS)
@pytest.mark.parametrize("shape", [(3, 5, 4, 6), (2, 4200, 1, 2)], ids=["4d", "4d-wide"])
def test_sync_batch_norm_ops_channels_last(shape, device):
    """The synchronised batch norm's ops read channels-last memory as it is and give the
    input gradient in it: the same values as for the NCHW copy of the same tensors."""
    ops = convkit.ops
    x = torch.randn(shape, dtype=torch.float64, device=device) * 3 + 1
    dy = torch.randn(shape, dtype=torch.float64, device=device)
    c = shape[1]
    w = torch.rand(c, dtype=torch.float64, device=device) + 0.5
    b = torch.randn(c, dtype=torch.float64, device=device)
    results = []
    for memory_format in (torch.contiguous_format, CL):
        xs = x.contiguous(memory_format=memory_format)
        dys = dy.contiguous(memory_format=memory_format)
        mean, var = ops.batch_norm_stats(xs)
        sums = ops.batch_norm_backward_reduce(dys, xs, mean, var, w, b, 1e-5, "silu", 0.0, 0.0)
        grad_input = ops.batch_norm_backward_elemt(dys, xs, mean, var, w, b, sums[0], sums[1],
                                                   x.numel() // c, 1e-5, "silu", 0.0, 0.0)
        assert grad_input.is_contiguous(memory_format=memory_format)
        results.append((mean, var, *sums, grad_input))
    for nchw, channels_last in zip(*results):
        torch.testing.assert_close(channels_last, nchw, rtol=1e-12, atol=1e-12)
