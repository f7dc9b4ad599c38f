"""Dead layers: the loss no longer reaches a normalized weight.

A weight whose gradient statistic ``L`` has fallen far below its peak while the training loss has not (the
difference from vanishing gradient noise, :class:`~lightning_smd.analysis.events.VanishingWatch`, which is about the
loss going to zero) has lost its gradient, not its noise: nothing pulls it to an equilibrium, and its norm follows the
optimizer's pure-decay curve ``∏(1 − e)`` (:meth:`~lightning_smd.analysis.theory.Rule.pure_decay`). Its effective
learning rate ``η/‖w‖²`` grows as it shrinks, until whatever gradient is left rotates it again — AdamW even at
``Δ*``, since it normalizes the tiny gradient — so the state is latched: a unit is **dead** from the drain at which
``L`` is at most its peak / :data:`DEAD_FACTOR`, the loss has not fallen below its peak / ``loss_factor``, and its
norm has followed the pure-decay curve (within :data:`~lightning_smd.analysis.filters.PURE_DECAY_TOLERANCE`) over the
last relaxation time ``τ = 1/(2e)``; it stays dead while ``L`` stays that low and the loss has not vanished.

Host-side, once per drain, over the statistics already recorded (the unit's norm after the last step, ``L``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from lightning_smd.analysis.fields import Field, PerUnit
from lightning_smd.analysis.filters import DEAD_FACTOR, follow_pure_decay

__all__ = ["DeadWatch", "DeadLayer", "DEAD_FACTOR", "pure_decay_rates"]


def pure_decay_rates(batch: Any) -> np.ndarray:
    """``[k, units]``: the rule's pure decay ``e`` at each step of a drained batch, per unit of it (nan: none)."""
    rule = batch.rule
    per_group = np.array([[rule.pure_decay(h) for h in step] for step in batch.hyper], dtype=np.float64)
    return per_group[:, batch.unit_group]


@dataclass(frozen=True)
class DeadLayer:
    """``unit`` found dead at ``step``: ``L`` fell from ``peak`` to ``now``."""

    unit: int
    step: int
    peak: float
    now: float


class DeadWatch(PerUnit):
    """Per unit: the pure-decay curve followed (cumulative ``Σ log(1 − e)`` and the norm at recent drains), and the
    dead state (``dead_since``: the drain step it was found dead, -1 when not; ``dead_first``: the first time)."""

    FIELDS = (
        Field("dead_decay_log", float, 0.0, added=True),
        Field("dead_snapshots", object, list, added=True),
        Field("dead_since", int, -1, added=True),
        Field("dead_first", int, -1, added=True),
    )

    def observe(
        self, idx: np.ndarray, norm_sq: np.ndarray, step: int, e: np.ndarray, L: np.ndarray, peak: np.ndarray, loss_ok: bool
    ) -> list[DeadLayer]:
        """A drain of the units ``idx``: ``norm_sq`` their ``‖w‖²`` after its last step ``step``; ``e`` ``[k, len(idx)]``
        the rule's pure decay at each of its steps (nan: none); ``L`` and ``peak`` the smoothed gradient statistic and
        its peak; ``loss_ok``: the training loss is known and has not vanished."""
        out = []
        for j, u in enumerate(idx.tolist()):
            on_decay = self._follow(u, float(norm_sq[j]), float(step), e[:, j])
            fallen = bool(np.isfinite(L[j]) and peak[j] > 0.0 and L[j] <= peak[j] / DEAD_FACTOR)
            if self.dead_since[u] >= 0 and not (fallen and loss_ok):
                self.dead_since[u] = -1  # revived: its gradient came back (or the loss vanished: another diagnosis)
            elif self.dead_since[u] < 0 and fallen and loss_ok and on_decay:
                self.dead_since[u] = step
                if self.dead_first[u] < 0:
                    self.dead_first[u] = step
                out.append(DeadLayer(u, step, float(peak[j]), float(L[j])))
        return out

    def _follow(self, u: int, norm_sq: float, step: float, e: np.ndarray) -> bool:
        """Whether unit ``u``'s norm followed the pure-decay curve over the last relaxation time."""
        ok = np.isfinite(e) & (e > 0.0) & (e < 1.0)
        if not len(e) or not ok[-1] or not (norm_sq > 0.0 and math.isfinite(norm_sq)):
            self.dead_snapshots[u] = []
            return False
        self.dead_decay_log[u] += float(np.log1p(-e[ok]).sum())
        log_norm = 0.5 * math.log(norm_sq)
        followed, self.dead_snapshots[u] = follow_pure_decay(list(self.dead_snapshots[u]), self.dead_decay_log[u], step, float(e[-1]), log_norm)
        return bool(followed)

    def forget(self, u: int) -> None:
        """Unit ``u`` diverged."""
        self.dead_snapshots[u], self.dead_since[u] = [], -1
