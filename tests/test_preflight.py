"""Before step 1: what a planned schedule allows whatever the gradients (lightning_smd.analysis.preflight, SMD036/SMD037).

The unit tests build plans from columns, as the schedule read-ahead does; the end-to-end ones run a real Trainer and
read the warnings said before its first training step. The verdict sweep's cells are in docs/verdict_reliability.md §4
(``before step 1``): the check depends on the plan only, not on the seed.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from helpers import healthy_module, plan_columns, teacher_loader, trainer

from lightning_smd import SMDCallback, SMDMonitor
from lightning_smd.analysis.preflight import outlook
from lightning_smd.analysis.theory import rule_for
from lightning_smd.analysis.trajectory import plan_from_columns
from lightning_smd.demo import HeadNet, decayed_groups

WINDOW, TOLERANCE = 100, 0.1
OPTIMIZERS = ["sgdm", "adamw", "lion"]


def _plan(make, factor, n, weight_decay):
    opt = make([torch.nn.Parameter(torch.zeros(2, 2))], weight_decay)
    rule = rule_for(opt)
    cols = plan_columns(opt, rule, [opt.param_groups[0]["lr"] * factor(t) for t in range(n)])
    return plan_from_columns(rule, [cols], 1, "test", settings=rule.optimizer_settings(opt))


def _optimizers():
    import lion_pytorch

    # τ of the norm variable: SGDM (1 − 0.9)/(4·0.1·2.5e-3) = 100 steps, AdamW 1/(2·0.01·0.4) = 125, Lion 125
    return {
        "sgdm": (lambda p, wd: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=wd), 2.5e-3),
        "adamw": (lambda p, wd: torch.optim.AdamW(p, lr=0.01, weight_decay=wd), 0.4),
        "lion": (lambda p, wd: lion_pytorch.Lion(p, lr=3e-4, weight_decay=wd), 4e-3 / 3e-4),
    }


def _schedules(n):
    w = 100

    def cosine(t):
        return (t + 1) / w if t < w else 0.5 * (1.0 + math.cos(math.pi * (t - w) / (n - w)))

    def linear(t):
        return (t + 1) / w if t < w else max(0.0, (n - t) / (n - w))

    def wsd(t):
        return (t + 1) / w if t < w else (1.0 if t < 0.8 * n else max(0.0, (n - t) / (0.2 * n)))

    def one_cycle(t):  # up by cosine over 30 %, down by cosine to 1e-4 of the peak
        x = t / n
        return 0.04 + 0.96 * 0.5 * (1 - math.cos(math.pi * x / 0.3)) if x < 0.3 else 1e-4 + (1 - 1e-4) * 0.5 * (1 + math.cos(math.pi * (x - 0.3) / 0.7))

    return {
        "constant": lambda t: 1.0,
        "cosine": cosine,
        "linear": linear,
        "wsd": wsd,
        "one_cycle": one_cycle,
        "step": lambda t: 1.0 if t < int(0.35 * n) else 0.5,
    }


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
@pytest.mark.parametrize("schedule", ["constant", "cosine", "linear", "wsd", "one_cycle", "step"])
def test_a_healthy_plan_allows_equilibrium(optimizer, schedule):
    """Every schedule family with τ ≤ 1/8 of the run (1,600 steps; Lion's cosine and linear 3,200, as in the sweep):
    neither too short to be judged nor a step down too late. A continuous decay to zero ends below the band falling
    (the freeze-out of an annealing tail), which is not a late step down."""
    make, wd = _optimizers()[optimizer]
    n = 3200 if optimizer == "lion" and schedule in ("cosine", "linear") else 1600
    (o,) = outlook(_plan(make, _schedules(n)[schedule], n, wd), TOLERANCE, WINDOW)
    assert not o.too_short and not o.late_decay, o
    assert o.needed <= n / 2  # τ ≤ n/8: the settling takes at most half the run


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
@pytest.mark.parametrize("schedule", ["cosine", "linear", "wsd", "one_cycle"])
def test_weight_decay_ten_times_too_small_is_too_short_and_the_advised_one_is_not(optimizer, schedule):
    """Weight decay 10× too small: the judgement's settling (4 norm time constants at the plan's fastest relaxation)
    is longer than the run, in every schedule family. The weight decay the warning advises leaves half the run to
    judge — and the plan it gives is no longer too short."""
    make, wd = _optimizers()[optimizer]
    n = 1600
    f = _schedules(n)[schedule]
    (o,) = outlook(_plan(make, f, n, wd / 10), TOLERANCE, WINDOW)
    assert o.too_short and o.needed > n
    assert o.needed == math.ceil(4 * o.time_constant)
    fixed = wd / 10 * o.weight_decay_factor
    (again,) = outlook(_plan(make, f, n, fixed), TOLERANCE, WINDOW)
    assert not again.too_short and again.needed <= 0.5 * n + 1, again


@pytest.mark.parametrize("optimizer", ["sgdm", "adamw", "lion"])
def test_a_step_down_too_late_to_come_back_from_and_the_fixes(optimizer):
    """A learning rate halved at 90 % of the run: even from equilibrium, the new relaxation (twice slower) does not
    bring the layers back into the band before the end. Moving the step down to the advised step, or raising the
    weight decay to the advised one, gives a plan that ends in the band; a step down at 35 % (the healthy cell) does
    too (test_a_healthy_plan_allows_equilibrium)."""
    make, wd = _optimizers()[optimizer]
    n, at = 1600, int(0.9 * 1600)
    (o,) = outlook(_plan(make, lambda t: 1.0 if t < at else 0.5, n, wd), TOLERANCE, WINDOW)
    assert o.late_decay and not o.too_short
    assert o.decay_step == at + 1 and o.remaining == n - at
    assert o.decay_factor < 1.0 - TOLERANCE and o.reequilibration > o.remaining
    latest = n - o.reequilibration  # the advised step, as the warning computes it (plan steps are 1-based)
    assert 0.4 * n < latest < at
    (moved,) = outlook(_plan(make, lambda t: 1.0 if t + 1 < latest else 0.5, n, wd), TOLERANCE, WINDOW)
    assert not moved.late_decay, moved
    (raised,) = outlook(_plan(make, lambda t: 1.0 if t < at else 0.5, n, wd * o.weight_decay_factor * 1.05), TOLERANCE, WINDOW)
    assert not raised.late_decay, raised


def _before_step_one(smd):
    class Before(pl.Callback):
        said = None

        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            if self.said is None:  # after SMD's own hook (listed first), which attaches before the first step
                self.said = list(smd.warnings)

    return Before()


def test_too_short_is_said_before_step_1_and_the_forecast_does_not_repeat_it(tmp_path):
    """A real Trainer: warm-up + cosine over 120 steps with weight decay 10× too small (τ = 1,000 steps): SMD036 is
    among the warnings said before the first training step, naming the layers and the steps to train; the
    forecast made at step 50 does not say SMD019 again; the run ends not_reached."""
    n = 120

    def f(t):
        return (t + 1) / 10 if t < 10 else 0.5 * (1.0 + math.cos(math.pi * (t - 10) / (n - 10)))

    smd = SMDCallback(verbose=False, log_every_n_steps=10)
    before = _before_step_one(smd)
    torch.manual_seed(0)
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        trainer(tmp_path, [smd, before], max_steps=n).fit(
            healthy_module(weight_decay=2.5e-4, scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, f)), teacher_loader()
        )
    said = [w for w in before.said if "[SMD036]" in w]
    assert said, before.said
    # 120 steps where 4,000 are needed: the weight decay that would do is ×67, no advice; the steps to train are
    assert "net.conv1.weight" in said[0] and "train for at least 4,000 steps" in said[0] and "weight_decay to about" not in said[0]
    assert not any("[SMD019]" in w for w in smd.warnings), smd.warnings
    assert smd.summary()["verdict"] == "not_reached"


def test_a_late_step_down_is_said_by_the_monitor_at_construction():
    """SMDMonitor reads the schedule when it is built: a step ×0.1 at 80 % of 1,600 steps is said then (SMD037), with
    the steps the run would need after it (the re-equilibration is longer than the run: no earlier step fits); a
    halving at 35 % (the sweep's healthy step cell) is not."""
    for at, drop, expected in ((0.8, 0.1, True), (0.35, 0.5, False)):
        net = HeadNet()
        opt = torch.optim.SGD(decayed_groups(net, 2.5e-3), lr=0.1, momentum=0.9)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t, at=at, drop=drop: 1.0 if t < int(at * 1600) else drop)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            SMDMonitor(net, opt, schedule=sched, max_steps=1600).close()
        said = [str(w.message) for w in caught if "[SMD037]" in str(w.message)]
        assert bool(said) is expected, (at, said)
        if expected:
            assert "at step 1,281" in said[0] and "steps longer after it" in said[0] and "move that step" not in said[0]


def test_a_run_of_a_few_dozen_steps_is_told_to_train_longer_not_to_raise_weight_decay_thousands_of_times():
    """SMD036 on a 20-step schedule (τ = 50 steps needs 200): the weight decay it would take is ×40 the one set, no
    advice; the message says the steps to train and leaves the weight decay out. The 1,600-step cells' ×2.5–6 keep it
    (test_too_short_is_said_before_step_1_and_the_forecast_does_not_repeat_it, tests/test_schedules.py)."""
    net = HeadNet()
    opt = torch.optim.SGD(decayed_groups(net, 5e-3), lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 0.5 ** (t // 5))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        SMDMonitor(net, opt, schedule=sched, max_steps=20).close()
    said = [str(w.message) for w in caught if "[SMD036]" in str(w.message)]
    assert said, [str(w.message) for w in caught]
    assert "train for at least 200 steps" in said[0] and "weight_decay to about" not in said[0], said[0]


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_the_advised_weight_decay_is_the_one_recommend_solves_for(optimizer):
    """SMD036's weight decay is found by the function behind ``lightning-smd recommend`` (solved through the rule for
    the time constant the fix needs), and it is the factor the outlook gives: every time constant the judgement uses
    scales with 1/(lr·weight_decay)."""
    from lightning_smd.analysis.recommend import solve_weight_decay
    from lightning_smd.engine.alerts import plan_warnings

    make, wd = _optimizers()[optimizer]
    n = 1600
    plan = _plan(make, _schedules(n)["cosine"], n, wd / 10)
    (o,) = outlook(plan, TOLERANCE, WINDOW)
    rule = rule_for(make([torch.nn.Parameter(torch.zeros(2, 2))], wd))
    ((code, fields),) = list(plan_warnings(0, plan, rule, [o], {0: ["layer"]}, WINDOW))
    h = plan.hyper_at(0, plan.first_step + int(np.nanargmin(plan.tau[0])))
    solved = solve_weight_decay(rule, h, o.time_constant / o.weight_decay_factor, "norm_time_constant")
    assert rule.norm_time_constant({**h, "weight_decay": solved}) == pytest.approx(o.time_constant / o.weight_decay_factor, rel=1e-9)
    assert solved / h["weight_decay"] == pytest.approx(o.weight_decay_factor, rel=1e-6)
    assert code == "SMD036" and f"raise weight_decay to about {plan.weight_decay[0, o.peak_index] * solved / h['weight_decay']:.2g}" in fields["weight_decay"]
