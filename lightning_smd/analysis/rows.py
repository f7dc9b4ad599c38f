"""What the analysis writes out: the logged metrics and the run summary's rows (one per layer), statistics and
diagnoses. Pure functions of a :class:`~lightning_smd.analysis.diagnostics.Diagnostics`' state (read, never
written); the summary's layout is versioned by :data:`SCHEMA_VERSION`."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from lightning_smd.analysis import keys
from lightning_smd.analysis.config import WINDOW_RELAXATION_TIMES
from lightning_smd.analysis.fields import num
from lightning_smd.analysis.following import plain_schedule
from lightning_smd.analysis.forecast import predicted_time_to_equilibrium
from lightning_smd.analysis.reasons import verdict, why_not
from lightning_smd.analysis.states import Agreement, UnitState

if TYPE_CHECKING:
    from lightning_smd.analysis.diagnostics import Diagnostics

__all__ = ["SCHEMA_VERSION", "metrics", "layer_columns", "layer_rows", "statistics", "diagnoses", "summary"]

#: Version of the summary's layout (2: steady state judged statistically, agreement as its own figure).
SCHEMA_VERSION = 2


def metrics(d: Diagnostics, per_layer: bool = True, namespace: str = keys.NAMESPACE) -> dict[str, float]:
    """The logged metrics: always the same keys for the same units (CSV loggers need that)."""
    out = {
        keys.key("angular_update_ratio", namespace=namespace): d.median_ratio(),
        keys.key("equilibrium_fraction", namespace=namespace): d.equilibrium_fraction(),
    }
    if d.per_filter:  # the count of dead filters over the layers (0 where none can be told yet)
        out[keys.key("dead_filters", namespace=namespace)] = float(np.nansum(d.filters.dead_counts()))
    if per_layer:
        columns = layer_columns(d)
        for u, unit in enumerate(d.units):
            for m, values in columns.items():
                out[keys.layer_key(unit.name, m, namespace)] = float(values[u])
    return out


def layer_columns(d: Diagnostics) -> dict[str, np.ndarray]:
    """The per-layer metrics (:data:`~lightning_smd.analysis.keys.LAYER_METRICS`, and the per-filter RMS when
    measured), one array each."""
    lo, hi = d.ratio_interval()
    values = {
        "angular_update": d.delta.value(),
        "predicted_angular_update": d.predicted,
        "smoothed_predicted_angular_update": d.predicted_smooth.value(),
        "angular_update_ratio": d.ratio.value(),
        "weight_norm": d.norm,
        "predicted_weight_norm": d.predicted_weight_norm(),
        "in_equilibrium": d.counted.astype(float),
        "effective_lr": d.effective_lr,
        "steady_ratio": d.steady_ratio,
        "steady_ratio_low": lo,
        "steady_ratio_high": hi,
        "drift": d.drift,
    }
    columns = {m: values[m] for m in keys.LAYER_METRICS}
    if d.following.on_trajectory.any():  # a schedule followed from the first step: the keys stay the same for the run
        f = d.following
        columns["trajectory_angular_update"] = np.where(f.on_trajectory, f.smooth.value(), np.nan)  # (EMA, as Δ)
        columns["trajectory_ratio"] = np.where(f.on_trajectory, f.ratio.value(), np.nan)
    if d.per_filter:
        columns["filter_angular_update_rms"] = d.filter_delta.value()
        columns["rotation_imbalance"] = d.filters.imbalance()
        columns["dead_filters"] = d.filters.dead_counts()
    return columns


def _identity(d: Diagnostics, u: int) -> dict[str, Any]:
    """What the unit is: its weights, layer, normalization, how it was found; its optimizer, rule and settings."""
    unit, rule = d.units[u], d.rules[u]
    return {
        "name": unit.name,
        "params": list(unit.params),
        "shape": list(unit.shape),
        "numel": unit.numel,
        "layer": unit.layer,
        "normalization": unit.norm,
        "granularity": unit.granularity,
        "found_by": unit.found_by,
        "group_size": unit.group_size,
        "verification": unit.verification,
        "optimizer": d.optimizer[u],
        "rule": rule.name if rule is not None else None,
        "hyper": d.hyper[u],
        "steps": int(d.steps[u]),
    }


def _measured(d: Diagnostics, u: int, smoothed: dict[str, np.ndarray]) -> dict[str, Any]:
    """The measured and predicted figures (``smoothed``: the moving averages and the predicted norm of every unit)."""
    return {
        "angular_update": num(smoothed["delta"][u]),
        "last_angular_update": num(d.last_delta[u]),
        "predicted_angular_update": num(d.predicted[u]),
        "smoothed_predicted_angular_update": num(smoothed["predicted"][u]),
        "ratio": num(smoothed["ratio"][u]),
        "weight_norm": num(d.norm[u]),
        "predicted_weight_norm": num(smoothed["norm"][u]),
        "relaxation_time": num(d.relaxation[u]),
        "ratio_relaxation_time": num(d.tau_ratio[u]),
    }


def _judged(d: Diagnostics, u: int, lo: np.ndarray, hi: np.ndarray) -> dict[str, Any]:
    """The latest judgement: steady, agreement, why not, the steady ratio and its interval, the drifts, the window."""
    since = d.changes.since_change(u, int(d.steps[u]))
    return {
        "in_equilibrium": bool(d.counted[u]),
        "steady": bool(d.steady[u]),
        "agreement": d.agreement[u],
        "not_in_equilibrium_because": why_not(d, u),
        "steady_ratio": num(d.steady_ratio[u]),
        "steady_ratio_ci": [num(lo[u]), num(hi[u])] if np.isfinite(lo[u]) else None,
        "direction_ratio": num(d.direction_ratio[u]),
        "update_kappa": num(d.kappa[u]),
        "update_radial_share": num(d.radial_share[u]),
        "balance_drift": num(d.balance_drift[u]),
        "drift": num(d.drift[u]),
        "drift_se": num(d.drift_se[u]),
        "norm_drift": num(d.norm_drift[u]),
        "norm_drift_se": num(d.norm_drift_se[u]),
        "quantile": num(d.quantile[u]),
        "window_steps": num(d.window_steps[u]),
        "steps_since_change": since,
        "settle_steps": num(d.settle_steps[u]),
    }


def _course(d: Diagnostics, u: int, smoothed: dict[str, np.ndarray]) -> dict[str, Any]:
    """The unit's course over the run: equilibrium reached and kept, divergence, re-equilibrations, spikes, noise."""
    first = int(d.first_equilibrium[u])
    measured = d.changes.measured_steps(u, int(d.steps[u]))
    return {
        "filter_angular_update_rms": num(smoothed["filter"][u]) if d.per_filter else None,
        "rotation_imbalance": num(smoothed["imbalance"][u]) if d.per_filter else None,
        "dead_filters": num(smoothed["dead"][u]) if d.per_filter else None,
        "first_equilibrium_step": first if first >= 0 else None,
        "diverged_at_step": int(d.diverged_step[u]) if d.diverged_step[u] >= 0 else None,
        "steps_in_equilibrium": int(d.steps_in_equilibrium[u]),
        "first_measured_step": int(d.first_step[u]) if d.first_step[u] >= 0 else None,
        "share_in_equilibrium": num(d.steps_in_equilibrium[u] / measured) if measured else None,
        "state": d.state[u],
        "initial_weight_norm": num(d.initial_norm[u]),
        "predicted_time_to_equilibrium": num(smoothed["t_eq"][u]),
        "effective_lr": num(d.effective_lr[u]),
        "reequilibrations": list(d.reequilibrations[u]),
        "expected_reequilibration_steps": num(d.expected_reequilibration[u]) if d.state[u] == UnitState.REEQUILIBRATING else None,
        "spikes": int(d.spike_count[u]),
        "vanishing_gradient_noise_since": int(d.vanishing_first[u]) if d.vanishing_first[u] >= 0 else None,
        "dead_since": int(d.dead.dead_since[u]) if d.dead.dead_since[u] >= 0 else None,
        "unit_grad_sq": num(d.unit_grad.value(np.array([u]))[0]),
        "unit_grad_sq_peak": num(d.unit_grad_peak[u]),
        "reason": d.reasons[u],
        **(_following(d, u) if d.following.schedule else {}),
    }


def _following(d: Diagnostics, u: int) -> dict[str, Any]:
    """The moving equilibrium of a planned schedule: forecast next to observed (``None`` without a followed plan)."""
    f = d.following

    def step(v: Any) -> int | None:
        return int(v) if v >= 0 else None

    on = bool(f.on_trajectory[u])
    ratio = float(d.ratio.value(np.array([u]))[0])
    below = on and np.isfinite(ratio) and ratio < 1.0 - d.config.tolerance
    return {
        # the warm-up check (its reference, the peak settings' Δ*, comes from the schedule read)
        "early_angular_update_ratio": num(d.early.early_ratio[u]),
        "early_angular_update_step": step(d.early.early_ratio_step[u]),
        "forecast_equilibrium_step": step(f.forecast_equilibrium[u]) if on else None,
        "observed_equilibrium_step": step(f.observed_equilibrium[u]) if on else None,
        "forecast_freeze_out_step": step(f.forecast_freeze_out[u]) if on else None,
        "freeze_out_step": step(f.last_in_band[u]) if below else None,
        "tracked_until_step": step(f.tracked_until[u]) if on else None,
        "trajectory_ratio": num(f.ratio.value(np.array([u]))[0]) if on else None,
        "expected_ratio": num(f.expected_ratio[u]) if on else None,
        "trajectory_angular_update": num(f.smooth.value(np.array([u]))[0]) if on else None,
    }


def forecast(d: Diagnostics) -> list[dict[str, Any]]:
    """The forecast made at fit start (once the first steps' gradient statistics were measured), per followed layer."""
    f = d.following
    out = []
    for u in np.nonzero(f.on_trajectory & (f.start_forecast_made_at >= 0))[0].tolist():
        out.append(
            {
                "name": d.names[u],
                "made_at_step": int(f.start_forecast_made_at[u]),
                "equilibrium_step": int(f.start_forecast_equilibrium[u]) if f.start_forecast_equilibrium[u] >= 0 else None,
                "freeze_out_step": int(f.start_forecast_freeze_out[u]) if f.start_forecast_freeze_out[u] >= 0 else None,
                "equilibrium_step_at_constant_settings": int(f.constant_equilibrium[u]) if f.constant_equilibrium[u] >= 0 else None,
                "first_decay_step": int(f.first_decay[u]) if f.first_decay[u] >= 0 else None,
            }
        )
    return out


def layer_rows(d: Diagnostics) -> list[dict[str, Any]]:
    """The summary's ``layers``: one row per unit."""
    smoothed = {
        "delta": d.delta.value(),
        "predicted": d.predicted_smooth.value(),
        "ratio": d.ratio.value(),
        "norm": d.predicted_weight_norm(),
        "filter": d.filter_delta.value(),
        "imbalance": d.filters.imbalance(),
        "dead": d.filters.dead_counts(),
        "t_eq": predicted_time_to_equilibrium(d),
    }
    lo, hi = d.ratio_interval()
    return [{**_identity(d, u), **_measured(d, u, smoothed), **_judged(d, u, lo, hi), **_course(d, u, smoothed)} for u in range(len(d.units))]


def statistics(d: Diagnostics) -> dict[str, Any]:
    """How the run was judged: the per-unit level and the quantile of the tests."""
    n = int((d.applicable & (d.predicted > 0)).sum())
    per_unit = d.config.significance / max(n, 1)
    return {
        "units_judged": n,
        "false_alarm_rate_per_run": d.config.significance,
        "false_alarm_rate_per_unit": per_unit,
        "confidence_level": 1.0 - per_unit,
        "drift_limit_per_relaxation_time": d.config.drift,
        "window": "the second half of the steps since the last change",
        "window_relaxation_times": list(WINDOW_RELAXATION_TIMES),
    }


def diagnoses(d: Diagnostics) -> dict[str, Any]:
    """Run-level findings, each with the layers concerned (a finding without layers is left out)."""
    names, app, eq = d.names, d.applicable, d.counted
    units = range(len(names))
    reached = [u for u in units if app[u] and d.first_equilibrium[u] >= 0]
    never = [names[u] for u in units if app[u] and d.first_equilibrium[u] < 0]
    found = {
        "vanishing_gradient_noise": [names[u] for u in units if d.vanishing_first[u] >= 0 and not eq[u]],
        "dead": [names[u] for u in units if d.dead.dead_since[u] >= 0],
        "norm_spikes": [names[u] for u in units if d.spike_count[u] > 0],
        "re_equilibrating": [names[u] for u in units if d.state[u] == UnitState.REEQUILIBRATING],
        "off_prediction": [names[u] for u in units if d.agreement[u] == Agreement.OFF_PREDICTION],
        "steady_far_off": [names[u] for u in units if d.agreement[u] == Agreement.FAR_OFF],
        "never_in_equilibrium": never if reached else [],
        "diverged": [names[u] for u in np.argsort(d.diverged_step, kind="stable") if d.diverged_step[u] >= 0],
        "departed": [names[u] for u in units if d.state[u] == UnitState.DEPARTED],
        "fast_start": [names[u] for u in np.nonzero(d.early.fast(app & d.following.on_trajectory))[0].tolist()],
    }
    return {k: v for k, v in found.items() if v}


def summary(d: Diagnostics) -> dict[str, Any]:
    """The analysis' part of the run summary (``smd_summary.json``)."""
    verdict_, reason = verdict(d)
    return {
        "schema_version": SCHEMA_VERSION,
        "verdict": verdict_,
        "reason": reason,
        "steps": int(d.steps.max(initial=0)),
        "diverged_at_step": int(d.diverged_step[d.diverged].min()) if d.diverged.any() else None,
        "criteria": d.config.criteria(),
        "statistics": statistics(d),
        "equilibrium_fraction": num(d.equilibrium_fraction()),
        "angular_update_ratio": num(d.median_ratio()),
        "diagnoses": diagnoses(d),
        "spikes": list(d.spikes),
        "training_loss": {"last": num(d.loss_now), "peak": num(d.loss_peak)},
        **({"schedule": plain_schedule(d.following.schedule), "forecast": forecast(d)} if d.following.schedule else {}),
        "layers": layer_rows(d),
    }
