"""Schedules against their formulas (fastai's 1cycle: cosine halves, div 25, div_final 1e5,
pct_start 0.25, moms 0.95 -> 0.85 -> 0.95)."""
from __future__ import annotations

import math

import pytest

from convkit.train import schedules

POSITIONS = [0.0, 0.1, 0.25, 0.3, 0.5, 0.77, 0.999, 1.0]


@pytest.mark.parametrize("pos", POSITIONS)
def test_basic_schedules_match_their_formulas(pos):
    assert schedules.sched_lin(2.0, 6.0, pos) == pytest.approx(2.0 + pos * 4.0)
    assert schedules.sched_cos(2.0, 6.0, pos) == pytest.approx(2.0 + (1 + math.cos(math.pi * (1 - pos))) * 4.0 / 2)
    assert schedules.sched_no(2.0, 6.0, pos) == 2.0
    assert schedules.sched_exp(2.0, 8.0, pos) == pytest.approx(2.0 * 4.0 ** pos)


def test_sched_cos_is_flat_at_both_ends_and_halfway_in_the_middle():
    assert schedules.sched_cos(1.0, 3.0, 0.0) == pytest.approx(1.0)
    assert schedules.sched_cos(1.0, 3.0, 1.0) == pytest.approx(3.0)
    assert schedules.sched_cos(1.0, 3.0, 0.5) == pytest.approx(2.0)
    # The derivative vanishes at the ends: tiny steps barely move it.
    assert schedules.sched_cos(1.0, 3.0, 1e-3) - 1.0 < 1e-5


def test_one_cycle_lr_matches_fastai_defaults():
    lr_max = 0.06
    sched = schedules.one_cycle_lr(lr_max)
    assert sched(0.0) == pytest.approx(lr_max / 25)
    assert sched(0.25) == pytest.approx(lr_max)
    assert sched(1.0) == pytest.approx(lr_max / 1e5)
    for pos in POSITIONS:
        if pos < 0.25:
            expected = schedules.sched_cos(lr_max / 25, lr_max, pos / 0.25)
        else:
            expected = schedules.sched_cos(lr_max, lr_max / 1e5, (pos - 0.25) / 0.75)
        assert sched(pos) == pytest.approx(expected, rel=1e-12, abs=1e-15)


def test_one_cycle_lr_rises_then_falls():
    sched = schedules.one_cycle_lr(0.1)
    values = [sched(i / 100) for i in range(101)]
    peak = values.index(max(values))
    assert peak == 25
    assert all(a <= b for a, b in zip(values[:peak], values[1:peak + 1]))
    assert all(a >= b for a, b in zip(values[peak:], values[peak + 1:]))


def test_one_cycle_mom_goes_the_opposite_way():
    sched = schedules.one_cycle_mom()
    assert sched(0.0) == pytest.approx(0.95)
    assert sched(0.25) == pytest.approx(0.85)
    assert sched(1.0) == pytest.approx(0.95)
    assert sched(0.125) == pytest.approx(0.90)
    assert sched(0.625) == pytest.approx(0.90)


def test_custom_one_cycle_arguments():
    sched = schedules.one_cycle_lr(1.0, div=10.0, div_final=100.0, pct_start=0.5)
    assert sched(0.0) == pytest.approx(0.1)
    assert sched(0.5) == pytest.approx(1.0)
    assert sched(1.0) == pytest.approx(0.01)
    mom = schedules.one_cycle_mom((0.9, 0.8, 0.85), pct_start=0.5)
    assert mom(1.0) == pytest.approx(0.85)


def test_combine_rescales_each_part():
    sched = schedules.combine(
        [0.3, 0.7],
        [schedules.annealer(schedules.sched_lin, 0.0, 1.0), schedules.annealer(schedules.sched_lin, 1.0, 3.0)],
    )
    assert sched(0.15) == pytest.approx(0.5)
    assert sched(0.3) == pytest.approx(1.0)
    assert sched(0.65) == pytest.approx(2.0)
    assert sched(1.0) == pytest.approx(3.0)


def test_combine_rejects_bad_fractions_and_positions():
    lin = schedules.annealer(schedules.sched_lin, 0.0, 1.0)
    with pytest.raises(ValueError, match="sum to 1"):
        schedules.combine([0.5, 0.6], [lin, lin])
    with pytest.raises(ValueError, match="one fraction per schedule"):
        schedules.combine([1.0], [lin, lin])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        schedules.combine([1.0], [lin])(1.5)


def test_constant_schedule():
    assert schedules.constant(0.3)(0.0) == 0.3
    assert schedules.constant(0.3)(0.9) == 0.3
