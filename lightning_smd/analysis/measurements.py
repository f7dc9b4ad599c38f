"""What was measured and predicted per unit as of its latest step, and the smoothed figures that are logged."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from lightning_smd.analysis.ema import Ema
from lightning_smd.analysis.fields import Field, PerUnit
from lightning_smd.analysis.theory import Rule, UnknownRule, registered_rules
from lightning_smd.analysis.units import NormalizedWeight

__all__ = ["Measurements", "EMAS"]

#: The smoothed figures (exponential moving averages, per unit), by their checkpoint key.
EMAS = ("delta", "ratio", "unit_grad", "filter_delta", "predicted_smooth")


class Measurements(PerUnit):
    """Per unit: the latest step, its measured and predicted figures, its settings and rule, and the moving averages
    of Δ (``delta``), Δ/Δ* (``ratio``), Δ* smoothed like Δ (``predicted_smooth``: the table's two columns then divide
    to their ratio), the gradient statistic ``L`` (``unit_grad``) and the per-filter RMS (``filter_delta``)."""

    FIELDS = (
        Field("steps", int, 0),
        Field("last_delta", float),
        Field("norm", float),
        Field("predicted", float),
        Field("relaxation", float),
        Field("tau_ratio", float),
        Field("norm_power", float),
        Field("decay", float),  # e of the decoupled weight decay at the latest step (nan: not decoupled)
        Field("effective_lr", float),
        Field("initial_norm", float),
        Field("hyper", object, None),
        Field("optimizer", object, -1),
        Field("reasons", object, None),
    )

    def __init__(self, n: int, ema_steps: int, stride: int) -> None:
        super().__init__(n)
        self.delta, self.ratio, self.unit_grad, self.filter_delta, self.predicted_smooth = (Ema(n, ema_steps, stride) for _ in EMAS)
        self.rules: list[Rule | None] = [None] * n
        self.per_filter = False
        """Per-filter RMS angular updates were measured."""

    def first_batch(self, idx: np.ndarray, batch: Any) -> None:
        """A batch's units, rule and optimizer; the initial norm of units seen for the first time."""
        first = np.isnan(self.initial_norm[idx])
        self.initial_norm[idx[first]] = np.sqrt(batch.norm_sq_before[0][first])
        for u in idx:
            self.rules[u] = batch.rule
            self.optimizer[u] = batch.optimizer_index

    def last_of_batch(self, idx: np.ndarray, batch: Any) -> None:
        """The figures of a batch's last step that are kept as they are (not smoothed)."""
        self.last_delta[idx] = batch.angular_update[-1]
        self.norm[idx] = np.sqrt(batch.norm_sq_after[-1])
        lr_last = np.array([batch.hyper[-1][int(g)].get("lr", math.nan) for g in batch.unit_group])
        with np.errstate(divide="ignore", invalid="ignore"):
            self.effective_lr[idx] = lr_last / batch.norm_sq_after[-1]

    def forget(self, u: int) -> None:
        """Unit ``u`` diverged: the averages would keep showing its last finite values, a diverged layer shows none."""
        for name in EMAS:
            getattr(self, name).clear(u)

    def predicted_weight_norm(self, units: Sequence[NormalizedWeight]) -> np.ndarray:
        """The equilibrium norm for the latest settings and smoothed ``L`` (nan without a rule)."""
        out = np.full(len(units), np.nan)
        L = self.unit_grad.value()
        for u, (rule, h) in enumerate(zip(self.rules, self.hyper)):
            if rule is not None and h is not None:
                out[u] = rule.weight_norm(h, float(L[u]), units[u].numel)
        return out

    def state_dict(self) -> dict[str, Any]:
        out = super().state_dict()
        out.update({name: getattr(self, name).state_dict() for name in EMAS})
        out["rules"] = [r.name if r is not None else None for r in self.rules]
        out["per_filter"] = self.per_filter
        return out

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        for name in EMAS:
            if name in state:  # a checkpoint written before this average existed: it restarts
                getattr(self, name).load_state_dict(state[name])
        known = {r.name: r for r in registered_rules().values()}
        self.rules = [known.get(n, UnknownRule(optimizer=n)) if n is not None else None for n in state["rules"]]
        self.per_filter = bool(state.get("per_filter", False))
