"""Per-filter figures (with ``per_filter=True``): how evenly the neurons of a layer rotate.

Kosson et al. (ICML 2024, "Rotational Equilibrium") show that AdamW brings every neuron of a layer to the same
equilibrium angular update, where Adam with an L2 penalty does not (a neuron with larger gradients rotates more),
and that this balance explains part of AdamW's advantage. Every filter (or group) of a per-filter unit has the same
predicted Δ*, so the spread of the filters' angular updates around it is the imbalance: the **rotation imbalance**
of a unit is the coefficient of variation, over its filters, of each filter's angular update (the root of the
moving average over ``ema_steps`` steps of its square). 0 is perfect balance; the 50-step average of a noisy angle
is not exact, and the most even layer of ``benchmarks/rotation_balance.py`` reads 0.05–0.07.

**Dead filters.** A filter the loss no longer reaches (a ReLU that never fires after it, a normalization gain
decayed or set to zero, a channel no later layer reads) gets no gradient: it stops rotating and its norm follows the
optimizer's pure-decay curve, ``∏(1 − e)`` with ``e`` the rule's :meth:`~lightning_smd.analysis.theory.Rule.pure_decay`
(``ηλ`` for AdamW, ``ηλ/(1 − μ)`` for SGD). A filter is **dead** when both hold: over the last relaxation time
``τ = 1/(2e)`` its log-norm fell as the pure-decay curve did, within :data:`PURE_DECAY_TOLERANCE`; and its drive, the
scale-free size of what moves it (its smoothed angular update times ``‖w_i‖^(p/2)``, ``p`` the rule's norm power:
``Δ‖w‖²`` for SGD, whose ``L`` it tracks, ``Δ‖w‖`` for AdamW), fell to a fifteenth of its peak (:data:`DRIVE_FALL`) — ``L``, the square,
by 225×. A filter at a large norm relaxing towards equilibrium also shrinks almost as pure decay, but its drive has
not fallen; a filter that rotates does not follow the curve. Optimizers with no pure-decay curve (Lion, Adam with L2)
get no dead-filter count.

Everything here runs on the host at drains, over the per-filter rows the recorder copies off the device.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from lightning_smd.analysis.fields import Field, PerUnit, vector

__all__ = ["FilterStats", "PURE_DECAY_TOLERANCE", "DRIVE_FALL", "follow_pure_decay"]

#: A filter follows the pure-decay curve when its log-norm change over a relaxation time is within this share of the
#: curve's (dead filters: 0.93–1.02 of it from the window that starts at their death; rotating ones −0.44–0.33).
PURE_DECAY_TOLERANCE = 0.15
#: The drive of a dead filter has fallen below its peak divided by this: its ``L``-like square by 225×, a margin over
#: the issue's 100× for the drive's lag behind the gradient (at 10, `head`'s fast-dying neurons were flagged with their
#: ``L`` 57–94× below its peak; ``benchmarks/dead_filters.py``).
DRIVE_FALL = 15.0


def follow_pure_decay(snapshots: list, decay_log: float, step: float, e_now: float, log_norm: Any) -> tuple[Any, list]:
    """Whether a norm followed the pure-decay curve over the last relaxation time ``τ = 1/(2·e_now)``: against the
    newest of ``snapshots`` (``[step, cumulative Σ log(1 − e), log-norm]`` at earlier drains) at least ``τ`` steps old,
    the log-norm fell as the curve did, within :data:`PURE_DECAY_TOLERANCE` (elementwise for an array of log-norms).
    Returns that (None where no snapshot is old enough, or the curve did not fall) and the snapshots to keep, this
    drain's appended."""
    old = [i for i, s in enumerate(snapshots) if s[0] <= step - 1.0 / (2.0 * e_now)]
    followed = None
    if old:
        _, then_log, then_norm = snapshots[old[-1]]
        curve = decay_log - float(then_log)
        if curve < 0.0:
            with np.errstate(invalid="ignore"):
                followed = np.abs((log_norm - np.asarray(then_norm, dtype=np.float64)) / curve - 1.0) <= PURE_DECAY_TOLERANCE
        snapshots = snapshots[old[-1] :]
    return followed, [*snapshots, [step, decay_log, log_norm]]


class FilterStats(PerUnit):
    """Per unit, the moving average (over ``ema_steps`` steps, bias-corrected, skipping non-finite samples) of
    each filter's squared angular update; :meth:`imbalance` turns it into the rotation imbalance."""

    FIELDS = (
        Field("filter_sq_acc", object, None, added=True, kind=vector),
        Field("filter_sq_weight", object, None, added=True, kind=vector),
        Field("filter_drive_peak", object, None, added=True, kind=vector),
        Field("filter_on_decay", object, None, added=True, kind=vector),
        Field("filter_drive_now", object, None, added=True, kind=vector),
        Field("filter_decay_log", float, 0.0, added=True),
        Field("filter_snapshots", object, list, added=True),
    )
    """``filter_on_decay``: 1 where the filter followed the pure-decay curve over the last relaxation time;
    ``filter_decay_log``: the curve's cumulative ``Σ log(1 − e)``; ``filter_snapshots``: ``[step, decay_log,
    log-norms]`` at the drains of the last relaxation time or so."""

    def __init__(self, n: int, ema_steps: int, stride: int = 1) -> None:
        super().__init__(n)
        self.beta = (1.0 - 1.0 / ema_steps) ** stride

    def update(
        self,
        idx: np.ndarray,
        angles: dict[int, np.ndarray],
        norms_sq: dict[int, np.ndarray] | None = None,
        steps: np.ndarray | None = None,
        decay: np.ndarray | None = None,
        norm_power: np.ndarray | None = None,
    ) -> None:
        """Fold a drained batch in: ``angles`` maps a column of the batch (a position in ``idx``) to its ``[k,
        filters]`` angular updates. Equal to ``k`` sequential updates of an exponential moving average, computed at
        once: a sample at step ``r`` weighs ``(1 − β)·β^m``, ``m`` the finite samples after it. With ``norms_sq``
        (the same columns' squared filter norms after each step), ``steps``, ``decay`` (``[k, columns]``: the rule's
        pure decay ``e`` at each step, nan where it has none) and ``norm_power`` (per column), the dead-filter
        tests too."""
        beta = self.beta
        for col, a in angles.items():
            u = int(idx[col])
            ok = np.isfinite(a)
            x = np.where(ok, a * a, 0.0)
            after = np.cumsum(ok[::-1], axis=0)[::-1] - ok  # finite samples after each step, per filter
            w = np.where(ok, (1.0 - beta) * beta**after, 0.0)
            shrink = beta ** ok.sum(axis=0)
            acc, weight = self.filter_sq_acc[u], self.filter_sq_weight[u]
            if acc is None or len(acc) != a.shape[1]:
                acc, weight = np.zeros(a.shape[1]), np.zeros(a.shape[1])
            self.filter_sq_acc[u] = shrink * acc + (w * x).sum(axis=0)
            self.filter_sq_weight[u] = shrink * weight + w.sum(axis=0)
        if norms_sq is None or steps is None or decay is None or norm_power is None:
            return
        for col, n_sq in norms_sq.items():
            self._follow_decay(int(idx[col]), n_sq[-1], float(steps[-1]), decay[:, col], float(norm_power[col]))

    def _follow_decay(self, u: int, n_sq: np.ndarray, step: float, e: np.ndarray, power: float) -> None:
        """Unit ``u`` after a drain: the drive and its peak, and whether each filter followed the pure-decay curve
        over the last relaxation time (the newest snapshot at least ``τ = 1/(2e)`` steps old)."""
        rms = self.filter_angular_update(u)
        with np.errstate(divide="ignore", invalid="ignore"):
            drive = rms * np.sqrt(n_sq) ** (power / 2.0) if rms is not None and len(rms) == len(n_sq) else np.full(len(n_sq), np.nan)
        peak = self.filter_drive_peak[u]
        peak = drive.copy() if peak is None or len(peak) != len(drive) else np.fmax(peak, drive)
        self.filter_drive_peak[u], self.filter_drive_now[u] = peak, drive
        ok = np.isfinite(e) & (e > 0.0) & (e < 1.0)
        if not ok[-1]:  # no pure-decay curve now (Lion, Adam with L2, no weight decay): nothing to follow
            self.filter_snapshots[u], self.filter_on_decay[u] = [], None
            return
        self.filter_decay_log[u] += float(np.log1p(-e[ok]).sum())
        log_norm = 0.5 * np.log(n_sq)
        snaps = [s for s in self.filter_snapshots[u] if len(s[2]) == len(log_norm)]
        followed, self.filter_snapshots[u] = follow_pure_decay(snaps, self.filter_decay_log[u], step, float(e[-1]), log_norm)
        self.filter_on_decay[u] = None if followed is None else np.asarray(followed, dtype=np.float64)

    def dead(self, u: int) -> np.ndarray | None:
        """Unit ``u``'s dead filters (a boolean per filter), or None where it cannot be told (no pure-decay curve,
        or not yet a relaxation time of per-filter rows)."""
        on_decay, drive, peak = self.filter_on_decay[u], self.filter_drive_now[u], self.filter_drive_peak[u]
        if on_decay is None or drive is None or peak is None or not (len(on_decay) == len(drive) == len(peak)):
            return None
        with np.errstate(invalid="ignore"):
            return (np.asarray(on_decay) > 0.5) & (np.asarray(drive) <= np.asarray(peak) / DRIVE_FALL)

    def dead_counts(self) -> np.ndarray:
        """Per unit, the count of dead filters (nan where it cannot be told)."""
        out = np.full(self.n, np.nan)
        for u in range(self.n):
            d = self.dead(u)
            if d is not None:
                out[u] = float(d.sum())
        return out

    def filter_angular_update(self, u: int) -> np.ndarray | None:
        """Unit ``u``'s per-filter angular update (root of the moving average of its square), or None."""
        acc, weight = self.filter_sq_acc[u], self.filter_sq_weight[u]
        if acc is None:
            return None
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.sqrt(np.where(weight > 0, acc / np.where(weight > 0, weight, 1.0), np.nan))

    def imbalance(self) -> np.ndarray:
        """Per unit, the coefficient of variation over its filters of :meth:`filter_angular_update` (nan for a unit
        with fewer than two measured filters, or none that rotated)."""
        out = np.full(self.n, np.nan)
        for u in range(self.n):
            r = self.filter_angular_update(u)
            if r is None:
                continue
            r = r[np.isfinite(r)]
            if len(r) >= 2 and r.mean() > 0:
                out[u] = float(r.std() / r.mean())
        return out

    def forget(self, u: int) -> None:
        """Unit ``u`` diverged: its averages start afresh."""
        self.filter_sq_acc[u], self.filter_sq_weight[u] = None, None
        self.filter_drive_peak[u] = self.filter_on_decay[u] = self.filter_drive_now[u] = None
        self.filter_snapshots[u] = []
