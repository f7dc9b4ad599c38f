"""The prediction in force and its changes.

:class:`Predictor` asks the optimizer's :class:`~lightning_smd.analysis.theory.Rule` for Δ*, the time constants and
the equilibrium scale of a set of hyper-parameters (memoized: a run has few distinct settings); :func:`unit_factors`
scales them to each unit where the rule makes them unit-dependent (Adam with coupled L2).

:class:`Changes` follows each unit's prediction: one that moves by more than the tolerance (a schedule, a decay
step) is a change — the unit's samples restart, and a unit that had reached equilibrium starts to re-equilibrate
(:class:`~lightning_smd.analysis.events.Reequilibrating`); :meth:`Changes.band` then times the re-equilibration (the
smoothed ratio back in the band around its level before the change for a window).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from lightning_smd.analysis.config import WINDOW_RELAXATION_TIMES, DiagnosticsConfig
from lightning_smd.analysis.events import Reequilibrating
from lightning_smd.analysis.fields import Field, PerUnit, num
from lightning_smd.analysis.states import UnitState
from lightning_smd.analysis.steady import BLOCKS_PER_WINDOW, BlockSeries
from lightning_smd.analysis.theory import Rule

__all__ = ["Prediction", "Predictor", "unit_factors", "window_range", "UnitsBefore", "Changes"]

#: Committed states in which a moved prediction is a re-equilibration even before the settling time has passed.
_REACHED = (UnitState.EQUILIBRIUM, UnitState.REEQUILIBRATING, UnitState.DEPARTED, UnitState.OFF_PREDICTION)
#: Committed states in which a re-entry into the band times the re-equilibration in progress.
_TIMED = (UnitState.REEQUILIBRATING, UnitState.EQUILIBRIUM)


@dataclass(frozen=True)
class Prediction:
    """What the theory says for one set of hyper-parameters (of a unit with ``L = numel = 1`` when
    :attr:`unit_dependent`)."""

    delta: float
    """Δ* (rad/step)."""
    tau: float
    """The rule's relaxation time (reported)."""
    reason: str | None
    """Why there is no prediction (or no equilibrium), or None."""
    tau_ratio: float
    """Time constant of the relaxation of Δ/Δ* (the norm variable's)."""
    power: float
    """``Δ/Δ* = sqrt(q*/q)`` with ``q = ‖w‖^power``."""
    scale: float
    """``∝ q*`` at fixed gradient statistics (a change of it is a change of the equilibrium norm)."""
    grad_exponent: float
    """``‖w*‖ ∝ L^grad_exponent``."""
    unit_dependent: bool
    """Δ* and the time constants are scaled per unit by :meth:`Rule.unit_factors` (Adam with coupled L2)."""
    decay: float
    """``e`` of a decoupled weight decay (``nan`` when the decay is not separate from the update)."""


class Predictor:
    """:meth:`predict`, memoized by rule and settings (at most 4096 entries kept)."""

    LIMIT = 4096

    def __init__(self) -> None:
        self._memo: dict[tuple[Any, ...], Prediction] = {}

    def predict(self, rule: Rule, h: dict[str, float]) -> Prediction:
        key = (rule, tuple(sorted(h.items())))
        hit = self._memo.get(key)
        if hit is None:
            power, grad_exponent = rule.norm_exponents(h)
            hit = Prediction(
                rule.angular_update(h),
                rule.relaxation_time(h),
                rule.reason(h),
                rule.norm_time_constant(h),
                power,
                rule.equilibrium_scale(h),
                grad_exponent,
                rule.unit_dependent(h),
                rule.decoupled_decay(h),
            )
            if len(self._memo) > self.LIMIT:
                self._memo.clear()
            self._memo[key] = hit
        return hit


def unit_factors(
    rule: Rule, preds: Sequence[Prediction], hyper: Sequence[dict[str, float]], unit_group: np.ndarray, L: np.ndarray, numel: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Per-unit multipliers of Δ* and of the time constants: 1 but where a group's rule is unit-dependent, there from
    each unit's smoothed ``L`` and size (nan without an ``L`` yet: no prediction for this step)."""
    f_delta, f_tau = np.ones(len(unit_group)), np.ones(len(unit_group))
    if not any(p.unit_dependent for p in preds):
        return f_delta, f_tau
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        for g, p in enumerate(preds):
            if p.unit_dependent:
                m = unit_group == g
                f_delta[m], f_tau[m] = rule.unit_factors(hyper[g], L[m], numel[m])
    bad = ~(np.isfinite(f_delta) & (f_delta > 0))
    f_delta[bad], f_tau[bad] = np.nan, np.nan
    return f_delta, f_tau


def window_range(config: DiagnosticsConfig, tau_ratio: float | np.ndarray) -> tuple[Any, Any]:
    """The shortest and the longest judged window (steps) for a ratio relaxation time (floats for a float, arrays for
    an array)."""
    tau = np.where(np.isfinite(tau_ratio) & (np.asarray(tau_ratio) > 0), tau_ratio, 0.0)
    shortest = np.maximum(float(config.window), WINDOW_RELAXATION_TIMES[0] * tau)
    longest = np.maximum(4.0 * config.window, WINDOW_RELAXATION_TIMES[1] * tau)
    return (float(shortest), float(longest)) if np.ndim(tau) == 0 else (shortest, longest)


@dataclass(frozen=True)
class UnitsBefore:
    """What :meth:`Changes.track` needs of the units' standing before a step."""

    tau_ratio: np.ndarray
    """The ratio's relaxation time under the former settings."""
    state: Sequence[str]
    """The committed states."""
    ratio: np.ndarray
    """The steady ratio at the last committed judgement (nan: not steady then)."""
    first_equilibrium: np.ndarray


class Changes(PerUnit):
    """Each unit's reference prediction, the start of its samples since the last change, and its re-equilibrations."""

    FIELDS = (
        Field("origin", int, -1),
        Field("first_step", int, -1, added=True),
        Field("ref_pred", float),
        Field("ref_scale", float),
        Field("ref_hyper", object, None),
        Field("change_step", int, -1),
        Field("expected_reequilibration", float),
        Field("reequilibrations", object, list),
        Field("ref_level", float, 1.0),
        Field("band_run", int, 0),
        Field("timing", bool, False, key="_timing"),
        Field("last_change", int, -1, added=True),
    )
    # origin: the step before the first sample since the last change (or the start), -1 before any sample;
    # first_step: the first measured step (after a resume without the callback's state: the Trainer's step then);
    # ref_level, band_run, timing: the band around the level before a change whose re-entry times the re-equilibration;
    # last_change: the step before the first one under the settings in force, where a change did not restart the
    # samples (a followed plan's step change), else -1 (the origin says it).

    def __init__(self, n: int, config: DiagnosticsConfig, stride: int) -> None:
        super().__init__(n)
        self.config = config
        self.stride = stride

    @property
    def window_samples(self) -> int:
        """``window`` in samples (the band re-entry that times a re-equilibration must last this long)."""
        return -(-self.config.window // self.stride)

    def track(
        self,
        idx: np.ndarray,
        pred: np.ndarray,
        scale: np.ndarray,
        f_tau: np.ndarray,
        preds: Sequence[Prediction],
        batch: Any,
        hyper: Sequence[dict[str, float]],
        step: int,
        before: UnitsBefore,
        series: BlockSeries,
        restart: bool = True,
    ) -> list[Reequilibrating]:
        """Compare this step's predictions with the references; a prediction (Δ* or the equilibrium norm) that moved
        by more than the tolerance is a change: the unit's samples (``series``) restart, and a unit that had reached
        equilibrium starts to re-equilibrate (returned as events; the caller sets their state).

        ``pred``, ``scale``: the settings' Δ* (before any per-unit factor: a unit's own gradient statistics drifting
        is not a change of settings) and equilibrium scale of the units ``idx``; ``f_tau`` scales the time constants
        to each unit; ``before``: the units' standing before this step. ``restart=False`` (a change the planned
        trajectory already foresees): a change is timed as a re-equilibration, but the samples go on."""
        tol = self.config.tolerance
        ref, ref_scale = self.ref_pred[idx], self.ref_scale[idx]
        unset = self.origin[idx] < 0
        with np.errstate(divide="ignore", invalid="ignore"):
            moved_delta = np.abs(pred / ref - 1.0) > tol
            moved_scale = np.abs(np.sqrt(scale / ref_scale) - 1.0) > tol
            # a prediction appearing or vanishing (nan <-> number, 0 <-> positive) is a change too
            appeared = np.isfinite(pred) != np.isfinite(ref)
        moved = ~unset & (moved_delta | moved_scale | appeared)
        events = []
        for j in np.nonzero(unset | moved)[0]:
            u, g = int(idx[j]), int(batch.unit_group[j])
            # a change after the unit had its settling time under the former settings (not one step of a warm-up) is
            # a re-equilibration
            settled = step - self.origin[u] >= 2.0 * window_range(self.config, before.tau_ratio[u])[0]
            if moved[j] and (settled or before.state[u] in _REACHED or before.first_equilibrium[u] >= 0):
                old = self.ref_hyper[u]
                expected = batch.rule.reequilibration_time(old, hyper[g], tol) * float(f_tau[j]) if old is not None else math.nan
                events.append(self._changed(u, step, expected, float(before.ratio[u]), float(ref[j]), float(pred[j])))
            if unset[j] and self.first_step[u] < 0:
                self.first_step[u] = step
            self.ref_pred[u], self.ref_scale[u], self.ref_hyper[u] = pred[j], scale[j], hyper[g]
            if not (restart or unset[j]):
                self.last_change[u] = step - self.stride
                continue
            self.origin[u] = step - self.stride
            shortest, longest = window_range(self.config, preds[g].tau_ratio * float(f_tau[j]))
            block = max(1, int(shortest // (BLOCKS_PER_WINDOW * self.stride)))  # the shortest window holds 16 blocks
            series.reset(np.array([u]), np.array([block]), float(step - self.stride), longest)
        return events

    def _changed(self, u: int, step: int, expected: float, committed_ratio: float, before: float, after: float) -> Reequilibrating:
        """Start timing a re-equilibration of ``u`` from ``step``: back in the band around its steady ratio (or 1)."""
        self.change_step[u] = step
        self.expected_reequilibration[u] = expected
        self.ref_level[u] = committed_ratio if np.isfinite(committed_ratio) else 1.0
        self.band_run[u] = 0
        self.timing[u] = True
        self.reequilibrations[u].append({"step": step, "from": num(before), "to": num(after), "expected_steps": num(expected), "observed_steps": None})
        return Reequilibrating(u, step, float(expected), before, after)

    def band(self, idx: np.ndarray, smoothed: np.ndarray, step: int, committed: Sequence[str]) -> None:
        """Times a re-equilibration: the smoothed ratio back within ``tolerance`` of its level before the change
        (its steady ratio, or 1), for ``window`` steps. ``committed``: the per-unit committed states."""
        tol = self.config.tolerance
        with np.errstate(divide="ignore", invalid="ignore"):
            in_band = np.abs(smoothed / self.ref_level[idx] - 1.0) <= tol  # nan compares False
        self.band_run[idx] = np.where(in_band, self.band_run[idx] + 1, 0)
        done = (self.band_run[idx] >= self.window_samples) & self.timing[idx]
        for j in np.nonzero(done)[0]:
            u = int(idx[j])
            self.timing[u] = False
            # (under a followed plan the judgement may count the unit again before the band has timed it: back it is)
            if committed[u] not in _TIMED or not self.reequilibrations[u] or self.reequilibrations[u][-1]["observed_steps"] is not None:
                continue
            change = int(self.change_step[u])
            band_start = step - (int(self.band_run[u]) - 1) * self.stride
            if band_start > change:  # left the band after the change and came back for a window
                self.reequilibrations[u][-1]["observed_steps"] = band_start - change
            elif step - change + 1 >= self.config.window:  # stayed in band through the change
                self.reequilibrations[u][-1]["observed_steps"] = 0

    def since_change(self, u: int, last_step: int) -> int | None:
        """Steps from the last change of settings (or the first measured step) to ``last_step`` (None: no sample yet)."""
        if self.origin[u] < 0:
            return None
        return int(last_step - max(self.origin[u], self.last_change[u]))

    def measured_steps(self, u: int, last_step: int) -> int:
        """Steps from the first measured one to ``last_step`` (the Trainer's steps before a resume are not counted)."""
        return int(last_step - self.first_step[u] + self.stride) if self.first_step[u] >= 0 else 0
