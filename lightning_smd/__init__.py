"""lightning_smd: Spherical Motion Dynamics monitoring for PyTorch Lightning.

Add ``SMDCallback()`` to ``Trainer(callbacks=[...])``: it finds the model's normalized (scale-invariant)
weights, measures each one's norm and angular update after every optimizer step, and compares them with
the equilibrium that Spherical Motion Dynamics predicts for the optimizer settings in force.
"""

from lightning_smd.callback import EquilibriumNotReachedError, SMDCallback, SMDWarning, format_summary_table
from lightning_smd.detect import Detection, NormalizedWeight, find_normalized_weights
from lightning_smd.diagnose import Diagnostics, DiagnosticsConfig
from lightning_smd.measure import StepBatch, StepRecorder
from lightning_smd.monitor import SMDMonitor

__version__ = "0.1.0"

__all__ = [
    "SMDCallback",
    "SMDMonitor",
    "SMDWarning",
    "EquilibriumNotReachedError",
    "Detection",
    "NormalizedWeight",
    "find_normalized_weights",
    "Diagnostics",
    "DiagnosticsConfig",
    "StepBatch",
    "StepRecorder",
    "format_summary_table",
    "__version__",
]
