"""Following the moving equilibrium: each unit's trajectory model run alongside the measurement, and its forecast.

Under a planned schedule that moves the equilibrium (:class:`~lightning_smd.analysis.trajectory.Plan`), the judgement
is against the trajectory ``Δ̂(t)`` instead of the instantaneous ``Δ*(t)``: the measured ``Δ/Δ̂`` must be steady and
agree, the statistics of the constant-settings judgement applied to it. :class:`Following` keeps, per unit, the
model's norm variable ``q̂`` (started from the measured norm at the first step and never reset to a measurement: it is
a prediction), the unit's equilibrium factor ``K`` (refreshed at every drain from the smoothed gradient statistic, or
for AdamW from the measured mean square of the update; where the equilibrium norm follows ``L`` — SGD — moved at every
step with a short average of it, which learning moves 1.6–9.5× in the sweep's runs: Δ̂ then keeps up with the angle,
which answers to the gradient within the update's memory), and the forecast made from them; and what was observed: the
first stay of the measured ``Δ/Δ*`` in the band and the step it left it for good.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from collections.abc import Sequence

from lightning_smd.analysis.ema import Ema
from lightning_smd.analysis.events import LeftPlan
from lightning_smd.analysis.fields import Field, PerUnit
from lightning_smd.analysis.theory import Rule
from lightning_smd.analysis.trajectory import Forecast, Plan, forecast_units

__all__ = ["Following", "FORECAST_AFTER", "PLAN_RTOL"]

#: Planned and actual learning rate or weight decay further apart than this (relative) end the following.
PLAN_RTOL = 1e-2
#: Time constant (steps) of the average of L that moves each unit's K at every step (SGD: the equilibrium norm
#: follows L): about a momentum's memory, so that the trajectory's angle keeps up with the measured one.
GRADIENT_STEPS = 10
#: The first forecast kept as "made at fit start" is made once this many steps' gradient statistics are measured.
FORECAST_AFTER = 50


class Following(PerUnit):
    """Per unit: the trajectory model's state, the latest forecast, the fit-start forecast, the observed band."""

    FIELDS = (
        Field("model_q", float, added=True, key="traj_q"),
        Field("model_k", float, added=True, key="traj_k"),
        Field("model_v", float, added=True, key="traj_v"),  # the model's lagging second moment (Adam), in units of 1/q
        Field("model_l", float, added=True, key="traj_l"),  # the gradient statistic L that K was set from
        Field("model_step", int, -1, added=True, key="traj_step"),
        Field("model_tau", float, added=True, key="traj_tau"),  # the norm variable's time constant at the last step
        Field("expected_ratio", float, added=True),  # Δ̂/Δ* at the last step (with the drains' K: where the model stands)
        Field("trajectory", float, added=True),  # Δ̂ at the last step
        Field("forecast_equilibrium", int, -1, added=True),
        Field("forecast_freeze_out", int, -1, added=True),
        Field("forecast_final_ratio", float, added=True),
        Field("forecast_made_at", int, -1, added=True),
        Field("start_forecast_equilibrium", int, -1, added=True),
        Field("start_forecast_freeze_out", int, -1, added=True),
        Field("start_forecast_made_at", int, -1, added=True),
        Field("constant_equilibrium", int, -1, added=True),
        Field("first_decay", int, -1, added=True),
        Field("peak_tau", float, added=True),
        Field("ends_reequilibrating", bool, False, added=True),  # the fit-start forecast ends below the band, rising
        Field("start_forecast_touches", bool, False, added=True),  # the fit-start forecast's trajectory enters the band
        Field("band_since", int, -1, added=True),  # the start of the current stay of the smoothed Δ/Δ* in the band
        Field("observed_equilibrium", int, -1, added=True),  # the start of the first stay lasting a relaxation time
        Field("last_in_band", int, -1, added=True),
        Field("on_trajectory", bool, False, added=True),  # judged against the trajectory
        Field("model_reached", bool, False, added=True),
        Field("model_last_inside", int, -1, added=True),  # the last step the trajectory was in the band
        Field("expected_falling", bool, False, added=True),  # Δ̂/Δ* falls at the last step: the schedule outruns the layer
        Field("tracked_until", int, -1, added=True),  # the last committed judgement that counted the unit  # the trajectory has been in the band
    )

    def __init__(self, n: int, tolerance: float, ema_steps: int, stride: int) -> None:
        super().__init__(n)
        self.tolerance = tolerance
        self.ratio_stride = max(int(stride), 1)
        self.ratio = Ema(n, ema_steps, stride)
        """The smoothed Δ/Δ̂ (``nan`` where no trajectory is followed)."""
        self.gradient = Ema(n, GRADIENT_STEPS, stride)
        """The gradient statistic L averaged over a few steps (the update's memory): what moves K between drains."""
        self.update = Ema(n, ema_steps, stride)
        """The smoothed ‖u‖² of a decoupled update (``‖ηu‖²/η²``)."""
        self.smooth = Ema(n, ema_steps, stride)
        """The smoothed Δ̂, averaged as Δ is (over the steps with a measured Δ): what is logged next to Δ."""
        self.plans: dict[int, Plan] = {}
        """The plan of each optimizer (by index) whose equilibrium moves."""
        self.schedule: dict[int, dict[str, Any]] = {}
        """Per optimizer, how the schedule was read (or why not) and whether it is followed."""
        self.said_at_start: dict[int, set[str]] = {}
        """Per optimizer, the codes of what its plan allows said before step 1 (SMD036, SMD037: the fit-start forecast's
        SMD019 and SMD029 are then not said again). Not checkpointed: a resumed fit was told at its start."""

    def set_plan(self, optimizer: int, plan: Plan | None, description: dict[str, Any]) -> None:
        """Follow ``plan`` for the units of ``optimizer`` (``None``: judge the changes as they come)."""
        if plan is not None and plan.followed():
            self.plans[optimizer] = plan
        else:
            self.plans.pop(optimizer, None)
        self.schedule[optimizer] = dict(description)

    def drop(self, optimizer: int, step: int, why: str) -> None:
        """The settings left the plan: judge the changes as they come from now on."""
        if self.plans.pop(optimizer, None) is not None:
            entry = self.schedule.setdefault(optimizer, {})
            entry["followed"] = False
            entry["left_plan_at"] = step
            entry["why"] = why

    # ------------------------------------------------------------------------------------------
    def plan_for(self, optimizer: int, step: int, hyper: Sequence[dict[str, float]], n_groups: int) -> tuple[Plan | None, LeftPlan | None]:
        """The plan optimizer ``optimizer``'s ``step`` follows (``None``: judge changes as they come); settings that left
        the plan (learning rate or weight decay further than :data:`PLAN_RTOL` from it) end the following, returned as
        the event that says so."""
        plan = self.plans.get(optimizer)
        if plan is None or not plan.first_step <= step <= plan.last_step:
            return None, None
        i = plan.index(step)
        for g in range(min(n_groups, plan.lr.shape[0])):
            for key, planned in (("lr", plan.lr[g, i]), ("weight_decay", plan.weight_decay[g, i])):
                actual = float(hyper[g].get(key, math.nan))
                if not abs(actual - planned) <= PLAN_RTOL * max(abs(actual), abs(planned)):
                    why = f"{key} of param group {g} was {actual:.4g} at step {step}, the schedule read at fit start planned {planned:.4g}"
                    self.drop(optimizer, step, why)
                    return None, LeftPlan(optimizer, step, why)
        return plan, None

    def follow(
        self, plan: Plan, batch: Any, r: int, hyper: Sequence[dict[str, float]], delta_star: np.ndarray, power: np.ndarray, decay: np.ndarray,
        L: np.ndarray, numel: np.ndarray, exponent: np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
        """Step ``r`` of ``batch`` along the trajectory: returns each unit's ``Δ/Δ̂`` and ``log ‖ŵ‖`` after the step.
        A unit met for the first time gets its equilibrium factor from this step's statistics (refined at every
        drain, :meth:`refresh`)."""
        idx, group, step = batch.unit_index, batch.unit_group, int(batch.steps[r])
        moves = exponent is not None and bool(np.any(exponent != 0.0))  # the equilibrium norm follows L (SGD)
        if moves:
            self.gradient.update(idx, batch.grad_sq[r] * batch.norm_sq_before[r])
        fresh = ~(self.model_k[idx] > 0)
        if fresh.any():
            q_star = self._equilibrium_q(batch.rule, hyper, group[fresh], idx[fresh], power[fresh], L[fresh], numel[fresh])
            self.refresh_k(plan, idx[fresh], group[fresh], q_star, step, L[fresh])
        k = None
        if moves:
            # between drains K moves with L as the equilibrium norm does (‖w*‖ ∝ L^e, q = ‖w‖^p): the angle responds
            # to the gradient within the update's memory, the drains' 50-step average of L lags it
            slow = self.model_k[idx]
            with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
                moved = slow * (self.gradient.value(idx) / self.model_l[idx]) ** (power * exponent)
            k = np.where(np.isfinite(moved) & (moved > 0), moved, slow)
        trajectory = self.step(plan, idx, group, step, batch.norm_sq_before[r], delta_star, power, k)
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            judged = np.where(trajectory > 0, batch.angular_update[r] / trajectory, np.nan)
            log_ref = np.log(self.model_q[idx]) / power
        self.ratio.update(idx, judged)
        self.smooth.update(idx, np.where(np.isfinite(batch.angular_update[r]), trajectory, np.nan))
        self._observe_update(plan, batch, r, hyper, decay)
        return judged, log_ref

    def refresh(self, batch: Any, idx: np.ndarray, L: np.ndarray, numel: np.ndarray, smoothed: Ema | None = None) -> None:
        """At a drain: the equilibrium factors of ``batch``'s units (``idx``) from their smoothed statistics ``L``, and
        their forecast from the model's state (``smoothed``: the moving average of ``Δ/Δ*`` the band events are
        observed on)."""
        plan = self.plans.get(batch.optimizer_index)
        step = int(batch.steps[-1])
        if plan is None or not self.on_trajectory[idx].any() or step > plan.last_step:
            return
        group = batch.unit_group
        power = plan.power[group]
        hyper = [plan.hyper_at(g, step) for g in range(plan.lr.shape[0])]
        self.refresh_k(plan, idx, group, self._equilibrium_q(batch.rule, hyper, group, idx, power, L, numel), step, L)
        with np.errstate(invalid="ignore"):
            measured = np.asarray(batch.norm_sq_after[-1], dtype=np.float64) ** (power / 2.0)
        self.forecast(plan, idx, group, step, smoothed, measured)

    def _equilibrium_q(
        self, rule: Rule, hyper: Sequence[dict[str, float]], group: np.ndarray, idx: np.ndarray, power: np.ndarray, L: np.ndarray, numel: np.ndarray
    ) -> np.ndarray:
        """Each unit's equilibrium norm variable ``‖w*‖^p`` under ``hyper``: from the measured update's mean square
        where the rule has a norm from it (AdamW), else from the gradient statistic ``L`` and the size ``numel``."""
        # the measured update of a lagging second moment carries the normalized gradient's ĝ² = 1/(q·v) of the moment:
        # the equilibrium is that of ĝ² = 1 (the model's state says how far from it)
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            g2 = np.where((self.model_step[idx] >= 0) & (self.model_v[idx] > 0), 1.0 / (self.model_q[idx] * self.model_v[idx]), 1.0)
        U = self.update.value(idx) / np.where(np.isfinite(g2) & (g2 > 0), g2, 1.0)
        out = np.full(len(idx), np.nan)
        for j in range(len(idx)):
            h = hyper[int(group[j])]
            norm = rule.weight_norm_from_update(h, float(U[j])) if np.isfinite(U[j]) else math.nan
            if not math.isfinite(norm):
                norm = rule.weight_norm(h, float(L[j]), int(numel[j]))
            out[j] = norm ** power[j]
        return out

    def _observe_update(self, plan: Plan, batch: Any, r: int, hyper: Sequence[dict[str, float]], e: np.ndarray) -> None:
        """The mean square of a decoupled update ``‖u‖² = ‖ηu‖²/η²`` (AdamW's equilibrium norm follows it)."""
        if batch.norm_sq_change is None or not np.isfinite(e).any():
            return
        lr = np.array([float(hyper[int(g)].get("lr", math.nan)) for g in batch.unit_group])
        # the first steps' updates are larger by the optimizer's start alone (Adam's bias-corrected momentum): what
        # the equilibrium norm follows is the steady mean square
        i = plan.index(int(batch.steps[r]))
        transient = np.array([plan.transient(g, i, i + 1) for g in range(plan.lr.shape[0])])[batch.unit_group]
        a, q = batch.norm_sq_before[r], batch.update_sq[r]
        with np.errstate(divide="ignore", invalid="ignore"):
            c = 0.5 * (batch.norm_sq_change[r] - q)  # ⟨w, δw⟩
            u_sq = (q + 2.0 * e * c + e * e * a) / (lr * lr) / transient
        self.update.update(batch.unit_index, np.where(np.isfinite(e) & (lr > 0), u_sq, np.nan))

    def step(
        self, plan: Plan, idx: np.ndarray, group: np.ndarray, step: int, norm_sq_before: np.ndarray, delta_star: np.ndarray, power: np.ndarray,
        k: np.ndarray | None = None,
    ) -> np.ndarray:  # fmt: skip
        """Δ̂ of units ``idx`` at optimizer ``step`` (then the model advances past it). Units met for the first time
        start from their measured norm; ``K`` must be set (:meth:`refresh_k`) — where it is not yet, the unit's
        equilibrium at this step is taken as where it stands (Δ̂ = Δ*) until it is.

        ``k``: the equilibrium factors of this step, where they move between drains (SGD's, with a short average of
        ``L``): the angle Δ̂ and the norm's push use them; where the trajectory stands against the equilibrium band
        (:attr:`expected_ratio`, reached, falling) is read with the drains' :attr:`model_k`, which the noise of a few
        steps' ``L`` does not move."""
        i = plan.index(step)
        new = self.model_step[idx] < 0
        if new.any():
            u = idx[new]
            self.model_q[u] = norm_sq_before[new] ** (power[new] / 2.0)
            self.model_v[u] = 1.0 / self.model_q[u]  # Adam's v starts matched to the first gradient
            self.model_step[u] = step - 1
        q, v = self.model_q[idx], self.model_v[idx]
        slow = self.model_k[idx]
        k = slow if k is None else k
        angle = np.full(len(idx), np.nan)
        ratio = np.full(len(idx), np.nan)
        after = np.full(len(idx), np.nan)
        for g in np.unique(group).tolist():
            m = group == g
            angle[m] = plan.ratio(g, i, q[m], v[m], k[m])
            ratio[m] = angle[m] if k is slow else plan.ratio(g, i, q[m], v[m], slow[m])
            q[m], v[m] = plan.advance(g, i, i + 1, q[m], v[m], k[m])
            if i + 1 < plan.n_steps:
                after[m] = plan.ratio(g, i + 1, q[m], v[m], slow[m])
        if i + 1 < plan.n_steps:  # (at the plan's last step there is no next one to compare with: the trend stays)
            with np.errstate(invalid="ignore"):
                self.expected_falling[idx] = after <= ratio
        trajectory = delta_star * angle
        ok = np.isfinite(q) & (q > 0)
        self.model_q[idx] = np.where(ok, q, self.model_q[idx])
        self.model_v[idx] = np.where(ok, v, self.model_v[idx])
        self.model_tau[idx] = plan.tau[group, i]
        self.model_step[idx] = step
        self.expected_ratio[idx] = ratio
        with np.errstate(invalid="ignore"):
            inside = np.abs(ratio - 1.0) <= self.tolerance
        self.model_reached[idx] |= inside
        self.model_last_inside[idx[inside]] = step
        self.trajectory[idx] = trajectory
        self.on_trajectory[idx] = True
        return trajectory

    def refresh_k(self, plan: Plan, idx: np.ndarray, group: np.ndarray, q_star_now: np.ndarray, step: int, L: np.ndarray | None = None) -> None:
        """Set each unit's equilibrium factor from its equilibrium norm variable ``q_star_now`` under the settings of
        ``step`` (measured statistics; ``L``: the gradient statistic it was computed from); units without one keep
        theirs."""
        i = plan.index(step)
        with np.errstate(divide="ignore", invalid="ignore"):
            k = q_star_now / plan.scale[group, i]
        ok = np.isfinite(k) & (k > 0)
        self.model_k[idx[ok]] = k[ok]
        if L is not None:
            self.model_l[idx[ok]] = np.asarray(L, dtype=np.float64)[ok]

    def forecast(
        self, plan: Plan, idx: np.ndarray, group: np.ndarray, step: int, smoothed: Ema | None = None, measured: np.ndarray | None = None
    ) -> Forecast | None:
        """Refresh the forecast of units ``idx`` after ``step``: from the measured norm variable ``measured`` where
        given (the state of the run, not of the model, whose start may be off), else the model's; with ``smoothed``
        (the moving average of the measured ``Δ/Δ*``), its band events as that average will show them."""
        k = self.model_k[idx]
        ok = np.isfinite(k) & (k > 0) & (self.model_step[idx] >= 0)
        if not ok.any():
            return None
        units, g = idx[ok], group[ok]
        q, v = self.model_q[units], self.model_v[units]
        if measured is not None:
            m = np.asarray(measured, dtype=np.float64)[ok]
            use = np.isfinite(m) & (m > 0)
            with np.errstate(divide="ignore", invalid="ignore"):
                v = np.where(use, v * q / m, v)  # Adam's lagging moment keeps the model's ĝ² = 1/(q·v)
            q = np.where(use, m, q)
        state = (smoothed.acc[units], smoothed.weight[units], smoothed.beta ** (1.0 / self.ratio_stride)) if smoothed is not None else None
        f = forecast_units(plan, g, q, v, k[ok], step, self.tolerance, smoothed=state)
        # a forecast step already passed stays (a refresh from past it finds no first equilibrium, or no freeze-out
        # ahead, but the one it forecast is what happened or not)
        old_eq = self.forecast_equilibrium[units]
        self.forecast_equilibrium[units] = np.where((old_eq >= 0) & (old_eq <= step), old_eq, f.first_equilibrium)
        with np.errstate(invalid="ignore"):
            # below the band now and falling: the schedule outruns the layer (below and rising is a re-equilibration
            # after a step down, which the forecast ahead dates as it comes back)
            frozen = self.model_reached[units] & (self.expected_ratio[units] < 1.0 - self.tolerance) & self.expected_falling[units]
        old_fz = self.forecast_freeze_out[units]
        passed = (old_fz >= 0) & (old_fz <= step)  # a freeze-out forecast and now passed stays what was forecast
        self.forecast_freeze_out[units] = np.where(passed, old_fz, np.where((f.freeze_out < 0) & frozen, self.model_last_inside[units], f.freeze_out))
        self.forecast_final_ratio[units] = f.final_ratio
        self.forecast_made_at[units] = step
        first = self.start_forecast_made_at[units] < 0
        if first.any() and step >= FORECAST_AFTER:
            u = units[first]
            self.start_forecast_equilibrium[u] = f.first_equilibrium[first]
            self.start_forecast_freeze_out[u] = f.freeze_out[first]
            self.start_forecast_made_at[u] = step
            self.constant_equilibrium[u] = f.constant_first_equilibrium[first]
            self.first_decay[u] = f.first_decay[first]
            self.peak_tau[u] = f.peak_tau[first]
            self.ends_reequilibrating[u] = f.ends_rising[first]
            self.start_forecast_touches[u] = f.touches[first]
        return f

    def observe_band(self, idx: np.ndarray, smoothed_ratio: np.ndarray, step: int) -> None:
        """The observed counterparts of the forecast, from the smoothed ``Δ/Δ*``: the first stay in the band lasting a
        relaxation time (dated from its start) and the last step in the band."""
        with np.errstate(invalid="ignore"):
            inside = np.abs(smoothed_ratio - 1.0) <= self.tolerance
        entering = inside & (self.band_since[idx] < 0)
        self.band_since[idx[entering]] = step
        self.band_since[idx[~inside]] = -1
        self.last_in_band[idx[inside]] = step
        since, tau = self.band_since[idx], self.model_tau[idx]
        with np.errstate(invalid="ignore"):
            long_enough = inside & (since >= 0) & ~(step - since + 1 < np.where(np.isfinite(tau), tau, math.inf))
        new = long_enough & (self.observed_equilibrium[idx] < 0)
        self.observed_equilibrium[idx[new]] = since[new]

    def reach(self) -> np.ndarray | None:
        """Per unit, whether the trajectory has the unit in equilibrium now: in the band, or past a freeze-out (below
        the band after having been in it, and falling further: the schedule outruns the layer, the expected lag of an
        annealing tail). Below the band and rising is a re-equilibration after a step down (not counted until back in
        the band). ``None`` when no unit follows a plan."""
        if not self.on_trajectory.any():
            return None
        with np.errstate(invalid="ignore"):
            inside = np.abs(self.expected_ratio - 1.0) <= self.tolerance
            frozen = self.expected_ratio < 1.0 - self.tolerance
        return ~self.on_trajectory | inside | (frozen & self.model_reached & self.expected_falling)

    def not_reached_text(self, u: int, tolerance: float) -> str | None:
        """Why a unit that follows its trajectory (steady against it) is not counted, or None."""
        if not self.on_trajectory[u]:
            return None
        r = float(self.expected_ratio[u])
        if not self.model_reached[u]:
            when = f"; forecast for step {int(self.forecast_equilibrium[u])}" if self.forecast_equilibrium[u] >= 0 else "; the forecast never has it there"
            return f"approaching: it follows its trajectory, which has not reached the equilibrium band yet (Δ̂/Δ* = {r:.2f}{when})"
        if r < 1.0 - tolerance and not self.expected_falling[u]:
            return f"re-equilibrating: the schedule moved the equilibrium away and the trajectory is still coming back (Δ̂/Δ* = {r:.2f}, rising)"
        return f"away from the equilibrium band (Δ̂/Δ* = {r:.2f})"

    def state_dict(self) -> dict[str, Any]:
        out = super().state_dict()
        out["trajectory_ratio"] = self.ratio.state_dict()
        out["trajectory_update"] = self.update.state_dict()
        out["trajectory_gradient"] = self.gradient.state_dict()
        out["trajectory_smooth"] = self.smooth.state_dict()
        return out

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        if "trajectory_ratio" in state:
            self.ratio.load_state_dict(state["trajectory_ratio"])
            self.update.load_state_dict(state["trajectory_update"])
        if "trajectory_gradient" in state:
            self.gradient.load_state_dict(state["trajectory_gradient"])
        if "trajectory_smooth" in state:
            self.smooth.load_state_dict(state["trajectory_smooth"])


def plain_schedule(schedule: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """The schedule descriptions with string keys (a checkpoint's and a summary's)."""
    return {str(k): dict(v) for k, v in sorted(schedule.items())}
