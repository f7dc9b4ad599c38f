"""Smoothing, steady-state judgement, agreement with the theory, verdict and run summary, on the host.

:class:`Diagnostics` consumes the :class:`~lightning_smd.engine.measure.StepBatch` es that the recorder drains
once per log interval. Per tracked unit it answers two questions, with two figures:

**Steady?** SMD's equilibrium is a steady state: the angular update Δ and the weight norm ‖w‖ have
stopped drifting for the hyper-parameters in force. A unit is *steady* when

1. the theory has a prediction with weight decay (without it there is no equilibrium to reach);
2. it has had time to relax: at least 4 relaxation times ``τ_r`` (the time constant with which the theory
   says ``Δ/Δ*`` relaxes) and ``2·window`` steps since the last change of its hyper-parameters (a change
   moves Δ* or the equilibrium norm by more than ``tolerance``; the start counts as one);
3. over the second half of the steps since that change (at least ``max(window, 2τ_r)``, at most
   ``max(4·window, 16τ_r)`` steps: the first half is left to the relaxation) neither ``Δ/Δ*`` nor
   the ``Δ/Δ*`` implied by ``‖w‖/‖w*‖`` drifts by more than ``drift_limit`` per relaxation time, and both drifts are
   known to that precision (:mod:`lightning_smd.analysis.steady`: least squares, standard errors for autocorrelated
   samples, the Student quantile at the Bonferroni-corrected two-sided level ``significance / N`` over the N
   judged units: a steady unit fails with probability at most ``significance / N``, a unit drifting twice the
   limit passes with probability at most half that);
4. its gradient noise has not vanished (:class:`~lightning_smd.analysis.events.VanishingWatch`).

**Agrees?** The steady ratio — the window's mean of ``Δ/Δ*`` — with its confidence interval at the same
level. A steady unit *agrees* unless its interval lies entirely outside ``1 ± tolerance``; it is *off the
prediction* when it does, and *far off* when the interval lies entirely outside ``1 ± max_deviation``.

A unit is **in equilibrium** when it is steady and not far off (and, with ``require_agreement``, not off).
The run verdict is ``diverged`` when the weights of any tracked unit became non-finite (NaN or inf: a
diverged training run, whatever ``min_fraction`` says), ``equilibrium`` when at least ``min_fraction`` of
the units with a prediction are in equilibrium at the end, ``not_reached`` otherwise, and
``not_applicable`` when nothing is tracked or no unit has a prediction (unknown optimizer).

A non-finite weight costs no extra measurement: the recorder's float64 ``‖w‖²`` of a tensor with a NaN or
an inf element is itself NaN or inf, so the statistics already reduced at each step carry the flag.

Pure numpy: usable from a hand-written loop without Lightning.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import numpy as np

from lightning_smd.analysis import reasons, rows
from lightning_smd.analysis.batch import StepBatch
from lightning_smd.analysis.config import WINDOW_RELAXATION_TIMES, DiagnosticsConfig
from lightning_smd.analysis.events import Diverged, Divergence, Event, NormSpike, Reequilibrating, Spikes, VanishingNoise, VanishingWatch
from lightning_smd.analysis.fields import PerUnit, check_distinct, plain, unplain
from lightning_smd.analysis.dead import DeadWatch, pure_decay_rates
from lightning_smd.analysis.filters import FilterStats
from lightning_smd.analysis.events import LeftPlan
from lightning_smd.analysis.following import Following
from lightning_smd.analysis.forecast import predicted_time_to_equilibrium, steps_needed
from lightning_smd.analysis.judgement import JudgeInputs, Judgement, Record, judge
from lightning_smd.analysis.keys import LAYER_METRICS, layer_metric_keys, metric_name
from lightning_smd.analysis.measurements import EMAS, Measurements
from lightning_smd.analysis.reasons import diverged_layers
from lightning_smd.analysis.rows import SCHEMA_VERSION
from lightning_smd.analysis.states import STATES, UnitState, Verdict
from lightning_smd.analysis.steady import BlockSeries
from lightning_smd.analysis.tracking import Changes, Predictor, UnitsBefore, unit_factors, window_range
from lightning_smd.analysis.units import NormalizedWeight, not_scale_invariant
from lightning_smd.analysis.warmup import EarlyWatch

__all__ = [
    "DiagnosticsConfig",
    "Diagnostics",
    "Verdict",
    "UnitState",
    "VanishingNoise",
    "NormSpike",
    "Reequilibrating",
    "Diverged",
    "LeftPlan",
    "Event",
    "STATES",
    "SCHEMA_VERSION",
    "WINDOW_RELAXATION_TIMES",
    "LAYER_METRICS",
    "diffusion_exponent",
    "diverged_layers",
    "layer_metric_keys",
    "metric_name",
]

#: The parts with per-unit state, by the facade attribute that holds each.
_PARTS: dict[str, type[PerUnit]] = {
    "measurements": Measurements,
    "changes": Changes,
    "judgement": Judgement,
    "record": Record,
    "divergence": Divergence,
    "spike_watch": Spikes,
    "vanishing": VanishingWatch,
    "following": Following,
    "early": EarlyWatch,
    "filters": FilterStats,
    "dead": DeadWatch,
}
check_distinct(
    _PARTS.values(),
    reserved=(
        "schema_version", "names", "stride", "series", "rules", "per_filter", "loss", "spikes",
        "trajectory_ratio", "trajectory_update", "trajectory_smooth", "early_delta", *EMAS,
    ),  # fmt: skip
)
#: Reads the facade forwards to its parts: every declared field, and the parts' other per-run attributes.
_FORWARD: dict[str, str] = {f.name: attr for attr, part in _PARTS.items() for f in part.FIELDS}
_FORWARD.update({name: "measurements" for name in (*EMAS, "rules", "per_filter")})
_FORWARD.update({"spikes": "spike_watch", "loss_now": "vanishing", "loss_peak": "vanishing", "diverged": "divergence"})


class Diagnostics:
    """Per-unit smoothing, steady-state judgement and equilibrium verdict; see the module docstring.

    A facade over parts with one job each: :class:`~lightning_smd.analysis.measurements.Measurements` (the latest
    figures and moving averages), :class:`~lightning_smd.analysis.tracking.Changes` (the prediction in force and its
    changes), the judgement (:func:`~lightning_smd.analysis.judgement.judge`, kept in
    :class:`~lightning_smd.analysis.judgement.Judgement` and :class:`~lightning_smd.analysis.judgement.Record`), the
    event watchers (:mod:`lightning_smd.analysis.events`); the words and the summary are pure functions of it
    (:mod:`~lightning_smd.analysis.reasons`, :mod:`~lightning_smd.analysis.rows`). Every declared per-unit field of a
    part reads as an attribute of the facade (``diagnostics.steady_ratio``).

    Args:
        units: the tracked units, in the order the recorder indexes them.
        config: the verdict criteria.
        keep_history: also keep every step's raw values (for tests, plots and notebooks).
        every_n_steps: the recorder samples every n-th step: the moving averages decay
            per step, not per sample, and windows count steps.
    """

    def __init__(self, units: Sequence[NormalizedWeight], config: DiagnosticsConfig | None = None, keep_history: bool = False, every_n_steps: int = 1) -> None:
        self.config = config or DiagnosticsConfig()
        self.stride = max(int(every_n_steps), 1)  # steps between samples
        self.set_units(units)
        n = len(self._units)
        self.measurements = Measurements(n, self.config.ema_steps, self.stride)
        self.changes = Changes(n, self.config, self.stride)
        self.judgement = Judgement(n)
        self.record = Record(n)
        self.divergence = Divergence(n)
        self.spike_watch = Spikes(n, self.config.spike_factor)
        self.vanishing = VanishingWatch(n, self.config)
        self.following = Following(n, self.config.tolerance, self.config.ema_steps, self.stride)
        self.early = EarlyWatch(n, self.stride)
        self.filters = FilterStats(n, self.config.ema_steps, self.stride)
        self.dead = DeadWatch(n)
        self._peak = np.full(n, np.nan)  # this step's Δ* at the peak settings, per unit of the batch (the warm-up check)
        # the steady-state samples, and passive window means for the balance of the update (decoupled decay only):
        # ⟨w,ηu⟩/‖w‖², its square, ‖ηu‖²/‖w‖², Δ², (‖w_{t+1}‖² − ‖w_t‖²)/‖w_t‖²
        self.series = BlockSeries(n, extras=5)
        self.series.stride = float(self.stride)
        self.predictor = Predictor()
        self.judge_every = self.stride * max(1, -(-self.config.window // (4 * self.stride)))
        """Steps between committed judgements (a multiple of ``stride``)."""
        self.events: list[Event] = []
        """New notable events since the caller last took them (:meth:`take_events`)."""
        self.keep_history = keep_history
        self.history: list[dict[str, Any]] = []

    def __getattr__(self, name: str) -> Any:
        part = _FORWARD.get(name)
        if part is None or part not in self.__dict__:
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        return getattr(self.__dict__[part], name)

    def __dir__(self) -> list[str]:
        return sorted({*super().__dir__(), *_FORWARD})

    # ------------------------------------------------------------------------------------------
    @property
    def units(self) -> list[NormalizedWeight]:
        """The tracked units, in the order the recorder indexes them."""
        return self._units

    def set_units(self, units: Sequence[NormalizedWeight]) -> None:
        """Track ``units`` (the same weights, e.g. with their orthogonality verified after the first batch)."""
        units = list(units)
        if "_units" in self.__dict__ and [u.name for u in units] != self.names:
            raise ValueError(f"set_units: the units must be the same weights, in the same order ({self.names}); got {[u.name for u in units]}")
        self._units = units
        self._names = [u.name for u in units]  # read at every step (the spike watcher): made once
        self._numel = np.array([float(u.numel) for u in units])

    @property
    def names(self) -> list[str]:
        """The tracked units' names, in order."""
        return self._names

    @property
    def window_samples(self) -> int:
        """``window`` in samples (the band re-entry that times a re-equilibration must last this long)."""
        return self.changes.window_samples

    # ------------------------------------------------------------------------------------------
    def update(self, batch: StepBatch) -> None:
        """Fold one drained batch of steps into the per-unit state, then judge every unit."""
        idx = batch.unit_index
        k = len(batch.steps)
        n_groups = int(batch.unit_group.max()) + 1 if len(batch.unit_group) else 0
        hist_pred = np.empty((k, len(idx))) if self.keep_history else None
        hist_ratio = np.empty((k, len(idx))) if self.keep_history else None
        hist_traj = np.full((k, len(idx)), np.nan) if self.keep_history else None
        if k:
            self.measurements.first_batch(idx, batch)
        for r in range(k):
            step = int(batch.steps[r])
            pred, ratio, judged_ratio, exponent, log_ref = self._predict(batch, idx, r, n_groups)
            smoothed = self._observe(batch, idx, r, ratio, judged_ratio, exponent, log_ref)
            if hist_pred is not None and hist_ratio is not None and hist_traj is not None:
                hist_pred[r] = pred
                hist_ratio[r] = smoothed
                if log_ref is not None:
                    hist_traj[r] = self.following.trajectory[idx]
            if step % self.judge_every == 0:
                # on a fixed grid of steps, so that what is recorded (states, first equilibrium, time in it) does not
                # depend on when the recorder happens to be drained (log interval, checkpoint, resume)
                self._set_reasons(idx, batch, batch.hyper[r])
                self.judge(commit=True)
        if k:
            self.measurements.last_of_batch(idx, batch)
            self._update_filters_and_dead(batch, idx)
            self._set_reasons(idx, batch, batch.hyper[-1])
            self._refresh_forecast(batch, idx)
            self.judge(commit=False)
            if self.keep_history:
                self.history.append(_history_entry(batch, hist_pred, hist_ratio, hist_traj))

    def _update_filters_and_dead(self, batch: StepBatch, idx: np.ndarray) -> None:
        """At the end of a batch, with the rule's pure-decay rate at each of its steps: the dead-layer watch and, with
        per-filter rows, each filter's smoothed angle and the dead-filter tests."""
        m, v, decay = self.measurements, self.vanishing, pure_decay_rates(batch)
        step, L = int(batch.steps[-1]), m.unit_grad.value(idx)
        self.events.extend(self.dead.observe(idx, batch.norm_sq_after[-1], step, decay, L, v.unit_grad_peak[idx], v.loss_alive()))
        if batch.filter_angles:
            self.filters.update(idx, batch.filter_angles, batch.filter_norm_sq, batch.steps, decay, batch.filter_grad_stat)

    def _predict(self, batch: StepBatch, idx: np.ndarray, r: int, n_groups: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Step ``r`` of ``batch``: divergence, the prediction and its changes, the stored settings; returns the
        per-unit Δ*, Δ/Δ* and the exponent of ``L`` in the equilibrium norm."""
        m, step, hyper, group = self.measurements, int(batch.steps[r]), batch.hyper[r], batch.unit_group
        for e in self.divergence.observe(idx, batch.norm_sq_after[r], step):
            self.events.append(e)
            m.forget(e.unit)
            self.filters.forget(e.unit)
            self.dead.forget(e.unit)
        preds = [self.predictor.predict(batch.rule, hyper[g]) for g in range(n_groups)]
        settings_pred = np.array([p.delta for p in preds])[group]  # what a change of settings moves
        scale = np.array([p.scale for p in preds])[group]
        m.unit_grad.update(idx, batch.grad_sq[r] * batch.norm_sq_before[r])  # before the per-unit factors use it
        dependent = any(p.unit_dependent for p in preds)
        if dependent:
            f_delta, f_tau = unit_factors(batch.rule, preds, hyper, group, m.unit_grad.value(idx), self._numel[idx])
        else:
            f_delta, f_tau = np.ones(len(idx)), np.ones(len(idx))
        delta = batch.angular_update[r]
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            pred = settings_pred * f_delta
            ratio = np.where(pred > 0, delta / pred, np.nan)
        plan, left = self.following.plan_for(batch.optimizer_index, step, hyper, n_groups)
        if left is not None:
            self.events.append(left)
        self._peak = self._peak_delta(batch.optimizer_index, plan, group, pred, f_delta)
        judged_ratio, log_ref, tracked, restart = ratio, None, (settings_pred, scale, preds), True
        exponent = np.array([p.grad_exponent for p in preds])[group]
        if plan is not None:
            power = np.array([p.power for p in preds])[group]
            decay = np.array([p.decay for p in preds])[group]
            judged_ratio, log_ref = self.following.follow(plan, batch, r, hyper, pred, power, decay, m.unit_grad.value(idx), self._numel[idx], exponent)
            # the target moves with the plan: no change of settings restarts the samples, and the windows follow the
            # fastest relaxation the plan reaches; a plan of a few step changes still has each change timed as a
            # re-equilibration (SMD022), a plan that moves at every step has no such changes
            reference = [replace(p, tau_ratio=float(plan.tau_ref[g])) for g, p in enumerate(preds)]
            tracked = (settings_pred, scale, reference) if plan.stepwise() else (np.ones(len(idx)), np.ones(len(idx)), reference)
            restart = False
            preds = reference
        rec = self.record
        before = UnitsBefore(m.tau_ratio, rec.committed_state, rec.committed_ratio, rec.first_equilibrium)
        for e in self.changes.track(idx, tracked[0], tracked[1], f_tau, tracked[2], batch, hyper, step, before, self.series, restart):
            self.judgement.state[e.unit] = rec.committed_state[e.unit] = UnitState.REEQUILIBRATING
            self.events.append(e)
        m.steps[idx] = step
        m.predicted[idx] = pred
        with np.errstate(invalid="ignore", over="ignore"):
            m.relaxation[idx] = np.array([p.tau for p in preds])[group] * f_tau
            m.tau_ratio[idx] = np.array([p.tau_ratio for p in preds])[group] * f_tau
        m.norm_power[idx] = np.array([p.power for p in preds])[group]
        if dependent:
            # τ follows the unit's L (coupled L2): keep room for the longest window it now needs, whatever the L
            # the series was sized with at the last change (the first step's may be 0 or missing)
            longest = window_range(self.config, m.tau_ratio[idx])[1]
            self.series.max_window[idx] = np.maximum(self.series.max_window[idx], longest)
        m.decay[idx] = np.array([p.decay for p in preds])[group]
        return pred, ratio, judged_ratio, exponent, log_ref

    def _peak_delta(self, optimizer: int, plan: Any, group: np.ndarray, pred: np.ndarray, f_delta: np.ndarray) -> np.ndarray:
        """Per unit, Δ* at the peak settings of the schedule read ahead (the warm-up check's reference): the plan's
        largest where it is followed, today's where the plan read keeps the settings constant, nan where no plan was
        read or the settings left it."""
        if plan is not None:
            return plan.peak_delta[group] * f_delta
        entry = self.following.schedule.get(optimizer)
        if entry and entry.get("read") and "left_plan_at" not in entry:
            return pred
        return np.full(len(group), np.nan)

    def _refresh_forecast(self, batch: StepBatch, idx: np.ndarray) -> None:
        """At each drain: the followed units' equilibrium factors from the smoothed statistics, and their forecast."""
        m = self.measurements
        self.following.refresh(batch, idx, m.unit_grad.value(idx), self._numel[idx], m.ratio)

    def _observe(
        self, batch: StepBatch, idx: np.ndarray, r: int, ratio: np.ndarray, judged_ratio: np.ndarray, exponent: np.ndarray, log_ref: np.ndarray | None
    ) -> np.ndarray:
        """Step ``r`` of ``batch``, after :meth:`_predict`: the moving averages, the steady-state samples, the band
        timer and the event watchers; returns the smoothed Δ/Δ*."""
        m, step, delta = self.measurements, int(batch.steps[r]), batch.angular_update[r]
        m.delta.update(idx, delta)
        m.ratio.update(idx, ratio)
        m.predicted_smooth.update(idx, np.where(np.isfinite(delta), m.predicted[idx], np.nan))
        if batch.filter_angular_update_rms is not None:
            m.per_filter = True
            m.filter_delta.update(idx, batch.filter_angular_update_rms[r])
        # the norm relative to its predicted equilibrium (up to a constant of the hyper-parameters): SGD's
        # equilibrium norm follows the gradient statistic L, which learning may still lower slowly
        with np.errstate(divide="ignore", invalid="ignore"):
            if log_ref is None:
                log_norm = 0.5 * np.log(batch.norm_sq_after[r]) - np.where(exponent != 0.0, exponent * np.log(m.unit_grad.value(idx)), 0.0)
            else:  # against the trajectory's norm
                log_norm = 0.5 * np.log(batch.norm_sq_after[r]) - log_ref
        self.series.add(idx, float(step), judged_ratio, log_norm, _balance_samples(batch, r, m.decay[idx]))
        smoothed = m.ratio.value(idx)
        if log_ref is not None:
            self.following.observe_band(idx, smoothed, step)
            smoothed_judged = self.following.ratio.value(idx)  # Δ/Δ* falls in a decay by design; Δ/Δ̂ does not
        else:
            smoothed_judged = smoothed
        self.changes.band(idx, smoothed, step, self.record.committed_state)
        with np.errstate(invalid="ignore"):  # the start is over: settled along the trajectory, or back in the band
            f = self.following
            settled = np.where(f.on_trajectory[idx], f.observed_equilibrium[idx] >= 0, np.abs(smoothed - 1.0) <= self.config.tolerance)
        self.early.observe(idx, batch.unit_group, delta, self._peak, settled, step)
        self.events.extend(self.spike_watch.observe(idx, ratio, step, self.record.first_equilibrium[idx] >= 0, self.names))
        warm = m.unit_grad.weight[idx] > 0.5  # past the first ~ema_steps/2 steps
        settled = step - self.changes.origin[idx] >= 2.0 * window_range(self.config, m.tau_ratio[idx])[0]
        self.events.extend(self.vanishing.observe(idx, m.unit_grad.value(idx), warm, smoothed_judged, settled, step))
        return smoothed

    def _set_reasons(self, idx: np.ndarray, batch: StepBatch, hyper: list) -> None:
        m = self.measurements
        for j, u in enumerate(idx):
            h = hyper[int(batch.unit_group[j])]
            m.hyper[u] = h
            # a weight named by include= that is not scale-invariant has no prediction, whatever the settings
            m.reasons[u] = not_scale_invariant(self._units[u]) or self.predictor.predict(batch.rule, h).reason

    def judge(self, commit: bool = True) -> None:
        """Judge every unit as of its last measured step (:func:`~lightning_smd.analysis.judgement.judge`).

        ``commit``: also record the transitions of the states, the first equilibrium and the time in equilibrium.
        Without it, the judgement is a view of the present that the next one does not build on."""
        if not self._units:
            return
        m = self.measurements
        inputs = JudgeInputs(
            m.steps, self.changes.origin, m.tau_ratio, m.norm_power, m.decay, m.predicted, self.applicable,
            self.vanishing.vanishing_since >= 0, self.divergence.diverged, self.record.committed_state, self.stride,
            self.following.reach(), self.dead.dead_since >= 0,
        )  # fmt: skip
        judged = judge(inputs, self.series, self.config)
        if commit:
            self.record.commit(judged, m.steps)
            self.following.tracked_until[judged.counted] = m.steps[judged.counted]
        self.judgement.set(judged)

    def observe_loss(self, mean_loss: float) -> None:
        """The mean training loss since the last call (the callback reads it at each log step): grounds the
        vanishing-noise diagnosis in the loss actually approaching zero. Call it before :meth:`update`."""
        self.vanishing.observe_loss(mean_loss)

    def take_events(self) -> list[Event]:
        """The events since the last call (each is returned once)."""
        events, self.events = self.events, []
        return events

    # ------------------------------------------------------------------------------------------
    @property
    def applicable(self) -> np.ndarray:
        """Units with a prediction (a prediction of 0, i.e. no weight decay, counts: it is a failure; an unknown
        optimizer has none) that applies to them: a weight named by ``include`` that the first batch showed not to be
        scale-invariant (:func:`lightning_smd.analysis.units.not_scale_invariant`) is measured, but not judged — its
        reason (``reasons``, hence ``not_in_equilibrium_because``) says so."""
        m = self.measurements
        out = np.zeros(len(self._units), dtype=bool)
        for u, rule in enumerate(m.rules):
            out[u] = rule is not None and rule.known and bool(np.isfinite(m.predicted[u])) and not_scale_invariant(self._units[u]) is None
        return out

    @property
    def in_equilibrium(self) -> np.ndarray:
        """Units counted as in equilibrium at their last judgement."""
        return self.judgement.counted

    @property
    def why_not(self) -> list[str | None]:
        """Per unit, why it is not counted as in equilibrium (``None`` when it is), as of the latest judgement."""
        return [reasons.why_not(self, u) for u in range(len(self._units))]

    def equilibrium_fraction(self) -> float:
        app = self.applicable
        if not app.any():
            return math.nan
        return float(self.judgement.counted[app].mean())

    def judged_ratio(self) -> np.ndarray:
        """Per unit, the smoothed ratio it is judged on: ``Δ/Δ̂`` where it follows a planned schedule's trajectory,
        ``Δ/Δ*`` elsewhere (the heatmap's)."""
        f = self.following
        return np.where(f.on_trajectory, f.ratio.value(), self.measurements.ratio.value())

    def median_ratio(self) -> float:
        r = self.measurements.ratio.value()[self.applicable]
        r = r[np.isfinite(r)]
        return float(np.median(r)) if r.size else math.nan

    def ratio_interval(self) -> tuple[np.ndarray, np.ndarray]:
        """The confidence interval of each unit's steady ratio (level ``1 − significance/N``)."""
        return self.judgement.ratio_interval()

    def predicted_weight_norm(self) -> np.ndarray:
        """The equilibrium norm for the latest settings and smoothed ``L``."""
        return self.measurements.predicted_weight_norm(self._units)

    def predicted_time_to_equilibrium(self) -> np.ndarray:
        """Steps from the initial norm to the equilibrium band (:func:`~lightning_smd.analysis.forecast.predicted_time_to_equilibrium`)."""
        return predicted_time_to_equilibrium(self)

    def steps_needed(self) -> np.ndarray:
        """Steps until each unit could be judged in equilibrium (:func:`~lightning_smd.analysis.forecast.steps_needed`)."""
        return steps_needed(self)

    def verdict(self) -> tuple[Verdict, str]:
        """``(verdict, one-sentence reason)`` (:func:`~lightning_smd.analysis.reasons.verdict`)."""
        return reasons.verdict(self)

    def divergence_text(self) -> str:
        return reasons.divergence_text(self)

    def criteria_text(self) -> str:
        return reasons.criteria_text(self.config)

    def metrics(self, per_layer: bool = True) -> dict[str, float]:
        """The logged metrics (:func:`~lightning_smd.analysis.rows.metrics`)."""
        return rows.metrics(self, per_layer)

    def layer_rows(self) -> list[dict[str, Any]]:
        return rows.layer_rows(self)

    def statistics(self) -> dict[str, Any]:
        return rows.statistics(self)

    def diagnoses(self) -> dict[str, Any]:
        return rows.diagnoses(self)

    def summary(self) -> dict[str, Any]:
        return rows.summary(self)

    def unit_history(self, name: str) -> dict[str, np.ndarray]:
        """Every recorded step of one unit (needs ``keep_history=True``)."""
        u = self.names.index(name)
        keys = (
            "steps", "angular_update", "predicted_angular_update", "trajectory_angular_update", "ratio", "weight_norm", "grad_norm", "lr",
            "filter_angular_update_rms",
        )  # fmt: skip
        parts: dict[str, list[np.ndarray]] = {k: [] for k in keys}
        for h in self.history:
            where = np.nonzero(h["units"] == u)[0]
            if not where.size:
                continue
            j = int(where[0])
            parts["steps"].append(h["steps"])
            for k in keys[1:]:
                parts[k].append(h[k][:, j])
        return {k: (np.concatenate(v) if v else np.empty(0)) for k, v in parts.items()}

    # ------------------------------------------------------------------------------------------
    # Checkpointing: plain Python types only (loadable with torch.load(weights_only=True)); every part's declared
    # fields under their keys (those of the checkpoints written before the parts existed)
    # ------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"schema_version": SCHEMA_VERSION, "names": list(self._names), "stride": self.stride, "series": plain(self.series.state_dict())}
        for attr in _PARTS:
            out.update(getattr(self, attr).state_dict())
        return out

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`; the units must be the same (by name, in order)."""
        names = self.names
        if state.get("schema_version") != SCHEMA_VERSION:
            raise ValueError(f"the checkpoint's SMD state has schema version {state.get('schema_version', 1)}, this version reads {SCHEMA_VERSION}")
        if state.get("names") != names:
            raise ValueError(f"the checkpoint tracks other weights ({state.get('names')}) than this run ({names})")
        if int(state.get("stride", 1)) != self.stride:
            raise ValueError(f"the checkpoint sampled every {state.get('stride', 1)} steps, this run every {self.stride}")
        series = unplain(state["series"])
        if np.asarray(series["current"]).shape != self.series.current.shape:
            raise ValueError("the checkpoint's steady-state statistics have the layout of an earlier version")
        for attr in _PARTS:
            getattr(self, attr).load_state_dict(state)
        self.series.load_state_dict(series)


def _balance_samples(batch: StepBatch, r: int, e: np.ndarray) -> np.ndarray | None:
    """Per unit, step ``r``'s ``⟨w, ηu⟩/a``, its square, ``‖ηu‖²/a``, ``Δ²`` and the norm's relative change
    (``a = ‖w_t‖²``), where the step ``δw = −e·w − ηu`` splits into a decoupled decay ``e`` and the update ``ηu``;
    nan where it does not (``None``: nowhere)."""
    if batch.norm_sq_change is None or not np.isfinite(e).any():
        return None
    out = np.empty((len(batch.unit_index), 5))
    a, q = batch.norm_sq_before[r], batch.update_sq[r]
    with np.errstate(divide="ignore", invalid="ignore"):
        c = 0.5 * (batch.norm_sq_change[r] - q) / a  # ⟨w, δw⟩/a
        wu = -(c + e)
        out[:, 0], out[:, 1] = wu, wu * wu
        out[:, 2] = q / a + 2.0 * e * c + e * e
        out[:, 3] = batch.angular_update[r] ** 2
        out[:, 4] = batch.norm_sq_change[r] / a
    return out


def _history_entry(batch: StepBatch, hist_pred: np.ndarray | None, hist_ratio: np.ndarray | None, hist_traj: np.ndarray | None) -> dict[str, Any]:
    """One batch's raw values for :meth:`Diagnostics.unit_history`."""
    k, idx = len(batch.steps), batch.unit_index
    lr = np.array([[batch.hyper[r][int(g)].get("lr", math.nan) for g in batch.unit_group] for r in range(k)])
    return {
        "optimizer": batch.optimizer_index,
        "units": idx.copy(),
        "steps": batch.steps.copy(),
        "angular_update": batch.angular_update.copy(),
        "predicted_angular_update": hist_pred,
        "trajectory_angular_update": hist_traj,
        "ratio": hist_ratio,
        "weight_norm": np.sqrt(batch.norm_sq_after),
        "grad_norm": np.sqrt(batch.grad_sq),
        "lr": lr,
        "filter_angular_update_rms": (
            batch.filter_angular_update_rms.copy() if batch.filter_angular_update_rms is not None else np.full((k, len(idx)), np.nan)
        ),
    }


def diffusion_exponent(steps: Sequence[float], distance: Sequence[float], min_span: float = 4.0) -> float:
    """Exponent ``c`` of ``distance ∝ t^c``: least squares in log-log (nan with fewer than 3 points or a
    span of ``t`` narrower than ``min_span``). A random walk gives 0.5, ballistic motion 1."""
    t = np.asarray(steps, dtype=np.float64)
    d = np.asarray(distance, dtype=np.float64)
    ok = (t > 0) & (d > 0) & np.isfinite(d)
    t, d = t[ok], d[ok]
    if t.size < 3 or t.max() / t.min() < min_span:
        return math.nan
    x, y = np.log(t), np.log(d)
    return float(np.polyfit(x, y, 1)[0])
