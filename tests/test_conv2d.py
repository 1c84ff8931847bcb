"""convkit conv2d against F.conv2d: forward and all three gradients, over the whole
argument space, layouts, dtypes and batch sizes; gradcheck; a hypothesis property test."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import convkit
from convkit.autograd import Conv2dFunction
from conftest import DEVICE_PARAMS, assert_close_to_reference, make_layout

# (batch, in_channels, H, W, out_channels, kernel (kH, kW), stride, padding, dilation, groups)
CONFIGS = [
    (2, 3, 8, 8, 4, (1, 1), 1, 0, 1, 1),
    (2, 3, 9, 7, 5, (2, 2), 1, 0, 1, 1),
    (3, 4, 10, 10, 6, (3, 3), 1, 1, 1, 1),
    (1, 2, 11, 9, 3, (4, 4), 2, 1, 1, 1),
    (2, 1, 28, 28, 8, (5, 5), 2, 2, 1, 1),
    (3, 4, 12, 13, 4, (6, 6), 1, 2, 1, 2),
    (2, 3, 14, 12, 2, (7, 7), 3, 3, 1, 1),
    (2, 4, 9, 11, 6, (3, 5), (2, 1), (1, 2), 1, 2),
    (2, 6, 10, 8, 6, (2, 3), (1, 2), (0, 1), (2, 1), 3),
    (3, 8, 9, 9, 8, (3, 3), 1, 1, 1, 8),  # depthwise
    (2, 4, 7, 7, 12, (3, 3), 2, 1, 1, 4),  # depthwise with multiplier 3
    (2, 3, 15, 15, 4, (3, 3), 1, 2, 2, 1),  # dilated
    (2, 2, 12, 10, 3, (3, 2), (3, 2), (2, 0), (3, 2), 1),
    (5, 3, 6, 6, 4, (1, 1), 2, 0, 1, 1),  # 1x1 strided
    (1, 3, 5, 5, 2, (5, 5), 1, 0, 1, 1),  # kernel = input: 1x1 output
    (3, 2, 4, 4, 2, (3, 3), 4, 1, 1, 1),  # stride larger than kernel
    (2, 4, 8, 6, 4, (1, 4), 1, (0, 2), 1, 2),
    (1, 1, 1, 1, 1, (1, 1), 1, 0, 1, 1),
]


def _config_id(config) -> str:
    n, c, h, w, o, k, s, p, d, g = config
    return f"n{n}c{c}h{h}w{w}o{o}k{k[0]}x{k[1]}s{s}p{p}d{d}g{g}".replace(" ", "")


def _make(config, dtype, device, bias):
    n, c, h, w, o, (kh, kw), stride, padding, dilation, groups = config
    x = torch.randn(n, c, h, w, dtype=dtype, device=device)
    weight = torch.randn(o, c // groups, kh, kw, dtype=dtype, device=device)
    b = torch.randn(o, dtype=dtype, device=device) if bias else None
    return x, weight, b, dict(stride=stride, padding=padding, dilation=dilation, groups=groups)


def _forward_backward(fn, x, weight, bias, kwargs, grad_output=None):
    """Output and the gradients (input, weight, bias) for a given output gradient."""
    leaves = [t.detach().clone().requires_grad_() for t in (x, weight)]
    b = bias.detach().clone().requires_grad_() if bias is not None else None
    out = fn(leaves[0], leaves[1], b, **kwargs)
    if grad_output is None:
        grad_output = torch.randn_like(out)
    out.backward(grad_output)
    grads = [leaves[0].grad, leaves[1].grad, b.grad if b is not None else None]
    return out.detach(), grads, grad_output


@pytest.mark.parametrize("device", DEVICE_PARAMS)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("config", CONFIGS, ids=_config_id)
def test_conv2d_float64_matches_torch(config, bias, device):
    x, weight, b, kwargs = _make(config, torch.float64, device, bias)
    ours, our_grads, dy = _forward_backward(convkit.conv2d, x, weight, b, kwargs)
    theirs, their_grads, _ = _forward_backward(F.conv2d, x, weight, b, kwargs, dy)
    torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-10)
    for name, g_ours, g_theirs in zip(("input", "weight", "bias"), our_grads, their_grads):
        if g_theirs is None:
            assert g_ours is None
            continue
        torch.testing.assert_close(g_ours, g_theirs, rtol=1e-10, atol=1e-10, msg=name)


@pytest.mark.parametrize("device", DEVICE_PARAMS)
@pytest.mark.parametrize("layout", ["contiguous", "noncontiguous", "channels_last"])
@pytest.mark.parametrize("config", CONFIGS[::2], ids=_config_id)
def test_conv2d_float32_within_torch_error(config, layout, device):
    x, weight, b, kwargs = _make(config, torch.float32, device, bias=True)
    x = make_layout(x, layout)
    weight = make_layout(weight, layout)
    ours, our_grads, dy = _forward_backward(convkit.conv2d, x, weight, b, kwargs)
    theirs, their_grads, _ = _forward_backward(F.conv2d, x, weight, b, kwargs, dy)
    ref, ref_grads, _ = _forward_backward(
        F.conv2d, x.double(), weight.double(), b.double(), kwargs, dy.double()
    )
    assert_close_to_reference(ours, theirs, ref, name="output")
    for name, g_ours, g_theirs, g_ref in zip(("input", "weight", "bias"), our_grads, their_grads, ref_grads):
        assert_close_to_reference(g_ours, g_theirs, g_ref, name=name)


@pytest.mark.parametrize("device", DEVICE_PARAMS)
@pytest.mark.parametrize("config", CONFIGS[:8], ids=_config_id)
def test_conv2d_bfloat16(config, device):
    """bfloat16 is computed with float accumulation: its error against a float64 reference
    stays within a few bfloat16 ulps of the result's scale, like PyTorch's."""
    x, weight, b, kwargs = _make(config, torch.bfloat16, device, bias=True)
    ours, our_grads, dy = _forward_backward(convkit.conv2d, x, weight, b, kwargs)
    theirs, their_grads, _ = _forward_backward(F.conv2d, x, weight, b, kwargs, dy)
    ref, ref_grads, _ = _forward_backward(
        F.conv2d, x.double(), weight.double(), b.double(), kwargs, dy.double()
    )
    assert_close_to_reference(ours, theirs, ref, factor=3.0, name="output")
    for name, g_ours, g_theirs, g_ref in zip(("input", "weight", "bias"), our_grads, their_grads, ref_grads):
        assert_close_to_reference(g_ours, g_theirs, g_ref, factor=3.0, name=name)


@pytest.mark.parametrize("device", DEVICE_PARAMS)
@pytest.mark.parametrize("batch", [0, 1, 7])
def test_conv2d_batch_sizes(batch, device):
    config = (batch, 4, 9, 9, 6, (3, 3), 2, 1, 1, 2)
    x, weight, b, kwargs = _make(config, torch.float64, device, bias=True)
    ours, our_grads, dy = _forward_backward(convkit.conv2d, x, weight, b, kwargs)
    theirs, their_grads, _ = _forward_backward(F.conv2d, x, weight, b, kwargs, dy)
    assert ours.shape == theirs.shape == (batch, 6, 5, 5)
    torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-10)
    for g_ours, g_theirs in zip(our_grads, their_grads):
        assert g_ours.shape == g_theirs.shape
        torch.testing.assert_close(g_ours, g_theirs, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("device", DEVICE_PARAMS)
@pytest.mark.parametrize("padding", ["same", "valid", 0, 2, (1, 3), [2, 0]])
@pytest.mark.parametrize("kernel", [(1, 1), (2, 2), (3, 3), (4, 2), (2, 5)])
@pytest.mark.parametrize("dilation", [1, (2, 1)])
def test_conv2d_padding_forms(padding, kernel, dilation, device):
    x = torch.randn(2, 3, 9, 8, dtype=torch.float64, device=device)
    weight = torch.randn(4, 3, *kernel, dtype=torch.float64, device=device)
    b = torch.randn(4, dtype=torch.float64, device=device)
    kwargs = dict(padding=padding, dilation=dilation)
    ours, our_grads, dy = _forward_backward(convkit.conv2d, x, weight, b, kwargs)
    theirs, their_grads, _ = _forward_backward(F.conv2d, x, weight, b, kwargs, dy)
    if padding == "same":
        assert ours.shape[-2:] == x.shape[-2:]
    torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-10)
    for g_ours, g_theirs in zip(our_grads, their_grads):
        torch.testing.assert_close(g_ours, g_theirs, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("device", DEVICE_PARAMS)
@pytest.mark.parametrize("padding", [1, "same"])
def test_conv2d_unbatched_input(padding, device):
    x = torch.randn(3, 7, 6, dtype=torch.float64, device=device)
    weight = torch.randn(5, 3, 3, 3, dtype=torch.float64, device=device)
    kwargs = dict(padding=padding)
    ours, our_grads, dy = _forward_backward(convkit.conv2d, x, weight, None, kwargs)
    theirs, their_grads, _ = _forward_backward(F.conv2d, x, weight, None, kwargs, dy)
    assert ours.dim() == 3
    torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(our_grads[0], their_grads[0], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(our_grads[1], their_grads[1], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("device", DEVICE_PARAMS)
@pytest.mark.parametrize("budget_mib", ["0.001", "0.05", "64"])
def test_conv2d_chunked_column_buffer(budget_mib, device, monkeypatch):
    """A small column budget splits the batch into chunks (down to one image); the result
    must not change."""
    monkeypatch.setenv("CONVKIT_COLUMN_BUDGET_MB", budget_mib)
    config = (9, 4, 12, 12, 6, (3, 3), 1, 1, 1, 2)
    x, weight, b, kwargs = _make(config, torch.float64, device, bias=True)
    ours, our_grads, dy = _forward_backward(convkit.conv2d, x, weight, b, kwargs)
    theirs, their_grads, _ = _forward_backward(F.conv2d, x, weight, b, kwargs, dy)
    torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-10)
    for g_ours, g_theirs in zip(our_grads, their_grads):
        torch.testing.assert_close(g_ours, g_theirs, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("value", ["lots", "0", "inf", "1e30", "-5"])
def test_conv2d_bad_column_budget(value, monkeypatch):
    """1e30 and inf overflowed the conversion to bytes (undefined behaviour)."""
    monkeypatch.setenv("CONVKIT_COLUMN_BUDGET_MB", value)
    with pytest.raises(RuntimeError, match=rf"CONVKIT_COLUMN_BUDGET_MB must be a positive number of MiB \(at most 2\^42\), but got '{value}'"):
        convkit.conv2d(torch.randn(1, 1, 3, 3), torch.randn(1, 1, 2, 2))


def test_conv2d_deterministic():
    """col2im gathers: the same inputs give bit-identical gradients run after run."""
    config = (4, 6, 11, 11, 6, (3, 3), 1, 1, 1, 1)
    x, weight, b, kwargs = _make(config, torch.float32, "cpu", bias=True)
    first = _forward_backward(convkit.conv2d, x, weight, b, kwargs)
    second = _forward_backward(convkit.conv2d, x, weight, b, kwargs, first[2])
    assert torch.equal(first[0], second[0])
    for g1, g2 in zip(first[1], second[1]):
        assert torch.equal(g1, g2)


@pytest.mark.parametrize("device", DEVICE_PARAMS)
@pytest.mark.parametrize(
    "config",
    [
        (2, 2, 5, 5, 3, (3, 3), 1, 1, 1, 1),
        (1, 4, 6, 5, 4, (2, 3), (2, 1), (1, 0), (1, 2), 2),
        (2, 3, 5, 5, 3, (3, 3), 1, 0, 1, 3),
    ],
    ids=_config_id,
)
def test_conv2d_gradcheck(config, device):
    x, weight, b, kwargs = _make(config, torch.float64, device, bias=True)
    inputs = tuple(t.requires_grad_() for t in (x, weight, b))
    assert torch.autograd.gradcheck(lambda *a: convkit.conv2d(*a, **kwargs), inputs)
    # The op itself, whose autograd node (csrc/autograd.cpp) is what convkit.conv2d uses.
    stride, padding, dilation = (kwargs[k] for k in ("stride", "padding", "dilation"))
    pair = lambda v: [v, v] if isinstance(v, int) else list(v)  # noqa: E731
    assert torch.autograd.gradcheck(
        lambda *a: torch.ops.convkit.conv2d_forward(
            *a, pair(stride), pair(padding), pair(dilation), kwargs["groups"]
        ),
        inputs,
    )
    # The Python twin used under torch.func transforms.
    assert torch.autograd.gradcheck(
        lambda *a: Conv2dFunction.apply(
            *a, pair(stride), pair(padding), pair(dilation), kwargs["groups"]
        ),
        inputs,
    )


@settings(max_examples=40, deadline=None)
@given(
    batch=st.integers(0, 3),
    groups=st.integers(1, 3),
    in_per_group=st.integers(1, 3),
    out_per_group=st.integers(1, 3),
    kernel=st.tuples(st.integers(1, 5), st.integers(1, 5)),
    stride=st.tuples(st.integers(1, 3), st.integers(1, 3)),
    dilation=st.tuples(st.integers(1, 3), st.integers(1, 3)),
    padding=st.tuples(st.integers(0, 3), st.integers(0, 3)),
    extra=st.tuples(st.integers(0, 6), st.integers(0, 6)),
    bias=st.booleans(),
)
def test_conv2d_property_random_configs(
    batch, groups, in_per_group, out_per_group, kernel, stride, dilation, padding, extra, bias
):
    """Any valid configuration hypothesis draws: forward and gradients equal F.conv2d's."""
    # Input just large enough for the dilated kernel, plus a random margin.
    size = [max(1, dilation[i] * (kernel[i] - 1) + 1 - 2 * padding[i]) + extra[i] for i in range(2)]
    x = torch.randn(batch, groups * in_per_group, *size, dtype=torch.float64)
    weight = torch.randn(groups * out_per_group, in_per_group, *kernel, dtype=torch.float64)
    b = torch.randn(groups * out_per_group, dtype=torch.float64) if bias else None
    kwargs = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
    ours, our_grads, dy = _forward_backward(convkit.conv2d, x, weight, b, kwargs)
    theirs, their_grads, _ = _forward_backward(F.conv2d, x, weight, b, kwargs, dy)
    torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-10)
    for g_ours, g_theirs in zip(our_grads, their_grads):
        if g_theirs is None:
            assert g_ours is None
        else:
            torch.testing.assert_close(g_ours, g_theirs, rtol=1e-10, atol=1e-10)
