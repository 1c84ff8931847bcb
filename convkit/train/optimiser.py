"""fastai's Adam, the weight-decay parameter groups fastai makes, and access to an
optimiser's hyper-parameters by fastai's names (for any torch optimiser)."""
from __future__ import annotations

from typing import Callable, Iterable, Optional

import torch
from torch import nn

__all__ = ["Adam", "param_groups", "set_hyper", "get_hyper"]


def _is_norm_layer(module: nn.Module) -> bool:
    norm_types = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm)
    return isinstance(module, norm_types)


def param_groups(model: nn.Module, wd: float) -> list[dict]:
    """Two parameter groups as fastai's defaults make them (``bn_wd=False``): weight decay
    ``wd`` on weights, none on normalisation layers' parameters nor on any bias."""
    decay, no_decay = [], []
    seen = set()
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            if _is_norm_layer(module) or name == "bias":
                no_decay.append(p)
            else:
                decay.append(p)
    groups = []
    if decay:
        groups.append({"params": decay, "wd": wd, "do_wd": True})
    if no_decay:
        groups.append({"params": no_decay, "wd": 0.0, "do_wd": False})
    return groups


class Adam(torch.optim.Optimizer):
    """fastai's Adam: decoupled weight decay (``p *= 1 - lr * wd`` before the step, as
    AdamW), ``grad_avg = mom * grad_avg + (1 - mom) * grad``, ``sqr_avg = sqr_mom * sqr_avg +
    (1 - sqr_mom) * grad**2``, both bias-corrected, ``eps`` added after the square root:

        p -= lr * (grad_avg / (1 - mom**t)) / (sqrt(sqr_avg / (1 - sqr_mom**t)) + eps)

    Hyper-parameters per group: lr, mom, sqr_mom, eps, wd. With constant ``mom`` this is
    ``torch.optim.AdamW(betas=(mom, sqr_mom), eps=eps, weight_decay=wd)``; the 1cycle
    schedule changes ``mom`` every batch, and the bias correction uses the current one.
    """

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        mom: float = 0.9,
        sqr_mom: float = 0.99,
        eps: float = 1e-5,
        wd: float = 0.01,
    ) -> None:
        if lr < 0 or eps < 0 or wd < 0:
            raise ValueError(f"Adam: lr, eps and wd must be >= 0, got {lr}, {eps}, {wd}")
        super().__init__(params, dict(lr=lr, mom=mom, sqr_mom=sqr_mom, eps=eps, wd=wd))

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], torch.Tensor]] = None) -> Optional[torch.Tensor]:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, mom, sqr_mom = group["lr"], group["mom"], group["sqr_mom"]
            eps, wd = group["eps"], group["wd"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["grad_avg"] = torch.zeros_like(p)
                    state["sqr_avg"] = torch.zeros_like(p)
                if wd != 0:
                    p.mul_(1 - lr * wd)
                state["step"] += 1
                step = state["step"]
                grad_avg, sqr_avg = state["grad_avg"], state["sqr_avg"]
                grad_avg.mul_(mom).add_(grad, alpha=1 - mom)
                sqr_avg.mul_(sqr_mom).addcmul_(grad, grad, value=1 - sqr_mom)
                debias1 = 1 - mom ** step
                debias2 = 1 - sqr_mom ** step
                denom = (sqr_avg / debias2).sqrt_().add_(eps)
                p.addcdiv_(grad_avg, denom, value=-lr / debias1)
        return loss

    def set_hyper(self, name: str, value: float) -> None:
        """Set hyper-parameter ``name`` on every group (``wd`` only where weight decay applies)."""
        set_hyper(self, name, value)


def set_hyper(opt: torch.optim.Optimizer, name: str, value: float) -> None:
    """Set ``name`` ('lr', 'mom', 'wd', ...) on every parameter group of any optimiser.

    'mom' is fastai's name; torch's optimisers call it ``betas[0]`` (Adam, AdamW) or
    ``momentum`` (SGD, RMSprop), so schedules work with those too. 'wd' is left alone on
    groups made without weight decay.
    """
    for group in opt.param_groups:
        if name == "wd" and not group.get("do_wd", True):
            continue
        if name == "wd" and "wd" not in group and "weight_decay" in group:
            group["weight_decay"] = value
        elif name == "mom" and "mom" not in group and "betas" in group:
            group["betas"] = (value, group["betas"][1])
        elif name == "mom" and "mom" not in group and "momentum" in group:
            group["momentum"] = value
        else:
            group[name] = value


def get_hyper(opt: torch.optim.Optimizer, name: str, group: int = -1) -> float:
    """The value of ``name`` in one parameter group (the same aliases as :func:`set_hyper`);
    nan when the optimiser has no such hyper-parameter."""
    g = opt.param_groups[group]
    if name in g:
        return float(g[name])
    if name == "mom" and "betas" in g:
        return float(g["betas"][0])
    if name == "mom" and "momentum" in g:
        return float(g["momentum"])
    if name == "wd" and "weight_decay" in g:
        return float(g["weight_decay"])
    return float("nan")
