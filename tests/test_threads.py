"""convkit's CPU ops under concurrent torch.set_num_threads: each op runs on the team of the
thread that calls it, with per-thread buffers for exactly that team, and leaves the thread's
setting as it found it. A thread's first convkit op used to re-apply the process-wide thread
count after planning its buffers for the thread's own: two OpenMP threads then shared one
buffer (wrong outputs) and the thread was left with the other's count."""
from __future__ import annotations

import random
import threading
import time

import pytest
import torch
import torch.nn.functional as F

import convkit
from test_conv2d_paths import PATHS


def _conv_case(config):
    n, c, h, w, o, k, stride, padding, dilation, groups, _ = config
    x = torch.randn(n, c, h, w, dtype=torch.float64)
    weight = torch.randn(o, c // groups, k, k, dtype=torch.float64)
    kwargs = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
    return x, weight, kwargs


def _in_new_thread(body):
    """Runs body() in a fresh OS thread and returns its result (or raises its exception)."""
    box = {}

    def run():
        try:
            box["result"] = body()
        except BaseException as error:  # noqa: BLE001 - handed to the caller
            box["error"] = error

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]
    return box["result"]


@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("op", ["conv2d", "batch_norm_relu"])
def test_first_op_of_a_thread_keeps_its_thread_count(op, restore_threads):
    """The diagnosed case: a thread set to 1 thread runs its first convkit op after another
    thread set 4."""
    x = torch.randn(8, 64, 16, 16)
    weight = torch.randn(64, 64, 3, 3) / 24
    if op == "conv2d":
        expected = F.conv2d(x, weight, padding=1)
    else:
        expected = F.relu(F.batch_norm(x, None, None, training=True))
    ready, go = threading.Event(), threading.Event()

    def worker():
        torch.set_num_threads(1)
        assert torch.get_num_threads() == 1  # libtorch has initialised this thread
        ready.set()
        go.wait()
        if op == "conv2d":
            out = convkit.conv2d(x, weight, padding=1)
        else:
            out = convkit.batch_norm_relu(x, None, None, training=True)
        return out, torch.get_num_threads()

    box = {}
    thread = threading.Thread(target=lambda: box.update(result=worker()))
    thread.start()
    ready.wait()
    torch.set_num_threads(4)  # the process-wide count, from another thread
    go.set()
    thread.join()
    out, threads_after = box["result"]
    assert threads_after == 1, "the op changed its thread's thread count"
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)


# One shape per CPU path (csrc/cpu/conv2d/path.h; tests/test_conv2d_paths.py asserts them), and two for the
# band path that reach it without a column budget (the budget is process-wide: one set here
# would move the other shapes too): a single image's columns beyond a tile.
STRESS_CASES = {name: PATHS[name] for name in (
    "rows_first_layer", "implicit_gemm_o32", "transposed_input_grad_11_images",
    "image_path_gemm_o70", "image_path_shared_tiles", "window_path_last_layer")}
STRESS_CASES["band_path_large_image"] = (2, 16, 40, 40, 40, 3, 1, 1, 1, 1, None)
STRESS_CASES["band_path_1x1_large_image"] = (2, 64, 48, 48, 40, 1, 1, 0, 1, 1, None)


def test_ops_stay_right_while_threads_change_their_counts(restore_threads):
    """For about two seconds: one thread keeps changing its thread count (and so the
    process-wide one), while fresh threads, two at a time, each set a random count (1-4) and
    run a few ops of every CPU path, forward and backward, as their first convkit ops: no
    wrong result, and each thread ends with its own setting."""
    cases = []
    for name, config in STRESS_CASES.items():
        x, weight, kwargs = _conv_case(config)
        xg = x.clone().requires_grad_()
        wg = weight.clone().requires_grad_()
        out = F.conv2d(xg, wg, **kwargs)
        dy = torch.randn_like(out)
        out.backward(dy)
        cases.append((name, x, weight, kwargs, dy, (out.detach(), xg.grad, wg.grad)))
    bn_inputs = [torch.randn(6, 5, 40, 41, dtype=torch.float64), torch.randn(64, 8, 4, 4, dtype=torch.float64)]
    bn_expected = [F.relu(F.batch_norm(t, None, None, training=True)) for t in bn_inputs]
    failures = []
    stop_at = time.monotonic() + 2.0

    def run_ops(rng: random.Random, threads: int) -> None:
        for _ in range(3):
            if rng.random() < 0.25:
                i = rng.randrange(len(bn_inputs))
                out = convkit.batch_norm_relu(bn_inputs[i], None, None, training=True)
                if not torch.allclose(out, bn_expected[i], rtol=1e-10, atol=1e-10):
                    failures.append(f"batch norm {tuple(bn_inputs[i].shape)} on {threads} threads")
                continue
            name, x, weight, kwargs, dy, expected = rng.choice(cases)
            xg = x.clone().requires_grad_()
            wg = weight.clone().requires_grad_()
            out = convkit.conv2d(xg, wg, **kwargs)
            out.backward(dy)
            for what, ours, theirs in zip(("output", "grad_input", "grad_weight"),
                                          (out.detach(), xg.grad, wg.grad), expected):
                if not torch.allclose(ours, theirs, rtol=1e-9, atol=1e-9):
                    failures.append(f"{name} {what} on {threads} threads")

    def fresh_thread(seed: int) -> None:
        rng = random.Random(seed)
        threads = rng.randint(1, 4)
        torch.set_num_threads(threads)
        torch.get_num_threads()  # libtorch initialises this thread
        run_ops(rng, threads)
        if torch.get_num_threads() != threads:
            failures.append(f"a thread set to {threads} threads ends with {torch.get_num_threads()}")

    def changer() -> None:
        rng = random.Random(-1)
        while time.monotonic() < stop_at:
            torch.set_num_threads(rng.randint(1, 4))
            time.sleep(0.001)

    changing = threading.Thread(target=changer)
    changing.start()
    seed = 0
    while time.monotonic() < stop_at:
        pair = [threading.Thread(target=fresh_thread, args=(seed + i,)) for i in range(2)]
        seed += 2
        for thread in pair:
            thread.start()
        for thread in pair:
            thread.join()
    changing.join()
    assert seed > 4, "the stress test ran too few threads to mean anything"
    assert not failures, f"{len(failures)} failures in {seed} threads: {failures[:8]}"


def test_an_op_in_a_fresh_thread_uses_the_process_setting(restore_threads):
    """A thread that never set its count runs with the process-wide one, as torch's ops do."""
    torch.set_num_threads(2)
    x = torch.randn(4, 8, 9, 9, dtype=torch.float64)
    weight = torch.randn(8, 8, 3, 3, dtype=torch.float64)

    def body():
        out = convkit.conv2d(x, weight, padding=1)
        return out, torch.get_num_threads()

    out, threads = _in_new_thread(body)
    assert threads == 2
    torch.testing.assert_close(out, F.conv2d(x, weight, padding=1), rtol=1e-10, atol=1e-10)
