"""Every figure the trainer and the experiments draw, with matplotlib's object API
(``Figure``, no pyplot state), so plots work headless and never open windows. Each function
returns the Figure; :func:`save` writes it as PNG.

matplotlib is imported when the first figure is made, not with this module: the callbacks
import it, and a training run that draws nothing never pays for matplotlib."""
from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Sequence, Union

import torch

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = [
    "save",
    "plot_loss",
    "plot_sched",
    "plot_layer_stats",
    "color_dim",
    "show_images",
    "plot_edge_maps",
    "plot_feature_batch",
]


def _figure(**kwargs: Any) -> Figure:
    from matplotlib.figure import Figure

    return Figure(**kwargs)


def save(fig: Figure, path: Union[str, os.PathLike], dpi: int = 100) -> Path:
    """Write ``fig`` as a PNG (creating the folder); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, bbox_inches="tight")
    return path


def plot_loss(recorder, skip_start: int = 5, with_valid: bool = True, title: str = "") -> Figure:
    """Smoothed training loss per batch (from batch ``skip_start``) and the validation loss
    at the end of each epoch, against the number of training batches."""
    fig = _figure(figsize=(6, 4), layout="constrained")
    ax = fig.add_subplot(1, 1, 1)
    losses = recorder.losses
    start = min(skip_start, max(len(losses) - 1, 0))
    ax.plot(range(start, len(losses)), losses[start:], label="train (smoothed)")
    if with_valid and recorder.values:
        valid = [row[1] for row in recorder.values]
        ax.plot(recorder.iters, valid, marker="o", label="valid")
    ax.set_xlabel("training batch")
    ax.set_ylabel("loss")
    if title:
        ax.set_title(title)
    ax.legend()
    return fig


def plot_sched(recorder, title: str = "") -> Figure:
    """Learning rate and momentum per training batch, side by side."""
    fig = _figure(figsize=(12, 4), layout="constrained")
    for i, (name, values) in enumerate((("lr", recorder.lrs), ("mom", recorder.moms))):
        ax = fig.add_subplot(1, 2, i + 1)
        ax.plot(values)
        ax.set_xlabel("training batch")
        ax.set_ylabel(name)
    if title:
        fig.suptitle(title)
    return fig


def plot_layer_stats(stats, idx: int, title: str = "") -> Figure:
    """Three panels for hooked module ``idx`` of an ActivationStats: mean, std and % of
    activations near zero, per training batch."""
    values = stats.layer_stats(idx)
    fig = _figure(figsize=(12, 3.4), layout="constrained")
    panels = (("mean", values[:, 0]), ("std", values[:, 1]), ("% near zero", values[:, 2] * 100))
    for i, (name, series) in enumerate(panels):
        ax = fig.add_subplot(1, 3, i + 1)
        ax.plot(series.tolist())
        ax.set_title(name)
        ax.set_xlabel("training batch")
    fig.suptitle(title or f"layer {idx}: {stats.names[idx]}")
    return fig


def color_dim(stats, idx: int, figsize: tuple[float, float] = (10, 5), title: str = "") -> Figure:
    """The "colorful dimension" of hooked module ``idx``: one column per training batch, the
    40 histogram bins of [0, 10] upwards (origin lower), colour = log1p(count)."""
    fig = _figure(figsize=figsize, layout="constrained")
    ax = fig.add_subplot(1, 1, 1)
    ax.imshow(stats.hist(idx).numpy(), origin="lower", aspect="auto", cmap="viridis")
    ax.axis("off")
    ax.set_title(title or f"color_dim({idx}): {stats.names[idx]}")
    return fig


def show_images(
    images: Sequence[torch.Tensor], titles: Optional[Sequence[str]] = None, ncols: int = 4,
    cmap: str = "Greys", size: float = 2.0, suptitle: str = "",
) -> Figure:
    """A grid of 2-D images ([H, W] each), axes off, the chapter's 'Greys' colour map."""
    n = len(images)
    ncols = max(1, min(ncols, n))
    nrows = (n + ncols - 1) // ncols
    fig = _figure(figsize=(size * ncols, size * nrows + (0.4 if suptitle else 0)), layout="constrained")
    for i, image in enumerate(images):
        ax = fig.add_subplot(nrows, ncols, i + 1)
        ax.imshow(torch.as_tensor(image).detach().float().numpy(), cmap=cmap)
        ax.axis("off")
        if titles is not None:
            ax.set_title(titles[i], fontsize=9)
    if suptitle:
        fig.suptitle(suptitle)
    return fig


def plot_edge_maps(image: torch.Tensor, maps: torch.Tensor, names: Sequence[str], suptitle: str = "") -> Figure:
    """A digit [H, W] and its feature maps [K, h, w], one panel each."""
    images = [image] + [maps[k] for k in range(maps.shape[0])]
    titles = ["image"] + list(names)
    return show_images(images, titles, ncols=len(images), suptitle=suptitle)


def plot_feature_batch(
    batch: torch.Tensor, features: torch.Tensor, names: Sequence[str], n_images: int = 4,
    suptitle: str = "",
) -> Figure:
    """The first ``n_images`` of a batch [N, 1, H, W] (one row each) beside their feature
    maps [N, K, h, w]."""
    n_images = min(n_images, batch.shape[0])
    k = features.shape[1]
    images, titles = [], []
    for i in range(n_images):
        images.append(batch[i, 0])
        titles.append(f"xb[{i}]")
        for j in range(k):
            images.append(features[i, j])
            titles.append(names[j] if i == 0 else "")
    return show_images(images, titles, ncols=k + 1, suptitle=suptitle)
