"""The chapter's CNNs, built from torch's layers, and the backends they run on: convkit's
kernels (``convkit.nn.convert``) or torch's own."""
from __future__ import annotations

import math
from typing import Optional

from torch import nn

import convkit

__all__ = ["BACKENDS", "conv", "sample_cnn", "simple_cnn", "on_backend"]

BACKENDS = ("convkit", "torch")


def conv(
    ni: int, nf: int, ks: int = 3, act: bool = True, norm: Optional[str] = None,
    act_first: bool = False, size: Optional[int] = None,
) -> nn.Module:
    """The chapter's ``conv``: Conv2d(ni, nf, ks, stride 2, padding ks//2) [+ norm] [+ ReLU].

    norm: None, 'batch' (BatchNorm2d), 'group' (GroupNorm, groups of gcd(nf, 4)) or 'layer'
    (LayerNorm over [nf, size, size]: the output's spatial size is needed). ``act_first``
    puts the ReLU before the normalisation (a "further research" question).
    input [N, ni, H, W] -> [N, nf, ceil(H/2), ceil(W/2)].
    """
    layers: list[nn.Module] = [nn.Conv2d(ni, nf, stride=2, kernel_size=ks, padding=ks // 2)]
    if norm is None and act:
        return nn.Sequential(layers[0], nn.ReLU())
    if norm is None:
        return layers[0]
    if norm == "batch":
        norm_layer: nn.Module = nn.BatchNorm2d(nf)
    elif norm == "group":
        norm_layer = nn.GroupNorm(math.gcd(nf, 4), nf)
    elif norm == "layer":
        if size is None:
            raise ValueError("conv: norm='layer' needs the output size")
        norm_layer = nn.LayerNorm([nf, size, size])
    else:
        raise ValueError(f"conv: unknown norm {norm!r}")
    if act and act_first:
        layers += [nn.ReLU(), norm_layer]
    elif act:
        layers += [norm_layer, nn.ReLU()]
    else:
        layers.append(norm_layer)
    return nn.Sequential(*layers)


def sample_cnn() -> nn.Sequential:
    """The MNIST_SAMPLE CNN of experiment 2 (6,722 parameters): [N, 1, 28, 28] -> [N, 2]."""
    return nn.Sequential(
        conv(1, 4),             # 14x14
        conv(4, 8),             # 7x7
        conv(8, 16),            # 4x4
        conv(16, 32),           # 2x2
        conv(32, 2, act=False), # 1x1
        nn.Flatten(),
    )


def simple_cnn(norm: Optional[str] = None, act_first: bool = False) -> nn.Sequential:
    """The chapter's MNIST ``simple_cnn`` (5x5 first kernel, 8-16-32-64-10 channels), with
    an optional normalisation layer in every conv: [N, 1, 28, 28] -> [N, 10]."""
    return nn.Sequential(
        conv(1, 8, ks=5, norm=norm, act_first=act_first, size=14),
        conv(8, 16, norm=norm, act_first=act_first, size=7),
        conv(16, 32, norm=norm, act_first=act_first, size=4),
        conv(32, 64, norm=norm, act_first=act_first, size=2),
        conv(64, 10, act=False, norm=norm, act_first=act_first, size=1),
        nn.Flatten(),
    )


def on_backend(model: nn.Module, backend: str) -> nn.Module:
    """``model`` on convkit's kernels (``convert``) or left on torch's."""
    if backend == "convkit":
        return convkit.nn.convert(model)
    if backend == "torch":
        return model
    raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
