"""Before step 1: what a planned schedule allows, whatever the layers' gradients turn out to be.

The forecast that names a step for each layer (:func:`~lightning_smd.analysis.trajectory.forecast_units`) needs the
gradient statistics of the first steps: where a layer's equilibrium norm lies is a property of its gradients. Two
things do not need them. The relaxation times and the *ratios* of the equilibrium along the plan are functions of the
settings alone, so before the first step the plan already settles:

- **the judgement's settling time.** Under a followed plan the judged windows span at least two of the fastest
  relaxation times the plan reaches (and ``window`` steps), and a unit is judged once twice that has passed: a plan
  shorter than that ends ``not_reached`` whatever happens (``SMD003``).
- **a step down too late to come back from.** The best case is a layer in equilibrium at the peak settings: its
  trajectory (the equilibrium dynamics of :class:`~lightning_smd.analysis.trajectory.Plan`, started at ``q = q*``)
  is what every layer's tends to. Where even that one ends below the band and rising — still re-equilibrating after
  the schedule's last step down when the plan ends — every layer will, and the run is judged out of equilibrium by
  the schedule's design (``SMD036``). A continuous decay to zero ends below the band too, but *falling*: that is the
  expected freeze-out of an annealing tail, judged as such, not warned about.

A layer that starts far from its equilibrium norm needs longer still: that is for the forecast made once its
gradients are measured (``SMD019``, ``SMD029``), which these warnings leave unsaid where they said it first.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from lightning_smd.analysis.config import WINDOW_RELAXATION_TIMES
from lightning_smd.analysis.theory import time_to_band
from lightning_smd.analysis.trajectory import Plan, forecast_units

__all__ = ["GroupOutlook", "outlook", "judging_steps"]


def judging_steps(time_constant: float, window: int) -> float:
    """Steps of samples before a unit whose windows follow ``time_constant`` can be judged (twice the shortest
    window)."""
    return 2.0 * max(float(window), WINDOW_RELAXATION_TIMES[0] * time_constant)


@dataclass(frozen=True)
class GroupOutlook:
    """What one param group's plan allows (row ``group`` of the plan)."""

    group: int
    planned: int
    """Optimizer steps in the plan."""
    needed: int
    """Steps of samples the judgement needs (:func:`judging_steps` at the fastest relaxation of the plan)."""
    time_constant: float
    """The fastest relaxation the plan reaches (the norm variable's time constant)."""
    peak_index: int
    """Entry of the plan's peak settings (largest Δ*)."""
    decay_step: int = -1
    """The last step down of the equilibrium the best case is still coming back from at the end (-1: none)."""
    decay_factor: float = math.nan
    """``Δ*`` after that step down over ``Δ*`` before it."""
    reequilibration: int = -1
    """Steps the best case needs after that step down to be back in the band."""
    remaining: int = -1
    """Planned steps from that step down to the end."""
    tau_after: float = math.nan
    """The norm variable's time constant after that step down."""

    @property
    def too_short(self) -> bool:
        return self.planned < self.needed

    @property
    def late_decay(self) -> bool:
        return self.decay_step >= 0 and self.reequilibration > self.remaining

    @property
    def weight_decay_factor(self) -> float:
        """How many times the weight decay (``lr·weight_decay``: every relaxation time scales with its inverse) should
        grow: for a plan too short, until the settling takes half of it (the other half is what is judged); for a late
        step down, until the re-equilibration fits in what is left after it (the least that can do)."""
        f = 1.0
        if self.too_short:
            f = max(f, 2.0 * self.needed / max(self.planned, 1))
        if self.late_decay:
            f = max(f, self.reequilibration / max(self.remaining, 1))
        return f


def outlook(plan: Plan, tolerance: float, window: int) -> list[GroupOutlook]:
    """Per param group of ``plan`` with a known relaxation time, what it allows before any gradient is measured."""
    out = []
    n = plan.n_steps
    for g in range(plan.delta.shape[0]):
        tau_ref = float(plan.tau_ref[g])
        if not (n and math.isfinite(tau_ref) and tau_ref > 0 and np.isfinite(plan.delta[g]).any()):
            continue
        peak = int(np.nanargmax(plan.delta[g]))
        base = GroupOutlook(g, n, math.ceil(judging_steps(tau_ref, window)), tau_ref, peak)
        out.append(_late_decay(plan, g, base, tolerance))
    return out


def _late_decay(plan: Plan, g: int, base: GroupOutlook, tolerance: float) -> GroupOutlook:
    """``base`` with the last step down that even a layer in equilibrium at the peak settings cannot come back from
    before the plan ends."""
    q0 = float(plan.scale[g, base.peak_index])  # K = 1: the ratio path depends on q/K only
    if not (math.isfinite(q0) and q0 > 0):
        return base
    group = np.array([g])
    f = forecast_units(plan, group, np.array([q0]), np.array([1.0 / q0]), np.ones(1), plan.first_step - 1, tolerance)
    if not bool(f.ends_rising[0]):
        return base
    delta = plan.delta[g]
    with np.errstate(invalid="ignore", divide="ignore"):
        drop = delta[1:] / delta[:-1]
    downs = np.nonzero(drop < 1.0 - tolerance)[0]
    if not downs.size:
        return base
    i = int(downs[-1]) + 1  # the first entry at the lower settings
    r_end = float(f.final_ratio[0])
    tau_end = float(plan.tau[g, -1])
    rest = time_to_band(1.0 / r_end**2, tau_end, tolerance) if r_end > 0 else math.inf
    after = plan.n_steps - i
    needed = after + (math.ceil(rest) if math.isfinite(rest) else 10 * after)
    return GroupOutlook(
        base.group, base.planned, base.needed, base.time_constant, base.peak_index,
        decay_step=plan.first_step + i, decay_factor=float(drop[i - 1]), reequilibration=int(needed), remaining=int(after), tau_after=tau_end,
    )  # fmt: skip
