"""SMD monitoring for a hand-written PyTorch loop or Lightning Fabric: no Trainer, same numbers.

.. code-block:: python

    from lightning_smd import SMDMonitor

    monitor = SMDMonitor(model, optimizer)             # detects, hooks the optimizer
    for step, (x, y) in enumerate(loader):
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(); loss.backward(); optimizer.step()   # measured by a step post-hook
        monitor.observe_loss(loss)                                 # optional, no sync
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
from collections.abc import Sequence
from typing import Any

import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

from lightning_smd.engine.detect import find_normalized_weights
from lightning_smd.options import OptionError, check_bool, check_choice, check_int, check_patterns
from lightning_smd.analysis.diagnostics import DiagnosticsConfig, Verdict
from lightning_smd.io.report import TABLE_ROWS, EquilibriumNotReachedError, format_summary_table
from lightning_smd.engine.session import GATE_MODES, Session, SessionView, eval_mode_batch_norms
from lightning_smd.analysis.theory import unwrap_optimizer

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


class SMDMonitor(SessionView):
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
        max_steps: the planned number of optimizer steps, if known: enables the warnings that compare it with
            what equilibrium needs, and the ``"stop"`` gate.
        on_no_equilibrium: ``"warn"`` (default) warns at :meth:`close` when the verdict is ``not_reached``;
            ``"raise"`` raises :class:`~lightning_smd.EquilibriumNotReachedError` from :meth:`close` (after the
            summary is written); ``"stop"`` sets :attr:`should_stop` once equilibrium is clearly impossible in
            ``max_steps`` (your loop checks it).
        use_momentum_buffer, per_filter, every_n_steps, keep_history, track_distance: as for ``SMDCallback``.

    A model without a normalized weight gets a warning (code ``SMD001``) and a ``not_applicable`` verdict, as
    with the callback. The first optimizer step runs the numerical check of invariance (one host
    synchronization) before the step changes the weights.
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
        max_steps: int | None = None,
        on_no_equilibrium: str = "warn",
        use_momentum_buffer: bool = True,
        per_filter: bool = False,
        every_n_steps: int = 1,
        keep_history: bool = False,
        track_distance: bool = False,
    ) -> None:
        # every option checked before anything is hooked: a ValueError names the option, the value and what is accepted
        if not isinstance(model, torch.nn.Module):
            raise OptionError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        opts = [optimizers] if not isinstance(optimizers, (list, tuple)) else list(optimizers)
        unwrapped = [unwrap_optimizer(o) for o in opts]
        if not unwrapped or any(not hasattr(o, "param_groups") or isinstance(o, type) for o in unwrapped):
            shown = next((o for o in unwrapped if not hasattr(o, "param_groups") or isinstance(o, type)), optimizers)
            raise OptionError(f"optimizers must be a torch.optim.Optimizer (built on the model's parameters) or a non-empty list of them, got {shown!r}")
        include, exclude = check_patterns("include", include), check_patterns("exclude", exclude)  # a str is one pattern
        log_every_n_steps = check_int("log_every_n_steps", log_every_n_steps, 1)  # type: ignore[assignment]
        max_steps = check_int("max_steps", max_steps, 1, allow_none=True, hint=" (None: unknown)")
        every_n_steps = check_int("every_n_steps", every_n_steps, 1)  # type: ignore[assignment]
        check_choice("on_no_equilibrium", on_no_equilibrium, GATE_MODES)
        for flag, value in (
            ("use_momentum_buffer", use_momentum_buffer),
            ("per_filter", per_filter),
            ("keep_history", keep_history),
            ("track_distance", track_distance),
        ):
            check_bool(flag, value)
        self.model = _inner_model(model)
        self.optimizers = unwrapped
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
        self.session = Session(
            self.config,
            every_n_steps=every_n_steps,
            use_momentum_buffer=use_momentum_buffer,
            per_filter=per_filter,
            keep_history=keep_history,
            track_distance=track_distance,
            on_no_equilibrium=on_no_equilibrium,
        )
        self.log_every_n_steps = int(log_every_n_steps)
        self.every_n_steps = every_n_steps
        self.max_steps = max_steps
        self.on_no_equilibrium = on_no_equilibrium
        self.should_stop = False
        """With ``on_no_equilibrium="stop"``: True once equilibrium is clearly impossible in ``max_steps``."""
        detection = find_normalized_weights(self.model, example_input, include, exclude)
        self.session.detection = detection
        for code, fields in detection.pattern_warnings():  # include/exclude patterns that match no parameter
            self.session.warn(code, **fields)
        if detection.error:
            self.session.warn("SMD006", error=detection.error)
        named = dict(self.model.named_parameters())
        self.session.attach(
            named,
            self.optimizers,
            detection.units,
            capacity=self.log_every_n_steps // self.every_n_steps + 2,
            planned_steps=max_steps,
            model_name=type(self.model).__name__,
        )
        # The numerical check, before the first step changes the weights. A global pre-hook runs before the
        # optimizers' own hooks, so the check may rebuild the recorder (and its hooks) from inside it.
        self._verify_hook = register_optimizer_step_pre_hook(_VerifyHook(self, named)) if self.session.verify_pending else None
        self._closed = False
        self._loss_sum: torch.Tensor | None = None
        self._loss_count = 0
        self.summary_file: str | None = None
        """Where :meth:`close` wrote the summary JSON, or None."""

    @property
    def units(self) -> list[str]:
        """Names of the tracked units."""
        return [u.name for u in self.diagnostics.units]

    def should_log(self, step: int) -> bool:
        """Whether ``step`` (0-based, counted by the caller) ends a log interval."""
        return (int(step) + 1) % self.log_every_n_steps == 0

    def observe_loss(self, loss: torch.Tensor | float) -> None:
        """Give the monitor the training loss of a step (summed on its device, no synchronization; read at the
        next :meth:`update`). Optional: it grounds the vanishing-gradient-noise diagnosis in the loss actually
        approaching zero, as the callback does with the loss ``training_step`` returns."""
        value = loss.detach().float().reshape(()) if isinstance(loss, torch.Tensor) else torch.tensor(float(loss))
        self._loss_sum = value if self._loss_sum is None or self._loss_sum.device != value.device else self._loss_sum + value
        self._loss_count += 1

    def update(self) -> dict[int, float]:
        """Move the steps recorded on the device to the host (one synchronization) and fold them into the
        diagnostics. :meth:`metrics` and :meth:`summary` call it."""
        self._release_verify_hook()
        if self._loss_sum is not None and self._loss_count:
            self.session.observe_loss(float(self._loss_sum) / self._loss_count)
            self._loss_sum, self._loss_count = None, 0
        distances = self.session.drain(self.max_steps)
        if self.on_no_equilibrium == "stop" and self.session.stop_reason is None:
            reason = self.session.impossible(self.max_steps, self.log_every_n_steps)
            if reason is not None:
                self.session.stop(reason)
                self.should_stop = True
        return distances

    def metrics(self, per_layer: bool | str = True) -> dict[str, float]:
        """The ``smd/*`` metrics as of the last recorded step (the keys the callback logs; ``per_layer`` as the
        callback's ``log_per_layer``)."""
        distances = self.update()
        return self.session.metrics(per_layer, distances)

    def summary(self) -> dict[str, Any]:
        """The run summary (the callback's ``smd_summary.json`` content)."""
        if not self._closed:
            self.update()
        return self.session.summary(complete=self._closed)

    def heatmap(self) -> Any:
        """The layer × step heatmap of the smoothed Δ/Δ* at the log steps so far (a matplotlib ``Figure``:
        ``monitor.heatmap().savefig("smd.png")``), or None without matplotlib or before the first log."""
        return self.session.heatmap()

    def format_summary(self, max_rows: int | None = TABLE_ROWS) -> str:
        """The per-layer table of measured against predicted values, and the verdict (see
        ``SMDCallback.format_summary``)."""
        return format_summary_table(self.summary(), max_rows)

    def close(self, summary_path: str | os.PathLike | None = None) -> dict[str, Any]:
        """Remove the optimizer hooks, free the device buffers, issue the end-of-run warnings, optionally write
        the summary JSON (atomically); returns the final summary. With ``on_no_equilibrium="raise"``, raises
        :class:`~lightning_smd.EquilibriumNotReachedError` after that when the verdict is not ``equilibrium``."""
        if self._closed:
            return self.summary()
        self.update()
        self.session.end_warnings()
        self._closed = True
        summary = self.session.summary(complete=True)
        self.session.close()
        if summary_path is not None:
            self.summary_file = self.session.write(str(summary_path), summary)
        if self.session.gate_failed(summary):
            if self.on_no_equilibrium == "raise":
                raise EquilibriumNotReachedError(f"SMD verdict '{summary.get('verdict')}': {summary.get('reason', '')}", summary)
            if summary.get("verdict") == Verdict.NOT_REACHED and self.on_no_equilibrium == "warn":
                self.session.warn("SMD034", reason=summary.get("reason", ""))
        return summary

    def _release_verify_hook(self) -> None:
        if self._verify_hook is not None and not self.session.verify_pending:
            self._verify_hook.remove()
            self._verify_hook = None

    def __enter__(self) -> SMDMonitor:
        return self

    def __exit__(self, *exc: Any) -> None:
        if not self._closed:
            self.close()


class _VerifyHook:
    """The numerical check of invariance before the first step of one of the monitor's optimizers (a global
    optimizer pre-hook; removed at the next :meth:`SMDMonitor.update`, never from inside itself)."""

    def __init__(self, monitor: SMDMonitor, named: dict[str, torch.Tensor]) -> None:
        self.monitor = monitor
        self.named = named

    def __call__(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        session = self.monitor.session
        if session.verify_pending and any(optimizer is o for o in self.monitor.optimizers):
            session.eval_norms = eval_mode_batch_norms(self.monitor.model)
            session.verify(self.named)
