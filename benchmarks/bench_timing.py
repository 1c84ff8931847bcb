"""How the benchmark times and what it records: the clock (interleaved rounds on the CPU, CUDA
events on a GPU), the switch to PyTorch's im2col baseline, the machine and thread-environment
lines, the CPU share other processes took, and Row, one timed result."""
from __future__ import annotations

import contextlib
import os
import platform
import statistics
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
from torch.utils import benchmark

try:
    import resource  # Unix only: our own CPU time, to tell how much other processes took
except ImportError:  # pragma: no cover
    resource = None


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


def ignore_onednn_tf32_warning() -> None:
    """Silences the warning that entering torch.backends.mkldnn.flags() (im2col_backend does)
    gives on every entry on builds without Intel GPU support: it resets oneDNN's TF32
    setting, which is irrelevant to float32 on CPUs. A process-wide filter, so the scripts
    set it, not this module's import."""
    warnings.filterwarnings("ignore", message=".*TF32 acceleration on top of oneDNN.*")


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
