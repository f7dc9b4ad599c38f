"""Per-filter figures (with ``per_filter=True``): how evenly the neurons of a layer rotate.

Kosson et al. (ICML 2024, "Rotational Equilibrium") show that AdamW brings every neuron of a layer to the same
equilibrium angular update, where Adam with an L2 penalty does not (a neuron with larger gradients rotates more),
and that this balance explains part of AdamW's advantage. Every filter (or group) of a per-filter unit has the same
predicted Δ*, so the spread of the filters' angular updates around it is the imbalance: the **rotation imbalance**
of a unit is the coefficient of variation, over its filters, of each filter's angular update (the root of the
moving average over ``ema_steps`` steps of its square). 0 is perfect balance; sampling noise alone leaves a floor
of a few hundredths (the 50-step average of a noisy angle).

Everything here runs on the host at drains, over the per-filter rows the recorder copies off the device.
"""

from __future__ import annotations

import numpy as np

from lightning_smd.analysis.fields import Field, PerUnit, vector

__all__ = ["FilterStats"]


class FilterStats(PerUnit):
    """Per unit, the moving average (over ``ema_steps`` steps, bias-corrected, skipping non-finite samples) of
    each filter's squared angular update; :meth:`imbalance` turns it into the rotation imbalance."""

    FIELDS = (Field("filter_sq_acc", object, None, added=True, kind=vector), Field("filter_sq_weight", object, None, added=True, kind=vector))

    def __init__(self, n: int, ema_steps: int, stride: int = 1) -> None:
        super().__init__(n)
        self.beta = (1.0 - 1.0 / ema_steps) ** stride

    def update(self, idx: np.ndarray, angles: dict[int, np.ndarray]) -> None:
        """Fold a drained batch in: ``angles`` maps a column of the batch (a position in ``idx``) to its ``[k,
        filters]`` angular updates. Equal to ``k`` sequential updates of an exponential moving average, computed at
        once: a sample at step ``r`` weighs ``(1 − β)·β^m``, ``m`` the finite samples after it."""
        beta = self.beta
        for col, a in angles.items():
            u = int(idx[col])
            ok = np.isfinite(a)
            x = np.where(ok, a * a, 0.0)
            after = np.cumsum(ok[::-1], axis=0)[::-1] - ok  # finite samples after each step, per filter
            w = np.where(ok, (1.0 - beta) * beta**after, 0.0)
            decay = beta ** ok.sum(axis=0)
            acc, weight = self.filter_sq_acc[u], self.filter_sq_weight[u]
            if acc is None or len(acc) != a.shape[1]:
                acc, weight = np.zeros(a.shape[1]), np.zeros(a.shape[1])
            self.filter_sq_acc[u] = decay * acc + (w * x).sum(axis=0)
            self.filter_sq_weight[u] = decay * weight + w.sum(axis=0)

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
