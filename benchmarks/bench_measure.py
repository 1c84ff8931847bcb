"""Each case measured: checked against PyTorch (both judged by a float64 reference), then, if
it passed, its convkit and PyTorch callables timed side by side into Rows. Conv layers, fused
BatchNorm+ReLU, the copy bandwidth, and the chapter CNN's training step with its memory."""
from __future__ import annotations

import copy
import math
import os
import sys
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

try:
    import convkit
except ImportError:
    # Run from a source checkout without an install: the extension is built in place.
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    import convkit
from convkit.experiments.models import simple_cnn

from bench_cases import BN_MODES, BN_TENSOR_PASSES, CONV_DIRECTIONS, BatchNormCase, ConvCase
from bench_timing import Clock, Row, _inside_im2col_backend, im2col_backend


def column_buffer_peak_bytes(reset: bool = False) -> int:
    """convkit's largest conv column buffer since the last reset (all threads' tiles)."""
    return int(torch.ops.convkit.column_buffer_peak_bytes(reset))


def conv_backend_name(case: ConvCase, x: torch.Tensor, w: torch.Tensor) -> str:
    """The backend F.conv2d picks for this case under the current flags (e.g. 'Mkldnn',
    'Slow2d'), so the JSON records what was really compared; 'unknown' if this torch lacks
    the (private) query."""
    try:
        backend = torch._C._select_conv_backend(
            x, w, None, [case.stride] * 2, [case.padding] * 2, [case.dilation] * 2,
            False, [0, 0], case.groups, None,
        )
    except (AttributeError, RuntimeError, TypeError):
        return "unknown"
    return str(backend).split(".")[-1]


# ----------------------------------------------------------------------------- checks


def error_vs_reference(name: str, ours: torch.Tensor, theirs: torch.Tensor,
                       reference: torch.Tensor, factor: float = 4.0) -> Optional[str]:
    """None when our error against the float64 reference is at most `factor` times
    PyTorch's (plus a few ulps of the result's scale); otherwise what went wrong."""
    if ours.shape != reference.shape:
        return f"{name}: shape {list(ours.shape)}, expected {list(reference.shape)}"
    if ours.numel() == 0:
        return None
    reference = reference.double()
    our_error = (ours.double() - reference).abs().max().item()
    their_error = (theirs.double() - reference).abs().max().item()
    scale = reference.abs().max().item()
    floor = 8 * torch.finfo(ours.dtype).eps * max(scale, 1.0)
    if not math.isfinite(our_error) or our_error > factor * their_error + floor:
        return (f"{name}: convkit error {our_error:.3e} vs PyTorch {their_error:.3e} "
                f"(allowed {factor}x + {floor:.1e})")
    return None


def first_error(errors: Sequence[Optional[str]]) -> Optional[str]:
    for error in errors:
        if error is not None:
            return error
    return None


# ----------------------------------------------------------------------------- conv


def _conv_call(conv: Callable[..., torch.Tensor], case: ConvCase, x: torch.Tensor,
               w: torch.Tensor, b: Optional[torch.Tensor]) -> torch.Tensor:
    return conv(x, w, b, case.stride, case.padding, case.dilation, case.groups)


def _conv_tensors(
    case: ConvCase, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor], torch.Tensor]:
    """x [N, C, H, W], w [O, C/groups, k, k] at PyTorch's init scale, b [O] or None, and an
    output gradient dy [N, O, oH, oW]; all fresh random values."""
    x = torch.randn(case.batch, case.in_channels, case.height, case.width, device=device)
    fan_in = (case.in_channels // case.groups) * case.kernel * case.kernel
    w = torch.randn(case.out_channels, case.in_channels // case.groups, case.kernel, case.kernel,
                    device=device) / math.sqrt(fan_in)
    b = torch.randn(case.out_channels, device=device) * 0.1 if case.bias else None
    out_h, out_w = case.output_size()
    dy = torch.randn(case.batch, case.out_channels, out_h, out_w, device=device)
    return x, w, b, dy


def _leaves(x: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor],
            input_grad: bool = True) -> list[torch.Tensor]:
    """The tensors a backward differentiates: [x (when input_grad), w, b (when given)];
    x itself stays first in the conv call either way."""
    leaves = [x.detach().requires_grad_(input_grad), w.detach().requires_grad_()]
    if b is not None:
        leaves.append(b.detach().requires_grad_())
    return leaves


def _wanted(leaves: list[torch.Tensor]) -> list[torch.Tensor]:
    return [t for t in leaves if t.requires_grad]


def validate_conv(case: ConvCase, x: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor],
                  dy: torch.Tensor) -> Optional[str]:
    """convkit's output and its input/weight/bias gradients against F.conv2d's, both judged
    by a float64 reference. None when they agree, else the first discrepancy."""
    try:
        results = {}
        for impl, conv, dtype in (("convkit", convkit.conv2d, None), ("torch", F.conv2d, None),
                                  ("reference", F.conv2d, torch.float64)):
            tensors = [t if dtype is None or t is None else t.to(dtype) for t in (x, w, b)]
            leaves = _leaves(*tensors, input_grad=case.input_grad)
            bias = leaves[2] if b is not None else None
            y = _conv_call(conv, case, leaves[0], leaves[1], bias)
            grad_y = dy if dtype is None else dy.to(dtype)
            grads = torch.autograd.grad(y, _wanted(leaves), grad_y)
            results[impl] = (y.detach(),) + tuple(grads)
    except Exception as exc:  # a kernel that raises is as wrong as one that miscomputes
        return f"raised {type(exc).__name__}: {exc}"
    names = ("output", "grad_input", "grad_weight", "grad_bias")
    if not case.input_grad:
        names = ("output", "grad_weight", "grad_bias")
    return first_error([
        error_vs_reference(name, ours, theirs, ref)
        for name, ours, theirs, ref in zip(
            names, results["convkit"], results["torch"], results["reference"]
        )
    ])


def _conv_timed_fn(direction: str, conv: Callable[..., torch.Tensor], case: ConvCase,
                   x: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor],
                   dy: torch.Tensor) -> Callable[[], Any]:
    """The callable one timing repeats. forward runs without autograd (the kernel alone);
    backward replays one recorded graph (retain_graph) for all three gradients;
    forward+backward records and runs a fresh graph each call, as a training step does."""
    leaves = _leaves(x, w, b, case.input_grad)
    wanted = _wanted(leaves)
    bias = leaves[2] if b is not None else None
    if direction == "forward":
        def run_forward() -> torch.Tensor:
            with torch.no_grad():
                return _conv_call(conv, case, x, w, b)
        return run_forward
    if direction == "backward":
        y = _conv_call(conv, case, leaves[0], leaves[1], bias)

        def run_backward() -> Any:
            return torch.autograd.grad(y, wanted, dy, retain_graph=True)
        return run_backward

    def run_forward_backward() -> Any:
        y = _conv_call(conv, case, leaves[0], leaves[1], bias)
        return torch.autograd.grad(y, wanted, dy)
    return run_forward_backward


def bench_conv_case(case: ConvCase, section: str, device: torch.device,
                    clock: Clock) -> list[Row]:
    """Three rows (forward, backward, forward+backward) for one conv layer."""
    x, w, b, dy = _conv_tensors(case, device)
    error = validate_conv(case, x, w, b, dy)
    backends = {"torch_backend": conv_backend_name(case, x, w)}
    with im2col_backend(device):
        backends["torch_im2col_backend"] = conv_backend_name(case, x, w)
    rows = []
    for direction in CONV_DIRECTIONS:
        # Backward computes the input and the weight gradient: each costs a forward.
        backward_worth = 2 if case.input_grad else 1
        forwards_worth = {"forward": 1, "backward": backward_worth,
                          "forward+backward": 1 + backward_worth}[direction]
        flops = case.forward_flops() * forwards_worth
        row = Row(section, f"{case.label} {direction}", case.describe(), error is None,
                  rate_unit="GFLOP/s", work=flops, error=error,
                  extra={"direction": direction, **backends})
        if error is None:
            ours = _conv_timed_fn(direction, convkit.conv2d, case, x, w, b, dy)
            theirs = _conv_timed_fn(direction, F.conv2d, case, x, w, b, dy)
            # The flags are global and read again in the backward, so both the graph's
            # recording and every timed call run inside them.
            with im2col_backend(device):
                im2col = _conv_timed_fn(direction, F.conv2d, case, x, w, b, dy)
            column_buffer_peak_bytes(reset=True)
            row.ms_convkit, row.ms_torch, row.ms_torch_im2col = clock.compare(
                [ours, theirs, _inside_im2col_backend(device, im2col)])
            row.extra["column_buffer_peak_mib"] = column_buffer_peak_bytes() / 2**20
        rows.append(row)
    return rows


# ----------------------------------------------------------------------------- batch norm


_TORCH_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": F.relu,
    "relu6": F.relu6,
    "leaky_relu": lambda z: F.leaky_relu(z, 0.1),
    "silu": F.silu,
    "hardswish": F.hardswish,
}


def _torch_batch_norm(activation: str) -> Callable[..., torch.Tensor]:
    """What a user writes without convkit: nn.BatchNorm2d then the activation, two kernels."""
    act = _TORCH_ACTIVATIONS[activation]

    def run(x: torch.Tensor, running_mean: Optional[torch.Tensor],
            running_var: Optional[torch.Tensor], weight: torch.Tensor, bias: torch.Tensor,
            training: bool) -> torch.Tensor:
        return act(F.batch_norm(x, running_mean, running_var, weight, bias, training, 0.1, 1e-5))
    return run


def _convkit_batch_norm(activation: str) -> Callable[..., torch.Tensor]:
    """convkit's fused kernel for the activation (ReLU through convkit.batch_norm_relu)."""
    def run(x: torch.Tensor, running_mean: Optional[torch.Tensor],
            running_var: Optional[torch.Tensor], weight: torch.Tensor, bias: torch.Tensor,
            training: bool) -> torch.Tensor:
        if activation == "relu":
            return convkit.batch_norm_relu(x, running_mean, running_var, weight, bias, training,
                                           0.1, 1e-5)
        return convkit.functional.batch_norm_activation(
            x, running_mean, running_var, weight, bias, training, 0.1, 1e-5, activation,
            negative_slope=0.1)
    return run


def _bn_tensors(case: BatchNormCase, device: torch.device) -> dict[str, torch.Tensor]:
    """x [N, C, H, W] with a non-zero mean, affine parameters and running statistics [C],
    and an output gradient dy [N, C, H, W]."""
    channels = case.shape[1]
    return {
        "x": torch.randn(case.shape, device=device) * 1.5 + 0.3,
        "weight": 1 + 0.1 * torch.randn(channels, device=device),
        "bias": 0.1 * torch.randn(channels, device=device),
        "running_mean": 0.1 * torch.randn(channels, device=device),
        "running_var": 0.5 + torch.rand(channels, device=device),
        "dy": torch.randn(case.shape, device=device),
    }


def validate_batch_norm(t: dict[str, torch.Tensor], activation: str) -> Optional[str]:
    """convkit's fused BatchNorm+activation against F.batch_norm + the activation: training output,
    running-statistics update, the three gradients, and the eval output, each judged by a
    float64 reference."""
    results = {}
    try:
        for impl, fn, dtype in (("convkit", _convkit_batch_norm(activation), torch.float32),
                                ("torch", _torch_batch_norm(activation), torch.float32),
                                ("reference", _torch_batch_norm(activation), torch.float64)):
            x, weight, bias = (
                t[k].detach().to(dtype).requires_grad_() for k in ("x", "weight", "bias")
            )
            running_mean = t["running_mean"].to(dtype).clone()
            running_var = t["running_var"].to(dtype).clone()
            y = fn(x, running_mean, running_var, weight, bias, True)
            grads = torch.autograd.grad(y, (x, weight, bias), t["dy"].to(dtype))
            with torch.no_grad():
                y_eval = fn(x, t["running_mean"].to(dtype), t["running_var"].to(dtype),
                            weight, bias, False)
            results[impl] = (y.detach(), running_mean, running_var) + tuple(grads) + (y_eval,)
    except Exception as exc:
        return f"raised {type(exc).__name__}: {exc}"
    names = ("train output", "running_mean", "running_var", "grad_input", "grad_weight",
             "grad_bias", "eval output")
    return first_error([
        error_vs_reference(name, ours, theirs, ref)
        for name, ours, theirs, ref in zip(
            names, results["convkit"], results["torch"], results["reference"]
        )
    ])


def _bn_timed_fn(mode: str, fn: Callable[..., torch.Tensor],
                 t: dict[str, torch.Tensor]) -> Callable[[], Any]:
    """train forward updates private copies of the running statistics each call, as a
    module in training mode does; backward replays one recorded graph."""
    running_mean = t["running_mean"].clone()
    running_var = t["running_var"].clone()
    if mode == "train forward":
        def run_train() -> torch.Tensor:
            with torch.no_grad():
                return fn(t["x"], running_mean, running_var, t["weight"], t["bias"], True)
        return run_train
    if mode == "eval forward":
        def run_eval() -> torch.Tensor:
            with torch.no_grad():
                return fn(t["x"], running_mean, running_var, t["weight"], t["bias"], False)
        return run_eval
    leaves = [t[k].detach().requires_grad_() for k in ("x", "weight", "bias")]
    if mode == "train forward+backward":
        def run_train_step() -> Any:
            y = fn(leaves[0], running_mean, running_var, leaves[1], leaves[2], True)
            return torch.autograd.grad(y, leaves, t["dy"])
        return run_train_step
    y = fn(leaves[0], running_mean, running_var, leaves[1], leaves[2], True)

    def run_backward() -> Any:
        return torch.autograd.grad(y, leaves, t["dy"], retain_graph=True)
    return run_backward


def bench_batch_norm_case(case: BatchNormCase, device: torch.device, clock: Clock,
                          copy_gbps: Optional[float]) -> list[Row]:
    """Three rows (train forward, backward, eval forward) for one activation shape."""
    t = _bn_tensors(case, device)
    error = validate_batch_norm(t, case.activation)
    tensor_bytes = t["x"].numel() * t["x"].element_size()
    rows = []
    for mode in BN_MODES:
        row = Row("batchnorm_act", f"{case.label} {mode}", case.describe(), error is None,
                  rate_unit="GB/s", work=float(BN_TENSOR_PASSES[mode] * tensor_bytes), error=error,
                  extra={"direction": mode, "gbps_copy": copy_gbps,
                         "activation": case.activation})
        if error is None:
            row.ms_convkit, row.ms_torch = clock.compare([
                _bn_timed_fn(mode, _convkit_batch_norm(case.activation), t),
                _bn_timed_fn(mode, _torch_batch_norm(case.activation), t),
            ])
        rows.append(row)
    return rows


def copy_bandwidth_gbps(mib: int, device: torch.device, clock: Clock) -> float:
    """dst.copy_(src) on a tensor of `mib` MiB (bigger than the caches): reads and writes
    count, so GB/s = 2 * bytes / time. The ceiling an element-wise pass can hope for."""
    src = torch.randn(mib * (1 << 20) // 4, device=device)
    dst = torch.empty_like(src)
    ms = clock.median_ms(lambda: dst.copy_(src))
    return 2 * src.numel() * src.element_size() / (ms * 1e-3) / 1e9


# ----------------------------------------------------------------------------- training step


def _loss_and_grads(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, ...]:
    model.zero_grad(set_to_none=True)
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    return (loss.detach(),) + tuple(p.grad.detach().clone() for p in model.parameters())


def validate_training(torch_model: nn.Module, convkit_model: nn.Module, x: torch.Tensor,
                      y: torch.Tensor) -> Optional[str]:
    """The loss and every parameter gradient of one step, convkit against torch, judged by
    the torch model in float64."""
    reference_model = copy.deepcopy(torch_model).double()
    try:
        ours = _loss_and_grads(convkit_model, x, y)
    except Exception as exc:
        return f"raised {type(exc).__name__}: {exc}"
    theirs = _loss_and_grads(torch_model, x, y)
    reference = _loss_and_grads(reference_model, x.double(), y)
    names = ["loss"] + [f"grad {name}" for name, _ in torch_model.named_parameters()]
    return first_error([
        error_vs_reference(name, a, b, r) for name, a, b, r in zip(names, ours, theirs, reference)
    ])


def _training_step_fn(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Callable[[], Any]:
    """forward, loss, backward, Adam step; the model keeps training across calls."""
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
    return step


def bench_training_step(bn: bool, batch: int, device: torch.device, clock: Clock,
                        memory: bool = True) -> Row:
    """One row: a training step of the chapter CNN (with or without batchnorm) at `batch`,
    convkit.nn.convert(model) against the same torch model (default and im2col convs); with
    `memory`, also the memory over a longer run (memory_over_steps)."""
    torch_model = simple_cnn(norm="batch" if bn else None).to(device).train()
    convkit_model = convkit.nn.convert(torch_model)
    x = torch.randn(batch, 1, 28, 28, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    error = validate_training(torch_model, convkit_model, x, y)
    name = f"chapter CNN{' + BN' if bn else ''} N={batch} Adam step"
    row = Row("training_step", name, f"[{batch},1,28,28]", error is None, rate_unit="img/s",
              work=float(batch), error=error, extra={"direction": "train step"})
    if error is None:
        im2col_model = copy.deepcopy(torch_model)
        with im2col_backend(device):
            im2col_step = _training_step_fn(im2col_model, x, y)
        row.ms_convkit, row.ms_torch, row.ms_torch_im2col = clock.compare([
            _training_step_fn(convkit_model, x, y),
            _training_step_fn(torch_model, x, y),
            _inside_im2col_backend(device, im2col_step),
        ])
        if memory:
            row.extra.update(memory_over_steps(convkit_model, x, y, device))
    return row


def resident_mib() -> Optional[float]:
    """The process's resident memory (Linux /proc), None where it cannot be read."""
    try:
        with open("/proc/self/statm") as statm:
            pages = int(statm.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return None


def memory_over_steps(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                      device: torch.device, steps: int = 300) -> dict[str, Any]:
    """Memory across a longer run of convkit training steps: resident memory (CPU) or
    allocated memory (CUDA) after the first 20 steps and after `steps`; with the column
    buffer's peak and, on the CPU, what the block cache holds in free blocks at the end (part
    of the resident figure). Flat memory means the second figure equals the first."""
    step = _training_step_fn(model, x, y)
    column_buffer_peak_bytes(reset=True)

    def used_mib() -> Optional[float]:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            return torch.cuda.memory_allocated(device) / 2**20
        return resident_mib()
    for _ in range(20):
        step()
    early = used_mib()
    for _ in range(steps - 20):
        step()
    late = used_mib()
    return {"memory_steps": steps, "memory_mib_after_20": early,
            f"memory_mib_after_{steps}": late,
            "column_buffer_peak_mib": column_buffer_peak_bytes() / 2**20,
            "cpu_cache_mib": (convkit.cpu_cache_bytes() / 2**20 if device.type == "cpu"
                              else None)}
