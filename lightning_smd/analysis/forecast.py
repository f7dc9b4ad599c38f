"""How long each unit still needs, from the theory's time constants: to reach the equilibrium band from its
initial norm, and to be judged in equilibrium from where it stands now (the ``"stop"`` gate's question). Pure
functions of a :class:`~lightning_smd.analysis.diagnostics.Diagnostics`' state."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

from lightning_smd.analysis.judgement import required
from lightning_smd.analysis.theory import time_to_band

if TYPE_CHECKING:
    from lightning_smd.analysis.diagnostics import Diagnostics

__all__ = ["predicted_time_to_equilibrium", "steps_needed", "cannot_reach"]


def predicted_time_to_equilibrium(d: Diagnostics) -> np.ndarray:
    """Steps from the initial norm to the equilibrium band, predicted with the final settings and ``L``."""
    out = np.full(len(d.units), np.nan)
    pred_norm = d.predicted_weight_norm()
    L = d.unit_grad.value()
    for u, (rule, h) in enumerate(zip(d.rules, d.hyper)):
        if rule is not None and h is not None and np.isfinite(pred_norm[u]):
            f_tau = rule.unit_factors(h, float(L[u]), float(d.units[u].numel))[1] if rule.unit_dependent(h) else 1.0
            out[u] = rule.time_to_equilibrium(h, float(d.initial_norm[u]), float(pred_norm[u]), d.config.tolerance) * f_tau
    return out


def steps_needed(d: Diagnostics) -> np.ndarray:
    """Steps until each unit could be judged in equilibrium, if nothing changes: what its settling still needs,
    and for a drifting unit the relaxation from its current smoothed ratio ``r`` (``q/q* = 1/r²``)."""
    out = np.full(len(d.units), np.nan)
    r = d.ratio.value()
    since = d.steps - d.origin
    for u, (rule, h) in enumerate(zip(d.rules, d.hyper)):
        if rule is None or h is None:
            continue
        if d.counted[u]:
            out[u] = 0.0
        elif d.predicted[u] == 0.0:
            out[u] = math.inf
        elif math.isfinite(d.settle_steps[u]):
            need = max(float(d.settle_steps[u]) - float(since[u]), 0.0)
            if not d.steady[u] and need == 0.0 and np.isfinite(r[u]) and r[u] > 0:
                need = time_to_band(1.0 / r[u] ** 2, float(d.tau_ratio[u]), d.config.tolerance)
            out[u] = need
    return out


def cannot_reach(d: Diagnostics, planned_steps: int | None, interval: int) -> str | None:
    """Why the run can clearly not end in equilibrium in ``planned_steps``, or None (the ``"stop"`` gate's question,
    asked every ``interval`` steps): it diverged; too many layers have no weight decay or no learning rate; or too
    few layers can reach equilibrium in the remaining steps, by their relaxation times (twice what they need is
    allowed). While the settings still change (a warm-up, a schedule) the future is unknown: None."""
    if d.diverged.any():
        return d.divergence_text()
    app = d.applicable
    n_app = int(app.sum())
    if n_app == 0:
        return None
    needed_count = required(n_app, d.config.min_fraction)
    f = d.following
    if f.on_trajectory[app].any():
        return _cannot_follow(d, app, needed_count, planned_steps)
    if (d.steps - d.origin < interval)[app].any():
        return None
    needed = steps_needed(d)
    units = [u for u in range(len(d.units)) if app[u]]
    no_decay = [d.units[u].name for u in units if d.predicted[u] == 0.0]
    still = [d.units[u].name for u in units if d.predicted[u] == 0.0 and (d.hyper[u] or {}).get("lr") == 0.0]
    remaining = math.inf if planned_steps is None else planned_steps - int(d.steps.max(initial=0))
    possible = [u for u in units if not (needed[u] > 2.0 * remaining)]
    if len(possible) >= needed_count:
        return None
    if no_decay and len(no_decay) > n_app - needed_count:
        if len(still) == len(no_decay):
            return f"{len(still)} of {n_app} normalized layers have a learning rate of 0, so they do not move ({', '.join(still[:3])})"
        return (
            f"{len(no_decay)} of {n_app} normalized layers have no weight decay or no learning rate, so they have no "
            f"equilibrium ({', '.join(no_decay[:3])})"
        )
    return (
        f"only {len(possible)} of {n_app} layers can reach equilibrium in the {remaining} remaining steps "
        f"(at least {needed_count} needed; the others need more than twice that, by their relaxation times)"
    )


def _cannot_follow(d: Diagnostics, app: np.ndarray, needed_count: int, planned_steps: int | None) -> str | None:
    """:func:`cannot_reach` under a followed schedule: from the forecast (once made from the first steps' statistics).
    A layer can still make it when it was counted, when the forecast has it reach equilibrium, or when even the peak
    settings kept from now on would need no more than twice the steps left (the same allowance as without a plan)."""
    f = d.following
    units = np.nonzero(app)[0]
    still = [d.units[u].name for u in units.tolist() if _stays_still(d, u)]
    if still and len(still) > len(units) - needed_count:
        shown = ", ".join(still[:3])
        return f"{len(still)} of {len(units)} normalized layers have a learning rate of 0 for the rest of the planned schedule, so they do not move ({shown})"
    if (f.start_forecast_made_at[units] < 0).any():
        return None
    step = int(d.steps.max(initial=0))
    remaining = math.inf if planned_steps is None else planned_steps - step
    possible = 0
    for u in units.tolist():
        need = f.constant_equilibrium[u] - step if f.constant_equilibrium[u] >= 0 else math.inf
        if d.first_equilibrium[u] >= 0 or f.forecast_equilibrium[u] >= 0 or need <= 2.0 * remaining:
            possible += 1
    if possible >= needed_count:
        return None
    return (
        f"only {possible} of {len(units)} layers are forecast to reach equilibrium in the {remaining} remaining steps of the "
        f"planned schedule (at least {needed_count} needed; the others need more than twice that even at the peak settings)"
    )


def _stays_still(d: Diagnostics, u: int) -> bool:
    """Unit ``u``'s learning rate is 0 now and stays 0 to the end of its plan."""
    plan = d.following.plans.get(int(d.optimizer[u]))
    if plan is None or (d.hyper[u] or {}).get("lr") != 0.0:
        return False
    i = plan.index(int(d.steps[u]))
    return bool((plan.lr[:, i:] == 0.0).all())
