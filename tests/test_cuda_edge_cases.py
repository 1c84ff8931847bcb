"""Edge cases a GPU would expose, on the CUDA code path ("cuda" on a GPU, "cuda-emu" under the
CPU emulator on every machine): misaligned data, sizes that are no multiple of the vector
width, grid-stride loops that run several rounds, a batch-norm count above 2^24, 65535 and
65536 channels, and several column-buffer chunks with groups in half precision."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import convkit
from conftest import CUDA_TARGETS, CudaTarget, assert_close_to_reference

THREADS = 256  # threads per block of the grid-stride kernels (csrc/cuda/common.cuh)
GPU_BLOCK_CAP = 2**20  # their grid's bound on a GPU
EMULATED_BLOCK_CAP = 2  # the bound these tests set under the emulator


def _bn_step(fn, x, weight, bias, stats, training, dy, relu, context):
    xs = x.detach().clone().requires_grad_()
    w = weight.detach().clone().requires_grad_()
    b = bias.detach().clone().requires_grad_()
    with context:
        out = fn(xs, stats[0], stats[1], w, b, training=training)
        if relu and fn is F.batch_norm:
            out = F.relu(out)
        out.backward(dy)
    return [out.detach(), xs.grad, w.grad, b.grad, stats[0], stats[1]]


def _compare_batch_norm(x, target: CudaTarget, training: bool, relu: bool, factor: float = 2.0):
    """convkit's fused batch norm on the target against torch's, both judged against float64."""
    channels = x.shape[1]
    device = x.device
    weight = torch.randn(channels, device=device)
    bias = torch.randn(channels, device=device)
    stats = [torch.randn(channels, device=device), torch.rand(channels, device=device) + 0.5]
    dy = torch.randn_like(x)
    ours_fn = convkit.batch_norm_relu if relu else convkit.batch_norm
    ours = _bn_step(ours_fn, x, weight, bias, [s.clone() for s in stats], training, dy, relu,
                    target.active())
    theirs = _bn_step(F.batch_norm, x, weight, bias, [s.clone() for s in stats], training, dy, relu,
                      torch.enable_grad())
    ref = _bn_step(F.batch_norm, x.double(), weight.double(), bias.double(),
                   [s.double() for s in stats], training, dy.double(), relu, torch.enable_grad())
    names = ("output", "grad_input", "grad_weight", "grad_bias", "running_mean", "running_var")
    for name, o, t, r in zip(names, ours, theirs, ref):
        assert_close_to_reference(o, t, r, factor=factor, name=name)


@pytest.mark.parametrize("target", CUDA_TARGETS)
@pytest.mark.parametrize("relu", [True, False])
@pytest.mark.parametrize("training", [True, False])
def test_batch_norm_storage_offset_breaks_alignment(training, relu, target):
    """x starts 4 bytes into its storage: the vectorised pass (16-byte loads) must not be used
    (the emulator checks every vector access's alignment)."""
    cuda = CudaTarget(target)
    storage = torch.randn(4 * 3 * 8 * 8 + 1, device=cuda.device) * 2 + 1
    x = storage[1:].view(4, 3, 8, 8)
    assert x.storage_offset() == 1 and x.is_contiguous()
    _compare_batch_norm(x, cuda, training, relu)


@pytest.mark.parametrize("target", CUDA_TARGETS)
def test_conv2d_storage_offset_breaks_alignment(target):
    cuda = CudaTarget(target)
    storage = torch.randn(2 * 3 * 9 * 9 + 3, dtype=torch.float64, device=cuda.device)
    x = storage[3:].view(2, 3, 9, 9).requires_grad_()
    w = torch.randn(4, 3, 3, 3, dtype=torch.float64, device=cuda.device, requires_grad=True)
    with cuda.active():
        out = convkit.conv2d(x, w, padding=1)
        grads = torch.autograd.grad(out.square().sum(), (x, w))
    expected = F.conv2d(x, w, padding=1)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    for ours, theirs in zip(grads, torch.autograd.grad(expected.square().sum(), (x, w))):
        torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("target", CUDA_TARGETS)
@pytest.mark.parametrize("shape", [(4, 3, 5, 7), (2, 5, 3), (3, 2, 1, 1), (5, 4, 6, 4)])
@pytest.mark.parametrize("training", [True, False])
def test_batch_norm_spatial_size_not_a_multiple_of_the_vector(shape, training, target):
    """S = 35, 3, 1 take the scalar pass; S = 24 the vectorised one."""
    cuda = CudaTarget(target)
    x = torch.randn(shape, device=cuda.device) * 3 - 1
    _compare_batch_norm(x, cuda, training, relu=True)


def _grid_cap(cuda: CudaTarget) -> int:
    return EMULATED_BLOCK_CAP if cuda.emulated else GPU_BLOCK_CAP


@pytest.mark.parametrize("target", CUDA_TARGETS)
@pytest.mark.parametrize("vectorised", [True, False])
def test_batch_norm_grid_stride_loops(vectorised, target):
    """More elements than the grid's blocks cover in one round: every element pass (the
    normalisation, vectorised by 4 or not, and the input gradient) loops over the rest. On a
    GPU that is more than 2^20 blocks' worth (over 2^30 values for the vectorised pass); under
    the emulator the tests lower the bound to 2 blocks."""
    cuda = CudaTarget(target, max_grid_stride_blocks=EMULATED_BLOCK_CAP)
    elements = _grid_cap(cuda) * THREADS * (4 if vectorised else 1) + 5
    size = elements + (-elements) % 4 if vectorised else elements
    x = torch.randn(1, 1, size, device=cuda.device)
    _compare_batch_norm(x, cuda, training=True, relu=True)


@pytest.mark.parametrize("target", CUDA_TARGETS)
def test_im2col_col2im_grid_stride_loops(target):
    cuda = CudaTarget(target, max_grid_stride_blocks=EMULATED_BLOCK_CAP)
    side = 2 + int((_grid_cap(cuda) * THREADS / 9) ** 0.5) + 1  # > cap * 256 column entries
    x = torch.randn(1, 1, side, side, device=cuda.device)
    with cuda.active():
        columns = convkit.functional.im2col(x, 3, 1, 1, 1)
    assert columns.numel() > _grid_cap(cuda) * THREADS
    assert torch.equal(columns, F.unfold(x, 3, 1, 1, 1))
    big = torch.randn(1, 1, _grid_cap(cuda) * THREADS + 7, device=cuda.device)
    with cuda.active():
        folded = convkit.functional.col2im(big, (1, big.shape[2]), 1, 1, 0, 1)
    assert torch.equal(folded, F.fold(big, (1, big.shape[2]), 1, 1, 0, 1))


@pytest.mark.parametrize("target", CUDA_TARGETS)
def test_conv2d_grid_stride_loops(target):
    """im2col, the output scatter and the gradient gather each cover more entries than one
    round of the grid."""
    cuda = CudaTarget(target, max_grid_stride_blocks=EMULATED_BLOCK_CAP)
    side = int((_grid_cap(cuda) * THREADS / 9) ** 0.5) + 2
    x = torch.randn(1, 1, side, side, dtype=torch.float64, device=cuda.device, requires_grad=True)
    w = torch.randn(9, 1, 3, 3, dtype=torch.float64, device=cuda.device, requires_grad=True)
    with cuda.active():
        out = convkit.conv2d(x, w, padding=1)
        grads = torch.autograd.grad(out, (x, w), torch.ones_like(out))
    assert out.numel() > _grid_cap(cuda) * THREADS
    expected = F.conv2d(x, w, padding=1)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    for ours, theirs in zip(grads, torch.autograd.grad(expected, (x, w), torch.ones_like(expected))):
        torch.testing.assert_close(ours, theirs, rtol=1e-9, atol=1e-9)


@pytest.mark.slow
@pytest.mark.parametrize("target", CUDA_TARGETS)
def test_batch_norm_count_above_2_24(target):
    """2^24 + 10 values per channel, around 100 (a float32 sum of them would lose the
    variance): statistics, output, gradients and running statistics as accurate as torch's."""
    cuda = CudaTarget(target, max_grid_stride_blocks=64)
    x = torch.randn(2, 1, 2**23 + 5, device=cuda.device) * 3 + 100
    _compare_batch_norm(x, cuda, training=True, relu=False)


@pytest.mark.parametrize("target", CUDA_TARGETS)
@pytest.mark.parametrize("channels", [65535, 65536])
@pytest.mark.parametrize("training", [True, False])
def test_batch_norm_many_channels(channels, training, target):
    """Channels are on gridDim.x (gridDim.y allows at most 65535)."""
    cuda = CudaTarget(target)
    x = torch.randn(3, channels, 2, device=cuda.device) * 2 + 1
    _compare_batch_norm(x, cuda, training, relu=True)


@pytest.mark.parametrize("target", CUDA_TARGETS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_conv2d_several_chunks_with_groups_in_half(dtype, target, monkeypatch):
    """A column budget of one image's columns: five chunks of one image, two groups, in
    float16/bfloat16 (float accumulation)."""
    cuda = CudaTarget(target)
    n, c, h, w, o, groups = 5, 6, 9, 9, 8, 2
    one_image_mib = c * 9 * h * w * torch.finfo(dtype).bits / 8 / 2**20
    monkeypatch.setenv("CONVKIT_COLUMN_BUDGET_MB", repr(one_image_mib * 1.5))
    x = torch.randn(n, c, h, w, device=cuda.device)
    weight = torch.randn(o, c // groups, 3, 3, device=cuda.device) / (c // groups * 9) ** 0.5
    bias = torch.randn(o, device=cuda.device)
    dy = torch.randn(n, o, h, w, device=cuda.device)

    def step(fn, compute_dtype, context):
        """fn's output and gradients from the dtype-rounded inputs, computed in compute_dtype."""
        leaves = [t.to(dtype).to(compute_dtype).requires_grad_() for t in (x, weight, bias)]
        with context:
            out = fn(*leaves, padding=1, groups=groups)
            out.backward(dy.to(dtype).to(compute_dtype))
        return [out.detach()] + [t.grad for t in leaves]

    torch.ops.convkit.column_buffer_peak_bytes(True)
    ours = step(convkit.conv2d, dtype, cuda.active())
    peak = torch.ops.convkit.column_buffer_peak_bytes(False)
    assert 0 < peak <= one_image_mib * 2**20 * 1.5, peak
    theirs = step(F.conv2d, dtype, torch.enable_grad())
    ref = step(F.conv2d, torch.float64, torch.enable_grad())
    for name, o_value, t_value, r_value in zip(("output", "input", "weight", "bias"), ours, theirs, ref):
        assert o_value.dtype == dtype
        assert_close_to_reference(o_value, t_value, r_value, factor=4.0, name=name)
