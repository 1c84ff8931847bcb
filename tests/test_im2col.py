"""im2col / col2im against F.unfold / F.fold. These ops run the index helpers of
csrc/conv2d.h one element at a time (the CUDA kernels use the same helpers), so these
tests check that shared index math on every machine, GPU or not."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from convkit.functional import col2im, im2col
from conftest import DEVICE_PARAMS, emulating

# (N, C, H, W, kernel, dilation, padding, stride)
WINDOWS = [
    (2, 3, 8, 8, (3, 3), 1, 1, 1),
    (1, 2, 9, 7, (2, 4), (2, 1), (1, 2), (2, 1)),
    (3, 1, 28, 28, (5, 5), 1, 2, 2),
    (2, 4, 6, 11, (1, 1), 1, 0, (1, 3)),
    (2, 2, 10, 10, (3, 2), (3, 2), (0, 3), (3, 2)),
    (1, 3, 5, 5, (5, 5), 1, 0, 1),
    (0, 3, 6, 6, (3, 3), 1, 1, 1),
]


def _ids(w):
    return "x".join(str(v).replace(" ", "") for v in w)


@pytest.mark.parametrize("device", DEVICE_PARAMS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("window", WINDOWS, ids=_ids)
def test_im2col_matches_unfold(window, dtype, device):
    n, c, h, w, kernel, dilation, padding, stride = window
    x = torch.randn(n, c, h, w, device=device).to(dtype)
    ours = im2col(x, kernel, dilation, padding, stride)
    theirs = F.unfold(x, kernel, dilation, padding, stride)
    assert ours.shape == theirs.shape
    assert torch.equal(ours, theirs)  # a copy: exact in every dtype


@pytest.mark.parametrize("device", DEVICE_PARAMS)
@pytest.mark.parametrize("window", WINDOWS, ids=_ids)
def test_col2im_matches_fold(window, device):
    n, c, h, w, kernel, dilation, padding, stride = window
    blocks = F.unfold(torch.zeros(n, c, h, w), kernel, dilation, padding, stride).shape
    columns = torch.randn(blocks, dtype=torch.float64, device=device)
    ours = col2im(columns, (h, w), kernel, dilation, padding, stride)
    theirs = F.fold(columns, (h, w), kernel, dilation, padding, stride)
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)


# The full Jacobian of the 28x28 window takes ~30,000 calls (~20 s): the slow tier's.
GRADCHECK_WINDOWS = WINDOWS[:2] + [pytest.param(WINDOWS[2], marks=pytest.mark.slow)]


@pytest.mark.parametrize("device", DEVICE_PARAMS)
@pytest.mark.parametrize("window", GRADCHECK_WINDOWS, ids=_ids)
def test_im2col_col2im_gradcheck(window, device):
    n, c, h, w, kernel, dilation, padding, stride = window
    # Under the emulator the Jacobian is checked along random directions instead (gradcheck's
    # fast mode), which keeps even the 28x28 window to a second.
    fast = emulating()
    x = torch.randn(n, c, h, w, dtype=torch.float64, device=device, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda t: im2col(t, kernel, dilation, padding, stride), (x,), fast_mode=fast
    )
    columns = im2col(x.detach(), kernel, dilation, padding, stride).requires_grad_()
    assert torch.autograd.gradcheck(
        lambda t: col2im(t, (h, w), kernel, dilation, padding, stride), (columns,), fast_mode=fast
    )


@pytest.mark.parametrize("device", DEVICE_PARAMS)
def test_opcheck_im2col_col2im(device):
    x = torch.randn(2, 3, 7, 6, device=device, requires_grad=True)
    torch.library.opcheck(torch.ops.convkit.im2col.default, (x, [3, 2], [1, 2], [1, 0], [2, 1]))
    columns = im2col(x.detach(), (3, 2), (1, 2), (1, 0), (2, 1)).requires_grad_()
    torch.library.opcheck(
        torch.ops.convkit.col2im.default, (columns, [7, 6], [3, 2], [1, 2], [1, 0], [2, 1])
    )


def test_im2col_errors():
    with pytest.raises(RuntimeError, match=r"im2col: expected a 4-D input \[N, C, H, W\], but got a 3-D"):
        im2col(torch.randn(3, 5, 5), 3)
    with pytest.raises(RuntimeError, match=r"expected a positive kernel size, but got \(0, 3\)"):
        im2col(torch.randn(1, 3, 5, 5), (0, 3))
    with pytest.raises(RuntimeError, match=r"kernel size \(7 x 7\) is larger than the padded input size \(5 x 5\)"):
        im2col(torch.randn(1, 3, 5, 5), 7)


def test_col2im_errors():
    with pytest.raises(RuntimeError, match=r"expected columns.size\(2\) to be 9 \(3 x 3 windows for output_size \[5, 5\]\), but got 10"):
        col2im(torch.randn(1, 9, 10), (5, 5), 3)
    with pytest.raises(RuntimeError, match=r"expected columns.size\(1\) \(10\) to be divisible by the kernel area 3 x 3"):
        col2im(torch.randn(1, 10, 9), (5, 5), 3)
    with pytest.raises(RuntimeError, match=r"col2im: expected 3-D columns"):
        col2im(torch.randn(9, 9), (5, 5), 3)
