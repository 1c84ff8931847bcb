"""The trainer data-parallel: 2 spawned gloo processes train as one process on the same global
batches; the loaders' shards; ``torchrun -m convkit chapter13`` end to end (slow)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from convkit.train.data.loaders import TensorLoader
from convkit.train.learner import Learner

from distributed_harness import run_ranks
from distributed_workers import tiny_learner_run, tiny_learner_worker

ROOT = Path(__file__).resolve().parents[1]


def tiny_data(n: int = 75):
    generator = torch.Generator().manual_seed(5)
    y = torch.arange(n) % 3
    x = torch.randint(0, 80, (n, 12, 12), generator=generator, dtype=torch.uint8)
    for i in range(n):
        x[i, 2 + 3 * int(y[i]): 4 + 3 * int(y[i]), 2:10] = 255
    return x, y


def test_two_processes_train_as_one_on_the_same_global_batches(tmp_path):
    x, y = tiny_data()
    epochs, batch_size = 2, 8
    ranks = run_ranks(tiny_learner_worker, 2, x, y, epochs, batch_size, str(tmp_path))
    single = tiny_learner_run(x, y, epochs, batch_size, False)
    for rank in ranks:
        assert rank["batch_size"] == batch_size // 2
        assert rank["synchronised"] == 3
        for key, value in single["state"].items():
            torch.testing.assert_close(rank["state"][key], value, rtol=1e-9, atol=1e-11,
                                       msg=lambda m: f"{key}: {m}")
        # train_loss, valid_loss (float64), accuracy (a float32 fraction per batch, and the
        # validation batches differ between one process and two); the time column differs.
        for got, want in zip(rank["values"], single["values"]):
            assert got[:2] == pytest.approx(want[:2], rel=1e-9, abs=1e-12)
            assert got[2] == pytest.approx(want[2], rel=1e-6)
        assert rank["validate"][0] == pytest.approx(single["validate"][0], rel=1e-9)
        assert rank["validate"][1] == pytest.approx(single["validate"][1], rel=1e-6)
    # Rank 0 logs the table, the other rank nothing; the checkpoint comes from rank 0 alone.
    assert any(line.startswith("epoch") for line in ranks[0]["lines"])
    assert ranks[1]["lines"] == []
    assert (tmp_path / "tiny.pt").is_file()


def loader(n: int = 131, batch_size: int = 8, training: bool = True) -> TensorLoader:
    x = torch.zeros(n, 2, 2, dtype=torch.uint8)
    return TensorLoader(x, torch.arange(n), batch_size, shuffle=training, drop_last=training,
                        seed=3)


@pytest.mark.parametrize("world_size", [2, 4])
@pytest.mark.parametrize("epoch", [0, 5])
def test_the_shards_of_a_training_batch_are_that_batch(world_size, epoch):
    whole = loader()
    whole.set_epoch(epoch)
    shards = [whole.shard(rank, world_size) for rank in range(world_size)]
    for shard in shards:
        shard.set_epoch(epoch)
        assert shard.batch_size == 8 // world_size and len(shard) == len(whole)
    served = [[yb for _, yb in shard] for shard in shards]
    for i, (_, yb) in enumerate(whole):
        together = torch.cat([batches[i] for batches in served])
        assert torch.equal(together.sort().values, yb.sort().values)


@pytest.mark.parametrize("world_size", [2, 3])
def test_validation_shards_hold_every_item_once(world_size):
    whole = loader(training=False)
    shards = [whole.shard(rank, world_size) for rank in range(world_size)]
    items = torch.cat([yb for shard in shards for _, yb in shard])
    assert sorted(items.tolist()) == list(range(131))
    assert all(shard.batch_size == 8 for shard in shards)


def test_a_batch_the_processes_do_not_divide_is_an_error():
    with pytest.raises(ValueError, match="batch size 8 is not divisible by the 3 processes"):
        loader().shard(0, 3)
    with pytest.raises(ValueError, match="already a shard"):
        loader().shard(0, 2).shard(0, 2)


def test_distributed_learner_without_a_process_group_is_an_error():
    x, y = tiny_data(12)
    dls = type("DLs", (), {"train": loader(), "valid": loader(training=False)})()
    with pytest.raises(ValueError, match="initialised torch.distributed process group"):
        Learner(dls, torch.nn.Linear(4, 3), distributed=True)


@pytest.mark.slow
def test_torchrun_chapter13_quick_on_two_processes_and_resume(tmp_path):
    from test_chapter13 import synthetic_mnist
    from convkit.train.data import cache

    data = tmp_path / "data"
    cache.save_cache("mnist", *synthetic_mnist(700, 700), source="synthetic test data", root=data)
    out = tmp_path / "out"
    env = dict(os.environ, CONVKIT_DATA=str(data), PYTHONPATH=str(ROOT))
    env.pop("CONVKIT_MNIST_DIR", None)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m",
               "convkit", "chapter13", "--quick", "--experiments", "7", "--out", str(out),
               "--no-progress"]

    def run(*extra: str) -> subprocess.CompletedProcess:
        completed = subprocess.run(command + list(extra), cwd=tmp_path, env=env,
                                   capture_output=True, text=True, timeout=600)
        assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
        return completed

    first = run()
    assert first.stdout.count("report: ") == 1  # rank 0 alone prints
    assert "data-parallel on 2 processes (gloo)" in first.stdout
    assert first.stdout.count("== Experiment 7") == 1
    results = json.loads((out / "results.json").read_text())
    [entry] = results["experiments"]
    assert entry["processes"] == 2 and entry["batch_size"] == 64
    assert entry["batch_size_per_process"] == 32
    assert entry["final_accuracy"] > 0.9
    assert "2 processes x 32, data-parallel" in (out / "report.md").read_text()
    assert (out / "mnist-convkit-seed0-quick" / "exp7_loss.png").is_file()
    checkpoint = out / "mnist-convkit-seed0-quick" / "checkpoints" / "exp7.pt"
    assert checkpoint.is_file()

    again = run("--resume")
    assert "already in" in again.stdout and "skipped" in again.stdout
    # Forget the entry but keep the checkpoint: both processes resume from it.
    results["experiments"] = []
    (out / "results.json").write_text(json.dumps(results))
    resumed = run("--resume")
    [entry] = json.loads((out / "results.json").read_text())["experiments"]
    assert entry["resumed_at_epoch"] == 5 and entry["final_accuracy"] > 0.9
