"""The Lightning adapter over :class:`lightning_smd.engine.session.Session`: when to detect, when to log, where the
summary goes, and rank-consistent gates.

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
import math
import os
import re
import sys
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from lightning_smd.engine.detect import (
    DataFlowRecorder,
    Detection,
    NormalizedWeight,
    detect_from_graph,
    find_normalized_weights,
    format_detection_table,
    units_from_patterns,
)
from lightning_smd.analysis.diagnostics import DiagnosticsConfig, Verdict
from lightning_smd.io.dashboard import per_layer_mode, render_rgb
from lightning_smd.io.loggers import NAMESPACE, finish_loggers, log_heatmap, renamed, setup_loggers
from lightning_smd.messages import SMDWarning, render
from lightning_smd.io.report import (
    SUMMARY_FILENAME,
    TABLE_ROWS,
    EquilibriumNotReachedError,
    format_summary_table,
    print_summary_table,
    summary_filename,
)
from lightning_smd.engine.session import Session, SessionView, eval_mode_batch_norms

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


class SMDCallback(*_CALLBACK_BASES, SessionView):  # type: ignore[misc]
    """Measure the Spherical Motion Dynamics of every normalized weight and check its equilibrium.

    A layer is **in equilibrium** when it is *steady* — it has had at least 4 relaxation times since the last
    change of its hyper-parameters and, over the recent window, neither its angular update relative to the
    prediction nor its norm drifts by more than ``drift_limit`` per relaxation time (to a stated confidence) — and its
    steady ratio ``Δ/Δ*`` is not far off the prediction (see the README, "What in equilibrium means").

    Args:
        tolerance: agreement band: a steady layer whose steady ``Δ/Δ*`` is (with confidence) outside
            ``1 ± tolerance`` is *off the prediction* (counted as in equilibrium unless
            ``require_agreement``; explained in a warning). A prediction that moves by more than this is a
            change of the hyper-parameters.
        window: the judged window spans at least this many steps (and at least 2 relaxation times), at most
            4× as many (or 16 relaxation times): all the data since the layer settled.
        ema_steps: time constant (steps) of the moving averages of the angular update, its ratio to the
            prediction and the gradient statistic ``L`` (the logged, smoothed figures).
        min_fraction: share of tracked layers (with a prediction) in equilibrium at the end of training
            for the run verdict ``"equilibrium"``.
        require_agreement: the strict gate: a steady layer off the prediction does not count as in
            equilibrium.
        max_deviation: a steady layer whose steady ``Δ/Δ*`` is (with confidence) outside
            ``1 ± max_deviation`` is in another regime than SMD's equilibrium and never counts.
        drift_limit: the largest drift of ``Δ/Δ*`` per relaxation time a steady layer may show (``None``:
            ``tolerance``).
        significance: run-level false-alarm rate of the drift test on steady layers (split over the layers,
            Bonferroni), and ``1 − significance/N`` is the level of the steady ratio's confidence interval.
        include: parameter-name globs to track in addition to the detected ones.
        exclude: parameter-name globs never to track.
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
        wandb_workspace: at the end of fit, save a W&B workspace for this run's layers to the project of the
            Trainer's ``WandbLogger`` (needs ``wandb-workspaces`` and an online run; otherwise one warning with the
            command that does it later).
        summary_path: where to write the summary JSON; default ``<trainer.log_dir>/smd_summary.json``.
            ``False`` writes none.
        verbose: print the table of tracked weights at fit start and the result table at the end
            (rank zero only).
        keep_history: keep every step's values in memory (``callback.diagnostics.unit_history(name)``).
        use_momentum_buffer: for PyTorch SGD with heavy-ball momentum, take the update from the momentum
            buffer (exact, no weight copy); ``False`` keeps a snapshot of the weights as for other
            optimizers.
        per_filter: also measure every filter (or group) of the weights whose filters are scale-invariant
            on their own, and log the RMS over filters of their angular updates
            (``smd/<name>/filter_angular_update_rms``; each filter has the same predicted Δ*). Costs a few
            extra launches per tracked tensor and step.
        on_no_equilibrium: what to do when the run does not reach equilibrium. ``"warn"`` (default): a
            warning at the end. ``"raise"``: raise :class:`EquilibriumNotReachedError` at the end of fit
            (after the summary is written) so that the script — and a CI job — fails. ``"stop"``: stop
            training as soon as equilibrium is clearly impossible in the planned steps (no weight decay,
            or fewer steps left than half the predicted need). Every rank takes the same decision.
        track_distance: from the first log step at which a layer is in equilibrium, keep a copy of it and
            log the angular distance travelled since (``smd/<name>/angular_distance``) and the exponent
            ``c`` of ``distance ∝ t^c`` in the summary (one extra copy of the tracked weights).
        every_n_steps: measure only every n-th optimizer step (for very large models). A sampled step is
            still measured over that single step (the weights are taken right before it), so the angular
            update keeps its meaning and its prediction; the moving averages and the window keep counting
            steps. Unsampled steps cost nothing measurable.
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
        from lightning_smd.options import check_bool, check_choice, check_int, check_path, check_patterns
        from lightning_smd.engine.session import GATE_MODES

        # every option checked before anything is built: a ValueError names the option, the value and what is accepted
        include, exclude = check_patterns("include", include), check_patterns("exclude", exclude)  # a str is one pattern
        given.update({k: v for k, v in (("include", include), ("exclude", exclude)) if given[k] is not None})
        log_every_n_steps = check_int("log_every_n_steps", log_every_n_steps, 1, allow_none=True, hint=" (None: the Trainer's)")
        worst_k = check_int("worst_k", worst_k, 0)  # type: ignore[assignment]
        heatmap_every_n_logs = check_int("heatmap_every_n_logs", heatmap_every_n_logs, 0, hint=" (0: only at the end)")  # type: ignore[assignment]
        every_n_steps = check_int("every_n_steps", every_n_steps, 1)  # type: ignore[assignment]
        for flag, value in (
            ("log_heatmap", log_heatmap),
            ("wandb_workspace", wandb_workspace),
            ("verbose", verbose),
            ("keep_history", keep_history),
            ("use_momentum_buffer", use_momentum_buffer),
            ("per_filter", per_filter),
            ("track_distance", track_distance),
        ):
            check_bool(flag, value)
        check_choice("on_no_equilibrium", on_no_equilibrium, GATE_MODES)
        summary_path = check_path("summary_path", summary_path)
        super().__init__()
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
        self._options = dict(
            every_n_steps=every_n_steps,
            use_momentum_buffer=use_momentum_buffer,
            per_filter=per_filter,
            keep_history=keep_history,
            track_distance=track_distance,
            on_no_equilibrium=on_no_equilibrium,
            worst_k=worst_k,
        )
        per_layer_mode(log_per_layer, 0)  # validates
        self.log_heatmap = bool(log_heatmap)
        self.heatmap_every_n_logs = heatmap_every_n_logs
        self.wandb_workspace = bool(wandb_workspace)
        self._logs = 0
        self._heatmap_step = -1
        self._loss_sum = None
        self._loss_count = 0
        self.session = Session(self.config, **self._options)  # validates the options; replaced at every fit start
        self.every_n_steps = every_n_steps
        self.on_no_equilibrium = on_no_equilibrium
        self.include = include
        self.exclude = exclude
        self.log_every_n_steps = log_every_n_steps
        self.log_per_layer = log_per_layer
        self.summary_path = summary_path
        self.verbose = verbose
        self._summary: dict[str, Any] | None = None
        self._summary_file: str | None = None
        self._last_logged_step = -1
        self._flow: DataFlowRecorder | None = None
        self._deferred = False
        self._finished = False
        self._flow_losses: list[Any] = []
        self._flow_batches = 0
        self._rebased = False
        self._resume_state: dict[str, Any] | None = None
        self._setup_detection: Detection | None = None
        self._loggers_ready = False
        if name is not None and (not isinstance(name, str) or not _LABEL.fullmatch(name)):
            raise ValueError(f"name must be a short label of letters, digits, '_', '.' and '-', got {name!r}")
        self.name = name
        #: the options given that differ from the defaults: what tells this instance from another
        self._distinct = _distinct_options(given)
        self._namespace = NAMESPACE
        self._label: str | None = None

    @property
    def state_key(self) -> str:
        """Unique per set of options: SMDCallbacks that differ in any option coexist in one Trainer and one
        checkpoint. (Tolerance, window, include and exclude are always part of it, as in the first releases, so
        that their checkpoints still resume.)"""
        fields: dict[str, Any] = dict(tolerance=self.config.tolerance, window=self.config.window, include=self.include, exclude=self.exclude)
        fields.update((k, v) for k, v in self._distinct.items() if k not in fields)
        key = self._generate_state_key(**fields)
        _refuse_duplicates(self, key)
        return key

    @property
    def namespace(self) -> str:
        """The first part of every key this instance logs: ``smd``, or ``smd-<label>`` when the Trainer has
        several SMDCallbacks (see ``name``)."""
        return self._namespace

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue measuring after a resume, as plain Python types."""
        state = self.session.state_dict()
        if state:
            state["last_logged_step"] = self._last_logged_step
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Lightning restores callbacks before on_fit_start, which attaches: keep it until then.
        self._resume_state = dict(state_dict) if state_dict else None

    def __getstate__(self) -> dict[str, Any]:
        # ddp_spawn pickles the callback: hooks, device buffers and an active recorder stay behind.
        state = {k: v for k, v in self.__dict__.items() if not inspect.ismethod(v)}  # Lightning binds `log` here
        state.update(session=Session(self.config, **self._options), _flow=None, _setup_detection=None)
        return state

    # ------------------------------------------------------------------------------------------
    # Set-up
    # ------------------------------------------------------------------------------------------
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._close()
        self._label = _instance_label(self, trainer.callbacks)
        self._namespace = NAMESPACE if self._label is None else f"{NAMESPACE}-{self._label}"
        self.session = Session(self.config, emit=_rank_zero_emitter(trainer, self._label), **self._options)
        self._loggers_ready = False
        self._logs = 0
        self._heatmap_step = -1
        self._loss_sum: torch.Tensor | None = None
        self._loss_count = 0
        self._summary = None
        self._summary_file = None
        self._last_logged_step = -1
        self._deferred = False
        self._finished = False
        self._flow_losses, self._flow_batches, self._rebased = [], 0, False
        unsupported = _unsupported_strategy(trainer)
        if unsupported:
            self.session.detection = Detection(method="none", error=unsupported)
            self.session.warn("SMD008", detail=unsupported)
            self._attach(trainer, pl_module, [])
            return
        named = _named_parameters(pl_module)
        early, self._setup_detection = self._setup_detection, None
        if early is not None and early.units and all(p in named for u in early.units for p in u.params):
            det = early  # analysed in setup(), before the strategy sharded or wrapped the model
        elif _is_sharded(named.values()):
            # Layers created in configure_model are sharded before any hook could analyse them, and tracing
            # a sharded model is not safe: only include= can name its weights.
            det = units_from_patterns(pl_module, self.include, self.exclude)
            if not det.units:
                det.error = (
                    "the model's parameters were already sharded when SMDCallback could first see them (layers created "
                    "in configure_model): name the normalized weights with SMDCallback(include=[...]), or create the "
                    "layers in __init__ and shard them in configure_model"
                )
        else:
            det = find_normalized_weights(pl_module, include=self.include, exclude=self.exclude)
        self.session.detection = det
        for code, fields in det.pattern_warnings():  # include/exclude patterns that match no parameter
            self.session.warn(code, **fields)
        if det.method == "deferred":
            # fx could not trace the model (or it has lazy parameters): record the data flow of the first
            # training batch instead, and attach before its optimizer step.
            self._deferred = True
            if det.units:  # include= patterns
                self._attach(trainer, pl_module, det.units)
            return
        if det.error:
            self.session.warn("SMD006", error=det.error)
        self._attach(trainer, pl_module, det.units)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # Analyse the data flow before configure_model and the strategy shard or wrap the model (FSDP2
        # replaces parameters by DTensor shards); on_fit_start uses this result when it still applies.
        self._setup_detection = None
        if stage != "fit" or _unsupported_strategy(trainer):
            return
        try:
            if any(True for _ in pl_module.parameters()) and not _is_sharded(pl_module.parameters()):
                self._setup_detection = find_normalized_weights(pl_module, include=self.include, exclude=self.exclude)
        except Exception:  # noqa: BLE001 - detection is retried at fit start
            self._setup_detection = None

    def _attach(self, trainer: pl.Trainer, pl_module: pl.LightningModule, units: list[NormalizedWeight]) -> None:
        """Hand the tracked weights and the Trainer's optimizers to the session (or resume it)."""
        resume, self._resume_state = self._resume_state, None
        self.session.attach(
            _named_parameters(pl_module),
            list(trainer.optimizers),
            units,
            capacity=self._interval(trainer) // self.every_n_steps + 2,
            shard_group=_fsdp1_group(trainer),
            # a debug run is short on purpose: no warning that it is too short to be judged
            planned_steps=None if _debug_run(trainer) else _planned_steps(trainer),
            model_name=type(pl_module).__name__,
            resume=resume,
        )
        if resume:
            self._last_logged_step = int(resume.get("last_logged_step", -1))
        elif self.verbose and trainer.is_global_zero and self.session.judgeable_after:
            steps, name, tau = self.session.judgeable_after
            planned = _planned_steps(trainer)
            print(
                f"SMDCallback: equilibrium can be judged after about {steps} steps of unchanged settings (slowest layer "
                f"{name}, relaxation time {tau:.0f} steps); planned: {planned if planned is not None else 'unknown'} steps"
            )

    # ------------------------------------------------------------------------------------------
    # First batch: deferred detection and the numerical check of invariance
    # ------------------------------------------------------------------------------------------
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        if self.recorder is not None and not self._rebased:
            # Weights may have changed since fit start (a checkpoint restored by the strategy, a module's
            # own on_fit_start/on_train_start): measure the first step from the weights it really starts from.
            self._rebased = True
            self._start_recorder(trainer)
        if self._deferred and self._flow is None:
            self._flow = DataFlowRecorder(dict(pl_module.named_parameters()))
            self._flow_losses = []
            self._flow_batches += 1
            self._flow.__enter__()

    def _start_recorder(self, trainer: pl.Trainer) -> None:
        """Before the first measured step: count steps as the Trainer does (a resume from a checkpoint made without
        this callback, a second fit: the loops' state is restored after on_fit_start), and take ``w_t`` now."""
        if self.recorder is None:
            return
        self.recorder.start_at(_optimizer_steps(trainer))
        self.recorder.rebase()

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor) -> None:
        if self._flow is not None:
            self._flow_losses.append(loss)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self._flow is not None:
            # manual optimization (several losses), or a batch without a backward we saw
            losses = list(self._flow_losses) or [t for t in _tensors_of(outputs)]
            if losses or self._flow_batches >= 3:
                self._finish_deferred(trainer, pl_module, losses)
            else:  # nothing to analyse yet (training_step skipped this batch): record the next one
                self._stop_flow()
        if self.recorder is None:
            return
        self._accumulate_loss(outputs)
        if self.recorder.pending == 0 or not self._is_log_step(trainer):
            return
        self._flush(trainer, _logger_step(trainer))

    def _accumulate_loss(self, outputs: Any) -> None:
        """Sum the training loss on its device (no synchronization); read once per log step."""
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if isinstance(loss, torch.Tensor) and loss.numel() == 1:
            value = loss.detach().float().reshape(())
            self._loss_sum = value if self._loss_sum is None or self._loss_sum.device != value.device else self._loss_sum + value
            self._loss_count += 1

    def _stop_flow(self) -> DataFlowRecorder | None:
        flow, self._flow = self._flow, None
        if flow is not None:
            flow.__exit__(None, None, None)
        return flow

    def _finish_deferred(self, trainer: pl.Trainer, pl_module: pl.LightningModule, losses: list[Any]) -> None:
        flow = self._stop_flow()
        self._deferred = False
        self._flow_losses = []
        if flow is None:
            return
        previous = self.detection
        try:
            det = detect_from_graph(pl_module, flow.graph(losses), self.include, self.exclude)
        except Exception as err:  # noqa: BLE001 - never crash the training run over detection
            det = Detection(method="none", error=f"the recorded data flow could not be analysed ({type(err).__name__}: {err})")
        if previous is not None and previous.error and det.error is None:
            det.error = None  # fx failed, the recorded forward pass worked
        self.session.detection = det
        if det.error:
            self.session.warn("SMD006", error=det.error)
        units = det.units or (previous.units if previous else [])
        self._attach(trainer, pl_module, units)
        self._start_recorder(trainer)
        self._rebased = True  # attached right now, from the current weights

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer) -> None:
        if self._flow is not None and self._flow_losses and pl_module.automatic_optimization:
            # one loss per batch: attach now, before this first step, so that it is measured too
            self._finish_deferred(trainer, pl_module, list(self._flow_losses))
        if not self.session.verify_pending:
            return
        if _fsdp1_group(trainer) is not None:
            self.session.skip_verification()  # flat shard views: the per-filter check needs whole tensors
            return
        self.session.eval_norms = eval_mode_batch_norms(pl_module)
        units = self.session.verify(_named_parameters(pl_module), gather=_full)
        if units and self.verbose and trainer.is_global_zero:
            print(f"SMDCallback: tracking {len(units)} normalized weight(s)\n" + format_detection_table(Detection(units=units)))

    # ------------------------------------------------------------------------------------------
    # Per step
    # ------------------------------------------------------------------------------------------
    def _is_log_step(self, trainer: pl.Trainer) -> bool:
        loop = trainer.fit_loop.epoch_loop
        should_accumulate = getattr(loop, "_should_accumulate", None)
        if callable(should_accumulate) and should_accumulate():
            return False
        return (_logger_step(trainer) + 1) % self._interval(trainer) == 0 or bool(trainer.should_stop)

    def _interval(self, trainer: pl.Trainer) -> int:
        return int(self.log_every_n_steps or max(int(trainer.log_every_n_steps or 1), 1))

    def _flush(self, trainer: pl.Trainer, step: int) -> None:
        """Drain the device buffers (one host synchronization), update the diagnostics and log."""
        session = self.session
        if self._loss_sum is not None and self._loss_count:
            # one more read at the log step, where the drain synchronizes anyway
            session.observe_loss(float(self._loss_sum) / self._loss_count)
            self._loss_sum, self._loss_count = None, 0
        distances = session.drain(_planned_steps(trainer))
        if self.on_no_equilibrium == "stop" and session.stop_reason is None:
            reason = session.impossible(_planned_steps(trainer), self._interval(trainer))
            if reason is not None and _debug_run(trainer) and not session.diagnostics.diverged.any():
                reason = None  # a debug run is short by design (see _finish)
            # every rank takes the same decision, so that no rank is left waiting in a collective
            if trainer.strategy.reduce_boolean_decision(reason is not None, all=False):
                session.stop(reason or "another rank found equilibrium impossible")
                trainer.should_stop = True
        if step <= self._last_logged_step:
            return
        metrics = {renamed(k, self._namespace): v for k, v in session.metrics(self.log_per_layer, distances).items()}
        if not self._loggers_ready:
            self._loggers_ready = True
            if trainer.is_global_zero:
                names = [u.name for u in self.diagnostics.units]
                mode = per_layer_mode(self.log_per_layer, len(names))
                setup_loggers(trainer.loggers, names, mode, session.worst_k, session.warn, self._namespace)
        for logger in trainer.loggers:
            try:
                logger.log_metrics(metrics, step=step)
            except Exception as err:  # noqa: BLE001 - a logger refusing a metric must not stop training
                session.warn("SMD040", logger=type(logger).__name__, error=f"{type(err).__name__}: {err}")
        for key in ("smd/angular_update_ratio", "smd/equilibrium_fraction"):
            key = renamed(key, self._namespace)
            trainer.callback_metrics[key] = torch.tensor(metrics[key])
        # the progress bars (TQDM and Rich) show trainer.progress_bar_metrics, which keeps what is put there
        label = "" if self._label is None else f"-{self._label}"
        trainer.progress_bar_metrics.update({k.replace("smd", "smd" + label, 1): v for k, v in session.progress().items()})
        self._last_logged_step = step
        self._logs += 1
        if self.heatmap_every_n_logs and self._logs % self.heatmap_every_n_logs == 0:
            self._log_heatmap(trainer, step)

    def _save_workspace(self, trainer: pl.Trainer) -> None:
        run = next((logger.experiment for logger in trainer.loggers if "WandbLogger" in {k.__name__ for k in type(logger).__mro__}), None)
        if run is None:
            self.session.warn("SMD046", why="the Trainer has no WandbLogger")
            return
        if getattr(getattr(run, "settings", None), "mode", "") in ("offline", "disabled") or not getattr(run, "entity", None):
            self.session.warn("SMD046", why="the W&B run is offline")
            return
        try:
            from lightning_smd.io.workspace import build_workspace, save_workspace

            names = [u.name for u in self.diagnostics.units] if self.diagnostics else []
            save_workspace(build_workspace(run.entity, run.project, names, self.log_per_layer, self.session.worst_k))
        except Exception as err:  # noqa: BLE001 - a workspace that cannot be saved must not fail the run
            self.session.warn("SMD046", why=f"{type(err).__name__}: {err}")

    def _log_heatmap(self, trainer: pl.Trainer, step: int) -> None:
        """Draw the heatmap from the host-side history (log steps only) and hand it to the loggers."""
        if not self.log_heatmap or not trainer.is_global_zero or not trainer.loggers or step == self._heatmap_step:
            return
        self._heatmap_step = step
        figure = self.session.heatmap()
        if figure is None:
            if len(self.session.history) and not _has_matplotlib():
                self.session.warn("SMD045")
            return
        log_heatmap(trainer.loggers, render_rgb(figure), step, self.session.warn, self._namespace)

    # ------------------------------------------------------------------------------------------
    # End
    # ------------------------------------------------------------------------------------------
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.recorder is None or self.diagnostics is None:
            return
        if self.recorder.pending:
            self._flush(trainer, max(_logger_step(trainer) - 1, self._last_logged_step + 1))
        self.session.end_warnings()
        self._log_heatmap(trainer, max(_logger_step(trainer) - 1, self._last_logged_step))
        self._finish(trainer, complete=True)
        if trainer.is_global_zero:
            finish_loggers(trainer.loggers, self.summary(), self.session.warn, self._namespace)
            if self.wandb_workspace:
                self._save_workspace(trainer)
        if self.verbose and trainer.is_global_zero:
            print_summary_table(self.summary(), TABLE_ROWS)
            if self._summary_file:
                print(f"SMDCallback: summary written to {self._summary_file}")
        self._gate(trainer)

    def _gate(self, trainer: pl.Trainer) -> None:
        summary = self.summary()
        failed = self.session.gate_failed(summary)
        if failed and summary.get("gate"):  # stood down in a debug run (see _finish)
            if self.on_no_equilibrium != "warn":
                self.session.warn("SMD027", run=_debug_run(trainer), verdict=summary.get("verdict"), gate=self.on_no_equilibrium)
            return
        if self.on_no_equilibrium == "raise":
            # every rank takes the same decision, so that no rank is left waiting in a collective
            if trainer.strategy.reduce_boolean_decision(failed, all=False):
                where = f" (summary: {self._summary_file})" if self._summary_file else ""
                raise EquilibriumNotReachedError(f"SMD verdict '{summary.get('verdict')}': {summary.get('reason', '')}{where}", summary)
        elif failed and summary.get("verdict") == Verdict.NOT_REACHED and self.on_no_equilibrium == "warn":
            self.session.warn("SMD034", reason=summary.get("reason", ""))

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Lightning skips on_train_end when there is nothing to train (limit_train_batches=0, max_steps reached by
        # a restored checkpoint): the summary is still written, and the gate still speaks
        if self.session.detection is None or self._finished:
            return  # (no fit started, or on_train_end finished it)
        self._finish(trainer, complete=True)
        self._gate(trainer)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        # Never lose what was measured: write the summary, marked incomplete, before the exception goes on.
        self._stop_flow()
        if self.session.detection is None or self._summary is not None:
            return  # no fit started here (validate/test/predict), or its summary is written already
        try:
            # a sharded drain is a collective, and an exception may have reached this rank alone: keep what
            # was already reduced (nothing is attached yet when detection waited for the first batch)
            if self.recorder is not None and self.diagnostics is not None and not any(slot.sharded for slot in self.recorder.slots):
                for batch in self.recorder.drain():
                    self.diagnostics.update(batch)
            self._finish(trainer, complete=False, error=_describe(exception))
        except Exception as err:  # noqa: BLE001 - the callback never raises on its own failures
            warnings.warn(SMDWarning(render("SMD044", exception=type(exception).__name__, error=err), "SMD044"), stacklevel=2)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._close()

    def _close(self) -> None:
        self._stop_flow()
        self.session.close()

    def _finish(self, trainer: pl.Trainer, complete: bool, error: str | None = None) -> None:
        summary = self.session.summary(complete=complete, error=error, global_step=int(trainer.global_step))
        debug = _debug_run(trainer)
        # a debug run tests the pipeline, not the dynamics: too short to be judged, it does not fail the gate (a
        # diverged one still does: a NaN in a debug run is a real fault)
        summary["gate"] = f"stood down: {debug}" if debug and summary.get("verdict") != Verdict.DIVERGED else None
        summary["name"] = self._label  # None for a Trainer's only (or first, default) SMDCallback
        self._summary = summary
        self._finished = complete
        if self.summary_path is False or not trainer.is_global_zero:
            return
        path = str(self.summary_path) if self.summary_path not in (None, True) else os.path.join(_log_dir(trainer), summary_filename(self._label))
        written = self.session.write(path, summary)
        if written:
            self._summary_file = written
        else:
            summary["warnings"] = list(self.session.warnings)

    # ------------------------------------------------------------------------------------------
    # Public results
    # ------------------------------------------------------------------------------------------
    def summary(self) -> dict[str, Any]:
        """The run summary (the content of ``smd_summary.json``); computed now if training has not ended."""
        if self._summary is not None:
            return self._summary
        return self.session.summary(complete=False)

    @property
    def summary_file(self) -> str | None:
        """Where the summary JSON was written (rank zero), or ``None``."""
        return self._summary_file

    def format_summary(self, max_rows: int | None = TABLE_ROWS) -> str:
        """The end-of-training table: per layer measured vs predicted, and the verdict; above ``max_rows``
        layers the ones not in equilibrium come first and the rest is counted (``None``: every row)."""
        return format_summary_table(self.summary(), max_rows)


#: What a ``name`` (and an automatic label) may hold: safe in metric keys of every logger and in file names.
_LABEL = re.compile(r"[A-Za-z0-9_.\-]{1,64}")
#: Longest automatic label (from the options that set an instance apart); longer ones become ``2``, ``3``, …
_LABEL_CHARS = 40
#: Options that change how results are shown or where they go, not what is measured or judged: they do not label.
_PRESENTATION = frozenset(
    {"verbose", "keep_history", "log_heatmap", "heatmap_every_n_logs", "wandb_workspace", "log_per_layer", "worst_k", "log_every_n_steps", "summary_path"}
)


def _distinct_options(given: dict[str, Any]) -> dict[str, Any]:
    """The constructor options given that differ from their defaults, in signature order."""
    defaults = {k: p.default for k, p in inspect.signature(SMDCallback.__init__).parameters.items() if k != "self"}
    out = {}
    for k, v in given.items():
        value = str(v) if isinstance(v, os.PathLike) else v
        if k in defaults and value != defaults[k]:
            out[k] = list(value) if isinstance(value, tuple) else value
    return out


def _smd_callbacks(callbacks: Sequence[Any]) -> list[SMDCallback]:
    return [cb for cb in callbacks if isinstance(cb, SMDCallback)]


def _refuse_duplicates(callback: SMDCallback, key: str) -> None:
    """Refuse, with our message, two SMDCallbacks with the same options in one Trainer: they would measure the
    same weights twice and write the same summary and series. Lightning validates the state keys of a Trainer's
    callbacks when it is built (``_validate_callbacks_list``) and reads this property for it, which is the
    only moment a callback can see the list it is in; anywhere else nothing is checked here."""
    frame = sys._getframe(2)  # the caller of the state_key property
    if frame.f_code.co_name != "_validate_callbacks_list":
        return
    others = [cb for cb in _smd_callbacks(frame.f_locals.get("callbacks") or ()) if cb is not callback]
    if any(cb._distinct == callback._distinct for cb in others) or sum(cb is callback for cb in frame.f_locals.get("callbacks") or ()) > 1:
        raise ValueError(
            "The Trainer was given two SMDCallbacks with the same options: they would measure the same weights twice and "
            "write the same summary and metrics. Keep one, or make them differ, e.g. SMDCallback(name='strict', "
            "require_agreement=True) next to SMDCallback()."
        )


def _instance_label(callback: SMDCallback, callbacks: Sequence[Any]) -> str | None:
    """None for a Trainer's only SMDCallback (and for the first one measuring with the default options); else its
    ``name``, or the measuring options that set it apart (``tolerance-0.05``), or its position among the
    SMDCallbacks (``2``) when those are none or too long."""
    peers = _smd_callbacks(callbacks)
    if len(peers) <= 1:
        return None
    labels: list[str | None] = []
    plain_taken = False
    for i, cb in enumerate(peers):
        if cb.name is not None:
            labels.append(cb.name)
            continue
        measuring = {k: v for k, v in cb._distinct.items() if k not in _PRESENTATION}
        if not measuring and not plain_taken:
            plain_taken = True
            labels.append(None)
        else:
            auto = "_".join(f"{k}-{v}" for k, v in measuring.items())
            auto = re.sub(r"[^A-Za-z0-9_.\-]+", "", auto.replace(" ", ""))
            labels.append(auto if 0 < len(auto) <= _LABEL_CHARS else str(i + 1))
    clash = {x for x in labels if labels.count(x) > 1}
    if clash:
        raise ValueError(
            f"Two SMDCallbacks of this Trainer would log under the same keys ({', '.join(sorted(map(str, clash)))}): give them "
            "different name=... values."
        )
    return labels[[i for i, cb in enumerate(peers) if cb is callback][0]]


def _describe(exception: BaseException) -> str:
    """The summary's ``error``: the exception's type and message (Lightning raises a bare SIGTERMException when the
    process receives SIGTERM, and Ctrl-C is a bare KeyboardInterrupt: those are said in words)."""
    name = type(exception).__name__
    text = str(exception)
    if not text and name == "SIGTERMException":
        text = "the process received SIGTERM (training stopped by the Trainer's signal handler)"
    elif not text and isinstance(exception, KeyboardInterrupt):
        text = "interrupted (Ctrl-C)"
    return f"{name}: {text}" if text else name


def _has_matplotlib() -> bool:
    return importlib.util.find_spec("matplotlib") is not None


def _rank_zero_emitter(trainer: pl.Trainer, label: str | None = None) -> Any:
    """Warnings are kept on every rank (and in the summary) but shown on rank zero only; with several
    SMDCallbacks, each shown warning says which one it comes from."""

    def emit(message: str, code: str) -> None:
        if trainer.is_global_zero:
            shown = message if label is None else f"SMDCallback {label!r}: {message}"
            warnings.warn(SMDWarning(shown, code), stacklevel=5)

    return emit


#: Segments that FSDP1 and activation checkpointing insert into parameter names after setup().
_WRAPPER_SEGMENTS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")


def _named_parameters(module: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """Parameters by the names detection uses: wrapper segments that FSDP1 and activation checkpointing
    insert after setup() are removed (``torch.compile``'s ``_orig_mod`` too, when detection saw it)."""
    out: dict[str, torch.nn.Parameter] = {}
    for name, p in module.named_parameters():
        out[name] = p
        clean = name
        for seg in _WRAPPER_SEGMENTS:
            clean = clean.replace(seg, "")
        out.setdefault(clean, p)
    return out


def _fsdp1_group(trainer: pl.Trainer) -> str | None:
    """FSDP1 (Lightning's FSDPStrategy) shards plain tensors (flat views) over the default group."""
    return "world" if type(trainer.strategy).__name__ == "FSDPStrategy" else None


def _full(t: Any) -> Any:
    """The whole tensor of a DTensor shard (a collective: every rank must call it in the same order)."""
    from lightning_smd.engine.measure import _DTENSOR

    if t is not None and _DTENSOR is not None and isinstance(t, _DTENSOR):
        return t.full_tensor()
    return t


def _is_sharded(params: Any) -> bool:
    from lightning_smd.engine.measure import _DTENSOR

    return _DTENSOR is not None and any(isinstance(p, _DTENSOR) for p in params)


def _unsupported_strategy(trainer: pl.Trainer) -> str | None:
    """Why the strategy cannot be measured correctly (then nothing is measured), or None."""
    name = type(trainer.strategy).__name__
    if "DeepSpeed" in name:
        return (
            f"{name} is not supported by SMDCallback: ZeRO partitions parameters and optimizer state into fp32 fragments "
            "this callback does not read, so norms and angles would be wrong. Nothing is measured (verdict 'not_applicable'); "
            "use DDP, or FSDP2 through ModelParallelStrategy with fully_shard."
        )
    if name == "FSDPStrategy":
        sharding = str(getattr(trainer.strategy, "sharding_strategy", ""))
        if "HYBRID" in sharding or not getattr(trainer.strategy, "kwargs", {}).get("use_orig_params", True):
            return (
                f"FSDPStrategy with {sharding or 'use_orig_params=False'} is not supported by SMDCallback: it needs "
                "use_orig_params=True and full sharding over all ranks (the partial sums are reduced over the default "
                "group). Nothing is measured (verdict 'not_applicable')."
            )
    return None


def _tensors_of(outputs: Any) -> list[torch.Tensor]:
    if isinstance(outputs, torch.Tensor):
        return [outputs] if outputs.requires_grad else []
    if isinstance(outputs, dict) and isinstance(outputs.get("loss"), torch.Tensor):
        return [outputs["loss"]]
    return []


def _logger_step(trainer: pl.Trainer) -> int:
    """The step Lightning logs the current batch's metrics at (``_batches_that_stepped``)."""
    loop = trainer.fit_loop.epoch_loop
    step = getattr(loop, "_batches_that_stepped", None)
    return int(step) if step is not None else max(int(trainer.global_step) - 1, 0)


def _debug_run(trainer: pl.Trainer) -> str | None:
    """What makes this fit a debug run too short to be judged by design (``fast_dev_run``,
    ``limit_train_batches=0``), or None."""
    if getattr(trainer, "fast_dev_run", False):
        return f"fast_dev_run={trainer.fast_dev_run}"
    if getattr(trainer, "limit_train_batches", None) == 0:
        return "limit_train_batches=0"
    return None


def _optimizer_steps(trainer: pl.Trainer) -> int:
    """Steps each optimizer has taken so far: the global step with one optimizer (it counts every optimizer's
    steps), the batches that stepped with several (manual optimization stepping each once per batch)."""
    return int(trainer.global_step) if len(trainer.optimizers) <= 1 else _logger_step(trainer)


def _planned_steps(trainer: pl.Trainer) -> int | None:
    if trainer.max_steps is not None and trainer.max_steps > 0:
        return int(trainer.max_steps)
    try:
        est = trainer.estimated_stepping_batches
    except Exception:  # noqa: BLE001 - an unknown plan just means no warning
        return None
    if est is None or not math.isfinite(float(est)):
        return None
    return int(est)


def _log_dir(trainer: pl.Trainer) -> str:
    """The first logger's directory, else ``default_root_dir``. Unlike ``trainer.log_dir`` this issues no
    collective (``trainer.log_dir`` broadcasts from rank zero, which hangs when called on one rank only)."""
    for logger in trainer.loggers:
        d = getattr(logger, "log_dir", None) or getattr(logger, "save_dir", None)
        if d:
            return str(d)
    return trainer.default_root_dir


