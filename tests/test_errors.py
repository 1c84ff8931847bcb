"""Every check we make: bad input raises a RuntimeError/ValueError that names what was
received and what was expected, never a crash or a wrong result."""
from __future__ import annotations

import pytest
import torch

import convkit

x4 = lambda *s, dtype=torch.float32: torch.randn(*s, dtype=dtype)  # noqa: E731


CONV_ERRORS = [
    # (input shape, weight shape, kwargs, error type, message pattern)
    ((3, 8), None, {}, RuntimeError, r"expected a 3-D \(unbatched\) or 4-D \(batched\) input, but got a 2-D"),
    ((1, 2, 3, 8, 8), None, {}, RuntimeError, r"expected a 3-D \(unbatched\) or 4-D \(batched\) input, but got a 5-D"),
    ((2, 3, 8, 8), (4, 3, 3), {}, RuntimeError, r"expected a 4-D weight .* but got a 3-D tensor"),
    ((2, 3, 8, 8), (4, 2, 3, 3), {}, RuntimeError, r"to have 2 channels .* but got 3 channels"),
    ((2, 4, 8, 8), (6, 2, 3, 3), {"groups": 3}, RuntimeError, r"to have 6 channels .* but got 4 channels"),
    ((2, 4, 8, 8), (5, 2, 3, 3), {"groups": 2}, RuntimeError, r"out_channels \(5\) to be divisible by groups \(2\)"),
    ((2, 4, 8, 8), (4, 4, 3, 3), {"groups": 0}, RuntimeError, r"expected a positive number of groups, but got 0"),
    ((2, 4, 8, 8), (4, 4, 3, 3), {"groups": -1}, RuntimeError, r"expected a positive number of groups, but got -1"),
    ((2, 3, 4, 4), (4, 3, 6, 3), {}, RuntimeError, r"kernel size \(6 x 3\) is larger than the padded input size \(4 x 4\)"),
    ((2, 3, 4, 4), (4, 3, 3, 3), {"dilation": 2}, RuntimeError, r"kernel size \(5 x 5\) is larger than the padded input size \(4 x 4\)"),
    ((2, 3, 8, 8), (4, 3, 3, 3), {"stride": 0}, RuntimeError, r"expected a positive stride, but got \[0, 0\]"),
    ((2, 3, 8, 8), (4, 3, 3, 3), {"stride": (1, -2)}, RuntimeError, r"expected a positive stride, but got \[1, -2\]"),
    ((2, 3, 8, 8), (4, 3, 3, 3), {"dilation": (0, 1)}, RuntimeError, r"expected a positive dilation, but got \[0, 1\]"),
    ((2, 3, 8, 8), (4, 3, 3, 3), {"padding": -1}, RuntimeError, r"expected a non-negative padding, but got \[-1, -1\]"),
    ((2, 3, 8, 8), (4, 3, 3, 3), {"padding": "full"}, ValueError, r"invalid padding string 'full', expected 'same' or 'valid'"),
    ((2, 3, 8, 8), (4, 3, 3, 3), {"padding": "same", "stride": 2}, RuntimeError, r"padding='same' is not supported for strided convolutions"),
    ((2, 3, 8, 8), (4, 3, 3, 3), {"padding": (1, 2, 3)}, ValueError, r"expected padding to be an int or a pair of ints"),
    ((2, 3, 8, 8), (4, 3, 3, 3), {"stride": (1, 2, 1)}, ValueError, r"expected stride to be an int or a pair of ints"),
    # Not ints, though Python lets them pass as ints: bools and floats.
    ((2, 3, 8, 8), (4, 3, 3, 3), {"stride": True}, ValueError, r"expected stride to be an int or a pair of ints, got True"),
    ((2, 3, 8, 8), (4, 3, 3, 3), {"dilation": (1, False)}, ValueError, r"expected dilation to be an int or a pair of ints"),
    ((2, 3, 8, 8), (4, 3, 3, 3), {"padding": [1, 1.0]}, ValueError, r"expected padding to be an int or a pair of ints"),
]


@pytest.mark.parametrize("input_shape, weight_shape, kwargs, error, pattern", CONV_ERRORS)
def test_conv2d_errors(input_shape, weight_shape, kwargs, error, pattern):
    x = torch.randn(input_shape)
    weight = torch.randn(weight_shape if weight_shape is not None else (4, 3, 3, 3))
    with pytest.raises(error, match=pattern):
        convkit.conv2d(x, weight, **kwargs)


def test_conv2d_dtype_mismatch_input_weight():
    with pytest.raises(RuntimeError, match=r"expected weight to have the same dtype as input \(Float\), but got Double"):
        convkit.conv2d(torch.randn(1, 2, 5, 5), torch.randn(3, 2, 3, 3, dtype=torch.float64))


def test_conv2d_dtype_mismatch_bias():
    with pytest.raises(RuntimeError, match=r"expected bias to have the same dtype as input \(Float\), but got Double"):
        convkit.conv2d(torch.randn(1, 2, 5, 5), torch.randn(3, 2, 3, 3), torch.randn(3, dtype=torch.float64))


def test_conv2d_integer_input():
    with pytest.raises(RuntimeError, match=r"expected input to be a floating-point tensor .* but got Long"):
        convkit.conv2d(torch.ones(1, 2, 5, 5, dtype=torch.long), torch.ones(3, 2, 3, 3, dtype=torch.long))


def test_conv2d_bias_wrong_size():
    with pytest.raises(RuntimeError, match=r"expected a 1-D bias of 3 elements .* but got shape \[4\]"):
        convkit.conv2d(torch.randn(1, 2, 5, 5), torch.randn(3, 2, 3, 3), torch.randn(4))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_conv2d_device_mismatch():
    with pytest.raises(RuntimeError, match=r"expected weight on the same device as input"):
        convkit.conv2d(torch.randn(1, 2, 5, 5, device="cuda"), torch.randn(3, 2, 3, 3))


def test_conv2d_backward_wrong_grad_output_shape():
    x, w = torch.randn(2, 3, 6, 6), torch.randn(4, 3, 3, 3)
    with pytest.raises(RuntimeError, match=r"expected grad_output of shape \[2, 4, 4, 4\], but got \[2, 4, 5, 5\]"):
        torch.ops.convkit.conv2d_backward(torch.randn(2, 4, 5, 5), x, w, [1, 1], [0, 0], [1, 1], 1, [True, True, True])


def test_conv2d_op_wrong_rank():
    with pytest.raises(RuntimeError, match=r"conv2d_forward: expected a 4-D input \[N, C, H, W\], but got a 3-D"):
        torch.ops.convkit.conv2d_forward(torch.randn(3, 5, 5), torch.randn(2, 3, 3, 3), None, [1, 1], [0, 0], [1, 1], 1)


def test_batch_norm_one_value_per_channel_training():
    with pytest.raises(ValueError, match=r"Expected more than 1 value per channel when training, got input size"):
        convkit.batch_norm_relu(torch.randn(1, 3, 1, 1), None, None, training=True)
    with pytest.raises(RuntimeError, match=r"expected more than 1 value per channel when training, but got input of shape \[1, 3\]"):
        torch.ops.convkit.batch_norm_forward(torch.randn(1, 3), None, None, None, None, True, 1e-5, "none", 0.0, 0.0)
    # The module raises torch's error too (experiment 8 of the chapter relies on it).
    with pytest.raises(ValueError, match=r"Expected more than 1 value per channel"):
        convkit.nn.BatchNorm2d(3).train()(torch.randn(1, 3, 1, 1))


@pytest.mark.parametrize("which", ["running_mean", "running_var"])
@pytest.mark.parametrize("size", [0, 2, 5])
def test_batch_norm_wrong_size_running_stats(which, size):
    stats = {"running_mean": torch.zeros(3), "running_var": torch.ones(3)}
    stats[which] = torch.ones(size)
    with pytest.raises(RuntimeError, match=rf"expected {which} to be a 1-D tensor of 3 elements .* but got shape \[{size}\]"):
        convkit.batch_norm(torch.randn(4, 3, 2, 2), stats["running_mean"], stats["running_var"], training=False)
    with pytest.raises(RuntimeError, match=rf"expected {which} to be a 1-D tensor of 3 elements"):
        convkit.batch_norm(torch.randn(4, 3, 2, 2), stats["running_mean"], stats["running_var"], training=True)


@pytest.mark.parametrize("which", ["weight", "bias"])
def test_batch_norm_wrong_size_affine(which):
    kwargs = {which: torch.ones(4)}
    with pytest.raises(RuntimeError, match=rf"expected {which} to be a 1-D tensor of 3 elements .* but got shape \[4\]"):
        convkit.batch_norm(torch.randn(4, 3, 2, 2), None, None, training=True, **kwargs)


def test_batch_norm_eval_needs_running_stats():
    with pytest.raises(RuntimeError, match=r"running_mean and running_var must be given in eval mode"):
        convkit.batch_norm(torch.randn(4, 3, 2, 2), None, None, training=False)


def test_batch_norm_only_one_running_stat():
    with pytest.raises(ValueError, match=r"expected running_mean and running_var both given or both None"):
        convkit.batch_norm(torch.randn(4, 3, 2, 2), torch.zeros(3), None, training=True)


def test_batch_norm_wrong_rank():
    with pytest.raises(RuntimeError, match=r"expected an input of at least 2 dimensions \[N, C, ...\], but got a 1-D"):
        convkit.batch_norm(torch.randn(5), None, None, training=True)
    with pytest.raises(ValueError, match=r"expected 4D input \(got 3D input\)"):
        convkit.nn.BatchNormReLU2d(3)(torch.randn(3, 4, 4))


def test_batch_norm_integer_input():
    with pytest.raises(RuntimeError, match=r"expected input to be a floating-point tensor .* but got Long"):
        torch.ops.convkit.batch_norm_forward(torch.ones(4, 3, dtype=torch.long), None, None, None, None, True, 1e-5, "none", 0.0, 0.0)


def test_batch_norm_momentum_none_functional():
    with pytest.raises(ValueError, match=r"momentum=None \(cumulative average\) needs the number of batches seen"):
        convkit.batch_norm(torch.randn(4, 3), torch.zeros(3), torch.ones(3), training=True, momentum=None)


def test_batch_norm_negative_eps():
    with pytest.raises(RuntimeError, match=r"expected a non-negative eps, but got -1"):
        convkit.batch_norm(torch.randn(4, 3), None, None, training=True, eps=-1.0)


def test_batch_norm_backward_wrong_grad_shape():
    x = torch.randn(4, 3, 2, 2)
    out, mean, var = torch.ops.convkit.batch_norm_forward(x, None, None, None, None, True, 1e-5, "relu", 0.0, 0.0)
    with pytest.raises(RuntimeError, match=r"expected grad_output of shape \[4, 3, 2, 2\], but got \[4, 3, 2\]"):
        torch.ops.convkit.batch_norm_backward(torch.randn(4, 3, 2), x, None, None, mean, var, True, 1e-5, "relu", 0.0, 0.0, [True, True, True])


def test_batch_norm_update_stats_errors():
    with pytest.raises(RuntimeError, match=r"expected running statistics of 3 elements .* but got shape \[2\]"):
        torch.ops.convkit.batch_norm_update_stats(torch.zeros(2), torch.ones(3), torch.zeros(3), torch.ones(3), 0.1, 8)
    with pytest.raises(RuntimeError, match=r"expected a non-negative count, but got -1"):
        torch.ops.convkit.batch_norm_update_stats(torch.zeros(3), torch.ones(3), torch.zeros(3), torch.ones(3), 0.1, -1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_batch_norm_device_mismatch():
    with pytest.raises(RuntimeError, match=r"expected weight on the same device as input"):
        convkit.batch_norm(torch.randn(4, 3, device="cuda"), None, None, torch.ones(3), None, training=True)


def test_window_argument_errors_name_the_op():
    from convkit.functional import col2im, im2col

    with pytest.raises(ValueError, match=r"im2col: expected kernel_size to be an int or a pair of ints, got 2.5"):
        im2col(torch.randn(1, 1, 4, 4), 2.5)
    with pytest.raises(ValueError, match=r"col2im: expected stride to be an int or a pair of ints, got \(1, 2, 3\)"):
        col2im(torch.randn(1, 4, 9), (4, 4), 2, stride=(1, 2, 3))
    with pytest.raises(ValueError, match=r"conv2d: expected dilation to be an int or a pair of ints, got True"):
        convkit.conv2d(torch.randn(1, 1, 4, 4), torch.randn(1, 1, 2, 2), dilation=True)
