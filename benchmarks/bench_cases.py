"""What the benchmark measures: the conv and batch-norm cases, the run configurations
(full, --quick, --tiny) that pick them, and the work each direction or mode counts."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

CONV_DIRECTIONS = ("forward", "backward", "forward+backward")
BN_MODES = ("train forward", "backward", "train forward+backward", "eval forward")
# Bytes one fused BatchNorm+ReLU pass structure moves, in units of the tensor's size: the
# training forward reads x for the statistics, then reads x and writes y; the backward reads
# (x, dy) for the reductions, then (x, dy) again and writes dx; eval reads x and writes y.
# The same count is used for PyTorch's unfused pair, so the GB/s of both are "effective"
# bandwidths of the same work and their ratio is the time ratio.
BN_TENSOR_PASSES = {"train forward": 3, "backward": 5, "train forward+backward": 8,
                    "eval forward": 2}


@dataclass(frozen=True)
class ConvCase:
    """One conv2d layer: input [batch, in_channels, height, width], weight
    [out_channels, in_channels / groups, kernel, kernel]."""

    label: str
    batch: int
    in_channels: int
    out_channels: int
    height: int
    width: int
    kernel: int
    stride: int = 1
    padding: int = 0
    dilation: int = 1
    groups: int = 1
    bias: bool = False
    # False for a network's first layer: its input is the data, which needs no gradient,
    # so training runs the weight and bias gradients only.
    input_grad: bool = True

    def output_size(self) -> tuple[int, int]:
        """(oH, oW), as F.conv2d computes them."""
        span = self.dilation * (self.kernel - 1) + 1
        out_h = (self.height + 2 * self.padding - span) // self.stride + 1
        out_w = (self.width + 2 * self.padding - span) // self.stride + 1
        return out_h, out_w

    def forward_flops(self) -> float:
        """2 * N * O * oH * oW * (C / groups) * kH * kW: one multiply and one add per tap."""
        out_h, out_w = self.output_size()
        taps = (self.in_channels // self.groups) * self.kernel * self.kernel
        return 2.0 * self.batch * self.out_channels * out_h * out_w * taps

    def describe(self) -> str:
        """Input and weight shapes and the conv arguments that are not the defaults."""
        text = (
            f"[{self.batch},{self.in_channels},{self.height},{self.width}]"
            f"*[{self.out_channels},{self.in_channels // self.groups},{self.kernel},{self.kernel}]"
        )
        extras = []
        if self.stride != 1:
            extras.append(f"s{self.stride}")
        if self.padding != 0:
            extras.append(f"p{self.padding}")
        if self.dilation != 1:
            extras.append(f"d{self.dilation}")
        if self.groups != 1:
            extras.append(f"g{self.groups}")
        if self.bias:
            extras.append("bias")
        if not self.input_grad:
            extras.append("no dx")
        return " ".join([text] + extras)


@dataclass(frozen=True)
class BatchNormCase:
    """BatchNorm2d + an activation ("relu", "relu6", "leaky_relu", "silu", "hardswish") on an
    activation of shape [N, C, H, W]."""

    label: str
    shape: tuple[int, int, int, int]
    activation: str = "relu"

    def describe(self) -> str:
        return "[" + ",".join(str(s) for s in self.shape) + "]"


@dataclass(frozen=True)
class Config:
    """Which cases a run covers and how long each timing runs."""

    chapter_batches: tuple[int, ...]
    common_batch: int
    common_layers: Optional[tuple[str, ...]]  # None: every common layer
    bn_chapter_batches: tuple[int, ...]
    bn_large_batch: int
    bn_large_channels: tuple[int, ...]
    bn_other_activations: tuple[str, ...]
    training_batches: tuple[int, ...]
    copy_mib: int
    min_run_time: float


FULL = Config(
    chapter_batches=(64, 512),
    common_batch=32,
    common_layers=None,
    bn_chapter_batches=(64, 512),
    bn_large_batch=32,
    bn_large_channels=(64, 128, 256, 512),
    bn_other_activations=("relu6", "leaky_relu", "silu", "hardswish"),
    training_batches=(512, 64),
    copy_mib=64,
    min_run_time=0.2,
)
# The common layers at batch 8: at 32 they alone take about a minute on two cores.
QUICK = Config(
    chapter_batches=(64,),
    common_batch=8,
    common_layers=("resnet18.layer4", "depthwise3x3", "pointwise1x1", "dilated3x3"),
    bn_chapter_batches=(64,),
    bn_large_batch=32,
    bn_large_channels=(64,),
    bn_other_activations=("relu6", "silu"),
    training_batches=(512, 64),
    copy_mib=64,
    min_run_time=0.05,
)
# For the test suite: the quick subset on a few images, so a run takes seconds.
TINY = Config(
    chapter_batches=(4,),
    common_batch=2,
    common_layers=QUICK.common_layers,
    bn_chapter_batches=(4,),
    bn_large_batch=2,
    bn_large_channels=(64,),
    bn_other_activations=("silu",),
    training_batches=(16,),
    copy_mib=4,
    min_run_time=0.002,
)


def chapter_conv_cases(batch: int) -> list[ConvCase]:
    """The five convolutions of the chapter's MNIST CNN, conv(1,8,ks=5) conv(8,16)
    conv(16,32) conv(32,64) conv(64,10): stride 2, padding ks // 2, with bias, on
    28x28 -> 14x14 -> 7x7 -> 4x4 -> 2x2 -> 1x1."""
    specs = [("c1", 1, 8, 28, 5), ("c2", 8, 16, 14, 3), ("c3", 16, 32, 7, 3),
             ("c4", 32, 64, 4, 3), ("c5", 64, 10, 2, 3)]
    return [
        ConvCase(f"chapter.{name} N={batch}", batch, ni, nf, size, size, ks,
                 stride=2, padding=ks // 2, bias=True, input_grad=name != "c1")
        for name, ni, nf, size, ks in specs
    ]


def common_conv_cases(batch: int, only: Optional[Sequence[str]]) -> list[ConvCase]:
    """ResNet-18's convolutions from 56x56 down to 7x7 (no bias: batchnorm follows), a
    MobileNet-style depthwise 3x3 (and MobileNetV2's depthwise layers at stride 1 and 2, from
    its 32x32 and, on 64x64 inputs, 16x16 and 4x4 maps), the two models' stems and
    MobileNetV2's 1x1 expansions and projections, a bottleneck-style 1x1 and a dilated 3x3."""
    cases = [
        ConvCase("resnet18.layer1", batch, 64, 64, 56, 56, 3, 1, 1),
        ConvCase("resnet18.layer2.down", batch, 64, 128, 56, 56, 3, 2, 1),
        ConvCase("resnet18.layer2.shortcut", batch, 64, 128, 56, 56, 1, 2, 0),
        ConvCase("resnet18.layer2", batch, 128, 128, 28, 28, 3, 1, 1),
        ConvCase("resnet18.layer3.down", batch, 128, 256, 28, 28, 3, 2, 1),
        ConvCase("resnet18.layer3", batch, 256, 256, 14, 14, 3, 1, 1),
        ConvCase("resnet18.layer4.down", batch, 256, 512, 14, 14, 3, 2, 1),
        ConvCase("resnet18.layer4", batch, 512, 512, 7, 7, 3, 1, 1),
        ConvCase("depthwise3x3", batch, 128, 128, 56, 56, 3, 1, 1, groups=128),
        ConvCase("mobilenetv2.dw96 32x32", batch, 96, 96, 32, 32, 3, 1, 1, groups=96),
        ConvCase("mobilenetv2.dw144 32x32 s2", batch, 144, 144, 32, 32, 3, 2, 1, groups=144),
        ConvCase("mobilenetv2.dw96 16x16", batch, 96, 96, 16, 16, 3, 1, 1, groups=96),
        ConvCase("mobilenetv2.dw144 16x16 s2", batch, 144, 144, 16, 16, 3, 2, 1, groups=144),
        ConvCase("mobilenetv2.dw384 4x4", batch, 384, 384, 4, 4, 3, 1, 1, groups=384),
        # The two models' other distinct shapes (ResNet-18 at 224x224, MobileNetV2 at 64x64):
        # the 7x7 and 3x3 stems (first layers: no input gradient), 1x1 expansions and
        # projections.
        ConvCase("resnet18.stem 7x7", batch, 3, 64, 224, 224, 7, 2, 3, input_grad=False),
        ConvCase("mobilenetv2.stem", batch, 3, 32, 64, 64, 3, 2, 1, input_grad=False),
        ConvCase("mobilenetv2.expand16 32x32", batch, 16, 96, 32, 32, 1),
        ConvCase("mobilenetv2.project96 16x16", batch, 96, 24, 16, 16, 1),
        ConvCase("mobilenetv2.expand64 4x4", batch, 64, 384, 4, 4, 1),
        ConvCase("mobilenetv2.project960 2x2", batch, 960, 320, 2, 2, 1),
        ConvCase("mobilenetv2.head 2x2", batch, 320, 1280, 2, 2, 1),
        ConvCase("pointwise1x1", batch, 256, 128, 28, 28, 1),
        ConvCase("dilated3x3", batch, 64, 64, 28, 28, 3, 1, 2, dilation=2),
    ]
    if only is not None:
        cases = [case for case in cases if case.label in only]
    return cases


def batch_norm_cases(config: Config) -> list[BatchNormCase]:
    """The chapter CNN's activations after each of its first four convs, then ResNet-18's
    activations at the start of each stage (the 'larger ones'), all with ReLU, then the other
    fused activations."""
    cases = []
    for batch in config.bn_chapter_batches:
        for channels, size in ((8, 14), (16, 7), (32, 4), (64, 2)):
            label = f"chapter C={channels} N={batch}"
            cases.append(BatchNormCase(label, (batch, channels, size, size)))
    large_sizes = {64: 56, 128: 28, 256: 14, 512: 7}
    for channels in config.bn_large_channels:
        size = large_sizes[channels]
        shape = (config.bn_large_batch, channels, size, size)
        cases.append(BatchNormCase(f"resnet18 C={channels}", shape))
    # The other activations on a MobileNet/EfficientNet-sized map (a 64x64 input's 16x16 stage).
    for activation in config.bn_other_activations:
        shape = (config.bn_large_batch, 96, 16, 16)
        cases.append(BatchNormCase(f"{activation} C=96", shape, activation))
    return cases
