"""Schedules end to end: a real Trainer whose scheduler is read ahead, each layer judged against its trajectory.

The task is the verdict sweep's (benchmarks/verdict_reliability.py --schedules): HeadNet on a TeacherStream with 20 %
label noise, SGD with momentum, lr 0.1, weight decay 2.5e-3 on the normalized weights (τ = 200 steps), 1,600 steps.
The sweep's figures over seeds are in docs/verdict_reliability.md; each assertion here states its margin.
"""

from __future__ import annotations

import csv
import math
import warnings

import pytest
import torch
from helpers import HEALTHY_STEPS, healthy_module, teacher_loader, trainer

from lightning_smd import SMDCallback

pytestmark = pytest.mark.slow

WARM = 100


def warmup_cosine(steps: int = HEALTHY_STEPS):
    def f(t: int) -> float:
        return (t + 1) / WARM if t < WARM else 0.5 * (1.0 + math.cos(math.pi * (t - WARM) / (steps - WARM)))

    return lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, f)


def _fit(tmp_path, module, steps=HEALTHY_STEPS, **kw):
    smd = SMDCallback(verbose=False, log_every_n_steps=50, **kw)
    torch.manual_seed(0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer(tmp_path, [smd], max_steps=steps, logger=True).fit(module, teacher_loader())
    return smd, [str(w.message) for w in caught]


def test_a_warm_up_and_cosine_run_ends_in_equilibrium_judged_against_its_trajectory(tmp_path):
    """Warm-up + cosine to 0: every layer reaches the moving equilibrium, follows it, freezes out in the tail (where
    Δ/Δ* falls far below 1 by design) and is counted; Δ/Δ̂ stays near 1 to the end. The metrics carry Δ̂ and Δ/Δ̂.
    Margins over the sweep's 10 seeds of this cell (`verdict_reliability.py --schedules`, cell sgd_momentum/cosine):
    10/10 equilibrium, final Δ/Δ̂ 0.966–1.040 over 30 layers (the assertion allows ±0.1), no SMD warning in any run."""
    smd, caught = _fit(tmp_path, healthy_module(scheduler=warmup_cosine()))
    s = smd.summary()
    assert s["verdict"] == "equilibrium", s["reason"]
    assert s["schedule"]["0"]["followed"] and "LambdaLR" in s["schedule"]["0"]["source"]
    assert not any("[SMD019]" in w or "[SMD029]" in w or "[SMD003]" in w for w in caught), caught
    for layer in s["layers"]:
        assert layer["first_equilibrium_step"] is not None and layer["freeze_out_step"] is not None, layer
        assert layer["first_equilibrium_step"] < layer["freeze_out_step"] < HEALTHY_STEPS
        # the tail: Δ/Δ* far below the band, Δ/Δ̂ not (sweep: 0.96–1.04 at the end over seeds)
        assert layer["expected_ratio"] < 0.5
        assert abs(layer["trajectory_ratio"] - 1.0) < 0.1
    forecast = {f["name"]: f for f in s["forecast"]}
    assert set(forecast) == {layer["name"] for layer in s["layers"]} and all(f["made_at_step"] == 50 for f in forecast.values())
    with open(next(tmp_path.rglob("metrics.csv"))) as fh:
        header = next(csv.reader(fh))
    assert any(h.endswith("/trajectory_angular_update") for h in header) and any(h.endswith("/trajectory_ratio") for h in header)


def test_too_little_weight_decay_for_the_schedule_is_forecast_and_not_reached(tmp_path):
    """Weight decay 10× too small for a warm-up + cosine of 1,600 steps (τ = 2,000 steps): SMD019 says so from the
    first forecast (step 50) with the weight decay that would make it, and the run ends not_reached. Over the sweep's
    10 seeds of this cell (wd_small): 10/10 not_reached with SMD019, no layer ever forecast to get there (0/30)."""
    smd, caught = _fit(tmp_path, healthy_module(weight_decay=2.5e-4, scheduler=warmup_cosine()))
    s = smd.summary()
    assert s["verdict"] == "not_reached"
    forecast = [w for w in caught if "[SMD019]" in w]
    assert forecast and "raise weight_decay to at least" in forecast[0], caught
    assert all(f["equilibrium_step"] is None for f in s["forecast"])
    assert all(layer["first_equilibrium_step"] is None for layer in s["layers"])
