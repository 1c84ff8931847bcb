"""Forward hooks as context managers: what ActivationStats and ``Learner.summary`` record."""
from __future__ import annotations

from typing import Any, Callable, Sequence

from torch import nn

__all__ = ["Hook", "Hooks"]


class Hook:
    """A forward hook on ``module`` that keeps ``fn(module, input, output)`` in ``stored``.
    A context manager: the hook is removed on exit (or by :meth:`remove`)."""

    def __init__(self, module: nn.Module, fn: Callable[[nn.Module, tuple, Any], Any]) -> None:
        self.fn = fn
        self.stored: Any = None
        self.handle = module.register_forward_hook(self._hook)

    def _hook(self, module: nn.Module, inputs: tuple, output: Any) -> None:
        self.stored = self.fn(module, inputs, output)

    def remove(self) -> None:
        if self.handle is not None:
            self.handle.remove()
            self.handle = None

    def __enter__(self) -> "Hook":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


class Hooks:
    """One :class:`Hook` per module, all with ``fn``; ``stored`` lists their results in the
    modules' order. A context manager."""

    def __init__(self, modules: Sequence[nn.Module], fn: Callable[[nn.Module, tuple, Any], Any]) -> None:
        self.hooks = [Hook(m, fn) for m in modules]

    @property
    def stored(self) -> list:
        return [h.stored for h in self.hooks]

    def __len__(self) -> int:
        return len(self.hooks)

    def remove(self) -> None:
        for h in self.hooks:
            h.remove()

    def __enter__(self) -> "Hooks":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()
