"""What is said when a fit starts: the set-up's warnings, and what each schedule read ahead allows.

Two moments, in this order. When the session attaches (:meth:`FitStart.check_setup`): nothing to track, an unknown
optimizer, no weight decay… (:func:`~lightning_smd.engine.alerts.setup_warnings`), with ``SMD003`` (a run too short to
be judged) held back — it is judged on the first step's settings, which a warm-up makes meaningless. When the
schedules are read (:meth:`FitStart.follow`: at train start, or right before the first step where detection needs the
first batch): each optimizer's plan goes to the diagnostics, ``SMD018`` for one that cannot be read ahead, the check
of what a followed plan allows whatever the gradients (:mod:`~lightning_smd.analysis.preflight`: ``SMD036``,
``SMD037``), and the held ``SMD003`` unless a followed plan makes it moot (:meth:`FitStart.release`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from lightning_smd.analysis.preflight import outlook
from lightning_smd.engine.alerts import plan_warnings, setup_warnings, slowest_unit
from lightning_smd.engine.schedule import plan_of
from lightning_smd.messages import shown_names

if TYPE_CHECKING:
    from lightning_smd.analysis.diagnostics import Diagnostics, DiagnosticsConfig
    from lightning_smd.analysis.theory import Rule
    from lightning_smd.analysis.trajectory import Plan
    from lightning_smd.engine.detect import NormalizedWeight
    from lightning_smd.engine.groups import GroupAudit
    from lightning_smd.engine.measure import StepRecorder

__all__ = ["FitStart"]


class FitStart:
    """The fit-start warnings of one session, and the figure the verbose fit-start line prints."""

    def __init__(self, warn: Callable[..., None]) -> None:
        self.warn = warn
        #: ``(steps, layer, relaxation time)``: the slowest layer can be judged after this many steps of unchanged
        #: settings (None when no τ is known before training, e.g. coupled L2 or an unknown rule)
        self.judgeable_after: tuple[int, str, float] | None = None
        self._too_short: dict[str, Any] | None = None

    def check_setup(
        self,
        recorder: StepRecorder,
        units: list[NormalizedWeight],
        config: DiagnosticsConfig,
        unoptimized: Sequence[str],
        rejected: Mapping[str, str],
        model_name: str,
        planned_steps: int | None,
        audit: GroupAudit | None = None,
    ) -> None:
        """The set-up's warnings and :attr:`judgeable_after`; ``SMD003`` held until the schedules are read. ``audit``:
        what the audit of the param groups found (``SMD038`` per param group decaying gains or biases, ``SMD039`` for
        parameters in several optimizers)."""
        slowest = slowest_unit(recorder, units, config.window)
        if slowest is not None:
            self.judgeable_after = (math.ceil(slowest[0]), slowest[2], slowest[1])
        for code, fields in setup_warnings(recorder, units, config, unoptimized, rejected, model_name, planned_steps):
            if code == "SMD003":
                # judged on the first step's settings: held until the schedule is known (a warm-up's first learning
                # rate is no measure of the run; a followed plan is checked as a whole, SMD036)
                self._too_short = fields
                continue
            self.warn(code, **fields)
        if audit is not None:
            for f in audit.decayed:
                self.warn("SMD038", count=len(f.names), names=shown_names(f.names), group=f.group, optimizer=f.optimizer, wd=f.weight_decay)
            if audit.shared:
                optimizers = sorted({o for owners in audit.shared.values() for o in owners})
                self.warn("SMD039", count=len(audit.shared), names=shown_names(list(audit.shared)), optimizers=", ".join(map(str, optimizers)))

    def follow(self, recorder: StepRecorder, diagnostics: Diagnostics, config: DiagnosticsConfig, reads: Sequence[Any]) -> None:
        """Follow the planned schedules read ahead (:mod:`lightning_smd.engine.schedule`: one ``PlannedSchedule`` or
        ``Unreadable`` per optimizer): where the plan moves the equilibrium, each unit is judged against its
        trajectory (:mod:`lightning_smd.analysis.following`) and the plan is checked before step 1; where it cannot
        be read, the changes are judged as they come (SMD018)."""
        by_index = {r.optimizer_index: r for r in reads}
        followed = False
        for index, _optimizer, rule, settings, groups, _taken in recorder.optimizer_groups():
            read = by_index.get(index)
            if read is None:
                continue
            plan, entry = plan_of(read, rule, settings, groups)
            diagnostics.following.set_plan(index, plan, entry)
            followed = followed or plan is not None
            if not entry["read"]:
                self.warn("SMD018", once=f"schedule:{index}", optimizer=index, reason=entry["reason"])
            elif plan is not None and plan.first_step == 1:  # a fresh fit (a resumed one was told at its start)
                self._preflight(recorder, diagnostics, config, index, plan, rule, groups)
        self.release(followed)

    def _preflight(
        self, recorder: StepRecorder, diagnostics: Diagnostics, config: DiagnosticsConfig, index: int, plan: Plan, rule: Rule, groups: Sequence[int]
    ) -> None:
        """What optimizer ``index``'s followed plan allows whatever the gradients (SMD036, SMD037); the forecast at
        step 50 leaves unsaid what these said first."""
        layers: dict[int, list[str]] = {}
        for oi, _opt, _rule, u, g in recorder.unit_groups():
            if oi == index and g in groups:
                layers.setdefault(list(groups).index(g), []).append(diagnostics.units[u].name)
        for code, fields in plan_warnings(index, plan, rule, outlook(plan, config.tolerance, config.window), layers, config.window):
            self.warn(code, **fields)
            diagnostics.following.said_at_start.setdefault(index, set()).add(code)

    def release(self, followed: bool = False) -> None:
        """Say the held SMD003, unless a followed schedule makes it moot (once)."""
        fields, self._too_short = self._too_short, None
        if fields is not None and not followed:
            self.warn("SMD003", **fields)
