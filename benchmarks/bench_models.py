"""Real models: torchvision's ResNet-18 and MobileNetV2 (random weights, nothing downloaded),
``convkit.nn.convert(model)`` against the torch model it was converted from (oneDNN on the
CPU): an SGD training step and an eval forward, float32.

Each model is first checked as the chapter's CNN is (bench_measure.validate_training: the loss
and every parameter gradient of one step against the torch model in float64), then both steps
are timed in interleaved rounds (Clock.compare). torchvision is needed; without it the section
says so and is left out.
"""
from __future__ import annotations

import contextlib
import copy
from typing import Any, Callable, Iterator, Optional

import torch
import torch.nn.functional as F
from torch import nn

import convkit
from bench_measure import validate_training
from bench_timing import Clock, Row

# (model, batch, input size) per run size: the issue-26 goals' cases in the full run.
FULL_MODELS = (("resnet18", 32, 64), ("resnet18", 8, 224), ("mobilenet_v2", 32, 64))
QUICK_MODELS = (("resnet18", 8, 64), ("mobilenet_v2", 8, 64))
TINY_MODELS = (("resnet18", 4, 64),)


def torchvision_missing() -> Optional[str]:
    """Why the section cannot run, or None."""
    try:
        import torchvision  # noqa: F401
    except ImportError as error:
        return f"torchvision is not installed ({error}); pip install torchvision"
    return None


def _model(name: str) -> nn.Module:
    import torchvision

    torch.manual_seed(0)
    return getattr(torchvision.models, name)(weights=None, num_classes=10)


@contextlib.contextmanager
def dropout_off(model: nn.Module) -> Iterator[None]:
    """The model's dropout layers in eval mode for the block: the validation compares one step
    of three models (float32 twice, float64), which random masks would make differ (MobileNetV2
    has one)."""
    layers = [m for m in model.modules() if isinstance(m, nn.modules.dropout._DropoutNd)]
    modes = [m.training for m in layers]
    for m in layers:
        m.eval()
    try:
        yield
    finally:
        for m, mode in zip(layers, modes):
            m.train(mode)


def _sgd_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Callable[[], Any]:
    """forward, cross-entropy, backward, SGD step (momentum 0.9); the model keeps training."""
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
    return step


def _eval_forward(model: nn.Module, x: torch.Tensor) -> Callable[[], Any]:
    def forward() -> torch.Tensor:
        with torch.no_grad():
            return model(x)
    return forward


def bench_model_case(name: str, batch: int, size: int, device: torch.device,
                     clock: Clock) -> list[Row]:
    """Two rows: the training step and the eval forward of one model at one batch and size."""
    torch_model = _model(name).to(device).train()
    convkit_model = convkit.nn.convert(torch_model)
    fused = convkit.nn.fusion_summary(convkit_model).pairs
    x = torch.randn(batch, 3, size, size, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    with dropout_off(torch_model), dropout_off(convkit_model):
        error = validate_training(torch_model, convkit_model, x, y)
    shape = f"[{batch},3,{size},{size}]"
    rows = []
    for direction in ("train step", "eval forward"):
        row = Row("models", f"{name} N={batch} {size}x{size} {direction}", shape, error is None,
                  rate_unit="img/s", work=float(batch), error=error,
                  extra={"direction": direction, "model": name, "fused_bn_act": fused})
        if error is None:
            ours, theirs = copy.deepcopy(convkit_model), copy.deepcopy(torch_model)
            if direction == "train step":
                fns = [_sgd_step(ours, x, y), _sgd_step(theirs, x, y)]
            else:
                fns = [_eval_forward(ours.eval(), x), _eval_forward(theirs.eval(), x)]
            row.ms_convkit, row.ms_torch = clock.compare(fns)
        rows.append(row)
    return rows
