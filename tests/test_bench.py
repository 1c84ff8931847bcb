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
from convkit.experiments import models

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS = ROOT / "benchmarks"
SCRIPT = BENCHMARKS / "conv_bench.py"
REQUIRED_KEYS = {"name", "shape", "pass", "ms_convkit", "ms_torch", "ms_torch_im2col", "ratio"}


def load_script(name: str, path: Path) -> ModuleType:
    """A script of benchmarks/ as a module (benchmarks/ is not a package)."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    # dataclasses look their module up in sys.modules while the class is being made.
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def load_bench() -> ModuleType:
    return load_script("conv_bench", SCRIPT)


def bench_module(name: str) -> ModuleType:
    """One of the modules conv_bench.py imports from beside it (bench_cases, bench_measure,
    bench_timing), the instance the script uses: the script is loaded first, which puts
    benchmarks/ on sys.path and sets the warning filter a run has."""
    load_bench()
    return importlib.import_module(name)


def conv2d_off_by_a_little(input, weight, bias=None, stride=1, padding=0, dilation=1,
                           groups=1):
    """F.conv2d's result made 0.1% too large: a wrong kernel the checks must catch."""
    right = torch.nn.functional.conv2d(input, weight, bias, stride, padding, dilation, groups)
    return right * 1.001


@pytest.fixture
def keep_threads():
    """main() sets torch's thread count; give the rest of the suite its own back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.mark.slow
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
    assert sections == {"conv", "batchnorm_act", "training_step", "models", "sync_bn"}
    for row in rows:
        assert REQUIRED_KEYS <= row.keys(), row
        assert row["thread_environment"]["GOMP_SPINCOUNT"] == "300000", row
        assert row["pass"] is True, row
        assert row["ms_convkit"] > 0 and row["ms_torch"] > 0, row
        assert math.isclose(row["ratio"], row["ms_convkit"] / row["ms_torch"], rel_tol=1e-12)
        if row["section"] == "batchnorm_act":
            assert row["ms_torch_im2col"] is None
            assert row["gbps_copy"] > 0
        elif row["section"] == "models":
            assert row["ms_torch_im2col"] is None and row["model"] == "resnet18"
        elif row["section"] == "sync_bn":
            # The synchronised step on 2 processes against the local kernel.
            assert row["ms_torch_im2col"] is None and row["processes"] == 2
        else:
            assert row["ms_torch_im2col"] > 0, row
    # Every row says which CPU kernels convkit ran; the training step again on each other
    # capability this CPU runs.
    assert {row["cpu_capability"] for row in rows} == set(convkit.cpu_capabilities())
    others = [row["cpu_capability"] for row in rows
              if row["cpu_capability"] != convkit.cpu_capability()]
    assert sorted(others) == sorted(2 * convkit.cpu_capabilities()[1:])
    conv_rows = [row for row in rows if row["section"] == "conv"]
    # The im2col baseline really is PyTorch's slow_conv2d, not oneDNN or NNPACK.
    im2col_backends = {row["torch_im2col_backend"] for row in conv_rows}
    assert im2col_backends <= {"Slow2d", "SlowDilated2d", "unknown"}
    assert {row["direction"] for row in conv_rows} == {"forward", "backward", "forward+backward"}
    assert png_path.stat().st_size > 0
    assert png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_wrong_conv_is_reported_and_not_timed(monkeypatch):
    cases, measure, timing = (bench_module(name)
                              for name in ("bench_cases", "bench_measure", "bench_timing"))

    monkeypatch.setattr(convkit, "conv2d", conv2d_off_by_a_little)
    case = cases.ConvCase("tiny", 2, 3, 4, 8, 8, 3, padding=1, bias=True)
    clock = timing.Clock(torch.device("cpu"), torch.get_num_threads(), min_run_time=0.001)
    rows = measure.bench_conv_case(case, "conv", torch.device("cpu"), clock)
    assert len(rows) == 3
    for row in rows:
        assert row.passed is False
        assert "output" in row.error
        assert row.ms_convkit is None and row.ms_torch is None and row.ms_torch_im2col is None
        assert row.to_json()["ratio"] is None


@pytest.mark.slow
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
        ["--tiny", "--min-run-time", "0.001", "--threads", "1", "--no-distributed",
         "--no-models", "--json", str(json_path)]
    )
    assert status == 1
    rows = json.loads(json_path.read_text())
    failed = [row for row in rows if not row["pass"]]
    assert failed and all(row["section"] == "batchnorm_act" for row in failed)
    assert all(row["ms_convkit"] is None and row["ms_torch"] is None for row in failed)


def test_cuda_without_a_gpu_is_a_clear_error(capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    bench = load_bench()
    with pytest.raises(SystemExit) as exit_info:
        bench.parse_args(["--device", "cuda"])
    assert exit_info.value.code != 0
    assert "no CUDA device is available" in capsys.readouterr().err


def test_the_training_step_times_the_chapters_own_cnn():
    # One definition of the chapter's CNN: the one the experiments train.
    assert bench_module("bench_measure").simple_cnn is models.simple_cnn


# ------------------------------------------------------------------------- dev/goal_floors.py

FLOORS_SCRIPT = ROOT / "dev" / "goal_floors.py"


def load_floors() -> ModuleType:
    """dev/goal_floors.py, which imports conv_bench from benchmarks/."""
    return load_script("goal_floors", FLOORS_SCRIPT)


def test_goal_floors_uses_the_benchmarks_modules():
    # dev/ holds no copy of the benchmark's code: the floors are measured with benchmarks/' own.
    floors = load_floors()
    for module in (floors.cases, floors.measure, floors.timing):
        assert Path(module.__file__).resolve().parent == BENCHMARKS.resolve()
    assert not list((ROOT / "dev").glob("*bench*.py"))
    assert not (BENCHMARKS / "goal_floors.py").exists()


@pytest.mark.slow
def test_goal_floors_run_gives_consistent_rows(tmp_path):
    json_path = tmp_path / "floors.json"
    result = subprocess.run(
        [sys.executable, str(FLOORS_SCRIPT), "--batches", "32", "--min-run-time", "0.02",
         "--gemm-sizes", "64", "--threads", "1", "--json", str(json_path)],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "| goal | row |" in result.stdout
    rows = json.loads(json_path.read_text())
    cases = {case.label: case for case in bench_module("bench_cases").chapter_conv_cases(32)}
    assert [row["goal"] for row in rows] == ["2b"] * 5 + ["3a"] * 4
    for row in rows:
        factor = 5.0 if row["goal"] == "2b" else 2.0
        assert math.isclose(row["allowed_ms"], row["ms_reference"] / factor, rel_tol=1e-12)
        assert row["best_rate"] > 0 and row["fixed_ms"] > 0 and row["work"] > 0
        floor = row["fixed_ms"] + row["work"] / row["best_rate"] * 1e3
        assert math.isclose(row["floor_ms"], floor, rel_tol=1e-12)
        if row["ms_convkit"] <= row["allowed_ms"]:
            assert row["verdict"] == "met"
        else:
            assert row["verdict"] == ("out of reach" if floor > row["allowed_ms"] else "reachable")
        if row["goal"] == "2b":
            case = cases[row["name"]]
            forwards = 3 if case.input_grad else 2
            work = case.forward_flops() * forwards * 31 / 32 / 1e9
            assert math.isclose(row["work"], work, rel_tol=1e-12)
        else:
            n, c, h, w = (int(v) for v in row["shape"].strip("[]").split(","))
            extra_bytes = (n * c * h * w - 2 * c * 2 * 2) * 4
            assert math.isclose(row["work"], 8 * extra_bytes / 1e9, rel_tol=1e-12)


def test_goal_floors_verdicts_and_shares():
    floors = load_floors()

    def row(ours: float, allowed: float, fixed: float, work: float, best: float):
        return floors.FloorRow("2b", "r", "[1]", ours, allowed * 5, allowed, fixed, fixed,
                               work, "GFLOP", best, "GFLOP/s")

    met = row(ours=0.1, allowed=0.2, fixed=0.05, work=0.01, best=100.0)
    assert met.verdict == "met"
    # floor = 0.05 + 0.01 / 100 s = 0.15 ms <= 0.2: reachable, at 0.01 GFLOP / 0.15 ms.
    reachable = row(ours=0.3, allowed=0.2, fixed=0.05, work=0.01, best=100.0)
    assert math.isclose(reachable.floor_ms, 0.15)
    assert reachable.verdict == "reachable"
    assert math.isclose(reachable.needed_share, 0.01 / 0.15e-3 / 100.0)
    assert math.isclose(reachable.current_share, 0.01 / 0.25e-3 / 100.0)
    out_of_reach = row(ours=0.3, allowed=0.2, fixed=0.15, work=0.01, best=100.0)
    assert out_of_reach.floor_ms > 0.2 and out_of_reach.verdict == "out of reach"
    assert out_of_reach.needed_share > 1.0
    all_fixed = row(ours=0.3, allowed=0.2, fixed=0.25, work=0.01, best=100.0)
    assert all_fixed.needed_share is None and all_fixed.verdict == "out of reach"
    assert "all taken by fixed" in floors.format_table([all_fixed])


def test_goal_floors_refuses_a_wrong_kernel(monkeypatch):
    floors = load_floors()

    monkeypatch.setattr(convkit, "conv2d", conv2d_off_by_a_little)
    case = floors.cases.chapter_conv_cases(4)[2]
    clock = floors.timing.Clock(torch.device("cpu"), 1, min_run_time=0.001)
    with pytest.raises(RuntimeError, match="wrong"):
        floors.conv_floor_row(case, clock, best_gflops=100.0)


@pytest.mark.parametrize("argv, message", [
    (["--batches", "2"], "at least 3"),
    (["--batches", "64,x"], "comma-separated integers"),
    (["--gemm-sizes", "0"], "must be positive"),
    (["--threads", "0"], "at least 1"),
])
def test_goal_floors_bad_arguments_are_clear_errors(argv, message, capsys):
    floors = load_floors()
    with pytest.raises(SystemExit) as exit_info:
        floors.parse_args(argv)
    assert exit_info.value.code != 0
    assert message in capsys.readouterr().err


def test_goal_floors_best_rate_bounds_every_measured_rate():
    floors = load_floors()
    # Two conv rows with a 100 GFLOP/s GEMM: the second ran its 0.03 GFLOP in 0.2 ms less
    # 0.05 fixed, 200 GFLOP/s, so both rows' best becomes 200.
    slow = floors.FloorRow("2b", "a", "[1]", 0.25, 1.0, 0.2, 0.05, 0.1, 0.01, "GFLOP", 100.0,
                           "GFLOP/s")
    fast = floors.FloorRow("2b", "b", "[1]", 0.2, 1.0, 0.2, 0.05, 0.1, 0.03, "GFLOP", 100.0,
                           "GFLOP/s")
    # A batch-norm row that beat its copy (0.004 GB in 0.02 ms: 200 GB/s against 50), and
    # one that did not.
    bn_fast = floors.FloorRow("3a", "c", "[1]", 0.08, 0.2, 0.1, 0.06, 0.06, 0.004, "GB", 50.0,
                              "GB/s")
    bn_slow = floors.FloorRow("3a", "d", "[1]", 0.16, 0.2, 0.1, 0.06, 0.06, 0.004, "GB", 50.0,
                              "GB/s")
    assert math.isclose(floors.raise_best_rates([slow, fast, bn_fast, bn_slow]), 200.0)
    assert math.isclose(slow.best_rate, 200.0) and math.isclose(fast.best_rate, 200.0)
    assert math.isclose(fast.current_share, 1.0)
    assert math.isclose(bn_fast.best_rate, 200.0) and math.isclose(bn_slow.best_rate, 50.0)
    for row in (slow, fast, bn_fast, bn_slow):
        assert row.current_share <= 1.0 + 1e-12


def conv2d_with_noise(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    """F.conv2d's result plus noise of 1e-3 of its scale: a wrong kernel that a following batch
    norm does not normalise away (a uniform 0.1% it would)."""
    right = torch.nn.functional.conv2d(input, weight, bias, stride, padding, dilation, groups)
    noise = torch.randn(right.shape, generator=torch.Generator().manual_seed(0))
    return right + 1e-3 * right.detach().std() * noise.to(right.dtype)


def conv2d_with_wrong_weight_gradient(input, weight, bias=None, stride=1, padding=0,
                                      dilation=1, groups=1):
    """F.conv2d's output exactly, but a weight gradient 1e-6 too large: wrong only where the
    float64 check of the gradients looks."""
    scaled = weight * 1.0
    if scaled.requires_grad:
        scaled.register_hook(lambda grad: grad * (1 + 1e-6))
    return torch.nn.functional.conv2d(input, scaled, bias, stride, padding, dilation, groups)


@pytest.mark.slow
@pytest.mark.parametrize("wrong_conv,reported", [
    (conv2d_with_noise, "float32 output (train mode)"),
    (conv2d_with_wrong_weight_gradient, "in float64"),
], ids=["output", "weight_gradient"])
def test_a_model_whose_conv_is_wrong_is_reported_and_not_timed(wrong_conv, reported, monkeypatch):
    pytest.importorskip("torchvision")
    models_module, timing = bench_module("bench_models"), bench_module("bench_timing")
    monkeypatch.setattr(convkit.functional, "conv2d", wrong_conv)
    clock = timing.Clock(torch.device("cpu"), torch.get_num_threads(), min_run_time=0.001)
    rows = models_module.bench_model_case("resnet18", 2, 64, torch.device("cpu"), clock)
    assert [row.extra["direction"] for row in rows] == ["train step", "eval forward"]
    for row in rows:
        assert row.passed is False and reported in row.error
        assert row.ms_convkit is None and row.ms_torch is None


@pytest.mark.slow
def test_a_right_model_passes_the_check_despite_relu6_kinks():
    """Regression: MobileNetV2 at N=32 64x64 is convkit's model computing torch's function, but
    its float32 gradients differ from torch's by up to 6x at a depthwise weight (ReLU6 inputs
    rounding across a kink, as torch's own two memory formats differ): a float32 gradient check
    failed it, and the row went untimed. The check passes it; its float64 gradients agree."""
    pytest.importorskip("torchvision")
    models_module = bench_module("bench_models")
    torch.manual_seed(0)
    torch_model = models_module._model("mobilenet_v2").train()
    convkit_model = convkit.nn.convert(torch_model)
    x = torch.randn(32, 3, 64, 64)
    y = torch.randint(0, 10, (32,))
    with models_module.dropout_off(torch_model), models_module.dropout_off(convkit_model):
        assert models_module.validate_model(torch_model, convkit_model, x, y) is None
