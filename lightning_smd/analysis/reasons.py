"""The words of the judgement: why a unit is not counted, the run's verdict with its one-sentence reason, the
criteria and a divergence, as text. Pure functions of a :class:`~lightning_smd.analysis.diagnostics.Diagnostics`'
state (read, never written)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from lightning_smd.analysis.config import WINDOW_RELAXATION_TIMES, DiagnosticsConfig
from lightning_smd.analysis.judgement import reached
from lightning_smd.analysis.states import Agreement, UnitState, Verdict
from lightning_smd.analysis.theory import AdamWRule, LionRule
from lightning_smd.messages import shown_names

if TYPE_CHECKING:
    from lightning_smd.analysis.diagnostics import Diagnostics

__all__ = ["why_not", "verdict", "divergence_text", "criteria_text", "diverged_layers", "lr_is_zero", "off_prediction_causes"]


def why_not(d: Diagnostics, u: int) -> str | None:
    """Why unit ``u`` is not counted as in equilibrium (``None`` when it is), as of the latest judgement."""
    f = d.judgement.flag(u)
    if f["counted"]:
        return None
    if d.diverged_step[u] >= 0:
        return f"diverged: its weights became non-finite (NaN or inf) at step {int(d.diverged_step[u])}"
    if not f["seen"]:
        return "no step measured yet"
    if not f["applicable"]:
        return d.reasons[u] or "no prediction"
    if not f["judged"]:
        return d.reasons[u] or "the prediction is 0: no equilibrium"
    if f["vanishing"]:
        return "the gradient noise vanished"
    if not f["settled"]:
        need = float(d.settle_steps[u]) if math.isfinite(d.settle_steps[u]) else math.nan
        return f"settling: {int(d.steps[u] - d.origin[u])} of the {math.ceil(need)} steps needed since the last change"
    if not f["enough"]:
        return "too few samples in the window"
    return _steady_or_not(d, u, f)


def _steady_or_not(d: Diagnostics, u: int, f: dict[str, bool]) -> str:
    """The reason of a settled unit with enough samples: drifting, undetermined, far off or off the prediction."""
    cfg = d.config
    drift = (
        f"Δ/Δ* drifts by {d.drift[u]:+.3f} (±{d.drift_se[u]:.3f}) per relaxation time, |w|/|w*| implies "
        f"{d.norm_drift[u]:+.3f} (±{d.norm_drift_se[u]:.3f}); limit ±{cfg.drift:g}"
    )
    if f["drifting"]:
        return f"drifting: {drift}" + ("" if f["precise"] else " (the window is too noisy to be sure)")
    if not f["precise"]:
        return f"undetermined: the window of {int(d.window_steps[u])} steps is too noisy to bound the drift ({drift}); it grows as training goes on"
    if f["far"]:
        return f"steady at {d.steady_ratio[u]:.3f} of the prediction: further off than ±{cfg.max_deviation:.0%}"
    if f["off"]:
        return f"steady at {d.steady_ratio[u]:.3f} of the prediction: off by more than ±{cfg.tolerance:.0%} (require_agreement)"
    return d.following.not_reached_text(u, cfg.tolerance) or "not judged"


def criteria_text(cfg: DiagnosticsConfig) -> str:
    """The criteria of the verdict, as the reason quotes them."""
    agreement = f", nor beyond ±{cfg.tolerance:.0%} (require_agreement)" if cfg.require_agreement else ""
    return (
        f"steady: at least {2 * WINDOW_RELAXATION_TIMES[0]:g} relaxation times and {2 * cfg.window} steps since the last "
        f"change, drift of Δ/Δ* within ±{cfg.drift:.0%} per relaxation time (false-alarm rate {cfg.significance:.0%}); "
        f"steady Δ/Δ* not beyond ±{cfg.max_deviation:.0%} of the prediction{agreement}"
    )


def verdict(d: Diagnostics) -> tuple[Verdict, str]:
    """``(verdict, one-sentence reason)`` of the run as of the latest judgement."""
    cfg = d.config
    if not d.units:
        return Verdict.NOT_APPLICABLE, "no normalized (scale-invariant) weight is tracked"
    if d.diverged.any():
        return Verdict.DIVERGED, divergence_text(d)
    app = d.applicable
    if not app.any():
        reasons = {r for r in d.reasons if r}
        if d.steps.max(initial=0) == 0:
            return Verdict.NOT_APPLICABLE, "no optimizer step was measured"
        return Verdict.NOT_APPLICABLE, "; ".join(sorted(reasons)) or "no tracked weight has an SMD prediction"
    n_app, n_eq = int(app.sum()), int(d.counted[app].sum())
    names = d.names
    off = [names[u] for u in range(len(names)) if app[u] and d.agreement[u] == Agreement.OFF_PREDICTION]
    off_text = f"; off the prediction (steady, but Δ/Δ* outside ±{cfg.tolerance:.0%}): {', '.join(off[:5])}{' ...' if len(off) > 5 else ''}" if off else ""
    criteria = criteria_text(cfg) + _schedule_text(d, app)
    if reached(n_eq, n_app, cfg.min_fraction):
        return Verdict.EQUILIBRIUM, (
            f"{n_eq}/{n_app} tracked layers ended in equilibrium ({criteria}; at least {cfg.min_fraction:.0%} required){off_text}"
        )
    reason = f"only {n_eq}/{n_app} tracked layers ended in equilibrium; at least {cfg.min_fraction:.0%} required ({criteria})"
    return Verdict.NOT_REACHED, reason + _not_counted_text(d, app) + off_text


def _schedule_text(d: Diagnostics, app: np.ndarray) -> str:
    """What the criteria mean under a followed schedule (empty without one)."""
    f = d.following
    n = int((f.on_trajectory & app).sum())
    if not n:
        return ""
    return (
        f"; under the planned schedule, {n} layer(s) judged against their trajectory Δ̂ instead of Δ*: Δ/Δ̂ steady and "
        "agreeing, once the trajectory reached the equilibrium band, and counted after the freeze-out while the schedule "
        "outruns them"
    )


def _not_counted_text(d: Diagnostics, app: np.ndarray) -> str:
    """``; <count> <what they are>`` for each state of the units (with a prediction) not counted."""
    cfg, names = d.config, d.names
    groups: dict[str, list[int]] = {}
    for u in range(len(names)):
        if app[u] and not d.counted[u]:
            groups.setdefault(d.state[u], []).append(u)
    text = {
        UnitState.APPROACHING: "still settling or drifting",
        UnitState.REEQUILIBRATING: "re-equilibrating after a change of the hyper-parameters",
        UnitState.DEPARTED: "left their equilibrium",
        UnitState.STEADY_FAR_OFF: f"steady, but further than ±{cfg.max_deviation:.0%} from the prediction (not SMD's equilibrium)",
        UnitState.OFF_PREDICTION: f"steady, but off the prediction by more than ±{cfg.tolerance:.0%} (require_agreement)",
        UnitState.VANISHING_NOISE: "diagnosed as vanishing gradient noise (the training loss approaches zero: a property of the run, not a measurement error)",
        UnitState.DEAD: "dead (the loss no longer reaches them: their gradient fell 100× while the loss did not; their norm followed pure decay)",
    }
    reason = ""
    for state, members in groups.items():
        following = [u for u in members if d.following.on_trajectory[u] and d.steady[u]]
        if following and state in (UnitState.APPROACHING, UnitState.DEPARTED):
            words = sorted({(d.following.not_reached_text(u, cfg.tolerance) or "").split(":")[0] for u in following})
            reason += f"; {len(following)} follow their trajectory but are not in the equilibrium band ({', '.join(words)})"
            members = [u for u in members if u not in following]
            if not members:
                continue
        if state == UnitState.NO_EQUILIBRIUM:
            still = [u for u in members if lr_is_zero(d.hyper[u])]
            if len(members) > len(still):
                reason += f"; {len(members) - len(still)} have no weight decay, hence no equilibrium"
            if still:
                reason += f"; {len(still)} have a learning rate of 0 at the end (the weights do not move: no equilibrium to judge)"
        else:
            reason += f"; {len(members)} {text.get(state, state)}"
    vanishing = [u for u in range(len(names)) if app[u] and d.vanishing_first[u] >= 0 and not d.counted[u] and d.state[u] != UnitState.VANISHING_NOISE]
    if vanishing:
        reason += f"; vanishing gradient noise was diagnosed in {len(vanishing)} of them earlier (the training loss approaches zero)"
    return reason


def divergence_text(d: Diagnostics) -> str:
    """The run-level reason of a diverged run: the first step and the layers non-finite from it."""
    names = d.names
    bad = np.nonzero(d.diverged)[0]
    step = int(d.diverged_step[bad].min())
    first = [names[u] for u in bad if d.diverged_step[u] == step]
    loss = f"; the last finite mean training loss was {d.loss_now:.4g}" if math.isfinite(d.loss_now) else ""
    return (
        f"training diverged: {diverged_layers(first)} became non-finite (NaN or inf) at optimizer step {step}; "
        f"{len(bad)} of {len(names)} tracked layers are non-finite at the end{loss}. Nothing after that step is measured: "
        "lower the learning rate, add gradient clipping or a warm-up, or look for a NaN in the data or the loss"
    )


def lr_is_zero(h: dict[str, float] | None) -> bool:
    """The settings have a learning rate of 0 (and a weight decay: without one, that is the reason given)."""
    return h is not None and h.get("lr") == 0.0 and h.get("weight_decay", 0.0) > 0.0


def diverged_layers(names: Sequence[str]) -> str:
    """``the weights of <layer>``, or of several layers that went non-finite in the same step (then the cause cannot
    be told apart among them: one non-finite loss or gradient reaches every layer in that step)."""
    if len(names) == 1:
        return f"the weights of {names[0]}"
    shown = shown_names(names, 4)
    return f"the weights of {len(names)} layers at once ({shown})"


def off_prediction_causes(d: Diagnostics, units: Sequence[int]) -> str:
    """The likely causes of the steady ``units`` off the prediction that can be told from the run."""
    causes = []
    rules = [d.rules[u] for u in units if d.rules[u] is not None]
    small = [d.units[u] for u in units if d.units[u].numel <= 1024]
    if any(isinstance(r, AdamWRule) for r in rules):  # AdamW, Adam, RAdam, NAdam
        causes.append(
            "Adam's per-coordinate normalization gives the update a radial part and an anisotropy that the isotropic theory "
            "ignores; it is largest for small layers"
            + (f" ({', '.join(f'{u.name}: {u.numel} weights' for u in small[:3])})" if small else "")
        )
    if any(isinstance(r, LionRule) for r in rules):
        causes.append("Lion's sign update is more correlated from step to step than gradient noise alone makes it, and has a radial part")
    unverified = [d.units[u] for u in units if (d.units[u].verification or 0.0) > 1e-3]
    if unverified:
        causes.append(
            "the gradient is not orthogonal to the weight on the first batch ("
            + ", ".join(f"{u.name}: |cos(g, w)| = {u.verification:.1e}" for u in unverified[:3])
            + "): BatchNorm's eps or a path around the normalization makes the layer only partly scale-invariant"
        )
    causes.append("dead filters (filters without gradient do not rotate and pull the layer's angle down; per_filter=True logs the RMS over filters)")
    return "; ".join(causes) + "."
