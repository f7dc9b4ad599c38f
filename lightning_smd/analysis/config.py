"""The criteria of the equilibrium verdict: :class:`DiagnosticsConfig`, every field checked when it is made."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

from lightning_smd.options import OptionError, check_bool, check_int, check_number

__all__ = ["DiagnosticsConfig", "WINDOW_RELAXATION_TIMES"]

#: The judged window is the second half of the samples since the last change of the hyper-parameters, and spans
#: this many relaxation times at least / at most (and ``window`` / ``4·window`` steps): a unit is judged once
#: twice the shortest window has passed since the change.
WINDOW_RELAXATION_TIMES = (2.0, 16.0)


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

    def criteria(self) -> dict[str, Any]:
        """The summary's ``criteria``: every field, and ``drift_limit`` as applied."""
        out = asdict(self)
        out["drift_limit"] = self.drift
        return out

    @classmethod
    def from_criteria(cls, criteria: Mapping[str, Any], **overrides: Any) -> DiagnosticsConfig:
        """The criteria a summary records (its ``criteria``; unknown keys are ignored, missing ones default), with
        ``overrides`` that are not None."""
        known = {f.name for f in fields(cls)}
        given = {k: v for k, v in criteria.items() if k in known and v is not None}
        given.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**given)
