"""The CUDA emulator itself (csrc/cuda_emu/): every class of bug it exists to catch is caught,
by a deliberately wrong kernel, and the correct twin of each runs and gives the right result;
the schedule is seeded, reproducible, and changes between barriers and between blocks; the
mode routes convkit's ops to their CUDA code only while it is on."""
from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F

import convkit
from convkit.cuda_emulation import emulation_state, emulator_info, run_self_test

NAMES, ERRORS = torch.ops.convkit.cuda_emulator_self_tests.default()
EXPECTED = dict(zip(NAMES, ERRORS))

# The bug classes the emulator must catch, each with a correct twin where one makes sense.
MUST_CATCH = {
    "neighbour_missing_barrier": "neighbour_with_barrier",  # missing __syncthreads before a read
    "overwrite_missing_barrier": "overwrite_with_barrier",  # missing __syncthreads before a write
    "unwritten_shared_read": None,
    "shared_index_past_end": None,
    "dynamic_shared_past_end": "dynamic_shared",
    "static_shared_over_48kb": None,
    "dynamic_shared_over_48kb": None,
    "misaligned_float4_load": "aligned_float4_load",
    "write_past_end": "write_in_bounds",
    "shuffle_lane_missing": "warp_collectives",  # a lane named in the mask never arrives
    "shuffle_caller_not_in_mask": None,
    "shuffle_source_outside_mask": None,
    "shuffle_masks_disagree": None,
    "shuffle_mask_beyond_block": None,
    "deadlock": "early_exit_before_barrier",
    "grid_y_70000": None,
    "grid_z_70000": None,
    "block_1025_threads": None,
    "zero_blocks": None,
    "zero_threads": None,
}


def test_the_table_has_every_required_case():
    for bug, twin in MUST_CATCH.items():
        assert EXPECTED.get(bug), f"no self-test case {bug!r} with an expected error"
        if twin is not None:
            assert twin in EXPECTED and EXPECTED[twin] == "", f"no correct twin {twin!r}"


@pytest.mark.parametrize("name", [n for n in NAMES if EXPECTED[n]])
def test_emulator_catches(name):
    with pytest.raises(RuntimeError, match=re.escape(EXPECTED[name])) as caught:
        with convkit.emulated_cuda(seed=0):
            run_self_test(name)
    message = str(caught.value)
    assert message.startswith("CUDA emulator: ") and "kernel" in message
    if "thread (" in message:  # raised inside a kernel: it names the block and the seed too
        assert re.search(r"block \(\d+, \d+, \d+\), thread \(\d+, \d+, \d+\)", message)


@pytest.mark.parametrize("name", [n for n in NAMES if not EXPECTED[n]])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_correct_twin_runs(name, seed):
    with convkit.emulated_cuda(seed):
        run_self_test(name)


def test_a_failure_reproduces_with_its_seed():
    def message(seed: int) -> str:
        with convkit.emulated_cuda(seed):
            with pytest.raises(RuntimeError) as caught:
                run_self_test("neighbour_missing_barrier")
        return str(caught.value)

    first = message(7)
    assert first == message(7)
    assert "[schedule seed 7, launch 1 " in first
    assert any(message(seed) != first.replace("seed 7", f"seed {seed}") for seed in (8, 9, 10))


def _tickets(seed: int) -> torch.Tensor:
    with convkit.emulated_cuda(seed):
        return run_self_test("ticket_order")  # [2, 4 blocks * 64 threads]: before/after a barrier


def test_schedule_is_a_seeded_shuffle():
    tickets = _tickets(1)
    assert torch.equal(tickets.flatten().sort().values, torch.arange(512, dtype=torch.int32))
    assert torch.equal(tickets, _tickets(1))
    assert not torch.equal(tickets, _tickets(2))
    assert not torch.equal(tickets[0], torch.arange(256, dtype=torch.int32))


def test_threads_change_order_at_a_barrier():
    tickets = _tickets(3).view(2, 4, 64)
    for block in range(4):
        before = tickets[0, block].argsort()
        after = tickets[1, block].argsort()
        assert not torch.equal(before, after), f"block {block} kept its order across the barrier"


def test_blocks_run_in_a_shuffled_order():
    block_orders = set()
    for seed in range(6):
        first_ticket = _tickets(seed).view(2, 4, 64)[0].min(dim=1).values
        block_orders.add(tuple(first_ticket.argsort().tolist()))
    assert len(block_orders) > 1 and block_orders != {(0, 1, 2, 3)}


def test_mode_routes_only_while_on_and_nests():
    x = torch.randn(2, 3, 6, 6)
    w = torch.randn(4, 3, 3, 3)
    before = emulation_state()
    convkit.conv2d(x, w, padding=1)
    assert emulation_state().calls == before.calls
    with convkit.emulated_cuda(seed=5, max_grid_stride_blocks=3):
        assert emulation_state()[:3] == (True, 5, 3)
        with convkit.emulated_cuda(seed=6):
            assert emulation_state()[:3] == (True, 6, 2**20)
        assert emulation_state()[:3] == (True, 5, 3)
        launches = emulation_state().launches
        out = convkit.conv2d(x, w, padding=1)
        assert emulation_state().launches >= launches + 2  # im2col and the output scatter
    assert emulation_state()[:3] == before[:3]
    torch.testing.assert_close(out, F.conv2d(x, w, padding=1))


def test_bad_settings_are_refused():
    with pytest.raises(RuntimeError, match=r"max_grid_stride_blocks must be in \[1, 2\^20\], but got 0"):
        with convkit.emulated_cuda(max_grid_stride_blocks=0):
            pass
    with pytest.raises(RuntimeError, match="expected a non-negative seed, but got -1"):
        with convkit.emulated_cuda(seed=-1):
            pass
    assert not emulation_state().enabled


def test_info_names_the_build():
    info = emulator_info()
    assert "context switch: " in info and "CUDA headers" in info


def test_unknown_case_lists_the_cases():
    with pytest.raises(RuntimeError, match="no case named 'nope'; the cases are: .*deadlock"):
        run_self_test("nope")
