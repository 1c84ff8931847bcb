"""convkit against PyTorch, side by side, in one run.

What it measures (float32, on the CPU or with ``--device cuda`` on a GPU):
  * conv2d forward, backward (input, weight and bias gradients) and forward+backward, for
    the five convolutions of fastai's chapter-13 MNIST CNN at batch 64 and 512 and for a set
    of common layers (ResNet-18's 3x3 and 1x1 convolutions at batch 32, a depthwise 3x3, a
    1x1, a dilated 3x3). Each is timed three ways: convkit, ``F.conv2d`` with PyTorch's
    default backend (oneDNN on the CPU, cuDNN on CUDA) and ``F.conv2d`` forced onto
    PyTorch's own im2col + GEMM path (oneDNN and NNPACK off on the CPU, cuDNN off on CUDA),
    the classic baseline our kernel is built like.
  * BatchNorm+activation (training forward, backward, eval forward): convkit's fused kernel
    against ``F.batch_norm`` followed by ``F.relu``, on the chapter's activation shapes and
    on ResNet-sized ones, then ReLU6, LeakyReLU, SiLU and Hardswish on a MobileNet-sized map,
    with a plain copy's bandwidth alongside to read the GB/s against.
  * One training step (forward, cross-entropy, backward, Adam step) of the chapter's CNN at
    batch 512, with and without batchnorm: ``convkit.nn.convert(model)`` against the torch
    model it was converted from.
  * The same training step on the CPU kernels of each other instruction set this CPU runs
    (convkit's avx2 and default builds of csrc/cpu/ on an AVX-512 machine), against the same
    oneDNN layers: what a user on an older CPU gets.
  * Real models: torchvision's ResNet-18 (batch 32 at 64x64, batch 8 at 224x224) and
    MobileNetV2 (batch 32 at 64x64), an SGD training step and an eval forward, convkit.nn.convert
    against the torch model (``--no-models`` leaves them out; needs torchvision).
  * On the CPU, what synchronising batch norm costs: convkit's SyncBatchNormReLU2d training
    step on 2 gloo processes (one thread each) against the local fused kernel on the same
    per-process batch (``--no-distributed`` leaves it out).

How: every case is first checked against PyTorch (our float32 error against a float64
reference at most a few times PyTorch's own); a case that fails is reported and not timed,
and the script exits non-zero. Times are medians: ``torch.utils.benchmark.Timer``
(``blocked_autorange``, thread count fixed and printed) on the CPU, CUDA events after a
warm-up on the GPU. Every row gives the times, GFLOP/s (conv), GB/s (batch norm) or
images/s (training), and the ratio convkit / PyTorch (below 1: convkit is faster).

    python benchmarks/conv_bench.py [--device cpu|cuda] [--quick] [--threads N]
                                    [--json PATH] [--plot [PATH]] [--markdown PATH]

This file is the command line; beside it, bench_cases.py holds what is measured,
bench_measure.py the validation and the timed callables of each case, bench_timing.py the
clock and the machine's description, bench_report.py the tables, JSON, markdown and plot,
bench_distributed.py the synchronised batch norm on 2 processes, bench_models.py the
torchvision models.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

import torch

# benchmarks/ is a folder of scripts, not a package, so the modules beside this one are
# imported by name. Python puts a script's own folder on sys.path, but not when the file is
# loaded by its path (tests/test_bench.py does), hence this.
_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

from bench_cases import (  # noqa: E402
    FULL, QUICK, TINY, batch_norm_cases, chapter_conv_cases, common_conv_cases)
from bench_measure import (  # noqa: E402
    bench_batch_norm_case, bench_conv_case, bench_training_step, copy_bandwidth_gbps)
import convkit  # noqa: E402  (after bench_measure, which finds a checkout's in-place build)
from bench_distributed import bench_sync_batch_norm  # noqa: E402
from bench_models import (  # noqa: E402
    FULL_MODELS, QUICK_MODELS, TINY_MODELS, bench_model_case, torchvision_missing)
from bench_report import (  # noqa: E402
    SECTION_TITLES, markdown_tables, memory_lines, plot_ratios, print_row, print_text_row,
    table_header, write_json)
from bench_timing import (  # noqa: E402
    Clock, CpuShare, Row, ignore_onednn_tf32_warning, machine_line, thread_environment_line)

ignore_onednn_tf32_warning()

DEFAULT_PLOT_PATH = "conv_bench.png"
# The ops a CUDA run goes through; each needs a CUDA kernel in the build.
CUDA_OPS = ("conv2d_forward", "conv2d_backward", "batch_norm_forward", "batch_norm_backward",
            "batch_norm_update_stats")


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="convkit's conv2d, BatchNorm+activation and a training step against PyTorch.")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda[:index]")
    parser.add_argument("--quick", action="store_true",
                        help="a subset (chapter layers at batch 64, four common layers at batch 8, "
                             "seven batch-norm shapes, both training steps at batch 512 and 64) with short timings, "
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
    parser.add_argument("--no-models", action="store_true",
                        help="leave out the torchvision models (ResNet-18, MobileNetV2)")
    parser.add_argument("--no-distributed", action="store_true",
                        help="leave out the synchronised batch norm on 2 gloo processes")
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
    print(f"convkit CPU kernels: {convkit.cpu_capability()} (this CPU runs "
          f"{', '.join(convkit.cpu_capabilities())}; CONVKIT_CPU_CAPABILITY picks)")
    started = time.perf_counter()
    cpu_share = CpuShare()

    sections: list[tuple[str, str, list[Row]]] = []

    def run_section(key: str, unit: str, produce: Callable[[], Iterator[Row]]) -> None:
        title = SECTION_TITLES[key]
        im2col = key not in ("batchnorm_act", "sync_bn", "models")
        print(f"\n== {title}")
        print_text_row(table_header(unit, im2col, title))
        section_started = time.perf_counter()
        rows = []
        for row in produce():
            if device.type == "cpu":
                row.extra.setdefault("cpu_capability", convkit.cpu_capability())
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

    def capability_rows() -> Iterator[Row]:
        in_use = convkit.cpu_capability()
        try:
            for capability in convkit.cpu_capabilities():
                if capability == in_use:
                    continue
                convkit.set_cpu_capability(capability)
                for bn in (True, False):
                    row = bench_training_step(bn, config.training_batches[0], device, clock,
                                              memory=False)
                    row.name = f"{row.name} [{capability}]"
                    row.extra["cpu_capability"] = capability
                    yield row
        finally:
            convkit.set_cpu_capability(in_use)

    run_section("conv chapter", "GFLOP/s", chapter_rows)
    run_section("conv common", "GFLOP/s", common_rows)
    print(f"\ncopy bandwidth (dst.copy_(src), {config.copy_mib} MiB, read + write): "
          f"{copy_gbps:.1f} GB/s")
    run_section("batchnorm_act", "GB/s", bn_rows)
    run_section("training_step", "img/s", training_rows)
    if device.type == "cpu" and len(convkit.cpu_capabilities()) > 1:
        run_section("capabilities", "img/s", capability_rows)
    if not args.no_models:
        missing = torchvision_missing()
        if missing:
            print(f"\n== {SECTION_TITLES['models']}: left out, {missing}")
        else:
            cases = TINY_MODELS if args.tiny else QUICK_MODELS if args.quick else FULL_MODELS
            run_section("models", "img/s", lambda: (
                row for name, batch, size, memory_format in cases
                for row in bench_model_case(name, batch, size, device, clock, memory_format)))
    if device.type == "cpu" and not args.no_distributed:
        run_section("sync_bn", "GB/s",
                    lambda: iter(bench_sync_batch_norm(args.quick, args.tiny, min_run_time)))

    elapsed = time.perf_counter() - started
    rows = [row for _, _, section_rows in sections for row in section_rows]
    failed = [row for row in rows if not row.passed]
    print(f"\n{len(rows)} rows in {elapsed:.0f} s; copy bandwidth {copy_gbps:.1f} GB/s")
    share_line = cpu_share.report()
    if share_line:
        print(share_line)
    for line in memory_lines(rows):
        print(line)

    if args.json:
        write_json(args.json, rows, device, args.threads)
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
