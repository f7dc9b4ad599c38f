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
(``ηλ`` for AdamW, ``ηλ/(1 − μ)`` for SGD). A filter is **dead** when both hold, the tests of a dead layer
(:mod:`lightning_smd.analysis.dead`) filter by filter: over the last relaxation time ``τ = 1/(2e)`` its log-norm fell as
the pure-decay curve did, within :data:`PURE_DECAY_TOLERANCE`; and its gradient statistic ``L_i = ‖g_i‖²·‖w_i‖²``
(recorded on the device at every step, averaged over :data:`GRADIENT_WINDOW` of the smoothing window) fell to its
peak / :data:`DEAD_FACTOR` or below. A filter at a large norm relaxing towards equilibrium also shrinks almost as
pure decay, but its gradient has not gone; a filter that rotates does not follow the curve. Optimizers with no
pure-decay curve (Lion, Adam with L2) get no dead-filter count.

Everything here runs on the host at drains, over the per-filter rows the recorder copies off the device.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from lightning_smd.analysis.fields import Field, PerUnit, vector

__all__ = ["FilterStats", "PURE_DECAY_TOLERANCE", "DEAD_FACTOR", "GRADIENT_WINDOW", "follow_pure_decay"]

#: A filter follows the pure-decay curve when its log-norm change over a relaxation time is within this share of the
#: curve's (dead filters: 0.93–1.02 of it from the window that starts at their death; rotating ones −0.44–0.33).
PURE_DECAY_TOLERANCE = 0.15
#: ``L`` of a dead filter, and of a dead layer, is at most its peak over this.
DEAD_FACTOR = 100.0
#: A filter's ``L`` is averaged over this share of the smoothing window (``ema_steps``; 25 steps by default): noisy
#: enough per filter to need an average, and a cut filter's average falls 100× in ``4.6 × 25`` steps, under the
#: relaxation time of the benchmark tasks (125-200 steps), where the full window's 230 steps made it the slower test.
GRADIENT_WINDOW = 0.5


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


def _fold(acc: np.ndarray | None, weight: np.ndarray | None, x: np.ndarray, beta: float) -> tuple[np.ndarray, np.ndarray]:
    """``k`` sequential updates of an exponential moving average (per column of ``x``, ``[k, filters]``, non-finite
    samples skipped), at once: a sample weighs ``(1 − β)·β^m``, ``m`` the finite samples after it. Returns the new
    accumulator and weight (their ratio is the bias-corrected average); they start afresh when the width changed."""
    ok = np.isfinite(x)
    after = np.cumsum(ok[::-1], axis=0)[::-1] - ok  # finite samples after each step, per filter
    w = np.where(ok, (1.0 - beta) * beta**after, 0.0)
    shrink = beta ** ok.sum(axis=0)
    if acc is None or weight is None or len(acc) != x.shape[1]:
        acc, weight = np.zeros(x.shape[1]), np.zeros(x.shape[1])
    return shrink * acc + (w * np.where(ok, x, 0.0)).sum(axis=0), shrink * weight + w.sum(axis=0)


class FilterStats(PerUnit):
    """Per unit, the moving average (over ``ema_steps`` steps, bias-corrected, skipping non-finite samples) of
    each filter's squared angular update; :meth:`imbalance` turns it into the rotation imbalance."""

    FIELDS = (
        Field("filter_sq_acc", object, None, added=True, kind=vector),
        Field("filter_sq_weight", object, None, added=True, kind=vector),
        Field("filter_on_decay", object, None, added=True, kind=vector),
        Field("filter_decay_log", float, 0.0, added=True),
        Field("filter_snapshots", object, list, added=True),
        Field("filter_grad_acc", object, None, added=True, kind=vector),
        Field("filter_grad_weight", object, None, added=True, kind=vector),
        Field("filter_grad_peak", object, None, added=True, kind=vector),
    )
    """``filter_on_decay``: 1 where the filter followed the pure-decay curve over the last relaxation time;
    ``filter_decay_log``: the curve's cumulative ``Σ log(1 − e)``; ``filter_snapshots``: ``[step, decay_log,
    log-norms]`` at the drains of the last relaxation time or so; ``filter_grad_*``: the moving average of each filter's
    gradient statistic ``L_i`` (over :data:`GRADIENT_WINDOW` of the window) and its peak (once the average holds half
    its weight)."""

    def __init__(self, n: int, ema_steps: int, stride: int = 1) -> None:
        super().__init__(n)
        self.beta = (1.0 - 1.0 / ema_steps) ** stride
        self.grad_beta = (1.0 - 1.0 / max(GRADIENT_WINDOW * ema_steps, 1.0)) ** stride

    def update(
        self,
        idx: np.ndarray,
        angles: dict[int, np.ndarray],
        norms_sq: dict[int, np.ndarray] | None = None,
        steps: np.ndarray | None = None,
        decay: np.ndarray | None = None,
        grad_stat: dict[int, np.ndarray] | None = None,
    ) -> None:
        """Fold a drained batch in: ``angles`` maps a column of the batch (a position in ``idx``) to its ``[k,
        filters]`` angular updates. Equal to ``k`` sequential updates of an exponential moving average, computed at
        once: a sample at step ``r`` weighs ``(1 − β)·β^m``, ``m`` the finite samples after it. ``grad_stat``: the
        same columns' ``[k, filters]`` gradient statistics ``L_i``, averaged the same way over a shorter window. With
        ``norms_sq`` (the same columns' squared filter norms after each step), ``steps`` and ``decay`` (``[k,
        columns]``: the rule's pure decay ``e`` at each step, nan where it has none), the pure-decay test too."""
        for col, a in angles.items():
            u = int(idx[col])
            self.filter_sq_acc[u], self.filter_sq_weight[u] = _fold(self.filter_sq_acc[u], self.filter_sq_weight[u], a * a, self.beta)
        for col, g in (grad_stat or {}).items():
            u = int(idx[col])
            acc, weight = _fold(self.filter_grad_acc[u], self.filter_grad_weight[u], g, self.grad_beta)
            self.filter_grad_acc[u], self.filter_grad_weight[u] = acc, weight
            with np.errstate(divide="ignore", invalid="ignore"):
                now = np.where(weight > 0.5, acc / np.where(weight > 0, weight, 1.0), np.nan)
            peak = self.filter_grad_peak[u]
            self.filter_grad_peak[u] = now if peak is None or len(peak) != len(now) else np.fmax(peak, now)
        if norms_sq is None or steps is None or decay is None:
            return
        for col, n_sq in norms_sq.items():
            self._follow_decay(int(idx[col]), n_sq[-1], float(steps[-1]), decay[:, col])

    def _follow_decay(self, u: int, n_sq: np.ndarray, step: float, e: np.ndarray) -> None:
        """Unit ``u`` after a drain: whether each filter followed the pure-decay curve over the last relaxation time
        (the newest snapshot at least ``τ = 1/(2e)`` steps old)."""
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
        not yet a relaxation time of per-filter rows, no gradient statistic yet)."""
        on_decay, acc, weight, peak = self.filter_on_decay[u], self.filter_grad_acc[u], self.filter_grad_weight[u], self.filter_grad_peak[u]
        if on_decay is None or acc is None or weight is None or peak is None or not (len(on_decay) == len(acc) == len(peak)):
            return None
        with np.errstate(divide="ignore", invalid="ignore"):
            return (np.asarray(on_decay) > 0.5) & (acc / weight <= peak / DEAD_FACTOR)

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
        self.filter_grad_acc[u] = self.filter_grad_weight[u] = self.filter_grad_peak[u] = None
        self.filter_on_decay[u] = None
        self.filter_snapshots[u] = []
