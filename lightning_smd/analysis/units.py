"""What a tracked unit is: a weight (or weight + bias) whose scale the model's output does not see, as detection
describes it, and when a unit named by ``include`` is clearly not scale-invariant.

Plain data, no torch: the analysis and the summary read it; :mod:`lightning_smd.engine.detect` finds the units.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["NormalizedWeight", "not_scale_invariant", "ORTHOGONALITY_TOLERANCE", "NOT_ORTHOGONAL_WARNING"]

#: ``|cos(∇L(W), W)|`` below this counts as orthogonal (float32 gradients give ~1e-6 for invariant
#: weights; weights that are not invariant typically give 1e-2 or more).
ORTHOGONALITY_TOLERANCE = 1e-3
#: A tracked unit whose ``|cos(∇L(W), W)|`` exceeds this is *clearly* not orthogonal and gets a warning.
#: Between the two values lie the real but small effects of a normalization's eps on tiny activations.
NOT_ORTHOGONAL_WARNING = 1e-2


@dataclass(frozen=True)
class NormalizedWeight:
    """One tracked unit: a weight (or weight + bias) whose scale the model's output does not see."""

    name: str
    """The unit's name: the weight's parameter name (``+bias`` appended when the bias belongs to it)."""
    params: tuple[str, ...]
    """Parameter names whose concatenation is scale-invariant."""
    shape: tuple[int, ...]
    """Shape of the weight."""
    numel: int
    """Number of elements of the unit (all its parameters)."""
    layer: str
    """The op using the weight (``Conv2d``, ``conv2d`` for a functional call, ``weight_norm`` …)."""
    norm: str
    """The normalization(s) that absorb its scale."""
    granularity: str
    """``filter`` (each output filter/row is invariant on its own), ``group`` or ``tensor``."""
    found_by: str
    """``fx`` (traced data flow), ``run`` (recorded from a real forward pass) or ``include`` (named by the user)."""
    group_size: int | None = None
    """Filters per invariant group when ``granularity == "group"``."""
    filter_dim: int = 0
    """The weight dimension that indexes output filters (1 for transposed convolutions)."""
    verification: float | None = None
    """``|cos(∇L(W), W)|`` on a real batch at the unit's granularity (the largest over filters/groups)."""
    refinable: bool = False
    """The structure leaves the granularity open (channels reshaped or split before the normalization, a weight
    divided by its own statistics, BatchNorm after a Linear): the numerical check may refine or coarsen it."""


def not_scale_invariant(unit: NormalizedWeight) -> str | None:
    """Why a unit named by ``include`` is not scale-invariant — its gradient is clearly not orthogonal to it on the
    first batch (``|cos(g, w)| > NOT_ORTHOGONAL_WARNING``) — or None. Such a unit is measured and logged, but the SMD
    prediction does not apply to it: it does not count in the verdict."""
    cos = unit.verification
    if unit.found_by != "include" or cos is None or not cos > NOT_ORTHOGONAL_WARNING:
        return None
    return f"not scale-invariant (|cos(g, w)| = {cos:.2g} on the first batch): the SMD prediction does not apply"
