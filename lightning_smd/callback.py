"""The Lightning glue: hooks, logging, the summary.

``SMDCallback()`` finds the model's normalized weights when fit starts, measures each one after every
optimizer step (on the device, without host synchronization), compares it with the equilibrium Spherical
Motion Dynamics predicts for the optimizer settings in force, logs to every logger the Trainer has at
its log interval, and writes ``smd_summary.json`` with the verdict when training ends — also when it
ends early, by an exception or an interrupt (then marked ``"complete": false``).
"""

from __future__ import annotations

import importlib
import inspect
import math
import os
import warnings
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from typing import TYPE_CHECKING

import torch

from lightning_smd.detect import (
    NOT_ORTHOGONAL_WARNING,
    ORTHOGONALITY_TOLERANCE,
    DataFlowRecorder,
    Detection,
    NormalizedWeight,
    detect_from_graph,
    find_normalized_weights,
    format_detection_table,
    units_from_patterns,
    verify_orthogonality,
)
from lightning_smd.diagnose import WINDOW_RELAXATION_TIMES, Diagnostics, DiagnosticsConfig, diffusion_exponent, metric_name
from lightning_smd.loggers import finish_loggers, setup_loggers
from lightning_smd.measure import DistanceTracker, StepRecorder
from lightning_smd.report import (
    SUMMARY_FILENAME,
    EquilibriumNotReachedError,
    SMDWarning,
    filter_spec,
    format_summary_table,
    optimizer_info,
    write_summary,
)
from lightning_smd.theory import group_hyper

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


class SMDCallback(*_CALLBACK_BASES):  # type: ignore[misc]
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
        log_per_layer: log the per-layer metrics, not only the aggregates.
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
        log_per_layer: bool = True,
        summary_path: str | os.PathLike | bool | None = None,
        verbose: bool = True,
        keep_history: bool = False,
        use_momentum_buffer: bool = True,
        per_filter: bool = False,
        on_no_equilibrium: str = "warn",
        track_distance: bool = False,
        every_n_steps: int = 1,
    ) -> None:
        super().__init__()
        if isinstance(every_n_steps, bool) or not isinstance(every_n_steps, int) or every_n_steps < 1:
            raise ValueError(f"every_n_steps must be an integer >= 1, got {every_n_steps!r}")
        self.every_n_steps = every_n_steps
        if on_no_equilibrium not in ("warn", "stop", "raise"):
            raise ValueError(f"on_no_equilibrium must be 'warn', 'stop' or 'raise', got {on_no_equilibrium!r}")
        self.on_no_equilibrium = on_no_equilibrium
        self.track_distance = track_distance
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
        if log_every_n_steps is not None and log_every_n_steps < 1:
            raise ValueError(f"log_every_n_steps must be >= 1, got {log_every_n_steps}")
        self.include = list(include or [])
        self.exclude = list(exclude or [])
        self.log_every_n_steps = log_every_n_steps
        self.log_per_layer = log_per_layer
        self.summary_path = summary_path
        self.verbose = verbose
        self.keep_history = keep_history
        self.use_momentum_buffer = use_momentum_buffer
        self.per_filter = per_filter
        self.detection: Detection | None = None
        self.recorder: StepRecorder | None = None
        self.diagnostics: Diagnostics | None = None
        self.warnings: list[str] = []
        self._summary: dict[str, Any] | None = None
        self._summary_file: str | None = None
        self._last_logged_step = -1
        self._flow: DataFlowRecorder | None = None
        self._deferred = False
        self._verify_pending = False
        self._finished = False
        self._warned: set[str] = set()
        self._stop_reason: str | None = None
        self.distance: DistanceTracker | None = None
        self._flow_losses: list[Any] = []
        self._flow_batches = 0
        self._rebased = False
        self._verify_tries = 0
        self._resume_state: dict[str, Any] | None = None
        self._setup_detection: Detection | None = None
        self._loggers_ready = False

    @property
    def state_key(self) -> str:
        # two SMDCallbacks with different criteria or selections can coexist in one checkpoint
        return self._generate_state_key(
            tolerance=self.config.tolerance, window=self.config.window, include=self.include, exclude=self.exclude
        )

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue measuring after a resume, as plain Python types. Drains the device
        buffers first (checkpointing synchronizes anyway)."""
        if self.diagnostics is None or self.recorder is None:
            return {}
        for batch in self.recorder.drain():
            self.diagnostics.update(batch)
        return {
            "version": 2,
            "diagnostics": self.diagnostics.state_dict(),
            "slots": [[slot.index, str(slot.device), slot.steps_taken] for slot in self.recorder.slots],
            "warnings": list(self.warnings),
            "warned": sorted(self._warned),
            "last_logged_step": self._last_logged_step,
            "verified": not self._verify_pending,
            "units": [[u.name, u.granularity, u.group_size, u.verification] for u in self.diagnostics.units],
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Lightning restores callbacks before on_fit_start, which attaches: keep it until then.
        self._resume_state = dict(state_dict) if state_dict else None

    def _resume(self, trainer: pl.Trainer) -> None:
        state, self._resume_state = self._resume_state, None
        if not state or self.diagnostics is None or self.recorder is None:
            return
        try:
            self.diagnostics.load_state_dict(state["diagnostics"])
        except (KeyError, ValueError) as err:
            self._warn(trainer, f"the SMD state in the checkpoint does not fit this run ({err}); measuring from scratch")
            return
        steps = {(int(i), str(d)): int(n) for i, d, n in state.get("slots", [])}
        for slot in self.recorder.slots:
            slot.steps_taken = steps.get((slot.index, str(slot.device)), slot.steps_taken)
        if state.get("verified"):
            known = {row[0]: row for row in state.get("units", [])}
            units = [
                replace(u, granularity=known[u.name][1], group_size=known[u.name][2], verification=known[u.name][3]) if u.name in known else u
                for u in self.diagnostics.units
            ]
            self.diagnostics.units = units
            if self.detection is not None:
                self.detection.units = units
            self._verify_pending = False
        self.warnings = list(state.get("warnings", []))
        self._warned = set(state.get("warned", []))
        self._last_logged_step = int(state.get("last_logged_step", -1))

    def __getstate__(self) -> dict[str, Any]:
        # ddp_spawn pickles the callback: hooks, device buffers and an active recorder stay behind.
        state = {k: v for k, v in self.__dict__.items() if not inspect.ismethod(v)}  # Lightning binds `log` here
        state.update(recorder=None, _flow=None, diagnostics=None, detection=None, distance=None, _setup_detection=None)
        return state

    # ------------------------------------------------------------------------------------------
    # Set-up
    # ------------------------------------------------------------------------------------------
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._close()
        self._loggers_ready = False
        self.warnings = []
        self._summary = None
        self._last_logged_step = -1
        self._verify_pending = False
        self._deferred = False
        self._finished = False
        self._warned = set()
        self._stop_reason = None
        self._flow_losses, self._flow_batches, self._rebased, self._verify_tries = [], 0, False, 0
        unsupported = _unsupported_strategy(trainer)
        if unsupported:
            self.detection = Detection(method="none", error=unsupported)
            self._warn(trainer, unsupported)
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
        self.detection = det
        if det.method == "deferred":
            # fx could not trace the model (or it has lazy parameters): record the data flow of the first
            # training batch instead, and attach before its optimizer step.
            self._deferred = True
            if det.units:  # include= patterns
                self._attach(trainer, pl_module, det.units)
            return
        if det.error:
            self._warn(trainer, det.error)
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
        """Create the recorder and the diagnostics for ``units`` and issue the fit-start warnings."""
        self._close()
        named = _named_parameters(pl_module)
        units = [u for u in units if all(p in named for p in u.params)]
        recorder = self._make_recorder(trainer, pl_module, units)
        if recorder.unoptimized:
            names = ", ".join(units[i].name for i in recorder.unoptimized)
            self._warn(
                trainer,
                f"{len(recorder.unoptimized)} normalized weight(s) are not updated by any optimizer (or by parts of "
                f"several): {names}. They are not measured.",
            )
            dropped = set(recorder.unoptimized)
            recorder.close()
            units = [u for i, u in enumerate(units) if i not in dropped]
            recorder = self._make_recorder(trainer, pl_module, units)
        self.recorder = recorder
        self.diagnostics = Diagnostics(units, self.config, keep_history=self.keep_history, stride=self.every_n_steps)
        self.distance = None
        if self.track_distance:
            if any(slot.sharded for slot in recorder.slots):
                self._warn(trainer, "track_distance is not supported with sharded parameters yet: the angular distance is not measured.")
            else:
                self.distance = DistanceTracker([[named[p] for p in u.params] for u in units])
        self._verify_pending = bool(units)
        resumed = self._resume_state is not None
        self._resume(trainer)
        if not resumed:
            self._check_setup(trainer, pl_module, units, recorder)

    def _make_recorder(self, trainer: pl.Trainer, pl_module: pl.LightningModule, units: list[NormalizedWeight]) -> StepRecorder:
        named = _named_parameters(pl_module)
        return StepRecorder(
            [[named[p] for p in u.params] for u in units],
            list(trainer.optimizers),
            capacity=self._interval(trainer) // self.every_n_steps + 2,
            use_momentum_buffer=self.use_momentum_buffer,
            unit_filters=[filter_spec(u) for u in units] if self.per_filter else None,
            shard_group=_fsdp1_group(trainer),
            every_n_steps=self.every_n_steps,
        )

    # ------------------------------------------------------------------------------------------
    # First batch: deferred detection and the numerical check of invariance
    # ------------------------------------------------------------------------------------------
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        if self.recorder is not None and not self._rebased:
            # Weights may have changed since fit start (a checkpoint restored by the strategy, a module's
            # own on_fit_start/on_train_start): measure the first step from the weights it really starts from.
            self._rebased = True
            self.recorder.rebase()
        if self._deferred and self._flow is None:
            self._flow = DataFlowRecorder(dict(pl_module.named_parameters()))
            self._flow_losses = []
            self._flow_batches += 1
            self._flow.__enter__()

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
        if self.recorder is None or self.recorder.pending == 0:
            return
        if not self._is_log_step(trainer):
            return
        self._flush(trainer, _logger_step(trainer))

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
        self.detection = det
        if det.error:
            self._warn(trainer, det.error + " Name the normalized weights with SMDCallback(include=[...]).")
        units = det.units or (previous.units if previous else [])
        self._attach(trainer, pl_module, units)
        self._rebased = True  # attached right now, from the current weights

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer) -> None:
        if self._flow is not None and self._flow_losses and pl_module.automatic_optimization:
            # one loss per batch: attach now, before this first step, so that it is measured too
            self._finish_deferred(trainer, pl_module, list(self._flow_losses))
        if not self._verify_pending or self.diagnostics is None or self.detection is None:
            return
        self._verify_tries += 1
        if self._verify_tries > 5:
            self._verify_pending = False
            return
        if _fsdp1_group(trainer) is not None:
            self._verify_pending = False  # flat shard views: the per-filter check needs whole tensors
            return
        # One host synchronization, once per fit: |cos(g, w)| of every candidate weight on the first batch.
        named = _named_parameters(pl_module)
        # sorted: under sharding every rank gathers the same tensors in the same order
        names = sorted({p for u in self.diagnostics.units for p in u.params} | {n for n in self.detection.rejected if n in named})
        grads = {n: _full(named[n].grad) for n in names}
        try:
            units, rejected = verify_orthogonality(self.diagnostics.units, {n: _full(named[n]) for n in names}, grads, self.detection.rejected)
        except Exception as err:  # noqa: BLE001
            self._warn(trainer, f"the numerical check of scale invariance failed ({type(err).__name__}: {err}); detection is structural only")
            return
        if self.per_filter and [filter_spec(u) for u in units] != [filter_spec(u) for u in self.diagnostics.units]:
            # the check found a finer invariance (e.g. per attention head): record per-filter stats at it
            assert self.recorder is not None
            self.recorder.close()
            self.recorder = self._make_recorder(trainer, pl_module, units)
        if all(u.verification is None for u in units) and any(grads[p] is not None for u in units for p in u.params):
            return  # no usable gradient on this step (overflowed under fp16 loss scaling): try the next one
        self._verify_pending = False
        self.diagnostics.units = units
        self.detection.units = units
        self.detection.rejected_verification = rejected
        for u in units:
            if u.verification is not None and u.verification > NOT_ORTHOGONAL_WARNING and u.found_by != "include":
                self._warn(trainer, _verification_message(u))
        if self.verbose and trainer.is_global_zero and units:
            print(f"SMDCallback: tracking {len(units)} normalized weight(s)\n" + format_detection_table(Detection(units=units)))

    def _check_setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, units: list, recorder: StepRecorder) -> None:
        if not units:
            rejected = "; ".join(f"{k}: {v}" for k, v in list((self.detection.rejected if self.detection else {}).items())[:3])
            self._warn(
                trainer,
                f"SMDCallback found no normalized (scale-invariant) weight in {type(pl_module).__name__}: no Conv/Linear "
                "weight reaches a BatchNorm/GroupNorm/LayerNorm/InstanceNorm/RMSNorm through positively homogeneous ops "
                f"only{' (' + rejected + ')' if rejected else ''}. Nothing is measured and the verdict will be "
                "'not_applicable'. If the model does normalize some weights, name them with "
                "SMDCallback(include=['block.*.conv.weight'])."
                ,
            )
            return
        zero_wd: dict[tuple[int, int], list[str]] = {}
        taus: list[tuple[float, str, str]] = []
        for slot in recorder.slots:
            rule = slot.rule
            for u_local, u in enumerate(slot.units):
                g = slot.groups[int(slot.unit_group[u_local])]
                group = slot.optimizer.param_groups[g]
                h = group_hyper(rule, slot.optimizer, group)
                if rule.name == "unknown":
                    continue
                if not h.get("weight_decay", 0.0) > 0.0:
                    zero_wd.setdefault((slot.index, g), []).append(units[u].name)
                    continue
                tau = rule.relaxation_time(h)
                if math.isfinite(tau) and not rule.unit_dependent(h):  # a unit-dependent τ needs the measured L
                    taus.append((_judging_steps(rule.norm_time_constant(h), self.config.window), tau, units[u].name, rule.describe(h)))
        unknown = sorted({type(s.optimizer).__name__ for s in recorder.slots if s.rule.name == "unknown"})
        if unknown:
            self._warn(
                trainer,
                f"No SMD rule is known for optimizer {', '.join(unknown)}: its normalized weights are measured and logged, "
                "but there is no prediction to compare with, so their verdict is 'not_applicable'. Register a rule with "
                "lightning_smd.theory.register(MyOptimizer, MyRule()) (see the README).",
            )
        caveats = sorted(
            {
                c
                for s in recorder.slots
                for g in s.groups
                if (c := s.rule.caveat(group_hyper(s.rule, s.optimizer, s.optimizer.param_groups[g])))
            }
        )
        for caveat in caveats:
            self._warn(trainer, caveat + ".")
        for (oi, g), names in zero_wd.items():
            shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
            self._warn(
                trainer,
                f"{len(names)} normalized weight(s) ({shown}) are in param group {g} of optimizer {oi} with weight_decay=0. "
                "Spherical Motion Dynamics has no equilibrium without weight decay: their norm grows without bound and "
                "the effective learning rate lr/|w|^2 decays towards zero. Give that param group weight_decay > 0 "
                "(e.g. 5e-4 for SGD, 0.05-0.1 for AdamW); only exclude norm affine parameters and biases from decay.",
            )
        planned = _planned_steps(trainer)
        if taus and planned is not None:
            needed, tau, name, desc = max(taus)
            if planned < needed:
                self._warn(
                    trainer,
                    f"The run is planned for {planned} optimizer steps, but a layer can be judged in equilibrium only after "
                    f"{math.ceil(needed)} steps of unchanged settings for the slowest one ({name}: relaxation time tau = {tau:.0f} "
                    f"steps for {desc}; tau = (1-momentum)/(2*lr*weight_decay)): 4 relaxation times of its angular update, and "
                    f"twice window={self.config.window} steps. The verdict will be 'not_reached': train for at least "
                    f"{math.ceil(needed)} steps (twice that to judge it well), or raise lr*weight_decay (the intrinsic learning "
                    "rate) to shorten tau.",
                )

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
        assert self.recorder is not None and self.diagnostics is not None
        for batch in self.recorder.drain():
            self.diagnostics.update(batch)
        for slot in self.recorder.slots:
            if slot.error is not None and f"failed:{slot.index}" not in self._warned:
                self._warned.add(f"failed:{slot.index}")
                self._warn(
                    trainer,
                    f"SMD measurement of optimizer {slot.index} ({type(slot.optimizer).__name__}) failed and stopped: "
                    f"{slot.error}. Training is unaffected; please report this with the model and optimizer.",
                )
        self._handle_events(trainer)
        distances = self._update_distance()
        if self.on_no_equilibrium == "stop" and self._stop_reason is None:
            self._stop_gate(trainer)
        if step <= self._last_logged_step:
            return
        metrics = self.diagnostics.metrics(per_layer=self.log_per_layer)
        if self.distance is not None and self.log_per_layer:
            for u, unit in enumerate(self.diagnostics.units):
                metrics[f"smd/{metric_name(unit.name)}/angular_distance"] = distances.get(u, math.nan)
        if not self._loggers_ready:
            self._loggers_ready = True
            if trainer.is_global_zero:
                setup_loggers(trainer.loggers, [u.name for u in self.diagnostics.units], self.log_per_layer, lambda m: self._warn(trainer, m))
        for logger in trainer.loggers:
            try:
                logger.log_metrics(metrics, step=step)
            except Exception as err:  # noqa: BLE001 - a logger refusing a metric must not stop training
                self._warn(trainer, f"{type(logger).__name__} refused the SMD metrics ({type(err).__name__}: {err}); they are not logged there")
        for key in ("smd/angular_update_ratio", "smd/equilibrium_fraction"):
            trainer.callback_metrics[key] = torch.tensor(metrics[key])
        self._last_logged_step = step

    def _update_distance(self) -> dict[int, float]:
        if self.distance is None or self.diagnostics is None:
            return {}
        d = self.diagnostics
        for u in range(len(d.units)):
            if u not in self.distance.reference_step and d.in_equilibrium[u]:
                self.distance.take(u, int(d.steps[u]))
        steps = int(d.steps.max(initial=0))
        return self.distance.measure(steps)

    def _handle_events(self, trainer: pl.Trainer) -> None:
        """Turn the diagnostics' new events into explained warnings, each kind once."""
        assert self.diagnostics is not None
        d = self.diagnostics
        events, d.events = d.events, []
        names = [u.name for u in d.units]
        vanishing = [e for e in events if e["kind"] == "vanishing"]
        if vanishing and "vanishing" not in self._warned:
            self._warned.add("vanishing")
            e = vanishing[0]
            layers = ", ".join(sorted({names[x["unit"]] for x in vanishing})[:5])
            self._warn(
                trainer,
                f"Vanishing gradient noise from step {e['step']} ({layers}): the gradient statistic L = E|g|^2|w|^2 fell "
                f"from {e['L_peak']:.3g} to {e['L_now']:.3g} and the angular update to {e['ratio']:.2f} of the prediction. "
                "The training loss is approaching zero (the network fits the training data), so there is nothing left to "
                "balance weight decay: the norms shrink geometrically and no equilibrium exists. This is a property of the "
                "run, not a measurement error; expect the effective learning rate to grow and the loss to spike later "
                "(Lobacheva et al., 2021). More data or augmentation, label smoothing, or a smaller weight decay late in "
                "training keep the gradient noise alive.",
            )
        spikes = [e for e in events if e["kind"] == "spike"]
        if spikes and "spike" not in self._warned:
            self._warned.add("spike")
            e = spikes[0]
            self._warn(
                trainer,
                f"Norm spike at step {e['step']} in {names[e['unit']]}: the angular update jumped to {e['ratio']:.1f} times "
                "the equilibrium prediction after the layer had been in equilibrium. Spikes like this follow a growing "
                "effective learning rate lr/|w|^2 (the norm shrank) and come with loss spikes (Lobacheva et al., 2021); "
                "see summary['spikes'] for all of them. A lower learning rate or weight decay, or gradient clipping, "
                "damps them.",
            )
        planned = _planned_steps(trainer)
        for e in (x for x in events if x["kind"] == "reequilibrating"):
            expected = e["expected_steps"]
            remaining = None if planned is None else planned - e["step"]
            if remaining is not None and math.isfinite(expected) and expected > remaining and "late_decay" not in self._warned:
                self._warned.add("late_decay")
                self._warn(
                    trainer,
                    f"The learning rate / weight decay changed at step {e['step']} (predicted angular update "
                    f"{e['from']:.3g} -> {e['to']:.3g} rad/step): {names[e['unit']]} needs about {expected:.0f} steps to "
                    f"re-equilibrate, but only {remaining} planned steps remain. Decay earlier, train longer after the decay, "
                    "or rescale the weights by the change of the equilibrium norm at the decay (Wan et al., Fig. 3).",
                )

    def _stop_gate(self, trainer: pl.Trainer) -> None:
        reason = self._impossible(trainer)
        decision = trainer.strategy.reduce_boolean_decision(reason is not None, all=False)
        if decision:
            self._stop_reason = reason or "another rank found equilibrium impossible"
            trainer.should_stop = True
            self._warn(trainer, f"Stopping training (on_no_equilibrium='stop'): {self._stop_reason}.")

    def _impossible(self, trainer: pl.Trainer) -> str | None:
        """Why the run can clearly not end in equilibrium, or None."""
        assert self.diagnostics is not None
        d = self.diagnostics
        app = d.applicable
        n_app = int(app.sum())
        if n_app == 0:
            return None
        required = math.ceil(self.config.min_fraction * n_app - 1e-9)
        if (d.steps - d.origin < self._interval(trainer))[app].any():
            return None  # the settings are still changing (a warm-up, a schedule): the future is unknown
        needed = d.steps_needed()
        no_decay = [d.units[u].name for u in range(len(d.units)) if app[u] and d.predicted[u] == 0.0]
        planned = _planned_steps(trainer)
        done = int(d.steps.max(initial=0))
        remaining = math.inf if planned is None else planned - done
        possible = [u for u in range(len(d.units)) if app[u] and not (needed[u] > 2.0 * remaining)]
        if len(possible) >= required:
            return None
        if no_decay and len(no_decay) > n_app - required:
            return f"{len(no_decay)} of {n_app} normalized layers have no weight decay, so they have no equilibrium ({', '.join(no_decay[:3])})"
        return (
            f"only {len(possible)} of {n_app} layers can reach equilibrium in the {remaining} remaining steps "
            f"(at least {required} needed; the others need more than twice that, by their relaxation times)"
        )

    # ------------------------------------------------------------------------------------------
    # End
    # ------------------------------------------------------------------------------------------
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.recorder is None or self.diagnostics is None:
            return
        if self.recorder.pending:
            self._flush(trainer, max(_logger_step(trainer) - 1, self._last_logged_step + 1))
        self._end_warnings(trainer)
        self._finish(trainer, complete=True)
        if trainer.is_global_zero:
            finish_loggers(trainer.loggers, self.summary(), lambda m: self._warn(trainer, m))
        if self.verbose and trainer.is_global_zero:
            print(self.format_summary())
        self._gate(trainer)

    def _end_warnings(self, trainer: pl.Trainer) -> None:
        assert self.diagnostics is not None
        diag = self.diagnostics.diagnoses()
        if diag.get("never_in_equilibrium"):
            never = diag["never_in_equilibrium"]
            self._warn(
                trainer,
                f"{len(never)} layer(s) never reached equilibrium while others did: {', '.join(never[:8])}"
                f"{' ...' if len(never) > 8 else ''}. Check their relaxation times and 'verification' in the summary "
                "(a layer that is only approximately scale-invariant, or whose gradient noise vanished, has no SMD equilibrium).",
            )
        d = self.diagnostics
        names = [u.name for u in d.units]
        lo, hi = d.ratio_interval()
        shown = lambda u: f"{names[u]} ({d.steady_ratio[u]:.3f} [{lo[u]:.3f}, {hi[u]:.3f}])"  # noqa: E731
        off = [names.index(n) for n in diag.get("off_prediction", [])]
        if off:
            counted = "They do not count as in equilibrium (require_agreement=True)." if self.config.require_agreement else (
                "They count as in equilibrium, off the prediction (require_agreement=True makes them fail the gate)."
            )
            self._warn(
                trainer,
                f"{len(off)} layer(s) are steady, but their angular update is off the SMD prediction by more than "
                f"±{self.config.tolerance:.0%} (steady Δ/Δ* with its confidence interval): {', '.join(shown(u) for u in off[:6])}"
                f"{' ...' if len(off) > 6 else ''}. {counted} Likely causes: {_off_prediction_causes(d, off)}",
            )
        far = [names.index(n) for n in diag.get("steady_far_off", [])]
        if far:
            self._warn(
                trainer,
                f"{len(far)} layer(s) are steady far from the SMD prediction (further than ±{self.config.max_deviation:.0%}): "
                f"{', '.join(shown(u) for u in far[:6])}{' ...' if len(far) > 6 else ''}. This is not SMD's equilibrium and does not "
                "count as one. Likely causes: the gradient noise vanished (the network memorizes its training data: more data, "
                "augmentation or label smoothing keep it alive); BatchNorm's eps dominating the variance of a collapsed weight "
                "norm; or a weight that is not really scale-invariant (see 'verification' in the summary).",
            )
        if diag.get("re_equilibrating") and "late_decay" not in self._warned:
            self._warn(
                trainer,
                f"Training ended while {len(diag['re_equilibrating'])} layer(s) were still re-equilibrating after a change of "
                "the learning rate or weight decay: the last decay came too late for them to reach the new equilibrium.",
            )

    def _gate(self, trainer: pl.Trainer) -> None:
        summary = self.summary()
        verdict = summary.get("verdict")
        failed = verdict != "equilibrium"
        if self.on_no_equilibrium == "raise":
            # every rank takes the same decision, so that no rank is left waiting in a collective
            if trainer.strategy.reduce_boolean_decision(failed, all=False):
                where = f" (summary: {self._summary_file})" if self._summary_file else ""
                raise EquilibriumNotReachedError(f"SMD verdict '{verdict}': {summary.get('reason', '')}{where}", summary)
        elif failed and verdict == "not_reached" and self.on_no_equilibrium == "warn":
            self._warn(trainer, f"No equilibrium reached: {summary.get('reason', '')}")

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        # Never lose what was measured: write the summary, marked incomplete, before the exception goes on.
        self._stop_flow()
        if self.recorder is None or self.diagnostics is None or self._finished:
            return
        try:
            # a sharded drain is a collective, and an exception may have reached this rank alone: keep what
            # was already reduced
            if not any(slot.sharded for slot in self.recorder.slots):
                for batch in self.recorder.drain():
                    self.diagnostics.update(batch)
            self._finish(trainer, complete=False, error=f"{type(exception).__name__}: {exception}")
        except Exception as err:  # noqa: BLE001 - the callback never raises on its own failures
            warnings.warn(f"SMDCallback could not write its summary after {type(exception).__name__}: {err}", SMDWarning, stacklevel=2)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._close()

    def _close(self) -> None:
        self._stop_flow()
        if self.recorder is not None:
            self.recorder.close()
        if self.distance is not None:
            self.distance.close()

    def _finish(self, trainer: pl.Trainer, complete: bool, error: str | None = None) -> None:
        assert self.diagnostics is not None and self.recorder is not None
        summary = self.diagnostics.summary()
        summary["complete"] = complete
        if error:
            summary["error"] = error
        summary["optimizers"] = [optimizer_info(i, opt, self.recorder) for i, opt in enumerate(trainer.optimizers)]
        summary["extra_memory_bytes"] = self.recorder.extra_bytes + (self.distance.extra_bytes if self.distance else 0)
        summary["every_n_steps"] = self.every_n_steps
        summary["on_no_equilibrium"] = self.on_no_equilibrium
        summary["stopped_early"] = self._stop_reason
        if self._stop_reason and summary["verdict"] != "equilibrium":
            summary["reason"] = f"{summary['reason']} (training stopped early: {self._stop_reason})"
        if self.distance is not None:
            for u, row in enumerate(summary["layers"]):
                series = self.distance.series.get(u, [])
                row["angular_distance"] = series[-1][1] if series else None
                row["distance_reference_step"] = self.distance.reference_step.get(u)
                row["diffusion_exponent"] = diffusion_exponent([t for t, _ in series], [a for _, a in series]) if series else None
        summary["warnings"] = list(self.warnings)
        summary["not_tracked"] = dict(self.detection.rejected) if self.detection else {}
        summary["detection_error"] = self.detection.error if self.detection else None
        summary["detection_method"] = self.detection.method if self.detection else None
        summary["not_tracked_verification"] = dict(self.detection.rejected_verification) if self.detection else {}
        summary["global_step"] = int(trainer.global_step)
        self._summary = summary
        self._finished = complete
        if self.summary_path is False or not trainer.is_global_zero:
            return
        path = str(self.summary_path) if self.summary_path not in (None, True) else os.path.join(_log_dir(trainer), SUMMARY_FILENAME)
        try:
            write_summary(path, summary)
            self._summary_file = path
        except OSError as err:
            self._warn(trainer, f"could not write the SMD summary to {path}: {err}")

    # ------------------------------------------------------------------------------------------
    # Public results
    # ------------------------------------------------------------------------------------------
    def summary(self) -> dict[str, Any]:
        """The run summary (the content of ``smd_summary.json``); computed now if training has not ended."""
        if self._summary is not None:
            return self._summary
        if self.diagnostics is None:
            return {"verdict": "not_applicable", "reason": "SMDCallback has not been attached to a fit yet", "layers": [], "steps": 0, "complete": False}
        out = self.diagnostics.summary()
        out["complete"] = False
        return out

    @property
    def summary_file(self) -> str | None:
        """Where the summary JSON was written (rank zero), or ``None``."""
        return self._summary_file

    def format_summary(self) -> str:
        """The end-of-training table: per layer measured vs predicted, and the verdict."""
        s = self.summary()
        return format_summary_table(s)

    def _warn(self, trainer: pl.Trainer, message: str) -> None:
        if message in self.warnings:
            return
        self.warnings.append(message)
        if trainer.is_global_zero:
            warnings.warn(message, SMDWarning, stacklevel=3)


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
    from lightning_smd.measure import _DTENSOR

    if t is not None and _DTENSOR is not None and isinstance(t, _DTENSOR):
        return t.full_tensor()
    return t


def _is_sharded(params: Any) -> bool:
    from lightning_smd.measure import _DTENSOR

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


def _verification_message(u: NormalizedWeight) -> str:
    head = (
        f"{u.name} was detected as scale-invariant (through {u.norm or u.layer}), but on the first batch its gradient is "
        f"not orthogonal to it: |cos(g, w)| = {u.verification:.1e} at {u.granularity} granularity (invariant weights give "
        f"below {ORTHOGONALITY_TOLERANCE:.0e}). "
    )
    if any(k in u.norm.lower() for k in ("batch", "instance", "group", "layer", "rms")) and (u.verification or 0) < 0.1:
        return head + (
            "The normalization's eps breaks scale invariance when the variance of the activations it normalizes is not "
            "large against eps: this layer follows the SMD predictions only approximately. That is a property of the "
            "model, not a detection error."
        )
    return head + (
        "Something outside the analysed forward pass uses this weight: a loss term on the weights (an explicit L2 "
        f"penalty), a hook, or a path that bypasses the normalization. Check the model, or pass exclude=['{u.name}']."
    )


def _judging_steps(ratio_time_constant: float, window: int) -> float:
    """Steps of unchanged settings before a layer can be judged (twice the shortest window)."""
    return 2.0 * max(float(window), WINDOW_RELAXATION_TIMES[0] * ratio_time_constant)


def _off_prediction_causes(d: Diagnostics, units: list[int]) -> str:
    """The likely causes of steady layers off the prediction that can be told from the run."""
    causes = []
    rules = {d.rules[u].name for u in units if d.rules[u] is not None}
    small = [d.units[u] for u in units if d.units[u].numel <= 1024]
    if rules & {"AdamW", "Adam", "RAdam", "NAdam"}:
        causes.append(
            "Adam's per-coordinate normalization gives the update a radial part and an anisotropy that the isotropic theory "
            "ignores; it is largest for small layers"
            + (f" ({', '.join(f'{u.name}: {u.numel} weights' for u in small[:3])})" if small else "")
        )
    if "Lion" in rules:
        causes.append(
            "Lion's sign update is more correlated from step to step than gradient noise alone makes it (a consistent gradient "
            "direction), and has a radial part"
        )
    unverified = [d.units[u] for u in units if (d.units[u].verification or 0.0) > 1e-3]
    if unverified:
        causes.append(
            "the gradient is not orthogonal to the weight on the first batch ("
            + ", ".join(f"{u.name}: |cos(g, w)| = {u.verification:.1e}" for u in unverified[:3])
            + "): BatchNorm's eps or a path around the normalization makes the layer only partly scale-invariant"
        )
    causes.append(
        "dead filters (filters without gradient do not rotate and pull the layer's angle down; per_filter=True logs the RMS "
        "over filters)"
    )
    return "; ".join(causes) + "."


def _logger_step(trainer: pl.Trainer) -> int:
    """The step Lightning logs the current batch's metrics at (``_batches_that_stepped``)."""
    loop = trainer.fit_loop.epoch_loop
    step = getattr(loop, "_batches_that_stepped", None)
    return int(step) if step is not None else max(int(trainer.global_step) - 1, 0)


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


