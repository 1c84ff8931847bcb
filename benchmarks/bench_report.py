"""The benchmark's output: the stdout tables, the markdown tables, the JSON records, the bar
chart of the ratios and the memory summary, all from Rows."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional, Sequence

import torch

from bench_timing import Row, thread_environment


SECTION_TITLES = {
    "conv chapter": "conv2d: the chapter's CNN layers",
    "conv common": "conv2d: common layers",
    "batchnorm_act": "BatchNorm+activation: fused (convkit) vs F.batch_norm + F.<activation> (torch)",
    "training_step": "Training step: forward, cross-entropy, backward, Adam",
    "capabilities": ("Training step on the CPU kernels of the other instruction sets this CPU "
                     "runs (convkit.set_cpu_capability), against the same oneDNN layers"),
    "models": ("Real models (torchvision, random weights): convkit.nn.convert(model) vs the "
               "torch model, SGD training step and eval forward"),
    "sync_bn": ("Synchronised BatchNorm+ReLU training step (forward + backward) on 2 gloo "
                "processes, one thread each, vs the local fused kernel on the same per-process "
                "batch"),
}
# The two timed columns of a section: convkit against PyTorch, except where both are ours.
COLUMN_NAMES = {SECTION_TITLES["sync_bn"]: ("sync", "local")}


def _fmt(value: Optional[float], digits: int = 3) -> str:
    if value is None:
        return "-"
    if value >= 1000:
        return f"{value:.0f}"
    if value >= 100:
        return f"{value:.1f}"
    return f"{value:.{digits}g}" if value < 1 else f"{value:.2f}"


def _table_cells(row: Row, im2col: bool = True) -> list[str]:
    cells = [row.name, row.shape, _fmt(row.ms_convkit), _fmt(row.ms_torch)]
    if im2col:
        cells.append(_fmt(row.ms_torch_im2col))
    cells += [_fmt(row.rate(row.ms_convkit)), _fmt(row.rate(row.ms_torch))]
    if im2col:
        cells.append(_fmt(row.rate(row.ms_torch_im2col)))
    cells.append(_fmt(row.ratio()))
    if im2col:
        cells.append(_fmt(row.ratio_im2col()))
    return cells


def table_header(unit: str, im2col: bool = True, title: str = "") -> list[str]:
    """The columns of a section's table; batch norm has no im2col baseline."""
    if not im2col:
        ours, theirs = COLUMN_NAMES.get(title, ("convkit", "torch"))
        ratio = "ours/torch" if theirs == "torch" else f"{ours}/{theirs}"
        return ["name", "shape", f"{ours} ms", f"{theirs} ms", f"{ours} {unit}",
                f"{theirs} {unit}", ratio]
    return ["name", "shape", "convkit ms", "torch ms", "im2col ms", f"convkit {unit}",
            f"torch {unit}", f"im2col {unit}", "ours/torch", "ours/im2col"]


# Column widths of the stdout table; long names and shapes simply push the line wider.
_WIDTHS = [40, 36, 10, 10, 10, 14, 14, 14, 10, 11]
_WIDTHS_NO_IM2COL = [40, 36, 10, 10, 14, 14, 10]


def print_text_row(cells: Sequence[str]) -> None:
    widths = _WIDTHS if len(cells) == len(_WIDTHS) else _WIDTHS_NO_IM2COL
    parts = [cells[0].ljust(widths[0]), cells[1].ljust(widths[1])]
    parts += [cell.rjust(width) for cell, width in zip(cells[2:], widths[2:])]
    print(" ".join(parts), flush=True)


def print_row(row: Row, im2col: bool = True) -> None:
    if row.passed:
        print_text_row(_table_cells(row, im2col))
    else:
        print(f"{row.name.ljust(_WIDTHS[0])} {row.shape.ljust(_WIDTHS[1])} "
              f"FAILED VALIDATION, not timed: {row.error}", flush=True)


def markdown_tables(sections: list[tuple[str, str, list[Row]]]) -> str:
    """One markdown table per section, the same columns as stdout."""
    lines = []
    for title, unit, rows in sections:
        im2col = any(row.ms_torch_im2col is not None for row in rows)
        header = table_header(unit, im2col, title)
        lines += [f"### {title}", "", "| " + " | ".join(header) + " |",
                  "|" + "|".join(["---"] * 2 + ["---:"] * (len(header) - 2)) + "|"]
        for row in rows:
            if row.passed:
                cells = _table_cells(row, im2col)
            else:
                cells = [row.name, row.shape, "FAILED"] + [""] * (len(header) - 3)
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def write_json(path: str, rows: Sequence[Row], device: torch.device, threads: int) -> None:
    """Every row as one object of a JSON list, each with the run's device, thread count, dtype
    and thread environment."""
    common = {"device": str(device), "threads": threads, "dtype": "float32",
              "thread_environment": thread_environment()}
    records = [{**row.to_json(), **common} for row in rows]
    Path(path).write_text(json.dumps(records, indent=1) + "\n")


def plot_ratios(rows: Sequence[Row], path: str, title: str) -> None:
    """Horizontal bars of convkit / PyTorch time per row (default backend and im2col), log
    scale, a line at 1: bars left of it are rows where convkit is faster."""
    import matplotlib

    matplotlib.use("Agg")  # no display: write the file only
    import matplotlib.pyplot as plt

    # Ratios against PyTorch only (the synchronised rows compare convkit with itself).
    timed = [row for row in rows if row.ratio() is not None and row.section != "sync_bn"]
    labels = [row.name for row in timed]
    positions = list(range(len(timed)))
    height = 0.4
    fig, ax = plt.subplots(figsize=(10, 1.5 + 0.22 * max(len(timed), 1)))
    # Bars start at 1 (parity) and grow left when convkit is faster, right when slower.
    ax.barh([p - height / 2 for p in positions], [row.ratio() - 1 for row in timed], height,
            left=1.0, label="vs PyTorch default (oneDNN / cuDNN)", color="tab:blue")
    im2col = [(p, row.ratio_im2col()) for p, row in zip(positions, timed)
              if row.ratio_im2col() is not None]
    if im2col:
        ax.barh([p + height / 2 for p, _ in im2col], [r - 1 for _, r in im2col], height,
                left=1.0, label="vs PyTorch im2col path", color="tab:orange")
    ax.axvline(1.0, color="black", linewidth=1)
    ax.set_xscale("log")
    ax.set_yticks(positions)
    ax.set_yticklabels(labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("time ratio convkit / PyTorch (log scale; < 1: convkit faster)")
    ax.set_title(title, fontsize=9)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def memory_lines(rows: Sequence[Row]) -> list[str]:
    """The column buffer's largest size over the conv rows (against its budget) and the
    memory before and after the long training runs."""
    lines = []
    peaks = [row.extra["column_buffer_peak_mib"] for row in rows
             if row.section == "conv" and "column_buffer_peak_mib" in row.extra]
    if peaks:
        budget = os.environ.get("CONVKIT_COLUMN_BUDGET_MB", "64 (default)")
        lines.append(f"conv column buffer: largest {max(peaks):.2f} MiB over {len(peaks)} rows "
                     f"(budget CONVKIT_COLUMN_BUDGET_MB = {budget} MiB)")
    for row in rows:
        if "memory_steps" not in row.extra:
            continue
        steps = row.extra["memory_steps"]
        early = row.extra["memory_mib_after_20"]
        late = row.extra[f"memory_mib_after_{steps}"]
        if early is None or late is None:
            continue
        line = (f"{row.name}: memory after 20 steps {early:.1f} MiB, after {steps} "
                f"{late:.1f} MiB ({late - early:+.1f}); column buffer peak "
                f"{row.extra['column_buffer_peak_mib']:.2f} MiB")
        if row.extra.get("cpu_cache_mib") is not None:
            limit = os.environ.get("CONVKIT_CPU_CACHE_MB", "64 (default)")
            line += (f"; CPU block cache {row.extra['cpu_cache_mib']:.1f} MiB in free blocks "
                     f"(limit CONVKIT_CPU_CACHE_MB = {limit} MiB)")
        lines.append(line)
    return lines
