"""benchmarks/conv_bench.py runs end to end on a tiny configuration and reports what it
promises: JSON rows with the documented keys, every row validated, ratios that are the
quotient of the times, a non-empty PNG; a wrong kernel is reported and not timed. No timing
assertions: the numbers on a shared test machine mean nothing."""
from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

import convkit

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "conv_bench.py"
REQUIRED_KEYS = {"name", "shape", "pass", "ms_convkit", "ms_torch", "ms_torch_im2col", "ratio"}


def load_bench() -> ModuleType:
    """The script as a module (benchmarks/ is not a package)."""
    spec = importlib.util.spec_from_file_location("conv_bench", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    # dataclasses look their module up in sys.modules while the class is being made.
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def keep_threads():
    """main() sets torch's thread count; give the rest of the suite its own back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_quick_tiny_run_writes_json_and_plot(tmp_path):
    pytest.importorskip("matplotlib")
    json_path = tmp_path / "bench.json"
    png_path = tmp_path / "bench.png"
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--tiny", "--min-run-time", "0.001",
         # One thread: with other jobs on the machine, two spinning threads slow to a crawl.
         "--threads", "1", "--json", str(json_path), "--plot", str(png_path)],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
        # libgomp's own default, given explicitly: the run records it.
        env={**os.environ, "GOMP_SPINCOUNT": "300000"},
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "threads" in result.stdout  # the thread count is printed with the machine line
    assert "thread environment: " in result.stdout and "GOMP_SPINCOUNT=300000" in result.stdout

    rows = json.loads(json_path.read_text())
    assert isinstance(rows, list) and rows
    sections = {row["section"] for row in rows}
    assert sections == {"conv", "batchnorm_relu", "training_step"}
    for row in rows:
        assert REQUIRED_KEYS <= row.keys(), row
        assert row["thread_environment"]["GOMP_SPINCOUNT"] == "300000", row
        assert row["pass"] is True, row
        assert row["ms_convkit"] > 0 and row["ms_torch"] > 0, row
        assert math.isclose(row["ratio"], row["ms_convkit"] / row["ms_torch"], rel_tol=1e-12)
        if row["section"] == "batchnorm_relu":
            assert row["ms_torch_im2col"] is None
            assert row["gbps_copy"] > 0
        else:
            assert row["ms_torch_im2col"] > 0, row
    conv_rows = [row for row in rows if row["section"] == "conv"]
    # The im2col baseline really is PyTorch's slow_conv2d, not oneDNN or NNPACK.
    im2col_backends = {row["torch_im2col_backend"] for row in conv_rows}
    assert im2col_backends <= {"Slow2d", "SlowDilated2d", "unknown"}
    assert {row["direction"] for row in conv_rows} == {"forward", "backward", "forward+backward"}
    assert png_path.stat().st_size > 0
    assert png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_wrong_conv_is_reported_and_not_timed(monkeypatch):
    bench = load_bench()

    def off_by_a_little(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
        right = torch.nn.functional.conv2d(input, weight, bias, stride, padding, dilation, groups)
        return right * 1.001

    monkeypatch.setattr(convkit, "conv2d", off_by_a_little)
    case = bench.ConvCase("tiny", 2, 3, 4, 8, 8, 3, padding=1, bias=True)
    clock = bench.Clock(torch.device("cpu"), torch.get_num_threads(), min_run_time=0.001)
    rows = bench.bench_conv_case(case, "conv", torch.device("cpu"), clock)
    assert len(rows) == 3
    for row in rows:
        assert row.passed is False
        assert "output" in row.error
        assert row.ms_convkit is None and row.ms_torch is None and row.ms_torch_im2col is None
        assert row.to_json()["ratio"] is None


def test_failed_validation_makes_main_exit_nonzero(monkeypatch, tmp_path, keep_threads):
    bench = load_bench()

    def no_relu(input, running_mean, running_var, weight=None, bias=None, training=False,
                momentum=0.1, eps=1e-5):
        return convkit.batch_norm(
            input, running_mean, running_var, weight, bias, training, momentum, eps
        )

    monkeypatch.setattr(convkit, "batch_norm_relu", no_relu)
    json_path = tmp_path / "bench.json"
    status = bench.main(
        ["--tiny", "--min-run-time", "0.001", "--threads", "1", "--json", str(json_path)]
    )
    assert status == 1
    rows = json.loads(json_path.read_text())
    failed = [row for row in rows if not row["pass"]]
    assert failed and all(row["section"] == "batchnorm_relu" for row in failed)
    assert all(row["ms_convkit"] is None and row["ms_torch"] is None for row in failed)


def test_cuda_without_a_gpu_is_a_clear_error(capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    bench = load_bench()
    with pytest.raises(SystemExit) as exit_info:
        bench.parse_args(["--device", "cuda"])
    assert exit_info.value.code != 0
    assert "no CUDA device is available" in capsys.readouterr().err
