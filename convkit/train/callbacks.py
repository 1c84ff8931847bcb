"""The callbacks of :class:`convkit.train.learner.Learner`: Recorder, ProgressBar,
ParamScheduler, ActivationStats, Checkpoint."""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional, Sequence, TextIO, Union

import torch
from torch import nn

from convkit.train import plots
from convkit.train.checkpoints import CheckpointError, read_checkpoint
from convkit.train.distributed import barrier
from convkit.train.events import Callback
from convkit.train.files import move_aside
from convkit.train.formatting import format_row, format_table, format_time
from convkit.train.hooks import Hooks
from convkit.train.optimiser import get_hyper, set_hyper
from convkit.train.schedules import Schedule

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = [
    "Recorder",
    "ProgressBar",
    "ParamScheduler",
    "ActivationStats",
    "Checkpoint",
]


# ---------------------------------------------------------------------------------------
# Recorder


class Recorder(Callback):
    """Records, per training batch: the smoothed loss, lr and momentum; per epoch: the row
    fastai prints (train_loss, valid_loss, metrics, time), which it hands to the Learner's
    logger as a line of the epoch table.

    train_loss is the exponential moving average (``beta``) of the batch losses, bias
    corrected (divided by ``1 - beta**n``), as it stands at the end of the epoch; it is
    carried across epochs and reset only at the start of ``fit``.
    """

    order = 50

    def __init__(self, beta: float = 0.98) -> None:
        self.beta = beta
        self._reset()

    def _reset(self) -> None:
        self.lrs: list[float] = []
        self.moms: list[float] = []
        self.losses: list[float] = []  # smoothed, one per training batch
        self.raw_losses: list[float] = []
        self.iters: list[int] = []  # number of training batches seen at each epoch's end
        self.values: list[list[float]] = []  # per epoch: train_loss, valid_loss, metrics..., seconds
        self.smooth_avg = 0.0
        self.smooth_count = 0

    @property
    def metric_names(self) -> list[str]:
        """The columns of the epoch table."""
        names = [getattr(m, "__name__", type(m).__name__) for m in self.learn.metrics]
        return ["epoch", "train_loss", "valid_loss"] + names + ["time"]

    @property
    def smooth_loss(self) -> float:
        if self.smooth_count == 0:
            return float("nan")
        return self.smooth_avg / (1 - self.beta ** self.smooth_count)

    def before_fit(self) -> None:
        # A fit resumed by hand (load, then fit(start_epoch=k)) keeps what load restored.
        if self.learn.start_epoch == 0 or not self.values:
            self._reset()
        if self.learn.logger is not None:
            self.learn.logger(format_table(self.metric_names, []))

    def before_epoch(self) -> None:
        self.epoch_start = time.perf_counter()

    def before_validate(self) -> None:
        self.valid_count = 0
        self.valid_totals = [0.0] * (1 + len(self.learn.metrics))

    def after_batch(self) -> None:
        learn = self.learn
        if not hasattr(learn, "loss"):
            return
        if learn.training:
            loss = float(learn.loss.detach())
            self.smooth_avg = self.beta * self.smooth_avg + (1 - self.beta) * loss
            self.smooth_count += 1
            self.raw_losses.append(loss)
            self.losses.append(self.smooth_loss)
            self.lrs.append(get_hyper(learn.opt, "lr"))
            self.moms.append(get_hyper(learn.opt, "mom"))
        else:
            n = len(learn.yb)
            values = [float(learn.loss)] + [float(m(learn.pred, learn.yb)) for m in learn.metrics]
            # Weighted by batch size: the last, smaller batch counts for what it holds.
            self.valid_totals = [t + v * n for t, v in zip(self.valid_totals, values)]
            self.valid_count += n

    def after_epoch(self) -> None:
        seconds = time.perf_counter() - self.epoch_start
        width = 1 + len(self.learn.metrics)
        totals = getattr(self, "valid_totals", [0.0] * width)
        count = getattr(self, "valid_count", 0)
        train_loss = self.smooth_loss
        if getattr(self.learn, "dist", None) is not None:
            # Data-parallel: the sums of every process's validation items, and the mean of the
            # processes' smoothed losses (an average of averages of equal batches: the smoothed
            # loss of the global batches).
            sums = self.learn.sum_over_processes(totals + [float(count), train_loss])
            totals, count = sums[:width], int(sums[width])
            train_loss = sums[width + 1] / self.learn.dist.world_size
        if count > 0:
            valid = [t / count for t in totals]
        else:
            valid = [float("nan")] * width
        row = [train_loss] + valid + [seconds]
        self.values.append(row)
        self.iters.append(self.smooth_count)
        if self.learn.logger is not None:
            self.learn.logger(format_row(self.metric_names, [self.learn.epoch] + row))

    def table(self, first_epoch: int = 0) -> str:
        """The epoch table of the last fit, as printed."""
        rows = [[first_epoch + i] + row for i, row in enumerate(self.values)]
        return format_table(self.metric_names, rows)

    def records(self) -> list[dict]:
        """One dict per epoch: epoch, train_loss, valid_loss, each metric, seconds."""
        names = self.metric_names[1:-1]
        result = []
        for epoch, row in enumerate(self.values):
            record: dict[str, float] = {"epoch": epoch}
            for name, value in zip(names, row[:-1]):
                record[name] = value
            record["seconds"] = row[-1]
            result.append(record)
        return result

    def state_dict(self) -> dict:
        return {
            "lrs": list(self.lrs), "moms": list(self.moms), "losses": list(self.losses),
            "raw_losses": list(self.raw_losses), "iters": list(self.iters),
            "values": [list(v) for v in self.values],
            "smooth_avg": self.smooth_avg, "smooth_count": self.smooth_count,
        }

    def load_state_dict(self, state: dict) -> None:
        for key, value in state.items():
            setattr(self, key, value)

    def plot_loss(self, skip_start: int = 5, with_valid: bool = True) -> Figure:
        """Smoothed training loss per batch (and validation loss at each epoch's end)."""
        return plots.plot_loss(self, skip_start=skip_start, with_valid=with_valid)

    def plot_sched(self) -> Figure:
        """Learning rate and momentum per training batch."""
        return plots.plot_sched(self)


# ---------------------------------------------------------------------------------------
# Progress bar


class ProgressBar(Callback):
    """A one-line progress bar per training and validation phase, on ``stream`` (stderr).

    ``enabled=None``: on only when the stream is a terminal, so logs and CI output stay
    clean. The line is cleared at the end of each phase, before the epoch's table row.
    """

    order = 70

    def __init__(self, enabled: Optional[bool] = None, stream: Optional[TextIO] = None,
                 width: int = 30, min_interval: float = 0.1) -> None:
        self.enabled = enabled
        self.stream = stream
        self.width = width
        self.min_interval = min_interval
        self.active = False

    def before_fit(self) -> None:
        stream = self.stream if self.stream is not None else sys.stderr
        self.out = stream
        if self.enabled is None:
            isatty = getattr(stream, "isatty", None)
            self.active = bool(isatty and isatty())
        else:
            self.active = self.enabled

    def _start(self, phase: str) -> None:
        self.phase = phase
        self.start = time.perf_counter()
        self.last_draw = 0.0

    def before_train(self) -> None:
        self._start("train")

    def before_validate(self) -> None:
        self._start("valid")

    def after_batch(self) -> None:
        if not self.active:
            return
        now = time.perf_counter()
        done = self.learn.iter + 1
        total = self.learn.n_iter
        if done < total and now - self.last_draw < self.min_interval:
            return
        self.last_draw = now
        self.out.write("\r" + self.render(done, total, now - self.start))
        self.out.flush()

    def render(self, done: int, total: int, elapsed: float) -> str:
        """The bar's text for ``done`` of ``total`` batches after ``elapsed`` seconds."""
        filled = int(self.width * done / max(total, 1))
        bar = "#" * filled + "-" * (self.width - filled)
        remaining = elapsed / done * (total - done) if done else 0.0
        epoch = f"epoch {self.learn.epoch + 1}/{self.learn.n_epoch}"
        text = f"{epoch} {self.phase} |{bar}| {done}/{total} [{format_time(elapsed)}<{format_time(remaining)}]"
        recorder = getattr(self.learn, "recorder", None)
        if self.phase == "train" and recorder is not None and recorder.smooth_count:
            text += f" loss {recorder.smooth_loss:.4f}"
        return text

    def _clear(self) -> None:
        if self.active:
            self.out.write("\r" + " " * 100 + "\r")
            self.out.flush()

    def after_train(self) -> None:
        self._clear()

    def after_validate(self) -> None:
        self._clear()

    def teardown(self) -> None:
        self._clear()
        self.active = False


# ---------------------------------------------------------------------------------------
# Hyper-parameter schedules


class ParamScheduler(Callback):
    """Sets each hyper-parameter in ``scheds`` (name -> schedule of pos in [0, 1]) before
    every training batch, at the Learner's ``pct_train``."""

    order = 60
    run_valid = False

    def __init__(self, scheds: dict[str, Schedule]) -> None:
        self.scheds = dict(scheds)

    def before_batch(self) -> None:
        for name, schedule in self.scheds.items():
            set_hyper(self.learn.opt, name, schedule(self.learn.pct_train))


# ---------------------------------------------------------------------------------------
# Activation statistics


def has_params(module: nn.Module) -> bool:
    """Whether ``module`` owns parameters itself (not through its children)."""
    return any(True for _ in module.parameters(recurse=False))


class ActivationStats(Callback):
    """Statistics of the outputs of every module that has parameters (convolutions,
    normalisation layers, linear layers), per training batch: mean, std, the fraction
    ``<= 0.05`` ("near zero") and, with ``with_hist``, a 40-bin histogram over [0, 10].

    Hooked modules are listed in ``self.modules`` in the model's order, and every index
    below (``plot_layer_stats(-2)``, ``color_dim(-4)``) counts in that list, as fastai's do.

    After ``convkit.nn.convert``, a BatchNorm2d followed by a ReLU is one fused
    ``BatchNormReLU2d`` (another activation: ``BatchNormActivation2d``): its output is the
    post-ReLU activation, because the pre-ReLU tensor is never materialised. We hook it anyway (so the list and its indices are the same as
    with torch's layers) and accept that for those layers mean, std and the histogram's
    first bin describe post-ReLU values (near-zero is the same either way: every negative
    value counts as near zero before the ReLU and is zero after it). The chapter's figures
    (``plot_layer_stats(0)``, ``(-2)``, ``color_dim(-2)`` without batchnorm and
    ``color_dim(-4)`` with it) all look at convolution outputs, which both backends record
    identically.
    """

    order = -20
    run_valid = False

    def __init__(self, with_hist: bool = False, modules: Optional[Sequence[nn.Module]] = None,
                 every: Optional[int] = None, bins: int = 40, hist_range: tuple[float, float] = (0.0, 10.0)) -> None:
        self.with_hist = with_hist
        self.chosen = modules
        self.every = every
        self.bins = bins
        self.hist_range = hist_range
        self.hooks: Optional[Hooks] = None
        self.modules: list[nn.Module] = []
        self.names: list[str] = []
        self.stats: list[list[torch.Tensor]] = []
        self.hists: list[list[torch.Tensor]] = []

    def before_fit(self) -> None:
        model = self.learn.model
        names = {m: n for n, m in model.named_modules()}
        if self.chosen is None:
            self.modules = [m for m in model.modules() if has_params(m)]
        else:
            self.modules = list(self.chosen)
        self.names = [f"{names.get(m, '?')} ({type(m).__name__})" for m in self.modules]
        resuming = self.learn.start_epoch > 0 and len(self.stats) == len(self.modules)
        if not resuming:
            self.stats = [[] for _ in self.modules]
            self.hists = [[] for _ in self.modules]
        self.hooks = Hooks(self.modules, self._hook)

    def _recording(self) -> bool:
        learn = self.learn
        if not learn.training:
            return False
        return self.every is None or getattr(learn, "train_iter", 0) % self.every == 0

    def _hook(self, module: nn.Module, inputs: tuple, output: Any) -> Optional[tuple]:
        if not self._recording() or not isinstance(output, torch.Tensor):
            return None
        o = output.detach().float()
        summary = torch.stack([o.mean(), o.std(), (o <= 0.05).float().mean()])
        hist = torch.histc(o, self.bins, *self.hist_range) if self.with_hist else None
        # Kept on the CPU: plots and checkpoints want them there, whatever the model's device.
        return summary.cpu(), (hist.cpu() if hist is not None else None)

    def after_batch(self) -> None:
        if not self._recording() or self.hooks is None:
            return
        for i, stored in enumerate(self.hooks.stored):
            if stored is None:
                continue
            summary, hist = stored
            self.stats[i].append(summary)
            if hist is not None:
                self.hists[i].append(hist)
        # Drop the references so the next batch's hooks start from nothing.
        for hook in self.hooks.hooks:
            hook.stored = None

    def after_fit(self) -> None:
        self.teardown()

    def teardown(self) -> None:
        if self.hooks is not None:
            self.hooks.remove()
            self.hooks = None

    def layer_stats(self, idx: int) -> torch.Tensor:
        """[n_batches, 3]: mean, std and near-zero fraction of hooked module ``idx``."""
        rows = self.stats[idx]
        if not rows:
            return torch.zeros(0, 3)
        return torch.stack(rows)

    def hist(self, idx: int) -> torch.Tensor:
        """[bins, n_batches]: log1p of the histogram counts of hooked module ``idx``."""
        rows = self.hists[idx]
        if not rows:
            return torch.zeros(self.bins, 0)
        return torch.stack(rows).t().float().log1p()

    def plot_layer_stats(self, idx: int) -> Figure:
        """Mean, std and % near zero over the training batches of hooked module ``idx``."""
        return plots.plot_layer_stats(self, idx)

    def color_dim(self, idx: int, figsize: tuple[float, float] = (10, 5)) -> Figure:
        """The "colorful dimension": histograms (log1p) stacked over batches, bins upwards."""
        return plots.color_dim(self, idx, figsize=figsize)

    def state_dict(self) -> dict:
        return {
            "names": list(self.names),
            "stats": [[t.clone() for t in rows] for rows in self.stats],
            "hists": [[t.clone() for t in rows] for rows in self.hists],
        }

    def load_state_dict(self, state: dict) -> None:
        self.names = list(state["names"])
        self.stats = [list(rows) for rows in state["stats"]]
        self.hists = [list(rows) for rows in state["hists"]]


# ---------------------------------------------------------------------------------------
# Checkpoints


class Checkpoint(Callback):
    """Saves the Learner (model, optimiser, schedule position, callbacks' states) to
    ``path`` after every epoch, atomically, so an interrupted fit loses at most the epoch
    in progress.

    With ``resume=True`` and a checkpoint at ``path`` written by the same fit (same method,
    epochs and hyper-parameters), ``fit`` restores it and continues with the next epoch;
    the result equals an uninterrupted run. A checkpoint of a different fit is ignored
    (and overwritten), with a message. A file that is not a readable convkit checkpoint
    (truncated, empty, garbage, someone else's: see :func:`convkit.train.checkpoints.read_checkpoint`, which never
    runs code from it) is moved aside, with a message, and the fit starts afresh.
    """

    order = 90

    def __init__(self, path: Union[str, os.PathLike], resume: bool = False,
                 log: Optional[Callable[[str], None]] = None) -> None:
        self.path = Path(path)
        self.resume = resume
        self.log = log
        self.resumed_from: Optional[int] = None

    def _say(self, message: str) -> None:
        if self.log is not None:
            self.log(message)
        else:
            print(message, file=sys.stderr)

    def _main(self) -> bool:
        # Data-parallel, only rank 0 writes (the processes' models are identical).
        return self.learn.dist is None or self.learn.dist.main

    def before_fit(self) -> None:
        self.resumed_from = None
        saved, error = None, None
        if self.resume and self.path.is_file():
            try:
                saved = read_checkpoint(self.path)
            except CheckpointError as caught:
                error = caught
        if self.learn.dist is not None:
            barrier()  # every process has read the file before rank 0 may move it aside
        if error is not None:
            if self._main():
                moved = move_aside(self.path, "unreadable")
                self._say(f"{error}: moved it to {moved}; starting this fit afresh")
            return
        if saved is None:
            return
        if saved.get("fit_plan") != self.learn.fit_plan:
            self._say(f"checkpoint {self.path} belongs to another fit ({saved.get('fit_plan')}); starting afresh")
            return
        self.learn.load(self.path)
        self.learn.start_epoch = saved["epoch"] + 1
        self.resumed_from = saved["epoch"] + 1
        if self.learn.start_epoch < self.learn.n_epoch:
            self._say(f"resuming from {self.path} at epoch {self.learn.start_epoch}")

    def after_epoch(self) -> None:
        if self._main():
            self.learn.save(self.path)
