"""Bias-corrected exponential moving averages of a per-unit vector: the smoothed figures that are logged."""

from __future__ import annotations

from typing import Any

import numpy as np

from lightning_smd.analysis.fields import plain, unplain

__all__ = ["Ema"]


class Ema:
    """Bias-corrected exponential moving averages of a vector, skipping nan entries.

    ``steps`` is the time constant; one sample every ``stride`` steps decays as much as ``stride`` steps would."""

    def __init__(self, n: int, steps: int, stride: int = 1) -> None:
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

    def clear(self, unit: int) -> None:
        """Forget unit ``unit``'s average (it shows nan until its next finite sample)."""
        self.acc[unit], self.weight[unit] = 0.0, 0.0

    def state_dict(self) -> dict[str, Any]:
        return {"acc": plain(self.acc.tolist()), "weight": plain(self.weight.tolist())}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.acc = np.asarray(unplain(state["acc"]), dtype=np.float64)
        self.weight = np.asarray(unplain(state["weight"]), dtype=np.float64)
