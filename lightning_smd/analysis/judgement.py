"""The steady-state judgement of every unit, as pure functions, and the state it leaves.

:func:`judge` takes what was measured (:class:`JudgeInputs`, the unit's samples in a
:class:`~lightning_smd.analysis.steady.BlockSeries`) and the criteria, and returns a :class:`Judged`: per unit,
steady or not and why (the flags), the drifts with their standard errors, the steady ratio with its interval, the
agreement and the state. :func:`classify` (steady → far off, off the prediction, counted) and :func:`reached` (the
share of counted units against ``min_fraction``) are the rule that ``lightning-smd check`` re-applies to a summary.

:class:`Judgement` keeps the latest :class:`Judged` per unit (the summary's and the logged figures); :class:`Record`
keeps what the committed judgements, on a fixed grid of steps, add up to: the first equilibrium, the time in it and
the committed state that the next judgement builds on.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, fields
import numpy as np

from lightning_smd.analysis.config import DiagnosticsConfig
from lightning_smd.analysis.fields import Field, PerUnit
from lightning_smd.analysis.states import Agreement, UnitState
from lightning_smd.analysis.steady import MIN_BLOCKS, BlockSeries, WindowFit, drift_within, t_quantile
from lightning_smd.analysis.tracking import window_range

__all__ = ["FLAGS", "JudgeInputs", "Judged", "judge", "classify", "agreement_words", "required", "reached", "Judgement", "Record"]

#: The judgement's flags per unit (the columns of :attr:`Judged.flags`): why a unit is not counted.
FLAGS = ("seen", "applicable", "judged", "vanishing", "settled", "enough", "drifting", "precise", "far", "off", "counted")


@dataclass(frozen=True)
class JudgeInputs:
    """Per unit, what the judgement reads (arrays over all units)."""

    steps: np.ndarray
    """The last measured step."""
    origin: np.ndarray
    """The step before the first sample since the last change (-1: none yet)."""
    tau_ratio: np.ndarray
    norm_power: np.ndarray
    decay: np.ndarray
    predicted: np.ndarray
    applicable: np.ndarray
    vanishing: np.ndarray
    diverged: np.ndarray
    previous: Sequence[str]
    """The committed states."""
    stride: int
    reach: np.ndarray | None = None
    """Under a planned schedule, the units whose trajectory has them in equilibrium now (in the band, or past the
    freeze-out after having been in it): a steady unit outside it is still approaching. ``None``: all."""
    dead: np.ndarray | None = None
    """Units the loss no longer reaches (:mod:`lightning_smd.analysis.dead`). ``None``: none."""


@dataclass
class Judged:
    """One judgement of every unit (see the :mod:`~lightning_smd.analysis.diagnostics` module docstring)."""

    steady: np.ndarray
    counted: np.ndarray
    drift: np.ndarray
    drift_se: np.ndarray
    norm_drift: np.ndarray
    norm_drift_se: np.ndarray
    steady_ratio: np.ndarray
    steady_ratio_se: np.ndarray
    quantile: np.ndarray
    window_steps: np.ndarray
    """The judged window (nan: not settled)."""
    settle_steps: np.ndarray
    flags: np.ndarray
    """``[units, len(FLAGS)]``."""
    direction_ratio: np.ndarray
    kappa: np.ndarray
    radial_share: np.ndarray
    balance_drift: np.ndarray
    agreement: list[Agreement | None]
    state: list[UnitState]
    window: np.ndarray
    """The window whether settled or not (a newly counted unit's equilibrium is dated from its start)."""
    seen: np.ndarray


@dataclass(frozen=True)
class _Windows:
    seen: np.ndarray
    judged: np.ndarray
    finite_tau: np.ndarray
    shortest: np.ndarray
    window: np.ndarray
    settled: np.ndarray
    level: float
    """The two-sided confidence level ``1 − significance/(2N)`` over the ``N`` judged units."""


def _windows(x: JudgeInputs, config: DiagnosticsConfig) -> _Windows:
    """Which units are judged, and over which window: the second half of the samples since the last change (the
    first half is left to the relaxation), once twice the shortest window has passed."""
    tau = x.tau_ratio
    seen = x.origin >= 0
    finite_tau = np.isfinite(tau) & (tau > 0)
    judged = seen & x.applicable & (x.predicted > 0) & finite_tau
    n_judged = max(int(judged.sum()), 1)
    w_min, w_max = window_range(config, tau)
    since = (x.steps - x.origin).astype(np.float64)
    window = np.clip(since / 2.0, w_min, w_max)
    settled = since >= 2.0 * w_min
    level = 1.0 - config.significance / (2.0 * n_judged)
    return _Windows(seen, judged, finite_tau, w_min, window, settled, level)


def _quantiles(fit: WindowFit, level: float) -> np.ndarray:
    """The Student quantile at ``level`` for each unit's degrees of freedom (nan where there are none)."""
    quantiles = {d: t_quantile(level, d) for d in set(fit.df[np.isfinite(fit.df)].tolist())}
    return np.array([quantiles.get(d, math.nan) for d in fit.df.tolist()])


def _drifts(fit: WindowFit, tau: np.ndarray, norm_power: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``Δ/Δ*``'s drift per relaxation time and the one ``‖w‖/‖w*‖`` implies, with their standard errors."""
    with np.errstate(divide="ignore", invalid="ignore"):
        d_x = tau * fit.slope_x / fit.mean_x
        se_x = tau * fit.se_slope_x / np.abs(fit.mean_x)
        d_w = tau * 0.5 * norm_power * fit.slope_y
        se_w = tau * 0.5 * norm_power * fit.se_slope_y
    return d_x, se_x, d_w, se_w


def classify(
    steady: np.ndarray, lo: np.ndarray, hi: np.ndarray, tolerance: float, max_deviation: float, require_agreement: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(far, off, counted)`` of steady units whose steady ratio's interval is ``[lo, hi]`` (nan: none): *far off*
    when it lies entirely outside ``1 ± max_deviation``, *off the prediction* when (not far and) outside
    ``1 ± tolerance``; counted when steady, not far off, and not off with ``require_agreement``. The rule of the run
    and of ``lightning-smd check`` (which may re-judge with bands a run would not accept, e.g. one above 1)."""
    with np.errstate(invalid="ignore"):
        far = steady & ((hi < 1.0 - max_deviation) | (lo > 1.0 + max_deviation))
        off = steady & ~far & ((hi < 1.0 - tolerance) | (lo > 1.0 + tolerance))
    counted = steady & ~far & ~(off & require_agreement)
    return far, off, counted


def agreement_words(steady: np.ndarray, far: np.ndarray, off: np.ndarray) -> list[Agreement | None]:
    """Each steady unit's :class:`Agreement` (None where not steady)."""
    words = (Agreement.FAR_OFF if f else Agreement.OFF_PREDICTION if o else Agreement.AGREES for f, o in zip(far.tolist(), off.tolist()))
    return [word if s else None for word, s in zip(words, steady.tolist())]


def required(n_applicable: int, min_fraction: float) -> int:
    """How many of ``n_applicable`` units must be counted for the verdict equilibrium: ``min_fraction`` of them,
    rounded up (9 of 10 at 0.9; the 1e-9 absorbs ``min_fraction·n`` landing a rounding error above an integer)."""
    return math.ceil(min_fraction * n_applicable - 1e-9)


def reached(n_counted: int, n_applicable: int, min_fraction: float) -> bool:
    """The run-level rule: at least :func:`required` units counted (``n_applicable > 0``)."""
    return n_counted >= required(n_applicable, min_fraction)


def _states(x: JudgeInputs, w: _Windows, vanishing: np.ndarray, far: np.ndarray, off: np.ndarray, counted: np.ndarray) -> list[UnitState]:
    """Each unit's state: the first that applies of diverged, (not seen: unchanged), no prediction, no equilibrium,
    vanishing noise, dead, equilibrium, far off, off the prediction, (re-equilibrating or departed: unchanged), departed
    (was in equilibrium), approaching."""
    previous = np.array(x.previous, dtype=object)
    state = np.select(
        [
            x.diverged, ~w.seen, ~x.applicable, ~w.judged, vanishing, x.dead if x.dead is not None else np.zeros(len(vanishing), bool),
            counted, far, off,
            (previous == UnitState.REEQUILIBRATING) | (previous == UnitState.DEPARTED), previous == UnitState.EQUILIBRIUM,
        ],
        [
            UnitState.DIVERGED, previous, UnitState.NO_PREDICTION, UnitState.NO_EQUILIBRIUM, UnitState.VANISHING_NOISE,
            UnitState.DEAD, UnitState.EQUILIBRIUM, UnitState.STEADY_FAR_OFF, UnitState.OFF_PREDICTION, previous, UnitState.DEPARTED,
        ],
        default=UnitState.APPROACHING,
    )  # fmt: skip
    return [UnitState(s) for s in state.tolist()]


def judge(x: JudgeInputs, series: BlockSeries, config: DiagnosticsConfig) -> Judged:
    """Judge every unit as of its last measured step (see the :mod:`~lightning_smd.analysis.diagnostics` module
    docstring). Reads ``series``, changes nothing."""
    w = _windows(x, config)
    tau = x.tau_ratio
    fit = series.fit(np.arange(len(tau)), w.window, 1.0 + 2.0 * np.where(w.finite_tau, tau, 0.0) / x.stride)
    q = _quantiles(fit, w.level)
    d_x, se_x, d_w, se_w = _drifts(fit, tau, x.norm_power)
    within_x, precise_x = drift_within(d_x, se_x, q, config.drift)
    within_w, precise_w = drift_within(d_w, se_w, q, config.drift)
    precise = precise_x & precise_w
    with np.errstate(invalid="ignore"):
        # beyond the limit by the point estimate: drifting, even where the window is too noisy to be sure (a
        # relaxation's curvature reads as correlated noise); undetermined: within it, but not precisely enough
        drifting = (np.abs(d_x) > config.drift) | (np.abs(d_w) > config.drift)
    enough = fit.blocks >= MIN_BLOCKS
    vanishing = x.vanishing
    steady = w.judged & w.settled & enough & within_x & within_w & ~vanishing & ~x.diverged
    lo, hi = fit.mean_x - q * fit.se_mean_x, fit.mean_x + q * fit.se_mean_x
    far, off, counted = classify(steady, lo, hi, config.tolerance, config.max_deviation, config.require_agreement)
    if x.reach is not None:
        counted = counted & x.reach
    mean, se_mean = fit.mean_x, fit.se_mean_x
    if x.diverged.any():  # the window's finite samples predate the divergence: they describe nothing now
        d_x, se_x, d_w, se_w, mean, se_mean = (np.where(x.diverged, np.nan, v) for v in (d_x, se_x, d_w, se_w, mean, se_mean))
    balance = update_balance(fit, w.settled, x.decay)
    return Judged(
        steady=steady, counted=counted, drift=d_x, drift_se=se_x, norm_drift=d_w, norm_drift_se=se_w,
        steady_ratio=mean, steady_ratio_se=se_mean, quantile=q,
        window_steps=np.where(w.settled, w.window, np.nan), settle_steps=np.where(w.finite_tau, 2.0 * w.shortest, np.nan),
        flags=np.stack([w.seen, x.applicable, w.judged, vanishing, w.settled, enough, drifting, precise, far, off, counted], axis=1),
        direction_ratio=balance[0], kappa=balance[1], radial_share=balance[2], balance_drift=balance[3],
        agreement=agreement_words(steady, far, off), state=_states(x, w, vanishing, far, off, counted), window=w.window, seen=w.seen,
    )  # fmt: skip


def update_balance(fit: WindowFit, settled: np.ndarray, e: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(direction_ratio, kappa, radial_share, balance_drift)``: where the closed form's error comes from, the
    direction of the update or the norm's drift (decoupled decay ``e`` only; settled units only; nan elsewhere).

    The step is ``δw = −e·w − ηu``. With the norm stationary, ``E‖w_{t+1}‖² = E‖w_t‖²`` gives exactly
    ``(2e − e²)·‖w‖² = ‖ηu‖²·(1 + (1 − e)·κ)``, ``κ = −2⟨w, ηu⟩/‖ηu‖²``, and the angle sees only the tangential
    part of the update, a share ``1 − ρ`` of it with ``ρ = ⟨ŵ, ηu⟩²/‖ηu‖²``:
    ``Δ_c² = (2e − e²)(1 − ρ)/(1 + (1 − e)κ)``. The closed form is this with the ``κ`` and ``ρ`` of isotropic
    white noise (momentum alone makes ``κ = 2β1/(1 − β1(1 − e))`` ≈ 17.4 for β1 = 0.9, whatever the gradients'
    correlation in time: ``theory.momentum_inward_pull``); Adam's per-coordinate scaling moves ``κ`` (a thin
    first layer: ``κ`` grows, and the layer settles below the closed form). ``Δ_c`` is
    the RMS angle; times the window's ``mean Δ / RMS Δ`` it is the mean angle the ratio measures.

    This is an accounting identity, not an independent prediction: ``(1 − ρ)‖ηu‖²`` is the measured tangential
    step, so ``Δ_c`` restates the measured angle up to the norm's drift — a relative drift ``δ`` of ``‖w‖²`` per
    step moves ``Δ_c²`` by ``δ/(2e)`` (``balance_drift``). Its use is the attribution: ``direction_ratio =
    Δ_c/Δ*`` is the part of ``Δ/Δ*`` due to the update's direction (``κ``, ``ρ``: gradient statistics beyond
    white noise), ``balance_drift`` the part due to a norm not yet stationary."""
    none = np.full(len(settled), np.nan)
    if fit.mean_extra is None:
        return none, none.copy(), none.copy(), none.copy()
    wu, wu2, uu, d2, growth = fit.mean_extra.T
    with np.errstate(divide="ignore", invalid="ignore"):
        kappa, rho = -2.0 * wu / uu, wu2 / uu
        rms = np.sqrt((2.0 * e - e * e) * (1.0 - rho) / (1.0 + (1.0 - e) * kappa))
        # Δ_c·(mean Δ / RMS Δ)/Δ* with mean Δ = mean_x·Δ*: Δ* cancels
        direction = fit.mean_x * rms / np.sqrt(d2)
        ok = settled & np.isfinite(e) & (e > 0) & (uu > 0) & np.isfinite(direction)
    with np.errstate(divide="ignore", invalid="ignore"):
        drift = np.where(ok, growth / (2.0 * e), np.nan)
    return np.where(ok, direction, np.nan), np.where(ok, kappa, np.nan), np.where(ok, rho, np.nan), drift


class Judgement(PerUnit):
    """The latest :class:`Judged` of every unit (the view of the present: logged, summarized)."""

    FIELDS = (
        Field("steady", bool, False),
        Field("counted", bool, False),
        Field("drift", float),
        Field("drift_se", float),
        Field("norm_drift", float),
        Field("norm_drift_se", float),
        Field("steady_ratio", float),
        Field("steady_ratio_se", float),
        Field("quantile", float),
        Field("window_steps", float),
        Field("settle_steps", float),
        Field("flags", bool, False, width=len(FLAGS), key="_flags"),
        Field("direction_ratio", float),
        Field("kappa", float),
        Field("radial_share", float),
        Field("balance_drift", float),
        Field("state", object, UnitState.APPROACHING, kind=UnitState),
        Field("agreement", object, None, kind=Agreement),
    )

    def set(self, judged: Judged) -> None:
        """Keep ``judged`` as the latest judgement."""
        for f in self.FIELDS:
            setattr(self, f.name, getattr(judged, f.name))

    def flag(self, u: int) -> dict[str, bool]:
        """Unit ``u``'s flags by name."""
        return dict(zip(FLAGS, self.flags[u].tolist()))

    def ratio_interval(self) -> tuple[np.ndarray, np.ndarray]:
        """The confidence interval of each unit's steady ratio (level ``1 − significance/N``)."""
        half = self.quantile * self.steady_ratio_se
        return self.steady_ratio - half, self.steady_ratio + half


class Record(PerUnit):
    """What the committed judgements add up to (on a fixed grid of steps, so that it does not depend on when the
    recorder is drained): the first equilibrium, the steps in equilibrium, and the committed state."""

    FIELDS = (
        Field("judged_step", int, -1),
        Field("first_equilibrium", int, -1),
        Field("steps_in_equilibrium", int, 0),
        Field("was_counted", bool, False, key="_was_counted"),
        Field("committed_ratio", float, key="_committed_ratio"),  # the steady ratio then (nan: not steady)
        Field("committed_state", object, UnitState.APPROACHING, key="_state", kind=UnitState),
    )

    def commit(self, judged: Judged, steps: np.ndarray) -> None:
        """Add the judgement of the units at ``steps``: the time in equilibrium since the previous committed one, a first
        equilibrium dated from the start of its window, the state the next judgement builds on."""
        counted = judged.counted
        self.steps_in_equilibrium += np.where(counted & self.was_counted & (self.judged_step >= 0), steps - self.judged_step, 0)
        newly = counted & (self.first_equilibrium < 0)
        start = steps - judged.window.astype(np.int64) + 1
        self.first_equilibrium[newly] = np.maximum(start[newly], 1)
        self.judged_step = np.where(judged.seen, steps, self.judged_step)
        self.was_counted = counted.copy()
        self.committed_ratio = np.where(judged.steady, judged.steady_ratio, np.nan)
        self.committed_state = list(judged.state)


_JUDGED = {f.name for f in fields(Judged)}
assert {f.name for f in Judgement.FIELDS} <= _JUDGED, "every field of Judgement is a field of Judged"
