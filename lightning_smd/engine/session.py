"""The engine behind both front ends: one :class:`Session` per fit owns the recorder, the diagnostics, the
warnings and the summary. It knows nothing of Lightning: :class:`lightning_smd.SMDCallback` and
:class:`lightning_smd.SMDMonitor` are adapters that find the weights, say when a log step comes, and hand
over what only they know (the planned steps, the process group, how to gather a sharded tensor, where the
summary goes).

The life of a session: :meth:`Session.attach` (the tracked weights and the optimizers; the set-up
warnings) → :meth:`Session.verify` before the first step (the numerical check of invariance) → at every
log step :meth:`Session.drain` and :meth:`Session.metrics` → :meth:`Session.finish` (the end-of-run
warnings and the summary) → :meth:`Session.close`.
"""

from __future__ import annotations

import json
import math
import os
import time
import uuid
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from lightning_smd.io.dashboard import RatioHistory, heatmap_figure, per_layer_mode, progress_text, worst_metrics
from lightning_smd.analysis.forecast import cannot_reach
from lightning_smd.analysis.keys import NAMESPACE, layer_key, split_layer_key
from lightning_smd.engine.alerts import Alerts, end_warnings, event_warnings, verification_warnings
from lightning_smd.engine.fitstart import FitStart
from lightning_smd.engine.groups import GroupAudit, ParamRoles, audit_session
from lightning_smd.engine.detect import Detection, NormalizedWeight, verify_orthogonality
from lightning_smd.analysis.diagnostics import Diagnostics, DiagnosticsConfig, Verdict, diffusion_exponent
from lightning_smd.engine.measure import DistanceTracker, StepRecorder
from lightning_smd.messages import SMDWarning
from lightning_smd.io.report import write_summary
from lightning_smd.analysis.theory import group_hyper, rule_for

__all__ = ["Session", "GATE_MODES"]

#: What ``on_no_equilibrium`` may be.
GATE_MODES = ("warn", "stop", "raise")


def emit_warning(message: str, code: str) -> None:
    """The default way a session's warning reaches the user: a :class:`SMDWarning`."""
    warnings.warn(SMDWarning(message, code), stacklevel=4)


@dataclass
class Attached:
    """What :meth:`Session.attach` was handed for the current fit, kept to rebuild the recorder and for the summary."""

    named: Mapping[str, torch.Tensor] = field(default_factory=dict)  # the tracked parameters by name
    optimizers: list[torch.optim.Optimizer] = field(default_factory=list)
    capacity: int = 1  # steps the device buffers hold
    shard_group: Any = None
    unoptimized: list[str] = field(default_factory=list)  # detected normalized weights no optimizer updates (SMD005)


class Session:
    """Measure, judge and report the normalized weights of one training run.

    Args:
        config: the equilibrium criteria.
        every_n_steps, use_momentum_buffer, per_filter, keep_history, track_distance, on_no_equilibrium:
            as documented on :class:`lightning_smd.SMDCallback`.
        emit: called with ``(message, code)`` for each new warning (the front end decides where it goes,
            e.g. rank zero only); every warning is also kept in :attr:`warnings` and the summary.
    """

    def __init__(
        self,
        config: DiagnosticsConfig,
        *,
        every_n_steps: int = 1,
        use_momentum_buffer: bool = True,
        per_filter: bool = False,
        keep_history: bool = False,
        track_distance: bool = False,
        on_no_equilibrium: str = "warn",
        worst_k: int = 3,
        emit: Callable[[str, str], None] = emit_warning,
    ) -> None:
        # (the front ends check every option, with lightning_smd.options, before they build a session)
        self.config = config
        self.every_n_steps = every_n_steps
        self.use_momentum_buffer = use_momentum_buffer
        self.per_filter = per_filter
        self.keep_history = keep_history
        self.track_distance = track_distance
        self.on_no_equilibrium = on_no_equilibrium
        self.worst_k = worst_k
        #: the warnings issued in this run (see :attr:`warnings`)
        self.alerts = Alerts(emit)
        self.history = RatioHistory(0)
        #: the fit-start warnings, and the steps after which the slowest layer can be judged
        self.fit_start = FitStart(self.alerts.warn)
        self.detection: Detection | None = None
        self.recorder: StepRecorder | None = None
        self.diagnostics: Diagnostics | None = None
        self.distance: DistanceTracker | None = None
        self.stop_reason: str | None = None
        self.verify_pending = False
        self._verify_tries = 0
        self.attached = Attached()
        #: this run's identity in its summary (tells two writers of one log directory apart)
        self.run_id = uuid.uuid4().hex[:12]
        self.started = time.time()
        #: BatchNorm modules in eval mode while training (names), as the front end saw them before the first step
        self.eval_norms: list[str] = []
        #: what the audit of the param groups found at fit start (None: not audited, e.g. a resumed fit or FSDP1)
        self.group_audit: GroupAudit | None = None

    # ------------------------------------------------------------------------------------------
    # Warnings
    # ------------------------------------------------------------------------------------------
    @property
    def warn(self) -> Callable[..., None]:
        """``warn(code, *, once=None, **fields)``: :meth:`Alerts.warn` itself (no frame of its own between the caller
        and ``emit``, whose ``stacklevel`` counts on it)."""
        return self.alerts.warn

    @property
    def judgeable_after(self) -> tuple[int, str, float] | None:
        """``(steps, layer, relaxation time)``: the slowest layer can be judged after this many steps of unchanged
        settings (None when no τ is known before training, e.g. coupled L2 or an unknown rule)."""
        return self.fit_start.judgeable_after

    @property
    def warnings(self) -> list[str]:
        """Every warning issued in this run, in order (also the summary's ``warnings``)."""
        return self.alerts.issued

    # ------------------------------------------------------------------------------------------
    # Set-up
    # ------------------------------------------------------------------------------------------
    def attach(
        self,
        named: Mapping[str, torch.Tensor],
        optimizers: Sequence[torch.optim.Optimizer],
        units: Sequence[NormalizedWeight],
        *,
        capacity: int,
        shard_group: Any = None,
        planned_steps: int | None = None,
        model_name: str = "the model",
        resume: dict[str, Any] | None = None,
        roles: ParamRoles | None = None,
    ) -> None:
        """Create the recorder and the diagnostics for ``units`` (those whose parameters are all in ``named``)
        and issue the set-up warnings — or, with ``resume``, continue from a :meth:`state_dict`. ``roles``: the
        normalization layers' parameters and the embeddings (names in ``named``), for the audit of the param groups
        (:func:`~lightning_smd.engine.groups.audit_groups`; not under FSDP1, whose flat parameters have no shapes)."""
        self.close()
        self.attached = Attached(named, list(optimizers), capacity, shard_group)
        units = [u for u in units if all(p in named for p in u.params)]
        recorder = self._recorder(units)
        self.attached.unoptimized = [units[i].name for i in recorder.unoptimized]
        if recorder.unoptimized:
            dropped = set(recorder.unoptimized)
            self.warn("SMD005", count=len(dropped), names=", ".join(units[i].name for i in recorder.unoptimized))
            recorder.close()
            units = [u for i, u in enumerate(units) if i not in dropped]
            recorder = self._recorder(units)
        self.recorder = recorder
        self.diagnostics = Diagnostics(units, self.config, keep_history=self.keep_history, every_n_steps=self.every_n_steps)
        self.history = RatioHistory(len(units))
        self.distance = None
        if self.track_distance:
            if recorder.sharded:
                self.warn("SMD009")
            else:
                self.distance = DistanceTracker([[named[p] for p in u.params] for u in units])
        self.verify_pending = bool(units)
        if resume is not None:
            self.load_state_dict(resume)
        else:
            rejected = self.detection.rejected if self.detection else {}
            no_audit = roles is None or shard_group is not None
            self.group_audit = None if no_audit else audit_session(named, roles, optimizers, units)
            self.fit_start.check_setup(
                recorder, units, self.config, self.attached.unoptimized, rejected, model_name, planned_steps, self.group_audit
            )  # fmt: skip

    def _recorder(self, units: Sequence[NormalizedWeight]) -> StepRecorder:
        a = self.attached
        return StepRecorder(
            [[a.named[p] for p in u.params] for u in units],
            a.optimizers,
            capacity=a.capacity,
            use_momentum_buffer=self.use_momentum_buffer,
            unit_filters=[filter_spec(u) for u in units] if self.per_filter else None,
            shard_group=a.shard_group,
            every_n_steps=self.every_n_steps,
        )

    def verify(self, named: Mapping[str, torch.Tensor], gather: Callable[[Any], Any] = lambda t: t) -> list[NormalizedWeight] | None:
        """The numerical check of scale invariance, right before the first optimizer step (one host
        synchronization, once per run): ``|cos(g, w)|`` of every tracked and every rejected candidate weight.
        ``gather`` turns a shard into its whole tensor (a collective: every rank calls it in the same order).
        Returns the tracked units once the check is done (or given up), else None."""
        if not self.verify_pending or self.diagnostics is None or self.detection is None:
            return None
        self._verify_tries += 1
        if self._verify_tries > 5:
            self.verify_pending = False
            return None
        # sorted: under sharding every rank gathers the same tensors in the same order
        names = sorted({p for u in self.diagnostics.units for p in u.params} | {n for n in self.detection.rejected if n in named})
        grads = {n: gather(named[n].grad) for n in names}
        try:
            units, rejected = verify_orthogonality(self.diagnostics.units, {n: gather(named[n]) for n in names}, grads, self.detection.rejected)
        except Exception as err:  # noqa: BLE001 - an observer's check never stops training (retried up to 5 times)
            self.warn("SMD012", error=f"{type(err).__name__}: {err}")
            return None
        if self.per_filter and [filter_spec(u) for u in units] != [filter_spec(u) for u in self.diagnostics.units]:
            # the check found a finer invariance (e.g. per attention head): record per-filter stats at it
            assert self.recorder is not None
            self.recorder.close()
            self.recorder = self._recorder(units)
        if all(u.verification is None for u in units) and any(grads[p] is not None for u in units for p in u.params):
            return None  # no usable gradient on this step (overflowed under fp16 loss scaling): try the next one
        self.verify_pending = False
        self.diagnostics.set_units(units)
        self.detection.units = units
        self.detection.rejected_verification = rejected
        for code, fields in verification_warnings(units, self.eval_norms):
            self.warn(code, **fields)
        return units

    def plan(self, reads: Sequence[Any]) -> None:
        """Follow the planned schedules read ahead at fit start (:meth:`FitStart.follow`)."""
        if self.recorder is not None and self.diagnostics is not None:
            self.fit_start.follow(self.recorder, self.diagnostics, self.config, reads)

    def skip_verification(self) -> None:
        self.verify_pending = False

    # ------------------------------------------------------------------------------------------
    # Log steps
    # ------------------------------------------------------------------------------------------
    def observe_loss(self, mean_loss: float) -> None:
        """The mean training loss since the last log step (see :meth:`Diagnostics.observe_loss`); call it right
        before :meth:`drain`."""
        if self.diagnostics is not None:
            self.diagnostics.observe_loss(mean_loss)
            if not math.isfinite(mean_loss):
                self.alerts.loss_not_finite = float(mean_loss)

    def drain(self, planned_steps: int | None = None) -> dict[int, float]:
        """Move the recorded steps to the host (one synchronization), fold them into the diagnostics, turn
        what happened into warnings; returns the angular distances (``track_distance``)."""
        assert self.recorder is not None and self.diagnostics is not None
        self.fit_start.release()
        for batch in self.recorder.drain():
            self.diagnostics.update(batch)
        for index, optimizer, error in self.recorder.failures():
            self.warn("SMD024", once=f"failed:{index}", index=index, optimizer=type(optimizer).__name__, error=error)
        self._events(planned_steps)
        d = self.diagnostics
        if d.units and d.steps.max(initial=0) > 0:
            self.history.append(int(d.steps.max()), d.judged_ratio())
        return self._update_distance()

    def drain_without_collective(self) -> None:
        """Fold the recorded steps into the diagnostics when that needs no collective (no weight is sharded), as a
        run ending by an exception needs: the exception may have reached this rank alone. A sharded recorder keeps
        its steps, and the diagnostics what was already reduced."""
        if self.recorder is None or self.diagnostics is None or self.recorder.sharded:
            return
        for batch in self.recorder.drain():
            self.diagnostics.update(batch)

    def _events(self, planned_steps: int | None) -> None:
        """The diagnostics' new events as warnings, each kind once (:func:`~lightning_smd.engine.alerts.event_warnings`)."""
        assert self.diagnostics is not None
        for code, fields in event_warnings(self.diagnostics, planned_steps, self.alerts):
            self.warn(code, **fields)

    def _update_distance(self) -> dict[int, float]:
        if self.distance is None or self.diagnostics is None:
            return {}
        d = self.diagnostics
        for u in range(len(d.units)):
            if u not in self.distance.reference_step and d.in_equilibrium[u]:
                self.distance.take(u, int(d.steps[u]))
        return self.distance.measure(int(d.steps.max(initial=0)))

    def metrics(self, per_layer: bool | str = True, distances: Mapping[int, float] | None = None) -> dict[str, float]:
        """The ``smd/*`` metrics as of the last drained step: the two aggregates, the ``worst_k`` furthest
        layers' ratios, and per layer all series, the ratio only or none (``per_layer``: see
        :func:`lightning_smd.io.dashboard.per_layer_mode`)."""
        assert self.diagnostics is not None
        d = self.diagnostics
        mode = per_layer_mode(per_layer, len(d.units))
        metrics = d.metrics(per_layer=mode != "none")
        if mode == "ratio":
            metrics = {k: v for k, v in metrics.items() if (layer := split_layer_key(k)) is None or layer[1] == "angular_update_ratio"}
        elif mode == "all" and self.distance is not None:
            for u, unit in enumerate(d.units):
                metrics[layer_key(unit.name, "angular_distance")] = (distances or {}).get(u, math.nan)
        if self.worst_k:
            metrics.update(worst_metrics(d.ratio.value(), d.applicable, self.worst_k))
        return metrics

    def progress(self, namespace: str = NAMESPACE) -> dict[str, str]:
        """The two aggregates as progress-bar entries (``smd Δ/Δ*``, ``smd eq``; ``namespace`` instead of ``smd``)."""
        assert self.diagnostics is not None
        d = self.diagnostics
        app = d.applicable
        return progress_text(d.median_ratio(), int(d.counted[app].sum()), int(app.sum()), namespace)

    def heatmap(self, title: str | None = None) -> Any:
        """The layer × log-step heatmap of the smoothed Δ/Δ* so far (a matplotlib figure), or None without
        matplotlib or before the first log step."""
        if self.diagnostics is None or not len(self.history):
            return None
        names = [u.name for u in self.diagnostics.units]
        kwargs = {"title": title} if title else {}
        return heatmap_figure(self.history.steps, self.history.matrix(), names, self.config.tolerance, **kwargs)

    def impossible(self, planned_steps: int | None, interval: int) -> str | None:
        """Why the run can clearly not end in equilibrium in ``planned_steps``, or None (the ``"stop"`` gate)."""
        assert self.diagnostics is not None
        return cannot_reach(self.diagnostics, planned_steps, interval)

    def stop(self, reason: str) -> None:
        """Record that the run is being stopped by the ``"stop"`` gate."""
        self.stop_reason = reason
        self.warn("SMD023", reason=reason)

    # ------------------------------------------------------------------------------------------
    # End
    # ------------------------------------------------------------------------------------------
    def end_warnings(self) -> None:
        """The end-of-run warnings (:func:`~lightning_smd.engine.alerts.end_warnings`), once the run is over."""
        assert self.diagnostics is not None
        rejected = self.detection.rejected if self.detection else {}
        for code, fields in end_warnings(self.diagnostics, self.config, rejected, self.attached.named, self.alerts):
            self.warn(code, **fields)

    def summary(self, *, complete: bool = False, error: str | None = None, global_step: int | None = None) -> dict[str, Any]:
        """The run summary (``smd_summary.json``) as of now."""
        if self.diagnostics is None or self.recorder is None:
            waiting = self.detection is not None and self.detection.method == "deferred"
            out: dict[str, Any] = {
                "verdict": Verdict.NOT_APPLICABLE,
                "reason": (
                    "the run ended before its first training batch, which detection needed (a lazy or untraceable "
                    "model is analysed on that batch): nothing was measured"
                    if waiting
                    else "nothing was attached: no fit has started"
                ),
                "layers": [],
                "steps": 0,
            }
        else:
            out = self.diagnostics.summary()
            unoptimized = self.attached.unoptimized
            if not self.diagnostics.units and unoptimized:
                shown = ", ".join(unoptimized[:3]) + (" ..." if len(unoptimized) > 3 else "")
                out["reason"] = (
                    f"the model has {len(unoptimized)} normalized weight(s) ({shown}), but no optimizer updates them "
                    "(or several share one): nothing is measured"
                )
        # the audit of the param groups at fit start (None where none was made: a resumed fit, FSDP1's flat shards)
        out["groups"] = self.group_audit.summary() if self.group_audit is not None else None
        out["complete"] = complete
        out["run_id"] = self.run_id
        out["started_at"] = _iso(self.started)
        out["name"] = None  # the front end's label when one Trainer has several SMDCallbacks
        out["gate"] = None  # why the gate stood down (a debug run), else None
        if error:
            out["error"] = error
        recorder = self.recorder
        out["optimizers"] = [optimizer_info(i, opt, recorder) for i, opt in enumerate(self.attached.optimizers)] if recorder else []
        out["extra_memory_bytes"] = (recorder.extra_bytes if recorder else 0) + (self.distance.extra_bytes if self.distance else 0)
        out["every_n_steps"] = self.every_n_steps
        out["on_no_equilibrium"] = self.on_no_equilibrium
        out["stopped_early"] = self.stop_reason
        out["judgeable_after_steps"] = self.judgeable_after[0] if self.judgeable_after else None
        if self.stop_reason and out["verdict"] != Verdict.EQUILIBRIUM:
            out["reason"] = f"{out['reason']} (training stopped early: {self.stop_reason})"
        if self.distance is not None:
            for u, row in enumerate(out["layers"]):
                series = self.distance.series.get(u, [])
                row["angular_distance"] = series[-1][1] if series else None
                row["distance_reference_step"] = self.distance.reference_step.get(u)
                row["diffusion_exponent"] = diffusion_exponent([t for t, _ in series], [a for _, a in series]) if series else None
        det = self.detection
        out["warnings"] = list(self.warnings)
        out["not_tracked"] = dict(det.rejected) if det else {}
        out["detection_error"] = det.error if det else None
        out["detection_method"] = det.method if det else None
        out["not_tracked_verification"] = dict(det.rejected_verification) if det else {}
        if global_step is None:
            global_step = recorder.global_step if recorder else 0
        out["global_step"] = int(global_step)
        return out

    def gate_failed(self, summary: Mapping[str, Any]) -> bool:
        return summary.get("verdict") != Verdict.EQUILIBRIUM

    def write(self, path: str, summary: Mapping[str, Any]) -> str | None:
        """Write the summary JSON to ``path``; a failure is a warning. Returns where it was written (None: nowhere).

        A summary that another run wrote to ``path`` while this one ran (two processes given one log directory)
        is kept: this run's goes next to it, as ``<name>-<run id>.json``, with a warning. A summary older than
        this run is a previous run's, and is replaced."""
        other = _other_writer(path, self.run_id, self.started)
        if other is not None:
            root, ext = os.path.splitext(path)
            target = f"{root}-{self.run_id}{ext or '.json'}"
            self.warn("SMD047", path=path, other=other, target=target)
            path = target
        try:
            write_summary(path, dict(summary))
        except OSError as err:
            self.warn("SMD042", path=path, error=err)
            return None
        return path

    # ------------------------------------------------------------------------------------------
    # Checkpoints
    # ------------------------------------------------------------------------------------------
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
            "slots": self.recorder.step_counts(),
            "warnings": list(self.warnings),
            "warned": sorted(self.alerts.keys),
            "verified": not self.verify_pending,
            "units": [[u.name, u.granularity, u.group_size, u.verification] for u in self.diagnostics.units],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if not state or self.diagnostics is None or self.recorder is None:
            return
        try:
            self.diagnostics.load_state_dict(state["diagnostics"])
        except (KeyError, ValueError) as err:
            self.warn("SMD043", error=err)
            return
        self.recorder.load_step_counts(state.get("slots", []))
        if state.get("verified"):
            known = {row[0]: row for row in state.get("units", [])}
            units = [
                replace(u, granularity=known[u.name][1], group_size=known[u.name][2], verification=known[u.name][3]) if u.name in known else u
                for u in self.diagnostics.units
            ]
            self.diagnostics.set_units(units)
            if self.detection is not None:
                self.detection.units = units
            self.verify_pending = False
        self.alerts.load(state.get("warnings", []), state.get("warned", []))

    def close(self) -> None:
        """Remove the optimizer hooks and free the device buffers (the results stay readable)."""
        if self.recorder is not None:
            self.recorder.close()
        if self.distance is not None:
            self.distance.close()


def eval_mode_batch_norms(model: torch.nn.Module) -> list[str]:
    """The BatchNorm modules of ``model`` that normalize with their running statistics (eval mode) — frozen
    statistics make the weights before them lose their scale invariance."""
    return [
        name or type(m).__name__
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and not m.training and m.track_running_stats
    ]


def _other_writer(path: str, run_id: str, started: float) -> str | None:
    """The run id of a summary at ``path`` that another run wrote after ``started`` (a concurrent run in the same
    directory), else None (no file, this run's own, a previous run's, or unreadable: replaced)."""
    try:
        if os.path.getmtime(path) < started:
            return None
        with open(path, encoding="utf-8") as fh:
            other = json.load(fh).get("run_id")
    except (OSError, ValueError, AttributeError):
        return None
    return str(other) if other and other != run_id else None


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def optimizer_info(index: int, optimizer: torch.optim.Optimizer, recorder: StepRecorder) -> dict[str, Any]:
    rule = rule_for(optimizer)
    measurement, steps = recorder.measurement(index)
    groups = []
    for g in optimizer.param_groups:
        h = group_hyper(rule, optimizer, g)
        groups.append({k: (v if math.isfinite(v) else None) for k, v in h.items()})
    return {
        "index": index,
        "class": type(optimizer).__name__,
        "rule": rule.name,
        "param_groups": groups,
        "measurement": measurement,
        "steps": steps,
    }


def filter_spec(u: NormalizedWeight) -> tuple[int, int] | None:
    """``(filter dim, filters per group)`` for per-filter statistics, or None for a whole-tensor unit."""
    if u.granularity == "filter":
        return (u.filter_dim, 1)
    if u.granularity == "group" and u.group_size:
        return (u.filter_dim, u.group_size)
    return None
