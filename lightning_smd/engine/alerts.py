"""The warnings of a :class:`~lightning_smd.engine.session.Session`: :class:`Alerts` keeps what a run has said
(each text once, each ``once`` key once) and hands every new warning to the front end's ``emit``; the functions
below decide what to say at each point of a run — at set-up, after the verification, at a log step (the
diagnostics' events) and at the end. They yield ``(code, fields)`` for ``Session.warn(code, **fields)`` (a
``once`` key among the fields), so the session issues each one from its own frame, as the front ends expect."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from lightning_smd.analysis.diagnostics import (
    Diagnostics,
    DiagnosticsConfig,
    Diverged,
    LeftPlan,
    NormSpike,
    Reequilibrating,
    VanishingNoise,
    diverged_layers,
)
from lightning_smd.analysis.dead import DeadLayer
from lightning_smd.analysis.preflight import GroupOutlook, judging_steps
from lightning_smd.analysis.recommend import solve_weight_decay
from lightning_smd.analysis.reasons import off_prediction_causes
from lightning_smd.analysis.tracking import window_range
from lightning_smd.analysis.theory import group_hyper
from lightning_smd.analysis.units import not_scale_invariant
from lightning_smd.analysis.warmup import warmup_advice
from lightning_smd.engine.detect import FROZEN, NOT_ORTHOGONAL_WARNING, ORTHOGONALITY_TOLERANCE, NormalizedWeight
from lightning_smd.messages import render, shown_names

if TYPE_CHECKING:
    from lightning_smd.analysis.trajectory import Plan
    from lightning_smd.engine.measure import StepRecorder

__all__ = ["Alerts", "setup_warnings", "slowest_unit", "verification_warnings", "event_warnings", "end_warnings"]

#: One warning to issue: its code and the fields of its message (``once`` among them where it is issued once per run).
Found = tuple[str, dict[str, Any]]

#: Normalizations whose eps can make the gradient of a normalized weight slightly non-orthogonal to it.
_EPS_NORMS = ("batch", "instance", "group", "layer", "rms")


class Alerts:
    """The warnings one run has issued: every text once, and at most one warning per ``once`` key.

    Args:
        emit: called with ``(message, code)`` for each new warning (the front end decides where it goes).
    """

    def __init__(self, emit: Callable[[str, str], None]) -> None:
        self.emit = emit
        #: the texts issued so far, in order (the summary's ``warnings``)
        self.issued: list[str] = []
        #: the ``once`` keys used so far
        self.keys: set[str] = set()
        #: the mean loss of the interval being drained, when not finite (SMD026 at the next drain)
        self.loss_not_finite: float | None = None

    def warn(self, code: str, *, once: str | None = None, **fields: Any) -> None:
        """Issue warning ``code`` (see :mod:`lightning_smd.messages`) unless the same text, or another warning
        with the same ``once`` key, was issued in this run."""
        if once is not None:
            if once in self.keys:
                return
            self.keys.add(once)
        message = render(code, **fields)
        if message in self.issued:
            return
        self.issued.append(message)
        self.emit(message, code)

    def load(self, issued: Sequence[str], keys: Sequence[str]) -> None:
        """Continue from a checkpoint's warnings and ``once`` keys (those warnings are not issued again)."""
        self.issued = list(issued)
        self.keys = set(keys)


def slowest_unit(recorder: StepRecorder, units: Sequence[NormalizedWeight], window: int) -> tuple[float, float, str, str] | None:
    """``(steps to judge it, relaxation time, name, settings)`` of the unit slowest to judge among those whose τ is
    known before training (a known rule, weight decay, a τ that needs no measured ``L``), or None."""
    taus: list[tuple[float, float, str, str]] = []
    for _, optimizer, rule, u, g in recorder.unit_groups():
        if not rule.known:
            continue
        h = group_hyper(rule, optimizer, optimizer.param_groups[g])
        if not h.get("weight_decay", 0.0) > 0.0:
            continue
        tau = rule.relaxation_time(h)
        if math.isfinite(tau) and not rule.unit_dependent(h):  # a unit-dependent τ needs the measured L
            taus.append((judging_steps(rule.norm_time_constant(h), window), tau, units[u].name, rule.describe(h)))
    return max(taus) if taus else None


def setup_warnings(
    recorder: StepRecorder,
    units: Sequence[NormalizedWeight],
    config: DiagnosticsConfig,
    unoptimized: Sequence[str],
    rejected: Mapping[str, str],
    model_name: str,
    planned_steps: int | None,
) -> Iterator[Found]:
    """The fit-start warnings: nothing to track, an unknown optimizer, caveats, no weight decay, a run too short
    to judge the slowest unit (``rejected``: the candidates detection turned down, with why)."""
    if not units:
        if unoptimized:
            return  # SMD005 said why: the normalized weights exist, but no optimizer updates them
        shown = "; ".join(f"{k}: {v}" for k, v in list(rejected.items())[:3])
        yield "SMD001", {"model": model_name, "detail": f" ({shown})" if shown else ""}
        return
    zero_wd: dict[tuple[int, int], list[str]] = {}
    for oi, optimizer, rule, u, g in recorder.unit_groups():
        if rule.known and not group_hyper(rule, optimizer, optimizer.param_groups[g]).get("weight_decay", 0.0) > 0.0:
            zero_wd.setdefault((oi, g), []).append(units[u].name)
    unknown = sorted({type(opt).__name__ for opt, rule, _ in recorder.param_groups() if not rule.known})
    if unknown:
        yield "SMD004", {"optimizers": ", ".join(unknown)}
    caveats = {c for opt, rule, g in recorder.param_groups() if (c := rule.caveat(group_hyper(rule, opt, opt.param_groups[g])))}
    for caveat in sorted(caveats):
        yield "SMD007", {"caveat": caveat}
    for (oi, g), names in zero_wd.items():
        shown = shown_names(names)
        yield "SMD002", {"count": len(names), "names": shown, "group": g, "optimizer": oi}
    slowest = slowest_unit(recorder, units, config.window)
    if slowest is not None and planned_steps is not None:
        needed, tau, name, desc = slowest
        if planned_steps < needed:
            yield "SMD003", {"planned": planned_steps, "name": name, "tau": tau, "settings": desc, "needed": math.ceil(needed), "window": config.window}


def verification_warnings(units: Sequence[NormalizedWeight], eval_norms: Sequence[str]) -> Iterator[Found]:
    """What the numerical check of invariance found: a weight named by ``include=`` that is clearly not invariant,
    BatchNorm left in eval mode (``eval_norms``), a gradient not orthogonal to its weight (eps or another cause)."""
    for u in units:
        if not_scale_invariant(u) is not None:  # named by include=, clearly not invariant: out of the verdict
            yield "SMD015", {"name": u.name, "cos": u.verification, "limit": ORTHOGONALITY_TOLERANCE}
            continue
        if u.verification is not None and u.verification > NOT_ORTHOGONAL_WARNING and u.found_by != "include":
            eps = any(k in u.norm.lower() for k in _EPS_NORMS) and u.verification < 0.1
            if eval_norms and "batch" in u.norm.lower():
                # BatchNorm in eval mode normalizes with its running statistics: not scale-invariant, and that
                # is the cause, not a loss term or a hook
                shown = ", ".join(eval_norms[:3]) + (" ..." if len(eval_norms) > 3 else "")
                yield "SMD016", {"name": u.name, "cos": u.verification, "modules": shown, "limit": ORTHOGONALITY_TOLERANCE}
                continue
            fields = {"name": u.name, "through": u.norm or u.layer, "cos": u.verification, "granularity": u.granularity}
            yield ("SMD010" if eps else "SMD011"), {**fields, "limit": ORTHOGONALITY_TOLERANCE}


def event_warnings(d: Diagnostics, planned_steps: int | None, alerts: Alerts) -> Iterator[Found]:
    """The diagnostics' new events as warnings, each kind once (and SMD026 for a non-finite loss that
    ``alerts`` holds, unless the run diverged)."""
    names = [u.name for u in d.units]
    events = d.take_events()
    diverged = [e for e in events if isinstance(e, Diverged)]
    if diverged:
        step = min(e.step for e in diverged)
        first = [names[e.unit] for e in diverged if e.step == step]
        yield "SMD025", {"once": "diverged", "layers": diverged_layers(first), "step": step}
    loss, alerts.loss_not_finite = alerts.loss_not_finite, None
    if loss is not None and not d.diverged.any():
        yield "SMD026", {"once": "loss_not_finite", "loss": loss, "step": int(d.steps.max(initial=0))}
    vanishing = [e for e in events if isinstance(e, VanishingNoise)]
    if vanishing:
        v = vanishing[0]
        layers = ", ".join(sorted({names[e.unit] for e in vanishing})[:5])
        fell = f"the training loss fell from {d.loss_peak:.3g} to {d.loss_now:.3g}, " if math.isfinite(d.loss_now) else "(training loss not seen) "
        yield "SMD020", {"once": "vanishing", "step": v.step, "layers": layers, "loss": fell, "peak": v.peak, "now": v.now, "ratio": v.ratio}
    dead = [e for e in events if isinstance(e, DeadLayer)]
    if dead:
        e = dead[0]
        layers = ", ".join(sorted({names[x.unit] for x in dead})[:5])
        loss = f"while the training loss stayed at {d.loss_now:.3g} (peak {d.loss_peak:.3g})" if math.isfinite(d.loss_now) else "(training loss not seen)"
        yield "SMD048", {"once": "dead", "step": e.step, "layers": layers, "peak": e.peak, "now": e.now, "loss": loss}
    if d.per_filter:
        counts = d.filters.dead_counts()
        if np.nansum(counts) > 0:
            which = [f"{names[u]} ({int(c)})" for u, c in enumerate(counts.tolist()) if c == c and c > 0]
            yield "SMD049", {"once": "dead_filters", "count": int(np.nansum(counts)), "layers": ", ".join(which[:5]), "step": int(d.steps.max(initial=0))}
    spike = next((e for e in events if isinstance(e, NormSpike)), None)
    if spike is not None:
        yield "SMD021", {"once": "spike", "step": spike.step, "name": names[spike.unit], "ratio": spike.ratio}
    left = next((e for e in events if isinstance(e, LeftPlan)), None)
    if left is not None:
        yield "SMD028", {"once": f"left_plan:{left.optimizer}", "why": left.why}
    yield from forecast_warnings(d)
    yield from fast_start_warnings(d)
    for e in (x for x in events if isinstance(x, Reequilibrating)):
        remaining = None if planned_steps is None else planned_steps - e.step
        if remaining is not None and math.isfinite(e.expected_steps) and e.expected_steps > remaining:
            fields = {"step": e.step, "before": e.before, "after": e.after, "name": names[e.unit]}
            yield "SMD022", {"once": "late_decay", **fields, "expected": e.expected_steps, "remaining": remaining}


def forecast_warnings(d: Diagnostics) -> Iterator[Found]:
    yield from _never_warnings(d)
    f = d.following
    said = _said(d, "SMD037")
    started = f.on_trajectory & (f.start_forecast_made_at >= 0) & (f.start_forecast_equilibrium >= 0) & d.applicable
    late = np.nonzero(started & f.ends_reequilibrating & ~said)[0]
    if late.size:
        names = ", ".join(d.names[u] for u in late[:5].tolist()) + (" ..." if late.size > 5 else "")
        ratio = float(np.nanmin(f.forecast_final_ratio[late]))
        yield "SMD029", {"once": "forecast_late_decay", "layers": names, "ratio": ratio}


def fast_start_warnings(d: Diagnostics) -> Iterator[Found]:
    """SMD035 (once) for the layers that follow a planned schedule whose averaged angular update started above
    ``FAST_START`` × the peak ``Δ*`` and has since come down into the equilibrium band (the start is over: a layer that
    never gets there has the verdict's own warnings). Constant settings keep the figures in the summary, unsaid: a
    start without a warm-up is the common practice there, and the verdict does not depend on it."""
    fast = np.nonzero(d.early.fast(d.applicable & d.following.on_trajectory))[0]
    if not fast.size:
        return
    e = d.early
    worst = int(fast[np.argmax(e.early_ratio[fast])])
    optimizer = int(d.optimizer[worst])
    plan = d.following.plans.get(optimizer)
    group = int(e.early_group[worst])
    if plan is not None and 0 <= group < plan.lr.shape[0]:
        lr, tau = plan.lr[group], float(plan.tau[group, int(np.nanargmax(plan.delta[group]))])
    else:
        lr, tau = None, float(d.tau_ratio[worst])
    names = ", ".join(d.names[u] for u in fast[:5].tolist()) + (" ..." if fast.size > 5 else "")
    yield "SMD035", {
        "once": "fast_start",
        "layers": names,
        "ratio": float(e.early_ratio[worst]),
        "name": d.names[worst],
        "step": int(e.early_ratio_step[worst]),
        "advice": warmup_advice(lr, tau),
    }


def _said(d: Diagnostics, *codes: str) -> np.ndarray:
    """Per unit, whether one of ``codes`` was said before step 1 of its optimizer's plan."""
    optimizers = [o for o, said in d.following.said_at_start.items() if said.intersection(codes)]
    return np.isin(d.optimizer, optimizers)


def _judgeable(d: Diagnostics) -> np.ndarray:
    """Per unit, whether its planned run is long enough for the judgement's settling time (from its first measured
    step to the plan's end, at least twice the shortest judged window of its relaxation time)."""
    out = np.zeros(len(d.names), dtype=bool)
    for u in range(len(d.names)):
        plan = d.following.plans.get(int(d.optimizer[u]))
        first = int(d.changes.first_step[u])
        if plan is not None and first >= 0:
            out[u] = plan.last_step - first + 1 >= 2.0 * window_range(d.config, float(d.tau_ratio[u]))[0]
    return out


def _never_warnings(d: Diagnostics) -> Iterator[Found]:
    """SMD019 for each layer (at most 3) whose fit-start forecast never reaches equilibrium in the planned schedule:
    the steps it needs at the peak settings, the decay that comes first, and the fix."""
    f = d.following
    # a trajectory that enters the band without staying there a relaxation time has no forecast first equilibrium, but
    # the judgement counts the layer once it follows it there, in a run long enough to be judged: not said
    started = f.on_trajectory & (f.start_forecast_made_at >= 0) & d.applicable
    counted = f.start_forecast_touches & _judgeable(d)
    said = _said(d, "SMD036", "SMD037")
    never = np.nonzero(started & (f.start_forecast_equilibrium < 0) & ~counted & ~said)[0]
    for u in never[:3].tolist():
        made, needed_at = int(f.start_forecast_made_at[u]), int(f.constant_equilibrium[u])
        needed = needed_at - made if needed_at >= 0 else None
        decay = int(f.first_decay[u])
        wd = (d.hyper[u] or {}).get("weight_decay", math.nan)
        # the steps there are before the equilibrium starts moving down, or to the end; the relaxation speeds up with ηλ
        plan = f.plans.get(int(d.optimizer[u]))
        end = plan.last_step if plan is not None else made
        available = (decay if decay > made else end) - made
        parts = []
        if needed is not None and available > 0 and math.isfinite(wd) and wd > 0:
            parts.append(f"raise weight_decay to at least {wd * needed / available:.2g}")
        if decay > made and needed_at > decay:
            parts.append(f"move the decay past step {needed_at}")
        if not parts:
            parts.append("train longer at the peak settings, or raise weight_decay")
        fix = "To reach it: " + ", or ".join(parts) + "."
        yield "SMD019", {
            "once": f"forecast:{d.names[u]}",
            "name": d.names[u],
            "needed": f"{needed:,}" if needed is not None else "more",
            "tau": float(f.peak_tau[u]),
            "decay": f"; the equilibrium starts to move down at step {decay}" if decay > made else "",
            "fix": fix,
        }


def end_warnings(d: Diagnostics, config: DiagnosticsConfig, rejected: Mapping[str, str], named: Mapping[str, Any], alerts: Alerts) -> Iterator[Found]:
    """The end-of-run warnings: frozen weights thawed during the run (``rejected`` as frozen, in ``named`` now
    trainable), layers never in equilibrium, off or far off the prediction, caught re-equilibrating."""
    diag = d.diagnoses()
    names = [u.name for u in d.units]
    lo, hi = d.ratio_interval()

    def shown(layers: list[str]) -> str:
        rows = [f"{n} ({d.steady_ratio[u]:.3f} [{lo[u]:.3f}, {hi[u]:.3f}])" for n in layers[:6] for u in [names.index(n)]]
        return ", ".join(rows) + (" ..." if len(layers) > 6 else "")

    thawed = [n for n, why in rejected.items() if why == FROZEN and n in named and named[n].requires_grad]
    if thawed:
        yield "SMD017", {"count": len(thawed), "names": ", ".join(thawed[:5]) + (" ..." if len(thawed) > 5 else "")}
    never = diag.get("never_in_equilibrium", [])
    if never:
        yield "SMD032", {"count": len(never), "layers": ", ".join(never[:8]) + (" ..." if len(never) > 8 else "")}
    off = diag.get("off_prediction", [])
    if off:
        counted = (
            "They do not count as in equilibrium (require_agreement=True)."
            if config.require_agreement
            else "They count as in equilibrium, off the prediction (require_agreement=True makes them fail the gate)."
        )
        causes = off_prediction_causes(d, [names.index(n) for n in off])
        yield "SMD030", {"count": len(off), "tolerance": config.tolerance, "layers": shown(off), "counted": counted, "causes": causes}
    far = diag.get("steady_far_off", [])
    if far:
        yield "SMD031", {"count": len(far), "max_deviation": config.max_deviation, "layers": shown(far)}
    if diag.get("re_equilibrating") and "late_decay" not in alerts.keys:
        yield "SMD033", {"count": len(diag["re_equilibrating"])}


#: SMD036 advises a larger weight decay only up to this many times the one set (beyond: train longer).
MAX_WEIGHT_DECAY_FACTOR = 10.0


def plan_warnings(optimizer: int, plan: Plan, rule: Any, outlooks: Sequence[GroupOutlook], layers: Mapping[int, Sequence[str]], window: int) -> Iterator[Found]:
    """Before step 1, what one optimizer's followed plan allows whatever the gradients (:mod:`~lightning_smd.analysis.preflight`):
    ``SMD036`` for a plan too short to be judged, ``SMD037`` for a step down too late to come back from; once each, for
    the group that falls shortest. ``layers``: the layers of each plan row."""

    def named(o: GroupOutlook) -> str:
        names = list(layers.get(o.group, ()))
        return shown_names(names) if names else f"param group {o.group}"

    def weight_decay(o: GroupOutlook) -> float:
        # the weight decay at which the plan's fastest time constant is the one the fix needs, solved through the rule
        # as `lightning-smd recommend` does (every time constant here scales with 1/(lr·weight_decay): the factor)
        h = plan.hyper_at(o.group, plan.first_step + int(np.nanargmin(plan.tau[o.group])))
        solved = solve_weight_decay(rule, h, o.time_constant / o.weight_decay_factor, "norm_time_constant")
        factor = solved / h["weight_decay"] if math.isfinite(solved) and h.get("weight_decay", 0.0) > 0.0 else o.weight_decay_factor
        return float(plan.weight_decay[o.group, o.peak_index]) * factor

    short = [o for o in outlooks if o.too_short and layers.get(o.group)]
    if short:
        o = max(short, key=lambda x: x.needed / max(x.planned, 1))
        fastest = int(np.nanargmin(plan.tau[o.group]))
        yield (
            "SMD036",
            {
                "once": f"plan_short:{optimizer}",
                "optimizer": optimizer,
                "planned": o.planned,
                "layers": named(o),
                "needed": o.needed,
                "time_constant": o.time_constant,
                "settings": rule.describe(plan.hyper_at(o.group, plan.first_step + fastest)),
                "window": window,
                # a weight decay many times the one set is no advice (a run of a few dozen steps): the run length is
                "weight_decay": (
                    f", or raise weight_decay to about {weight_decay(o):.2g} (×{o.weight_decay_factor:.1f}, which halves the "
                    "run's settling; every relaxation time scales with 1/(lr·weight_decay))"
                    if o.weight_decay_factor <= MAX_WEIGHT_DECAY_FACTOR
                    else ""
                ),
            },
        )
    late = [o for o in outlooks if o.late_decay and not o.too_short and layers.get(o.group)]
    if late:
        o = max(late, key=lambda x: x.reequilibration / max(x.remaining, 1))
        latest = plan.last_step - o.reequilibration
        parts = [f"move that step down to step {latest:,} or earlier"] if latest > plan.first_step else []
        parts.append(f"train {o.reequilibration - o.remaining:,} steps longer after it")
        parts.append(f"raise weight_decay to at least {weight_decay(o):.2g} (×{o.weight_decay_factor:.1f})")
        yield (
            "SMD037",
            {
                "once": f"plan_late:{optimizer}",
                "optimizer": optimizer,
                "drop": o.decay_factor,
                "step": o.decay_step,
                "remaining": o.remaining,
                "needed": o.reequilibration,
                "time_constant": o.tau_after,
                "layers": named(o),
                "fix": "To end in equilibrium: " + ", or ".join(parts) + ".",
            },
        )
