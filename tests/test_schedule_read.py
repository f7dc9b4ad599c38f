"""Reading the planned optimizer settings ahead (``lightning_smd.engine.schedule``) against real Lightning fits.

Each fit reads the plan in ``on_train_start`` (``read_trainer_schedules``) and records the param groups right
before every optimizer step (``on_before_optimizer_step``); the plan must equal what the optimizer really held, at
every step, exactly. The read must be an observer: optimizer, scheduler and weights unchanged by it, the same final
weights and lr trace as a fit without it, and no warning. timm's schedulers are checked in a subprocess (timm needs
``.zoo-deps``, see ``tests/test_zoo_real.py``).
"""

from __future__ import annotations

import copy
import json
import math
import threading
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from helpers import run_python
from torch import nn
from torch.nn import functional as F
from torch.optim import lr_scheduler as lrs
from torch.utils.data import DataLoader, TensorDataset

from lightning_smd.engine.schedule import PlannedSchedule, Unreadable, read_schedule, read_trainer_schedules, schedule_from_function

ROOT = Path(__file__).resolve().parents[1]
EPOCHS, BATCHES = 3, 7
TOTAL = EPOCHS * BATCHES
KEYS = ("lr", "weight_decay", "momentum", "betas")


# ---------------------------------------------------------------------------------------------
# A tiny module, the plan-vs-actual callback
# ---------------------------------------------------------------------------------------------


def _loader() -> DataLoader:
    g = torch.Generator().manual_seed(0)
    return DataLoader(TensorDataset(torch.randn(4 * BATCHES, 6, generator=g), torch.randn(4 * BATCHES, 1, generator=g)), batch_size=4)


class Net(pl.LightningModule):
    """Linear-BN-ReLU-Linear; ``configure(module)`` is its ``configure_optimizers``."""

    def __init__(self, configure: Any) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 1))
        self.configure = configure

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.mse_loss(self.body(x), y)

    def configure_optimizers(self) -> Any:
        return self.configure(self)

    def train_dataloader(self) -> DataLoader:
        return _loader()

    def lr_factor(self, step: int) -> float:  # a bound method as LambdaLR's lr_lambda
        return 1.0 / (1.0 + 0.1 * step)


def _raw(optimizer: Any) -> Any:
    return getattr(optimizer, "_optimizer", optimizer)


def _groups(optimizer: Any, keys: Any = KEYS) -> list[dict[str, Any]]:
    return [{k: g[k] for k in keys if k in g} for g in _raw(optimizer).param_groups]


def _state(trainer: pl.Trainer) -> dict[str, Any]:
    """Everything the read must leave as it is."""
    return {
        "schedulers": [copy.deepcopy(c.scheduler.state_dict()) for c in trainer.lr_scheduler_configs],
        "optimizers": [copy.deepcopy(o.state_dict()) for o in trainer.optimizers],
        "groups": [copy.deepcopy([{k: v for k, v in g.items() if k != "params"} for g in o.param_groups]) for o in trainer.optimizers],
        "optimizer_attrs": [dict(vars(o)) for o in trainer.optimizers],
        "weights": {k: v.detach().clone() for k, v in trainer.lightning_module.state_dict().items()},
    }


def _equal(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return type(a) is type(b) and len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b, strict=True))
    if callable(a) or isinstance(a, torch.optim.Optimizer):
        return a is b
    return bool(a == b) and type(a) is type(b)


class PlanVsActual(pl.Callback):
    """Reads the plan in ``on_train_start`` (unless ``read=False``) and records the groups before every step."""

    def __init__(self, read: bool = True, keys: Any = KEYS) -> None:
        self.read, self.keys = read, keys
        self.plans: list[PlannedSchedule | Unreadable] = []
        self.actual: dict[int, list[list[dict[str, Any]]]] = {}
        self.warned: list[str] = []
        self.unchanged = True
        self.read_seconds = 0.0

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.read:
            return
        before = _state(trainer)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            self.plans = read_trainer_schedules(trainer, [self.keys] * len(trainer.optimizers), None)
        self.warned = [f"{w.category.__name__}: {w.message}" for w in caught]
        self.unchanged = _equal(before, _state(trainer))

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        index = [id(o) for o in trainer.optimizers].index(id(_raw(optimizer)))
        self.actual.setdefault(index, []).append(_groups(optimizer, self.keys))


def _trainer_options(cb: pl.Callback, **trainer_kw: Any) -> dict[str, Any]:
    """A quiet one-device CPU Trainer's options with ``cb`` (and ``trainer_kw`` over them)."""
    opts: dict[str, Any] = dict(
        max_epochs=EPOCHS,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=[cb],
    )
    opts.update(trainer_kw)
    return opts


def _fit(module: pl.LightningModule, callback: pl.Callback | None = None, **trainer_kw: Any) -> PlanVsActual:
    cb = callback if callback is not None else PlanVsActual()
    opts = _trainer_options(cb, **trainer_kw)
    pl.seed_everything(0, verbose=False)
    pl.Trainer(**opts).fit(module)
    return cb


def _assert_plan_matches(cb: PlanVsActual, steps: int = TOTAL, start_step: int = 0) -> None:
    assert cb.unchanged, "reading the plan changed the optimizer, a scheduler or the weights"
    assert not cb.warned, cb.warned
    assert cb.plans and len(cb.plans) == len(cb.actual)
    for index, plan in enumerate(cb.plans):
        assert isinstance(plan, PlannedSchedule), plan
        actual = cb.actual[index]
        assert plan.optimizer_index == index and plan.start_step == start_step and not plan.truncated
        assert len(actual) == plan.n_steps == steps, (len(actual), plan.n_steps, steps)
        for g in range(len(actual[0])):
            for key, column in plan.columns[g].items():
                base, _, part = key.partition(".")
                want = np.array([float(a[g][base][int(part)] if part else a[g][base]) for a in actual])
                assert np.array_equal(column, want), (plan.source, g, key, np.flatnonzero(column != want)[:5], column[:8], want[:8])
            for i in range(steps):
                assert plan.group_at(g, i) == actual[i][g], (plan.source, g, i, plan.group_at(g, i), actual[i][g])


# ---------------------------------------------------------------------------------------------
# Every scheduler, interval and frequency: the plan is what the optimizer held, at every step
# ---------------------------------------------------------------------------------------------


def _sgd(m: Net, **kw: Any) -> torch.optim.Optimizer:
    return torch.optim.SGD(m.parameters(), **{"lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4, **kw})


def _adamw(m: Net) -> torch.optim.Optimizer:
    return torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.05)


def _two_groups(m: Net, kind: str = "sgd") -> torch.optim.Optimizer:
    first, rest = list(m.body[0].parameters()), [p for layer in m.body[1:] for p in layer.parameters()]
    groups = [{"params": first}, {"params": rest, "lr": 0.01, "weight_decay": 0.0}]
    if kind == "sgd":
        return torch.optim.SGD(groups, lr=0.1, momentum=0.9, weight_decay=5e-4)
    return torch.optim.AdamW(groups, lr=1e-2, weight_decay=0.05)


def _conf(opt: torch.optim.Optimizer, scheduler: Any, interval: str = "step", frequency: int = 1) -> dict[str, Any]:
    return {"optimizer": opt, "lr_scheduler": {"scheduler": scheduler, "interval": interval, "frequency": frequency}}


def _warmup_cosine(step: int, warm: int = 4, total: int = TOTAL) -> float:
    if step < warm:
        return (step + 1) / warm
    return 0.5 * (1.0 + math.cos(math.pi * (step - warm) / (total - warm)))


def _wsd(step: int, warm: int = 3, decay_from: int = 14, total: int = TOTAL) -> float:
    """Warm-up, stable, linear decay to 0.1 (a WSD schedule)."""
    if step < warm:
        return (step + 1) / warm
    if step < decay_from:
        return 1.0
    return 1.0 - 0.9 * min(step - decay_from, total - decay_from) / (total - decay_from)


class DecayingWeightDecay(lrs.LRScheduler):
    """A user scheduler that anneals the weight decay too (the plan reads any key, not just lr)."""

    def get_lr(self) -> list[float]:
        for group in self.optimizer.param_groups:
            group["weight_decay"] = 5e-4 * 0.9**self.last_epoch
        return [base * 0.95**self.last_epoch for base in self.base_lrs]


def _one_cycle(m: Net, opt: torch.optim.Optimizer, **kw: Any) -> dict[str, Any]:
    return _conf(opt, lrs.OneCycleLR(opt, max_lr=kw.pop("max_lr", 0.5), total_steps=int(m.trainer.estimated_stepping_batches), **kw))


def _sequential(o: torch.optim.Optimizer) -> lrs.SequentialLR:
    return lrs.SequentialLR(o, [lrs.LinearLR(o, start_factor=0.1, total_iters=4), lrs.CosineAnnealingLR(o, T_max=TOTAL - 4)], milestones=[4])


def _chained(o: torch.optim.Optimizer) -> lrs.ChainedScheduler:
    return lrs.ChainedScheduler([lrs.ConstantLR(o, factor=0.5, total_iters=3), lrs.ExponentialLR(o, gamma=0.9)])


def _halving(epoch: int) -> float:
    return 0.5**epoch


def _two_configs(m: Net) -> Any:
    """An epoch-interval LambdaLR (closed form: it overwrites the lr) listed before a step-interval StepLR (chainable):
    the result at an epoch end depends on the order, and Lightning steps the step-interval configs first."""
    o = _sgd(m)
    configs = [{"scheduler": lrs.LambdaLR(o, _halving), "interval": "epoch"}, {"scheduler": lrs.StepLR(o, step_size=1, gamma=0.9), "interval": "step"}]
    return [o], configs


CASES: dict[str, Any] = {
    "no scheduler": lambda m: _sgd(m),
    "StepLR": lambda m: _conf(o := _sgd(m), lrs.StepLR(o, step_size=5, gamma=0.5)),
    "StepLR epoch": lambda m: _conf(o := _sgd(m), lrs.StepLR(o, step_size=1, gamma=0.5), "epoch"),
    "MultiStepLR": lambda m: _conf(o := _sgd(m), lrs.MultiStepLR(o, milestones=[4, 9, 15], gamma=0.3)),
    "ExponentialLR epoch": lambda m: _conf(o := _sgd(m), lrs.ExponentialLR(o, gamma=0.8), "epoch"),
    "ExponentialLR every 2": lambda m: _conf(o := _sgd(m), lrs.ExponentialLR(o, gamma=0.9), "step", 2),
    "CosineAnnealingLR": lambda m: _conf(o := _sgd(m), lrs.CosineAnnealingLR(o, T_max=TOTAL, eta_min=1e-3)),
    "CosineAnnealingLR epoch every 2": lambda m: _conf(o := _sgd(m), lrs.CosineAnnealingLR(o, T_max=2), "epoch", 2),
    "LinearLR": lambda m: _conf(o := _sgd(m), lrs.LinearLR(o, start_factor=0.1, total_iters=6)),
    "ConstantLR": lambda m: _conf(o := _sgd(m), lrs.ConstantLR(o, factor=0.5, total_iters=4)),
    "PolynomialLR": lambda m: _conf(o := _sgd(m), lrs.PolynomialLR(o, total_iters=TOTAL, power=2.0)),
    "LambdaLR warm-up cosine": lambda m: _conf(o := _adamw(m), lrs.LambdaLR(o, _warmup_cosine)),
    "LambdaLR WSD": lambda m: _conf(o := _adamw(m), lrs.LambdaLR(o, _wsd)),
    "LambdaLR bound method": lambda m: _conf(o := _sgd(m), lrs.LambdaLR(o, m.lr_factor)),
    "SequentialLR": lambda m: _conf(o := _sgd(m), _sequential(o)),
    "ChainedScheduler": lambda m: _conf(o := _sgd(m), _chained(o)),
    "OneCycleLR SGD momentum": lambda m: _one_cycle(m, _sgd(m)),
    "OneCycleLR AdamW betas": lambda m: _one_cycle(m, _adamw(m), three_phase=True),
    "CosineAnnealingWarmRestarts": lambda m: _conf(o := _sgd(m), lrs.CosineAnnealingWarmRestarts(o, T_0=4, T_mult=2)),
    "weight decay scheduled": lambda m: _conf(o := _sgd(m), DecayingWeightDecay(o)),
    "two groups cosine": lambda m: _conf(o := _two_groups(m), lrs.CosineAnnealingLR(o, T_max=TOTAL)),
    "two groups OneCycleLR": lambda m: _one_cycle(m, _two_groups(m, "adamw"), max_lr=[0.1, 0.01]),
    "two configs step and epoch": _two_configs,
}


@pytest.mark.parametrize("name", list(CASES))
def test_the_plan_is_what_the_optimizer_holds_at_every_step(name):
    cb = _fit(Net(CASES[name]))
    _assert_plan_matches(cb)
    plan = cb.plans[0]
    assert plan.varies() == (name != "no scheduler"), plan.source
    if name == "no scheduler":
        assert plan.source == "no scheduler: constant settings"
    else:
        assert plan.source.endswith(f"read ahead for {TOTAL} steps"), plan.source


ACCUMULATED: dict[str, Any] = {
    "OneCycleLR": lambda m: _one_cycle(m, _sgd(m)),
    "StepLR every 2 batches": lambda m: _conf(o := _sgd(m), lrs.StepLR(o, step_size=1, gamma=0.8), "step", 2),
    "StepLR every 3 batches": lambda m: _conf(o := _sgd(m), lrs.StepLR(o, step_size=1, gamma=0.8), "step", 3),
    "two configs step and epoch": _two_configs,
}


@pytest.mark.parametrize("name", list(ACCUMULATED))
def test_accumulation_counts_batches_and_steps_on_the_partial_last_one(name):
    """7 batches, accumulate 2: optimizer steps after batches 2, 4, 6 and 7 of every epoch (4 per epoch); the
    step-interval frequency counts batches within the epoch (every 3: after batch 6 only)."""
    cb = _fit(Net(ACCUMULATED[name]), accumulate_grad_batches=2)
    _assert_plan_matches(cb, steps=EPOCHS * math.ceil(BATCHES / 2))
    if name == "StepLR every 3 batches":
        lr = cb.plans[0].columns[0]["lr"]
        # (to rounding: StepLR multiplies by 0.8 step by step, and numpy's vectorized power rounds differently on
        # some CPUs; the pattern of the steps is what is tested)
        np.testing.assert_allclose(lr, 0.1 * 0.8 ** np.array([0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3]), rtol=1e-12, atol=0)


def test_limited_batches_with_accumulation():
    """limit_train_batches=5, accumulate 2: steps after batches 2, 4 and 5 of every epoch."""
    cb = _fit(Net(_two_configs), accumulate_grad_batches=2, limit_train_batches=5)
    _assert_plan_matches(cb, steps=EPOCHS * 3)


def test_max_steps_mid_epoch_and_an_overridden_lr_scheduler_step_that_calls_step():
    class Override(Net):
        def lr_scheduler_step(self, scheduler: Any, metric: Any) -> None:
            if not isinstance(scheduler, lrs.CosineAnnealingLR):  # the probe passes isinstance checks
                raise TypeError(f"unexpected {type(scheduler)}")
            scheduler.step()

    cb = _fit(Override(CASES["CosineAnnealingLR"]), max_steps=10)
    _assert_plan_matches(cb, steps=10)
    assert "by lr_scheduler_step as step()" in cb.plans[0].source


def _resumable(m: Net) -> Any:
    o = _sgd(m)
    return [o], [
        {"scheduler": lrs.LambdaLR(o, _halving), "interval": "epoch"},
        {"scheduler": lrs.StepLR(o, step_size=1, gamma=0.9), "frequency": 2, "interval": "step"},
    ]


@pytest.mark.parametrize(
    ("every", "accumulate", "checkpoint", "start"),
    [
        ({"every_n_train_steps": 4}, 1, "epoch=1-step=12.ckpt", 12),
        ({"every_n_train_steps": 3}, 2, "epoch=1-step=6.ckpt", 6),
        ({"every_n_epochs": 1}, 1, "epoch=0-step=7.ckpt", 7),
    ],
    ids=["mid-epoch", "mid-epoch accumulated", "epoch end"],
)
def test_a_resumed_fit_is_read_from_where_it_resumes(tmp_path, every, accumulate, checkpoint, start):
    """Read in on_train_start, a resumed fit's plan starts at the restored step, epoch and batch (the checkpoint's
    scheduler state is restored by then)."""
    saver = pl.callbacks.ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, **every)
    _fit(Net(_resumable), callbacks=[saver], enable_checkpointing=True, accumulate_grad_batches=accumulate, max_epochs=2)
    cb = PlanVsActual()
    pl.seed_everything(0, verbose=False)
    trainer = pl.Trainer(**_trainer_options(cb, accumulate_grad_batches=accumulate))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(resuming from a checkpoint that ended before|callbacks used to create the checkpoint).*")
        trainer.fit(Net(_resumable), ckpt_path=tmp_path / checkpoint)
    per_epoch = math.ceil(BATCHES / accumulate)
    _assert_plan_matches(cb, steps=EPOCHS * per_epoch - start, start_step=start)


# ---------------------------------------------------------------------------------------------
# Observer: the read changes nothing
# ---------------------------------------------------------------------------------------------


def test_the_read_changes_nothing_and_the_fit_is_bit_identical_without_it():
    configure = CASES["two groups OneCycleLR"]
    torch.manual_seed(1)
    with_read, module_a = PlanVsActual(), Net(configure)
    _fit(module_a, with_read)
    torch.manual_seed(1)
    without, module_b = PlanVsActual(read=False), Net(configure)
    _fit(module_b, without)
    _assert_plan_matches(with_read)
    assert with_read.actual == without.actual  # the lr/betas/weight-decay trace
    a, b = module_a.state_dict(), module_b.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    sched_a, sched_b = module_a.trainer.lr_scheduler_configs[0].scheduler, module_b.trainer.lr_scheduler_configs[0].scheduler
    assert _equal(sched_a.state_dict(), sched_b.state_dict())
    assert _equal(module_a.trainer.optimizers[0].state_dict(), module_b.trainer.optimizers[0].state_dict())


def _standalone() -> tuple[nn.Module, torch.optim.Optimizer, Any]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    model(torch.randn(8, 4)).square().sum().backward()
    opt.step()  # some optimizer state
    return model, opt, _sequential(opt)


def test_the_copies_point_at_one_shadow_and_copy_no_parameter_and_no_shared_object():
    from lightning_smd.engine.schedule import _copy_onto_shadow

    class Watcher(lrs.LambdaLR):
        def __init__(self, optimizer: Any, owner: nn.Module) -> None:
            self.anchor = owner[0].weight  # a parameter the scheduler holds
            super().__init__(optimizer, owner.factor)  # a bound method of a module

    class Owner(nn.Sequential):
        def factor(self, step: int) -> float:
            return 0.9**step

    owner = Owner(nn.Linear(3, 3))
    opt = torch.optim.SGD(owner.parameters(), lr=0.1)
    chained = lrs.ChainedScheduler([Watcher(opt, owner), _sequential(opt)])
    shadow, (copied,) = _copy_onto_shadow(opt, [chained], [owner])
    nested = [copied, *copied._schedulers, *copied._schedulers[1]._schedulers]
    assert copied is not chained and all(s.optimizer is shadow for s in nested)
    assert copied._schedulers[0].anchor is owner[0].weight and copied._schedulers[0].lr_lambdas[0].__self__ is owner
    assert [g["params"] for g in shadow.param_groups] == [[]] and shadow.param_groups[0]["lr"] == opt.param_groups[0]["lr"]


def test_read_schedule_leaves_optimizer_scheduler_and_weights_as_they_were():
    model, opt, sched = _standalone()
    before = (copy.deepcopy(opt.state_dict()), copy.deepcopy(sched.state_dict()), copy.deepcopy(model.state_dict()), dict(vars(opt)), opt.param_groups)
    groups = copy.deepcopy([{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plan = read_schedule(opt, [(sched, "step", 1)], ["lr", "betas", "weight_decay"], 50)
    assert isinstance(plan, PlannedSchedule) and plan.varies() and plan.n_steps == 50
    after = (opt.state_dict(), sched.state_dict(), model.state_dict(), dict(vars(opt)), opt.param_groups)
    assert _equal(before[:3], after[:3])
    assert before[3].keys() == after[3].keys() and all(before[3][k] is after[3][k] for k in before[3])
    assert before[4] is after[4] and _equal(groups, [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups])
    # the plan is what stepping the real scheduler gives
    real = []
    for _ in range(50):
        real.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert np.array_equal(plan.columns[0]["lr"], np.array(real))
    assert plan.group_at(0, 3) == {"lr": real[3], "betas": (0.9, 0.999), "weight_decay": 0.1}


# ---------------------------------------------------------------------------------------------
# Unreadable, truncated, and the other entry points
# ---------------------------------------------------------------------------------------------


class _Stop(Exception):
    pass


class ReadAndStop(pl.Callback):
    """Reads the plan in the given hook, then stops the fit."""

    def __init__(self, hook: str = "on_train_start") -> None:
        self.plans: list[Any] = []
        setattr(self, hook, self._read)

    def _read(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.plans = read_trainer_schedules(trainer, [KEYS] * len(trainer.optimizers), None)
        raise _Stop


def _read_only(module: pl.LightningModule, hook: str = "on_train_start", **trainer_kw: Any) -> list[Any]:
    cb = ReadAndStop(hook)
    with pytest.raises(_Stop):
        _fit(module, cb, **trainer_kw)
    return cb.plans


def test_reduce_on_plateau_and_unknown_length_are_unreadable_with_the_reason():
    def plateau(m: Net) -> Any:
        o = _sgd(m)
        return {"optimizer": o, "lr_scheduler": {"scheduler": lrs.ReduceLROnPlateau(o), "monitor": "loss"}}

    (result,) = _read_only(Net(plateau))
    assert isinstance(result, Unreadable) and result.optimizer_index == 0
    assert result.reason.startswith("ReduceLROnPlateau reacts to a monitored metric and cannot be read ahead")
    assert result.reason.endswith("judged from their changes as they come.")

    (result,) = _read_only(Net(CASES["CosineAnnealingLR"]), max_epochs=-1)
    assert isinstance(result, Unreadable) and "number of planned optimizer steps is unknown" in result.reason

    (result,) = _read_only(Net(CASES["CosineAnnealingLR"]), hook="on_fit_start")
    assert isinstance(result, Unreadable) and "read the schedule in on_train_start" in result.reason

    _, opt, sched = _standalone()
    result = read_schedule(opt, [(sched, "step", 1)], ["lr"], None)
    assert isinstance(result, Unreadable) and "unknown" in result.reason


def test_lr_scheduler_step_overrides_the_read_ahead_cannot_follow_are_unreadable():
    class TwoSteps(Net):
        def lr_scheduler_step(self, scheduler: Any, metric: Any) -> None:
            scheduler.step()
            scheduler.step()

    class Inspects(Net):
        def lr_scheduler_step(self, scheduler: Any, metric: Any) -> None:
            if scheduler.last_epoch < 5:
                scheduler.step()

    for module, words in ((TwoSteps, "made 2 calls"), (Inspects, "AttributeError")):
        (result,) = _read_only(module(CASES["CosineAnnealingLR"]))
        assert isinstance(result, Unreadable) and words in result.reason and "lr_scheduler_step" in result.reason, result


def test_failures_of_copying_or_stepping_and_a_foreign_optimizer_are_unreadable():
    _, opt, sched = _standalone()
    sched.lock = threading.Lock()  # cannot be deep-copied
    result = read_schedule(opt, [(sched, "step", 1)], ["lr"], 10)
    assert isinstance(result, Unreadable) and "could not be copied" in result.reason, result

    _, opt, _ = _standalone()
    one_cycle = lrs.OneCycleLR(opt, max_lr=0.1, total_steps=10)
    assert isinstance(read_schedule(opt, [(one_cycle, "step", 1)], ["lr"], 10), PlannedSchedule)  # steps 1..10: fine
    result = read_schedule(opt, [(one_cycle, "step", 1)], ["lr"], 12)
    assert isinstance(result, Unreadable) and "OneCycleLR raised ValueError" in result.reason and "after optimizer step 11" in result.reason

    _, other, _ = _standalone()
    result = read_schedule(other, [(one_cycle, "step", 1)], ["lr"], 10)
    assert isinstance(result, Unreadable) and "another optimizer" in result.reason

    result = read_schedule(opt, [(one_cycle, "epoch", 1)], ["lr"], 10)
    assert isinstance(result, Unreadable) and "epoch length is unknown" in result.reason


def test_caps_truncate_and_say_so():
    _, opt, sched = _standalone()
    full = read_schedule(opt, [(sched, "step", 1)], ["lr"], 30)
    cut = read_schedule(opt, [(sched, "step", 1)], ["lr"], 30, max_steps=7)
    assert isinstance(full, PlannedSchedule) and isinstance(cut, PlannedSchedule)
    assert not full.truncated and cut.truncated and cut.n_steps == 7
    assert "read for the first 7 of 30 steps" in cut.source and "7-step cap" in cut.source
    assert np.array_equal(cut.columns[0]["lr"], full.columns[0]["lr"][:7])

    timed = read_schedule(opt, [(sched, "step", 1)], ["lr"], 5000, max_seconds=0.0)
    assert isinstance(timed, PlannedSchedule) and timed.truncated and timed.n_steps == 1025 and "time cap" in timed.source

    for schedulers in ([], [(sched, "step", 1)]):
        empty = read_schedule(opt, schedulers, ["lr", "betas"], 0)
        assert isinstance(empty, PlannedSchedule) and empty.n_steps == 0 and list(empty.columns[0]) == ["lr", "betas.0", "betas.1"]

    constant = read_schedule(opt, [], ["lr", "weight_decay"], 30, max_steps=5)
    assert isinstance(constant, PlannedSchedule) and constant.truncated and constant.n_steps == 5 and not constant.varies()
    assert constant.source == "no scheduler: constant settings, read for the first 5 of 30 steps (stopped by the 5-step cap)"


def test_epochs_in_a_plain_loop_and_start_positions():
    """``steps_per_epoch`` for a plain loop; a plan read mid-run starts where the run is."""
    _, opt, _ = _standalone()
    sched = lrs.StepLR(opt, step_size=1, gamma=0.5)
    plan = read_schedule(opt, [(sched, "epoch", 1)], ["lr"], 9, steps_per_epoch=4, start_step=6, start_epoch=1, start_batch=2)
    assert isinstance(plan, PlannedSchedule) and plan.start_step == 6
    # 2 more steps in epoch 1, then epochs 2 and 3 (4 steps each), then epoch 4
    lr = plan.columns[0]["lr"]
    assert np.array_equal(lr / lr[0], [1, 1, 0.5, 0.5, 0.5, 0.5, 0.25, 0.25, 0.25])


def test_schedule_from_function_matches_a_hand_written_loop():
    model = nn.Linear(3, 3)
    opt = torch.optim.AdamW([{"params": [model.weight]}, {"params": [model.bias], "lr": 5e-4}], lr=1e-3, weight_decay=0.01)

    def settings(t: int) -> dict[str, Any]:
        return {"lr": [1e-3 * _wsd(t), 5e-4 * _wsd(t)], "weight_decay": 0.01 * (1 + t / 10), "betas": (0.9 - 0.01 * t, 0.999)}

    plan = schedule_from_function(settings, opt, ["lr", "weight_decay", "betas"], TOTAL)
    real = []
    for t in range(TOTAL):  # the loop the function describes
        for g, group in enumerate(opt.param_groups):
            s = settings(t)
            group.update(lr=s["lr"][g], weight_decay=s["weight_decay"], betas=s["betas"])
        real.append(_groups(opt, ["lr", "weight_decay", "betas"]))
    assert isinstance(plan, PlannedSchedule) and plan.varies() and "read ahead for 21 steps" in plan.source
    assert all(plan.group_at(g, i) == real[i][g] for i in range(TOTAL) for g in range(2))
    assert isinstance(schedule_from_function(lambda t: 1 / (5 - t), opt, ["lr"], 10), Unreadable)  # ZeroDivisionError
    assert np.array_equal(schedule_from_function(lambda t: 0.1, opt, ["lr"], 3).columns[1]["lr"], [0.1] * 3)


def test_read_ahead_of_100000_steps_is_fast():
    model = nn.Linear(4, 4)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    sched = lrs.CosineAnnealingLR(opt, T_max=100_000)
    plan = read_schedule(opt, [(sched, "step", 1)], ["lr", "weight_decay", "momentum"], 100_000, max_seconds=30)
    assert isinstance(plan, PlannedSchedule) and not plan.truncated and plan.n_steps == 100_000
    assert plan.columns[0]["lr"][-1] == pytest.approx(0.1 * 0.5 * (1 + math.cos(math.pi * 99_999 / 100_000)), rel=1e-12)


# ---------------------------------------------------------------------------------------------
# Manual optimization with two optimizers
# ---------------------------------------------------------------------------------------------


class TwoOptimizers(Net):
    def __init__(self) -> None:
        super().__init__(None)
        self.automatic_optimization = False

    def configure_optimizers(self) -> Any:
        first = torch.optim.SGD(self.body[0].parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
        second = torch.optim.AdamW(self.body[3].parameters(), lr=1e-2)
        third = torch.optim.SGD(self.body[1].parameters(), lr=0.05)  # no scheduler
        return [first, second, third], [lrs.CosineAnnealingLR(first, T_max=TOTAL), lrs.OneCycleLR(second, max_lr=0.05, total_steps=TOTAL)]

    def training_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        for opt in self.optimizers():
            opt.zero_grad()
        self.manual_backward(F.mse_loss(self.body(x), y))
        for opt in self.optimizers():
            opt.step()
        for sched in self.lr_schedulers():
            sched.step()


class ManualPlans(PlanVsActual):
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self.from_trainer = self.plans
        before = _state(trainer)
        by_hand = []
        for index, opt in enumerate(trainer.optimizers):
            mine = [(c.scheduler, "step", 1) for c in trainer.lr_scheduler_configs if c.scheduler.optimizer is opt]
            by_hand.append(read_schedule(opt, mine, KEYS, TOTAL, optimizer_index=index))
        self.plans = by_hand
        self.unchanged = self.unchanged and _equal(before, _state(trainer))


def test_manual_optimization_two_optimizers():
    """Lightning steps no scheduler under manual optimization: the trainer read says so (and gives the constant
    plan of the optimizer without one); read_schedule, told how the module steps them, matches every step."""
    cb = _fit(TwoOptimizers(), ManualPlans())
    first, second, third = cb.from_trainer
    assert isinstance(first, Unreadable) and isinstance(second, Unreadable) and "manual optimization" in first.reason
    assert isinstance(third, PlannedSchedule) and third.source == "no scheduler: constant settings"
    _assert_plan_matches(cb)


# ---------------------------------------------------------------------------------------------
# timm (in a subprocess: timm needs .zoo-deps on its path)
# ---------------------------------------------------------------------------------------------

TIMM_SCRIPT = """
import json, sys, types
import pytorch_lightning  # before .zoo-deps is on the path (torchmetrics would import its torchvision)
sys.path.insert(0, {tests!r})
sys.path.insert(0, {zoo!r})
for name in ("torchvision._meta_registrations", "torchvision._autograd_registrations"):
    sys.modules.setdefault(name, types.ModuleType(name))  # as benchmarks/zoo_audit.py: no compiled ops needed
from timm.scheduler import CosineLRScheduler, StepLRScheduler
import test_schedule_read as T

class ByUpdate(T.Net):
    def lr_scheduler_step(self, scheduler, metric):
        scheduler.step_update(num_updates=self.global_step)

class ByEpoch(T.Net):
    def lr_scheduler_step(self, scheduler, metric):
        scheduler.step(epoch=self.current_epoch + 1)

def cosine_updates(m):
    o = T._sgd(m)
    s = CosineLRScheduler(o, t_initial=T.TOTAL, warmup_t=4, warmup_lr_init=1e-3, t_in_epochs=False, noise_range_t=10)
    return T._conf(o, s, "step")

def step_epochs(m):
    o = T._adamw(m)
    return T._conf(o, StepLRScheduler(o, decay_t=1, decay_rate=0.5, warmup_t=1, warmup_lr_init=1e-4), "epoch")

out = {{}}
for name, cls, configure, kw in (("updates", ByUpdate, cosine_updates, {{}}), ("epochs", ByEpoch, step_epochs, {{}}),
                                  ("updates accumulated", ByUpdate, cosine_updates, {{"accumulate_grad_batches": 2}})):
    cb = T._fit(cls(configure), **kw)
    try:
        T._assert_plan_matches(cb, steps=T.EPOCHS * (4 if kw else T.BATCHES))
        out[name] = {{"ok": True, "source": cb.plans[0].source, "varies": cb.plans[0].varies()}}
    except AssertionError as exc:
        out[name] = {{"ok": False, "error": repr(exc)[:2000]}}
print(json.dumps(out))
"""


@pytest.mark.slow  # a subprocess with timm on its path (~7 s)
def test_timm_schedulers_stepped_by_the_documented_lr_scheduler_step(tmp_path):
    zoo = ROOT / ".zoo-deps"
    if not (zoo / "timm").is_dir():
        pytest.skip("timm not in .zoo-deps: run the README's test command (it installs it there)")
    script = tmp_path / "timm_schedules.py"
    script.write_text(TIMM_SCRIPT.format(tests=str(ROOT / "tests"), zoo=str(zoo)))
    proc = run_python([script], timeout=120)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert all(r["ok"] and r["varies"] for r in result.values()), result
    assert "step_update(global_step)" in result["updates"]["source"]
    assert "step(current_epoch + 1)" in result["epochs"]["source"]
