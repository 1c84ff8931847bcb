"""Hyper-parameter schedules: pure functions of training progress ``pos`` in [0, 1].

``pos`` is the fraction of all training batches done before the current one: 0 at the first
batch of ``fit``, ``1 - 1/total`` at the last. A schedule is any ``Callable[[float], float]``;
:func:`combine` joins several over consecutive parts of [0, 1], and :func:`one_cycle_lr` /
:func:`one_cycle_mom` build fastai's 1cycle from two cosine halves.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

Schedule = Callable[[float], float]

__all__ = [
    "Schedule",
    "sched_lin",
    "sched_cos",
    "sched_no",
    "sched_exp",
    "constant",
    "annealer",
    "combine",
    "combined_cos",
    "one_cycle_lr",
    "one_cycle_mom",
]


def sched_lin(start: float, end: float, pos: float) -> float:
    """Linear from ``start`` (pos 0) to ``end`` (pos 1)."""
    return start + pos * (end - start)


def sched_cos(start: float, end: float, pos: float) -> float:
    """Half a cosine from ``start`` (pos 0) to ``end`` (pos 1), flat at both ends:
    ``start + (1 + cos(pi * (1 - pos))) * (end - start) / 2``."""
    return start + (1 + math.cos(math.pi * (1 - pos))) * (end - start) / 2


def sched_no(start: float, end: float, pos: float) -> float:
    """Always ``start``."""
    return start


def sched_exp(start: float, end: float, pos: float) -> float:
    """Geometric from ``start`` to ``end`` (both > 0): ``start * (end / start) ** pos``."""
    return start * (end / start) ** pos


def annealer(kind: Callable[[float, float, float], float], start: float, end: float) -> Schedule:
    """Fix ``start`` and ``end`` of one of the ``sched_*`` functions: a function of pos."""

    def schedule(pos: float) -> float:
        return kind(start, end, pos)

    return schedule


def constant(value: float) -> Schedule:
    """The schedule that is ``value`` everywhere."""
    return annealer(sched_no, value, value)


def combine(pcts: Sequence[float], scheds: Sequence[Schedule]) -> Schedule:
    """Run ``scheds[i]`` over a fraction ``pcts[i]`` of training, one after the other; each
    sees its own progress rescaled to [0, 1]. ``pcts`` must be positive and sum to 1."""
    if len(pcts) != len(scheds) or not pcts:
        raise ValueError("combine: need one fraction per schedule")
    if any(p < 0 for p in pcts) or abs(sum(pcts) - 1.0) > 1e-6:
        raise ValueError(f"combine: fractions must be >= 0 and sum to 1, got {list(pcts)}")
    bounds = [0.0]
    for p in pcts:
        bounds.append(bounds[-1] + p)
    pcts = list(pcts)
    scheds = list(scheds)

    def schedule(pos: float) -> float:
        if pos < 0 or pos > 1:
            raise ValueError(f"schedule position must be in [0, 1], got {pos}")
        # The last part whose start is <= pos (a zero-width part is never chosen unless
        # it is the only place pos can go).
        index = 0
        for i in range(len(pcts)):
            if pcts[i] > 0 and pos >= bounds[i]:
                index = i
        width = pcts[index]
        local = (pos - bounds[index]) / width if width > 0 else 1.0
        return scheds[index](min(local, 1.0))

    return schedule


def combined_cos(pct: float, start: float, middle: float, end: float) -> Schedule:
    """Cosine from ``start`` to ``middle`` over the first ``pct`` of training, then cosine
    from ``middle`` to ``end`` (fastai's ``combined_cos``)."""
    return combine(
        [pct, 1 - pct],
        [annealer(sched_cos, start, middle), annealer(sched_cos, middle, end)],
    )


def one_cycle_lr(
    lr_max: float, div: float = 25.0, div_final: float = 1e5, pct_start: float = 0.25
) -> Schedule:
    """1cycle learning rate: lr_max/div -> lr_max over ``pct_start``, then -> lr_max/div_final."""
    return combined_cos(pct_start, lr_max / div, lr_max, lr_max / div_final)


def one_cycle_mom(
    moms: Sequence[float] = (0.95, 0.85, 0.95), pct_start: float = 0.25
) -> Schedule:
    """1cycle momentum: moms[0] -> moms[1] over ``pct_start``, then -> moms[2]."""
    return combined_cos(pct_start, moms[0], moms[1], moms[2])
