"""lightning_smd: Spherical Motion Dynamics monitoring for PyTorch Lightning.

Add ``SMDCallback()`` to ``Trainer(callbacks=[...])``: it finds the model's normalized (scale-invariant)
weights, measures each one's norm and angular update after every optimizer step, and compares them with
the equilibrium that Spherical Motion Dynamics predicts for the optimizer settings in force.
"""

from typing import Any

from lightning_smd.detect import Detection, NormalizedWeight, find_normalized_weights
from lightning_smd.diagnose import Diagnostics, DiagnosticsConfig
from lightning_smd.measure import StepBatch, StepRecorder
from lightning_smd.monitor import SMDMonitor
from lightning_smd.report import EquilibriumNotReachedError, SMDWarning, format_summary_table


def __getattr__(name: str) -> Any:
    # Lightning is imported on first use of the callback, not by ``import lightning_smd``: the CLI, the plain
    # PyTorch monitor and the detector work without it, and start in a fraction of the time.
    if name == "SMDCallback":
        from lightning_smd.callback import SMDCallback

        return SMDCallback
    raise AttributeError(f"module 'lightning_smd' has no attribute {name!r}")

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
