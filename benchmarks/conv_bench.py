"""convkit against PyTorch, side by side, in one run.

What it measures (float32, on the CPU or with ``--device cuda`` on a GPU):
  * conv2d forward, backward (input, weight and bias gradients) and forward+backward, for
    the five convolutions of fastai's chapter-13 MNIST CNN at batch 64 and 512 and for a set
    of common layers (ResNet-18's 3x3 and 1x1 convolutions at batch 32, a depthwise 3x3, a
    1x1, a dilated 3x3). Each is timed three ways: convkit, ``F.conv2d`` with PyTorch's
    default backend (oneDNN on the CPU, cuDNN on CUDA) and ``F.conv2d`` forced onto
    PyTorch's own im2col + GEMM path (oneDNN and NNPACK off on the CPU, cuDNN off on CUDA),
    the classic baseline our kernel is built like.
  * BatchNorm+ReLU (training forward, backward, eval forward): convkit's fused kernel
    against ``F.batch_norm`` followed by ``F.relu``, on the chapter's activation shapes and
    on ResNet-sized ones, with a plain copy's bandwidth alongside to read the GB/s against.
  * One training step (forward, cross-entropy, backward, Adam step) of the chapter's CNN at
    batch 512, with and without batchnorm: ``convkit.nn.convert(model)`` against the torch
    model it was converted from.

How: every case is first checked against PyTorch (our float32 error against a float64
reference at most a few times PyTorch's own); a case that fails is reported and not timed,
and the script exits non-zero. Times are medians: ``torch.utils.benchmark.Timer``
(``blocked_autorange``, thread count fixed and printed) on the CPU, CUDA events after a
warm-up on the GPU. Every row gives the times, GFLOP/s (conv), GB/s (batch norm) or
images/s (training), and the ratio convkit / PyTorch (below 1: convkit is faster).

    python benchmarks/conv_bench.py [--device cpu|cuda] [--quick] [--threads N]
                                    [--json PATH] [--plot [PATH]] [--markdown PATH]
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import os
import platform
import statistics
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils import benchmark

try:
    import resource  # Unix only: our own CPU time, to tell how much other processes took
except ImportError:  # pragma: no cover
    resource = None

try:
    import convkit
except ImportError:
    # Run from a source checkout without an install: the extension is built in place.
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    import convkit
from convkit.experiments.models import simple_cnn

# Entering torch.backends.mkldnn.flags() resets oneDNN's TF32 setting, which warns on every
# entry on builds without Intel GPU support; the setting is irrelevant to float32 on CPUs.
warnings.filterwarnings("ignore", message=".*TF32 acceleration on top of oneDNN.*")

DEFAULT_PLOT_PATH = "conv_bench.png"
# The ops a CUDA run goes through; each needs a CUDA kernel in the build.
CUDA_OPS = ("conv2d_forward", "conv2d_backward", "batch_norm_forward", "batch_norm_backward",
            "batch_norm_update_stats")

CONV_DIRECTIONS = ("forward", "backward", "forward+backward")
BN_MODES = ("train forward", "backward", "train forward+backward", "eval forward")
# Bytes one fused BatchNorm+ReLU pass structure moves, in units of the tensor's size: the
# training forward reads x for the statistics, then reads x and writes y; the backward reads
# (x, dy) for the reductions, then (x, dy) again and writes dx; eval reads x and writes y.
# The same count is used for PyTorch's unfused pair, so the GB/s of both are "effective"
# bandwidths of the same work and their ratio is the time ratio.
BN_TENSOR_PASSES = {"train forward": 3, "backward": 5, "train forward+backward": 8,
                    "eval forward": 2}


# ----------------------------------------------------------------------------- cases


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
    """BatchNorm2d + ReLU on an activation of shape [N, C, H, W]."""

    label: str
    shape: tuple[int, int, int, int]

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
    MobileNet-style depthwise 3x3, a bottleneck-style 1x1 and a dilated 3x3."""
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
        ConvCase("pointwise1x1", batch, 256, 128, 28, 28, 1),
        ConvCase("dilated3x3", batch, 64, 64, 28, 28, 3, 1, 2, dilation=2),
    ]
    if only is not None:
        cases = [case for case in cases if case.label in only]
    return cases


def batch_norm_cases(config: Config) -> list[BatchNormCase]:
    """The chapter CNN's activations after each of its first four convs, then ResNet-18's
    activations at the start of each stage (the 'larger ones')."""
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
    return cases


# ----------------------------------------------------------------------------- results


@dataclass
class Row:
    """One line of the table and one object of the JSON list."""

    section: str
    name: str
    shape: str
    passed: bool
    rate_unit: Optional[str] = None
    work: Optional[float] = None  # FLOPs, bytes or images per call, in rate_unit's base unit
    ms_convkit: Optional[float] = None
    ms_torch: Optional[float] = None
    ms_torch_im2col: Optional[float] = None
    error: Optional[str] = None
    extra: dict[str, Any] = field(default_factory=dict)

    def rate(self, ms: Optional[float]) -> Optional[float]:
        """work / time in rate_unit (GFLOP/s, GB/s or images/s)."""
        if ms is None or self.work is None or ms <= 0:
            return None
        per_second = self.work / (ms * 1e-3)
        return per_second if self.rate_unit == "img/s" else per_second / 1e9

    def ratio(self) -> Optional[float]:
        """ms_convkit / ms_torch: below 1, convkit is faster."""
        if self.ms_convkit is None or self.ms_torch is None:
            return None
        return self.ms_convkit / self.ms_torch

    def ratio_im2col(self) -> Optional[float]:
        if self.ms_convkit is None or self.ms_torch_im2col is None:
            return None
        return self.ms_convkit / self.ms_torch_im2col

    def to_json(self) -> dict[str, Any]:
        record = {
            "section": self.section,
            "name": self.name,
            "shape": self.shape,
            "pass": self.passed,
            "ms_convkit": self.ms_convkit,
            "ms_torch": self.ms_torch,
            "ms_torch_im2col": self.ms_torch_im2col,
            "ratio": self.ratio(),
            "ratio_im2col": self.ratio_im2col(),
            "rate_unit": self.rate_unit,
            "rate_convkit": self.rate(self.ms_convkit),
            "rate_torch": self.rate(self.ms_torch),
            "rate_torch_im2col": self.rate(self.ms_torch_im2col),
            "work": self.work,
            "error": self.error,
        }
        record.update(self.extra)
        return record


# ----------------------------------------------------------------------------- timing


class Clock:
    """Median time of a callable: torch.utils.benchmark on the CPU, CUDA events on a GPU."""

    def __init__(self, device: torch.device, threads: int, min_run_time: float,
                 min_repeats: int = 3, warmup: int = 3) -> None:
        self.device = device
        self.threads = threads
        self.min_run_time = min_run_time
        self.min_repeats = min_repeats
        self.warmup = warmup

    def median_ms(self, fn: Callable[[], Any]) -> float:
        if self.device.type == "cuda":
            return self._cuda_median_ms(fn)
        return self._cpu_median_ms(fn)

    def _cpu_median_ms(self, fn: Callable[[], Any]) -> float:
        # Timer runs at num_threads (its default is 1, not torch's setting).
        timer = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=self.threads)
        # blocked_autorange warms up while it sizes its blocks, then samples blocks until
        # min_run_time has passed.
        measurement = timer.blocked_autorange(min_run_time=self.min_run_time)
        times = list(measurement.times)
        # A call slower than min_run_time gives a single sample; take a few more so the
        # median is a median.
        while len(times) < self.min_repeats:
            times.extend(timer.timeit(measurement.number_per_run).times)
        return statistics.median(times) * 1e3

    def compare(self, fns: Sequence[Callable[[], Any]]) -> list[float]:
        """Medians (ms) of several callables measured side by side: on the CPU in
        interleaved rounds (each round times every callable once), so that a slow spell of a
        shared machine falls on all of them alike instead of on whichever ran then."""
        if self.device.type == "cuda":
            return [self._cuda_median_ms(fn) for fn in fns]
        timers = [benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=self.threads)
                  for fn in fns]
        # Size each sample to about a tenth of min_run_time (warming up on the way).
        numbers = []
        for timer in timers:
            probe = timer.blocked_autorange(min_run_time=self.min_run_time / 5)
            per_call = statistics.median(probe.times)
            numbers.append(max(1, int(self.min_run_time / 10 / max(per_call, 1e-9))))
        samples: list[list[float]] = [[] for _ in fns]
        start = time.perf_counter()
        rounds = 0
        while rounds < max(self.min_repeats, 5) or (
            time.perf_counter() - start < self.min_run_time * len(fns) and rounds < 1000
        ):
            for timer, number, times in zip(timers, numbers, samples):
                times.extend(timer.timeit(number).times)
            rounds += 1
        return [statistics.median(times) * 1e3 for times in samples]

    def _cuda_median_ms(self, fn: Callable[[], Any]) -> float:
        # The first calls pay for cuDNN/cuBLAS handle creation, autotuning and the caching
        # allocator's first allocations.
        for _ in range(self.warmup):
            fn()
        torch.cuda.synchronize(self.device)
        times_ms: list[float] = []
        total_s = 0.0
        # A cap on the count, for host-bound microsecond ops.
        while len(times_ms) < 10000 and (
            total_s < self.min_run_time or len(times_ms) < self.min_repeats
        ):
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            elapsed = start.elapsed_time(end)
            times_ms.append(elapsed)
            total_s += elapsed * 1e-3
        return statistics.median(times_ms)


@contextlib.contextmanager
def im2col_backend(device: torch.device) -> Iterator[None]:
    """PyTorch's own im2col + GEMM convolution: on the CPU oneDNN off sends F.conv2d to
    NNPACK at batch >= 16, so NNPACK goes off too, leaving slow_conv2d (slow_conv_dilated2d
    when dilated); on CUDA, cuDNN off: slow_conv2d_cuda, but PyTorch's direct depthwise
    kernel for depthwise layers."""
    if device.type == "cuda":
        with torch.backends.cudnn.flags(enabled=False):
            yield
    else:
        with torch.backends.mkldnn.flags(enabled=False), torch.backends.nnpack.flags(enabled=False):
            yield


def _inside_im2col_backend(device: torch.device, fn: Callable[[], Any]) -> Callable[[], Any]:
    """fn with PyTorch's im2col path selected for the duration of each call."""
    def run() -> Any:
        with im2col_backend(device):
            return fn()
    return run


def column_buffer_peak_bytes(reset: bool = False) -> int:
    """convkit's largest conv column buffer since the last reset (all threads' tiles)."""
    return int(torch.ops.convkit.column_buffer_peak_bytes(reset))


def conv_backend_name(case: ConvCase, x: torch.Tensor, w: torch.Tensor) -> str:
    """The backend F.conv2d picks for this case under the current flags (e.g. 'Mkldnn',
    'Slow2d'), so the JSON records what was really compared; 'unknown' if this torch lacks
    the (private) query."""
    try:
        backend = torch._C._select_conv_backend(
            x, w, None, [case.stride] * 2, [case.padding] * 2, [case.dilation] * 2,
            False, [0, 0], case.groups, None,
        )
    except (AttributeError, RuntimeError, TypeError):
        return "unknown"
    return str(backend).split(".")[-1]


# ----------------------------------------------------------------------------- checks


def error_vs_reference(name: str, ours: torch.Tensor, theirs: torch.Tensor,
                       reference: torch.Tensor, factor: float = 4.0) -> Optional[str]:
    """None when our error against the float64 reference is at most `factor` times
    PyTorch's (plus a few ulps of the result's scale); otherwise what went wrong."""
    if ours.shape != reference.shape:
        return f"{name}: shape {list(ours.shape)}, expected {list(reference.shape)}"
    if ours.numel() == 0:
        return None
    reference = reference.double()
    our_error = (ours.double() - reference).abs().max().item()
    their_error = (theirs.double() - reference).abs().max().item()
    scale = reference.abs().max().item()
    floor = 8 * torch.finfo(ours.dtype).eps * max(scale, 1.0)
    if not math.isfinite(our_error) or our_error > factor * their_error + floor:
        return (f"{name}: convkit error {our_error:.3e} vs PyTorch {their_error:.3e} "
                f"(allowed {factor}x + {floor:.1e})")
    return None


def first_error(errors: Sequence[Optional[str]]) -> Optional[str]:
    for error in errors:
        if error is not None:
            return error
    return None


# ----------------------------------------------------------------------------- conv


def _conv_call(conv: Callable[..., torch.Tensor], case: ConvCase, x: torch.Tensor,
               w: torch.Tensor, b: Optional[torch.Tensor]) -> torch.Tensor:
    return conv(x, w, b, case.stride, case.padding, case.dilation, case.groups)


def _conv_tensors(
    case: ConvCase, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor], torch.Tensor]:
    """x [N, C, H, W], w [O, C/groups, k, k] at PyTorch's init scale, b [O] or None, and an
    output gradient dy [N, O, oH, oW]; all fresh random values."""
    x = torch.randn(case.batch, case.in_channels, case.height, case.width, device=device)
    fan_in = (case.in_channels // case.groups) * case.kernel * case.kernel
    w = torch.randn(case.out_channels, case.in_channels // case.groups, case.kernel, case.kernel,
                    device=device) / math.sqrt(fan_in)
    b = torch.randn(case.out_channels, device=device) * 0.1 if case.bias else None
    out_h, out_w = case.output_size()
    dy = torch.randn(case.batch, case.out_channels, out_h, out_w, device=device)
    return x, w, b, dy


def _leaves(x: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor],
            input_grad: bool = True) -> list[torch.Tensor]:
    """The tensors a backward differentiates: [x (when input_grad), w, b (when given)];
    x itself stays first in the conv call either way."""
    leaves = [x.detach().requires_grad_(input_grad), w.detach().requires_grad_()]
    if b is not None:
        leaves.append(b.detach().requires_grad_())
    return leaves


def _wanted(leaves: list[torch.Tensor]) -> list[torch.Tensor]:
    return [t for t in leaves if t.requires_grad]


def validate_conv(case: ConvCase, x: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor],
                  dy: torch.Tensor) -> Optional[str]:
    """convkit's output and its input/weight/bias gradients against F.conv2d's, both judged
    by a float64 reference. None when they agree, else the first discrepancy."""
    try:
        results = {}
        for impl, conv, dtype in (("convkit", convkit.conv2d, None), ("torch", F.conv2d, None),
                                  ("reference", F.conv2d, torch.float64)):
            tensors = [t if dtype is None or t is None else t.to(dtype) for t in (x, w, b)]
            leaves = _leaves(*tensors, input_grad=case.input_grad)
            bias = leaves[2] if b is not None else None
            y = _conv_call(conv, case, leaves[0], leaves[1], bias)
            grad_y = dy if dtype is None else dy.to(dtype)
            grads = torch.autograd.grad(y, _wanted(leaves), grad_y)
            results[impl] = (y.detach(),) + tuple(grads)
    except Exception as exc:  # a kernel that raises is as wrong as one that miscomputes
        return f"raised {type(exc).__name__}: {exc}"
    names = ("output", "grad_input", "grad_weight", "grad_bias")
    if not case.input_grad:
        names = ("output", "grad_weight", "grad_bias")
    return first_error([
        error_vs_reference(name, ours, theirs, ref)
        for name, ours, theirs, ref in zip(
            names, results["convkit"], results["torch"], results["reference"]
        )
    ])


def _conv_timed_fn(direction: str, conv: Callable[..., torch.Tensor], case: ConvCase,
                   x: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor],
                   dy: torch.Tensor) -> Callable[[], Any]:
    """The callable one timing repeats. forward runs without autograd (the kernel alone);
    backward replays one recorded graph (retain_graph) for all three gradients;
    forward+backward records and runs a fresh graph each call, as a training step does."""
    leaves = _leaves(x, w, b, case.input_grad)
    wanted = _wanted(leaves)
    bias = leaves[2] if b is not None else None
    if direction == "forward":
        def run_forward() -> torch.Tensor:
            with torch.no_grad():
                return _conv_call(conv, case, x, w, b)
        return run_forward
    if direction == "backward":
        y = _conv_call(conv, case, leaves[0], leaves[1], bias)

        def run_backward() -> Any:
            return torch.autograd.grad(y, wanted, dy, retain_graph=True)
        return run_backward

    def run_forward_backward() -> Any:
        y = _conv_call(conv, case, leaves[0], leaves[1], bias)
        return torch.autograd.grad(y, wanted, dy)
    return run_forward_backward


def bench_conv_case(case: ConvCase, section: str, device: torch.device,
                    clock: Clock) -> list[Row]:
    """Three rows (forward, backward, forward+backward) for one conv layer."""
    x, w, b, dy = _conv_tensors(case, device)
    error = validate_conv(case, x, w, b, dy)
    backends = {"torch_backend": conv_backend_name(case, x, w)}
    with im2col_backend(device):
        backends["torch_im2col_backend"] = conv_backend_name(case, x, w)
    rows = []
    for direction in CONV_DIRECTIONS:
        # Backward computes the input and the weight gradient: each costs a forward.
        backward_worth = 2 if case.input_grad else 1
        forwards_worth = {"forward": 1, "backward": backward_worth,
                          "forward+backward": 1 + backward_worth}[direction]
        flops = case.forward_flops() * forwards_worth
        row = Row(section, f"{case.label} {direction}", case.describe(), error is None,
                  rate_unit="GFLOP/s", work=flops, error=error,
                  extra={"direction": direction, **backends})
        if error is None:
            ours = _conv_timed_fn(direction, convkit.conv2d, case, x, w, b, dy)
            theirs = _conv_timed_fn(direction, F.conv2d, case, x, w, b, dy)
            # The flags are global and read again in the backward, so both the graph's
            # recording and every timed call run inside them.
            with im2col_backend(device):
                im2col = _conv_timed_fn(direction, F.conv2d, case, x, w, b, dy)
            column_buffer_peak_bytes(reset=True)
            row.ms_convkit, row.ms_torch, row.ms_torch_im2col = clock.compare(
                [ours, theirs, _inside_im2col_backend(device, im2col)])
            row.extra["column_buffer_peak_mib"] = column_buffer_peak_bytes() / 2**20
        rows.append(row)
    return rows


# ----------------------------------------------------------------------------- batch norm


def _torch_batch_norm_relu(x: torch.Tensor, running_mean: Optional[torch.Tensor],
                           running_var: Optional[torch.Tensor], weight: torch.Tensor,
                           bias: torch.Tensor, training: bool) -> torch.Tensor:
    """What a user writes without convkit: nn.BatchNorm2d then nn.ReLU, two kernels."""
    return F.relu(F.batch_norm(x, running_mean, running_var, weight, bias, training, 0.1, 1e-5))


def _convkit_batch_norm_relu(x: torch.Tensor, running_mean: Optional[torch.Tensor],
                             running_var: Optional[torch.Tensor], weight: torch.Tensor,
                             bias: torch.Tensor, training: bool) -> torch.Tensor:
    return convkit.batch_norm_relu(x, running_mean, running_var, weight, bias, training, 0.1, 1e-5)


def _bn_tensors(case: BatchNormCase, device: torch.device) -> dict[str, torch.Tensor]:
    """x [N, C, H, W] with a non-zero mean, affine parameters and running statistics [C],
    and an output gradient dy [N, C, H, W]."""
    channels = case.shape[1]
    return {
        "x": torch.randn(case.shape, device=device) * 1.5 + 0.3,
        "weight": 1 + 0.1 * torch.randn(channels, device=device),
        "bias": 0.1 * torch.randn(channels, device=device),
        "running_mean": 0.1 * torch.randn(channels, device=device),
        "running_var": 0.5 + torch.rand(channels, device=device),
        "dy": torch.randn(case.shape, device=device),
    }


def validate_batch_norm(t: dict[str, torch.Tensor]) -> Optional[str]:
    """convkit's fused BatchNorm+ReLU against F.batch_norm + F.relu: training output,
    running-statistics update, the three gradients, and the eval output, each judged by a
    float64 reference."""
    results = {}
    try:
        for impl, fn, dtype in (("convkit", _convkit_batch_norm_relu, torch.float32),
                                ("torch", _torch_batch_norm_relu, torch.float32),
                                ("reference", _torch_batch_norm_relu, torch.float64)):
            x, weight, bias = (
                t[k].detach().to(dtype).requires_grad_() for k in ("x", "weight", "bias")
            )
            running_mean = t["running_mean"].to(dtype).clone()
            running_var = t["running_var"].to(dtype).clone()
            y = fn(x, running_mean, running_var, weight, bias, True)
            grads = torch.autograd.grad(y, (x, weight, bias), t["dy"].to(dtype))
            with torch.no_grad():
                y_eval = fn(x, t["running_mean"].to(dtype), t["running_var"].to(dtype),
                            weight, bias, False)
            results[impl] = (y.detach(), running_mean, running_var) + tuple(grads) + (y_eval,)
    except Exception as exc:
        return f"raised {type(exc).__name__}: {exc}"
    names = ("train output", "running_mean", "running_var", "grad_input", "grad_weight",
             "grad_bias", "eval output")
    return first_error([
        error_vs_reference(name, ours, theirs, ref)
        for name, ours, theirs, ref in zip(
            names, results["convkit"], results["torch"], results["reference"]
        )
    ])


def _bn_timed_fn(mode: str, fn: Callable[..., torch.Tensor],
                 t: dict[str, torch.Tensor]) -> Callable[[], Any]:
    """train forward updates private copies of the running statistics each call, as a
    module in training mode does; backward replays one recorded graph."""
    running_mean = t["running_mean"].clone()
    running_var = t["running_var"].clone()
    if mode == "train forward":
        def run_train() -> torch.Tensor:
            with torch.no_grad():
                return fn(t["x"], running_mean, running_var, t["weight"], t["bias"], True)
        return run_train
    if mode == "eval forward":
        def run_eval() -> torch.Tensor:
            with torch.no_grad():
                return fn(t["x"], running_mean, running_var, t["weight"], t["bias"], False)
        return run_eval
    leaves = [t[k].detach().requires_grad_() for k in ("x", "weight", "bias")]
    if mode == "train forward+backward":
        def run_train_step() -> Any:
            y = fn(leaves[0], running_mean, running_var, leaves[1], leaves[2], True)
            return torch.autograd.grad(y, leaves, t["dy"])
        return run_train_step
    y = fn(leaves[0], running_mean, running_var, leaves[1], leaves[2], True)

    def run_backward() -> Any:
        return torch.autograd.grad(y, leaves, t["dy"], retain_graph=True)
    return run_backward


def bench_batch_norm_case(case: BatchNormCase, device: torch.device, clock: Clock,
                          copy_gbps: Optional[float]) -> list[Row]:
    """Three rows (train forward, backward, eval forward) for one activation shape."""
    t = _bn_tensors(case, device)
    error = validate_batch_norm(t)
    tensor_bytes = t["x"].numel() * t["x"].element_size()
    rows = []
    for mode in BN_MODES:
        row = Row("batchnorm_relu", f"{case.label} {mode}", case.describe(), error is None,
                  rate_unit="GB/s", work=float(BN_TENSOR_PASSES[mode] * tensor_bytes), error=error,
                  extra={"direction": mode, "gbps_copy": copy_gbps})
        if error is None:
            row.ms_convkit, row.ms_torch = clock.compare([
                _bn_timed_fn(mode, _convkit_batch_norm_relu, t),
                _bn_timed_fn(mode, _torch_batch_norm_relu, t),
            ])
        rows.append(row)
    return rows


def copy_bandwidth_gbps(mib: int, device: torch.device, clock: Clock) -> float:
    """dst.copy_(src) on a tensor of `mib` MiB (bigger than the caches): reads and writes
    count, so GB/s = 2 * bytes / time. The ceiling an element-wise pass can hope for."""
    src = torch.randn(mib * (1 << 20) // 4, device=device)
    dst = torch.empty_like(src)
    ms = clock.median_ms(lambda: dst.copy_(src))
    return 2 * src.numel() * src.element_size() / (ms * 1e-3) / 1e9


# ----------------------------------------------------------------------------- training step


def _loss_and_grads(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, ...]:
    model.zero_grad(set_to_none=True)
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    return (loss.detach(),) + tuple(p.grad.detach().clone() for p in model.parameters())


def validate_training(torch_model: nn.Module, convkit_model: nn.Module, x: torch.Tensor,
                      y: torch.Tensor) -> Optional[str]:
    """The loss and every parameter gradient of one step, convkit against torch, judged by
    the torch model in float64."""
    reference_model = copy.deepcopy(torch_model).double()
    try:
        ours = _loss_and_grads(convkit_model, x, y)
    except Exception as exc:
        return f"raised {type(exc).__name__}: {exc}"
    theirs = _loss_and_grads(torch_model, x, y)
    reference = _loss_and_grads(reference_model, x.double(), y)
    names = ["loss"] + [f"grad {name}" for name, _ in torch_model.named_parameters()]
    return first_error([
        error_vs_reference(name, a, b, r) for name, a, b, r in zip(names, ours, theirs, reference)
    ])


def _training_step_fn(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Callable[[], Any]:
    """forward, loss, backward, Adam step; the model keeps training across calls."""
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
    return step


def bench_training_step(bn: bool, batch: int, device: torch.device, clock: Clock) -> Row:
    """One row: a training step of the chapter CNN (with or without batchnorm) at `batch`,
    convkit.nn.convert(model) against the same torch model (default and im2col convs)."""
    torch_model = simple_cnn(norm="batch" if bn else None).to(device).train()
    convkit_model = convkit.nn.convert(torch_model)
    x = torch.randn(batch, 1, 28, 28, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    error = validate_training(torch_model, convkit_model, x, y)
    name = f"chapter CNN{' + BN' if bn else ''} N={batch} Adam step"
    row = Row("training_step", name, f"[{batch},1,28,28]", error is None, rate_unit="img/s",
              work=float(batch), error=error, extra={"direction": "train step"})
    if error is None:
        im2col_model = copy.deepcopy(torch_model)
        with im2col_backend(device):
            im2col_step = _training_step_fn(im2col_model, x, y)
        row.ms_convkit, row.ms_torch, row.ms_torch_im2col = clock.compare([
            _training_step_fn(convkit_model, x, y),
            _training_step_fn(torch_model, x, y),
            _inside_im2col_backend(device, im2col_step),
        ])
        row.extra.update(memory_over_steps(convkit_model, x, y, device))
    return row


def resident_mib() -> Optional[float]:
    """The process's resident memory (Linux /proc), None where it cannot be read."""
    try:
        with open("/proc/self/statm") as statm:
            pages = int(statm.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return None


def memory_over_steps(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                      device: torch.device, steps: int = 300) -> dict[str, Any]:
    """Memory across a longer run of convkit training steps: resident memory (CPU) or
    allocated memory (CUDA) after the first 20 steps and after `steps`; with the column
    buffer's peak and, on the CPU, what the block cache holds in free blocks at the end (part
    of the resident figure). Flat memory means the second figure equals the first."""
    step = _training_step_fn(model, x, y)
    column_buffer_peak_bytes(reset=True)

    def used_mib() -> Optional[float]:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            return torch.cuda.memory_allocated(device) / 2**20
        return resident_mib()
    for _ in range(20):
        step()
    early = used_mib()
    for _ in range(steps - 20):
        step()
    late = used_mib()
    return {"memory_steps": steps, "memory_mib_after_20": early,
            f"memory_mib_after_{steps}": late,
            "column_buffer_peak_mib": column_buffer_peak_bytes() / 2**20,
            "cpu_cache_mib": (convkit.cpu_cache_bytes() / 2**20 if device.type == "cpu"
                              else None)}


# ----------------------------------------------------------------------------- output


SECTION_TITLES = {
    "conv chapter": "conv2d: the chapter's CNN layers",
    "conv common": "conv2d: common layers",
    "batchnorm_relu": "BatchNorm+ReLU: fused (convkit) vs F.batch_norm + F.relu (torch)",
    "training_step": "Training step: forward, cross-entropy, backward, Adam",
}


def _fmt(value: Optional[float], digits: int = 3) -> str:
    if value is None:
        return "-"
    if value >= 1000:
        return f"{value:.0f}"
    if value >= 100:
        return f"{value:.1f}"
    return f"{value:.{digits}g}" if value < 1 else f"{value:.2f}"


def _table_cells(row: Row, im2col: bool = True) -> list[str]:
    cells = [row.name, row.shape, _fmt(row.ms_convkit), _fmt(row.ms_torch)]
    if im2col:
        cells.append(_fmt(row.ms_torch_im2col))
    cells += [_fmt(row.rate(row.ms_convkit)), _fmt(row.rate(row.ms_torch))]
    if im2col:
        cells.append(_fmt(row.rate(row.ms_torch_im2col)))
    cells.append(_fmt(row.ratio()))
    if im2col:
        cells.append(_fmt(row.ratio_im2col()))
    return cells


def table_header(unit: str, im2col: bool = True) -> list[str]:
    """The columns of a section's table; batch norm has no im2col baseline."""
    if not im2col:
        return ["name", "shape", "convkit ms", "torch ms", f"convkit {unit}", f"torch {unit}",
                "ours/torch"]
    return ["name", "shape", "convkit ms", "torch ms", "im2col ms", f"convkit {unit}",
            f"torch {unit}", f"im2col {unit}", "ours/torch", "ours/im2col"]


# Column widths of the stdout table; long names and shapes simply push the line wider.
_WIDTHS = [40, 36, 10, 10, 10, 14, 14, 14, 10, 11]
_WIDTHS_NO_IM2COL = [40, 36, 10, 10, 14, 14, 10]


def print_text_row(cells: Sequence[str]) -> None:
    widths = _WIDTHS if len(cells) == len(_WIDTHS) else _WIDTHS_NO_IM2COL
    parts = [cells[0].ljust(widths[0]), cells[1].ljust(widths[1])]
    parts += [cell.rjust(width) for cell, width in zip(cells[2:], widths[2:])]
    print(" ".join(parts), flush=True)


def print_row(row: Row, im2col: bool = True) -> None:
    if row.passed:
        print_text_row(_table_cells(row, im2col))
    else:
        print(f"{row.name.ljust(_WIDTHS[0])} {row.shape.ljust(_WIDTHS[1])} "
              f"FAILED VALIDATION, not timed: {row.error}", flush=True)


def markdown_tables(sections: list[tuple[str, str, list[Row]]]) -> str:
    """One markdown table per section, the same columns as stdout."""
    lines = []
    for title, unit, rows in sections:
        im2col = any(row.ms_torch_im2col is not None for row in rows)
        header = table_header(unit, im2col)
        lines += [f"### {title}", "", "| " + " | ".join(header) + " |",
                  "|" + "|".join(["---"] * 2 + ["---:"] * (len(header) - 2)) + "|"]
        for row in rows:
            if row.passed:
                cells = _table_cells(row, im2col)
            else:
                cells = [row.name, row.shape, "FAILED"] + [""] * (len(header) - 3)
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def plot_ratios(rows: Sequence[Row], path: str, title: str) -> None:
    """Horizontal bars of convkit / PyTorch time per row (default backend and im2col), log
    scale, a line at 1: bars left of it are rows where convkit is faster."""
    import matplotlib

    matplotlib.use("Agg")  # no display: write the file only
    import matplotlib.pyplot as plt

    timed = [row for row in rows if row.ratio() is not None]
    labels = [row.name for row in timed]
    positions = list(range(len(timed)))
    height = 0.4
    fig, ax = plt.subplots(figsize=(10, 1.5 + 0.22 * max(len(timed), 1)))
    # Bars start at 1 (parity) and grow left when convkit is faster, right when slower.
    ax.barh([p - height / 2 for p in positions], [row.ratio() - 1 for row in timed], height,
            left=1.0, label="vs PyTorch default (oneDNN / cuDNN)", color="tab:blue")
    im2col = [(p, row.ratio_im2col()) for p, row in zip(positions, timed)
              if row.ratio_im2col() is not None]
    if im2col:
        ax.barh([p + height / 2 for p, _ in im2col], [r - 1 for _, r in im2col], height,
                left=1.0, label="vs PyTorch im2col path", color="tab:orange")
    ax.axvline(1.0, color="black", linewidth=1)
    ax.set_xscale("log")
    ax.set_yticks(positions)
    ax.set_yticklabels(labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("time ratio convkit / PyTorch (log scale; < 1: convkit faster)")
    ax.set_title(title, fontsize=9)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------- main


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_line(device: torch.device, threads: int) -> str:
    """CPU model, cores, torch version and threads (and the GPU, for CUDA runs)."""
    parts = [f"CPU: {cpu_model()}", f"{os.cpu_count()} cores", f"torch {torch.__version__}",
             f"{threads} thread{'' if threads == 1 else 's'}"]
    parts.append("oneDNN on" if torch.backends.mkldnn.is_available() else "oneDNN off")
    if device.type == "cuda":
        parts.insert(0, f"GPU: {torch.cuda.get_device_name(device)}")
        parts.append(f"CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}")
    return ", ".join(parts)


# Environment variables that change how the OpenMP threads of both sides wait between
# parallel regions. On this project's 2-vCPU VM libgomp's default (spin ~300000 times, then
# sleep) left the worker asleep at the next region in some processes and not in others:
# eval [64,8,14,14] took 20-24 us there against 12 (PyTorch's 26-28 against 21-22), while
# GOMP_SPINCOUNT=3000000 gave the fast timings in every process tried, OMP_WAIT_POLICY=ACTIVE
# in 8 of 9 (docs/performance-notes.md, "OpenMP waiting"). The benchmark keeps whatever the
# caller set and records it, so that runs are compared like with like.
THREAD_ENVIRONMENT = ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_PROC_BIND",
                      "OMP_PLACES", "KMP_BLOCKTIME", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


def thread_environment() -> dict[str, str]:
    """The THREAD_ENVIRONMENT variables that are set, with their values."""
    return {name: os.environ[name] for name in THREAD_ENVIRONMENT if name in os.environ}


def thread_environment_line() -> str:
    settings = thread_environment()
    if not settings:
        return f"thread environment: OpenMP defaults (none of {', '.join(THREAD_ENVIRONMENT)} set)"
    return "thread environment: " + ", ".join(f"{name}={value}" for name, value in settings.items())


class CpuShare:
    """How much CPU other processes took while the benchmark ran: the machine's busy time
    (/proc/stat) minus this process's own (getrusage). With more runnable threads than
    cores, every parallel region waits for a descheduled thread and small ops take whole
    scheduler time slices, so a run that shared the machine is worth less."""

    def __init__(self) -> None:
        self.start_busy = self._machine_busy_s()
        self.start_own = self._own_s()
        self.start_wall = time.perf_counter()

    @staticmethod
    def _machine_busy_s() -> Optional[float]:
        try:
            with open("/proc/stat") as f:
                values = [int(v) for v in f.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
        # guest time is already counted in user time
        return (sum(values[:8]) - idle) / os.sysconf("SC_CLK_TCK")

    @staticmethod
    def _own_s() -> float:
        if resource is None:
            return 0.0
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return usage.ru_utime + usage.ru_stime

    def report(self) -> Optional[str]:
        busy = self._machine_busy_s()
        if busy is None or self.start_busy is None or resource is None:
            return None
        others = max(0.0, (busy - self.start_busy) - (self._own_s() - self.start_own))
        available = (time.perf_counter() - self.start_wall) * (os.cpu_count() or 1)
        share = others / available if available > 0 else 0.0
        line = (f"other processes used {others:.0f} of {available:.0f} core-seconds "
                f"({100 * share:.0f}%) during the run")
        if share > 0.1:
            line += (" -- the machine was shared: times are inflated and noisy "
                     "(--threads 1 suffers least)")
        return line


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="convkit's conv2d, BatchNorm+ReLU and a training step against PyTorch.")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda[:index]")
    parser.add_argument("--quick", action="store_true",
                        help="a subset (chapter layers at batch 64, four common layers at batch 8, "
                             "five batch-norm shapes, both training steps at batch 512 and 64) with short timings, "
                             "under a minute: a smoke test")
    parser.add_argument("--tiny", action="store_true",
                        help="the quick subset on a few images, seconds long (for the test suite)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(),
                        help="CPU threads for every measurement "
                             "(default: torch's current, %(default)s)")
    parser.add_argument("--min-run-time", type=float, default=None,
                        help="seconds each timing samples for (default: 0.2 full, 0.05 quick)")
    parser.add_argument("--min-repeats", type=int, default=3,
                        help="at least this many timed calls per measurement (default 3)")
    parser.add_argument("--json", metavar="PATH", help="write every row to PATH as a JSON list")
    parser.add_argument("--plot", nargs="?", const=DEFAULT_PLOT_PATH, metavar="PATH",
                        help=f"write a bar chart of the ratios (PNG; default {DEFAULT_PLOT_PATH})")
    parser.add_argument("--markdown", metavar="PATH", help="write the tables as markdown to PATH")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random inputs (default 0)")
    args = parser.parse_args(argv)
    if args.threads < 1:
        parser.error(f"--threads must be at least 1, got {args.threads}")
    device = torch.device(args.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            parser.error("--device cuda: no CUDA device is available (torch.cuda.is_available() "
                         "is False); run on a machine with a GPU, or use --device cpu")
        missing = [op for op in CUDA_OPS
                   if not torch._C._dispatch_has_kernel_for_dispatch_key(f"convkit::{op}", "CUDA")]
        if missing:
            parser.error(f"--device cuda: this build of convkit has no CUDA kernel for "
                         f"{', '.join(missing)}; rebuild it on a machine with nvcc "
                         f"(see README: FORCE_CUDA=1)")
    elif device.type != "cpu":
        parser.error(f"--device must be cpu or cuda, got {args.device!r}")
    args.device = device
    return args


def memory_lines(rows: Sequence[Row]) -> list[str]:
    """The column buffer's largest size over the conv rows (against its budget) and the
    memory before and after the long training runs."""
    lines = []
    peaks = [row.extra["column_buffer_peak_mib"] for row in rows
             if row.section == "conv" and "column_buffer_peak_mib" in row.extra]
    if peaks:
        budget = os.environ.get("CONVKIT_COLUMN_BUDGET_MB", "64 (default)")
        lines.append(f"conv column buffer: largest {max(peaks):.2f} MiB over {len(peaks)} rows "
                     f"(budget CONVKIT_COLUMN_BUDGET_MB = {budget} MiB)")
    for row in rows:
        if "memory_steps" not in row.extra:
            continue
        steps = row.extra["memory_steps"]
        early = row.extra["memory_mib_after_20"]
        late = row.extra[f"memory_mib_after_{steps}"]
        if early is None or late is None:
            continue
        line = (f"{row.name}: memory after 20 steps {early:.1f} MiB, after {steps} "
                f"{late:.1f} MiB ({late - early:+.1f}); column buffer peak "
                f"{row.extra['column_buffer_peak_mib']:.2f} MiB")
        if row.extra.get("cpu_cache_mib") is not None:
            limit = os.environ.get("CONVKIT_CPU_CACHE_MB", "64 (default)")
            line += (f"; CPU block cache {row.extra['cpu_cache_mib']:.1f} MiB in free blocks "
                     f"(limit CONVKIT_CPU_CACHE_MB = {limit} MiB)")
        lines.append(line)
    return lines


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Runs the benchmark; returns 0, or 1 when any case failed validation."""
    args = parse_args(argv)
    config = TINY if args.tiny else QUICK if args.quick else FULL
    min_run_time = args.min_run_time if args.min_run_time is not None else config.min_run_time
    device = args.device
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    clock = Clock(device, args.threads, min_run_time, args.min_repeats)

    print(machine_line(device, args.threads))
    print(thread_environment_line())
    arguments = list(argv) if argv is not None else sys.argv[1:]
    print(f"command: {' '.join([Path(sys.argv[0]).name] + arguments)}")
    timer_name = "CUDA events" if device.type == "cuda" else "torch.utils.benchmark"
    print(f"median times in ms; {timer_name}, min_run_time {min_run_time} s per timing; "
          f"ratio = convkit / PyTorch (< 1: convkit faster)")
    im2col_text = "cuDNN off" if device.type == "cuda" else "oneDNN and NNPACK off: slow_conv2d"
    print(f"torch = F.conv2d default backend; im2col = F.conv2d with {im2col_text}")
    started = time.perf_counter()
    cpu_share = CpuShare()

    sections: list[tuple[str, str, list[Row]]] = []

    def run_section(key: str, unit: str, produce: Callable[[], Iterator[Row]]) -> None:
        title = SECTION_TITLES[key]
        im2col = key != "batchnorm_relu"
        print(f"\n== {title}")
        print_text_row(table_header(unit, im2col))
        section_started = time.perf_counter()
        rows = []
        for row in produce():
            print_row(row, im2col)
            rows.append(row)
        print(f"({time.perf_counter() - section_started:.0f} s)")
        sections.append((title, unit, rows))

    def chapter_rows() -> Iterator[Row]:
        for batch in config.chapter_batches:
            for case in chapter_conv_cases(batch):
                yield from bench_conv_case(case, "conv", device, clock)

    def common_rows() -> Iterator[Row]:
        for case in common_conv_cases(config.common_batch, config.common_layers):
            yield from bench_conv_case(case, "conv", device, clock)

    copy_gbps = copy_bandwidth_gbps(config.copy_mib, device, clock)

    def bn_rows() -> Iterator[Row]:
        for case in batch_norm_cases(config):
            yield from bench_batch_norm_case(case, device, clock, copy_gbps)

    def training_rows() -> Iterator[Row]:
        for batch in config.training_batches:
            for bn in (True, False):
                yield bench_training_step(bn, batch, device, clock)

    run_section("conv chapter", "GFLOP/s", chapter_rows)
    run_section("conv common", "GFLOP/s", common_rows)
    print(f"\ncopy bandwidth (dst.copy_(src), {config.copy_mib} MiB, read + write): "
          f"{copy_gbps:.1f} GB/s")
    run_section("batchnorm_relu", "GB/s", bn_rows)
    run_section("training_step", "img/s", training_rows)

    elapsed = time.perf_counter() - started
    rows = [row for _, _, section_rows in sections for row in section_rows]
    failed = [row for row in rows if not row.passed]
    print(f"\n{len(rows)} rows in {elapsed:.0f} s; copy bandwidth {copy_gbps:.1f} GB/s")
    share_line = cpu_share.report()
    if share_line:
        print(share_line)
    for line in memory_lines(rows):
        print(line)

    common = {"device": str(device), "threads": args.threads, "dtype": "float32",
              "thread_environment": thread_environment()}
    if args.json:
        records = [{**row.to_json(), **common} for row in rows]
        Path(args.json).write_text(json.dumps(records, indent=1) + "\n")
        print(f"wrote {args.json}")
    if args.markdown:
        Path(args.markdown).write_text(markdown_tables(sections))
        print(f"wrote {args.markdown}")
    if args.plot:
        plot_ratios(rows, args.plot, machine_line(device, args.threads))
        print(f"wrote {args.plot}")
    if failed:
        print(f"\n{len(failed)} row(s) FAILED validation and were not timed:", file=sys.stderr)
        for row in failed:
            print(f"  {row.name}: {row.error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
