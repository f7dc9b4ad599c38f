"""The moving equilibrium: each unit's predicted trajectory over a planned schedule, and what it forecasts.

Under a schedule (warm-up, cosine, linear-to-zero, WSD, OneCycle) the instantaneous equilibrium ``Δ*(t)`` moves and
a layer follows it with a lag. The theory's norm variable ``q = ‖w‖^p`` (``p = 4`` for SGD, 2 for decoupled decay)
relaxes linearly towards its equilibrium ``q*(t)`` with the time constant ``τ_q(t)`` of the settings in force
(``docs/theory.md``; [Wan] Eq. 8/12 for SGD, [Kosson] for AdamW and Lion), and the angular update is
``Δ = Δ*·sqrt(q*/q)``. Over the planned settings this is a linear recursion,

    q_{t+1} = ρ_t·q_t + (1 − ρ_t)·q*_t,     ρ_t = exp(−1/τ_q(t)),

and ``q*_t = s_t·K`` splits into a factor of the settings ``s_t`` (:meth:`Rule.equilibrium_scale`) and one of the unit
``K`` (its gradient statistic ``L`` for SGD, its size — or the measured mean square of its update — for AdamW).

Adam's second moment ``v`` follows the gradient's scale ``∝ 1/‖w‖²`` with a lag of ``1/(1 − β2)`` steps: while the
norm moves, the normalized gradient's mean square ``ĝ² = (1/q)/v`` is not 1, and it scales both the update's push on
the norm and the angle: ``q_{t+1} = ρ_t·q_t + (1 − ρ_t)·q*_t·ĝ²_t``, ``v_{t+1} = β2·v_t + (1 − β2)/q_{t+1}`` and
``Δ = Δ*·sqrt(ĝ²·q*/q)`` (the slow mode of :func:`~lightning_smd.analysis.theory.adam_relaxation_time`: the norm relaxes
up to 4× slower than ``1/(2ηλ)`` while ``Δ/Δ*`` does not). Measured on the scale-invariant simulation through warm-up
+ cosine, WSD and OneCycle, this keeps ``Δ/Δ̂`` within 3 % (median) and 9 % (90th percentile) where the model without
the lag is 15 % and 24 % off (``tests/test_trajectory.py``). Without the lag (SGD, Lion) ``ĝ² = 1``.

What the measurement does not know and the forecast does is the future: the planned settings and how ``q`` relaxes
under them, with the unit's statistics assumed to persist. From ``r_t = Δ̂_t/Δ*_t = sqrt(q*_t/q_t)`` the forecast
reads, per unit: the step it first reaches the equilibrium band ``|r − 1| ≤ tolerance`` (and stays for a relaxation
time), and the freeze-out — the step after which the schedule outruns it and ``r`` leaves the band for good (the
annealing tail, where ``Δ/Δ*`` falls about like ``sqrt(η_end/η_freeze)`` by design).

Pure numpy; the settings come in as columns of param-group values (what :mod:`lightning_smd.engine.schedule` reads
ahead from the schedulers) and go through the optimizer's :class:`~lightning_smd.analysis.theory.Rule`.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from lightning_smd.analysis.theory import Rule, mean_update_transient

__all__ = ["Plan", "plan_from_columns", "Forecast", "forecast_units", "knots"]

#: Relative change of a planned setting that starts a new knot (the settings between are taken as equal).
KNOT_RTOL = 2e-3
#: At most this many distinct settings are evaluated by the rule (the knot tolerance doubles until it fits).
MAX_KNOTS = 4096
#: A plan whose settings change at no more steps than this (in every param group) has each change timed as a
#: re-equilibration.
FEW_CHANGES = 10


def knots(columns: Mapping[str, np.ndarray], rtol: float = KNOT_RTOL, limit: int = MAX_KNOTS) -> np.ndarray:
    """The indices where a new setting starts: the first entry, and every entry where some column moved by more
    than ``rtol`` (relative) from the setting in force (0 ↔ non-zero always counts). At most ``limit`` (``rtol``
    doubles until they fit)."""
    n = len(next(iter(columns.values()))) if columns else 0
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    cols = [np.asarray(c, dtype=np.float64) for c in columns.values()]
    while True:
        out = [0]
        ref = [c[0] for c in cols]
        changing = np.zeros(n, dtype=bool)
        for c in cols:
            changing[1:] |= c[1:] != c[:-1]
        for i in np.nonzero(changing)[0].tolist():
            moved = False
            for k, c in enumerate(cols):
                v, r = c[i], ref[k]
                if v != r and ((v == 0.0) != (r == 0.0) or not (abs(v - r) <= rtol * max(abs(v), abs(r)))):
                    moved = True
                    break
            if moved:
                out.append(i)
                ref = [c[i] for c in cols]
                if len(out) > limit:
                    break
        if len(out) <= limit:
            return np.asarray(out, dtype=np.int64)
        rtol *= 2.0


def _group_dict(columns: Mapping[str, np.ndarray], i: int, settings: Mapping[str, object]) -> dict[str, object]:
    """A param-group-like dict of entry ``i`` (``"betas.0"``, ``"betas.1"`` rebuilt as ``betas``)."""
    group: dict[str, object] = dict(settings)
    tuples: dict[str, dict[int, float]] = {}
    for key, col in columns.items():
        name, dot, pos = key.rpartition(".")
        if dot and pos.isdigit():
            tuples.setdefault(name, {})[int(pos)] = float(col[i])
        else:
            group[key] = float(col[i])
    for name, parts in tuples.items():
        group[name] = tuple(parts[k] for k in sorted(parts))
    if "nesterov" in group:
        group["nesterov"] = bool(group["nesterov"])
    return group


@dataclass
class Plan:
    """The planned settings of one optimizer's param groups, turned into the theory's series.

    Entry ``i`` of every array is the optimizer step ``first_step + i``; the trajectory arrays (``log_a``, ``s``) have
    one more entry: the state *before* each step, and after the last."""

    first_step: int
    """The optimizer step of entry 0 (the first planned step)."""
    source: str
    """How the plan was read (one line)."""
    truncated: bool
    lr: np.ndarray
    """``[groups, n]``."""
    weight_decay: np.ndarray
    delta: np.ndarray
    """Δ* ``[groups, n]``."""
    scale: np.ndarray
    """``∝ q*`` at fixed statistics ``[groups, n]`` (the rule's :meth:`~Rule.equilibrium_scale`)."""
    tau: np.ndarray
    """The norm variable's time constant ``[groups, n]`` (what ``Δ/Δ*`` relaxes with)."""
    power: np.ndarray
    """``p`` of ``q = ‖w‖^p`` per group."""
    hyper: list[list[dict[str, float]]]
    """Per group, the rule's hyper-parameters at each knot."""
    knot_index: list[np.ndarray]
    lag: np.ndarray
    """β2 of a second moment that lags the gradient's scale, per group (0: none)."""
    start: np.ndarray = field(default_factory=lambda: np.zeros(0))
    """β1 of a bias-corrected first moment, per group (0: none): the updates of the optimizer's first steps are larger
    by :func:`~lightning_smd.analysis.theory.update_transient`, which pushes the norm and turns the weights faster."""
    tau_ref: np.ndarray = field(init=False)
    peak_delta: np.ndarray = field(init=False)
    """Per group, the largest Δ* of the plan (the peak settings' equilibrium angular update)."""
    log_a: np.ndarray = field(init=False)
    """``Σ_{s<i} log ρ_s`` per group, ``[groups, n + 1]`` (``ρ^k`` over any stretch of entries)."""

    def __post_init__(self) -> None:
        g, n = self.delta.shape
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # a group without any finite Δ*: nan
            self.peak_delta = np.nanmax(self.delta, axis=1) if n else np.full(g, np.nan)
        self.log_a = np.zeros((g, n + 1))
        with np.errstate(divide="ignore", invalid="ignore"):
            log_rho = np.where(np.isfinite(self.tau) & (self.tau > 0), -1.0 / self.tau, 0.0)
        self.log_a[:, 1:] = np.cumsum(log_rho, axis=1)
        with np.errstate(invalid="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # a group without any finite τ: nan
            self.tau_ref = np.nanmin(np.where(np.isfinite(self.tau) & (self.tau > 0), self.tau, np.nan), axis=1) if n else np.full(g, np.nan)
        """Per group, the fastest relaxation the plan reaches (the judged windows' time constant under the plan)."""

    @property
    def n_steps(self) -> int:
        return int(self.delta.shape[1])

    @property
    def last_step(self) -> int:
        return self.first_step + self.n_steps - 1

    def index(self, step: int) -> int:
        """Entry of optimizer ``step`` (clipped to the plan)."""
        return int(min(max(step - self.first_step, 0), self.n_steps - 1))

    def varies(self) -> bool:
        """The settings move over the plan (by more than the knot tolerance)."""
        return any(len(k) > 1 for k in self.knot_index)

    def stepwise(self) -> bool:
        """The settings change at a few steps only (at most :data:`FEW_CHANGES` in every group: step decays, a short
        warm-up): each change is also timed as a re-equilibration (``SMD022``), as without a plan."""
        return all(len(k) - 1 <= FEW_CHANGES for k in self.knot_index)

    def followed(self) -> bool:
        """Judge against the trajectory: the settings move."""
        return self.varies()

    def hyper_at(self, group: int, step: int) -> dict[str, float]:
        """The rule's hyper-parameters planned for ``step``."""
        i = self.index(step)
        k = int(np.searchsorted(self.knot_index[group], i, side="right")) - 1
        return self.hyper[group][max(k, 0)]

    def transient(self, group: int, i0: int, i1: int) -> float:
        """The mean of the update's start-up factor over entries ``i0 .. i1 − 1`` (entry ``i`` is the optimizer's step
        ``first_step + i``): 1 past the first ``~1/(1 − β1)`` steps, or without a bias-corrected first moment."""
        b1 = float(self.start[group]) if group < len(self.start) else 0.0
        return mean_update_transient(b1, self.first_step + i0, self.first_step + i1 - 1)

    def ratio(self, group: int, i: int, q: np.ndarray, v: np.ndarray, K: np.ndarray) -> np.ndarray:
        """``Δ̂/Δ*`` before entry ``i`` of units in state ``(q, v)`` with equilibrium factor ``K`` (the angle of the step
        of entry ``i``, its start-up factor included)."""
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            g2 = 1.0 / (q * v) if self.lag[group] > 0.0 else 1.0
            return np.sqrt(g2 * self.transient(group, i, i + 1) * self.scale[group, i] * K / q)

    def advance(self, group: int, i0: int, i1: int, q: np.ndarray, v: np.ndarray, K: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The state ``(q, v)`` before entry ``i1`` from ``(q, v)`` before ``i0`` (``i0 ≤ i1 ≤ n``), in one stretch with the
        settings of ``i0`` (exact for one entry; for several, the settings and ``ĝ²`` held over the stretch)."""
        if i1 <= i0:
            return q, v
        rho = math.exp(self.log_a[group, i1] - self.log_a[group, i0])
        scale = self.scale[group, i0]
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            lag = self.lag[group]
            g2 = 1.0 / (q * v) if lag > 0.0 else 1.0
            target = scale * K * g2 * self.transient(group, i0, i1)
            new_q = np.where(np.isfinite(target) & (target > 0), rho * q + (1.0 - rho) * target, q)
            if lag > 0.0:
                b = lag ** (i1 - i0)
                v = b * v + (1.0 - b) / new_q
        return new_q, v

    def path(self, group: int, i0: int, q: np.ndarray, v: np.ndarray, K: np.ndarray, at: np.ndarray) -> np.ndarray:
        """``[len(at), units]``: ``Δ̂/Δ*`` before each entry of ``at`` (increasing, ``≥ i0``), from ``(q, v)`` before
        ``i0``, stepping from grid point to grid point."""
        out = np.empty((len(at), len(q)))
        i = i0
        for j, a in enumerate(at.tolist()):
            q, v = self.advance(group, i, a, q, v, K)
            i = a
            out[j] = self.ratio(group, a, q, v, K)
        return out


def plan_from_columns(
    rule: Rule,
    columns: Sequence[Mapping[str, np.ndarray]],
    first_step: int,
    source: str,
    truncated: bool = False,
    settings: Mapping[str, object] | None = None,
) -> Plan:
    """A :class:`Plan` from each param group's planned values (``columns[g][key]``, one entry per step from
    ``first_step``; tuple keys split as ``"betas.0"``), the rule's predictions evaluated at the knots
    (:func:`knots`) and held between them. ``settings``: what the rule reads from the optimizer object
    (:meth:`Rule.optimizer_settings`)."""
    settings = dict(settings or {})
    groups = len(columns)
    n = min((len(next(iter(c.values()))) for c in columns if c), default=0)
    arrays = {name: np.full((groups, n), np.nan) for name in ("lr", "weight_decay", "delta", "scale", "tau")}
    power = np.full(groups, 2.0)
    lag = np.zeros(groups)
    start = np.zeros(groups)
    hyper: list[list[dict[str, float]]] = []
    knot_index: list[np.ndarray] = []
    for g, cols in enumerate(columns):
        cols = {k: np.asarray(v, dtype=np.float64)[:n] for k, v in cols.items()}
        idx = knots(cols)
        hs = [rule.hyper(_group_dict(cols, int(i), settings)) for i in idx]
        lengths = np.diff(np.append(idx, n))
        values = {
            "lr": [h.get("lr", math.nan) for h in hs],
            "weight_decay": [h.get("weight_decay", math.nan) for h in hs],
            "delta": [rule.angular_update(h) for h in hs],
            "scale": [rule.equilibrium_scale(h) for h in hs],
            "tau": [rule.norm_time_constant(h) for h in hs],
        }
        for name, vals in values.items():
            arrays[name][g] = np.repeat(np.asarray(vals, dtype=np.float64), lengths)
        if hs:
            power[g] = float(rule.norm_exponents(hs[0])[0])
            lag[g] = float(rule.second_moment_lag(hs[0]))
            start[g] = float(rule.first_moment_start(hs[0]))
        hyper.append(hs)
        knot_index.append(idx)
    return Plan(
        first_step, source, truncated, arrays["lr"], arrays["weight_decay"], arrays["delta"], arrays["scale"], arrays["tau"],
        power, hyper, knot_index, lag, start,
    )  # fmt: skip


@dataclass(frozen=True)
class Forecast:
    """Per unit (arrays), what the trajectory predicts from the step it was made at (``-1``: never / none)."""

    made_at: int
    first_equilibrium: np.ndarray
    """The first step of a stay in the band lasting a relaxation time (or to the freeze-out or the end)."""
    freeze_out: np.ndarray
    """The last step in the band, when the trajectory leaves it for good before the end."""
    final_ratio: np.ndarray
    """``Δ̂/Δ*`` at the last planned step."""
    constant_first_equilibrium: np.ndarray
    """The first equilibrium were the peak settings ahead kept from now on (what a decay cuts short)."""
    first_decay: np.ndarray
    """The first planned step where the settings start moving the equilibrium down (Δ* falls by the tolerance)."""
    peak_tau: np.ndarray
    """The norm variable's time constant at the peak settings ahead."""
    ends_rising: np.ndarray
    """The trajectory ends below the band and rising: still re-equilibrating after a step down when the plan ends."""
    touches: np.ndarray
    """The trajectory itself (not its moving average) enters the band at some step ahead: what the judgement needs to
    count the unit (a stay of a relaxation time is what the first equilibrium needs)."""

    def rows(self) -> list[dict[str, Any]]:
        return [
            {
                "forecast_equilibrium_step": _opt(self.first_equilibrium[u]),
                "forecast_freeze_out_step": _opt(self.freeze_out[u]),
                "forecast_final_ratio": float(self.final_ratio[u]) if np.isfinite(self.final_ratio[u]) else None,
            }
            for u in range(len(self.first_equilibrium))
        ]


def _opt(v: Any) -> int | None:
    return int(v) if v >= 0 else None


def forecast_units(
    plan: Plan, group: np.ndarray, q_now: np.ndarray, v_now: np.ndarray, K: np.ndarray, step: int, tolerance: float, points: int = 1024,
    smoothed: tuple[np.ndarray, np.ndarray, float] | None = None,
) -> Forecast:  # fmt: skip
    """The forecast of units in param groups ``group`` whose model state is ``(q_now, v_now)`` before optimizer step
    ``step + 1`` and whose equilibrium factor is ``K``, evaluated on a grid of at most ``points`` steps.

    ``smoothed``: the state ``(accumulator, weight, per-step decay)`` of the moving average of the measured ``Δ/Δ*``
    (:class:`~lightning_smd.analysis.ema.Ema`): the band events are then those of the forecast path as that average
    will show it (what the observed first equilibrium and freeze-out are read from), not of the path itself."""
    n_units = len(group)
    first = np.full(n_units, -1, dtype=np.int64)
    frozen = np.full(n_units, -1, dtype=np.int64)
    final = np.full(n_units, np.nan)
    constant = np.full(n_units, -1, dtype=np.int64)
    decay_at = np.full(n_units, -1, dtype=np.int64)
    peak_tau = np.full(n_units, np.nan)
    rising = np.zeros(n_units, dtype=bool)
    touches = np.zeros(n_units, dtype=bool)
    i0 = min(max(step + 1 - plan.first_step, 0), plan.n_steps)
    n = plan.n_steps
    if i0 >= n:
        return Forecast(step, first, frozen, final, constant, decay_at, peak_tau, rising, touches)
    stride = max(1, -(-(n - i0) // points))
    at = np.arange(i0, n, stride)
    if at[-1] != n - 1:
        at = np.append(at, n - 1)
    for g in np.unique(group):
        m = np.nonzero(group == g)[0]
        r = plan.path(int(g), i0, q_now[m], v_now[m], K[m], at)  # before the step of each entry
        seen = r if smoothed is None else _smooth_path(r, smoothed[0][m], smoothed[1][m], smoothed[2] ** stride)
        with np.errstate(invalid="ignore"):
            inside = np.abs(seen - 1.0) <= tolerance
            touches[m] = (np.abs(r - 1.0) <= tolerance).any(axis=0)
        tau = plan.tau[g, at]
        final[m] = r[-1]
        if len(at) > 1:
            with np.errstate(invalid="ignore"):
                rising[m] = (r[-1] < 1.0 - tolerance) & (r[-1] > r[-2])
        for j, u in enumerate(m.tolist()):
            first[u], frozen[u] = _band_events(inside[:, j], at, tau, plan.first_step)
        # were the peak settings kept from now on: the time to the band from q_now (q relaxes linearly to q*)
        ahead = np.nan_to_num(plan.delta[g, i0:], nan=0.0)
        i_peak = i0 + int(np.argmax(ahead))
        peak_tau[m] = plan.tau[g, i_peak]
        with np.errstate(divide="ignore", invalid="ignore"):
            z = q_now[m] / (plan.scale[g, i_peak] * K[m])
        for j, u in enumerate(m.tolist()):
            t = _time_to_band(float(z[j]), float(peak_tau[u]), tolerance)
            constant[u] = step + 1 + int(math.ceil(t)) if math.isfinite(t) else -1
        down = np.nonzero(ahead < (1.0 - tolerance) * np.maximum.accumulate(ahead))[0]
        decay_at[m] = plan.first_step + i0 + int(down[0]) if down.size else -1
    return Forecast(step, first, frozen, final, constant, decay_at, peak_tau, rising, touches)


def _smooth_path(r: np.ndarray, acc: np.ndarray, weight: np.ndarray, beta: float) -> np.ndarray:
    """``r`` (``[points, units]``) as a bias-corrected moving average with per-point decay ``beta`` shows it, from the
    average's state ``(acc, weight)``: in closed form (``y_k = b^k y_0 + (1−b) Σ_j b^(k−j) x_j``), in chunks short enough
    that ``b^−k`` stays finite. A unit without a state starts at its first point."""
    out = np.empty_like(r)
    acc = np.where(np.isfinite(acc), acc, 0.0)
    weight = np.where(np.isfinite(weight), weight, 0.0)
    if not 0.0 < beta < 1.0:
        return r.copy()
    chunk = max(1, min(len(r), int(300.0 / -math.log(beta))))
    for a in range(0, len(r), chunk):
        x = r[a : a + chunk]
        k = np.arange(1, len(x) + 1, dtype=np.float64)[:, None]
        bk = beta**k
        with np.errstate(invalid="ignore", over="ignore"):
            s = np.cumsum(np.nan_to_num(x, nan=0.0) * beta ** -k, axis=0)
            acc_k = bk * (acc + (1.0 - beta) * s)
            w_k = bk * weight + (1.0 - bk)
            out[a : a + chunk] = np.where(np.isfinite(x), acc_k / w_k, np.nan)
        acc, weight = acc_k[-1], w_k[-1]
    return out


def _band_events(inside: np.ndarray, at: np.ndarray, tau: np.ndarray, first_step: int) -> tuple[int, int]:
    """``(first equilibrium, freeze-out)`` steps of one unit from its in-band flags on the grid ``at``."""
    first = frozen = -1
    if not inside.any():
        return first, frozen
    # stays: entries that start a stay in the band of at least a relaxation time (or one that lasts to the end)
    edges = np.diff(np.concatenate([[0], inside.astype(np.int8), [0]]))
    starts, stops = np.nonzero(edges == 1)[0], np.nonzero(edges == -1)[0]  # [start, stop) on the grid
    for a, b in zip(starts.tolist(), stops.tolist()):
        length = at[b - 1] - at[a] + 1
        if b == len(at) or not (length < tau[a]):
            first = first_step + int(at[a])
            break
    if first >= 0 and not inside[-1]:
        frozen = first_step + int(at[stops[-1] - 1])
    return first, frozen


def _time_to_band(z: float, tau: float, tolerance: float) -> float:
    """Steps for ``q/q*`` to go from ``z`` into the band where ``|sqrt(q*/q) − 1| ≤ tolerance``."""
    if not (math.isfinite(z) and z > 0.0 and math.isfinite(tau) and tau > 0.0):
        return math.nan
    lo, hi = 1.0 / (1.0 + tolerance) ** 2, 1.0 / (1.0 - tolerance) ** 2 if tolerance < 1.0 else math.inf
    if lo <= z <= hi:
        return 0.0
    target = hi if z > hi else lo
    return tau * math.log((z - 1.0) / (target - 1.0))
