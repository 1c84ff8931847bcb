"""The epoch table and the mm:ss times as fastai prints them on a console."""
from __future__ import annotations

import math
from typing import Any, Sequence

__all__ = ["format_time", "format_table", "format_row"]


def format_time(seconds: float) -> str:
    """mm:ss, as fastai prints epoch times."""
    seconds = int(round(seconds))
    return f"{seconds // 60:02d}:{seconds % 60:02d}"


def _column_widths(names: Sequence[str]) -> list[int]:
    return [max(len(n), 9) + 1 for n in names]


def format_table(names: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """The epoch table: a header of the column ``names``, then one row per epoch (floats
    with 6 decimals, the 'time' column as mm:ss)."""
    widths = _column_widths(names)
    lines = ["".join(f"{n:<{w}}" for n, w in zip(names, widths)).rstrip()]
    for row in rows:
        lines.append(format_row(names, row))
    return "\n".join(lines)


def format_row(names: Sequence[str], row: Sequence[Any]) -> str:
    """One line of :func:`format_table`: ``row`` holds one value per name."""
    cells = []
    for name, value, width in zip(names, row, _column_widths(names)):
        if name == "time":
            text = format_time(value)
        elif isinstance(value, float):
            text = "nan" if math.isnan(value) else f"{value:.6f}"
        else:
            text = str(value)
        cells.append(f"{text:<{width}}")
    return "".join(cells).rstrip()
