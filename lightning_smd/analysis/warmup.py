"""The warm-up check: how far above its equilibrium value a layer's angular update starts.

A normalized layer whose weights start far inside their equilibrium norm turns fast in the first steps: its angular
update ``Δ ∝ η‖g‖/‖w‖`` is many times the ``Δ*`` it will settle at. Capping that early rotation is what a
learning-rate warm-up is for (Kosson et al., "Analyzing & Reducing the Need for Learning Rate Warmup in GPT
Training", NeurIPS 2024). :class:`EarlyWatch` keeps, per unit, the largest short moving average of ``Δ`` over the
equilibrium angular update at the *peak* settings of the plan (the largest ``Δ*`` the schedule read ahead reaches),
from the first step until the layer settles: its first observed equilibrium along a followed plan's trajectory (a
stay in the band lasting a relaxation time: during a warm-up the ratio to the instantaneous ``Δ*`` crosses the band
on its way up, which is not settling), or its smoothed ``Δ/Δ*`` entering the band under constant settings. Measured
on the verdict sweep's
task (``benchmarks/verdict_reliability.py``, seed 0): without a warm-up 1.8–5.3× (SGD with momentum, AdamW), with
its 100-step warm-up at most 2.1×, Lion below 1 (its layers start outside their equilibrium norm); a layer that
follows a planned schedule and started above :data:`FAST_START` is said (``SMD035``).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from lightning_smd.analysis.ema import Ema
from lightning_smd.analysis.fields import Field, PerUnit

__all__ = ["EarlyWatch", "FAST_START", "EARLY_STEPS", "warmup_advice"]

#: A start whose averaged angular update exceeds this multiple of the peak ``Δ*`` is said.
FAST_START = 3.0
#: The time constant (steps) of the average of ``Δ`` the check reads: short, as the start is short.
EARLY_STEPS = 20


class EarlyWatch(PerUnit):
    """Per unit: the reference (``Δ*`` at the peak settings), the largest early ``Δ/Δ*_peak`` and when it ended."""

    FIELDS = (
        Field("peak_delta", float, added=True),  # Δ* at the plan's peak settings (nan: no plan read, no check)
        Field("early_ratio", float, added=True),  # the largest EARLY_STEPS-average of Δ over peak_delta while early
        Field("early_ratio_step", int, -1, added=True),
        Field("early_end", int, -1, added=True),  # the first step the smoothed Δ/Δ* was in the band (-1: not yet)
        Field("early_group", int, -1, added=True),  # the unit's param group (whose planned learning rate says the warm-up)
    )

    def __init__(self, n: int, stride: int) -> None:
        super().__init__(n)
        self.delta = Ema(n, EARLY_STEPS, stride)

    def observe(self, idx: np.ndarray, group: np.ndarray, delta: np.ndarray, peak: np.ndarray, settled: np.ndarray, step: int) -> None:
        """One step of units ``idx`` (of param groups ``group``): their measured ``Δ``, the reference ``Δ*`` at the peak
        settings (nan: none), and whether each has settled (the start is over: the caller's test, see
        :meth:`Diagnostics._observe <lightning_smd.analysis.diagnostics.Diagnostics._observe>`)."""
        early = self.early_end[idx] < 0
        if not early.any():
            return
        u = idx[early]
        self.early_group[u] = group[early]
        self.peak_delta[u] = peak[early]
        self.delta.update(u, delta[early])
        with np.errstate(divide="ignore", invalid="ignore"):
            r = self.delta.value(u) / peak[early]
            higher = np.isfinite(r) & ~(r <= self.early_ratio[u])  # (a nan early_ratio: the first value)
        self.early_ratio[u[higher]] = r[higher]
        self.early_ratio_step[u[higher]] = step
        self.early_end[u[settled[early]]] = step

    def fast(self, among: np.ndarray) -> np.ndarray:
        """Units (of the mask ``among``) whose start is over and was faster than :data:`FAST_START` × the peak ``Δ*``."""
        with np.errstate(invalid="ignore"):
            return among & (self.early_ratio > FAST_START) & (self.early_end >= 0)

    def state_dict(self) -> dict[str, Any]:
        out = super().state_dict()
        out["early_delta"] = self.delta.state_dict()
        return out

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        if "early_delta" in state:
            self.delta.load_state_dict(state["early_delta"])


def warmup_advice(lr: np.ndarray | None, tau: float) -> str:
    """What to do about a fast start: lengthen the warm-up ``lr`` (a group's planned learning rates) has, or add one;
    ``tau``: the relaxation time at the peak settings (steps)."""
    steps = f"{math.ceil(tau):,}" if math.isfinite(tau) and tau > 0 else "a relaxation time's worth of"
    if lr is not None and len(lr) > 1 and np.isfinite(lr).any():
        top = float(np.nanmax(lr))
        if top > 0 and lr[0] < 0.5 * top:
            warm = int(np.argmax(lr >= 0.99 * top))
            return (
                f"The learning rate warms up over {warm:,} steps, shorter than the relaxation time at the peak settings "
                f"({steps} steps): lengthen the warm-up to about that, or start from weights with a larger norm."
            )
    return (
        f"A learning-rate warm-up over about {steps} steps (the relaxation time at the peak settings) caps it, as a "
        "warm-up is meant to (Kosson et al., NeurIPS 2024); so does starting from weights with a larger norm."
    )
