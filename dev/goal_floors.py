"""Floors of the CPU goals of issue 6 that compare one whole autograd call with PyTorch's:
how fast each row could be at best on this machine, and whether its goal lies above that
floor.

The goals checked, each measured with the benchmark's own callables and clock
(benchmarks/bench_measure.py, bench_timing.py):
  2b  a chapter conv layer's forward+backward, as in training, at most 1/5 of the time of
      PyTorch's im2col path (F.conv2d with oneDNN and NNPACK off: slow_conv2d);
  3a  fused BatchNorm+ReLU, training forward+backward, at most 1/2 of the time of
      F.batch_norm followed by F.relu.

Part of every such call does not grow with the batch: Python, the dispatcher, autograd's
graph and engine, the ops' set-up. For each row the script measures, side by side:
  convkit, reference   the row itself, and the goal's PyTorch reference;
  allowed              reference / 5 (2b) or reference / 2 (3a);
  fixed                convkit's time for the same layer on one image (conv) or on a
                       [2, C, 2, 2] input (batch norm), through the same harness: that part,
                       with almost no arithmetic (PyTorch's own is printed beside it);
  work                 what the rest of the batch adds: FLOPs of the products (three
                       forwards' worth; two for the first layer, whose input needs no
                       gradient), or bytes of the 8 tensor passes of the fused kernels (read x
                       twice and write y; read x and dy twice and write dx);
  best                 the fastest this machine was seen doing that work in the run: GFLOP/s
                       of a large torch.mm (MKL's GEMM at its best shape) or of the fastest
                       convkit conv row, whichever is higher; for batch norm the highest GB/s
                       of torch's copy and sum of a tensor of the row's size (cache-resident,
                       as the row's is) and of the row itself;
  floor                fixed + work / best.
A row whose floor is above what the goal allows cannot meet it behind this harness: the fixed
part is measured where its code and data are hot (at full size it only grows), and the
work would have to run faster than anything measured doing such work on this machine.
"needs" is the rate the work would have to run at to meet the goal, and "convkit now" the rate
it runs at in the row (its time less the fixed part), both as shares of the best.

    python dev/goal_floors.py [--threads N] [--batches 64,512] [--json PATH]

A development tool (dev/): the bookkeeping of issue 6's goals, not part of the user-facing
benchmarks/.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F

# The benchmark's modules live in benchmarks/, beside this folder (neither is a package).
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import bench_cases as cases  # noqa: E402
import bench_measure as measure  # noqa: E402
import bench_timing as timing  # noqa: E402

convkit = measure.convkit
timing.ignore_onednn_tf32_warning()

GOAL_2B_FACTOR = 5.0  # >= 5x faster than the im2col path
GOAL_3A_FACTOR = 2.0  # >= 2x faster than F.batch_norm + F.relu
# Fused BatchNorm+ReLU, training forward+backward: tensor passes (see bench_cases).
BN_PASSES = cases.BN_TENSOR_PASSES["train forward+backward"]
# The tiny batch-norm call that gives the fixed part: two images (training needs more than
# one value per channel), 2x2 planes.
BN_TINY_BATCH, BN_TINY_SIZE = 2, 2


@dataclasses.dataclass
class FloorRow:
    """One row: times in ms, work in GFLOP or GB, rates in GFLOP/s or GB/s."""

    goal: str
    name: str
    shape: str
    ms_convkit: float
    ms_reference: float
    allowed_ms: float
    fixed_ms: float
    fixed_reference_ms: float
    work: float
    work_unit: str
    best_rate: float
    rate_unit: str

    @property
    def floor_ms(self) -> float:
        return self.fixed_ms + self.work / self.best_rate * 1e3

    @property
    def needed_share(self) -> Optional[float]:
        """The rate the work must run at to meet the goal, as a share of the best rate; None
        when the fixed part alone takes all the goal allows."""
        budget_ms = self.allowed_ms - self.fixed_ms
        if budget_ms <= 0:
            return None
        return self.work / (budget_ms * 1e-3) / self.best_rate

    @property
    def current_share(self) -> Optional[float]:
        """The rate convkit's call runs the work at now (its time less the fixed part), as a
        share of the best rate; None when noise put the row below its fixed part."""
        work_ms = self.ms_convkit - self.fixed_ms
        if work_ms <= 0:
            return None
        return self.work / (work_ms * 1e-3) / self.best_rate

    @property
    def verdict(self) -> str:
        if self.ms_convkit <= self.allowed_ms:
            return "met"
        if self.floor_ms > self.allowed_ms:
            return "out of reach"
        return "reachable"

    def to_json(self) -> dict:
        record = dataclasses.asdict(self)
        record.update(floor_ms=self.floor_ms, needed_share=self.needed_share,
                      current_share=self.current_share, verdict=self.verdict)
        return record


def gemm_gflops(clock: timing.Clock, sizes: Sequence[int]) -> float:
    """The best GFLOP/s of torch.mm on square float matrices of the given sizes."""
    best = 0.0
    for size in sizes:
        a, b = torch.randn(size, size), torch.randn(size, size)
        out = torch.empty(size, size)
        ms = clock.median_ms(lambda: torch.mm(a, b, out=out))
        best = max(best, 2.0 * size**3 / (ms * 1e-3) / 1e9)
    return best


def conv_floor_row(case: cases.ConvCase, clock: timing.Clock, best_gflops: float) -> FloorRow:
    """Goal 2b for one chapter layer: the row and its one-image twin, ours and slow_conv2d."""
    device = torch.device("cpu")
    tiny_case = dataclasses.replace(case, batch=1)
    fns = []
    for each in (case, tiny_case):
        x, w, b, dy = measure._conv_tensors(each, device)
        error = measure.validate_conv(each, x, w, b, dy)
        if error is not None:
            raise RuntimeError(f"{each.label}: convkit's result is wrong ({error}); not timed")
        ours = measure._conv_timed_fn("forward+backward", convkit.conv2d, each, x, w, b, dy)
        with timing.im2col_backend(device):
            im2col = measure._conv_timed_fn("forward+backward", F.conv2d, each, x, w, b, dy)
        fns += [ours, timing._inside_im2col_backend(device, im2col)]
    ours_ms, im2col_ms, tiny_ours_ms, tiny_im2col_ms = clock.compare(fns)
    forwards = 3 if case.input_grad else 2
    work_gflop = case.forward_flops() * forwards * (case.batch - 1) / case.batch / 1e9
    return FloorRow("2b", case.label, case.describe(), ours_ms, im2col_ms,
                    im2col_ms / GOAL_2B_FACTOR, tiny_ours_ms, tiny_im2col_ms, work_gflop,
                    "GFLOP", best_gflops, "GFLOP/s")


def _pass_gbps(bytes_moved: float, ms: float, tiny_ms: float) -> float:
    """GB/s of a pass from its time less the time of the same call on a tiny tensor (0 when
    noise made the difference vanish)."""
    extra_ms = ms - tiny_ms
    return bytes_moved / (extra_ms * 1e-3) / 1e9 if extra_ms > 0 else 0.0


def batch_norm_floor_row(case: cases.BatchNormCase, clock: timing.Clock) -> FloorRow:
    """Goal 3a for one activation shape: the row and its tiny twin, ours and PyTorch's pair,
    and a copy and a sum of tensors of both sizes for the best rate."""
    device = torch.device("cpu")
    channels = case.shape[1]
    tiny_case = cases.BatchNormCase(case.label + " (tiny)",
                                    (BN_TINY_BATCH, channels, BN_TINY_SIZE, BN_TINY_SIZE))
    fns: list[Callable[[], object]] = []
    sources = []
    for each in (case, tiny_case):
        t = measure._bn_tensors(each, device)
        error = measure.validate_batch_norm(t, "relu")
        if error is not None:
            raise RuntimeError(f"{each.label}: convkit's result is wrong ({error}); not timed")
        fns += [measure._bn_timed_fn("train forward+backward", measure._convkit_batch_norm("relu"), t),
                measure._bn_timed_fn("train forward+backward", measure._torch_batch_norm("relu"), t)]
        sources.append(t["x"])
    copies = [torch.empty_like(source) for source in sources]
    for source, copy in zip(sources, copies):
        fns += [lambda source=source, copy=copy: copy.copy_(source),
                lambda source=source: torch.sum(source)]
    (ours_ms, pair_ms, tiny_ours_ms, tiny_pair_ms,
     copy_ms, sum_ms, tiny_copy_ms, tiny_sum_ms) = clock.compare(fns)
    extra_bytes = (sources[0].numel() - sources[1].numel()) * sources[0].element_size()
    best_gbps = max(_pass_gbps(2 * extra_bytes, copy_ms, tiny_copy_ms),
                    _pass_gbps(extra_bytes, sum_ms, tiny_sum_ms))
    if best_gbps == 0.0:
        raise RuntimeError(f"{case.label}: a copy of the row's tensor took no longer than a tiny "
                           "one; the machine is too noisy to measure a rate, run again")
    return FloorRow("3a", f"bn+relu train fwd+bwd {case.label}", case.describe(), ours_ms,
                    pair_ms, pair_ms / GOAL_3A_FACTOR, tiny_ours_ms, tiny_pair_ms,
                    BN_PASSES * extra_bytes / 1e9, "GB", best_gbps, "GB/s")


def raise_best_rates(rows: Sequence[FloorRow]) -> float:
    """Makes each row's best rate at least the rate convkit's own calls reached, so that
    "best" bounds every rate measured in the run: for the conv rows the fastest of any conv
    row (FLOP rates do not depend on the tensor's size), for a batch-norm row its own (its
    copy and sum were of its size). Returns the conv rows' best rate."""
    conv_rows = [row for row in rows if row.goal == "2b"]
    conv_best = max([row.best_rate for row in conv_rows] +
                    [row.current_share * row.best_rate for row in conv_rows
                     if row.current_share is not None], default=0.0)
    for row in conv_rows:
        row.best_rate = conv_best
    for row in rows:
        if row.goal == "3a" and row.current_share is not None and row.current_share > 1.0:
            row.best_rate *= row.current_share
    return conv_best


def format_table(rows: Sequence[FloorRow]) -> str:
    """The rows as a markdown table (ms, work in MFLOP or MB)."""
    header = ["goal", "row", "convkit", "reference", "allowed", "fixed (ours; PyTorch's)",
              "work", "best rate", "floor", "needs", "convkit now", "verdict"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        share = row.needed_share
        needs = "all taken by fixed" if share is None else f"{100 * share:.0f}% of best"
        now = "-" if row.current_share is None else f"{100 * row.current_share:.0f}% of best"
        work_unit = "MFLOP" if row.work_unit == "GFLOP" else "MB"
        cells = [row.goal, row.name, f"{row.ms_convkit:.3f}", f"{row.ms_reference:.3f}",
                 f"{row.allowed_ms:.3f}", f"{row.fixed_ms:.3f}; {row.fixed_reference_ms:.3f}",
                 f"{row.work * 1e3:.2f} {work_unit}", f"{row.best_rate:.0f} {row.rate_unit}",
                 f"{row.floor_ms:.3f}", needs, now, row.verdict]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Floors of issue 6's goals 2b and 3a: fixed cost + work at the best rate.")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(),
                        help="CPU threads for every measurement (default: torch's, %(default)s)")
    parser.add_argument("--batches", default="64,512",
                        help="batch sizes of the chapter rows, comma-separated (default 64,512)")
    parser.add_argument("--min-run-time", type=float, default=0.3,
                        help="seconds each timing samples for (default 0.3)")
    parser.add_argument("--gemm-sizes", default="1024,2048",
                        help="sizes of the square torch.mm whose best GFLOP/s bounds the conv "
                             "rows (default 1024,2048)")
    parser.add_argument("--json", metavar="PATH", help="write the rows to PATH as a JSON list")
    args = parser.parse_args(argv)
    if args.threads < 1:
        parser.error(f"--threads must be at least 1, got {args.threads}")
    try:
        args.batches = [int(b) for b in args.batches.split(",")]
        args.gemm_sizes = [int(s) for s in args.gemm_sizes.split(",")]
    except ValueError:
        parser.error(f"--batches and --gemm-sizes take comma-separated integers, got "
                     f"{args.batches!r} and {args.gemm_sizes!r}")
    if any(b < BN_TINY_BATCH + 1 for b in args.batches):
        parser.error(f"--batches must be at least {BN_TINY_BATCH + 1}, got {args.batches}")
    if any(s < 1 for s in args.gemm_sizes):
        parser.error(f"--gemm-sizes must be positive, got {args.gemm_sizes}")
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    clock = timing.Clock(torch.device("cpu"), args.threads, args.min_run_time)
    print(timing.machine_line(torch.device("cpu"), args.threads))
    print(timing.thread_environment_line())
    best_gflops = gemm_gflops(clock, args.gemm_sizes)
    print(f"best GEMM rate: torch.mm on {args.gemm_sizes} square float matrices, "
          f"{best_gflops:.0f} GFLOP/s")
    print("ms, medians side by side; fixed = the same call on one image (conv) or "
          f"[{BN_TINY_BATCH}, C, {BN_TINY_SIZE}, {BN_TINY_SIZE}] (batch norm)\n")
    rows: list[FloorRow] = []
    for batch in args.batches:
        for case in cases.chapter_conv_cases(batch):
            rows.append(conv_floor_row(case, clock, best_gflops))
    # The benchmark's chapter batch-norm cases at these batches, without its ResNet-sized ones.
    chapter_only = dataclasses.replace(cases.FULL, bn_chapter_batches=tuple(args.batches),
                                       bn_large_channels=(), bn_other_activations=())
    for case in cases.batch_norm_cases(chapter_only):
        rows.append(batch_norm_floor_row(case, clock))
    conv_best = raise_best_rates(rows)
    if conv_best > best_gflops:
        print(f"best conv rate raised to {conv_best:.0f} GFLOP/s, the fastest a convkit row ran "
              "its work at in this run")
    print(format_table(rows))
    counts = []
    for verdict in ("met", "reachable", "out of reach"):
        count = sum(row.verdict == verdict for row in rows)
        counts.append(f"{count} {verdict}")
    print("\n" + ", ".join(counts))
    if args.json:
        Path(args.json).write_text(json.dumps([row.to_json() for row in rows], indent=1) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
