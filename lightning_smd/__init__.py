"""lightning_smd: Spherical Motion Dynamics monitoring for PyTorch Lightning.

Add ``SMDCallback()`` to ``Trainer(callbacks=[...])``: it finds the model's normalized (scale-invariant)
weights, measures each one's norm and angular update after every optimizer step, and compares them with
the equilibrium that Spherical Motion Dynamics predicts for the optimizer settings in force.

The package is layered; each layer imports only the ones below it (``tests/test_layering.py`` keeps it so):

- ``messages``, ``options``: every warning text, every option check (standard library only);
- ``analysis``: the theory, the per-unit statistics, the judgement, the verdict and the summary's rows (numpy, no
  torch): what ``lightning-smd check`` needs;
- ``io``: the summary as a table and a file, the loggers' extras, the dashboards, the command line (no torch);
- ``engine``: detection, the on-device recorder and the :class:`~lightning_smd.engine.session.Session` (torch, no
  Lightning);
- ``frontends``: :class:`SMDCallback` (the only module that imports Lightning) and :class:`SMDMonitor`.

Only the names below are the public API; torch and Lightning are imported on first use of a name that needs them.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings
from typing import Any

from lightning_smd.analysis import Diagnostics, DiagnosticsConfig, NormalizedWeight, StepBatch
from lightning_smd.analysis.recommend import Recommendation, recommend, weight_decay_for
from lightning_smd.io.report import EquilibriumNotReachedError, format_summary_table
from lightning_smd.messages import SMDWarning

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
    "recommend",
    "weight_decay_for",
    "param_groups",
    "Recommendation",
    "__version__",
]

#: Public names whose modules import torch (or, for the callback, Lightning): loaded on first use, so that
#: ``import lightning_smd`` and the command line start without them.
_LAZY = {
    "SMDCallback": "lightning_smd.frontends.callback",
    "SMDMonitor": "lightning_smd.frontends.monitor",
    "Detection": "lightning_smd.engine.detect",
    "find_normalized_weights": "lightning_smd.engine.detect",
    "StepRecorder": "lightning_smd.engine.measure",
    "param_groups": "lightning_smd.engine.groups",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'lightning_smd' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


#: Modules of releases before the layers, and where they are now. Importing an old path still works (it is the
#: new module, under a second name) and says where it went, once, as a DeprecationWarning.
MOVED_MODULES = {
    "theory": "analysis.theory",
    "steady": "analysis.steady",
    "diagnose": "analysis",
    "detect": "engine.detect",
    "measure": "engine.measure",
    "session": "engine.session",
    "simulate": "engine.simulate",
    "callback": "frontends.callback",
    "monitor": "frontends.monitor",
    "report": "io.report",
    "loggers": "io.loggers",
    "dashboard": "io.dashboard",
    "workspace": "io.workspace",
    "plot": "io.plot",
    "cli": "io.cli",
}


class _MovedModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds ``lightning_smd.<old name>`` and loads the module that replaced it."""

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        head, _, tail = fullname.rpartition(".")
        if head != __name__ or tail not in MOVED_MODULES:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec: Any) -> Any:
        new = f"{__name__}.{MOVED_MODULES[spec.name.rpartition('.')[2]]}"
        warnings.warn(f"{spec.name} is now {new}; the old path will be removed in a later release", DeprecationWarning, stacklevel=2)
        return importlib.import_module(new)

    def exec_module(self, module: Any) -> None:
        """The module is the new one, loaded already."""


if not any(isinstance(f, _MovedModules) for f in sys.meta_path):
    sys.meta_path.append(_MovedModules())
