"""SMD monitoring for a hand-written PyTorch loop or Lightning Fabric: no Trainer, same numbers.

.. code-block:: python

    from lightning_smd import SMDMonitor

    monitor = SMDMonitor(model, optimizer)             # detects, hooks the optimizer
    for step, (x, y) in enumerate(loader):
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(); loss.backward(); optimizer.step()   # measured by a step post-hook
        if monitor.should_log(step):
            my_logger.log(monitor.metrics(), step=step)          # one host sync, at log steps only
    print(monitor.format_summary())
    monitor.close(summary_path="smd_summary.json")

The monitor measures every step of the optimizers it was given (their step hooks), exactly as
:class:`lightning_smd.SMDCallback` does; :meth:`metrics` returns the same ``smd/*`` keys the callback
logs, :meth:`summary` the same summary. This module does not import Lightning.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from typing import Any

import torch

from lightning_smd.detect import Detection, find_normalized_weights
from lightning_smd.diagnose import Diagnostics, DiagnosticsConfig
from lightning_smd.measure import StepRecorder
from lightning_smd.report import SMDWarning, filter_spec, format_summary_table, optimizer_info, write_summary
from lightning_smd.theory import unwrap_optimizer

__all__ = ["SMDMonitor"]


def _inner_model(model: torch.nn.Module) -> torch.nn.Module:
    """The user's module behind Fabric's ``_FabricModule`` and (Distributed)DataParallel."""
    for _ in range(4):
        inner = getattr(model, "_original_module", None)  # lightning Fabric
        if isinstance(inner, torch.nn.Module):
            model = inner
            continue
        if type(model).__name__ in ("DistributedDataParallel", "DataParallel") and isinstance(getattr(model, "module", None), torch.nn.Module):
            model = model.module
            continue
        break
    return model


class SMDMonitor:
    """Spherical Motion Dynamics monitoring without Lightning's Trainer.

    Args:
        model: the model (a Fabric-wrapped or DDP-wrapped module is unwrapped).
        optimizers: the optimizer, or a list of them (Fabric's wrapped optimizers are unwrapped). Must
            hold the model's parameters already.
        example_input: optional input batch: detection then also runs the numerical invariance check (one
            forward/backward on it; parameters, buffers and gradients are restored) and can analyse models
            torch.fx cannot trace.
        tolerance, window, ema_steps, min_fraction, require_agreement, max_deviation, drift_limit, significance: the
            equilibrium criteria (see ``SMDCallback``).
        include, exclude: parameter-name globs to add to / remove from the detected weights.
        log_every_n_steps: the interval :meth:`should_log` answers for (steps buffered on the device).
        use_momentum_buffer, per_filter, every_n_steps, keep_history: as for ``SMDCallback``.

    Raises:
        ValueError: no normalized weight was found (nothing to monitor); the message says why and what to
            pass in ``include``.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        optimizers: torch.optim.Optimizer | Sequence[torch.optim.Optimizer],
        *,
        example_input: Any = None,
        tolerance: float = 0.1,
        window: int = 100,
        ema_steps: int = 50,
        min_fraction: float = 0.9,
        require_agreement: bool = False,
        max_deviation: float = 0.3,
        drift_limit: float | None = None,
        significance: float = 0.01,
        include: Sequence[str] | None = None,
        exclude: Sequence[str] | None = None,
        log_every_n_steps: int = 50,
        use_momentum_buffer: bool = True,
        per_filter: bool = False,
        every_n_steps: int = 1,
        keep_history: bool = False,
    ) -> None:
        if log_every_n_steps < 1:
            raise ValueError(f"log_every_n_steps must be >= 1, got {log_every_n_steps}")
        self.model = _inner_model(model)
        opts = [optimizers] if not isinstance(optimizers, (list, tuple)) else list(optimizers)
        self.optimizers = [unwrap_optimizer(o) for o in opts]
        self.config = DiagnosticsConfig(
            tolerance=tolerance,
            window=window,
            ema_steps=ema_steps,
            min_fraction=min_fraction,
            require_agreement=require_agreement,
            max_deviation=max_deviation,
            drift_limit=drift_limit,
            significance=significance,
        )
        self.log_every_n_steps = int(log_every_n_steps)
        self.every_n_steps = int(every_n_steps)
        self.detection: Detection = find_normalized_weights(self.model, example_input, include, exclude)
        units = list(self.detection.units)
        if not units:
            why = self.detection.error or "no Conv/Linear/Embedding weight feeds a normalization (BatchNorm, GroupNorm, LayerNorm, RMSNorm, F.normalize, ...)"
            raise ValueError(
                f"SMDMonitor found no normalized (scale-invariant) weight in {type(self.model).__name__}: {why}. "
                "Pass include=['<parameter-name glob>'] for weights whose normalization detection cannot see."
            )
        named = dict(self.model.named_parameters())
        filters = [filter_spec(u) for u in units] if per_filter else None
        self.recorder = StepRecorder(
            [[named[p] for p in u.params] for u in units],
            self.optimizers,
            capacity=self.log_every_n_steps // self.every_n_steps + 2,
            use_momentum_buffer=use_momentum_buffer,
            unit_filters=filters,
            every_n_steps=self.every_n_steps,
        )
        self.diagnostics = Diagnostics(units, self.config, keep_history=keep_history, stride=self.every_n_steps)
        unknown = sorted({type(s.optimizer).__name__ for s in self.recorder.slots if s.rule.name == "unknown"})
        if unknown:
            warnings.warn(
                f"No SMD theory is registered for {', '.join(unknown)}: weight norms and angular updates are measured, "
                "but there is no prediction to compare with (lightning_smd.theory.register adds one).",
                SMDWarning,
                stacklevel=2,
            )
        self._closed = False
        self._failed: set[int] = set()

    @property
    def units(self) -> list[str]:
        """Names of the tracked units."""
        return [u.name for u in self.diagnostics.units]

    def should_log(self, step: int) -> bool:
        """Whether ``step`` (0-based, counted by the caller) ends a log interval."""
        return (int(step) + 1) % self.log_every_n_steps == 0

    def update(self) -> None:
        """Move the steps recorded on the device to the host (one synchronization) and fold them into the
        diagnostics. :meth:`metrics` and :meth:`summary` call it."""
        for batch in self.recorder.drain():
            self.diagnostics.update(batch)
        for slot in self.recorder.slots:
            if slot.error is not None and slot.index not in self._failed:
                self._failed.add(slot.index)
                warnings.warn(f"SMD measurement of optimizer {slot.index} failed and stopped: {slot.error}", SMDWarning, stacklevel=3)

    def metrics(self, per_layer: bool = True) -> dict[str, float]:
        """The ``smd/*`` metrics as of the last recorded step (the keys the callback logs)."""
        self.update()
        return self.diagnostics.metrics(per_layer=per_layer)

    def summary(self) -> dict[str, Any]:
        """The run summary (the callback's ``smd_summary.json`` content)."""
        if not self._closed:
            self.update()
        out = self.diagnostics.summary()
        out["complete"] = self._closed
        out["optimizers"] = [optimizer_info(i, o, self.recorder) for i, o in enumerate(self.optimizers)]
        out["extra_memory_bytes"] = self.recorder.extra_bytes
        out["every_n_steps"] = self.every_n_steps
        out["not_tracked"] = dict(self.detection.rejected)
        out["detection_method"] = self.detection.method
        return out

    def format_summary(self) -> str:
        """The per-layer table of measured against predicted values, and the verdict."""
        return format_summary_table(self.summary())

    def close(self, summary_path: str | os.PathLike | None = None) -> dict[str, Any]:
        """Remove the optimizer hooks, free the device buffers, optionally write the summary JSON (atomically);
        returns the final summary."""
        self.update()
        self._closed = True
        summary = self.summary()
        self.recorder.close()
        if summary_path is not None:
            write_summary(str(summary_path), summary)
        return summary

    def __enter__(self) -> SMDMonitor:
        return self

    def __exit__(self, *exc: Any) -> None:
        if not self._closed:
            self.close()
