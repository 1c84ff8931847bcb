"""A small trainer with fastai's semantics (no fastai): Learner, the callback protocol,
fastai's Adam, ``fit`` / ``fit_one_cycle``, checkpoints.

The training loop calls these events on every callback, sorted by ``order``::

    before_fit
      before_epoch
        before_train
          before_batch  after_pred  after_loss  before_backward  after_step  after_batch
        after_train
        before_validate
          before_batch  after_pred  after_loss  after_batch
        after_validate
      after_epoch
    after_fit

A callback stops part of the loop by raising one of the ``Cancel*Exception``; the matching
``after_cancel_<part>`` event runs, then ``after_<part>`` as usual. Whatever happens (a
crash, Ctrl-C), every callback's ``teardown`` runs when ``fit`` ends, so hooks never leak.

The Learner works with any ``nn.Module``; ``convkit.nn.convert(model)`` moves a torch
model onto convkit's kernels, so the same loop trains both for side-by-side runs.
"""
from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from convkit import schedules
from convkit.files import atomic_write

__all__ = [
    "Adam",
    "Callback",
    "CancelBatchException",
    "CancelTrainException",
    "CancelValidException",
    "CancelEpochException",
    "CancelFitException",
    "Learner",
    "accuracy",
    "EVENTS",
    "param_groups",
    "set_hyper",
    "get_hyper",
    "format_table",
]

EVENTS = (
    "before_fit", "before_epoch", "before_train", "before_batch", "after_pred", "after_loss",
    "before_backward", "after_step", "after_batch", "after_train", "before_validate",
    "after_validate", "after_epoch", "after_fit",
)

# The per-batch events, which a callback's run_train / run_valid can switch off.
_INNER_LOOP = frozenset({
    "before_batch", "after_pred", "after_loss", "before_backward", "after_step",
    "after_cancel_batch", "after_batch",
})


class CancelBatchException(Exception):
    """Skip the rest of this batch (``after_cancel_batch``, then ``after_batch``)."""


class CancelTrainException(Exception):
    """Skip the rest of this epoch's training phase."""


class CancelValidException(Exception):
    """Skip the rest of this epoch's validation phase."""


class CancelEpochException(Exception):
    """Skip the rest of this epoch."""


class CancelFitException(Exception):
    """Stop training (``after_cancel_fit``, then ``after_fit``)."""


def _snake_case(name: str) -> str:
    # "ActivationStats" -> "activation_stats": how a Learner exposes its callbacks.
    name = re.sub(r"(.)([A-Z][a-z]+)", r"\1_\2", name)
    return re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", name).lower()


class Callback:
    """Base class: override any event in ``EVENTS`` (methods without arguments; the state
    lives on ``self.learn``). Lower ``order`` runs first. ``run_train`` / ``run_valid``
    False: the callback sleeps through that phase's events.

    A callback with state worth keeping across an interruption implements ``state_dict``
    and ``load_state_dict``; checkpoints store it. ``teardown`` always runs when fit ends.
    """

    order: int = 0
    run_train: bool = True
    run_valid: bool = True
    learn: "Learner"

    @property
    def name(self) -> str:
        """The attribute the Learner exposes this callback as (``learn.recorder``)."""
        return _snake_case(type(self).__name__)

    def state_dict(self) -> Optional[dict]:
        return None

    def load_state_dict(self, state: dict) -> None:
        pass

    def teardown(self) -> None:
        pass

    def __repr__(self) -> str:
        return type(self).__name__


# ---------------------------------------------------------------------------------------
# Optimiser


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
    def step(self, closure: Optional[Callable[[], torch.Tensor]] = None):
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


# ---------------------------------------------------------------------------------------
# Metrics


def accuracy(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Fraction of rows whose arg-max is the target: pred [N, C], target [N] -> scalar."""
    return (pred.argmax(dim=-1) == target).float().mean()


def _metric_name(metric: Callable) -> str:
    return getattr(metric, "__name__", type(metric).__name__)


# What Learner.save writes beside the state: files without it are not ours.
CHECKPOINT_FORMAT = "convkit.learner checkpoint"
CHECKPOINT_VERSION = 1


class CheckpointError(ValueError):
    """A file that is not a readable convkit checkpoint (truncated, empty, not a torch file,
    someone else's, or one holding more than tensors and plain values)."""


def read_checkpoint(path: Union[str, os.PathLike]) -> dict:
    """A checkpoint written by :meth:`Learner.save`, loaded with ``weights_only=True``: only
    tensors and plain Python values are rebuilt, so a planted file cannot run code. Raises
    CheckpointError naming the file and what is wrong with it."""
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


# ---------------------------------------------------------------------------------------
# Learner


class Learner:
    """Trains ``model`` on ``dls`` (anything with ``.train`` and ``.valid`` iterables of
    (xb, yb) batches) with ``loss_func`` and reports ``metrics`` on the validation set.

    Defaults are fastai's: cross-entropy, Adam (mom 0.9, sqr_mom 0.99, eps 1e-5), weight
    decay 0.01 decoupled and skipped on normalisation layers and biases, 1cycle momentums
    (0.95, 0.85, 0.95). A Recorder is always attached (``learn.recorder``), and a
    ProgressBar that only draws on a terminal. Callbacks are reachable by their snake-case
    class name (``learn.activation_stats``). Batches are moved to the device of the model's
    parameters.
    """

    def __init__(
        self,
        dls: Any,
        model: nn.Module,
        loss_func: Callable = F.cross_entropy,
        metrics: Sequence[Callable] = (accuracy,),
        cbs: Sequence[Callback] = (),
        opt_func: Callable[..., torch.optim.Optimizer] = Adam,
        lr: float = 1e-3,
        wd: float = 0.01,
        moms: Sequence[float] = (0.95, 0.85, 0.95),
        logger: Optional[Callable[[str], None]] = print,
        progress: Optional[bool] = None,
    ) -> None:
        # Imported here: callbacks.py builds on this module.
        from convkit.callbacks import ProgressBar, Recorder

        self.dls = dls
        self.model = model
        self.loss_func = loss_func
        self.metrics = list(metrics)
        self.opt_func = opt_func
        self.lr = lr
        self.wd = wd
        self.moms = tuple(moms)
        self.logger = logger
        self.opt: Optional[torch.optim.Optimizer] = None
        self.cbs: list[Callback] = []
        self.training = False
        self.epoch = 0
        self.n_epoch = 1
        self.start_epoch = 0
        self.fit_plan: dict = {}
        self.add_cbs([Recorder(), ProgressBar(enabled=progress)])
        self.add_cbs(cbs)

    # -- callbacks ---------------------------------------------------------------------

    def add_cb(self, cb: Callback) -> None:
        """Attach a callback (a class is instantiated); it becomes ``learn.<snake_name>``."""
        if isinstance(cb, type):
            cb = cb()
        cb.learn = self
        setattr(self, cb.name, cb)
        self.cbs.append(cb)

    def add_cbs(self, cbs: Iterable[Callback]) -> None:
        for cb in cbs:
            self.add_cb(cb)

    def remove_cb(self, cb: Callback) -> None:
        self.cbs.remove(cb)
        if getattr(self, cb.name, None) is cb:
            delattr(self, cb.name)

    def _sorted_cbs(self) -> list[Callback]:
        # sorted() is stable: equal orders keep the order they were added in.
        return sorted(self.cbs, key=lambda cb: cb.order)

    def __call__(self, event: str) -> None:
        """Run ``event`` on every callback that wants it, in order."""
        inner = event in _INNER_LOOP
        for cb in self._sorted_cbs():
            method = getattr(cb, event, None)
            if method is None:
                continue
            # run_train / run_valid only gate the per-batch events.
            if inner and self.training and not cb.run_train:
                continue
            if inner and not self.training and not cb.run_valid:
                continue
            method()

    def _with_events(self, body: Callable[[], None], part: str, cancel: type) -> None:
        try:
            self(f"before_{part}")
            body()
        except cancel:
            self(f"after_cancel_{part}")
        self(f"after_{part}")

    # -- optimiser ---------------------------------------------------------------------

    def create_opt(self) -> None:
        """A fresh optimiser over the model's parameters (two weight-decay groups)."""
        groups = param_groups(self.model, self.wd)
        if not (isinstance(self.opt_func, type) and issubclass(self.opt_func, Adam)):
            # torch's optimisers call weight decay "weight_decay".
            for group in groups:
                group["weight_decay"] = group.pop("wd")
        self.opt = self.opt_func(groups, lr=self.lr)

    # -- the loop ----------------------------------------------------------------------

    def _one_batch(self) -> None:
        self.pred = self.model(self.xb)
        self("after_pred")
        self.loss = self.loss_func(self.pred, self.yb)
        self("after_loss")
        if not self.training:
            return
        self("before_backward")
        self.loss.backward()
        self.opt.step()
        self("after_step")
        self.opt.zero_grad(set_to_none=True)

    def _model_device(self) -> torch.device:
        # Batches go where the model's parameters are (loaders produce CPU tensors).
        for p in self.model.parameters():
            return p.device
        return torch.device("cpu")

    def _do_batch(self, i: int, batch: tuple) -> None:
        self.iter = i
        xb, yb = batch
        device = self._model_device()
        self.xb, self.yb = xb.to(device), yb.to(device)
        if self.training:
            self.train_iter = self.epoch * self.n_iter + i
            self.pct_train = self.train_iter / (self.n_epoch * self.n_iter)
        self._with_events(self._one_batch, "batch", CancelBatchException)

    def _all_batches(self) -> None:
        self.n_iter = len(self.dl)
        for i, batch in enumerate(self.dl):
            self._do_batch(i, batch)

    def _do_train(self) -> None:
        self.dl = self.dls.train
        if hasattr(self.dl, "set_epoch"):
            self.dl.set_epoch(self.epoch)
        self.training = True
        self.model.train()
        self.n_iter = len(self.dl)
        if self.n_iter == 0:
            raise ValueError(
                "the training loader has no batches (fewer items than the batch size, with "
                "drop_last): use a smaller batch size"
            )
        self._with_events(self._all_batches, "train", CancelTrainException)

    def _do_validate(self) -> None:
        self.dl = self.dls.valid
        self.training = False
        self.model.eval()
        with torch.no_grad():
            self._with_events(self._all_batches, "validate", CancelValidException)

    def _do_epoch(self) -> None:
        self._do_train()
        self._do_validate()

    def _do_fit(self) -> None:
        for epoch in range(self.start_epoch, self.n_epoch):
            self.epoch = epoch
            self._with_events(self._do_epoch, "epoch", CancelEpochException)

    def fit(
        self,
        n_epoch: int,
        lr: Optional[float] = None,
        wd: Optional[float] = None,
        cbs: Sequence[Callback] = (),
        start_epoch: int = 0,
        reset_opt: bool = False,
    ) -> None:
        """Train ``n_epoch`` epochs at a constant ``lr`` (and momentum 0.9, Adam's default)
        unless a callback schedules them. ``start_epoch`` skips epochs already done (after
        :meth:`load`); ``cbs`` are attached for this call only."""
        if self.opt is None or reset_opt:
            self.create_opt()
        if lr is not None:
            self.lr = lr
            set_hyper(self.opt, "lr", lr)
        if wd is not None:
            set_hyper(self.opt, "wd", wd)
        if not self.fit_plan:
            self.fit_plan = {"method": "fit", "n_epoch": n_epoch, "lr": self.lr}
        self.n_epoch = n_epoch
        self.start_epoch = start_epoch
        extra = list(cbs)
        self.add_cbs(extra)
        try:
            self._with_events(self._do_fit, "fit", CancelFitException)
        finally:
            for cb in self._sorted_cbs():
                cb.teardown()
            for cb in extra:
                self.remove_cb(cb)
            self.training = False
            self.fit_plan = {}

    def fit_one_cycle(
        self,
        n_epoch: int,
        lr_max: Optional[float] = None,
        div: float = 25.0,
        div_final: float = 1e5,
        pct_start: float = 0.25,
        wd: Optional[float] = None,
        moms: Optional[Sequence[float]] = None,
        cbs: Sequence[Callback] = (),
        start_epoch: int = 0,
        reset_opt: bool = False,
    ) -> None:
        """1cycle: lr from lr_max/div up to lr_max over ``pct_start`` of the batches, then down
        to lr_max/div_final, momentum the opposite way through ``moms``; cosine halves."""
        from convkit.callbacks import ParamScheduler

        lr_max = self.lr if lr_max is None else lr_max
        moms = self.moms if moms is None else tuple(moms)
        scheds = {
            "lr": schedules.one_cycle_lr(lr_max, div, div_final, pct_start),
            "mom": schedules.one_cycle_mom(moms, pct_start),
        }
        self.fit_plan = {
            "method": "fit_one_cycle", "n_epoch": n_epoch, "lr_max": lr_max, "div": div,
            "div_final": div_final, "pct_start": pct_start, "moms": list(moms),
        }
        self.fit(
            n_epoch, lr=lr_max, wd=wd, cbs=[ParamScheduler(scheds)] + list(cbs),
            start_epoch=start_epoch, reset_opt=reset_opt,
        )

    def validate(self) -> list[float]:
        """[valid_loss, *metrics] of the current model on ``dls.valid`` (no callbacks)."""
        self.model.eval()
        total, count = None, 0
        with torch.no_grad():
            device = self._model_device()
            for xb, yb in self.dls.valid:
                xb, yb = xb.to(device), yb.to(device)
                pred = self.model(xb)
                values = [self.loss_func(pred, yb).item()] + [float(m(pred, yb)) for m in self.metrics]
                n = len(yb)
                if total is None:
                    total = [0.0] * len(values)
                total = [t + v * n for t, v in zip(total, values)]
                count += n
        if total is None:
            return []
        return [t / count for t in total]

    # -- checkpoints -------------------------------------------------------------------

    def state_dict(self, with_opt: bool = True) -> dict:
        """Everything a resumed run needs: model, optimiser (moments, step counts,
        hyper-parameters), the epoch reached, the fit being run, callbacks' states and
        torch's RNG state."""
        callbacks = {}
        for cb in self.cbs:
            state = cb.state_dict()
            if state is not None:
                callbacks[cb.name] = state
        return {
            "format": CHECKPOINT_FORMAT,
            "version": CHECKPOINT_VERSION,
            "model": self.model.state_dict(),
            "opt": self.opt.state_dict() if (with_opt and self.opt is not None) else None,
            "epoch": self.epoch,
            "n_epoch": self.n_epoch,
            "fit_plan": dict(self.fit_plan),
            "callbacks": callbacks,
            "rng": torch.get_rng_state(),
        }

    def save(self, path: Union[str, os.PathLike], with_opt: bool = True) -> Path:
        """Write :meth:`state_dict` to ``path``, atomically (a temporary file renamed: an
        interrupted save leaves the previous checkpoint). Only tensors and plain Python values
        are stored, so :func:`read_checkpoint` can load it with ``weights_only=True``. Returns
        the path."""
        state = self.state_dict(with_opt)
        return atomic_write(path, lambda tmp: torch.save(state, tmp))

    def load(self, path: Union[str, os.PathLike], with_opt: bool = True) -> dict:
        """Restore a checkpoint written by :meth:`save` (read by :func:`read_checkpoint`:
        CheckpointError if it is not one); returns it (``epoch`` is the last epoch completed,
        ``fit_plan`` the fit it belongs to)."""
        state = read_checkpoint(path)
        self.model.load_state_dict(state["model"])
        if with_opt and state.get("opt") is not None:
            if self.opt is None:
                self.create_opt()
            self.opt.load_state_dict(state["opt"])
        for cb in self.cbs:
            if cb.name in state.get("callbacks", {}):
                cb.load_state_dict(state["callbacks"][cb.name])
        if state.get("rng") is not None:
            torch.set_rng_state(state["rng"])
        return state

    # -- inspection --------------------------------------------------------------------

    def summary(self, xb: Optional[torch.Tensor] = None) -> str:
        """Every leaf layer's output shape and parameter count for one batch (the first
        validation batch unless ``xb`` is given), and the totals, as fastai prints them."""
        from convkit.callbacks import Hooks

        if xb is None:
            xb = next(iter(self.dls.valid))[0]
        xb = xb.to(self._model_device())
        leaves = [m for m in self.model.modules() if not list(m.children())]
        was_training = self.model.training
        self.model.eval()

        def shape_of(module, inputs, output):
            return tuple(output.shape) if isinstance(output, torch.Tensor) else None

        with Hooks(leaves, shape_of) as hooks, torch.no_grad():
            self.model(xb)
            shapes = hooks.stored
        self.model.train(was_training)

        def fmt_shape(shape) -> str:
            return " x ".join(str(s) for s in shape) if shape else "-"

        width = 78
        lines = [
            f"{type(self.model).__name__} (Input shape: {fmt_shape(tuple(xb.shape))})",
            "=" * width,
            f"{'Layer (type)':<22}{'Output Shape':<24}{'Param #':<12}{'Trainable'}",
            "=" * width,
        ]
        total = trainable = 0
        for module, shape in zip(leaves, shapes):
            params = list(module.parameters())
            n = sum(p.numel() for p in params)
            n_train = sum(p.numel() for p in params if p.requires_grad)
            total += n
            trainable += n_train
            count = f"{n:,}" if params else ""
            flag = str(n_train > 0) if params else ""
            lines.append(f"{type(module).__name__:<22}{fmt_shape(shape):<24}{count:<12}{flag}".rstrip())
        lines += [
            "_" * width,
            "",
            f"Total params: {total:,}",
            f"Total trainable params: {trainable:,}",
            f"Total non-trainable params: {total - trainable:,}",
            "",
            f"Optimizer used: {getattr(self.opt_func, '__name__', self.opt_func)}",
            f"Loss function: {getattr(self.loss_func, '__name__', self.loss_func)}",
            "",
            "Callbacks:",
        ]
        lines += [f"  - {cb!r}" for cb in self._sorted_cbs()]
        return "\n".join(lines)


def n_params(model: nn.Module) -> int:
    """The number of parameters of ``model``."""
    return sum(p.numel() for p in model.parameters())


def format_time(seconds: float) -> str:
    """mm:ss, as fastai prints epoch times."""
    seconds = int(round(seconds))
    return f"{seconds // 60:02d}:{seconds % 60:02d}"


def format_table(names: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """The epoch table as fastai prints it on a console: a header, then one row per epoch
    (floats with 6 decimals, times as mm:ss)."""
    widths = [max(len(n), 9) + 1 for n in names]
    lines = ["".join(f"{n:<{w}}" for n, w in zip(names, widths)).rstrip()]
    for row in rows:
        lines.append(format_row(names, row))
    return "\n".join(lines)


def format_row(names: Sequence[str], row: Sequence[Any]) -> str:
    """One line of :func:`format_table`."""
    widths = [max(len(n), 9) + 1 for n in names]
    cells = []
    for name, value, width in zip(names, row, widths):
        if name == "time":
            text = format_time(value)
        elif isinstance(value, float):
            text = "nan" if math.isnan(value) else f"{value:.6f}"
        else:
            text = str(value)
        cells.append(f"{text:<{width}}")
    return "".join(cells).rstrip()
