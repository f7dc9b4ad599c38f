"""Notable events, each found by one small watcher with its own per-unit state: a diverged layer (non-finite
weights), a norm spike after equilibrium, vanishing gradient noise. A re-equilibration (a change of the settings
after equilibrium) is found by :class:`~lightning_smd.analysis.tracking.Changes`.

Each watcher's ``observe`` returns the new events as dataclasses; the session turns them into warnings.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from lightning_smd.analysis.config import DiagnosticsConfig
from lightning_smd.analysis.fields import Field, PerUnit, num, plain, unplain

__all__ = ["VanishingNoise", "NormSpike", "Reequilibrating", "Diverged", "LeftPlan", "Event", "Divergence", "Spikes", "VanishingWatch"]


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


@dataclass(frozen=True)
class LeftPlan:
    """The settings of optimizer ``optimizer`` left the schedule read at fit start at ``step`` (``why``)."""

    optimizer: int
    step: int
    why: str


Event = VanishingNoise | NormSpike | Reequilibrating | Diverged | LeftPlan


class Divergence(PerUnit):
    """The first step at which a unit's ``‖w‖²`` is non-finite: a NaN or inf anywhere in its weights. (The recorder's
    float64 ``‖w‖²`` of such a tensor is itself nan or inf: the check costs no measurement.)"""

    FIELDS = (Field("diverged_step", int, -1, added=True),)
    """The optimizer step after which the unit's weights were first non-finite (-1: never)."""

    def observe(self, idx: np.ndarray, norm_sq: np.ndarray, step: int) -> list[Diverged]:
        bad = ~np.isfinite(norm_sq) & (self.diverged_step[idx] < 0)
        out = []
        for j in np.nonzero(bad)[0]:
            u = int(idx[j])
            self.diverged_step[u] = step
            out.append(Diverged(u, step, float(norm_sq[j])))
        return out

    @property
    def diverged(self) -> np.ndarray:
        """Units whose weights became non-finite."""
        return self.diverged_step >= 0


class Spikes(PerUnit):
    """A step whose angular update exceeds ``spike_factor·Δ*`` in a layer that had reached equilibrium: a norm spike
    (counted per unit; the first 100 kept with their step for the summary)."""

    FIELDS = (Field("spike_count", int, 0), Field("spiking", bool, False, key="_spiking"))
    KEPT = 100

    def __init__(self, n: int, factor: float) -> None:
        super().__init__(n)
        self.factor = factor
        self.spikes: list[dict[str, Any]] = []

    def observe(self, idx: np.ndarray, ratio: np.ndarray, step: int, reached: np.ndarray, names: Sequence[str]) -> list[NormSpike]:
        """``ratio``: this step's Δ/Δ*; ``reached``: the units (of ``idx``) that had reached equilibrium before."""
        spiking = np.nan_to_num(ratio, nan=0.0) > self.factor
        rising = spiking & ~self.spiking[idx] & reached
        self.spiking[idx] = spiking
        out = []
        for j in np.nonzero(rising)[0]:
            u = int(idx[j])
            self.spike_count[u] += 1
            if len(self.spikes) < self.KEPT:
                self.spikes.append({"step": step, "layer": names[u], "ratio": float(ratio[j])})
            out.append(NormSpike(u, step, float(ratio[j])))
        return out

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "spikes": plain(self.spikes)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.spikes = unplain(state["spikes"])


class VanishingWatch(PerUnit):
    """Vanishing gradient noise: ``L`` fell below its peak / ``vanishing_factor`` while the smoothed ratio is below
    ``1 − 2·tolerance`` — once the layer has had its settling time since the last change (during the first
    relaxation the ratio is often that low while learning lowers ``L`` from its early peak: not vanishing noise)
    — and the training loss fell below its peak / ``loss_factor`` (without a known loss, ``L`` must fall by
    ``vanishing_factor_without_loss``). The diagnosis claims the loss approaches zero: it needs the evidence."""

    FIELDS = (Field("unit_grad_peak", float, 0.0), Field("vanishing_since", int, -1), Field("vanishing_first", int, -1))

    def __init__(self, n: int, config: DiagnosticsConfig) -> None:
        super().__init__(n)
        self.config = config
        self.loss_now = math.nan
        """Mean training loss of the last log interval (:meth:`observe_loss`), or nan if unknown."""
        self.loss_peak = math.nan

    def loss_alive(self) -> bool:
        """The training loss is known and has not vanished (not below its peak / ``loss_factor``): a collapsed ``L``
        then means a lost gradient, not lost noise (:mod:`lightning_smd.analysis.dead`)."""
        return math.isfinite(self.loss_now) and not self.loss_now < self.loss_peak / self.config.loss_factor

    def observe_loss(self, mean_loss: float) -> None:
        value = float(mean_loss)
        if not math.isfinite(value):
            return
        self.loss_now = value
        self.loss_peak = value if not math.isfinite(self.loss_peak) else max(self.loss_peak, value)

    def observe(self, idx: np.ndarray, L: np.ndarray, warm: np.ndarray, smoothed: np.ndarray, settled: np.ndarray, step: int) -> list[VanishingNoise]:
        """``L``: the smoothed gradient statistic of the units ``idx``; ``warm``: past its first ~ema_steps/2 steps;
        ``smoothed``: the smoothed ratio; ``settled``: the settling time since the last change has passed."""
        cfg = self.config
        if math.isfinite(self.loss_now):
            factor = cfg.vanishing_factor
            loss_gone = self.loss_now < self.loss_peak / cfg.loss_factor
        else:
            factor, loss_gone = cfg.vanishing_factor_without_loss, True
        self.unit_grad_peak[idx] = np.where(warm, np.fmax(self.unit_grad_peak[idx], L), self.unit_grad_peak[idx])
        collapsed = warm & settled & loss_gone & (L < self.unit_grad_peak[idx] / factor) & (smoothed < 1.0 - 2.0 * cfg.tolerance)
        new = collapsed & (self.vanishing_since[idx] < 0)
        out = []
        for j in np.nonzero(new)[0]:
            u = int(idx[j])
            self.vanishing_since[u] = step
            if self.vanishing_first[u] < 0:
                self.vanishing_first[u] = step
            out.append(VanishingNoise(u, step, float(self.unit_grad_peak[u]), float(L[j]), float(smoothed[j])))
        # recovered: L came back, or the smoothed ratio is back within the tolerance (a gradient statistic that merely
        # settled lower than its early peak, as learning lowers it, is not vanishing noise)
        recovered = ~collapsed & (self.vanishing_since[idx] >= 0) & ((L > self.unit_grad_peak[idx] / 2.0) | (smoothed >= 1.0 - cfg.tolerance))
        self.vanishing_since[idx[recovered]] = -1
        return out

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "loss": [num(self.loss_now), num(self.loss_peak)]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        loss_now, loss_peak = state.get("loss", [None, None])
        self.loss_now = math.nan if loss_now is None else float(loss_now)
        self.loss_peak = math.nan if loss_peak is None else float(loss_peak)
