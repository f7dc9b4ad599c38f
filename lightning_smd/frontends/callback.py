"""The Lightning adapter over :class:`lightning_smd.engine.session.Session`: when to detect, when to log, where the
summary goes, and rank-consistent gates; what it shares with :class:`lightning_smd.SMDMonitor` is in
:mod:`lightning_smd.frontends.shared`.

``SMDCallback()`` finds the model's normalized weights when fit starts, measures each one after every
optimizer step (on the device, without host synchronization), compares it with the equilibrium Spherical
Motion Dynamics predicts for the optimizer settings in force, logs to every logger the Trainer has at
its log interval, and writes ``smd_summary.json`` with the verdict when training ends — also when it
ends early, by an exception or an interrupt (then marked ``"complete": false``).
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import os
import time
import warnings
from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import torch

from lightning_smd.analysis.keys import namespace_for, renamed
from lightning_smd.analysis.theory import rule_for
from lightning_smd.engine.detect import DataFlowRecorder, Detection, NormalizedWeight, format_detection_table
from lightning_smd.engine.groups import param_roles
from lightning_smd.engine.schedule import read_trainer_schedules
from lightning_smd.engine.session import Session, eval_mode_batch_norms
from lightning_smd.frontends.instances import distinct_options, instance_label
from lightning_smd.frontends.shared import FrontEnd, Options, adopt_detection, documents_shared_options, end_gate, log_step
from lightning_smd.frontends.trainer import FitState, close_loggers, debug_run, describe, every_rank, fsdp1_group, is_log_step, log_interval, logger_step
from lightning_smd.frontends.trainer import optimizer_steps, planned_steps, prepare_loggers, print_plan, publish, rank_zero_emitter, summary_target
from lightning_smd.frontends.trainer import stood_down, unsupported_strategy
from lightning_smd.frontends.weights import FirstBatch, at_fit_start, at_setup, from_flow, full_tensor, named_parameters
from lightning_smd.io.dashboard import per_layer_mode, render_rgb
from lightning_smd.io.loggers import log_heatmap, takes_images
from lightning_smd.analysis.following import plain_schedule
from lightning_smd.analysis.rows import forecast as forecast_rows
from lightning_smd.io.report import SUMMARY_FILENAME, TABLE_ROWS, EquilibriumNotReachedError, format_forecast_table, format_summary_table, print_summary_table
from lightning_smd.messages import SMDWarning, render
from lightning_smd.options import check_bool, check_int, check_name, check_number, check_path

if TYPE_CHECKING:
    import pytorch_lightning as pl

__all__ = ["SMDCallback", "SMDWarning", "EquilibriumNotReachedError", "SUMMARY_FILENAME", "format_summary_table"]


def _callback_bases() -> tuple[type, ...]:
    """The ``Callback`` classes of the Lightning namespaces installed: ``pytorch_lightning`` and/or
    ``lightning.pytorch``. Deriving from both makes one ``SMDCallback`` class an instance of each, so it
    works with either Trainer (Lightning refuses objects whose class comes from the other namespace, and
    this class comes from neither)."""
    bases = []
    for module in ("pytorch_lightning", "lightning.pytorch"):
        try:
            bases.append(importlib.import_module(module).Callback)
        except ImportError:
            continue
    if not bases:
        raise ImportError("lightning_smd.SMDCallback needs Lightning: pip install pytorch-lightning (or lightning)")
    return tuple(dict.fromkeys(bases))


_CALLBACK_BASES = _callback_bases()
#: What the first heatmap drawing of a fit is taken to cost (seconds) before one is measured: a drawing with each
#: image logger's PNG encoding measured 0.37 s at 53 layers (``benchmarks/dashboard.py``).
HEATMAP_FIRST_SECONDS = 0.25


@documents_shared_options
class SMDCallback(*_CALLBACK_BASES, FrontEnd):  # type: ignore[misc]
    """Measure the Spherical Motion Dynamics of every normalized weight and check its equilibrium.

    A layer is **in equilibrium** when it is *steady* — it has had at least 4 relaxation times since the last
    change of its hyper-parameters and, over the recent window, neither its angular update relative to the
    prediction nor its norm drifts by more than ``drift_limit`` per relaxation time (to a stated confidence) — and its
    steady ratio ``Δ/Δ*`` is not far off the prediction (see the README, "What in equilibrium means").

    The options it takes as :class:`~lightning_smd.SMDMonitor` does (the criteria, the weights to track, how to
    measure) follow its own in the Args.

    Args:
        log_every_n_steps: log interval in optimizer steps; default: the Trainer's ``log_every_n_steps``.
        log_per_layer: which per-layer series go to the loggers: ``"all"`` (or ``True``), ``"ratio"`` (only
            ``smd/<layer>/angular_update_ratio``), ``"none"`` (or ``False``); ``"auto"`` (default): all up to 16
            tracked layers, the ratio only above. The aggregates and the worst layers are always logged, and
            the summary keeps everything.
        worst_k: log the smoothed ratio of the ``worst_k`` layers furthest from their prediction
            (``smd/worst/<i>/angular_update_ratio``): a few series whatever the model's size.
        log_heatmap: log the layer × step heatmap of the smoothed ratio as an image to every logger that takes
            images (W&B, TensorBoard, MLflow) every ``heatmap_every_n_logs`` log steps (0: only at the end)
            and at the end of training. Needs matplotlib (without it: one warning, nothing else changes).
        heatmap_every_n_logs: see ``log_heatmap``.
        heatmap_time_share: the heatmaps drawn during training may take at most this share of the fit's wall time
            so far (drawing, and each image logger's PNG encoding): a drawing that would take it past that is left
            out, and the next due one tried; the first is taken to cost ``HEATMAP_FIRST_SECONDS`` (0.25 s) until
            one is measured, so at the default 0.5 % the first comes after about 50 s of training. The one at the
            end is always drawn. ``1.0``: every ``heatmap_every_n_logs`` log steps, whatever it costs.
        wandb_workspace: at the end of fit, save a W&B workspace for this run's layers to the project of the
            Trainer's ``WandbLogger`` (needs ``wandb-workspaces`` and an online run; otherwise one warning with the
            command that does it later).
        summary_path: where to write the summary JSON; default ``<trainer.log_dir>/smd_summary.json``.
            ``False`` writes none.
        verbose: print the table of tracked weights at fit start and the result table at the end
            (rank zero only).
        on_no_equilibrium: what to do when the run does not reach equilibrium. ``"warn"`` (default): a
            warning at the end. ``"raise"``: raise :class:`EquilibriumNotReachedError` at the end of fit
            (after the summary is written) so that the script — and a CI job — fails. ``"stop"``: stop
            training as soon as equilibrium is clearly impossible in the planned steps (no weight decay,
            or fewer steps left than half the predicted need). Every rank takes the same decision.
        name: a label for this instance, for a Trainer with several ``SMDCallback`` s (e.g. a lenient and a strict
            gate): its metrics go under ``smd-<name>/…`` and its summary to ``smd_summary-<name>.json``. Without
            it, the first instance with default settings keeps ``smd/…`` and each other one is labelled by the
            settings that set it apart (``smd-tolerance-0.05/…``). Letters, digits, ``_``, ``.`` and ``-``.
    """

    def __init__(
        self,
        *,
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
        log_every_n_steps: int | None = None,
        log_per_layer: bool | str = "auto",
        worst_k: int = 3,
        log_heatmap: bool = True,
        heatmap_every_n_logs: int = 10,
        heatmap_time_share: float = 0.005,
        wandb_workspace: bool = False,
        summary_path: str | os.PathLike | bool | None = None,
        verbose: bool = True,
        keep_history: bool = False,
        use_momentum_buffer: bool = True,
        per_filter: bool = False,
        on_no_equilibrium: str = "warn",
        track_distance: bool = False,
        every_n_steps: int = 1,
        name: str | None = None,
    ) -> None:
        given = {k: v for k, v in locals().items() if k not in ("self", "__class__")}
        # every option checked before anything is built: an OptionError names the option, the value and what is accepted
        check_name(name)
        options = Options.check(given)  # the criteria and how to measure: as SMDMonitor's
        log_every_n_steps = check_int("log_every_n_steps", log_every_n_steps, 1, allow_none=True, hint=" (None: the Trainer's)")
        heatmap_every_n_logs = check_int("heatmap_every_n_logs", heatmap_every_n_logs, 0, hint=" (0: only at the end)")  # type: ignore[assignment]
        heatmap_time_share = check_number("heatmap_time_share", heatmap_time_share, 0.0, 1.0, high_open=False)  # type: ignore[assignment]
        flags = [check_bool(k, given[k]) for k in ("log_heatmap", "wandb_workspace", "verbose")]
        per_layer_mode(log_per_layer, 0)  # validates
        summary_path = check_path("summary_path", summary_path)
        super().__init__()
        self.options, self.config, self.include, self.exclude = options, options.config, options.include, options.exclude
        self.every_n_steps, self.on_no_equilibrium = options.every_n_steps, options.on_no_equilibrium
        self.log_heatmap, self.wandb_workspace, self.verbose = flags
        self.log_every_n_steps, self.log_per_layer, self.heatmap_every_n_logs = log_every_n_steps, log_per_layer, heatmap_every_n_logs
        self.heatmap_time_share = heatmap_time_share
        self.summary_path, self.name = summary_path, name
        self.session: Session = options.session()  # replaced at every fit start
        self._fit = FitState()
        self._resume_state: dict[str, Any] | None = None  # a checkpoint's state, restored before fit start attaches
        self._setup_detection: Detection | None = None  # analysed in setup(), before the strategy wraps the model
        # the options given that differ from the defaults: what tells this instance from another (a str pattern is a list)
        given.update((k, v) for k, v in (("include", options.include), ("exclude", options.exclude)) if given[k] is not None)
        self._distinct = distinct_options(given, SMDCallback.__init__)

    @property
    def state_key(self) -> str:
        """Unique per set of options: SMDCallbacks that differ in any option coexist in one Trainer and one
        checkpoint (Lightning refuses two with the same key when the Trainer is built). Tolerance, window, include
        and exclude are always part of it, as in the first releases, so that their checkpoints still resume."""
        fields: dict[str, Any] = dict(tolerance=self.config.tolerance, window=self.config.window, include=self.include, exclude=self.exclude)
        fields.update((k, v) for k, v in self._distinct.items() if k not in fields)
        return self._generate_state_key(**fields)

    @property
    def namespace(self) -> str:
        """The first part of every key this instance logs: ``smd``, or ``smd-<label>`` when the Trainer has
        several SMDCallbacks (see ``name``)."""
        return namespace_for(self._fit.label)

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue measuring after a resume, as plain Python types."""
        state = self.session.state_dict()
        if state:
            state["last_logged_step"] = self._fit.last_logged_step
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Lightning restores callbacks before on_fit_start, which attaches: keep it until then.
        self._resume_state = dict(state_dict) if state_dict else None

    def __getstate__(self) -> dict[str, Any]:
        # ddp_spawn pickles the callback: hooks, device buffers and a recording data flow stay behind.
        state = {k: v for k, v in self.__dict__.items() if not inspect.ismethod(v)}  # Lightning binds `log` here
        state.update(session=self.options.session(), _fit=replace(self._fit, first=FirstBatch()), _setup_detection=None)
        return state

    # ------------------------------------------------------------------------------------------
    # Set-up
    # ------------------------------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # Analyse the data flow before configure_model and the strategy shard or wrap the model (FSDP2
        # replaces parameters by DTensor shards); on_fit_start uses this result when it still applies.
        self._setup_detection = None if stage != "fit" or unsupported_strategy(trainer) else at_setup(pl_module, self.include, self.exclude)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._close()
        peers = [cb for cb in trainer.callbacks if isinstance(cb, SMDCallback)]
        me = next((i for i, cb in enumerate(peers) if cb is self), None)
        self._fit = FitState(label=None if me is None else instance_label([cb._distinct for cb in peers], me))
        self.session = self.options.session(emit=rank_zero_emitter(trainer, self._fit.label))
        unsupported = unsupported_strategy(trainer)
        if unsupported:
            self.session.detection = Detection(method="none", error=unsupported)
            self.session.warn("SMD008", detail=unsupported)
            return self._attach(trainer, pl_module, [])
        det, self._setup_detection = at_fit_start(pl_module, self._setup_detection, self.include, self.exclude), None
        # fx could not trace the model (or it has lazy parameters): the data flow of the first training batch is
        # analysed instead, before its optimizer step (include= patterns are attached now)
        deferred = det.method == "deferred"
        adopt_detection(self.session, det, waits_for_batch=deferred)
        if deferred:
            self._fit.first.wait()
        if det.units or not deferred:
            self._attach(trainer, pl_module, det.units)

    def _attach(self, trainer: pl.Trainer, pl_module: pl.LightningModule, units: list[NormalizedWeight]) -> None:
        """Hand the tracked weights and the Trainer's optimizers to the session (or resume it)."""
        resume, self._resume_state = self._resume_state, None
        self.session.attach(
            named_parameters(pl_module),
            list(trainer.optimizers),
            units,
            capacity=self.options.capacity(self._interval(trainer)),
            shard_group=fsdp1_group(trainer),
            # a debug run is short on purpose: no warning that it is too short to be judged
            planned_steps=None if debug_run(trainer) else planned_steps(trainer),
            model_name=type(pl_module).__name__,
            resume=resume,
            roles=param_roles(pl_module),
        )
        if resume:
            self._fit.last_logged_step = int(resume.get("last_logged_step", -1))
        else:
            self._fit.plan_to_print = self.verbose  # at train start, once the schedule is read
            audit = self.session.group_audit
            if self.verbose and trainer.is_global_zero and audit is not None and audit.embeddings:
                print(audit.embeddings_note())

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # the schedulers' state is restored (resume) and the data set up (steps per epoch) only now
        self._fit.started_at = time.perf_counter()
        keys = [rule_for(o).keys for o in trainer.optimizers]
        self._fit.schedules = read_trainer_schedules(trainer, keys, None)
        self._follow_schedules()
        if self._fit.plan_to_print:
            self._fit.plan_to_print = False
            # a followed schedule moves the settings from the first step: its forecast table says when (after the
            # first log steps), not a settling time at the first step's settings
            d = self.session.diagnostics
            if d is None or not d.following.plans:
                print_plan(trainer, self.session.judgeable_after)

    def _follow_schedules(self) -> None:
        """Hand the schedules read ahead to the session once it is attached (at fit start, or after the first batch)."""
        if self._fit.schedules is not None and self.session.recorder is not None:
            self.session.plan(self._fit.schedules)
            self._fit.schedules = None

    # ------------------------------------------------------------------------------------------
    # First batch: deferred detection and the numerical check of invariance
    # ------------------------------------------------------------------------------------------
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        if self.recorder is not None and not self._fit.rebased:
            # Weights may have changed since fit start (a checkpoint restored by the strategy, a module's
            # own on_fit_start/on_train_start): measure the first step from the weights it really starts from.
            self._fit.rebased = True
            self._start_recorder(trainer)
        self._fit.first.record(pl_module)

    def _start_recorder(self, trainer: pl.Trainer) -> None:
        """Before the first measured step: count steps as the Trainer does (a resume from a checkpoint made without
        this callback, a second fit: the loops' state is restored after on_fit_start), and take ``w_t`` now."""
        if self.recorder is None:
            return
        self.recorder.start_at(optimizer_steps(trainer))
        self.recorder.rebase()

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor) -> None:
        self._fit.first.saw_loss(loss)

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer) -> None:
        recording = self._fit.first.take_before_step(pl_module.automatic_optimization)
        if recording is not None:  # one loss per batch: attach now, before this first step, so that it is measured too
            self._detect_from_flow(trainer, pl_module, *recording)
        if not self.session.verify_pending:
            return
        if fsdp1_group(trainer) is not None:
            self.session.skip_verification()  # flat shard views: the per-filter check needs whole tensors
            return
        self.session.eval_norms = eval_mode_batch_norms(pl_module)
        units = self.session.verify(named_parameters(pl_module), gather=full_tensor)
        if units and self.verbose and trainer.is_global_zero:
            print(f"SMDCallback: tracking {len(units)} normalized weight(s)\n" + format_detection_table(Detection(units=units)))

    def _detect_from_flow(self, trainer: pl.Trainer, pl_module: pl.LightningModule, flow: DataFlowRecorder, losses: list[Any]) -> None:
        """Detection from the first batch's recorded data flow; attach, measuring from the current weights."""
        previous, det = self.detection, from_flow(pl_module, flow, losses, self.include, self.exclude)
        self.session.detection = det
        if det.error:
            self.session.warn("SMD006", error=det.error)
        self._attach(trainer, pl_module, det.units or (previous.units if previous else []))
        self._follow_schedules()
        self._start_recorder(trainer)
        self._fit.rebased = True

    # ------------------------------------------------------------------------------------------
    # Per step
    # ------------------------------------------------------------------------------------------
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        recording = self._fit.first.take_at_batch_end(outputs)
        if recording is not None:
            self._detect_from_flow(trainer, pl_module, *recording)
        if self.recorder is None:
            return
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if isinstance(loss, torch.Tensor) and loss.numel() == 1:
            self._fit.loss.add(loss)
        if self.recorder.pending and is_log_step(trainer, self._interval(trainer)):
            self._flush(trainer, logger_step(trainer))

    def _interval(self, trainer: pl.Trainer) -> int:
        return log_interval(trainer, self.log_every_n_steps)

    def _flush(self, trainer: pl.Trainer, step: int) -> None:
        """Drain the device buffers (one host synchronization), update the diagnostics, apply the "stop" gate, log."""
        fit, session = self._fit, self.session
        debug = debug_run(trainer) is not None
        distances, stop = log_step(session, fit.loss, planned_steps(trainer), self._interval(trainer), debug=debug, agree=every_rank(trainer))
        if stop:
            trainer.should_stop = True
        if self.verbose and not fit.forecast_shown and trainer.is_global_zero and session.diagnostics is not None:
            forecast = forecast_rows(session.diagnostics)
            if forecast:
                fit.forecast_shown = True
                print(format_forecast_table(forecast, plain_schedule(session.diagnostics.following.schedule)))
        if step <= fit.last_logged_step:
            return
        metrics = {renamed(k, self.namespace): v for k, v in session.metrics(self.log_per_layer, distances).items()}
        if not fit.loggers_ready:
            fit.loggers_ready = True
            prepare_loggers(trainer, session, self.log_per_layer, self.namespace)
        publish(trainer, metrics, session.progress(self.namespace), step, self.namespace, session.warn)
        fit.last_logged_step = step
        fit.logs += 1
        if self.heatmap_every_n_logs and fit.logs % self.heatmap_every_n_logs == 0 and self._heatmap_affordable():
            self._log_heatmap(trainer, step)

    def _heatmap_affordable(self) -> bool:
        """Whether one more drawing during training keeps the heatmaps within ``heatmap_time_share`` of the fit's
        wall time so far (the next drawing is taken to cost what the last one did, the first
        :data:`HEATMAP_FIRST_SECONDS`)."""
        fit = self._fit
        if self.heatmap_time_share >= 1.0 or fit.started_at is None:
            return True
        cost = fit.heatmap_last_seconds if fit.heatmap_last_seconds > 0.0 else HEATMAP_FIRST_SECONDS
        return fit.heatmap_seconds + cost <= self.heatmap_time_share * (time.perf_counter() - fit.started_at)

    def _log_heatmap(self, trainer: pl.Trainer, step: int) -> None:
        """Draw the heatmap from the host-side history (log steps only) for the loggers that take images."""
        if not self.log_heatmap or not trainer.is_global_zero or not takes_images(trainer.loggers) or step == self._fit.heatmap_step:
            return
        self._fit.heatmap_step = step
        start = time.perf_counter()
        figure = self.session.heatmap()
        if figure is None:
            if len(self.session.history) and not _has_matplotlib():
                self.session.warn("SMD045")
            return
        log_heatmap(trainer.loggers, render_rgb(figure), step, self.session.warn, self.namespace)
        self._fit.heatmap_last_seconds = time.perf_counter() - start
        self._fit.heatmap_seconds += self._fit.heatmap_last_seconds
        self._fit.heatmaps += 1

    # ------------------------------------------------------------------------------------------
    # End
    # ------------------------------------------------------------------------------------------
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.recorder is None or self.diagnostics is None:
            return
        if self.recorder.pending:
            self._flush(trainer, max(logger_step(trainer) - 1, self._fit.last_logged_step + 1))
        self.session.end_warnings()
        self._log_heatmap(trainer, max(logger_step(trainer) - 1, self._fit.last_logged_step))
        self._finish(trainer, complete=True)
        close_loggers(trainer, self.session, self.summary(), self.namespace, self.log_per_layer, workspace=self.wandb_workspace)
        if self.verbose and trainer.is_global_zero:
            print_summary_table(self.summary(), TABLE_ROWS)
            if self._fit.summary_file:
                print(f"SMDCallback: summary written to {self._fit.summary_file}")
        self._gate(trainer)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Lightning skips on_train_end when there is nothing to train (limit_train_batches=0, max_steps reached by
        # a restored checkpoint): the summary is still written, and the gate still speaks
        if self.session.detection is None or self._fit.finished:
            return  # (no fit started, or on_train_end finished it)
        self._finish(trainer, complete=True)
        self._gate(trainer)

    def _gate(self, trainer: pl.Trainer) -> None:
        end_gate(self.session, self.summary(), summary_file=self._fit.summary_file, debug_run=debug_run(trainer), agree=every_rank(trainer))

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        # Never lose what was measured: write the summary, marked incomplete, before the exception goes on.
        self._fit.first.stop()
        if self.session.detection is None or self._fit.summary is not None:
            return  # no fit started here (validate/test/predict), or its summary is written already
        try:
            # a sharded drain is a collective, and an exception may have reached this rank alone
            self.session.drain_without_collective()
            self._finish(trainer, complete=False, error=describe(exception))
        except Exception as err:  # noqa: BLE001 - the callback never raises on its own failures
            warnings.warn(SMDWarning(render("SMD044", exception=type(exception).__name__, error=err), "SMD044"), stacklevel=2)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._close()

    def _close(self) -> None:
        self._fit.first.stop()
        self.session.close()

    def _finish(self, trainer: pl.Trainer, complete: bool, error: str | None = None) -> None:
        summary = self.session.summary(complete=complete, error=error, global_step=int(trainer.global_step))
        summary["gate"] = stood_down(trainer, summary.get("verdict"))
        summary["name"] = self._fit.label  # None for a Trainer's only (or first, default) SMDCallback
        self._fit.summary, self._fit.finished = summary, complete
        if self.summary_path is False or not trainer.is_global_zero:
            return
        written = self.session.write(summary_target(trainer, self.summary_path, self._fit.label), summary)
        if written:
            self._fit.summary_file = written
        else:
            summary["warnings"] = list(self.session.warnings)

    # ------------------------------------------------------------------------------------------
    # Public results
    # ------------------------------------------------------------------------------------------
    def summary(self) -> dict[str, Any]:
        """The run summary (the content of ``smd_summary.json``); computed now if training has not ended."""
        if self._fit.summary is not None:
            return self._fit.summary
        return self.session.summary(complete=False)

    @property
    def summary_file(self) -> str | None:
        """Where the summary JSON was written (rank zero), or ``None``."""
        return self._fit.summary_file


def _has_matplotlib() -> bool:
    return importlib.util.find_spec("matplotlib") is not None
