"""The CPU conv kernel's code paths, each forced and checked against F.conv2d.

csrc/cpu/conv2d/path.h picks the path of each pass (forward, input gradient, weight
gradient) from the layer's shape, dtype, thread count and the column budget: window, rows,
implicit GEMM (and its transposed input gradient), images, shared tiles and bands. PATHS
names a shape for each, and test_plan_of_each_named_shape asserts, through the debug op
conv2d_cpu_plan, that the shape still takes the path its name says, so that a moved threshold
fails here instead of silently testing another kernel. The other tests run every shape (with
CONVKIT_COLUMN_BUDGET_MB where the name needs it) in float64 (against F.conv2d to 1e-10),
float32 and bfloat16 (against a float64 reference, within twice PyTorch's own error), with
and without the input gradient.
"""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

import convkit
from conftest import assert_close_to_reference

# name -> (batch, in_channels, H, W, out_channels, kernel, stride, padding, dilation, groups,
#          column budget in MiB or None for the default)
PATHS = {
    "rows_first_layer": (5, 1, 28, 28, 8, 5, 2, 2, 1, 1, None),
    "rows_two_channels_o12": (3, 2, 19, 23, 12, 3, 1, 1, 1, 1, None),
    "rows_dilated_stride3": (2, 3, 30, 29, 6, 3, 3, 2, 2, 1, None),
    "implicit_gemm_o8": (4, 8, 9, 9, 8, 3, 1, 1, 1, 1, None),
    "implicit_gemm_o32": (6, 16, 7, 7, 32, 3, 2, 1, 1, 1, None),
    "implicit_gemm_o20_dilated": (3, 5, 13, 11, 20, 3, 1, 2, 2, 1, None),
    # 33-64 output channels on narrow outputs: blocks of 64 channels, 4 positions a step.
    "implicit_gemm_o40_narrow": (7, 12, 6, 6, 40, 3, 2, 1, 1, 1, None),
    "implicit_gemm_o64_2x2": (6, 32, 4, 4, 64, 3, 2, 1, 1, 1, None),
    # A 1x1 projection (MobileNetV2's 96 -> 24): over 32 input channels, the images path's
    # input gradient, here by the planes-side-by-side GEMM.
    "implicit_gemm_1x1_o24": (5, 40, 4, 4, 24, 1, 1, 0, 1, 1, None),
    # The implicit GEMM's input gradient for 9-32 input channels is the transposed one: by
    # phases of the stride (above: 16, 12 and 32 channels, stride 2), here with a dilated
    # stride-1 kernel over 20 channels (a full and a partial block of 16 lanes), a stride 3
    # over a 2x2 kernel (one phase per axis that no tap reaches: its gradient is 0), and 11
    # images (chunks of 8 and 3).
    "transposed_input_grad_c20_dilated": (3, 20, 9, 8, 24, 3, 1, 2, 2, 1, None),
    "transposed_input_grad_stride3_gaps": (4, 10, 17, 17, 16, 2, 3, 0, 1, 1, None),
    "transposed_input_grad_11_images": (11, 16, 7, 7, 32, 3, 2, 1, 1, 1, None),
    "image_path_gemm_o70": (7, 12, 6, 6, 70, 3, 2, 1, 1, 1, None),
    # One output position, from an image larger than the kernel (the column is the smaller
    # matrix): still the image path.
    "image_path_one_position": (9, 24, 4, 4, 10, 3, 2, 0, 1, 1, None),
    "image_path_grouped": (4, 12, 5, 5, 12, 3, 1, 1, 1, 3, None),
    # 1x1 stride 1: the images' planes side by side are the columns (no gather); grouped, and
    # one image (read in place).
    "image_path_1x1": (5, 24, 4, 4, 70, 1, 1, 0, 1, 1, None),
    "image_path_1x1_grouped": (4, 12, 3, 3, 24, 1, 1, 0, 1, 3, None),
    "image_path_1x1_one_image": (1, 24, 2, 2, 70, 1, 1, 0, 1, 1, None),
    # ... its backward: the GEMMs on those columns, the input gradient copied out of the
    # column gradient plane by plane; 11 images in tiles of a few (a short last one).
    "image_path_1x1_tiles": (11, 24, 4, 4, 70, 1, 1, 0, 1, 1, "0.01"),
    # A weight matrix of >= 2 MiB: the image path's shared tiles (all threads on one tile),
    # in one tile and, under a small budget, in tiles of 2 + 1 images (unpadded: padded, the
    # forward is the tap classes').
    "image_path_shared_tiles": (3, 256, 6, 6, 256, 3, 1, 0, 1, 1, None),
    "image_path_shared_tiles_budget": (3, 256, 6, 6, 256, 3, 1, 0, 1, 1, "0.35"),
    # Stride-1 convs on narrow maps whose products multiply padding for >= 10%: the forward by
    # tap classes (float on AVX-512 with our GEMM; the image family's paths elsewhere), with
    # enough images that the classes' GEMMs fill their vectors. A 3x3 pad 1 (9 classes), in
    # tiles of 7-8 images (23 images); a depth of 100 channels (segments deeper
    # than the GEMM's 256-deep blocks); a 5x5 pad 2 on a 3x6 map; a pad of 3 around a 2x2 map,
    # whose border outputs read no input (bias only); a 2x2 kernel (classes of one side).
    "tap_classes_3x3": (8, 20, 4, 4, 70, 3, 1, 1, 1, 1, None),
    "tap_classes_3x3_tiles": (23, 20, 4, 4, 70, 3, 1, 1, 1, 1, "0.1"),
    "tap_classes_deep": (16, 100, 2, 3, 70, 3, 1, 1, 1, 1, None),
    "tap_classes_5x5_rect": (8, 12, 3, 6, 70, 5, 1, 2, 1, 1, None),
    "tap_classes_no_taps": (2, 9, 2, 2, 70, 3, 1, 3, 1, 1, None),
    "tap_classes_2x2_kernel": (8, 10, 3, 3, 70, 2, 1, 1, 1, 1, None),
    # One output position from an image no larger than the kernel: the window path (images
    # read in place against a re-laid weight). The chapter's last layer (2x2 -> 1x1, 5 of 9
    # taps on padding), a grouped one, a dilated one whose window skips input rows and
    # columns (their gradient is 0), and a 1x1 kernel on a 1x1 image.
    "window_path_last_layer": (9, 24, 2, 2, 10, 3, 2, 1, 1, 1, None),
    "window_path_grouped": (5, 12, 3, 3, 21, 3, 1, 0, 1, 3, None),
    "window_path_dilated_skips": (4, 6, 3, 3, 7, 3, 1, 1, 2, 1, None),
    "window_path_1x1": (6, 40, 1, 1, 33, 1, 1, 0, 1, 1, None),
    "band_path_rows": (3, 6, 12, 14, 40, 3, 1, 1, 1, 1, "0.02"),
    "band_path_strided_grouped": (2, 8, 15, 13, 44, 3, 2, 1, 1, 2, "0.01"),
    "band_path_1x1": (3, 16, 10, 9, 36, 1, 1, 0, 1, 1, "0.01"),
    # "Same" convs of unit stride build their columns as shifted planes (band_columns.h): a
    # 5x5 on rows narrower than the kernel (taps whose every entry is an edge zero) and a 3x3
    # on one column, both in bands of a few rows (first, middle and last bands of an image).
    "band_path_same_5x5_narrow": (2, 12, 9, 3, 40, 5, 1, 2, 1, 1, "0.01"),
    "band_path_same_3x3_one_column": (3, 12, 11, 1, 40, 3, 1, 1, 1, 1, "0.002"),
    "band_path_1x1_grouped": (2, 16, 9, 9, 48, 1, 1, 0, 1, 4, "0.005"),
    # Tiles of whole images on the band path, whose forward im2col writes the GEMM's 32-column
    # panels (float on AVX-512) in blocks of 28 channels: 3 images of 72 columns per tile
    # (images start inside a panel, a last panel of 24 columns), 40 channels (a block of 28
    # and one of 12); and a dilated "same" conv (not a shifted plane) in tiles of 2 images.
    "band_path_images_per_tile": (6, 40, 8, 9, 70, 3, 1, 1, 1, 1, None),
    "band_path_images_per_tile_dilated": (4, 40, 10, 12, 70, 3, 1, 2, 2, 1, None),
    # groups == in_channels == out_channels: the depthwise path. On maps of <= 1024 values 16
    # channels in the lanes (here a partial block of 8 and one and a half of 24), MobileNet's
    # 3x3 at stride 1 and 2 on odd sizes, a dilated 5x5 at stride 3 (input columns beyond
    # every window: their gradient is 0), 2x2 maps; on larger ones the forward by phase
    # planes, and above 56x56 the backward too (a dilated 5x5 at stride 3; a 2x2 kernel at
    # stride 3, whose third phase of each axis no tap reaches: its gradient is 0).
    "depthwise_3x3": (4, 16, 13, 11, 16, 3, 1, 1, 1, 16, None),
    "depthwise_3x3_stride2": (3, 24, 15, 16, 24, 3, 2, 1, 1, 24, None),
    "depthwise_5x5_dilated_stride3": (2, 8, 18, 20, 8, 5, 3, 1, 2, 8, None),
    "depthwise_2x2_maps": (5, 12, 2, 2, 12, 3, 1, 1, 1, 12, None),
    "depthwise_planes_forward_35x31": (2, 20, 35, 31, 20, 3, 2, 1, 1, 20, None),
    "depthwise_planes_63x57_dilated_stride3": (1, 3, 63, 57, 3, 5, 3, 1, 2, 3, None),
    "depthwise_planes_2x2_stride3_gaps": (2, 4, 61, 59, 4, 2, 3, 0, 1, 4, None),
}


# The paths each PATHS shape takes in float32 (forward, input gradient, weight gradient when
# both gradients are wanted, weight gradient alone). A rows layer's backward with an input
# gradient is that of the implicit GEMM family; <= 8 input channels keep the images path's
# input gradient.
IMPLICIT = ("implicit_gemm", "transposed_implicit_gemm", "implicit_gemm", "implicit_gemm")
IMPLICIT_FEW_INPUTS = ("implicit_gemm", "images", "implicit_gemm", "implicit_gemm")
ROWS = ("rows", "images", "implicit_gemm", "rows")
EXPECTED_PLANS = {
    "rows_first_layer": ROWS,
    "rows_two_channels_o12": ROWS,
    "rows_dilated_stride3": ROWS,
    "implicit_gemm_o8": IMPLICIT_FEW_INPUTS,
    "implicit_gemm_o32": IMPLICIT,
    "implicit_gemm_o20_dilated": IMPLICIT_FEW_INPUTS,
    "implicit_gemm_o40_narrow": IMPLICIT,
    "implicit_gemm_o64_2x2": IMPLICIT,
    "implicit_gemm_1x1_o24": IMPLICIT_FEW_INPUTS,
    "transposed_input_grad_c20_dilated": IMPLICIT,
    "transposed_input_grad_stride3_gaps": IMPLICIT,
    "transposed_input_grad_11_images": IMPLICIT,
}
for _name in PATHS:
    for _prefix, _path in (("image_path", "images"), ("window_path", "window"),
                           ("band_path", "bands"), ("depthwise", "depthwise")):
        if _name.startswith(_prefix):
            EXPECTED_PLANS[_name] = (_path,) * 4
EXPECTED_PLANS["image_path_shared_tiles"] = ("shared_tiles",) * 4
EXPECTED_PLANS["image_path_shared_tiles_budget"] = ("shared_tiles",) * 4


def _tap_classes_forward():
    """Whether float32 forwards can take the tap classes: our packed GEMM (AVX-512 kernels,
    CONVKIT_CPU_GEMM not "blas")."""
    return (convkit.cpu_capability() == "avx512"
            and os.environ.get("CONVKIT_CPU_GEMM", "own") != "blas")


for _name in PATHS:
    if _name.startswith("tap_classes"):
        EXPECTED_PLANS[_name] = ("images",) * 4
# ... and where they can: the forward, and the input gradient when it too (a stride-1 conv of
# dY, padding k - 1 - pad) skips enough padding products (not with a pad of 3 around a 3x3,
# nor a 2x2 kernel's unpadded gradient conv, nor tiles cut small by the budget).
TAP_CLASS_PLANS = {
    "tap_classes_3x3": ("tap_classes", "tap_classes", "images", "images"),
    "tap_classes_3x3_tiles": ("tap_classes", "images", "images", "images"),
    "tap_classes_deep": ("tap_classes", "tap_classes", "images", "images"),
    "tap_classes_5x5_rect": ("tap_classes", "tap_classes", "images", "images"),
    "tap_classes_no_taps": ("tap_classes", "images", "images", "images"),
    "tap_classes_2x2_kernel": ("tap_classes", "images", "images", "images"),
}

# Shapes for the CPU GEMM's edges: rows not a multiple of its 12-row panels, columns not a
# multiple of its 32-column panels, a depth over its 256-deep blocks (K = 40 * 9 = 360), and
# every operand transposed or not (forward, weight and input gradients of both GEMM paths).
GEMM_PATHS = {
    "image_path_gemm_o70": PATHS["image_path_gemm_o70"],
    "image_path_shared_tiles": PATHS["image_path_shared_tiles"],
    "band_path_rows": PATHS["band_path_rows"],
    "band_path_1x1_grouped": PATHS["band_path_1x1_grouped"],
    "band_path_images_per_tile": PATHS["band_path_images_per_tile"],
    "band_path_deep_o30": (2, 40, 9, 11, 30, 3, 1, 1, 1, 1, "0.05"),
    # The bands' weight packed once per call (tile_gemms.h): its column-gradient panels hold
    # K = 48 * 9 = 432 rows (over the GEMM's 384-row blocks) and 13 output channels deep; one
    # image in one band is a single GEMM over both threads (not the packed weight).
    "band_path_packed_weight_432_rows": (3, 48, 10, 9, 13, 3, 1, 1, 1, 1, "0.05"),
    "band_path_one_band": (1, 48, 10, 9, 13, 3, 1, 1, 1, 1, None),
    "image_path_deep_o13": (5, 40, 5, 5, 13, 3, 2, 1, 1, 1, None),
    # 300 images: two forward GEMMs of up to 256 images; 40 channels of 3x3: 360 columns.
    "window_path_batch_300": (300, 40, 3, 3, 13, 3, 1, 0, 1, 1, None),
    "window_path_grouped": PATHS["window_path_grouped"],
    "tap_classes_3x3": PATHS["tap_classes_3x3"],
    "tap_classes_deep": PATHS["tap_classes_deep"],
}


def _tensors(spec, dtype, input_grad):
    n, c, h, w, o, k, stride, padding, dilation, groups, _ = spec
    x = torch.randn(n, c, h, w, dtype=dtype).requires_grad_(input_grad)
    weight = torch.randn(o, c // groups, k, k, dtype=dtype).requires_grad_()
    bias = torch.randn(o, dtype=dtype).requires_grad_()
    kwargs = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
    return x, weight, bias, kwargs


def _run(conv, x, weight, bias, kwargs, dy):
    leaves = [t.detach().clone().requires_grad_(t.requires_grad) for t in (x, weight, bias)]
    out = conv(leaves[0], leaves[1], leaves[2], **kwargs)
    wanted = [t for t in leaves if t.requires_grad]
    grads = torch.autograd.grad(out, wanted, dy)
    return [out.detach()] + list(grads)


@pytest.mark.parametrize("input_grad", [True, False], ids=["dx", "no_dx"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("path", list(PATHS))
def test_conv2d_path_matches_torch(path, dtype, input_grad, monkeypatch):
    check_path_in_its_setting(path, PATHS[path], dtype, input_grad, monkeypatch)


@pytest.mark.parametrize("gemm", ["own", "blas"])
@pytest.mark.parametrize("path", list(GEMM_PATHS))
def test_conv2d_cpu_gemm_choice_matches_torch(path, gemm, monkeypatch):
    """CONVKIT_CPU_GEMM=own (our packed GEMM where the build has AVX-512) and =blas both
    give float32 results within twice PyTorch's error of a float64 reference."""
    monkeypatch.setenv("CONVKIT_CPU_GEMM", gemm)
    check_path_in_its_setting(path, GEMM_PATHS[path], torch.float32, True, monkeypatch)


def test_conv2d_cpu_gemm_choice_rejects_unknown(monkeypatch):
    monkeypatch.setenv("CONVKIT_CPU_GEMM", "mkl")
    x = torch.randn(2, 40, 5, 5)
    weight = torch.randn(13, 40, 3, 3)
    with pytest.raises(RuntimeError, match='CONVKIT_CPU_GEMM must be "own" or "blas", got "mkl"'):
        convkit.conv2d(x, weight, stride=2, padding=1)  # the image path: a GEMM


def check_path_in_its_setting(path, spec, dtype, input_grad, monkeypatch):
    """_check_path under the shape's column budget (spec[-1]) and, for the shared tiles,
    with at least two threads (they are for several)."""
    if spec[-1] is not None:
        monkeypatch.setenv("CONVKIT_COLUMN_BUDGET_MB", spec[-1])
    threads = torch.get_num_threads()
    if "shared_tiles" in path:
        torch.set_num_threads(max(threads, 2))
    try:
        _check_path(path, spec, dtype, input_grad)
    finally:
        torch.set_num_threads(threads)


def _check_path(path, spec, dtype, input_grad):
    x, weight, bias, kwargs = _tensors(spec, dtype, input_grad)
    dy = torch.randn_like(F.conv2d(x.detach(), weight.detach(), bias.detach(), **kwargs))
    ours = _run(convkit.conv2d, x, weight, bias, kwargs, dy)
    names = ["output"] + (["grad_input"] if input_grad else []) + ["grad_weight", "grad_bias"]
    if dtype == torch.float64:
        theirs = _run(F.conv2d, x, weight, bias, kwargs, dy)
        for name, a, b in zip(names, ours, theirs):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=name)
        return
    theirs = _run(F.conv2d, x, weight, bias, kwargs, dy)
    reference = _run(F.conv2d, *(t.double().requires_grad_(t.requires_grad)
                                 for t in (x, weight, bias)), kwargs, dy.double())
    for name, a, b, r in zip(names, ours, theirs, reference):
        assert_close_to_reference(a, b, r, name=f"{path} {name}")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_rows_path_weight_gradient_alone(dtype):
    """The row path's backward when only the weight gradient is wanted (bias and input
    gradients masked off: the bias gradient is otherwise summed in the same pass), through
    the backward op directly."""
    x = torch.randn(6, 1, 28, 28, dtype=dtype)
    weight = torch.randn(8, 1, 5, 5, dtype=dtype)
    dy = torch.randn(6, 8, 14, 14, dtype=dtype)
    args = ([2, 2], [2, 2], [1, 1], 1)
    grads = torch.ops.convkit.conv2d_backward(dy, x, weight, *args, [False, True, False])
    assert grads[0].numel() == 0 and grads[2].numel() == 0
    expected = torch.nn.grad.conv2d_weight(x.double(), weight.shape, dy.double(), 2, 2)
    tolerance = 1e-10 if dtype == torch.float64 else 1e-3
    torch.testing.assert_close(grads[1].double(), expected, rtol=tolerance, atol=tolerance)
    both = torch.ops.convkit.conv2d_backward(dy, x, weight, *args, [False, True, True])
    torch.testing.assert_close(both[1], grads[1], rtol=0, atol=0)
    torch.testing.assert_close(both[2].double(), dy.double().sum(dim=(0, 2, 3)), rtol=tolerance,
                               atol=tolerance)


@pytest.mark.parametrize("mask", [[True, True, True], [False, True, True], [True, False, True]],
                         ids=["all", "weight_bias", "input_bias"])
@pytest.mark.parametrize("path", ["implicit_gemm_o20_dilated", "implicit_gemm_o40_narrow"])
def test_implicit_gemm_bias_gradient(path, mask):
    """The implicit GEMM sums the bias gradient while it transposes dY for the weight gradient
    (without a weight gradient it is a separate reduction): right under every mask, and the
    same bits on 1 and 2 threads."""
    n, c, h, w, o, k, stride, padding, dilation, groups, _ = PATHS[path]
    x = torch.randn(n, c, h, w)
    weight = torch.randn(o, c, k, k)
    out = F.conv2d(x, weight, None, stride, padding, dilation)
    dy = torch.randn_like(out)
    args = ([stride] * 2, [padding] * 2, [dilation] * 2, groups)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = torch.ops.convkit.conv2d_backward(dy, x, weight, *args, mask)
        torch.set_num_threads(2)
        two = torch.ops.convkit.conv2d_backward(dy, x, weight, *args, mask)
    finally:
        torch.set_num_threads(threads)
    torch.testing.assert_close(one[2], two[2], rtol=0, atol=0)
    torch.testing.assert_close(two[2].double(), dy.double().sum(dim=(0, 2, 3)), rtol=1e-5, atol=1e-5)
    if mask[1]:
        expected = torch.nn.grad.conv2d_weight(x.double(), weight.shape, dy.double(), stride,
                                               padding, dilation)
        torch.testing.assert_close(two[1].double(), expected, rtol=1e-4, atol=1e-4)
    if mask[0]:
        expected = torch.nn.grad.conv2d_input(x.shape, weight.double(), dy.double(), stride,
                                              padding, dilation)
        torch.testing.assert_close(two[0].double(), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("threads", [2, 3])
@pytest.mark.parametrize("spec", [
    # ResNet-18's 128-channel 8x8 layer at N=32: tiles of 6 images had left one thread 18 of
    # them and the other 14 (6 + 6 + 2).
    (32, 128, 8, 8, 128, 3, 1, 1, 1, 1, None),
    (9, 24, 4, 4, 70, 3, 2, 1, 1, 1, None),
    (11, 24, 4, 4, 70, 1, 1, 0, 1, 1, "0.01"),
    (7, 40, 6, 6, 70, 3, 2, 1, 1, 1, None),
    (32, 64, 16, 16, 64, 3, 1, 1, 1, 1, "0.3"),
], ids=["resnet_8x8_n32", "images_9", "images_1x1_budget_11", "images_7", "bands_budget_32"])
def test_tiles_share_the_images_evenly_over_threads(spec, threads, monkeypatch):
    """The images and bands paths' threads hold the same number of images, to within one."""
    n, c, h, w, o, k, stride, padding, dilation, groups, budget = spec
    if budget is not None:
        monkeypatch.setenv("CONVKIT_COLUMN_BUDGET_MB", budget)
    x = torch.empty(n, c, h, w)
    weight = torch.empty(o, c // groups, k, k)
    saved = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        images = torch.ops.convkit.conv2d_cpu_thread_images(
            x, weight, [stride] * 2, [padding] * 2, [dilation] * 2, groups)
    finally:
        torch.set_num_threads(saved)
    assert len(images) == min(threads, n)
    assert sum(images) == n
    assert max(images) - min(images) <= 1, images


def test_column_buffer_peak_respects_budget(monkeypatch):
    """The reported column-buffer peak of a call stays within CONVKIT_COLUMN_BUDGET_MB
    (whenever one output row of one image fits it)."""
    monkeypatch.setenv("CONVKIT_COLUMN_BUDGET_MB", "0.25")
    x = torch.randn(4, 32, 30, 30, requires_grad=True)
    weight = torch.randn(48, 32, 3, 3, requires_grad=True)
    torch.ops.convkit.column_buffer_peak_bytes(True)
    convkit.conv2d(x, weight, None, 1, 1).sum().backward()
    peak = torch.ops.convkit.column_buffer_peak_bytes(False)
    assert 0 < peak <= 0.25 * 2**20
    # reset=True returns the peak and starts over
    assert torch.ops.convkit.column_buffer_peak_bytes(True) == peak
    assert torch.ops.convkit.column_buffer_peak_bytes(False) == 0


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_band_path_1x1_reads_small_images_in_place(dtype):
    """A 1x1 stride-1 conv of many small images (MobileNetV2's 24 -> 144 expansion, smaller)
    runs one image per tile, reading the input and writing the output and the input gradient
    in place: no column buffer (tiles of several images copied the columns, and the output
    back plane by plane). It matches a float64 reference."""
    x = torch.randn(7, 12, 9, 10, dtype=dtype)
    weight = torch.randn(40, 12, 1, 1, dtype=dtype)
    bias = torch.randn(40, dtype=dtype)
    dy = torch.randn(7, 40, 9, 10, dtype=dtype)
    args = ([1, 1], [0, 0], [1, 1], 1)
    assert _plan((7, 12, 9, 10, 40, 1, 1, 0, 1, 1, None), dtype, [True, True]) == ("bands",) * 3
    torch.ops.convkit.column_buffer_peak_bytes(True)
    out = torch.ops.convkit.conv2d_forward(x, weight, bias, *args)
    grads = torch.ops.convkit.conv2d_backward(dy, x, weight, *args, [True, True, True])
    assert torch.ops.convkit.column_buffer_peak_bytes(False) == 0
    x64, w64, b64 = (t.double().requires_grad_() for t in (x, weight, bias))
    out64 = F.conv2d(x64, w64, b64)
    expected = (out64,) + torch.autograd.grad(out64, (x64, w64, b64), dy.double())
    tolerance = 1e-10 if dtype == torch.float64 else 1e-4
    names = ("output", "grad_input", "grad_weight", "grad_bias")
    for name, a, b in zip(names, (out,) + tuple(grads), expected):
        torch.testing.assert_close(a.double(), b.detach(), rtol=tolerance, atol=tolerance,
                                   msg=name)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_window_path_builds_no_columns(dtype):
    """The window path reads the images in place: no column buffer, unlike the image path
    that half precision takes on the same shape. On one thread and on several (the forward
    and input gradient split the images, the weight gradient its columns) it matches a
    float64 reference, and repeated calls give the same bits."""
    x = torch.randn(300, 40, 3, 3, dtype=dtype)
    weight = torch.randn(13, 40, 3, 3, dtype=dtype)
    bias = torch.randn(13, dtype=dtype)
    dy = torch.randn(300, 13, 1, 1, dtype=dtype)
    args = ([1, 1], [0, 0], [1, 1], 1)

    def run():
        torch.ops.convkit.column_buffer_peak_bytes(True)
        out = torch.ops.convkit.conv2d_forward(x, weight, bias, *args)
        grads = torch.ops.convkit.conv2d_backward(dy, x, weight, *args, [True, True, True])
        assert torch.ops.convkit.column_buffer_peak_bytes(False) == 0
        return (out,) + tuple(grads)

    x64, w64, b64 = (t.double().requires_grad_() for t in (x, weight, bias))
    out64 = F.conv2d(x64, w64, b64)
    expected = (out64,) + torch.autograd.grad(out64, (x64, w64, b64), dy.double())
    tolerance = 1e-10 if dtype == torch.float64 else 2e-4
    threads = torch.get_num_threads()
    try:
        for count in (1, max(threads, 2)):
            torch.set_num_threads(count)
            results = run()
            for a, b in zip(results, run()):
                torch.testing.assert_close(a, b, rtol=0, atol=0)
            for a, b in zip(results, expected):
                torch.testing.assert_close(a.double(), b.detach(), rtol=tolerance, atol=tolerance)
    finally:
        torch.set_num_threads(threads)
    torch.ops.convkit.column_buffer_peak_bytes(True)
    torch.ops.convkit.conv2d_forward(x.bfloat16(), weight.bfloat16(), bias.bfloat16(), *args)
    assert torch.ops.convkit.column_buffer_peak_bytes(False) > 0


def _plan(spec, dtype, gradient_mask):
    n, c, h, w, o, k, stride, padding, dilation, groups, _ = spec
    x = torch.empty(n, c, h, w, dtype=dtype)
    weight = torch.empty(o, c // groups, k, k, dtype=dtype)
    return torch.ops.convkit.conv2d_cpu_plan(x, weight, [stride] * 2, [padding] * 2,
                                             [dilation] * 2, groups, gradient_mask)


@pytest.mark.parametrize("path", list(PATHS))
def test_plan_of_each_named_shape(path, monkeypatch):
    """Each PATHS shape takes the path its name says (on two threads: shared tiles need
    several), and an unwanted gradient is "none"."""
    assert set(EXPECTED_PLANS) == set(PATHS)
    spec = PATHS[path]
    if spec[-1] is not None:
        monkeypatch.setenv("CONVKIT_COLUMN_BUDGET_MB", spec[-1])
    forward, input_grad, weight_grad, weight_grad_alone = EXPECTED_PLANS[path]
    if path.startswith("tap_classes") and _tap_classes_forward():
        forward, input_grad, weight_grad, weight_grad_alone = TAP_CLASS_PLANS[path]
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert _plan(spec, torch.float32, [True, True]) == (forward, input_grad, weight_grad)
        assert _plan(spec, torch.float32, [False, True]) == (forward, "none", weight_grad_alone)
        assert _plan(spec, torch.float32, [True, False])[:2] == (forward, input_grad)
        assert _plan(spec, torch.float32, [False, False]) == (forward, "none", "none")
        if forward == "shared_tiles":
            torch.set_num_threads(1)  # one thread: the images path
            assert _plan(spec, torch.float32, [True, True]) == ("images",) * 3
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_plan_half_types_leave_window_path(dtype):
    """The window path needs the input in its compute type: half types take the images
    path, which widens as it gathers."""
    spec = PATHS["window_path_last_layer"]
    assert _plan(spec, torch.float64, [True, True]) == ("window",) * 3
    assert _plan(spec, dtype, [True, True]) == ("images",) * 3


def test_plan_default_budget_moves_large_images_to_bands(monkeypatch):
    """A budget too small for one whole image per tile sends an image-path layer to bands."""
    spec = PATHS["image_path_gemm_o70"]
    assert _plan(spec, torch.float32, [True, True]) == ("images",) * 3
    monkeypatch.setenv("CONVKIT_COLUMN_BUDGET_MB", "0.001")
    assert _plan(spec, torch.float32, [True, True]) == ("bands",) * 3


def test_plan_checks_its_arguments():
    x = torch.empty(2, 6, 8, 8)
    with pytest.raises(RuntimeError, match="conv2d_cpu_plan"):
        torch.ops.convkit.conv2d_cpu_plan(x, torch.empty(4, 5, 3, 3), [1, 1], [1, 1], [1, 1], 1,
                                          [True, True])
    with pytest.raises(RuntimeError, match="conv2d_cpu_plan"):
        torch.ops.convkit.conv2d_cpu_plan(x, torch.empty(4, 6, 3, 3), [0, 1], [1, 1], [1, 1], 1,
                                          [True, True])
    with pytest.raises(RuntimeError, match="conv2d_cpu_plan: expected CPU tensors"):
        torch.ops.convkit.conv2d_cpu_plan(x.to("meta"), torch.empty(4, 6, 3, 3, device="meta"),
                                          [1, 1], [1, 1], [1, 1], 1, [True, True])


def test_thread_images_checks_its_arguments():
    x = torch.empty(2, 6, 8, 8)
    with pytest.raises(RuntimeError, match="conv2d_cpu_thread_images"):
        torch.ops.convkit.conv2d_cpu_thread_images(x, torch.empty(4, 5, 3, 3), [1, 1], [1, 1],
                                                   [1, 1], 1)
    with pytest.raises(RuntimeError, match="conv2d_cpu_thread_images"):
        torch.ops.convkit.conv2d_cpu_thread_images(x, torch.empty(4, 6, 3, 3), [1, 1], [-1, 1],
                                                   [1, 1], 1)
    with pytest.raises(RuntimeError, match="conv2d_cpu_thread_images: expected CPU tensors"):
        torch.ops.convkit.conv2d_cpu_thread_images(
            x.to("meta"), torch.empty(4, 6, 3, 3, device="meta"), [1, 1], [1, 1], [1, 1], 1)
    # A path that does not hand whole tiles to threads reports no shares.
    assert torch.ops.convkit.conv2d_cpu_thread_images(
        torch.empty(2, 6, 8, 8), torch.empty(6, 1, 3, 3), [1, 1], [1, 1], [1, 1], 6) == []


# ---- The depthwise path, beyond the PATHS shapes.


@pytest.mark.parametrize("size", [(11, 9), (63, 57)], ids=["blocks", "planes"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("kernel,stride,padding", [(3, 1, 1), (3, 2, 1), (3, 1, 0), (3, 2, 0),
                                                   (5, 1, 2), (5, 2, 1)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_depthwise_matches_torch(dtype, kernel, stride, padding, batch, bias, size):
    """Forward, input, weight and bias gradients of depthwise layers on odd sizes (small maps:
    channels in the lanes; large: plane by plane): float64 against F.conv2d to 1e-10, float32
    within twice PyTorch's error of a float64 reference."""
    spec = (batch, 6, *size, 6, kernel, stride, padding, 1, 6, None)
    assert _plan(spec, dtype, [True, True]) == ("depthwise",) * 3
    x, weight, b, kwargs = _tensors(spec, dtype, True)
    leaves = (x, weight, b) if bias else (x, weight)
    dy = torch.randn_like(F.conv2d(x.detach(), weight.detach(), None, **kwargs))

    def run(conv, tensors):
        tensors = [t.detach().clone().requires_grad_() for t in tensors]
        out = conv(tensors[0], tensors[1], tensors[2] if bias else None, **kwargs)
        return [out.detach()] + list(torch.autograd.grad(out, tensors, dy))

    ours = run(convkit.conv2d, leaves)
    theirs = run(F.conv2d, leaves)
    names = ["output", "grad_input", "grad_weight", "grad_bias"]
    if dtype == torch.float64:
        for name, a, c in zip(names, ours, theirs):
            torch.testing.assert_close(a, c, rtol=1e-10, atol=1e-10, msg=name)
        return
    reference = run(F.conv2d, [t.double() for t in leaves])
    for name, a, c, r in zip(names, ours, theirs, reference):
        assert_close_to_reference(a, c, r, name=name)


def test_depthwise_batch_zero_and_noncontiguous():
    """An empty batch gives empty results; a non-contiguous input the contiguous one's bits."""
    weight = torch.randn(8, 1, 3, 3)
    empty = torch.randn(0, 8, 7, 7, requires_grad=True)
    out = convkit.conv2d(empty, weight, None, 2, 1, groups=8)
    assert out.shape == (0, 8, 4, 4)
    assert torch.ops.convkit.conv2d_backward(
        torch.randn(0, 8, 4, 4), empty.detach(), weight, [2, 2], [1, 1], [1, 1], 8,
        [True, True, True])[1].abs().max() == 0
    x = torch.randn(3, 8, 10, 9)
    strided = x.transpose(-1, -2).contiguous().transpose(-1, -2)
    assert not strided.is_contiguous()
    dy = torch.randn(3, 8, 10, 9)
    args = ([1, 1], [1, 1], [1, 1], 8)
    for mask in ([True, True, False], [False, True, False], [True, False, False]):
        a = torch.ops.convkit.conv2d_backward(dy, x, weight, *args, mask)
        c = torch.ops.convkit.conv2d_backward(dy, strided, weight, *args, mask)
        for u, v in zip(a, c):
            torch.testing.assert_close(u, v, rtol=0, atol=0)
    torch.testing.assert_close(torch.ops.convkit.conv2d_forward(strided, weight, None, *args),
                               torch.ops.convkit.conv2d_forward(x, weight, None, *args),
                               rtol=0, atol=0)


def test_depthwise_gradcheck():
    x = torch.randn(2, 3, 6, 5, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(3, 1, 3, 3, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(3, dtype=torch.float64, requires_grad=True)
    for stride in (1, 2):
        assert torch.autograd.gradcheck(
            lambda x_, w_, b_: convkit.conv2d(x_, w_, b_, stride, 1, groups=3), (x, weight, bias))


@pytest.mark.parametrize("size", [16, 60], ids=["blocks", "planes"])
@pytest.mark.parametrize("stride", [1, 2])
def test_depthwise_same_bits_on_one_and_two_threads(stride, size):
    """Planes and channels are each computed by one thread in a fixed order."""
    x = torch.randn(5, 20, size, size)
    weight = torch.randn(20, 1, 3, 3)
    bias = torch.randn(20)
    args = ([stride] * 2, [1, 1], [1, 1], 20)
    dy = torch.randn_like(F.conv2d(x, weight, bias, stride, 1, groups=20))
    threads = torch.get_num_threads()
    results = []
    try:
        for count in (1, 2):
            torch.set_num_threads(count)
            results.append((torch.ops.convkit.conv2d_forward(x, weight, bias, *args),)
                           + torch.ops.convkit.conv2d_backward(dy, x, weight, *args,
                                                               [True, True, True]))
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_depthwise_multiplier_keeps_grouped_path():
    """A channel multiplier > 1 (out_channels = 2 * groups) is not depthwise here."""
    spec = (2, 8, 9, 9, 16, 3, 1, 1, 1, 8, None)
    assert "depthwise" not in _plan(spec, torch.float32, [True, True])


@pytest.mark.parametrize("size", [(11, 9), (63, 57)], ids=["blocks", "planes"])
@pytest.mark.parametrize("stride", [1, 2])
def test_depthwise_non_finite_input_propagates_like_torch(stride, size):
    """Regression: the plane layout's weight gradient multiplied dY's zero borders by inputs
    the tap does not read (the flat positions past a row's end), so an inf at a row's first
    column made other taps of its channel NaN where torch's are finite."""
    x = torch.randn(2, 4, *size, dtype=torch.float64)
    x[1, 2, 5, 0] = float("inf")
    x[0, 1, 3, -1] = float("-inf")
    x[1, 3, 7, 4] = float("nan")
    weight = torch.randn(4, 1, 3, 3, dtype=torch.float64)
    args = ([stride] * 2, [1, 1], [1, 1], 4)
    dy = torch.randn_like(F.conv2d(x, weight, None, stride, 1, groups=4))
    ours = torch.ops.convkit.conv2d_backward(dy, x, weight, *args, [True, True, False])
    x_t = x.clone().requires_grad_()
    w_t = weight.clone().requires_grad_()
    theirs = torch.autograd.grad(F.conv2d(x_t, w_t, None, stride, 1, groups=4), (x_t, w_t), dy)
    for a, c in zip(ours[:2], theirs):
        torch.testing.assert_close(a, c, rtol=1e-10, atol=1e-10, equal_nan=True)
