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

from lightning_smd.engine.detect import find_normalized_weights
from lightning_smd.engine.groups import param_roles
from lightning_smd.engine.schedule import read_monitor_schedules
from lightning_smd.frontends.loop import checked_optimizers, hook_verification, inner_model
from lightning_smd.frontends.shared import FrontEnd, LossSum, Options, adopt_detection, documents_shared_options, end_gate, log_step
from lightning_smd.options import check_int

__all__ = ["SMDMonitor"]


@documents_shared_options
class SMDMonitor(FrontEnd):
    """Spherical Motion Dynamics monitoring without Lightning's Trainer.

    A model without a normalized weight gets a warning (code ``SMD001``) and a ``not_applicable`` verdict, as
    with the callback. The first optimizer step runs the numerical check of invariance (one host
    synchronization) before the step changes the weights. The options it takes as
    :class:`~lightning_smd.SMDCallback` does (the criteria, the weights to track, how to measure) follow its own in
    the Args.

    Args:
        model: the model (a Fabric-wrapped or DDP-wrapped module is unwrapped).
        optimizers: the optimizer, or a list of them (Fabric's wrapped optimizers are unwrapped). Must
            hold the model's parameters already.
        example_input: optional input batch: detection then also runs the numerical invariance check (one
            forward/backward on it; parameters, buffers and gradients are restored) and can analyse models
            torch.fx cannot trace.
        log_every_n_steps: the interval :meth:`should_log` answers for (steps buffered on the device).
        schedule: how the settings will move, read ahead at construction (without touching your scheduler) so that
            each layer is judged against its trajectory through the schedule: a ``torch.optim.lr_scheduler`` that
            your loop steps after every optimizer step (one per optimizer: a list), or a function of the step
            ``t`` (0-based, the steps already taken) returning the learning rate of every param group, a list of
            one per group, or a dict of param-group keys to values. ``None``: the settings stay as they are (a
            learning rate your loop sets by hand is then judged change by change). Needs ``max_steps``.
        max_steps: the planned number of optimizer steps, if known: enables the warnings that compare it with
            what equilibrium needs, and the ``"stop"`` gate.
        on_no_equilibrium: ``"warn"`` (default) warns at :meth:`close` when the verdict is ``not_reached``;
            ``"raise"`` raises :class:`~lightning_smd.EquilibriumNotReachedError` from :meth:`close` (after the
            summary is written); ``"stop"`` sets :attr:`should_stop` once equilibrium is clearly impossible in
            ``max_steps`` (your loop checks it).
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
        schedule: Any = None,
        on_no_equilibrium: str = "warn",
        use_momentum_buffer: bool = True,
        per_filter: bool = False,
        every_n_steps: int = 1,
        keep_history: bool = False,
        track_distance: bool = False,
    ) -> None:
        given = dict(locals())
        # every option checked before anything is hooked: an OptionError names the option, the value and what is accepted
        module, unwrapped = inner_model(model), checked_optimizers(optimizers)
        options = Options.check(given)  # the criteria and how to measure: as SMDCallback's
        self.log_every_n_steps: int = check_int("log_every_n_steps", log_every_n_steps, 1)  # type: ignore[assignment]
        self.max_steps = check_int("max_steps", max_steps, 1, allow_none=True, hint=" (None: unknown)")
        self.model, self.optimizers = module, unwrapped
        self.config, self.every_n_steps, self.on_no_equilibrium = options.config, options.every_n_steps, options.on_no_equilibrium
        self.session = options.session()
        self.should_stop = False
        """With ``on_no_equilibrium="stop"``: True once equilibrium is clearly impossible in ``max_steps``."""
        self.summary_file: str | None = None
        """Where :meth:`close` wrote the summary JSON, or None."""
        self._closed = False
        self._loss = LossSum()
        detection = find_normalized_weights(self.model, example_input, options.include, options.exclude)
        adopt_detection(self.session, detection)
        named = dict(self.model.named_parameters())
        self.session.attach(
            named,
            self.optimizers,
            detection.units,
            capacity=options.capacity(self.log_every_n_steps),
            planned_steps=self.max_steps,
            model_name=type(self.model).__name__,
            roles=param_roles(self.model),
        )
        self._verify_hook = hook_verification(self, named)  # the numerical check, before the first step changes the weights
        if self.max_steps is not None or schedule is not None:
            self.session.plan(read_monitor_schedules(self.optimizers, schedule, self.max_steps))

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
        self._loss.add(loss)

    def update(self) -> dict[int, float]:
        """Move the steps recorded on the device to the host (one synchronization) and fold them into the
        diagnostics; with ``on_no_equilibrium="stop"``, set :attr:`should_stop` when equilibrium has become
        impossible. :meth:`metrics` and :meth:`summary` call it."""
        self._release_verify_hook()
        distances, stop = log_step(self.session, self._loss, self.max_steps, self.log_every_n_steps)
        self.should_stop = self.should_stop or stop
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
        end_gate(self.session, summary, summary_file=self.summary_file)
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
