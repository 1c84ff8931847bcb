"""Real models: torchvision's ResNet-18 and MobileNetV2 (random weights, nothing downloaded),
``convkit.nn.convert(model)`` against the torch model it was converted from (oneDNN on the
CPU): an SGD training step and an eval forward, float32. The channels_last cases run both
models, and the input, in channels-last memory (torch then runs oneDNN on NHWC), and time
convkit's NCHW model beside them: "a channels_last model trains at least as fast as NCHW".

Each model is first checked (validate_model): its float32 outputs, in training and in eval
mode, within 4x torch's float32 error against the torch model in float64; then the loss and
every parameter gradient of one step in float64 against the torch model in float64. Gradients
are not judged in float32: there a model's errors against the float64 model are dominated by
ReLUs (and ReLU6s) whose input rounds to the other side of a kink, which ones do changes with
any rounding difference (the memory format, the summation order), so torch's own
channels_last model's error is up to 10x its NCHW model's at some parameter, and ours alike
(tests check the float32 kernels' gradients layer by layer). A flip moves an output by no more
than the rounding that caused it, so outputs are judged in float32. Then both steps are timed
in interleaved rounds (Clock.compare). torchvision is needed; without it the section
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
from bench_measure import error_vs_reference, first_error
from bench_timing import Clock, Row

# (model, batch, input size, memory format) per run size: the issue-26 goals' cases in the
# full run.
NCHW, CHANNELS_LAST = "contiguous", "channels_last"
FULL_MODELS = (("resnet18", 32, 64, NCHW), ("resnet18", 8, 224, NCHW),
               ("mobilenet_v2", 32, 64, NCHW), ("resnet18", 32, 64, CHANNELS_LAST),
               ("mobilenet_v2", 32, 64, CHANNELS_LAST))
QUICK_MODELS = (("resnet18", 8, 64, NCHW), ("mobilenet_v2", 8, 64, NCHW),
                ("resnet18", 8, 64, CHANNELS_LAST), ("mobilenet_v2", 8, 64, CHANNELS_LAST))
TINY_MODELS = (("resnet18", 4, 64, NCHW), ("resnet18", 4, 64, CHANNELS_LAST))
_FORMATS = {NCHW: torch.contiguous_format, CHANNELS_LAST: torch.channels_last}


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


def validate_float64(torch_model: nn.Module, convkit_model: nn.Module, x: torch.Tensor,
                     y: torch.Tensor, rtol: float = 1e-9) -> Optional[str]:
    """The loss and every parameter gradient of one step of both models in float64: None when
    they agree within rtol of each result's scale, otherwise what differs."""
    results = []
    for model in (convkit_model, torch_model):
        model = copy.deepcopy(model).double()
        loss = F.cross_entropy(model(x.double()), y)
        loss.backward()
        results.append([("loss", loss.detach())] +
                       [(f"grad {name}", p.grad) for name, p in model.named_parameters()])
    for (name, ours), (_, theirs) in zip(*results):
        error = (ours - theirs).abs().max().item()
        allowed = rtol * max(theirs.abs().max().item(), 1.0)
        if not error <= allowed:
            return (f"{name}: convkit differs from PyTorch by {error:.3e} in float64 "
                    f"(allowed {allowed:.1e})")
    return None


def _outputs(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A copy of the model's output for x in training mode (batch statistics, dropout off),
    then in eval mode (running statistics): [N, classes] each."""
    model = copy.deepcopy(model).train()
    with torch.no_grad():
        with dropout_off(model):
            training_output = model(x)
        return training_output, model.eval()(x)


def validate_model(torch_model: nn.Module, convkit_model: nn.Module, x: torch.Tensor,
                   y: torch.Tensor) -> Optional[str]:
    """None when convkit's model computes torch's: float32 outputs (training and eval mode)
    within 4x torch's error against the float64 torch model, and one step's loss and
    gradients equal in float64 (validate_float64); otherwise what differs."""
    try:
        ours = _outputs(convkit_model, x)
    except Exception as exc:
        return f"raised {type(exc).__name__}: {exc}"
    theirs = _outputs(torch_model, x)
    reference = _outputs(copy.deepcopy(torch_model).double(), x.double())
    names = ("float32 output (train mode)", "float32 output (eval mode)")
    return first_error([error_vs_reference(*args) for args in zip(names, ours, theirs, reference)]
                       + [validate_float64(torch_model, convkit_model, x, y)])


def bench_model_case(name: str, batch: int, size: int, device: torch.device, clock: Clock,
                     memory_format: str = NCHW) -> list[Row]:
    """Two rows: the training step and the eval forward of one model at one batch and size,
    its parameters and input in `memory_format` (NCHW or CHANNELS_LAST); a channels_last row
    also has convkit's NCHW model's time (ms_convkit_nchw), measured in the same rounds."""
    layout = _FORMATS[memory_format]
    nchw_torch_model = _model(name).to(device).train()
    nchw_model = convkit.nn.convert(nchw_torch_model)
    torch_model = copy.deepcopy(nchw_torch_model).to(memory_format=layout)
    convkit_model = copy.deepcopy(nchw_model).to(memory_format=layout)
    fused = convkit.nn.fusion_summary(convkit_model).pairs
    x_nchw = torch.randn(batch, 3, size, size, device=device)
    x = x_nchw.contiguous(memory_format=layout)
    y = torch.randint(0, 10, (batch,), device=device)
    with dropout_off(torch_model), dropout_off(convkit_model):
        error = validate_model(torch_model, convkit_model, x, y)
    shape = f"[{batch},3,{size},{size}]"
    label = "" if memory_format == NCHW else f" {memory_format}"
    rows = []
    for direction in ("train step", "eval forward"):
        row = Row("models", f"{name} N={batch} {size}x{size}{label} {direction}", shape,
                  error is None, rate_unit="img/s", work=float(batch), error=error,
                  extra={"direction": direction, "model": name, "fused_bn_act": fused,
                         "memory_format": memory_format})
        if error is None:
            ours, theirs = copy.deepcopy(convkit_model), copy.deepcopy(torch_model)
            ours_nchw = copy.deepcopy(nchw_model)
            if direction == "train step":
                fns = [_sgd_step(ours, x, y), _sgd_step(theirs, x, y),
                       _sgd_step(ours_nchw, x_nchw, y)]
            else:
                fns = [_eval_forward(ours.eval(), x), _eval_forward(theirs.eval(), x),
                       _eval_forward(ours_nchw.eval(), x_nchw)]
            if memory_format == NCHW:
                fns = fns[:2]
            times = clock.compare(fns)
            row.ms_convkit, row.ms_torch = times[0], times[1]
            if memory_format != NCHW:
                row.extra["ms_convkit_nchw"] = times[2]
        rows.append(row)
    return rows
