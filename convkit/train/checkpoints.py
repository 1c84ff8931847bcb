"""The checkpoint file format: a ``torch.save``d dict of tensors and plain Python values
(the model's and the optimiser's state dicts, the epoch reached, the fit's plan, the
callbacks' states, torch's RNG state), marked with :data:`CHECKPOINT_FORMAT` and
:data:`CHECKPOINT_VERSION`. Written atomically; read with ``weights_only=True``, so a
planted file cannot run code."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Union

import torch

from convkit.train.files import atomic_write

__all__ = ["CHECKPOINT_FORMAT", "CHECKPOINT_VERSION", "CheckpointError", "read_checkpoint", "write_checkpoint"]

# What every checkpoint carries beside its state: files without it are not ours. The text
# is part of the format: another one would make every existing checkpoint unreadable.
CHECKPOINT_FORMAT = "convkit.learner checkpoint"
CHECKPOINT_VERSION = 1


class CheckpointError(ValueError):
    """A file that is not a readable convkit checkpoint (truncated, empty, not a torch file,
    someone else's, or one holding more than tensors and plain values)."""


def write_checkpoint(path: Union[str, os.PathLike], state: dict) -> Path:
    """``torch.save`` ``state`` (``Learner.state_dict``) to ``path`` through a temporary
    file renamed onto it: an interrupted save leaves the previous checkpoint. Returns the
    path."""
    return atomic_write(path, lambda tmp: torch.save(state, tmp))


def read_checkpoint(path: Union[str, os.PathLike]) -> dict:
    """A checkpoint written by :func:`write_checkpoint`, loaded with ``weights_only=True``:
    only tensors and plain Python values are rebuilt, so a planted file cannot run code.
    Raises CheckpointError naming the file and what is wrong with it."""
    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - whatever torch.load raises, the file is not usable
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(f"{path} is not a readable convkit checkpoint ({reason[:200]})") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not a convkit checkpoint (it has no {CHECKPOINT_FORMAT!r} mark)")
    if state.get("version") != CHECKPOINT_VERSION:
        raise CheckpointError(
            f"{path} is a convkit checkpoint of version {state.get('version')!r}; this convkit reads "
            f"version {CHECKPOINT_VERSION}"
        )
    missing = [key for key in ("model", "epoch", "fit_plan") if key not in state]
    if missing:
        raise CheckpointError(f"{path} is an incomplete convkit checkpoint (no {', '.join(missing)})")
    return state
