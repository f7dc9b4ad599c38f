"""Which weight decay? The one that puts the relaxation time where it should be for the run.

Every relaxation time of the theory (:meth:`Rule.weight_norm_relaxation_time`: how fast ``‖w‖²`` forgets where it
started and settles at the equilibrium) scales about like ``1/(η·λ)``: [Li] call ``ηλ`` the intrinsic learning rate, and Wang &
Aitchison (ICML 2025) and "Power Lines" (NeurIPS 2025) find that the timescale ``τ_iter = 1/(ηλ)`` — in epochs,
``τ_iter`` over the iterations per epoch — is what transfers across model and data size, and should lie between
about one epoch and the whole run. Given the learning rate and the timescale asked for, :func:`weight_decay_for`
solves the rule's own relaxation time for the weight decay (exactly: the momentum's and Adam's second moment's
corrections included, which the first-order ``1/(2ηλ)`` leaves out), and :func:`recommend` says it for the common
optimizers with what it implies: the steps before the verdict can judge a layer, and how the timescale sits against
an epoch and the run.

Pure Python: nothing here imports torch.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from lightning_smd.analysis.preflight import judging_steps
from lightning_smd.analysis.theory import AdamWRule, LionRule, Rule, SGDRule

__all__ = ["OPTIMIZERS", "Recommendation", "weight_decay_for", "solve_weight_decay", "recommend"]

#: The optimizers :func:`recommend` covers by default: name -> (rule, the param-group settings besides lr and weight
#: decay, as the optimizer's defaults or the usual choice).
OPTIMIZERS: dict[str, tuple[Rule, dict[str, Any]]] = {
    "sgd": (SGDRule(), {"momentum": 0.0}),
    "sgd-momentum": (SGDRule(), {"momentum": 0.9}),
    "nesterov": (SGDRule(), {"momentum": 0.9, "nesterov": True}),
    "adamw": (AdamWRule(), {"betas": (0.9, 0.999)}),
    "lion": (LionRule(), {"betas": (0.9, 0.99)}),
}


def weight_decay_for(rule: Rule, group: Mapping[str, Any], relaxation_time: float) -> float:
    """The weight decay at which ``rule``'s weight-norm relaxation time under the settings of ``group`` (a param-group
    dict: ``lr``, ``momentum``, ``betas``, ...; its ``weight_decay`` is ignored) is ``relaxation_time`` steps.

    The relaxation time falls as the weight decay grows; it is solved by bisection on ``log λ`` to the last bits, so
    ``rule.weight_norm_relaxation_time`` of the result gives ``relaxation_time`` back (to ~1e-12). ``nan`` where the
    rule has no relaxation time of the settings alone (Adam with coupled L2: each layer's depends on its gradient
    statistic) or none that long or short."""
    if rule.unit_dependent(rule.hyper({**group, "weight_decay": 1.0})):
        return math.nan
    return solve_weight_decay(rule, rule.hyper({**group, "weight_decay": 1.0}), relaxation_time)


def solve_weight_decay(rule: Rule, h: Mapping[str, Any], time_constant: float, which: str = "weight_norm_relaxation_time") -> float:
    """The weight decay at which the rule's time constant ``which`` (a method of :class:`Rule` taking the
    hyper-parameters: ``weight_norm_relaxation_time``, or ``norm_time_constant`` — what the judgement's windows
    follow) is ``time_constant`` steps, the other hyper-parameters ``h`` (the rule's, :meth:`Rule.hyper`) held."""
    target = float(time_constant)
    lr = float(h.get("lr", math.nan))
    if not (math.isfinite(target) and target > 0.0 and math.isfinite(lr) and lr > 0.0):
        return math.nan
    method = getattr(rule, which)

    def tau(wd: float) -> float:
        return float(method({**h, "weight_decay": wd}))

    lo = hi = 1.0 / (lr * target)  # the first-order guess, then bracket it
    for _ in range(200):
        t = tau(lo)
        if not math.isfinite(t):
            return math.nan
        if t >= target:
            break
        lo /= 4.0
    else:
        return math.nan
    for _ in range(200):
        t = tau(hi)
        if not math.isfinite(t):  # past the weight decay where the theory holds (e.g. ηλ ≥ 1)
            return math.nan
        if t <= target:
            break
        hi *= 4.0
    else:
        return math.nan
    for _ in range(200):  # geometric bisection: tau(lo) >= target >= tau(hi)
        mid = math.sqrt(lo * hi)
        if not lo < mid < hi:
            break
        t = tau(mid)
        if not math.isfinite(t):
            return math.nan
        if t >= target:
            lo = mid
        else:
            hi = mid
    t_lo, t_hi = tau(lo), tau(hi)
    return lo if abs(t_lo - target) <= abs(t_hi - target) else hi


@dataclass(frozen=True)
class Recommendation:
    """One optimizer's weight decay for the timescale asked, and what it implies."""

    optimizer: str
    settings: str
    """The settings besides the weight decay, as the rule reads them."""
    weight_decay: float
    relaxation_time: float
    """Steps: the rule's relaxation time at that weight decay (what was asked; ``nan`` where there is none)."""
    tau_iter: float
    """``1/(η·λ)`` in steps (Wang & Aitchison's timescale), for comparison."""
    judgeable_after: float
    """Steps of unchanged settings before the verdict can judge a layer (:func:`~lightning_smd.analysis.preflight.judging_steps`
    of the time constant ``Δ/Δ*`` relaxes with: twice the shortest window)."""
    notes: tuple[str, ...] = ()
    """What to look at: the timescale against an epoch and the run, a run too short to be judged."""

    def as_dict(self) -> dict[str, Any]:
        """The row as plain JSON values (``None`` for a figure there is none of)."""

        def num(x: float) -> float | None:
            return float(x) if math.isfinite(x) else None

        return {
            "optimizer": self.optimizer,
            "settings": self.settings,
            "weight_decay": num(self.weight_decay),
            "relaxation_time": num(self.relaxation_time),
            "tau_iter": num(self.tau_iter),
            "judgeable_after": num(self.judgeable_after),
            "notes": list(self.notes),
        }


def recommend(
    lr: float,
    *,
    relaxation_time: float | None = None,
    tau_epochs: float | None = None,
    steps_per_epoch: int | None = None,
    steps: int | None = None,
    optimizers: Sequence[str] | None = None,
    settings: Mapping[str, Mapping[str, Any]] | None = None,
    window: int = 100,
) -> list[Recommendation]:
    """The weight decay that puts each optimizer's relaxation time at ``relaxation_time`` steps, or ``tau_epochs``
    epochs of ``steps_per_epoch`` steps, at learning rate ``lr``.

    ``optimizers``: names of :data:`OPTIMIZERS` (default: all); ``settings``: per name, param-group settings that
    replace the defaults (``{"sgd-momentum": {"momentum": 0.95}}``); ``steps``: the planned run, for the notes;
    ``window``: the callback's ``window`` (the verdict's shortest window in steps)."""
    if (relaxation_time is None) == (tau_epochs is None):
        raise ValueError("give the timescale either in steps (relaxation_time) or in epochs (tau_epochs with steps_per_epoch)")
    if tau_epochs is not None:
        if not steps_per_epoch or steps_per_epoch <= 0:
            raise ValueError("tau_epochs needs steps_per_epoch > 0 (the optimizer steps of one epoch)")
        relaxation_time = float(tau_epochs) * float(steps_per_epoch)
    assert relaxation_time is not None
    if not (math.isfinite(float(relaxation_time)) and float(relaxation_time) > 0.0):
        raise ValueError(f"the timescale must be a positive number of steps, got {relaxation_time!r}")
    if not (math.isfinite(float(lr)) and float(lr) > 0.0):
        raise ValueError(f"lr must be a positive number, got {lr!r}")
    names = list(optimizers) if optimizers else list(OPTIMIZERS)
    unknown = [n for n in names if n not in OPTIMIZERS]
    if unknown:
        raise ValueError(f"unknown optimizer(s) {', '.join(unknown)}: choose from {', '.join(OPTIMIZERS)}")
    out = []
    for name in names:
        rule, defaults = OPTIMIZERS[name]
        group = {**defaults, **dict((settings or {}).get(name, {})), "lr": float(lr)}
        wd = weight_decay_for(rule, group, float(relaxation_time))
        h = rule.hyper({**group, "weight_decay": wd if math.isfinite(wd) else 0.0})
        tau = float(rule.weight_norm_relaxation_time(h)) if math.isfinite(wd) else math.nan
        ratio_tau = float(rule.norm_time_constant(h)) if math.isfinite(wd) else math.nan
        judge = judging_steps(ratio_tau, window) if math.isfinite(ratio_tau) else math.nan
        notes = []
        if not math.isfinite(wd):
            notes.append(_why_none(rule, group, float(relaxation_time)))
        if steps_per_epoch and math.isfinite(tau) and tau < steps_per_epoch:
            notes.append(f"shorter than an epoch ({tau / steps_per_epoch:.2g} epochs): the weights forget faster than the data comes round")
        if steps and math.isfinite(tau):
            if tau > steps:
                notes.append(f"longer than the run ({tau / steps:.2g}x): the layers cannot reach equilibrium")
            elif judge > steps:
                notes.append(f"the verdict needs {judge:.0f} steps of unchanged settings to judge, more than the {steps} planned")
        out.append(
            Recommendation(
                optimizer=name,
                settings=", ".join(part for part in rule.describe(h).split(", ") if not part.startswith("weight_decay=")),
                weight_decay=wd,
                relaxation_time=tau,
                tau_iter=1.0 / (float(lr) * wd) if math.isfinite(wd) and wd > 0 else math.nan,
                judgeable_after=judge,
                notes=tuple(notes),
            )
        )
    return out


def _why_none(rule: Rule, group: Mapping[str, Any], target: float) -> str:
    """Why no weight decay gives ``target`` under ``group``'s other settings (one sentence)."""
    if rule.unit_dependent(rule.hyper({**group, "weight_decay": 1.0})):
        return "no timescale of the settings alone: with coupled L2 each layer's depends on its gradient statistic"
    lr = float(group["lr"])
    shortest = math.nan
    for e in (0.5, 0.1, 0.01):  # the largest lr·weight_decay at which the theory still gives a relaxation time
        shortest = float(rule.weight_norm_relaxation_time(rule.hyper({**group, "weight_decay": e / lr})))
        if math.isfinite(shortest):
            break
    if math.isfinite(shortest) and shortest > target:
        lag = rule.second_moment_lag(rule.hyper({**group, "weight_decay": 1.0}))
        why = f" (its second moment's memory, beta2 = {lag:g}: lower beta2 to go faster)" if lag > 0.0 else ""
        return f"no weight decay relaxes this fast: the shortest relaxation time at these settings is about {shortest:.0f} steps{why}"
    return "no weight decay gives this relaxation time at these settings"
