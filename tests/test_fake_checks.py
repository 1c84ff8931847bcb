"""The fake kernels (convkit/ops.py, run on meta tensors, under torch.compile, and whenever an
argument is on the meta device) refuse what the real kernels refuse, with the same message;
arguments on different devices are refused, never computed from uninitialised memory; and
every product of sizes the caller gives is overflow-checked."""
from __future__ import annotations

import pytest
import torch

import convkit

ops = torch.ops.convkit


def _meta(value):
    """The same tensor on the meta device, strides included (an expanded tensor stays one)."""
    if not isinstance(value, torch.Tensor):
        return value
    return torch.empty_strided(value.shape, value.stride(), dtype=value.dtype, device="meta")


def _x(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=dtype)


_STATS = (torch.zeros(3), torch.ones(3))
BAD_CALLS = {
    "conv channels": (ops.conv2d_forward, (_x(2, 3, 8, 8), _x(4, 2, 3, 3), None, [1, 1], [0, 0], [1, 1], 1)),
    "conv groups": (ops.conv2d_forward, (_x(2, 4, 8, 8), _x(5, 2, 3, 3), None, [1, 1], [0, 0], [1, 1], 2)),
    "conv kernel larger than input": (ops.conv2d_forward, (_x(2, 3, 4, 4), _x(4, 3, 7, 3), None, [1, 1], [0, 0], [1, 1], 1)),
    "conv dilated kernel": (ops.conv2d_forward, (_x(2, 3, 4, 4), _x(4, 3, 3, 3), None, [1, 1], [0, 0], [2, 2], 1)),
    "conv stride": (ops.conv2d_forward, (_x(2, 3, 8, 8), _x(4, 3, 3, 3), None, [0, 1], [0, 0], [1, 1], 1)),
    "conv padding": (ops.conv2d_forward, (_x(2, 3, 8, 8), _x(4, 3, 3, 3), None, [1, 1], [-1, 0], [1, 1], 1)),
    "conv bias size": (ops.conv2d_forward, (_x(2, 3, 8, 8), _x(4, 3, 3, 3), _x(5), [1, 1], [0, 0], [1, 1], 1)),
    "conv dtype": (ops.conv2d_forward, (_x(2, 3, 8, 8), _x(4, 3, 3, 3, dtype=torch.float64), None, [1, 1], [0, 0], [1, 1], 1)),
    "conv rank": (ops.conv2d_forward, (_x(3, 8, 8), _x(4, 3, 3, 3), None, [1, 1], [0, 0], [1, 1], 1)),
    "conv empty height": (ops.conv2d_forward, (_x(1, 1, 0, 5), _x(1, 1, 1, 1), None, [1, 1], [1, 1], [1, 1], 1)),
    "conv padding overflow": (ops.conv2d_forward, (_x(1, 1, 3, 3), _x(1, 1, 3, 3), None, [1, 1], [2**62, 0], [1, 1], 1)),
    "conv dilation overflow": (ops.conv2d_forward, (_x(1, 1, 3, 3), _x(1, 1, 3, 3), None, [1, 1], [0, 0], [2**62, 1], 1)),
    "conv backward grad shape": (ops.conv2d_backward, (_x(2, 4, 5, 5), _x(2, 3, 6, 6), _x(4, 3, 3, 3), [1, 1], [0, 0], [1, 1], 1, [True, True, True])),
    "im2col kernel": (ops.im2col, (_x(1, 3, 5, 5), [7, 7], [1, 1], [0, 0], [1, 1])),
    "im2col empty": (ops.im2col, (_x(1, 0, 5, 5), [1, 1], [1, 1], [0, 0], [1, 1])),
    "col2im length": (ops.col2im, (_x(1, 9, 10), [5, 5], [3, 3], [1, 1], [0, 0], [1, 1])),
    "col2im area": (ops.col2im, (_x(1, 10, 9), [5, 5], [3, 3], [1, 1], [0, 0], [1, 1])),
    "col2im area overflow": (ops.col2im, (_x(1, 9, 16), [6, 6], [2**32, 2**32], [1, 1], [0, 0], [1, 1])),
    "bn weight size": (ops.batch_norm_forward, (_x(4, 3, 2, 2), _x(4), None, None, None, True, 1e-5, "none", 0.0, 0.0)),
    "bn eval without stats": (ops.batch_norm_forward, (_x(4, 3, 2, 2), None, None, None, None, False, 1e-5, "relu", 0.0, 0.0)),
    "bn one value": (ops.batch_norm_forward, (_x(1, 3), None, None, None, None, True, 1e-5, "none", 0.0, 0.0)),
    "bn eps": (ops.batch_norm_forward, (_x(4, 3), None, None, None, None, True, -1.0, "none", 0.0, 0.0)),
    "bn rank": (ops.batch_norm_forward, (_x(5), None, None, None, None, True, 1e-5, "none", 0.0, 0.0)),
    "bn integer": (ops.batch_norm_forward, (torch.ones(4, 3, dtype=torch.long), None, None, None, None, True, 1e-5, "none", 0.0, 0.0)),
    "bn backward grad shape": (ops.batch_norm_backward, (_x(4, 3, 2), _x(4, 3, 2, 2), None, None, _x(3), _x(3), True, 1e-5, "relu", 0.0, 0.0, [True, True, True])),
    "bn unknown activation": (ops.batch_norm_forward, (_x(4, 3, 2, 2), None, None, None, None, True, 1e-5, "gelu", 0.0, 0.0)),
    "bn hardtanh min above max": (ops.batch_norm_forward, (_x(4, 3, 2, 2), None, None, None, None, True, 1e-5, "hardtanh", 1.5, 0.5)),
    "bn leaky_relu nan slope": (ops.batch_norm_forward, (_x(4, 3, 2, 2), None, None, None, None, True, 1e-5, "leaky_relu", float("nan"), 0.0)),
    "bn backward unknown activation": (ops.batch_norm_backward, (_x(4, 3, 2, 2), _x(4, 3, 2, 2), None, None, _x(3), _x(3), True, 1e-5, "ReLU", 0.0, 0.0, [True, True, True])),
    "bn reduce unknown activation": (ops.batch_norm_backward_reduce, (_x(4, 3, 2, 2), _x(4, 3, 2, 2), _x(3), _x(3), None, None, 1e-5, "swish", 0.0, 0.0)),
    "bn elemt hardtanh min above max": (ops.batch_norm_backward_elemt, (_x(4, 3, 2, 2), _x(4, 3, 2, 2), _x(3), _x(3), None, None, torch.zeros(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64), 16, 1e-5, "hardtanh", 2.5, -2.5)),
    "bn update size": (ops.batch_norm_update_stats, (torch.zeros(2), torch.ones(3), _STATS[0], _STATS[1], 0.1, 8)),
    "bn update count": (ops.batch_norm_update_stats, (torch.zeros(3), torch.ones(3), _STATS[0], _STATS[1], 0.1, -1)),
    "bn update expanded": (ops.batch_norm_update_stats, (torch.zeros(1).expand(3), torch.ones(3), _STATS[0], _STATS[1], 0.1, 8)),
}


def _message(op, args) -> str:
    with pytest.raises(RuntimeError) as caught:
        op(*args)
    return str(caught.value).splitlines()[0]


@pytest.mark.parametrize("name", list(BAD_CALLS))
def test_fake_kernel_refuses_what_the_kernel_refuses(name):
    op, args = BAD_CALLS[name]
    real = _message(op, args)  # refused before anything is written
    fake = _message(op, [_meta(a) for a in args])
    assert real.startswith("convkit::")
    assert fake == real


def test_fake_kernel_accepts_what_the_kernel_accepts():
    x, w = _x(2, 3, 9, 8), _x(4, 3, 3, 2)
    out = ops.conv2d_forward(_meta(x), _meta(w), None, [2, 1], [1, 0], [1, 2], 1)
    assert out.shape == ops.conv2d_forward(x, w, None, [2, 1], [1, 0], [1, 2], 1).shape


@pytest.mark.parametrize("which", ["weight", "bias", "running_mean", "running_var"])
def test_batch_norm_refuses_parameters_on_another_device(which):
    args = dict(weight=torch.ones(3), bias=torch.zeros(3), running_mean=torch.zeros(3),
                running_var=torch.ones(3))
    args[which] = args[which].to("meta")
    with pytest.raises(RuntimeError, match=rf"expected {which} on the same device as input \(cpu\), but got meta"):
        ops.batch_norm_forward(_x(4, 3, 2, 2), args["weight"], args["bias"], args["running_mean"],
                               args["running_var"], False, 1e-5, "relu", 0.0, 0.0)
    with pytest.raises(RuntimeError, match=rf"expected {which} on the same device as input"):
        convkit.batch_norm_relu(_x(4, 3, 2, 2), args["running_mean"], args["running_var"],
                                args["weight"], args["bias"], training=False)


def test_conv2d_refuses_weight_on_another_device():
    with pytest.raises(RuntimeError, match=r"expected weight on the same device as input \(cpu\), but got weight on meta"):
        convkit.conv2d(_x(1, 2, 5, 5), _x(3, 2, 3, 3).to("meta"))


def test_col2im_with_an_overflowing_kernel_area_is_an_error_not_a_crash():
    """2^32 x 2^32 wrapped around to 0 and the check divided by it (SIGFPE)."""
    with pytest.raises(RuntimeError, match=r"the kernel area \(\[4294967296, 4294967296\]\) overflows a 64-bit size"):
        convkit.functional.col2im(torch.randn(1, 9, 16), (6, 6), 2**32)


def test_conv2d_with_sizes_overflowing_64_bits_is_an_error():
    with pytest.raises(RuntimeError, match="overflows a 64-bit size"):
        convkit.conv2d(_x(1, 1, 3, 3), _x(1, 1, 3, 3), padding=(2**62, 0))
    with pytest.raises(RuntimeError, match="overflows a 64-bit size"):
        convkit.functional.im2col(_x(1, 1, 3, 3), (3, 3), dilation=(2**62, 1))
