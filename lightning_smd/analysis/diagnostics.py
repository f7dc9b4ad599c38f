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
4. its gradient noise has not vanished (:meth:`Diagnostics._vanishing`).

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
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from enum import Enum
from typing import Any

import numpy as np

from lightning_smd.analysis.batch import StepBatch
from lightning_smd.analysis.units import NormalizedWeight, not_scale_invariant
from lightning_smd.analysis.steady import BLOCKS_PER_WINDOW, MIN_BLOCKS, BlockSeries, drift_within, t_quantile
from lightning_smd.analysis.theory import Rule, UnknownRule, registered_rules, time_to_band

__all__ = [
    "DiagnosticsConfig",
    "Diagnostics",
    "Verdict",
    "VanishingNoise",
    "NormSpike",
    "Reequilibrating",
    "Diverged",
    "Event",
    "STATES",
    "SCHEMA_VERSION",
    "diffusion_exponent",
]


class Verdict(str, Enum):
    """The run's verdict. A ``str``: it compares equal to, formats as and is written to JSON as its value."""

    EQUILIBRIUM = "equilibrium"
    NOT_REACHED = "not_reached"
    NOT_APPLICABLE = "not_applicable"
    DIVERGED = "diverged"

    def __str__(self) -> str:
        return self.value

    __format__ = str.__format__


@dataclass(frozen=True)
class VanishingNoise:
    """The gradient statistic ``L`` of ``unit`` collapsed from ``peak`` to ``now`` while its smoothed ratio
    fell to ``ratio``."""

    unit: int
    step: int
    peak: float
    now: float
    ratio: float


@dataclass(frozen=True)
class NormSpike:
    """``unit``'s angular update jumped to ``ratio`` times the prediction after it had been in equilibrium."""

    unit: int
    step: int
    ratio: float


@dataclass(frozen=True)
class Reequilibrating:
    """The prediction of ``unit`` moved from ``before`` to ``after`` at ``step`` (a schedule or a decay); it
    is expected to need ``expected_steps`` to reach the new equilibrium."""

    unit: int
    step: int
    expected_steps: float
    before: float
    after: float


@dataclass(frozen=True)
class Diverged:
    """The weights of ``unit`` became non-finite (NaN or inf) at optimizer step ``step``."""

    unit: int
    step: int
    value: float
    """``‖w‖²`` at that step: nan or inf."""


Event = VanishingNoise | NormSpike | Reequilibrating | Diverged
STATES = (
    "approaching",  # not yet steady since the start
    "equilibrium",  # steady and counted (agrees, or off the prediction without require_agreement)
    "off_prediction",  # steady but off the prediction, with require_agreement: not counted
    "steady_far_off",  # steady, but further from the prediction than max_deviation: another regime
    "re-equilibrating",  # the hyper-parameters changed after an equilibrium; not yet steady again
    "departed",  # was in equilibrium, drifts now without a change of the hyper-parameters
    "vanishing_noise",  # the gradient noise vanished: no equilibrium
    "no_equilibrium",  # no weight decay (or no learning rate): the theory has no equilibrium
    "no_prediction",  # unknown optimizer (or no theory for these settings): measured, not judged
    "diverged",  # the weights became non-finite (NaN or inf): training diverged; nothing more is measured
)
#: Version of the summary's layout (2: steady state judged statistically, agreement as its own figure).
SCHEMA_VERSION = 2
#: The judged window is the second half of the samples since the last change of the hyper-parameters, and spans
#: this many relaxation times at least / at most (and ``window`` / ``4·window`` steps): a unit is judged once
#: twice the shortest window has passed since the change.
WINDOW_RELAXATION_TIMES = (2.0, 16.0)

_INVALID = re.compile(r"[^A-Za-z0-9_.\- ]")
#: The judgement's flags per unit (columns of ``Diagnostics._flags``).
_FLAGS = ("seen", "applicable", "judged", "vanishing", "settled", "enough", "drifting", "precise", "far", "off", "counted")

LAYER_METRICS = (
    "angular_update",
    "predicted_angular_update",
    "smoothed_predicted_angular_update",
    "angular_update_ratio",
    "weight_norm",
    "predicted_weight_norm",
    "in_equilibrium",
    "effective_lr",
    "steady_ratio",
    "steady_ratio_low",
    "steady_ratio_high",
    "drift",
)


def metric_name(unit_name: str) -> str:
    """The unit's name as it appears in metric keys: characters MLflow (the strictest logger) rejects become
    ``_`` — a weight+bias unit ``net.conv.weight+bias`` is logged as ``smd/net.conv.weight_bias/...``."""
    return _INVALID.sub("_", unit_name)


def layer_metric_keys(unit_name: str, prefix: str = "smd/") -> dict[str, str]:
    base = f"{prefix}{metric_name(unit_name)}/"
    return {m: base + m for m in LAYER_METRICS}


@dataclass(frozen=True)
class DiagnosticsConfig:
    """Criteria of the equilibrium verdict (all documented in the README)."""

    tolerance: float = 0.1
    """Agreement: a steady unit is *off the prediction* when the confidence interval of its steady ``Δ/Δ*`` lies
    entirely outside ``1 ± tolerance``. Also: a prediction that moves by more than this is a change."""
    window: int = 100
    """The judged window spans at least this many steps (and at least 2 relaxation times), at most 4× as many
    (or 16 relaxation times)."""
    ema_steps: int = 50
    """Time constant (steps) of the exponential moving averages of Δ, Δ/Δ* and L (the logged, smoothed
    figures)."""
    min_fraction: float = 0.9
    """Share of units (with a prediction) that must be in equilibrium at the end for the run verdict."""
    require_agreement: bool = False
    """Count a steady unit that is off the prediction as *not* in equilibrium (the strict gate)."""
    max_deviation: float = 0.3
    """A steady unit whose interval lies entirely outside ``1 ± max_deviation`` is in another regime than SMD's
    equilibrium (BatchNorm's eps dominating a collapsed norm, a memorized data set, an update with a large radial
    part) and is never counted."""
    drift_limit: float | None = None
    """A unit drifts when ``Δ/Δ*`` (or the ``Δ/Δ*`` that ``‖w‖/‖w*‖`` implies) changes by more than this
    share per relaxation time (``None``: ``tolerance``). A unit still relaxing with a deviation ε drifts by
    about ε per relaxation time."""
    significance: float = 0.01
    """Run-level false-alarm rate of the drift test on steady units (Bonferroni: ``significance / N`` per unit
    and two-sided); also the level of the steady ratio's confidence interval (``1 − significance / N``)."""
    spike_factor: float = 5.0
    """A step whose angular update exceeds ``spike_factor·Δ*`` in a layer that had reached equilibrium is a
    norm spike."""
    vanishing_factor: float = 20.0
    """Vanishing gradient noise: the smoothed ``L`` fell below its peak divided by this, while the smoothed
    ratio is below ``1 − 2·tolerance``, after the unit's settling time since the last change — and the training
    loss, when it is known (:meth:`Diagnostics.observe_loss`), fell below its peak divided by ``loss_factor``."""
    loss_factor: float = 10.0
    """See ``vanishing_factor``: what "the loss approaches zero" means, relative to its early level."""
    vanishing_factor_without_loss: float = 100.0
    """Without the training loss, ``L`` must fall by this much: learning alone lowers ``L`` by up to ~20× in
    healthy runs, a memorized data set collapses it by 10³–10⁶×."""

    def __post_init__(self) -> None:
        """Every field checked (:mod:`lightning_smd.options`): a ``ValueError`` names the option, the value and the
        values accepted; a bool is not a number, a non-finite float is out of every range. Numbers are stored as
        plain ``int``/``float`` (the summary's ``criteria`` is written as JSON)."""
        from lightning_smd.options import OptionError, check_bool, check_int, check_number

        checked: dict[str, Any] = {
            "tolerance": check_number("tolerance", self.tolerance, 0.0, 1.0, hint=" (a fraction: 0.1 means 10 %)"),
            "window": check_int("window", self.window, 1, hint=" (steps)"),
            "ema_steps": check_int("ema_steps", self.ema_steps, 1, hint=" (steps)"),
            "min_fraction": check_number(
                "min_fraction", self.min_fraction, 0.0, 1.0, high_open=False, hint=" (a share of the layers: 0.9 means 90 %; 0 would pass any run)"
            ),
            "require_agreement": check_bool("require_agreement", self.require_agreement),
            "max_deviation": check_number("max_deviation", self.max_deviation, 0.0, 1.0, high_open=False, hint=" (a fraction: 0.3 means 30 %)"),
            "drift_limit": check_number(
                "drift_limit",
                self.drift_limit,
                0.0,
                1.0,
                high_open=False,
                allow_none=True,
                hint=" (a fraction per relaxation time: 0.1 means 10 %; None: the tolerance)",
            ),
            "significance": check_number("significance", self.significance, 0.0, 1.0, hint=" (a false-alarm rate: 0.01 means 1 %)"),
        }
        for factor in ("spike_factor", "vanishing_factor", "loss_factor", "vanishing_factor_without_loss"):
            checked[factor] = check_number(factor, getattr(self, factor), 1.0, math.inf, hint=" (a factor above 1)")
        if checked["max_deviation"] < checked["tolerance"]:
            raise OptionError(
                f"max_deviation must be >= tolerance ({checked['tolerance']:g}): a layer off by more than max_deviation is also off "
                f"by more than the tolerance; got max_deviation={self.max_deviation!r}"
            )
        for key, value in checked.items():
            object.__setattr__(self, key, value)

    @property
    def drift(self) -> float:
        return self.tolerance if self.drift_limit is None else float(self.drift_limit)


class _Ema:
    """Bias-corrected exponential moving averages of a vector, skipping nan entries."""

    def __init__(self, n: int, steps: int, stride: int = 1) -> None:
        # one sample every ``stride`` steps decays as much as ``stride`` steps would
        self.beta = (1.0 - 1.0 / steps) ** stride
        self.acc = np.zeros(n)
        self.weight = np.zeros(n)

    def update(self, idx: np.ndarray, x: np.ndarray) -> None:
        ok = np.isfinite(x)
        i = idx[ok]
        self.acc[i] = self.beta * self.acc[i] + (1.0 - self.beta) * x[ok]
        self.weight[i] = self.beta * self.weight[i] + (1.0 - self.beta)

    def value(self, idx: np.ndarray | slice = slice(None)) -> np.ndarray:
        w = self.weight[idx]
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(w > 0, self.acc[idx] / np.where(w > 0, w, 1.0), np.nan)


@dataclass(frozen=True)
class _Prediction:
    delta: float
    """Δ* (rad/step)."""
    tau: float
    """The rule's relaxation time (reported)."""
    reason: str | None
    tau_ratio: float
    """Time constant of the relaxation of Δ/Δ* (the norm variable's)."""
    power: float
    """``Δ/Δ* = sqrt(q*/q)`` with ``q = ‖w‖^power``."""
    scale: float
    """``∝ q*`` at fixed gradient statistics (a change of it is a change of the equilibrium norm)."""
    grad_exponent: float
    """``‖w*‖ ∝ L^grad_exponent``."""
    unit_dependent: bool
    """Δ* and the time constants are those of a unit with ``L = numel = 1``, scaled per unit by
    :meth:`Rule.unit_factors` (Adam with coupled L2)."""
    decay: float
    """``e`` of a decoupled weight decay (``nan`` when the decay is not separate from the update)."""


class Diagnostics:
    """Per-unit smoothing, steady-state judgement and equilibrium verdict; see the module docstring.

    Args:
        units: the tracked units, in the order the recorder indexes them.
        config: the verdict criteria.
        keep_history: also keep every step's raw values (for tests, plots and notebooks).
        every_n_steps: the recorder samples every n-th step: the moving averages decay
            per step, not per sample, and windows count steps.
    """

    def __init__(
        self, units: Sequence[NormalizedWeight], config: DiagnosticsConfig | None = None, keep_history: bool = False, every_n_steps: int = 1
    ) -> None:
        self.units = list(units)
        self.config = config or DiagnosticsConfig()
        self.stride = max(int(every_n_steps), 1)  # steps between samples
        n = len(self.units)
        self.delta = _Ema(n, self.config.ema_steps, self.stride)
        self.ratio = _Ema(n, self.config.ema_steps, self.stride)
        # Δ* smoothed like Δ (same steps, same weights): the table's two columns then divide to their ratio
        self.predicted_smooth = _Ema(n, self.config.ema_steps, self.stride)
        self.unit_grad = _Ema(n, self.config.ema_steps, self.stride)
        self.filter_delta = _Ema(n, self.config.ema_steps, self.stride)
        # passive window means for the balance of the update (decoupled decay only; _balance): ⟨w,ηu⟩/‖w‖²,
        # its square, ‖ηu‖²/‖w‖², Δ², (‖w_{t+1}‖² − ‖w_t‖²)/‖w_t‖²
        self.series = BlockSeries(n, extras=5)
        self.series.stride = float(self.stride)
        self.per_filter = False
        self.steps = np.zeros(n, dtype=np.int64)
        self.last_delta = np.full(n, np.nan)
        self.norm = np.full(n, np.nan)
        self.predicted = np.full(n, np.nan)
        self.relaxation = np.full(n, np.nan)
        self.tau_ratio = np.full(n, np.nan)
        self.norm_power = np.full(n, np.nan)
        self.decay = np.full(n, np.nan)
        """``e`` of the decoupled weight decay at the latest step (nan: not decoupled)."""
        self._numel, self._numel_of = np.array([float(u.numel) for u in self.units]), self.units
        self.direction_ratio = np.full(n, np.nan)
        """Δ/Δ* that the measured direction of the update implies for a stationary norm (:meth:`_balance`)."""
        self.kappa = np.full(n, np.nan)
        self.radial_share = np.full(n, np.nan)
        self.balance_drift = np.full(n, np.nan)
        self.hyper: list[dict[str, float] | None] = [None] * n
        self.rules: list[Rule | None] = [None] * n
        self.optimizer: list[int] = [-1] * n
        self.reasons: list[str | None] = [None] * n
        self.state = ["approaching"] * n
        """As of the latest judgement (the end of the latest drained batch)."""
        self._state = ["approaching"] * n  # as of the latest committed judgement
        self._was_counted = np.zeros(n, dtype=bool)
        self._committed_ratio = np.full(n, np.nan)  # steady ratio at the last committed judgement (nan: not steady)
        self.judge_every = self.stride * max(1, -(-self.config.window // (4 * self.stride)))
        """Steps between committed judgements (a multiple of ``stride``)."""
        # changes of the hyper-parameters
        self.origin = np.full(n, -1, dtype=np.int64)
        """Step before the first sample since the last change (or the start); -1 before any sample."""
        self.ref_pred = np.full(n, np.nan)
        self.ref_scale = np.full(n, np.nan)
        self.ref_hyper: list[dict[str, float] | None] = [None] * n
        self.change_step = np.full(n, -1, dtype=np.int64)
        self.expected_reequilibration = np.full(n, np.nan)
        self.reequilibrations: list[list[dict[str, Any]]] = [[] for _ in range(n)]
        # re-entry into the band around the pre-change level (measures the observed re-equilibration time)
        self.ref_level = np.ones(n)
        self.band_run = np.zeros(n, dtype=np.int64)
        self._timing = np.zeros(n, dtype=bool)  # a re-equilibration whose duration is not observed yet
        # the judgement (as of the last update)
        self.steady = np.zeros(n, dtype=bool)
        self.counted = np.zeros(n, dtype=bool)
        self.agreement: list[str | None] = [None] * n
        self._flags = np.zeros((n, len(_FLAGS)), dtype=bool)  # why a unit is not counted, as of the latest judgement
        self.drift = np.full(n, np.nan)
        self.drift_se = np.full(n, np.nan)
        self.norm_drift = np.full(n, np.nan)
        self.norm_drift_se = np.full(n, np.nan)
        self.steady_ratio = np.full(n, np.nan)
        self.steady_ratio_se = np.full(n, np.nan)
        self.quantile = np.full(n, np.nan)
        self.window_steps = np.full(n, np.nan)
        self.settle_steps = np.full(n, np.nan)
        self.judged_step = np.full(n, -1, dtype=np.int64)
        self.first_equilibrium = np.full(n, -1, dtype=np.int64)
        self.diverged_step = np.full(n, -1, dtype=np.int64)
        self.first_step = np.full(n, -1, dtype=np.int64)
        """The first measured step (after a resume without the callback's state: the Trainer's step then)."""
        """The optimizer step after which the unit's weights were first non-finite (-1: never)."""
        self.steps_in_equilibrium = np.zeros(n, dtype=np.int64)
        # other diagnoses
        self.initial_norm = np.full(n, np.nan)
        self.unit_grad_peak = np.zeros(n)
        self.vanishing_since = np.full(n, -1, dtype=np.int64)
        self.vanishing_first = np.full(n, -1, dtype=np.int64)
        self.spike_count = np.zeros(n, dtype=np.int64)
        self.spikes: list[dict[str, Any]] = []
        self._spiking = np.zeros(n, dtype=bool)
        self.effective_lr = np.full(n, np.nan)
        self.loss_now = math.nan  # mean training loss of the last log interval (observe_loss), or nan if unknown
        self.loss_peak = math.nan
        self.events: list[Event] = []
        """New notable events since the caller last took them (:meth:`take_events`)."""
        self.keep_history = keep_history
        self.history: list[dict[str, Any]] = []
        self._memo: dict[tuple[Any, ...], _Prediction] = {}

    # ------------------------------------------------------------------------------------------
    def _predict(self, rule: Rule, h: dict[str, float]) -> _Prediction:
        key = (rule, tuple(sorted(h.items())))
        hit = self._memo.get(key)
        if hit is None:
            power, grad_exponent = rule.norm_exponents(h)
            hit = _Prediction(
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
            if len(self._memo) > 4096:
                self._memo.clear()
            self._memo[key] = hit
        return hit

    @property
    def window_samples(self) -> int:
        """``window`` in samples (the band re-entry that times a re-equilibration must last this long)."""
        return -(-self.config.window // self.stride)

    def update(self, batch: StepBatch) -> None:
        """Fold one drained batch of steps into the per-unit state, then judge every unit."""
        idx = batch.unit_index
        k = len(batch.steps)
        n_groups = int(batch.unit_group.max()) + 1 if len(batch.unit_group) else 0
        hist_pred = np.empty((k, len(idx))) if self.keep_history else None
        hist_ratio = np.empty((k, len(idx))) if self.keep_history else None
        if k:
            first = np.isnan(self.initial_norm[idx])
            self.initial_norm[idx[first]] = np.sqrt(batch.norm_sq_before[0][first])
            for u in idx:
                self.rules[u] = batch.rule
                self.optimizer[u] = batch.optimizer_index
        for r in range(k):
            step = int(batch.steps[r])
            hyper_r = batch.hyper[r]
            self._divergence(idx, batch.norm_sq_after[r], step)
            preds = [self._predict(batch.rule, hyper_r[g]) for g in range(n_groups)]
            settings_pred = np.array([p.delta for p in preds])[batch.unit_group]  # what a change of settings moves
            scale = np.array([p.scale for p in preds])[batch.unit_group]
            self.unit_grad.update(idx, batch.grad_sq[r] * batch.norm_sq_before[r])  # before the per-unit factors use it
            f_delta, f_tau = self._unit_factors(batch, idx, preds, hyper_r)
            delta = batch.angular_update[r]
            with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
                pred = settings_pred * f_delta
                ratio = np.where(pred > 0, delta / pred, np.nan)
            self._track_prediction(idx, settings_pred, scale, f_tau, preds, batch, hyper_r, step)  # before the new settings are stored
            self.steps[idx] = step
            self.predicted[idx] = pred
            with np.errstate(invalid="ignore", over="ignore"):
                self.relaxation[idx] = np.array([p.tau for p in preds])[batch.unit_group] * f_tau
                self.tau_ratio[idx] = np.array([p.tau_ratio for p in preds])[batch.unit_group] * f_tau
            self.norm_power[idx] = np.array([p.power for p in preds])[batch.unit_group]
            if any(p.unit_dependent for p in preds):
                # τ follows the unit's L (coupled L2): keep room for the longest window it now needs, whatever the L
                # the series was sized with at the last change (the first step's may be 0 or missing)
                longest = self._window_range(self.tau_ratio[idx])[1]
                self.series.max_window[idx] = np.maximum(self.series.max_window[idx], longest)
            e = np.array([p.decay for p in preds])[batch.unit_group]
            self.decay[idx] = e
            self.delta.update(idx, delta)
            self.ratio.update(idx, ratio)
            self.predicted_smooth.update(idx, np.where(np.isfinite(delta), pred, np.nan))
            if batch.filter_angular_update_rms is not None:
                self.per_filter = True
                self.filter_delta.update(idx, batch.filter_angular_update_rms[r])
            # the norm relative to its predicted equilibrium (up to a constant of the hyper-parameters): SGD's
            # equilibrium norm follows the gradient statistic L, which learning may still lower slowly
            exponent = np.array([p.grad_exponent for p in preds])[batch.unit_group]
            with np.errstate(divide="ignore", invalid="ignore"):
                log_norm = 0.5 * np.log(batch.norm_sq_after[r]) - np.where(exponent != 0.0, exponent * np.log(self.unit_grad.value(idx)), 0.0)
            self.series.add(idx, float(step), ratio, log_norm, self._balance_samples(batch, r, e))
            smoothed = self.ratio.value(idx)
            self._band(idx, smoothed, step)
            self._spikes(idx, ratio, step)
            self._vanishing(idx, smoothed, step)
            if hist_pred is not None and hist_ratio is not None:
                hist_pred[r] = pred
                hist_ratio[r] = smoothed
            if step % self.judge_every == 0:
                # on a fixed grid of steps, so that what is recorded (states, first equilibrium, time in it) does not
                # depend on when the recorder happens to be drained (log interval, checkpoint, resume)
                self._set_reasons(idx, batch, hyper_r)
                self.judge(commit=True)
        if k:
            self.last_delta[idx] = batch.angular_update[-1]
            self.norm[idx] = np.sqrt(batch.norm_sq_after[-1])
            lr_last = np.array([batch.hyper[-1][int(g)].get("lr", math.nan) for g in batch.unit_group])
            with np.errstate(divide="ignore", invalid="ignore"):
                self.effective_lr[idx] = lr_last / batch.norm_sq_after[-1]
            self._set_reasons(idx, batch, batch.hyper[-1])
            self.judge(commit=False)
        if self.keep_history and k:
            lr = np.array([[batch.hyper[r][int(g)].get("lr", math.nan) for g in batch.unit_group] for r in range(k)])
            self.history.append(
                {
                    "optimizer": batch.optimizer_index,
                    "units": idx.copy(),
                    "steps": batch.steps.copy(),
                    "angular_update": batch.angular_update.copy(),
                    "predicted_angular_update": hist_pred,
                    "ratio": hist_ratio,
                    "weight_norm": np.sqrt(batch.norm_sq_after),
                    "grad_norm": np.sqrt(batch.grad_sq),
                    "lr": lr,
                    "filter_angular_update_rms": (
                        batch.filter_angular_update_rms.copy() if batch.filter_angular_update_rms is not None else np.full((k, len(idx)), np.nan)
                    ),
                }
            )

    def _unit_factors(self, batch: StepBatch, idx: np.ndarray, preds: list[_Prediction], hyper_r: list) -> tuple[np.ndarray, np.ndarray]:
        """Per-unit multipliers of Δ* and of the time constants (1 but for unit-dependent rules), from each unit's
        smoothed ``L`` (this step's included) and size."""
        f_delta, f_tau = np.ones(len(idx)), np.ones(len(idx))
        if not any(p.unit_dependent for p in preds):
            return f_delta, f_tau
        L = self.unit_grad.value(idx)
        if self._numel_of is not self.units:  # the callback may swap in verified units
            self._numel, self._numel_of = np.array([float(u.numel) for u in self.units]), self.units
        numel = self._numel[idx]
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            for g, p in enumerate(preds):
                if p.unit_dependent:
                    m = batch.unit_group == g
                    fd, ft = batch.rule.unit_factors(hyper_r[g], L[m], numel[m])
                    f_delta[m], f_tau[m] = fd, ft
        bad = ~(np.isfinite(f_delta) & (f_delta > 0))  # no L yet (0 or missing): no prediction for this step
        f_delta[bad], f_tau[bad] = np.nan, np.nan
        return f_delta, f_tau

    @staticmethod
    def _balance_samples(batch: StepBatch, r: int, e: np.ndarray) -> np.ndarray | None:
        """Per unit, this step's ``⟨w, ηu⟩/a``, its square, ``‖ηu‖²/a``, ``Δ²`` and the norm's relative change
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

    def _set_reasons(self, idx: np.ndarray, batch: StepBatch, hyper: list) -> None:
        for j, u in enumerate(idx):
            h = hyper[int(batch.unit_group[j])]
            self.hyper[u] = h
            # a weight named by include= that is not scale-invariant has no prediction, whatever the settings
            self.reasons[u] = not_scale_invariant(self.units[u]) or self._predict(batch.rule, h).reason

    def _track_prediction(
        self,
        idx: np.ndarray,
        pred: np.ndarray,
        scale: np.ndarray,
        f_tau: np.ndarray,
        preds: list[_Prediction],
        batch: StepBatch,
        hyper_r: list,
        step: int,
    ) -> None:
        """A prediction (Δ* or the equilibrium norm) that moved by more than the tolerance is a change: the unit's
        samples restart, and a unit that had reached equilibrium starts to re-equilibrate. ``pred`` is the
        settings' Δ* (before any per-unit factor: a unit's own gradient statistics drifting is not a change of
        settings); ``f_tau`` scales the time constants to the unit."""
        tol = self.config.tolerance
        ref, ref_scale = self.ref_pred[idx], self.ref_scale[idx]
        unset = self.origin[idx] < 0
        with np.errstate(divide="ignore", invalid="ignore"):
            moved_delta = np.abs(pred / ref - 1.0) > tol
            moved_scale = np.abs(np.sqrt(scale / ref_scale) - 1.0) > tol
            # a prediction appearing or vanishing (nan <-> number, 0 <-> positive) is a change too
            appeared = np.isfinite(pred) != np.isfinite(ref)
        moved = ~unset & (moved_delta | moved_scale | appeared)
        for j in np.nonzero(unset | moved)[0]:
            u = int(idx[j])
            p = preds[int(batch.unit_group[j])]
            h = hyper_r[int(batch.unit_group[j])]
            # a change after the unit had its settling time under the former settings (not one step of a warm-up) is
            # a re-equilibration
            settled = step - self.origin[u] >= 2.0 * self._window_range(self.tau_ratio[u])[0]
            if moved[j] and (settled or self._state[u] in ("equilibrium", "re-equilibrating", "departed", "off_prediction") or self.first_equilibrium[u] >= 0):
                old = self.ref_hyper[u]
                expected = batch.rule.reequilibration_time(old, h, tol) * float(f_tau[j]) if old is not None else math.nan
                self.state[u] = self._state[u] = "re-equilibrating"
                self.change_step[u] = step
                self.expected_reequilibration[u] = expected
                self.ref_level[u] = self._committed_ratio[u] if np.isfinite(self._committed_ratio[u]) else 1.0
                self.band_run[u] = 0
                self._timing[u] = True
                self.reequilibrations[u].append(
                    {"step": step, "from": _num(ref[j]), "to": _num(pred[j]), "expected_steps": _num(expected), "observed_steps": None}
                )
                self.events.append(Reequilibrating(u, step, float(expected), float(ref[j]), float(pred[j])))
            if unset[j] and self.first_step[u] < 0:
                self.first_step[u] = step
            self.ref_pred[u] = pred[j]
            self.ref_scale[u] = scale[j]
            self.ref_hyper[u] = h
            self.origin[u] = step - self.stride
            shortest, longest = self._window_range(p.tau_ratio * float(f_tau[j]))
            block = max(1, int(shortest // (BLOCKS_PER_WINDOW * self.stride)))  # the shortest window holds 16 blocks
            self.series.reset(np.array([u]), np.array([block]), float(step - self.stride), longest)

    def _window_range(self, tau_ratio: float | np.ndarray) -> tuple[Any, Any]:
        """The shortest and the longest judged window (steps) for a ratio relaxation time."""
        tau = np.where(np.isfinite(tau_ratio) & (np.asarray(tau_ratio) > 0), tau_ratio, 0.0)
        shortest = np.maximum(float(self.config.window), WINDOW_RELAXATION_TIMES[0] * tau)
        longest = np.maximum(4.0 * self.config.window, WINDOW_RELAXATION_TIMES[1] * tau)
        return (float(shortest), float(longest)) if np.ndim(tau) == 0 else (shortest, longest)

    def _band(self, idx: np.ndarray, smoothed: np.ndarray, step: int) -> None:
        """Times a re-equilibration: the smoothed ratio back within ``tolerance`` of its level before the change
        (its steady ratio, or 1), for ``window`` steps."""
        tol = self.config.tolerance
        with np.errstate(divide="ignore", invalid="ignore"):
            in_band = np.abs(smoothed / self.ref_level[idx] - 1.0) <= tol  # nan compares False
        self.band_run[idx] = np.where(in_band, self.band_run[idx] + 1, 0)
        done = (self.band_run[idx] >= self.window_samples) & self._timing[idx]
        for j in np.nonzero(done)[0]:
            u = int(idx[j])
            if self._state[u] != "re-equilibrating" or not self.reequilibrations[u] or self.reequilibrations[u][-1]["observed_steps"] is not None:
                self._timing[u] = False
                continue
            self._timing[u] = False
            change = int(self.change_step[u])
            band_start = step - (int(self.band_run[u]) - 1) * self.stride
            if band_start > change:  # left the band after the change and came back for a window
                self.reequilibrations[u][-1]["observed_steps"] = band_start - change
            elif step - change + 1 >= self.config.window:  # stayed in band through the change
                self.reequilibrations[u][-1]["observed_steps"] = 0

    def judge(self, commit: bool = True) -> None:
        """Judge every unit as of its last measured step (see the module docstring).

        ``commit``: also record the transitions of the states, the first equilibrium and the time in equilibrium.
        Without it, the judgement is a view of the present that the next one does not build on."""
        cfg = self.config
        n = len(self.units)
        if n == 0:
            return
        units = np.arange(n)
        tau = self.tau_ratio
        seen = self.origin >= 0
        finite_tau = np.isfinite(tau) & (tau > 0)
        app = self.applicable
        judged = seen & app & (self.predicted > 0) & finite_tau
        n_judged = max(int(judged.sum()), 1)
        tau_safe = np.where(finite_tau, tau, 0.0)
        w_min, w_max = self._window_range(tau)
        since = (self.steps - self.origin).astype(np.float64)
        # the second half of the samples since the last change: the first half is left to the relaxation
        window = np.clip(since / 2.0, w_min, w_max)
        settled = since >= 2.0 * w_min
        fit = self.series.fit(units, window, 1.0 + 2.0 * tau_safe / self.stride)
        level = 1.0 - cfg.significance / (2.0 * n_judged)
        quantiles = {d: t_quantile(level, d) for d in set(fit.df[np.isfinite(fit.df)].tolist())}
        q = np.array([quantiles.get(d, math.nan) for d in fit.df.tolist()])
        with np.errstate(divide="ignore", invalid="ignore"):
            d_x = tau * fit.slope_x / fit.mean_x
            se_x = tau * fit.se_slope_x / np.abs(fit.mean_x)
            d_w = tau * 0.5 * self.norm_power * fit.slope_y
            se_w = tau * 0.5 * self.norm_power * fit.se_slope_y
        within_x, precise_x = drift_within(d_x, se_x, q, cfg.drift)
        within_w, precise_w = drift_within(d_w, se_w, q, cfg.drift)
        precise = precise_x & precise_w
        with np.errstate(invalid="ignore"):
            # beyond the limit by the point estimate: drifting, even where the window is too noisy to be sure (a
            # relaxation's curvature reads as correlated noise); undetermined: within it, but not precisely enough
            drifting = (np.abs(d_x) > cfg.drift) | (np.abs(d_w) > cfg.drift)
        enough = fit.blocks >= MIN_BLOCKS
        vanishing = self.vanishing_since >= 0
        steady = judged & settled & enough & within_x & within_w & ~vanishing
        lo = fit.mean_x - q * fit.se_mean_x
        hi = fit.mean_x + q * fit.se_mean_x
        with np.errstate(invalid="ignore"):
            far = steady & ((hi < 1.0 - cfg.max_deviation) | (lo > 1.0 + cfg.max_deviation))
            off = steady & ~far & ((hi < 1.0 - cfg.tolerance) | (lo > 1.0 + cfg.tolerance))
        diverged = self.diverged
        steady &= ~diverged
        far &= ~diverged
        off &= ~diverged
        counted = steady & ~far & ~(off & cfg.require_agreement)
        if commit:  # time in equilibrium (since the previous committed judgement), first equilibrium
            was = self._was_counted
            self.steps_in_equilibrium += np.where(counted & was & (self.judged_step >= 0), self.steps - self.judged_step, 0)
            newly = counted & (self.first_equilibrium < 0)
            start = self.steps - window.astype(np.int64) + 1
            self.first_equilibrium[newly] = np.maximum(start[newly], 1)
            self.judged_step = np.where(seen, self.steps, self.judged_step)
            self._was_counted = counted.copy()
            self._committed_ratio = np.where(steady, fit.mean_x, np.nan)
        self.steady, self.counted = steady, counted
        if diverged.any():  # the window's finite samples predate the divergence: they describe nothing now
            d_x, se_x, d_w, se_w = (np.where(diverged, np.nan, x) for x in (d_x, se_x, d_w, se_w))
            fit.mean_x, fit.se_mean_x = np.where(diverged, np.nan, fit.mean_x), np.where(diverged, np.nan, fit.se_mean_x)
        self.drift, self.drift_se, self.norm_drift, self.norm_drift_se = d_x, se_x, d_w, se_w
        self.steady_ratio, self.steady_ratio_se, self.quantile = fit.mean_x, fit.se_mean_x, q
        self._balance(fit, settled)
        self.window_steps = np.where(settled, window, np.nan)
        self.settle_steps = np.where(finite_tau, 2.0 * w_min, np.nan)
        agreement = np.where(far, "far_off", np.where(off, "off_prediction", "agrees"))
        self.agreement = [str(a) if st else None for a, st in zip(agreement.tolist(), steady.tolist())]
        self._flags = np.stack([seen, app, judged, vanishing, settled, enough, drifting, precise, far, off, counted], axis=1)
        previous = np.array(self._state, dtype=object)
        state = np.select(
            [
                diverged, ~seen, ~app, ~judged, vanishing, counted, far, off,
                (previous == "re-equilibrating") | (previous == "departed"), previous == "equilibrium",
            ],
            [
                "diverged", previous, "no_prediction", "no_equilibrium", "vanishing_noise", "equilibrium", "steady_far_off",
                "off_prediction", previous, "departed",
            ],
            default="approaching",
        )
        self.state = [str(x) for x in state.tolist()]
        if commit:
            self._state = list(self.state)

    def _balance(self, fit: Any, settled: np.ndarray) -> None:
        """Where the closed form's error comes from: the direction of the update, or the norm's drift (decoupled
        decay only).

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
        white noise), ``balance_drift`` the part due to a norm not yet stationary. Settled units only."""
        n = len(self.units)
        self.direction_ratio = np.full(n, np.nan)
        self.kappa = np.full(n, np.nan)
        self.radial_share = np.full(n, np.nan)
        self.balance_drift = np.full(n, np.nan)
        if fit.mean_extra is None:
            return
        wu, wu2, uu, d2, growth = fit.mean_extra.T
        e = self.decay
        with np.errstate(divide="ignore", invalid="ignore"):
            kappa, rho = -2.0 * wu / uu, wu2 / uu
            rms = np.sqrt((2.0 * e - e * e) * (1.0 - rho) / (1.0 + (1.0 - e) * kappa))
            # Δ_c·(mean Δ / RMS Δ)/Δ* with mean Δ = mean_x·Δ*: Δ* cancels
            direction = fit.mean_x * rms / np.sqrt(d2)
            ok = settled & np.isfinite(e) & (e > 0) & (uu > 0) & np.isfinite(direction)
        self.direction_ratio = np.where(ok, direction, np.nan)
        self.kappa = np.where(ok, kappa, np.nan)
        self.radial_share = np.where(ok, rho, np.nan)
        with np.errstate(divide="ignore", invalid="ignore"):
            self.balance_drift = np.where(ok, growth / (2.0 * e), np.nan)

    @property
    def why_not(self) -> list[str | None]:
        """Per unit, why it is not counted as in equilibrium (``None`` when it is), as of the latest judgement."""
        return [self._why_not(u) for u in range(len(self.units))]

    def _why_not(self, u: int) -> str | None:
        cfg = self.config
        f = dict(zip(_FLAGS, self._flags[u].tolist()))
        if f["counted"]:
            return None
        if self.diverged_step[u] >= 0:
            return f"diverged: its weights became non-finite (NaN or inf) at step {int(self.diverged_step[u])}"
        since = int(self.steps[u] - self.origin[u])
        if not f["seen"]:
            return "no step measured yet"
        if not f["applicable"]:
            return self.reasons[u] or "no prediction"
        if not f["judged"]:
            return self.reasons[u] or "the prediction is 0: no equilibrium"
        vanishing, settled, enough, drifting, precise, far, off = (f[k] for k in ("vanishing", "settled", "enough", "drifting", "precise", "far", "off"))
        if vanishing:
            return "the gradient noise vanished"
        if not settled:
            need = float(self.settle_steps[u]) if math.isfinite(self.settle_steps[u]) else math.nan
            return f"settling: {int(since)} of the {math.ceil(need)} steps needed since the last change"
        if not enough:
            return "too few samples in the window"
        drift = (
            f"Δ/Δ* drifts by {self.drift[u]:+.3f} (±{self.drift_se[u]:.3f}) per relaxation time, |w|/|w*| implies "
            f"{self.norm_drift[u]:+.3f} (±{self.norm_drift_se[u]:.3f}); limit ±{cfg.drift:g}"
        )
        if drifting:
            return f"drifting: {drift}" + ("" if precise else " (the window is too noisy to be sure)")
        if not precise:
            return f"undetermined: the window of {int(self.window_steps[u])} steps is too noisy to bound the drift ({drift}); it grows as training goes on"
        if far:
            return f"steady at {self.steady_ratio[u]:.3f} of the prediction: further off than ±{cfg.max_deviation:.0%}"
        if off:
            return f"steady at {self.steady_ratio[u]:.3f} of the prediction: off by more than ±{cfg.tolerance:.0%} (require_agreement)"
        return "not judged"

    def _measured_steps(self, u: int) -> int:
        """Steps from the first measured one to the last (the Trainer's steps before a resume are not counted)."""
        return int(self.steps[u] - self.first_step[u] + self.stride) if self.first_step[u] >= 0 else 0

    def _divergence(self, idx: np.ndarray, norm_sq: np.ndarray, step: int) -> None:
        """Record the first step at which a unit's ``‖w‖²`` is non-finite: a NaN or inf anywhere in its weights."""
        bad = ~np.isfinite(norm_sq) & (self.diverged_step[idx] < 0)
        for j in np.nonzero(bad)[0]:
            u = int(idx[j])
            self.diverged_step[u] = step
            self.events.append(Diverged(u, step, float(norm_sq[j])))
            # the averages would keep showing the last finite values: a diverged layer shows none
            for ema in (self.delta, self.ratio, self.predicted_smooth, self.unit_grad, self.filter_delta):
                ema.acc[u], ema.weight[u] = 0.0, 0.0

    @property
    def diverged(self) -> np.ndarray:
        """Units whose weights became non-finite."""
        return self.diverged_step >= 0

    def _spikes(self, idx: np.ndarray, ratio: np.ndarray, step: int) -> None:
        spiking = np.nan_to_num(ratio, nan=0.0) > self.config.spike_factor
        rising = spiking & ~self._spiking[idx] & (self.first_equilibrium[idx] >= 0)
        self._spiking[idx] = spiking
        for j in np.nonzero(rising)[0]:
            u = int(idx[j])
            self.spike_count[u] += 1
            event = {"step": step, "layer": self.units[u].name, "ratio": float(ratio[j])}
            if len(self.spikes) < 100:
                self.spikes.append(event)
            self.events.append(NormSpike(u, step, float(ratio[j])))

    def observe_loss(self, mean_loss: float) -> None:
        """The mean training loss since the last call (the callback reads it at each log step): grounds the
        vanishing-noise diagnosis in the loss actually approaching zero. Call it before :meth:`update`."""
        value = float(mean_loss)
        if not math.isfinite(value):
            return
        self.loss_now = value
        self.loss_peak = value if not math.isfinite(self.loss_peak) else max(self.loss_peak, value)

    def _vanishing(self, idx: np.ndarray, smoothed: np.ndarray, step: int) -> None:
        """Vanishing gradient noise: ``L`` fell below its peak / ``vanishing_factor`` while the smoothed ratio is below
        ``1 − 2·tolerance`` — once the layer has had its settling time since the last change (during the first
        relaxation the ratio is often that low while learning lowers ``L`` from its early peak: not vanishing noise)
        — and the training loss fell below its peak / ``loss_factor`` (without a known loss, ``L`` must fall by
        ``vanishing_factor_without_loss``). The diagnosis claims the loss approaches zero: it needs the evidence."""
        cfg = self.config
        if math.isfinite(self.loss_now):
            factor = cfg.vanishing_factor
            loss_gone = self.loss_now < self.loss_peak / cfg.loss_factor
        else:
            factor, loss_gone = cfg.vanishing_factor_without_loss, True
        L = self.unit_grad.value(idx)
        warm = self.unit_grad.weight[idx] > 0.5  # past the first ~ema_steps/2 steps
        self.unit_grad_peak[idx] = np.where(warm, np.fmax(self.unit_grad_peak[idx], L), self.unit_grad_peak[idx])
        shortest, _ = self._window_range(self.tau_ratio[idx])
        settled = step - self.origin[idx] >= 2.0 * shortest
        collapsed = warm & settled & loss_gone & (L < self.unit_grad_peak[idx] / factor) & (smoothed < 1.0 - 2.0 * cfg.tolerance)
        new = collapsed & (self.vanishing_since[idx] < 0)
        for j in np.nonzero(new)[0]:
            u = int(idx[j])
            self.vanishing_since[u] = step
            if self.vanishing_first[u] < 0:
                self.vanishing_first[u] = step
            self.events.append(VanishingNoise(u, step, float(self.unit_grad_peak[u]), float(L[j]), float(smoothed[j])))
        # recovered: L came back, or the smoothed ratio is back within the tolerance (a gradient statistic that merely
        # settled lower than its early peak, as learning lowers it, is not vanishing noise)
        recovered = ~collapsed & (self.vanishing_since[idx] >= 0) & ((L > self.unit_grad_peak[idx] / 2.0) | (smoothed >= 1.0 - cfg.tolerance))
        self.vanishing_since[idx[recovered]] = -1

    # ------------------------------------------------------------------------------------------
    # Checkpointing: plain Python types only (loadable with torch.load(weights_only=True))
    # ------------------------------------------------------------------------------------------
    _ARRAYS = (
        "steps", "last_delta", "norm", "predicted", "relaxation", "tau_ratio", "norm_power", "decay", "origin", "ref_pred",
        "ref_scale", "change_step", "expected_reequilibration", "ref_level", "band_run", "_timing", "steady", "counted", "drift",
        "drift_se", "norm_drift", "norm_drift_se", "steady_ratio", "steady_ratio_se", "quantile", "window_steps",
        "settle_steps", "judged_step", "first_equilibrium", "steps_in_equilibrium", "initial_norm", "unit_grad_peak",
        "vanishing_since", "vanishing_first", "spike_count", "_spiking", "effective_lr", "_was_counted", "_committed_ratio", "_flags",
        "direction_ratio", "kappa", "radial_share", "balance_drift", "diverged_step",
        "first_step",
    )  # fmt: skip
    #: arrays added after the schema version was set: a checkpoint without them keeps their initial values
    _ADDED_ARRAYS = ("diverged_step", "first_step")
    _LISTS = ("hyper", "optimizer", "reasons", "state", "_state", "ref_hyper", "reequilibrations", "spikes", "agreement")

    def state_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "schema_version": SCHEMA_VERSION,
            "names": [u.name for u in self.units],
            "per_filter": self.per_filter,
            "stride": self.stride,
            "series": _plain(self.series.state_dict()),
            "loss": [_num(self.loss_now), _num(self.loss_peak)],
        }
        for name in self._ARRAYS:
            out[name] = _plain(getattr(self, name).tolist())
        for name in self._LISTS:
            out[name] = _plain(getattr(self, name))
        for name in ("delta", "ratio", "unit_grad", "filter_delta", "predicted_smooth"):
            ema = getattr(self, name)
            out[name] = {"acc": _plain(ema.acc.tolist()), "weight": _plain(ema.weight.tolist())}
        out["rules"] = [r.name if r is not None else None for r in self.rules]
        return out

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`; the units must be the same (by name, in order)."""
        names = [u.name for u in self.units]
        if state.get("schema_version") != SCHEMA_VERSION:
            raise ValueError(f"the checkpoint's SMD state has schema version {state.get('schema_version', 1)}, this version reads {SCHEMA_VERSION}")
        if state.get("names") != names:
            raise ValueError(f"the checkpoint tracks other weights ({state.get('names')}) than this run ({names})")
        if int(state.get("stride", 1)) != self.stride:
            raise ValueError(f"the checkpoint sampled every {state.get('stride', 1)} steps, this run every {self.stride}")
        series = _unplain(state["series"])
        if np.asarray(series["current"]).shape != self.series.current.shape:
            raise ValueError("the checkpoint's steady-state statistics have the layout of an earlier version")
        for name in self._ARRAYS:
            current = getattr(self, name)
            if name not in state and name in self._ADDED_ARRAYS:
                continue
            setattr(self, name, np.asarray(_unplain(state[name]), dtype=current.dtype).reshape(current.shape))
        for name in self._LISTS:
            setattr(self, name, _unplain(state[name]))
        loss_now, loss_peak = state.get("loss", [None, None])
        self.loss_now = math.nan if loss_now is None else float(loss_now)
        self.loss_peak = math.nan if loss_peak is None else float(loss_peak)
        for name in ("delta", "ratio", "unit_grad", "filter_delta", "predicted_smooth"):
            if name not in state:  # a checkpoint written before this average existed: it restarts
                continue
            ema = getattr(self, name)
            ema.acc = np.asarray(_unplain(state[name]["acc"]), dtype=np.float64)
            ema.weight = np.asarray(_unplain(state[name]["weight"]), dtype=np.float64)
        self.series.load_state_dict(series)
        self.per_filter = bool(state.get("per_filter", False))
        known = {r.name: r for r in registered_rules().values()}
        self.rules = [known.get(n, UnknownRule(optimizer=n)) if n is not None else None for n in state["rules"]]

    # ------------------------------------------------------------------------------------------
    def predicted_time_to_equilibrium(self) -> np.ndarray:
        """Steps from the initial norm to the equilibrium band, predicted with the final settings and ``L``."""
        out = np.full(len(self.units), np.nan)
        pred_norm = self.predicted_weight_norm()
        L = self.unit_grad.value()
        for u, (rule, h) in enumerate(zip(self.rules, self.hyper)):
            if rule is not None and h is not None and np.isfinite(pred_norm[u]):
                f_tau = rule.unit_factors(h, float(L[u]), float(self.units[u].numel))[1] if rule.unit_dependent(h) else 1.0
                out[u] = rule.time_to_equilibrium(h, float(self.initial_norm[u]), float(pred_norm[u]), self.config.tolerance) * f_tau
        return out

    def steps_needed(self) -> np.ndarray:
        """Steps until each unit could be judged in equilibrium, if nothing changes: what its settling still needs,
        and for a drifting unit the relaxation from its current smoothed ratio ``r`` (``q/q* = 1/r²``)."""
        out = np.full(len(self.units), np.nan)
        r = self.ratio.value()
        since = self.steps - self.origin
        for u, (rule, h) in enumerate(zip(self.rules, self.hyper)):
            if rule is None or h is None:
                continue
            if self.counted[u]:
                out[u] = 0.0
            elif self.predicted[u] == 0.0:
                out[u] = math.inf
            elif math.isfinite(self.settle_steps[u]):
                need = max(float(self.settle_steps[u]) - float(since[u]), 0.0)
                if not self.steady[u] and need == 0.0 and np.isfinite(r[u]) and r[u] > 0:
                    need = time_to_band(1.0 / r[u] ** 2, float(self.tau_ratio[u]), self.config.tolerance)
                out[u] = need
        return out

    # ------------------------------------------------------------------------------------------
    @property
    def in_equilibrium(self) -> np.ndarray:
        """Units counted as in equilibrium at their last judgement."""
        return self.counted

    @property
    def applicable(self) -> np.ndarray:
        """Units with a prediction (a prediction of 0, i.e. no weight decay, counts: it is a failure; an unknown
        optimizer has none) that applies to them: a weight named by ``include`` that the first batch showed not to be
        scale-invariant (:func:`lightning_smd.engine.detect.not_scale_invariant`) is measured, but not judged — its reason
        (``reasons``, hence ``not_in_equilibrium_because``) says so (:meth:`_set_reasons`)."""
        out = np.zeros(len(self.units), dtype=bool)
        for u, rule in enumerate(self.rules):
            out[u] = rule is not None and rule.known and bool(np.isfinite(self.predicted[u])) and not_scale_invariant(self.units[u]) is None
        return out

    def predicted_weight_norm(self) -> np.ndarray:
        out = np.full(len(self.units), np.nan)
        L = self.unit_grad.value()
        for u, (rule, h) in enumerate(zip(self.rules, self.hyper)):
            if rule is not None and h is not None:
                out[u] = rule.weight_norm(h, float(L[u]), self.units[u].numel)
        return out

    def ratio_interval(self) -> tuple[np.ndarray, np.ndarray]:
        """The confidence interval of each unit's steady ratio (level ``1 − significance/N``)."""
        half = self.quantile * self.steady_ratio_se
        return self.steady_ratio - half, self.steady_ratio + half

    def equilibrium_fraction(self) -> float:
        app = self.applicable
        if not app.any():
            return math.nan
        return float(self.counted[app].mean())

    def median_ratio(self) -> float:
        r = self.ratio.value()[self.applicable]
        r = r[np.isfinite(r)]
        return float(np.median(r)) if r.size else math.nan

    def criteria_text(self) -> str:
        cfg = self.config
        agreement = f", nor beyond ±{cfg.tolerance:.0%} (require_agreement)" if cfg.require_agreement else ""
        return (
            f"steady: at least {2 * WINDOW_RELAXATION_TIMES[0]:g} relaxation times and {2 * cfg.window} steps since the last "
            f"change, drift of Δ/Δ* within ±{cfg.drift:.0%} per relaxation time (false-alarm rate {cfg.significance:.0%}); "
            f"steady Δ/Δ* not beyond ±{cfg.max_deviation:.0%} of the prediction{agreement}"
        )

    def take_events(self) -> list[Event]:
        """The events since the last call (each is returned once)."""
        events, self.events = self.events, []
        return events

    def verdict(self) -> tuple[Verdict, str]:
        """``(verdict, one-sentence reason)``."""
        cfg = self.config
        if not self.units:
            return Verdict.NOT_APPLICABLE, "no normalized (scale-invariant) weight is tracked"
        if self.diverged.any():
            return Verdict.DIVERGED, self.divergence_text()
        app = self.applicable
        if not app.any():
            reasons = {r for r in self.reasons if r}
            if self.steps.max(initial=0) == 0:
                return Verdict.NOT_APPLICABLE, "no optimizer step was measured"
            return Verdict.NOT_APPLICABLE, "; ".join(sorted(reasons)) or "no tracked weight has an SMD prediction"
        frac = self.equilibrium_fraction()
        n_app = int(app.sum())
        n_eq = int(self.counted[app].sum())
        names = [u.name for u in self.units]
        off = [names[u] for u in range(len(names)) if app[u] and self.agreement[u] == "off_prediction"]
        off_text = f"; off the prediction (steady, but Δ/Δ* outside ±{cfg.tolerance:.0%}): {', '.join(off[:5])}{' ...' if len(off) > 5 else ''}" if off else ""
        if frac >= cfg.min_fraction:
            return Verdict.EQUILIBRIUM, (
                f"{n_eq}/{n_app} tracked layers ended in equilibrium ({self.criteria_text()}; at least {cfg.min_fraction:.0%} "
                f"required){off_text}"
            )
        reason = f"only {n_eq}/{n_app} tracked layers ended in equilibrium; at least {cfg.min_fraction:.0%} required ({self.criteria_text()})"
        groups: dict[str, list[str]] = {}
        for u in range(len(names)):
            if app[u] and not self.counted[u]:
                groups.setdefault(self.state[u], []).append(names[u])
        text = {
            "approaching": "still settling or drifting",
            "re-equilibrating": "re-equilibrating after a change of the hyper-parameters",
            "departed": "left their equilibrium",
            "steady_far_off": f"steady, but further than ±{cfg.max_deviation:.0%} from the prediction (not SMD's equilibrium)",
            "off_prediction": f"steady, but off the prediction by more than ±{cfg.tolerance:.0%} (require_agreement)",
            "vanishing_noise": "diagnosed as vanishing gradient noise (the training loss approaches zero: a property of the run, not a measurement error)",
            "no_equilibrium": "without weight decay, hence no equilibrium",
        }
        for state, members in groups.items():
            if state == "no_equilibrium":
                still = [u for u in range(len(names)) if names[u] in members and _lr_is_zero(self.hyper[u])]
                if len(members) > len(still):
                    reason += f"; {len(members) - len(still)} have no weight decay, hence no equilibrium"
                if still:
                    reason += f"; {len(still)} have a learning rate of 0 at the end (the weights do not move: no equilibrium to judge)"
            else:
                reason += f"; {len(members)} {text.get(state, state)}"
        vanishing = [u for u in range(len(names)) if app[u] and self.vanishing_first[u] >= 0 and not self.counted[u] and self.state[u] != "vanishing_noise"]
        if vanishing:
            reason += f"; vanishing gradient noise was diagnosed in {len(vanishing)} of them earlier (the training loss approaches zero)"
        return Verdict.NOT_REACHED, reason + off_text

    def divergence_text(self) -> str:
        """The run-level reason of a diverged run: the first step and the layers non-finite from it."""
        names = [u.name for u in self.units]
        bad = np.nonzero(self.diverged)[0]
        step = int(self.diverged_step[bad].min())
        first = [names[u] for u in bad if self.diverged_step[u] == step]
        loss = f"; the last finite mean training loss was {self.loss_now:.4g}" if math.isfinite(self.loss_now) else ""
        return (
            f"training diverged: {diverged_layers(first)} became non-finite (NaN or inf) at optimizer step {step}; "
            f"{len(bad)} of {len(names)} tracked layers are non-finite at the end{loss}. Nothing after that step is measured: "
            "lower the learning rate, add gradient clipping or a warm-up, or look for a NaN in the data or the loss"
        )

    # ------------------------------------------------------------------------------------------
    def metrics(self, per_layer: bool = True, prefix: str = "smd/") -> dict[str, float]:
        """The logged metrics: always the same keys for the same units (CSV loggers need that)."""
        out = {
            f"{prefix}angular_update_ratio": self.median_ratio(),
            f"{prefix}equilibrium_fraction": self.equilibrium_fraction(),
        }
        if per_layer:
            columns = self._layer_columns()
            for u, unit in enumerate(self.units):
                base = f"{prefix}{metric_name(unit.name)}/"
                for m, values in columns.items():
                    out[base + m] = float(values[u])
        return out

    def _layer_columns(self) -> dict[str, np.ndarray]:
        """The per-layer metrics (:data:`LAYER_METRICS`, and the per-filter RMS when measured), one array each."""
        lo, hi = self.ratio_interval()
        values = {
            "angular_update": self.delta.value(),
            "predicted_angular_update": self.predicted,
            "smoothed_predicted_angular_update": self.predicted_smooth.value(),
            "angular_update_ratio": self.ratio.value(),
            "weight_norm": self.norm,
            "predicted_weight_norm": self.predicted_weight_norm(),
            "in_equilibrium": self.counted.astype(float),
            "effective_lr": self.effective_lr,
            "steady_ratio": self.steady_ratio,
            "steady_ratio_low": lo,
            "steady_ratio_high": hi,
            "drift": self.drift,
        }
        columns = {m: values[m] for m in LAYER_METRICS}
        if self.per_filter:
            columns["filter_angular_update_rms"] = self.filter_delta.value()
        return columns

    def layer_rows(self) -> list[dict[str, Any]]:
        smoothed = self.delta.value()
        smoothed_pred = self.predicted_smooth.value()
        ratio = self.ratio.value()
        pred_norm = self.predicted_weight_norm()
        filter_rms = self.filter_delta.value()
        t_eq = self.predicted_time_to_equilibrium()
        lo, hi = self.ratio_interval()
        rows = []
        for u, unit in enumerate(self.units):
            first = int(self.first_equilibrium[u])
            since = int(self.steps[u] - self.origin[u]) if self.origin[u] >= 0 else None
            rows.append(
                {
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
                    "optimizer": self.optimizer[u],
                    "rule": self.rules[u].name if self.rules[u] is not None else None,
                    "hyper": self.hyper[u],
                    "steps": int(self.steps[u]),
                    "angular_update": _num(smoothed[u]),
                    "last_angular_update": _num(self.last_delta[u]),
                    "predicted_angular_update": _num(self.predicted[u]),
                    "smoothed_predicted_angular_update": _num(smoothed_pred[u]),
                    "ratio": _num(ratio[u]),
                    "weight_norm": _num(self.norm[u]),
                    "predicted_weight_norm": _num(pred_norm[u]),
                    "relaxation_time": _num(self.relaxation[u]),
                    "ratio_relaxation_time": _num(self.tau_ratio[u]),
                    "in_equilibrium": bool(self.counted[u]),
                    "steady": bool(self.steady[u]),
                    "agreement": self.agreement[u],
                    "not_in_equilibrium_because": self._why_not(u),
                    "steady_ratio": _num(self.steady_ratio[u]),
                    "steady_ratio_ci": [_num(lo[u]), _num(hi[u])] if np.isfinite(lo[u]) else None,
                    "direction_ratio": _num(self.direction_ratio[u]),
                    "update_kappa": _num(self.kappa[u]),
                    "update_radial_share": _num(self.radial_share[u]),
                    "balance_drift": _num(self.balance_drift[u]),
                    "drift": _num(self.drift[u]),
                    "drift_se": _num(self.drift_se[u]),
                    "norm_drift": _num(self.norm_drift[u]),
                    "norm_drift_se": _num(self.norm_drift_se[u]),
                    "quantile": _num(self.quantile[u]),
                    "window_steps": _num(self.window_steps[u]),
                    "steps_since_change": since,
                    "settle_steps": _num(self.settle_steps[u]),
                    "filter_angular_update_rms": _num(filter_rms[u]) if self.per_filter else None,
                    "first_equilibrium_step": first if first >= 0 else None,
                    "diverged_at_step": int(self.diverged_step[u]) if self.diverged_step[u] >= 0 else None,
                    "steps_in_equilibrium": int(self.steps_in_equilibrium[u]),
                    "first_measured_step": int(self.first_step[u]) if self.first_step[u] >= 0 else None,
                    "share_in_equilibrium": _num(self.steps_in_equilibrium[u] / measured) if (measured := self._measured_steps(u)) else None,
                    "state": self.state[u],
                    "initial_weight_norm": _num(self.initial_norm[u]),
                    "predicted_time_to_equilibrium": _num(t_eq[u]),
                    "effective_lr": _num(self.effective_lr[u]),
                    "reequilibrations": list(self.reequilibrations[u]),
                    "expected_reequilibration_steps": _num(self.expected_reequilibration[u]) if self.state[u] == "re-equilibrating" else None,
                    "spikes": int(self.spike_count[u]),
                    "vanishing_gradient_noise_since": int(self.vanishing_first[u]) if self.vanishing_first[u] >= 0 else None,
                    "unit_grad_sq": _num(self.unit_grad.value(np.array([u]))[0]),
                    "unit_grad_sq_peak": _num(self.unit_grad_peak[u]),
                    "reason": self.reasons[u],
                }
            )
        return rows

    def statistics(self) -> dict[str, Any]:
        """How the run was judged: the per-unit level and the quantile of the tests."""
        n = int((self.applicable & (self.predicted > 0)).sum())
        per_unit = self.config.significance / max(n, 1)
        return {
            "units_judged": n,
            "false_alarm_rate_per_run": self.config.significance,
            "false_alarm_rate_per_unit": per_unit,
            "confidence_level": 1.0 - per_unit,
            "drift_limit_per_relaxation_time": self.config.drift,
            "window": "the second half of the steps since the last change",
            "window_relaxation_times": list(WINDOW_RELAXATION_TIMES),
        }

    def summary(self) -> dict[str, Any]:
        verdict, reason = self.verdict()
        criteria = asdict(self.config)
        criteria["drift_limit"] = self.config.drift
        return {
            "schema_version": SCHEMA_VERSION,
            "verdict": verdict,
            "reason": reason,
            "steps": int(self.steps.max(initial=0)),
            "diverged_at_step": int(self.diverged_step[self.diverged].min()) if self.diverged.any() else None,
            "criteria": criteria,
            "statistics": self.statistics(),
            "equilibrium_fraction": _num(self.equilibrium_fraction()),
            "angular_update_ratio": _num(self.median_ratio()),
            "diagnoses": self.diagnoses(),
            "spikes": list(self.spikes),
            "training_loss": {"last": _num(self.loss_now), "peak": _num(self.loss_peak)},
            "layers": self.layer_rows(),
        }

    def diagnoses(self) -> dict[str, Any]:
        """Run-level findings, each with the layers concerned."""
        names = [u.name for u in self.units]
        app = self.applicable
        out: dict[str, Any] = {}
        eq = self.counted
        vanishing = [names[u] for u in range(len(names)) if self.vanishing_first[u] >= 0 and not eq[u]]
        if vanishing:
            out["vanishing_gradient_noise"] = vanishing
        spiking = [names[u] for u in range(len(names)) if self.spike_count[u] > 0]
        if spiking:
            out["norm_spikes"] = spiking
        reeq = [names[u] for u in range(len(names)) if self.state[u] == "re-equilibrating"]
        if reeq:
            out["re_equilibrating"] = reeq
        off = [names[u] for u in range(len(names)) if self.agreement[u] == "off_prediction"]
        if off:
            out["off_prediction"] = off
        far = [names[u] for u in range(len(names)) if self.agreement[u] == "far_off"]
        if far:
            out["steady_far_off"] = far
        reached = [u for u in range(len(names)) if app[u] and self.first_equilibrium[u] >= 0]
        never = [names[u] for u in range(len(names)) if app[u] and self.first_equilibrium[u] < 0]
        if reached and never:
            out["never_in_equilibrium"] = never
        diverged = [names[u] for u in np.argsort(self.diverged_step, kind="stable") if self.diverged_step[u] >= 0]
        if diverged:
            out["diverged"] = diverged
        departed = [names[u] for u in range(len(names)) if self.state[u] == "departed"]
        if departed:
            out["departed"] = departed
        return out

    def unit_history(self, name: str) -> dict[str, np.ndarray]:
        """Every recorded step of one unit (needs ``keep_history=True``)."""
        u = [x.name for x in self.units].index(name)
        keys = ("steps", "angular_update", "predicted_angular_update", "ratio", "weight_norm", "grad_norm", "lr", "filter_angular_update_rms")
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


def _lr_is_zero(h: dict[str, float] | None) -> bool:
    """The settings have a learning rate of 0 (and a weight decay: without one, that is the reason given)."""
    return h is not None and h.get("lr") == 0.0 and h.get("weight_decay", 0.0) > 0.0


def diverged_layers(names: Sequence[str]) -> str:
    """``the weights of <layer>``, or of several layers that went non-finite in the same step (then the cause cannot
    be told apart among them: one non-finite loss or gradient reaches every layer in that step)."""
    if len(names) == 1:
        return f"the weights of {names[0]}"
    shown = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
    return f"the weights of {len(names)} layers at once ({shown})"


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
    slope = float(np.polyfit(x, y, 1)[0])
    return slope


def _plain(obj: Any) -> Any:
    """nan/inf as strings, numpy scalars as Python numbers: a checkpoint-safe copy."""
    if isinstance(obj, (float, np.floating)):
        x = float(obj)
        return x if math.isfinite(x) else repr(x)
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.bool_,)):
        return bool(obj)
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


def _unplain(obj: Any) -> Any:
    if isinstance(obj, str) and obj in ("nan", "inf", "-inf"):
        return float(obj)
    if isinstance(obj, dict):
        return {k: _unplain(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_unplain(v) for v in obj]
    return obj


def _num(x: float) -> float | None:
    """A JSON-safe float: nan and inf become None."""
    x = float(x)
    return x if math.isfinite(x) else None
