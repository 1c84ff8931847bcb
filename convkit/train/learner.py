"""The Learner: trains any ``nn.Module`` with fastai's semantics (no fastai): ``fit`` /
``fit_one_cycle``, validation, checkpoints (``save`` / ``load``) and ``summary``.

The loop and the events it calls on the callbacks are described in
:mod:`convkit.train.events`. ``convkit.nn.convert(model)`` moves a torch model onto
convkit's kernels, so the same loop trains both for side-by-side runs.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from convkit.train import schedules
from convkit.train.callbacks import ParamScheduler, ProgressBar, Recorder
from convkit.train import distributed as distributed_training
from convkit.train.checkpoints import CHECKPOINT_FORMAT, CHECKPOINT_VERSION, read_checkpoint, write_checkpoint
from convkit.train.events import (
    INNER_LOOP_EVENTS,
    Callback,
    CancelBatchException,
    CancelEpochException,
    CancelFitException,
    CancelTrainException,
    CancelValidException,
)
from convkit.train.hooks import Hooks
from convkit.train.optimiser import Adam, param_groups, set_hyper

__all__ = ["Learner", "accuracy", "n_params"]


def accuracy(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Fraction of rows whose arg-max is the target: pred [N, C], target [N] -> scalar."""
    return (pred.argmax(dim=-1) == target).float().mean()


def _device_of(model: nn.Module) -> torch.device:
    # Batches go where the model's parameters are (loaders produce CPU tensors).
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def n_params(model: nn.Module) -> int:
    """The number of parameters of ``model``."""
    return sum(p.numel() for p in model.parameters())


class Learner:
    """Trains ``model`` on ``dls`` (anything with ``.train`` and ``.valid`` iterables of
    (xb, yb) batches) with ``loss_func`` and reports ``metrics`` on the validation set.

    Defaults are fastai's: cross-entropy, Adam (mom 0.9, sqr_mom 0.99, eps 1e-5), weight
    decay 0.01 decoupled and skipped on normalisation layers and biases, 1cycle momentums
    (0.95, 0.85, 0.95). A Recorder is always attached (``learn.recorder``), and a
    ProgressBar that only draws on a terminal. Callbacks are reachable by their snake-case
    class name (``learn.activation_stats``). Batches are moved to the device of the model's
    parameters.

    Made while a torch.distributed process group of more than one process is initialised (as
    under ``torchrun``), it trains data-parallel unless ``distributed=False``: the loaders are
    sharded, the batch norms synchronised, the model wrapped in DistributedDataParallel
    (``learn.ddp``; ``learn.model`` stays the plain model, so checkpoints do not change), the
    metrics summed over every process, and only rank 0 logs and draws progress
    (:mod:`convkit.train.distributed`). ``learn.dist`` says where this process stands.
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
        distributed: Optional[bool] = None,
    ) -> None:
        self.dist = None
        self.ddp: Optional[nn.Module] = None
        if distributed is not False:
            self.dist = distributed_training.current(_device_of(model))
            if distributed and self.dist is None:
                raise ValueError(
                    "Learner(distributed=True) needs an initialised torch.distributed process "
                    "group of more than one process (run under torchrun)"
                )
        if self.dist is not None:
            dls = self.dist.shard(dls)
            distributed_training.synchronise_batch_norms(model)
            device = _device_of(model)
            self.ddp = nn.parallel.DistributedDataParallel(
                model, device_ids=[device] if device.type == "cuda" else None)
            if not self.dist.main:
                logger, progress = None, False
            local = distributed_training.unsynchronised_batch_norms(model)
            if local and logger is not None:
                logger(f"{local} of torch's batch norms keep per-process statistics (torch's "
                       "SyncBatchNorm refuses CPU tensors; convkit's SyncBatchNorm does not)")
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
        """:meth:`add_cb` each of ``cbs``."""
        for cb in cbs:
            self.add_cb(cb)

    def remove_cb(self, cb: Callback) -> None:
        """Detach ``cb`` (and its ``learn.<snake_name>`` attribute)."""
        self.cbs.remove(cb)
        if getattr(self, cb.name, None) is cb:
            delattr(self, cb.name)

    def _sorted_cbs(self) -> list[Callback]:
        # sorted() is stable: equal orders keep the order they were added in.
        return sorted(self.cbs, key=lambda cb: cb.order)

    def __call__(self, event: str) -> None:
        """Run ``event`` on every callback that wants it, in order."""
        inner = event in INNER_LOOP_EVENTS
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
        # Training goes through DDP (its backward averages the gradients); validation runs the
        # plain model on this process's shard, with nothing to synchronise.
        forward = self.ddp if (self.training and self.ddp is not None) else self.model
        self.pred = forward(self.xb)
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
        return _device_of(self.model)

    def sum_over_processes(self, values: Sequence[float]) -> list[float]:
        """Each value summed over every process when training data-parallel, else as is."""
        return self.dist.sum(values) if self.dist is not None else list(values)

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
        if self.dist is not None:
            # Every process takes part, also one whose shard is empty.
            width = 1 + len(self.metrics)
            sums = self.sum_over_processes((total or [0.0] * width) + [float(count)])
            total, count = sums[:-1], int(sums[-1])
        if not count:
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
        return write_checkpoint(path, self.state_dict(with_opt))

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
