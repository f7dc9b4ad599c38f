"""The analysis layer: numpy and the standard library only, no torch, no Lightning.

What the recorder measured (:class:`StepBatch`) goes in; per unit, predictions, smoothed figures, the steady-state
judgement, events, the verdict and the summary's rows come out. ``lightning-smd check`` re-judges summaries with
the same rules, without torch.
"""

from lightning_smd.analysis.batch import StepBatch
from lightning_smd.analysis.diagnostics import *  # noqa: F403 - the facade's public names
from lightning_smd.analysis.diagnostics import __all__ as _facade
from lightning_smd.analysis.units import NormalizedWeight

__all__ = ["StepBatch", "NormalizedWeight", *_facade]
