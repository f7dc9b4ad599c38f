"""The words of the judgement: the run's :class:`Verdict`, each unit's :class:`UnitState` and :class:`Agreement`.

Each is a ``str`` enum: it compares equal to, formats as and is written to JSON as its value, so the summary
reads ``"equilibrium"``, and ``state == "equilibrium"`` holds for code that compares with strings.
"""

from __future__ import annotations

from enum import Enum

__all__ = ["Verdict", "UnitState", "Agreement", "STATES"]


class _Word(str, Enum):
    def __str__(self) -> str:
        return self.value

    __format__ = str.__format__


class Verdict(_Word):
    """The run's verdict."""

    EQUILIBRIUM = "equilibrium"
    NOT_REACHED = "not_reached"
    NOT_APPLICABLE = "not_applicable"
    DIVERGED = "diverged"


class UnitState(_Word):
    """Where one tracked unit stands, as of a judgement."""

    APPROACHING = "approaching"
    """Not yet steady since the start."""
    EQUILIBRIUM = "equilibrium"
    """Steady and counted (agrees, or off the prediction without ``require_agreement``)."""
    OFF_PREDICTION = "off_prediction"
    """Steady but off the prediction, with ``require_agreement``: not counted."""
    STEADY_FAR_OFF = "steady_far_off"
    """Steady, but further from the prediction than ``max_deviation``: another regime."""
    REEQUILIBRATING = "re-equilibrating"
    """The hyper-parameters changed after an equilibrium; not yet steady again."""
    DEPARTED = "departed"
    """Was in equilibrium, drifts now without a change of the hyper-parameters."""
    VANISHING_NOISE = "vanishing_noise"
    """The gradient noise vanished: no equilibrium."""
    DEAD = "dead"
    """The loss no longer reaches the weight: its gradient statistic fell 100× from its peak while the loss did not,
    and its norm followed the pure weight-decay curve (:mod:`lightning_smd.analysis.dead`)."""
    NO_EQUILIBRIUM = "no_equilibrium"
    """No weight decay (or no learning rate): the theory has no equilibrium."""
    NO_PREDICTION = "no_prediction"
    """Unknown optimizer (or no theory for these settings): measured, not judged."""
    DIVERGED = "diverged"
    """The weights became non-finite (NaN or inf): training diverged; nothing more is measured."""


class Agreement(_Word):
    """A steady unit's steady ratio against the prediction."""

    AGREES = "agrees"
    OFF_PREDICTION = "off_prediction"
    """Its interval lies entirely outside ``1 ± tolerance``."""
    FAR_OFF = "far_off"
    """Its interval lies entirely outside ``1 ± max_deviation``."""


#: Every unit state's value, in declaration order.
STATES = tuple(s.value for s in UnitState)
