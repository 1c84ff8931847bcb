"""The callback protocol of :class:`convkit.train.learner.Learner`: the events of the
training loop, the exceptions that cancel part of it, and the :class:`Callback` base class.

The training loop calls these events on every callback, sorted by ``order``::

    before_fit
      before_epoch
        before_train
          before_batch  after_pred  after_loss  before_backward  after_step  after_batch
        after_train
        before_validate
          before_batch  after_pred  after_loss  after_batch
        after_validate
      after_epoch
    after_fit

A callback stops part of the loop by raising one of the ``Cancel*Exception``; the matching
``after_cancel_<part>`` event runs, then ``after_<part>`` as usual. Whatever happens (a
crash, Ctrl-C), every callback's ``teardown`` runs when ``fit`` ends, so hooks never leak.
"""
from __future__ import annotations

import re
from typing import Any, Optional

__all__ = [
    "EVENTS",
    "INNER_LOOP_EVENTS",
    "Callback",
    "CancelBatchException",
    "CancelTrainException",
    "CancelValidException",
    "CancelEpochException",
    "CancelFitException",
]

EVENTS = (
    "before_fit", "before_epoch", "before_train", "before_batch", "after_pred", "after_loss",
    "before_backward", "after_step", "after_batch", "after_train", "before_validate",
    "after_validate", "after_epoch", "after_fit",
)

# The per-batch events, which a callback's run_train / run_valid can switch off.
INNER_LOOP_EVENTS = frozenset({
    "before_batch", "after_pred", "after_loss", "before_backward", "after_step",
    "after_cancel_batch", "after_batch",
})


class CancelBatchException(Exception):
    """Skip the rest of this batch (``after_cancel_batch``, then ``after_batch``)."""


class CancelTrainException(Exception):
    """Skip the rest of this epoch's training phase."""


class CancelValidException(Exception):
    """Skip the rest of this epoch's validation phase."""


class CancelEpochException(Exception):
    """Skip the rest of this epoch."""


class CancelFitException(Exception):
    """Stop training (``after_cancel_fit``, then ``after_fit``)."""


def _snake_case(name: str) -> str:
    # "ActivationStats" -> "activation_stats": how a Learner exposes its callbacks.
    name = re.sub(r"(.)([A-Z][a-z]+)", r"\1_\2", name)
    return re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", name).lower()


class Callback:
    """Base class: override any event in ``EVENTS`` (methods without arguments; the state
    lives on ``self.learn``). Lower ``order`` runs first. ``run_train`` / ``run_valid``
    False: the callback sleeps through that phase's events.

    A callback with state worth keeping across an interruption implements ``state_dict``
    and ``load_state_dict``; checkpoints store it. ``teardown`` always runs when fit ends.
    """

    order: int = 0
    run_train: bool = True
    run_valid: bool = True
    # The Learner running this callback (set by Learner.add_cb). Typed Any: this module
    # sits below learner.py, which imports it.
    learn: Any

    @property
    def name(self) -> str:
        """The attribute the Learner exposes this callback as (``learn.recorder``)."""
        return _snake_case(type(self).__name__)

    def state_dict(self) -> Optional[dict]:
        return None

    def load_state_dict(self, state: dict) -> None:
        pass

    def teardown(self) -> None:
        pass

    def __repr__(self) -> str:
        return type(self).__name__
