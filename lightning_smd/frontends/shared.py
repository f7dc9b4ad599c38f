"""What :class:`~lightning_smd.SMDCallback` and :class:`~lightning_smd.SMDMonitor` share, written once.

The two front ends differ only in where their events come from (a Trainer's hooks, a loop's calls); what they do
with them is here, as in Lightning's ``ThroughputMonitor`` over Fabric's ``Throughput``:

- :class:`FrontEnd`: the base of both: the session's parts under the names the front ends have always had, and the
  summary as a table;
- :data:`SHARED_OPTIONS_DOC`: the documentation of the options both take, written once and appended to each one's
  docstring (:func:`documents_shared_options`);
- :class:`Options`: the options both take (the equilibrium criteria, the weights to track, how to measure),
  checked, and the :class:`~lightning_smd.engine.session.Session` they make;
- :func:`adopt_detection`: a detection handed to the session with its warnings;
- :class:`LossSum`: the training loss summed on the device between two log steps;
- :func:`log_step`: the work of a log step (the loss, the drain, the ``"stop"`` gate);
- :func:`end_gate`: the ``"raise"``/``"warn"`` gate at the end of a run.

Nothing here imports Lightning: a decision every rank must share goes through ``agree``, which the callback
makes a collective (``reduce_boolean_decision``) and the monitor leaves the identity.
"""

from __future__ import annotations

import inspect
import textwrap
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from lightning_smd.analysis.diagnostics import Diagnostics, DiagnosticsConfig
from lightning_smd.analysis.states import Verdict
from lightning_smd.engine.detect import Detection
from lightning_smd.engine.measure import DistanceTracker, StepRecorder
from lightning_smd.engine.session import GATE_MODES, Session, emit_warning
from lightning_smd.io.report import TABLE_ROWS, EquilibriumNotReachedError, format_summary_table
from lightning_smd.options import check_bool, check_choice, check_int, check_patterns

__all__ = ["FrontEnd", "Options", "CRITERIA", "SHARED_OPTIONS_DOC", "documents_shared_options", "LossSum", "adopt_detection", "log_step", "end_gate"]

#: The front ends' options that are the equilibrium criteria (:class:`DiagnosticsConfig`'s fields of the same name).
CRITERIA = ("tolerance", "window", "ema_steps", "min_fraction", "require_agreement", "max_deviation", "drift_limit", "significance")
#: The front ends' options that are True or False.
_FLAGS = ("use_momentum_buffer", "per_filter", "keep_history", "track_distance")


#: The Args entries of the options both front ends take with the same meaning (see :class:`Options`); each front end
#: documents its other options, ``on_no_equilibrium`` included (when the gate acts differs), in its own docstring.
SHARED_OPTIONS_DOC = """\
tolerance: a steady layer whose steady ``Δ/Δ*`` is (with confidence) outside ``1 ± tolerance`` is *off the
    prediction* (in equilibrium unless ``require_agreement``; a warning says so); a prediction that moves by
    more than this is a change of the hyper-parameters.
window, ema_steps, min_fraction, require_agreement, max_deviation, drift_limit, significance: the other
    criteria of the verdict, each documented on :class:`~lightning_smd.DiagnosticsConfig`: the judged window
    (steps), the smoothing (steps), the share of layers in equilibrium the verdict needs, the strict gate,
    the ratio beyond which a layer is in another regime, the largest drift per relaxation time (``None``:
    ``tolerance``) and the false-alarm rate of the drift test.
include: parameter-name globs to track in addition to the detected ones.
exclude: parameter-name globs never to track.
keep_history: keep every step's values in memory (``.diagnostics.unit_history(name)``).
use_momentum_buffer: for PyTorch SGD with heavy-ball momentum, take the update from the momentum
    buffer (exact, no weight copy); ``False`` keeps a snapshot of the weights as for other
    optimizers.
per_filter: also measure every filter (or group) of the weights whose filters are scale-invariant
    on their own, and log the RMS over filters of their angular updates
    (``smd/<name>/filter_angular_update_rms``; each filter has the same predicted Δ*) and how unevenly
    they rotate (``smd/<name>/rotation_imbalance``). Costs a few extra launches per tracked tensor and step.
track_distance: from the first log step at which a layer is in equilibrium, keep a copy of it and
    log the angular distance travelled since (``smd/<name>/angular_distance``) and the exponent
    ``c`` of ``distance ∝ t^c`` in the summary (one extra copy of the tracked weights).
every_n_steps: measure only every n-th optimizer step (for very large models). A sampled step is
    still measured over that single step (the weights are taken right before it), so the angular
    update keeps its meaning and its prediction; the moving averages and the window keep counting
    steps. Unsampled steps cost nothing measurable.
"""


def documents_shared_options(cls: type) -> type:
    """Class decorator for a front end whose docstring ends with its Args: appends :data:`SHARED_OPTIONS_DOC` to
    them, so that ``help()`` and the API docs show every option of each front end, written once."""
    if cls.__doc__:  # (None under python -OO)
        cls.__doc__ = inspect.cleandoc(cls.__doc__) + "\n" + textwrap.indent(SHARED_OPTIONS_DOC, "    ")
    return cls


def _alone(decision: bool) -> bool:
    """A decision taken by one process: it is everyone's."""
    return decision


class FrontEnd:
    """What both front ends are besides their hooks: a :class:`Session` (made anew for each run), its parts under
    the names the front ends have always had, and the summary as a table."""

    session: Session

    @property
    def detection(self) -> Detection | None:
        return self.session.detection

    @property
    def recorder(self) -> StepRecorder | None:
        return self.session.recorder

    @property
    def diagnostics(self) -> Diagnostics | None:
        return self.session.diagnostics

    @property
    def distance(self) -> DistanceTracker | None:
        return self.session.distance

    @property
    def warnings(self) -> list[str]:
        return self.session.warnings

    def summary(self) -> dict[str, Any]:
        """The run summary (the content of ``smd_summary.json``) as of now."""
        raise NotImplementedError

    def format_summary(self, max_rows: int | None = TABLE_ROWS) -> str:
        """The end-of-run table: per layer measured against predicted values, and the verdict; above ``max_rows``
        layers the ones not in equilibrium come first and the rest is counted (``None``: every row)."""
        return format_summary_table(self.summary(), max_rows)


@dataclass(frozen=True)
class Options:
    """The options both front ends take, checked: the criteria of the verdict, the weights to add or leave out, and
    how the session measures. Each front end checks its other options (logging, where the summary goes) itself."""

    config: DiagnosticsConfig
    include: list[str]
    exclude: list[str]
    every_n_steps: int = 1
    use_momentum_buffer: bool = True
    per_filter: bool = False
    keep_history: bool = False
    track_distance: bool = False
    on_no_equilibrium: str = "warn"
    worst_k: int = 3

    @classmethod
    def check(cls, given: Mapping[str, Any]) -> Options:
        """The options among a front end's constructor arguments ``given`` (by name; the others are ignored, and one
        absent keeps its default), checked before anything is built: an :class:`~lightning_smd.options.OptionError`
        names the option, the value and what is accepted. A str is one include/exclude pattern."""
        flags = {k: check_bool(k, given[k]) for k in _FLAGS if k in given}
        return cls(
            config=DiagnosticsConfig(**{k: given[k] for k in CRITERIA if k in given}),
            include=check_patterns("include", given.get("include")),
            exclude=check_patterns("exclude", given.get("exclude")),
            every_n_steps=check_int("every_n_steps", given.get("every_n_steps", 1), 1),  # type: ignore[arg-type]
            on_no_equilibrium=check_choice("on_no_equilibrium", given.get("on_no_equilibrium", "warn"), GATE_MODES),
            worst_k=check_int("worst_k", given.get("worst_k", 3), 0),  # type: ignore[arg-type]
            **flags,
        )

    def session(self, emit: Callable[[str, str], None] = emit_warning) -> Session:
        """A new session measuring with these options; ``emit`` shows its warnings (see :class:`Session`)."""
        return Session(
            self.config,
            every_n_steps=self.every_n_steps,
            use_momentum_buffer=self.use_momentum_buffer,
            per_filter=self.per_filter,
            keep_history=self.keep_history,
            track_distance=self.track_distance,
            on_no_equilibrium=self.on_no_equilibrium,
            worst_k=self.worst_k,
            emit=emit,
        )

    def capacity(self, interval: int) -> int:
        """Steps the device buffers hold: the sampled steps of one log interval, and two to spare."""
        return interval // self.every_n_steps + 2


def adopt_detection(session: Session, detection: Detection, *, waits_for_batch: bool = False) -> None:
    """Hand ``detection`` to ``session`` with its warnings: the include/exclude patterns that matched no parameter,
    then why the data flow could not be analysed (not yet when the front end analyses the first batch instead:
    ``waits_for_batch``)."""
    session.detection = detection
    for code, fields in detection.pattern_warnings():
        session.warn(code, **fields)
    if detection.error and not waits_for_batch:
        session.warn("SMD006", error=detection.error)


class LossSum:
    """The training loss summed on its device between two log steps (no host synchronization); its mean is read
    once, at the log step, where the drain synchronizes anyway. The loss grounds the vanishing-noise diagnosis in
    the loss actually approaching zero."""

    def __init__(self) -> None:
        self.total: torch.Tensor | None = None
        self.count = 0

    def add(self, loss: torch.Tensor | float) -> None:
        """Add one step's loss (a one-element tensor, or a number)."""
        value = loss.detach().float().reshape(()) if isinstance(loss, torch.Tensor) else torch.tensor(float(loss))
        self.total = value if self.total is None or self.total.device != value.device else self.total + value
        self.count += 1

    def hand_over(self, session: Session) -> None:
        """Give ``session`` the mean loss since the last log step (one host read), and start a new sum."""
        if self.total is not None and self.count:
            session.observe_loss(float(self.total) / self.count)
            self.total, self.count = None, 0


def log_step(
    session: Session,
    loss: LossSum,
    planned_steps: int | None,
    interval: int,
    *,
    debug: bool = False,
    agree: Callable[[bool], bool] = _alone,
) -> tuple[dict[int, float], bool]:
    """A log step: the mean loss and the recorded steps into the diagnostics (one host synchronization), then the
    ``"stop"`` gate. Returns the angular distances (``track_distance``) and whether training should stop now.

    The gate stops a run once equilibrium is clearly impossible in ``planned_steps``; in a ``debug`` run (short by
    design) only a diverged one. ``agree`` makes every rank take the same decision, so that no rank is left
    waiting in a collective."""
    loss.hand_over(session)
    distances = session.drain(planned_steps)
    if session.on_no_equilibrium != "stop" or session.stop_reason is not None:
        return distances, False
    reason = session.impossible(planned_steps, interval)
    if reason is not None and debug and not session.diagnostics.diverged.any():  # type: ignore[union-attr]
        reason = None
    if not agree(reason is not None):
        return distances, False
    session.stop(reason or "another rank found equilibrium impossible")
    return distances, True


def end_gate(
    session: Session,
    summary: Mapping[str, Any],
    *,
    summary_file: str | None = None,
    debug_run: str | None = None,
    agree: Callable[[bool], bool] = _alone,
) -> None:
    """The gate at the end of a run: with ``on_no_equilibrium="raise"`` an :class:`EquilibriumNotReachedError` when
    the verdict is not ``equilibrium`` (on every rank: ``agree``), with ``"warn"`` a warning when it is
    ``not_reached``. A gate that stood down (``summary["gate"]``: a debug run, ``debug_run`` says which) says so
    instead."""
    mode = session.on_no_equilibrium
    failed = session.gate_failed(summary)
    if failed and summary.get("gate"):
        if mode != "warn":
            session.warn("SMD027", run=debug_run, verdict=summary.get("verdict"), gate=mode)
        return
    if mode == "raise":
        if agree(failed):
            where = f" (summary: {summary_file})" if summary_file else ""
            raise EquilibriumNotReachedError(f"SMD verdict '{summary.get('verdict')}': {summary.get('reason', '')}{where}", summary)
    elif failed and summary.get("verdict") == Verdict.NOT_REACHED and mode == "warn":
        session.warn("SMD034", reason=summary.get("reason", ""))
