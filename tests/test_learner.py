"""The trainer: fastai's Adam against torch's AdamW, weight-decay groups, the callback order
and cancellation, Recorder semantics, schedules as applied, ActivationStats, summary, and
checkpoint resume equal to an uninterrupted run."""
from __future__ import annotations

import copy
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import convkit
from convkit.experiments.models import sample_cnn
from convkit.train import data, schedules
from convkit.train.callbacks import ActivationStats, Checkpoint, ParamScheduler, ProgressBar
from convkit.train.checkpoints import CheckpointError, read_checkpoint
from convkit.train.events import EVENTS, Callback, CancelBatchException, CancelFitException, CancelTrainException
from convkit.train.formatting import format_table
from convkit.train.hooks import Hook, Hooks
from convkit.train.learner import Learner, accuracy
from convkit.train.optimiser import Adam, param_groups


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These models are tiny: one thread is fastest, and immune to a busy machine (waking a
    second OpenMP thread on a loaded 2-core box costs milliseconds per op)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_cnn() -> nn.Sequential:
    """[N, 1, 8, 8] -> [N, 3], with a BatchNorm+ReLU pair (fused after convert)."""
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, stride=2, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Conv2d(4, 6, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(6 * 2 * 2, 3),
    )


def tiny_dls(n_train: int = 48, n_valid: int = 20, bs: int = 8, seed: int = 0) -> data.DataLoaders:
    g = torch.Generator().manual_seed(1234)
    x = torch.randint(0, 256, (n_train + n_valid, 8, 8), dtype=torch.uint8, generator=g)
    y = torch.randint(0, 3, (n_train + n_valid,), generator=g)
    ds = data.Dataset("tiny", x[:n_train], y[:n_train], x[n_train:], y[n_train:], ["a", "b", "c"])
    return data.make_dataloaders(ds, bs, normalize=True, seed=seed)


def learner(model=None, cbs=(), **kwargs) -> Learner:
    torch.manual_seed(0)
    model = model if model is not None else convkit.nn.convert(tiny_cnn())
    return Learner(tiny_dls(), model, cbs=cbs, logger=None, progress=False, **kwargs)


# ---------------------------------------------------------------------------------------
# Optimiser


def test_adam_equals_torch_adamw_with_constant_momentum():
    torch.manual_seed(0)
    ours_params = [torch.randn(5, 3, requires_grad=True), torch.randn(7, requires_grad=True)]
    theirs_params = [p.detach().clone().requires_grad_() for p in ours_params]
    ours = Adam([{"params": [ours_params[0]], "wd": 0.01}, {"params": [ours_params[1]], "wd": 0.0}], lr=0.01)
    theirs = torch.optim.AdamW(
        [{"params": [theirs_params[0]], "weight_decay": 0.01}, {"params": [theirs_params[1]], "weight_decay": 0.0}],
        lr=0.01, betas=(0.9, 0.99), eps=1e-5,
    )
    for _ in range(10):
        grads = [torch.randn_like(p) for p in ours_params]
        for p, q, g in zip(ours_params, theirs_params, grads):
            p.grad = g.clone()
            q.grad = g.clone()
        ours.step()
        theirs.step()
    for p, q in zip(ours_params, theirs_params):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_adam_uses_the_current_momentum_in_its_bias_correction():
    p = torch.tensor([1.0], requires_grad=True)
    opt = Adam([p], lr=0.1, mom=0.9, sqr_mom=0.99, eps=1e-5, wd=0.0)
    grads = [torch.tensor([0.5]), torch.tensor([-0.2])]
    moms = [0.95, 0.85]
    expected = 1.0
    grad_avg = sqr_avg = 0.0
    for step, (g, mom) in enumerate(zip(grads, moms), start=1):
        for group in opt.param_groups:
            group["mom"] = mom
        p.grad = g
        opt.step()
        grad_avg = mom * grad_avg + (1 - mom) * g.item()
        sqr_avg = 0.99 * sqr_avg + 0.01 * g.item() ** 2
        expected -= 0.1 * (grad_avg / (1 - mom ** step)) / ((sqr_avg / (1 - 0.99 ** step)) ** 0.5 + 1e-5)
    assert p.item() == pytest.approx(expected, rel=1e-6)


def test_decoupled_weight_decay_only_on_weights():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Linear(4, 2), nn.GroupNorm(1, 2))
    groups = param_groups(model, 0.01)
    decay = {id(p) for p in groups[0]["params"]}
    no_decay = {id(p) for p in groups[1]["params"]}
    assert decay == {id(model[0].weight), id(model[2].weight)}
    assert no_decay == {id(model[0].bias), id(model[1].weight), id(model[1].bias), id(model[2].bias),
                        id(model[3].weight), id(model[3].bias)}
    assert groups[0]["wd"] == 0.01 and groups[1]["wd"] == 0.0


def test_learner_defaults_are_fastais():
    learn = learner()
    learn.create_opt()
    group = learn.opt.param_groups[0]
    assert isinstance(learn.opt, Adam)
    assert (group["mom"], group["sqr_mom"], group["eps"], group["wd"]) == (0.9, 0.99, 1e-5, 0.01)
    assert learn.opt.param_groups[1]["wd"] == 0.0
    assert learn.loss_func is F.cross_entropy
    assert learn.moms == (0.95, 0.85, 0.95)


def test_weight_decay_set_by_fit_skips_the_no_decay_group():
    learn = learner()
    learn.fit(1, 1e-3, wd=0.1)
    assert learn.opt.param_groups[0]["wd"] == 0.1
    assert learn.opt.param_groups[1]["wd"] == 0.0


def test_accuracy():
    pred = torch.tensor([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7]])
    assert accuracy(pred, torch.tensor([1, 0, 0])).item() == pytest.approx(2 / 3)


# ---------------------------------------------------------------------------------------
# Callbacks


class EventLog(Callback):
    def __init__(self, order: int = 0, tag: str = "", **flags) -> None:
        self.order = order
        self.tag = tag
        self.log: list[str] = []
        for key, value in flags.items():
            setattr(self, key, value)

    def __getattr__(self, name):
        if name in EVENTS or name.startswith("after_cancel_"):
            return lambda: self.log.append(f"{self.tag}{name}")
        raise AttributeError(name)


def test_events_run_in_order_for_each_batch():
    log = EventLog()
    dls = tiny_dls(n_train=16, n_valid=8, bs=8)
    learn = Learner(dls, tiny_cnn(), cbs=[log], logger=None, progress=False)
    learn.fit(1, 1e-3)
    train_batch = ["before_batch", "after_pred", "after_loss", "before_backward", "after_step", "after_batch"]
    valid_batch = ["before_batch", "after_pred", "after_loss", "after_batch"]
    expected = (
        ["before_fit", "before_epoch", "before_train"] + train_batch * 2 + ["after_train", "before_validate"]
        + valid_batch + ["after_validate", "after_epoch", "after_fit"]
    )
    assert log.log == expected


def test_callbacks_are_sorted_by_order_and_exposed_by_name():
    late, early = EventLog(order=10, tag="late:"), EventLog(order=-5, tag="early:")
    learn = learner(cbs=[late, early])
    shared = []
    late.log = early.log = shared
    learn.fit(1, 1e-3)
    assert shared[:2] == ["early:before_fit", "late:before_fit"]
    assert learn.event_log in (late, early)
    assert learn.recorder is learn.cbs[0]


def test_run_valid_false_skips_validation_batches():
    log = EventLog(run_valid=False)
    learn = learner(cbs=[log])
    learn.fit(1, 1e-3)
    assert "before_validate" in log.log and "after_validate" in log.log
    after_validate = log.log.index("before_validate")
    assert "before_batch" not in log.log[after_validate:]


def test_cancel_batch_skips_the_step_and_cancel_fit_stops():
    class SkipAll(Callback):
        def after_loss(self):
            if self.learn.training:
                raise CancelBatchException()

    learn = learner(cbs=[SkipAll()])
    before = copy.deepcopy(learn.model.state_dict())
    log = EventLog(order=100)
    learn.add_cb(log)
    learn.fit(1, 1e-2)
    for key, value in before.items():
        if "running" in key or "num_batches" in key:
            continue
        assert torch.equal(value, learn.model.state_dict()[key]), key
    assert "after_cancel_batch" in log.log and "before_backward" not in log.log

    class StopAtSecondEpoch(Callback):
        def before_epoch(self):
            if self.learn.epoch == 1:
                raise CancelFitException()

    learn = learner(cbs=[StopAtSecondEpoch()])
    learn.fit(3, 1e-3)
    assert len(learn.recorder.values) == 1

    class NoTraining(Callback):
        def before_train(self):
            raise CancelTrainException()

    learn = learner(cbs=[NoTraining()])
    learn.fit(1, 1e-3)
    assert learn.recorder.losses == [] and len(learn.recorder.values) == 1


def test_recorder_train_loss_is_the_debiased_moving_average():
    learn = learner()
    learn.fit(2, 1e-3)
    rec = learn.recorder
    avg, n = 0.0, 0
    smoothed = []
    for loss in rec.raw_losses:
        avg = 0.98 * avg + 0.02 * loss
        n += 1
        smoothed.append(avg / (1 - 0.98 ** n))
    assert rec.losses == pytest.approx(smoothed)
    n_iter = len(learn.dls.train)
    assert rec.values[0][0] == pytest.approx(smoothed[n_iter - 1])
    assert rec.values[1][0] == pytest.approx(smoothed[-1])
    assert rec.iters == [n_iter, 2 * n_iter]
    # The valid loss and accuracy match a separate validation pass.
    assert rec.values[-1][1:3] == pytest.approx(learn.validate())
    assert [r["epoch"] for r in rec.records()] == [0, 1]
    assert set(rec.records()[0]) == {"epoch", "train_loss", "valid_loss", "accuracy", "seconds"}


def test_fit_keeps_lr_constant_and_momentum_at_09():
    learn = learner()
    learn.fit(2, 0.003)
    assert set(learn.recorder.lrs) == {0.003}
    assert set(learn.recorder.moms) == {0.9}


def test_fit_one_cycle_applies_the_schedule_per_batch():
    learn = learner()
    learn.fit_one_cycle(2, 0.01)
    n = len(learn.recorder.lrs)
    assert n == 2 * len(learn.dls.train)
    lr = schedules.one_cycle_lr(0.01)
    mom = schedules.one_cycle_mom()
    for i in range(n):
        assert learn.recorder.lrs[i] == pytest.approx(lr(i / n))
        assert learn.recorder.moms[i] == pytest.approx(mom(i / n))


def test_param_scheduler_works_with_torch_optimisers():
    learn = learner(opt_func=torch.optim.AdamW)
    learn.fit_one_cycle(1, 0.01)
    assert learn.recorder.moms[0] == pytest.approx(0.95)
    assert learn.opt.param_groups[0]["weight_decay"] == 0.01
    assert learn.opt.param_groups[1]["weight_decay"] == 0.0
    sched = ParamScheduler({"lr": schedules.constant(0.5)})
    assert sched.run_valid is False


def test_the_epoch_table_looks_like_fastais():
    lines = []
    learn = learner()
    learn.logger = lines.append
    learn.fit(2, 1e-3)
    assert lines[0].split() == ["epoch", "train_loss", "valid_loss", "accuracy", "time"]
    assert lines[1].split()[0] == "0" and lines[2].split()[0] == "1"
    assert re.fullmatch(r"\d\d:\d\d", lines[1].split()[-1])
    assert format_table(["epoch", "time"], [[0, 75.2]]).splitlines()[1].split() == ["0", "01:15"]


def test_progress_bar_renders_and_stays_off_without_a_terminal(capsys):
    import io

    learn = learner()
    learn.fit(1, 1e-3)
    assert learn.progress_bar.active is False
    stream = io.StringIO()
    learn = learner(cbs=[])
    learn.remove_cb(learn.progress_bar)
    learn.add_cb(ProgressBar(enabled=True, stream=stream, min_interval=0.0))
    learn.fit(1, 1e-3)
    text = stream.getvalue()
    assert "epoch 1/1 train |" in text and "6/6" in text and "valid" in text


# ---------------------------------------------------------------------------------------
# ActivationStats, hooks, summary


def test_activation_stats_hooks_every_module_with_parameters():
    stats = ActivationStats(with_hist=True)
    learn = learner(cbs=[stats])
    learn.fit(2, 1e-3)
    modules = [m for m in learn.model.modules() if list(m.parameters(recurse=False))]
    assert stats.modules == modules and len(modules) == 4
    n_batches = 2 * len(learn.dls.train)  # training batches only
    assert stats.layer_stats(0).shape == (n_batches, 3)
    assert stats.hist(-2).shape == (40, n_batches)
    near_zero = stats.layer_stats(1)[:, 2]
    # The fused BatchNormReLU2d outputs post-ReLU values: never negative, so its mean >= 0.
    assert (stats.layer_stats(1)[:, 0] >= 0).all()
    assert ((near_zero >= 0) & (near_zero <= 1)).all()
    assert stats.hooks is None  # removed at the end of fit
    assert all(len(m._forward_hooks) == 0 for m in modules)


def test_activation_stats_values_match_a_manual_computation():
    stats = ActivationStats(with_hist=True)
    learn = learner(cbs=[stats])

    class Capture(Callback):
        def after_pred(self):
            if self.learn.training:
                self.xb = self.learn.xb.clone()

    capture = Capture()
    learn.add_cb(capture)
    state = copy.deepcopy(learn.model.state_dict())
    learn.fit(1, 0.0)  # lr 0: the weights stay as they were (only BN statistics move)
    model = learn.model
    model.load_state_dict(state)
    model.train()
    out = model[0](capture.xb)
    row = stats.layer_stats(0)[-1]
    assert row[0].item() == pytest.approx(out.mean().item(), rel=1e-5, abs=1e-6)
    assert row[1].item() == pytest.approx(out.std().item(), rel=1e-5)
    assert row[2].item() == pytest.approx((out <= 0.05).float().mean().item())
    assert torch.allclose(stats.hists[0][-1], torch.histc(out, 40, 0, 10))


def test_hooks_are_removed_even_when_fit_crashes():
    stats = ActivationStats()

    class Crash(Callback):
        def after_batch(self):
            raise RuntimeError("boom")

    learn = learner(cbs=[stats, Crash()])
    with pytest.raises(RuntimeError, match="boom"):
        learn.fit(1, 1e-3)
    assert all(len(m._forward_hooks) == 0 for m in learn.model.modules())


def test_summary_counts_the_chapters_6722_parameters():
    ds = data.Dataset("s", torch.zeros(64, 28, 28, dtype=torch.uint8), torch.zeros(64, dtype=torch.long),
                      torch.zeros(64, 28, 28, dtype=torch.uint8), torch.zeros(64, dtype=torch.long), ["3", "7"])
    learn = Learner(data.make_dataloaders(ds, 64), convkit.nn.convert(sample_cnn()), logger=None)
    text = learn.summary()
    assert "Total params: 6,722" in text
    assert "64 x 4 x 14 x 14" in text and "64 x 2 x 1 x 1" in text
    assert "Sequential (Input shape: 64 x 1 x 28 x 28)" in text


# ---------------------------------------------------------------------------------------
# Checkpoints


def params_of(learn: Learner) -> dict:
    return {k: v.clone() for k, v in learn.model.state_dict().items()}


@pytest.mark.parametrize("method", ["fit", "fit_one_cycle"])
def test_resume_after_an_interruption_equals_an_uninterrupted_run(tmp_path, method):
    def train(learn: Learner) -> None:
        getattr(learn, method)(3, 0.01)

    stats = ActivationStats(with_hist=True)
    reference = learner(cbs=[stats])
    train(reference)

    class Interrupt(Callback):
        def after_batch(self):
            if self.learn.training and self.learn.epoch == 1 and self.learn.iter == 2:
                raise KeyboardInterrupt

    path = tmp_path / "ck.pt"
    interrupted = learner(cbs=[Checkpoint(path, resume=True), Interrupt(), ActivationStats(with_hist=True)])
    with pytest.raises(KeyboardInterrupt):
        train(interrupted)
    assert read_checkpoint(path)["epoch"] == 0

    # A fresh process: a newly initialised model, the same command.
    torch.manual_seed(99)
    resumed = Learner(tiny_dls(), convkit.nn.convert(tiny_cnn()), logger=None, progress=False,
                      cbs=[Checkpoint(path, resume=True, log=lambda s: None), ActivationStats(with_hist=True)])
    train(resumed)
    assert resumed.checkpoint.resumed_from == 1
    expected, got = params_of(reference), params_of(resumed)
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=0, msg=key)
    ref_rec, res_rec = reference.recorder, resumed.recorder
    assert res_rec.losses == ref_rec.losses
    assert res_rec.lrs == ref_rec.lrs and res_rec.moms == ref_rec.moms
    assert [row[:-1] for row in res_rec.values] == [row[:-1] for row in ref_rec.values]
    assert torch.equal(resumed.activation_stats.hist(-1), stats.hist(-1))


def test_resume_by_hand_with_load_and_start_epoch(tmp_path):
    reference = learner(cbs=[ActivationStats()])
    reference.fit_one_cycle(3, 0.01)
    first = learner(cbs=[Checkpoint(tmp_path / "ck.pt")])

    class StopAfterEpoch1(Callback):
        def after_epoch(self):
            if self.learn.epoch == 1:
                raise CancelFitException()

    first.add_cb(StopAfterEpoch1())
    first.fit_one_cycle(3, 0.01)
    torch.manual_seed(5)
    second = Learner(tiny_dls(), convkit.nn.convert(tiny_cnn()), cbs=[ActivationStats()], logger=None, progress=False)
    second.create_opt()
    state = second.load(tmp_path / "ck.pt")
    second.fit_one_cycle(3, 0.01, start_epoch=state["epoch"] + 1)
    for key, value in params_of(reference).items():
        assert torch.equal(value, params_of(second)[key]), key
    assert second.recorder.losses == reference.recorder.losses
    assert len(second.recorder.values) == 3


def test_a_checkpoint_of_another_fit_is_ignored(tmp_path):
    path = tmp_path / "ck.pt"
    first = learner(cbs=[Checkpoint(path)])
    first.fit(1, 0.01)
    messages = []
    second = learner(cbs=[Checkpoint(path, resume=True, log=messages.append)])
    second.fit_one_cycle(1, 0.01)
    assert second.checkpoint.resumed_from is None
    assert "another fit" in messages[0]


def test_a_finished_fit_resumes_to_nothing(tmp_path):
    path = tmp_path / "ck.pt"
    first = learner(cbs=[Checkpoint(path)])
    first.fit(2, 0.01)
    second = learner(cbs=[Checkpoint(path, resume=True, log=lambda s: None)])
    second.fit(2, 0.01)
    assert second.checkpoint.resumed_from == 2
    for key, value in params_of(first).items():
        assert torch.equal(value, params_of(second)[key])
    assert len(second.recorder.values) == 2


def test_save_and_load_round_trip(tmp_path):
    learn = learner()
    learn.fit(1, 0.01)
    learn.save(tmp_path / "m.pt")
    other = learner()
    state = other.load(tmp_path / "m.pt")
    assert state["epoch"] == 0
    for key, value in params_of(learn).items():
        assert torch.equal(value, params_of(other)[key])
    assert other.opt.state_dict()["state"].keys() == learn.opt.state_dict()["state"].keys()
    assert other.validate() == pytest.approx(learn.validate())


def test_works_with_a_plain_torch_model():
    learn = learner(model=tiny_cnn())
    learn.fit_one_cycle(1, 0.01)
    assert len(learn.recorder.values) == 1


def test_training_loader_without_batches_is_an_error():
    with pytest.raises(ValueError, match="one full training batch"):
        tiny_dls(n_train=4, bs=8)
    ds = data.Dataset("t", torch.zeros(4, 8, 8, dtype=torch.uint8), torch.zeros(4, dtype=torch.long),
                      torch.zeros(4, 8, 8, dtype=torch.uint8), torch.zeros(4, dtype=torch.long), ["a"])
    dls = data.make_dataloaders(ds, 8)
    learn = Learner(dls, tiny_cnn(), logger=None)
    with pytest.raises(ValueError, match="no batches"):
        learn.fit(1, 1e-3)


def test_hooks_are_context_managers():
    layer = nn.Linear(3, 2)
    with Hook(layer, lambda m, i, o: o.shape) as hook:
        layer(torch.randn(4, 3))
        assert hook.stored == (4, 2)
    assert len(layer._forward_hooks) == 0
    layers = [nn.Linear(3, 3), nn.Linear(3, 1)]
    with Hooks(layers, lambda m, i, o: o.sum().item()) as hooks:
        layers[1](layers[0](torch.ones(1, 3)))
        assert len(hooks) == 2 and all(isinstance(v, float) for v in hooks.stored)
    assert all(len(m._forward_hooks) == 0 for m in layers)


class _Planted:
    """A pickle that, when unpickled without weights_only, creates a file (a stand-in for
    any code an attacker would run)."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _bad_checkpoint(kind: str, path, marker) -> None:
    if kind == "truncated":
        learn = learner()
        learn.fit(1, 0.01)
        learn.save(path)
        content = path.read_bytes()
        path.write_bytes(content[: len(content) // 2])
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "garbage":
        path.write_bytes(b"\x00\x01 this is not a checkpoint" * 40)
    elif kind == "not_ours":
        torch.save({"model": {}, "epoch": 0}, path)
    elif kind == "planted_code":
        torch.save({"format": "convkit.learner checkpoint", "version": 1, "model": _Planted(str(marker)),
                    "epoch": 0, "fit_plan": {}}, path)


@pytest.mark.parametrize("kind", ["truncated", "empty", "garbage", "not_ours", "planted_code"])
def test_a_bad_checkpoint_is_refused_moved_aside_and_the_fit_starts_afresh(kind, tmp_path):
    path = tmp_path / "ck.pt"
    marker = tmp_path / "code-ran"
    _bad_checkpoint(kind, path, marker)
    with pytest.raises(CheckpointError, match=rf"{path.name} is (not a readable|not a|an incomplete) convkit checkpoint"):
        learner().load(path)
    messages = []
    learn = learner(cbs=[Checkpoint(path, resume=True, log=messages.append)])
    learn.fit(2, 0.01)
    assert not marker.exists(), "the checkpoint ran code"
    assert learn.checkpoint.resumed_from is None
    assert any("moved it to" in m and "starting this fit afresh" in m for m in messages), messages
    assert len(list(tmp_path.glob("ck.pt.unreadable-*"))) == 1
    assert read_checkpoint(path)["epoch"] == 1  # the new checkpoint, written after each epoch


def test_checkpoints_hold_only_tensors_and_plain_values(tmp_path):
    learn = learner(cbs=[ActivationStats(with_hist=True)])
    learn.fit_one_cycle(1, 0.01)
    learn.save(tmp_path / "ck.pt")
    state = torch.load(tmp_path / "ck.pt", weights_only=True)  # refuses anything else
    assert state["format"] == "convkit.learner checkpoint" and state["version"] == 1
