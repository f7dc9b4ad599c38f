"""Read the planned optimizer settings (learning rate, weight decay, momentum, betas, ...) of every param group at
every planned optimizer step, from the configured LR schedulers, without touching the real optimizer or scheduler.

Method
------
Each scheduler is copied with ``copy.deepcopy(scheduler, memo)``, where ``memo`` maps the real optimizer to a
*shadow*: an object holding deep copies of the param groups (``params`` replaced by empty lists), of ``defaults``,
an empty ``state``, and a ``step`` that torch's "``lr_scheduler.step()`` before ``optimizer.step()``" checks accept.
The memo also maps every parameter tensor, the real param-group dicts and list, and any object the caller names as
shared (the Lightning trainer and module, their submodules and buffers) to themselves or to the shadow's
counterparts, so no tensor or model is copied and nested schedulers (``SequentialLR``, ``ChainedScheduler``) all
point at the one shadow. The copies are stepped exactly as the training loop will step the real ones, and the
shadow's groups are recorded before each optimizer step. The real optimizer, schedulers and weights are never
written: their ``state_dict()``\\ s, param groups and the run's floating-point trajectory are bit-for-bit the same
with or without the read.

Entry ``i`` of a plan is the settings in force at optimizer step ``start_step + 1 + i``: entry 0 is what the groups
hold when the plan is read (the schedulers' initial step is already applied), entry ``i`` what they hold after the
schedulers due after step ``start_step + i`` were stepped.

When the schedulers step (Lightning 2.x, ``loops/training_epoch_loop.py``: ``advance`` calls
``update_lr_schedulers("step")`` then, on the last batch of the epoch, ``update_lr_schedulers("epoch")``;
``update_lr_schedulers`` returns early for "step" while ``_should_accumulate()``; ``_update_learning_rates`` steps a
config when ``current_idx % frequency == 0``):

- ``interval="step"``: after every batch on which the optimizer stepped (every ``accumulate_grad_batches``-th batch
  of the epoch, and the epoch's last batch even when its accumulation is partial), if ``b % frequency == 0`` where
  ``b`` is the 1-based index of that batch *within the epoch*. So ``frequency`` counts batches, not optimizer
  steps, and restarts every epoch.
- ``interval="epoch"``: after the last batch of epoch ``e`` (0-based), if ``(e + 1) % frequency == 0``; the
  settings are constant within an epoch of ``ceil(num_training_batches / accumulate_grad_batches)`` optimizer steps.
- Order: the step-interval configs in the order of ``trainer.lr_scheduler_configs``, then the epoch-interval ones.
- A config belongs to the optimizer its scheduler's ``.optimizer`` is (Lightning 2.x has no ``opt_idx``).
- Under manual optimization Lightning steps no scheduler (the module does, in its own code): such schedules are
  :class:`Unreadable` from the trainer (:func:`read_schedule` reads them when told how they are stepped).

``ReduceLROnPlateau`` (and any plateau scheduler) reacts to a metric and is :class:`Unreadable`.

A LightningModule that overrides ``lr_scheduler_step`` steps its schedulers its own way. :func:`read_trainer_schedules`
then *probes* the hook once per scheduler, handing it a recorder instead of the scheduler (an uninitialized
instance of a subclass of the scheduler's class, so that ``isinstance`` dispatch in the hook works; no real
scheduler is touched, but the hook's own code runs once), and reads ahead only if the hook made exactly one call of
one of these forms (and nothing else with the scheduler):

- ``scheduler.step()`` (or ``step(metric)`` with ``metric=None``): the default, any scheduler;
- ``scheduler.step(n)`` / ``step(epoch=n)`` or ``scheduler.step_update(n)`` / ``step_update(num_updates=n)`` with
  ``n`` an integer equal to the interval's own counter at the probe plus 0 or 1: ``trainer.current_epoch`` for
  ``interval="epoch"`` (Lightning's ``current_epoch`` is the finishing epoch when the hook runs), ``trainer.global_step``
  for ``interval="step"`` (the optimizer steps done, the step just taken included, when the hook runs). The copies
  are then called the same way with the counter advanced. This is the pattern of timm's schedulers
  (``timm.scheduler.*``: ``step(epoch=self.current_epoch)``, ``step_update(num_updates=self.global_step)``), which
  are functions of the count, and of the Lightning documentation's example; timm's ``PlateauLRScheduler`` is a
  plateau scheduler and unreadable. When the counter of the other interval has the same value at the probe (a
  fresh fit: both 0) the interval's own counter is assumed. Anything else is :class:`Unreadable`.

Work is capped (``max_steps`` entries, ``max_seconds`` of wall time, the deep copy included): a plan cut short has
``truncated=True`` and says "read for the first N of M steps". Reading a 100,000-step ``CosineAnnealingLR`` plan
takes about 0.6 s on one CPU core, half of it the scheduler's own ``step()`` (so the default 2 s cap reads about
300,000 such steps); settings that change only at epoch ends cost far less (one snapshot per change).

Where to read it in Lightning: ``on_train_start``. It runs after ``strategy.setup`` (``configure_optimizers``:
``trainer.lr_scheduler_configs`` is populated), after a checkpoint's optimizer and scheduler states are restored
and after the training data is set up (``num_training_batches``, ``estimated_stepping_batches``), and before the
first batch. ``on_fit_start`` is too early: it runs before a checkpoint's scheduler state is restored and before the
data is loaded.

This module imports torch and numpy only; the trainer is duck-typed.
"""

from __future__ import annotations

import copy
import itertools
import math
import numbers
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from lightning_smd.analysis.theory import Rule, rule_for
from lightning_smd.analysis.trajectory import Plan, plan_from_columns

__all__ = [
    "MAX_SECONDS",
    "MAX_STEPS",
    "PlannedSchedule",
    "SchedulerCall",
    "Unreadable",
    "read_schedule",
    "read_trainer_schedules",
    "schedule_from_function",
]

MAX_STEPS = 1_000_000
"""Default cap on the number of planned steps read."""
MAX_SECONDS = 2.0
"""Default cap on the wall time of one read (the deep copy included)."""

_FALLBACK = "its settings are judged from their changes as they come"


# ----------------------------------------------------------------------------------------------
# Results
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PlannedSchedule:
    """The settings of every param group of one optimizer at every planned optimizer step.

    ``columns[g][key]`` holds the values of ``key`` in group ``g``, float64, one per planned step; entry ``i`` is in
    force at optimizer step ``start_step + 1 + i``. A tuple-valued key (``betas``) becomes ``"betas.0"``,
    ``"betas.1"``; a bool key is stored as 0/1 (and named in ``bool_keys``). Keys missing from a group, or holding
    no number (``None``), are left out of that group's columns.
    """

    optimizer_index: int
    start_step: int
    columns: list[dict[str, np.ndarray]]
    source: str
    truncated: bool
    bool_keys: frozenset[str] = field(default=frozenset(), repr=False)

    @property
    def n_steps(self) -> int:
        """The number of planned steps read (0 when no group has any recorded key)."""
        for group in self.columns:
            for values in group.values():
                return int(values.shape[0])
        return 0

    def group_at(self, group: int, i: int) -> dict[str, object]:
        """A param-group-like dict of entry ``i`` of group ``group``: floats, bools for bool keys, tuples rebuilt
        from ``"key.0"``, ``"key.1"``, ...; ``params`` is not included."""
        out: dict[str, object] = {}
        parts: dict[str, dict[int, float]] = {}
        for name, values in self.columns[group].items():
            value = float(values[i])
            base, dot, index = name.rpartition(".")
            if dot and index.isdigit():
                if base not in parts:
                    parts[base] = {}
                    out[base] = None  # keep the column order
                parts[base][int(index)] = value
            else:
                out[name] = bool(value) if name in self.bool_keys else value
        for base, items in parts.items():
            out[base] = tuple(items[j] for j in sorted(items))
        return out

    def varies(self, rtol: float = 1e-9) -> bool:
        """Whether any column of any group changes over the plan by more than ``rtol`` relative to its first value
        (any change at all when that is 0)."""
        for group in self.columns:
            for values in group.values():
                if values.size and not np.allclose(values, values[0], rtol=rtol, atol=0.0, equal_nan=True):
                    return True
        return False


@dataclass(frozen=True)
class Unreadable:
    """The schedule of one optimizer could not be read ahead; ``reason`` says why, and that its settings are judged
    from their changes as they come."""

    optimizer_index: int
    reason: str


@dataclass(frozen=True)
class SchedulerCall:
    """How a scheduler is stepped: ``scheduler.<method>()`` when ``offset`` is None, else
    ``scheduler.<method>(counter + offset)`` with ``counter`` the interval's count when it is stepped (the finishing
    epoch for ``interval="epoch"``, the optimizer steps done for ``interval="step"``)."""

    method: str = "step"
    offset: int | None = None

    def describe(self, interval: str) -> str:
        if self.offset is None:
            return f"{self.method}()"
        counter = "current_epoch" if interval == "epoch" else "global_step"
        return f"{self.method}({counter}{f' + {self.offset}' if self.offset else ''})"


# ----------------------------------------------------------------------------------------------
# The shadow optimizer and the copies
# ----------------------------------------------------------------------------------------------


class _ShadowOptimizer:
    """What a scheduler copy points at instead of the real optimizer: its param groups without parameters."""

    param_groups: list[dict[str, Any]]
    defaults: dict[str, Any]
    state: dict[Any, Any]

    def __init__(self) -> None:
        self.param_groups = []
        self.defaults = {}
        self.state = {}
        # torch's LRScheduler.step warns unless the optimizer's step was called (flag set by its step wrapper)
        self._opt_called = True

    def step(self, closure: Any = None) -> None:
        raise RuntimeError("the shadow optimizer of a schedule read-ahead cannot step")

    # torch's LRScheduler.step warns when the optimizer's step is not its wrapper (an attribute of the function)
    step._wrapped_by_lr_sched = True  # type: ignore[attr-defined]

    def zero_grad(self, set_to_none: bool = True) -> None:
        pass

    def __repr__(self) -> str:
        return f"_ShadowOptimizer({len(self.param_groups)} groups)"


def _unwrap(optimizer: Any) -> Any:
    """The torch optimizer behind a Lightning ``LightningOptimizer`` (duck-typed), else ``optimizer``."""
    inner = getattr(optimizer, "_optimizer", None)
    return inner if type(optimizer).__name__ == "LightningOptimizer" and inner is not None else optimizer


def _nested(scheduler: Any) -> list[Any]:
    """``scheduler`` and the schedulers nested in it (``SequentialLR``, ``ChainedScheduler``)."""
    out = [scheduler]
    for inner in getattr(scheduler, "_schedulers", None) or ():
        out += _nested(inner)
    return out


def _name(scheduler: Any) -> str:
    inner = getattr(scheduler, "_schedulers", None)
    name = type(scheduler).__name__
    return f"{name}({', '.join(_name(s) for s in inner)})" if inner else name


def _is_plateau(scheduler: Any) -> bool:
    return any(isinstance(s, torch.optim.lr_scheduler.ReduceLROnPlateau) or "Plateau" in type(s).__name__ for s in _nested(scheduler))


def _copy_onto_shadow(optimizer: Any, schedulers: Sequence[Any], shared: Iterable[Any]) -> tuple[_ShadowOptimizer, list[Any]]:
    """Deep copies of ``schedulers`` whose optimizer is a shadow of ``optimizer`` (one shared memo)."""
    memo: dict[int, Any] = {}
    for obj in shared:
        memo[id(obj)] = obj
    shadow = _ShadowOptimizer()
    memo[id(optimizer)] = shadow
    memo[id(optimizer.param_groups)] = shadow.param_groups
    memo[id(optimizer.state)] = shadow.state
    for group in optimizer.param_groups:
        for p in group["params"]:
            memo[id(p)] = p
    for group in optimizer.param_groups:
        copied: dict[str, Any] = {}
        no_params: list[Any] = []
        memo[id(group)] = copied
        memo[id(group["params"])] = no_params
        for key, value in group.items():
            copied[key] = no_params if key == "params" else copy.deepcopy(value, memo)
        shadow.param_groups.append(copied)
    shadow.defaults = copy.deepcopy(optimizer.defaults, memo)
    memo[id(optimizer.defaults)] = shadow.defaults
    copies = copy.deepcopy(list(schedulers), memo)
    return shadow, copies


# ----------------------------------------------------------------------------------------------
# Recording the groups
# ----------------------------------------------------------------------------------------------


def _kind(value: Any) -> str | None:
    """How a param-group value is recorded: "bool", "number", "tensor", "tuple" (of numbers), or None (skipped)."""
    if isinstance(value, bool | np.bool_):
        return "bool"
    if isinstance(value, numbers.Real):
        return "number"
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return "tensor"
    if isinstance(value, tuple | list) and value and all(_kind(v) in ("number", "tensor", "bool") for v in value):
        return "tuple"
    return None


def _freeze(value: Any) -> Any:
    """A value safe to keep across steps (tensors are filled in place by the schedulers)."""
    if isinstance(value, torch.Tensor):
        return float(value.item())
    if isinstance(value, tuple | list):
        return tuple(_freeze(v) for v in value)
    return value


class _Recorder:
    """Snapshots of the (group, key) values of a list of param groups, one per change, and their run lengths."""

    def __init__(self, groups: list[dict[str, Any]], keys: Sequence[str]) -> None:
        self.groups = groups
        self.slots: list[tuple[int, str, str]] = []  # (group, key, kind)
        for g, group in enumerate(groups):
            for key in dict.fromkeys(keys):
                kind = _kind(group[key]) if key in group else None
                if kind is not None:
                    self.slots.append((g, key, kind))
        self.pairs = [(groups[g], key) for g, key, _ in self.slots]
        self.exact = not any(kind == "tensor" or (kind == "tuple" and any(isinstance(v, torch.Tensor) for v in groups[g][key])) for g, key, kind in self.slots)
        self.rows: list[list[Any]] = []
        self.counts: list[int] = []

    def snapshot(self) -> None:
        if self.exact:
            self.rows.append([group[key] for group, key in self.pairs])
        else:
            self.rows.append([_freeze(group[key]) for group, key in self.pairs])
        self.counts.append(1)

    def same(self) -> None:
        self.counts[-1] += 1

    @property
    def length(self) -> int:
        return sum(self.counts)

    def columns(self, n_groups: int) -> tuple[list[dict[str, np.ndarray]], frozenset[str]]:
        """The recorded values as float64 columns (raises ValueError for a value that became non-numeric)."""
        counts = np.asarray(self.counts, dtype=np.int64)
        out: list[dict[str, np.ndarray]] = [{} for _ in range(n_groups)]
        bools: set[str] = set()
        for j, (g, key, kind) in enumerate(self.slots):
            raw = [row[j] for row in self.rows]
            if not raw:  # an empty plan: empty columns of the read-time layout
                width = len(self.groups[g][key]) if kind == "tuple" else 0
                for name in [f"{key}.{k}" for k in range(width)] if kind == "tuple" else [key]:
                    out[g][name] = np.zeros(0, dtype=np.float64)
                if kind == "bool":
                    bools.add(key)
                continue
            types = set(map(type, raw))
            if kind == "tuple" and types <= {tuple, list}:
                types = set(map(type, itertools.chain.from_iterable(raw)))
            if self.exact and any(issubclass(t, torch.Tensor) for t in types):
                # a float became a tensor mid-plan: the snapshots alias one tensor and cannot be trusted
                raise ValueError(f"{key!r} of param group {g} turned into a tensor when stepped ahead")
            try:
                values = np.asarray(raw, dtype=np.float64)
            except (TypeError, ValueError) as exc:
                raise ValueError(f"{key!r} of param group {g} is not numeric at every step ({exc})") from None
            if kind == "tuple":
                if values.ndim != 2:
                    raise ValueError(f"{key!r} of param group {g} changed its length when stepped ahead")
                for k in range(values.shape[1]):
                    out[g][f"{key}.{k}"] = np.repeat(values[:, k], counts)
            else:
                if values.ndim != 1:
                    raise ValueError(f"{key!r} of param group {g} changed its type when stepped ahead")
                out[g][key] = np.repeat(values, counts)
                if kind == "bool":
                    bools.add(key)
        return out, frozenset(bools)


# ----------------------------------------------------------------------------------------------
# Reading a plan
# ----------------------------------------------------------------------------------------------


def _steps_text(n: int) -> str:
    return f"{n:,} step{'s' if n != 1 else ''}"


def _describe(entries: Sequence[tuple[Any, str, int, SchedulerCall]], accumulate: int, by_hook: bool) -> str:
    parts = []
    for scheduler, interval, frequency, call in entries:
        if interval == "epoch":
            every = "every epoch" if frequency == 1 else f"every {frequency} epochs"
        elif frequency == 1:
            every = "every step"
        else:
            every = f"every {frequency} {'batches' if accumulate > 1 else 'steps'}"
        how = f", by lr_scheduler_step as {call.describe(interval)}" if by_hook else ""
        parts.append(f"{_name(scheduler)} ({every}{how})")
    return " + ".join(parts)


def _finite_int(n: Any) -> int | None:
    if n is None:
        return None
    try:
        value = float(n)
    except (TypeError, ValueError):
        return None
    return int(value) if math.isfinite(value) else None


def read_schedule(
    optimizer: Any,
    schedulers: Sequence[tuple[Any, ...]],
    keys: Sequence[str],
    n_steps: int | None,
    *,
    start_step: int = 0,
    steps_per_epoch: int | None = None,
    optimizer_index: int = 0,
    max_steps: int = MAX_STEPS,
    max_seconds: float = MAX_SECONDS,
    accumulate_grad_batches: int = 1,
    batches_per_epoch: int | None = None,
    start_epoch: int = 0,
    start_batch: int = 0,
    shared: Iterable[Any] = (),
    _by_hook: bool = False,
) -> PlannedSchedule | Unreadable:
    """Read the planned settings of ``optimizer``'s param groups for ``n_steps`` optimizer steps.

    ``schedulers``: ``(scheduler, interval, frequency)`` or ``(scheduler, interval, frequency, SchedulerCall)`` for
    this optimizer, in the order the loop steps them within one batch (``interval`` "step" or "epoch"). ``keys``:
    the param-group keys to record. The stepping rule is Lightning's (module docstring): step-interval schedulers
    after every optimizer step whose last batch's 1-based index within the epoch is a multiple of ``frequency``,
    epoch-interval ones at the end of every ``frequency``-th epoch. The epoch is ``batches_per_epoch`` batches of
    which every ``accumulate_grad_batches``-th (and the last) ends an optimizer step, or, when only
    ``steps_per_epoch`` is given, ``steps_per_epoch`` optimizer steps; with neither, the epoch never ends within the
    plan (epoch-interval schedulers are then unreadable). For a plain loop that steps a scheduler after every
    optimizer step, ``(scheduler, "step", 1)`` is all it takes.

    ``start_step``, ``start_epoch``, ``start_batch``: the optimizer steps taken, the current epoch and the batches of
    it done when read. ``shared``: objects a scheduler may reference that must not be copied (a module whose bound
    method is an ``lr_lambda``, ...). At most ``max_steps`` steps are read, for at most ``max_seconds``.
    """
    t0 = time.perf_counter()
    optimizer = _unwrap(optimizer)
    n_planned = _finite_int(n_steps)
    entries = [(e[0], str(e[1]), int(e[2]), e[3] if len(e) > 3 and e[3] is not None else SchedulerCall()) for e in schedulers]

    def unreadable(what: str) -> Unreadable:
        return Unreadable(optimizer_index, f"{what}; {_FALLBACK}.")

    accumulate = max(int(accumulate_grad_batches), 1)
    epoch_batches = batches_per_epoch if batches_per_epoch is not None else (steps_per_epoch * accumulate if steps_per_epoch is not None else None)
    epoch_batches = _finite_int(epoch_batches)
    why = _why_unreadable(entries, optimizer, optimizer_index, n_planned, epoch_batches)
    if why is not None:
        return unreadable(why)
    assert n_planned is not None
    n_read = max(min(n_planned, int(max_steps)), 0)
    if not entries:
        return _constant_plan(optimizer, keys, n_read, n_planned, max_steps, optimizer_index, start_step)
    try:
        shadow, copies = _copy_onto_shadow(optimizer, [s for s, _, _, _ in entries], shared)
    except Exception as exc:  # noqa: BLE001 - any failure of a user object's copy makes the plan unreadable
        return unreadable(f"{_describe(entries, accumulate, False)} could not be copied to be read ahead ({type(exc).__name__}: {exc})")
    stray = [s for c in copies for s in _nested(c) if hasattr(s, "optimizer") and s.optimizer is not shadow]
    if stray:
        return unreadable(f"{_name(stray[0])} holds its optimizer in a way the read-ahead cannot redirect, so it cannot be read ahead")
    recorder = _Recorder(shadow.param_groups, keys)
    walk = _Walk(copies, entries, accumulate, epoch_batches, int(start_batch), int(start_epoch), int(start_step))
    try:
        done, stopped_by = walk.run(recorder, n_read, t0 + float(max_seconds), max_seconds)
        columns, bools = recorder.columns(len(shadow.param_groups))
    except Exception as exc:  # noqa: BLE001 - a scheduler that fails on the shadow makes the plan unreadable
        where = f" after optimizer step {int(start_step) + recorder.length}" if recorder.counts else ""
        culprit = _name(walk.current) if walk.current is not None else _describe(entries, accumulate, False)
        return unreadable(f"{culprit} raised {type(exc).__name__} ({exc}) when stepped ahead{where}, so the schedule cannot be read ahead")
    what = _describe(entries, accumulate, _by_hook)
    return _planned(optimizer_index, start_step, columns, bools, what, (done, n_read, n_planned), max_steps, stopped_by)


def _why_unreadable(
    entries: Sequence[tuple[Any, str, int, SchedulerCall]], optimizer: Any, optimizer_index: int, n_planned: int | None, epoch_batches: int | None
) -> str | None:
    """Why these schedulers cannot be read ahead for ``optimizer`` (``None``: they can)."""
    for scheduler, interval, frequency, _ in entries:
        if _is_plateau(scheduler):
            return f"{_name(scheduler)} reacts to a monitored metric and cannot be read ahead"
        if interval not in ("step", "epoch"):
            return f"{_name(scheduler)} has interval {interval!r} (not 'step' or 'epoch') and cannot be read ahead"
        if frequency < 1:
            return f"{_name(scheduler)} has frequency {frequency} (< 1) and cannot be read ahead"
        strangers = [s for s in _nested(scheduler) if hasattr(s, "optimizer") and _unwrap(s.optimizer) is not optimizer]
        if strangers:
            return f"{_name(strangers[0])} belongs to another optimizer than optimizer {optimizer_index} and cannot be read ahead with it"
    if n_planned is None:
        return "the number of planned optimizer steps is unknown (set max_epochs or max_steps), so the schedule cannot be read ahead"
    if epoch_batches is not None and epoch_batches < 1:
        return f"an epoch of {epoch_batches} batches cannot be planned"
    if epoch_batches is None and any(interval == "epoch" for _, interval, _, _ in entries):
        name = next(_name(s) for s, interval, _, _ in entries if interval == "epoch")
        return f"{name} steps at epoch ends and the epoch length is unknown (an iterable without a length), so it cannot be read ahead"
    return None


def _constant_plan(optimizer: Any, keys: Sequence[str], n_read: int, n_planned: int, max_steps: int, optimizer_index: int, start_step: int) -> PlannedSchedule:
    """No scheduler: the settings as they are, for every planned step."""
    groups = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    recorder = _Recorder(groups, keys)
    recorder.rows, recorder.counts = ([[_freeze(g[k]) for g, k in recorder.pairs]], [n_read]) if n_read else ([], [])
    columns, bools = recorder.columns(len(groups))
    truncated = n_read < n_planned
    source = "no scheduler: constant settings"
    if truncated:
        source += f", read for the first {n_read:,} of {_steps_text(n_planned)} (stopped by the {int(max_steps):,}-step cap)"
    return PlannedSchedule(optimizer_index, int(start_step), columns, source, truncated, bools)


class _Walk:
    """Steps the copies as Lightning steps the real schedulers, optimizer step after optimizer step (the hot path of
    the read); :attr:`current` names the scheduler stepped last (the culprit when one raises)."""

    def __init__(
        self, copies: Sequence[Any], entries: Sequence[tuple[Any, str, int, SchedulerCall]], accumulate: int, epoch_batches: int | None,
        start_batch: int, start_epoch: int, start_step: int,
    ) -> None:  # fmt: skip
        # (copy, frequency, its bound step method, the counter offset or None)
        pairs = list(zip(copies, entries, strict=True))
        self.step_entries = [(c, f, getattr(c, call.method), call.offset) for c, (_, interval, f, call) in pairs if interval == "step"]
        self.epoch_entries = [(c, f, getattr(c, call.method), call.offset) for c, (_, interval, f, call) in pairs if interval == "epoch"]
        self.accumulate, self.epoch_batches = accumulate, epoch_batches
        self.batch = start_batch % epoch_batches if epoch_batches else start_batch
        self.epoch, self.step0 = start_epoch, start_step
        self.current: Any = None

    def run(self, recorder: _Recorder, n_read: int, deadline: float, max_seconds: float) -> tuple[int, str]:
        """Record ``n_read`` steps' settings (fewer past ``deadline``); returns the steps read and what stopped it."""
        snapshot, same = recorder.snapshot, recorder.same
        step_entries, epoch_entries = self.step_entries, self.epoch_entries
        accumulate, epoch_batches, step0 = self.accumulate, self.epoch_batches, self.step0
        ends = epoch_batches if epoch_batches is not None else math.inf
        batch, epoch = self.batch, self.epoch
        if n_read:
            snapshot()
        for i in range(1, n_read):
            # optimizer step step0 + i has just been taken: where does its last batch fall in the epoch?
            batch = (batch // accumulate + 1) * accumulate
            last = batch >= ends
            if last:
                batch = epoch_batches
            stepped = False
            for copied, frequency, method, offset in step_entries:
                if batch % frequency == 0:
                    self.current = copied
                    if offset is None:
                        method()
                    else:
                        method(step0 + i + offset)
                    stepped = True
            if last:
                for copied, frequency, method, offset in epoch_entries:
                    if (epoch + 1) % frequency == 0:
                        self.current = copied
                        if offset is None:
                            method()
                        else:
                            method(epoch + offset)
                        stepped = True
                epoch += 1
                batch = 0
            if stepped:
                snapshot()
            else:
                same()
            if not i & 1023 and time.perf_counter() > deadline:
                return i + 1, f"the {max_seconds:g} s time cap"
        return n_read, ""


# ----------------------------------------------------------------------------------------------
# A Lightning trainer (duck-typed)
# ----------------------------------------------------------------------------------------------


class _HookProbe:
    """Stands in for a scheduler in one call of the module's ``lr_scheduler_step``: records ``step`` and
    ``step_update`` calls; any other attribute raises."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = []

    def step(self, *args: Any, **kwargs: Any) -> None:
        self.calls.append(("step", args, kwargs))

    def step_update(self, *args: Any, **kwargs: Any) -> None:
        self.calls.append(("step_update", args, kwargs))


def _overrides_lr_scheduler_step(module: Any) -> bool:
    """Whether ``module``'s class overrides Lightning's ``LightningModule.lr_scheduler_step`` (duck-typed)."""
    for base in type(module).__mro__:
        if base.__name__ == "LightningModule" and base.__module__.startswith(("lightning.pytorch", "pytorch_lightning")):
            return type(module).lr_scheduler_step is not base.lr_scheduler_step
    return False


def _probe_like(scheduler: Any) -> Any:
    """A recorder that passes the hook's ``isinstance`` checks of ``scheduler``: an uninitialized instance of a
    subclass of its class whose ``step``/``step_update`` record (any other instance attribute is missing), or a
    plain :class:`_HookProbe` where such a subclass cannot be made."""
    cls = type(scheduler)
    try:
        like = type(f"_Probe{cls.__name__}", (cls,), {"step": _HookProbe.step, "step_update": _HookProbe.step_update})
        probe = object.__new__(like)
        probe.calls = []
        return probe
    except Exception:  # noqa: BLE001 - slots, a metaclass, a custom __new__: fall back to the plain recorder
        return _HookProbe()


def _probe(module: Any, scheduler: Any, interval: str, counters: Mapping[str, int]) -> SchedulerCall | str:
    """How ``module.lr_scheduler_step`` steps ``scheduler`` (of ``interval``), or why that cannot be told."""
    probe = _probe_like(scheduler)
    try:
        module.lr_scheduler_step(probe, None)
    except Exception as exc:  # noqa: BLE001 - the hook did something else than calling step/step_update
        return f"the LightningModule's lr_scheduler_step did something the read-ahead cannot follow ({type(exc).__name__}: {exc})"
    if len(probe.calls) != 1:
        return f"the LightningModule's lr_scheduler_step made {len(probe.calls)} calls on the scheduler instead of one step"
    method, args, kwargs = probe.calls[0]
    names = {"step": ("epoch", "metrics", "metric"), "step_update": ("num_updates", "metric")}[method]
    given = dict(zip(names, args, strict=False))
    if len(args) > len(names) or set(kwargs) - set(names) or set(given) & set(kwargs):
        return f"the LightningModule's lr_scheduler_step calls {method} with arguments the read-ahead cannot follow"
    given.update(kwargs)
    metric = given.pop("metric", None) if "metric" in given else given.pop("metrics", None)
    count = given.pop(names[0], None)
    if metric is not None:
        return f"the LightningModule's lr_scheduler_step passes a metric to {method}, so the schedule cannot be read ahead"
    if count is None:
        return SchedulerCall(method, None)
    if isinstance(count, bool) or not isinstance(count, numbers.Integral):
        return f"the LightningModule's lr_scheduler_step calls {method}({count!r}), not with an epoch or step count"
    counter = counters["epoch" if interval == "epoch" else "step"]
    offset = int(count) - counter
    if offset not in (0, 1):
        return f"the LightningModule's lr_scheduler_step calls {method}({count}), which is not the {interval} count (+0 or +1) the read-ahead can follow"
    return SchedulerCall(method, offset)


def _get(obj: Any, path: str, default: Any = None) -> Any:
    for name in path.split("."):
        obj = getattr(obj, name, None)
        if obj is None:
            return default
    return obj


def _shared_objects(trainer: Any, module: Any) -> list[Any]:
    """The trainer, the module, and every submodule, parameter and buffer: referenced, never copied."""
    out: list[Any] = [trainer]
    for obj in (module, getattr(trainer, "datamodule", None)):
        if obj is not None:
            out.append(obj)
    if isinstance(module, torch.nn.Module):
        out += list(module.modules())
        out += list(module.parameters())
        out += list(module.buffers())
    return out


@dataclass(frozen=True)
class _TrainerView:
    """What a Lightning trainer says about when its schedulers step (read once, for every optimizer)."""

    configs: list[Any]
    module: Any
    automatic: bool
    global_step: int
    current_epoch: int
    accumulate: int
    batches: int | None
    data_ready: bool
    start_batch: int
    reloads: int
    handles_accumulation: bool
    shared: Any
    overridden: bool

    @classmethod
    def of(cls, trainer: Any) -> _TrainerView:
        module = getattr(trainer, "lightning_module", None)
        data_ready = getattr(trainer, "train_dataloader", None) is not None
        batches = _finite_int(getattr(trainer, "num_training_batches", None)) if data_ready else None
        processed = _get(trainer, "fit_loop.epoch_loop.batch_progress.current.processed", 0)
        return cls(
            configs=list(getattr(trainer, "lr_scheduler_configs", None) or []),
            module=module,
            automatic=bool(getattr(module, "automatic_optimization", True)),
            global_step=int(getattr(trainer, "global_step", 0) or 0),
            current_epoch=int(getattr(trainer, "current_epoch", 0) or 0),
            accumulate=int(getattr(trainer, "accumulate_grad_batches", 1) or 1),
            batches=batches,
            data_ready=data_ready,
            start_batch=int(processed) % batches if batches else 0,
            reloads=int(getattr(trainer, "reload_dataloaders_every_n_epochs", 0) or 0),
            handles_accumulation=bool(_get(trainer, "strategy.handles_gradient_accumulation", False)),
            shared=_shared_objects(trainer, module),
            overridden=module is not None and _overrides_lr_scheduler_step(module),
        )

    def planned_steps(self, trainer: Any, n_steps: int | None) -> tuple[int | None, str]:
        """The optimizer steps to plan (``n_steps``, or the trainer's remaining ones), and why they are unknown."""
        if n_steps is not None:
            return n_steps, ""
        if not self.data_ready:
            return None, "the training data is not set up yet, so the number of planned steps is unknown (read the schedule in on_train_start)"
        estimated = _finite_int(getattr(trainer, "estimated_stepping_batches", None))
        steps = None if estimated is None else max(estimated - self.global_step, 0)
        return steps, "the number of planned optimizer steps is unknown (set max_epochs or max_steps)"


def read_trainer_schedules(
    trainer: Any,
    keys_per_optimizer: Sequence[Sequence[str]],
    n_steps: int | None,
    *,
    max_steps: int = MAX_STEPS,
    max_seconds: float = MAX_SECONDS,
    probe_lr_scheduler_step: bool = True,
) -> list[PlannedSchedule | Unreadable]:
    """Read the plan of every optimizer of a Lightning ``trainer`` (duck-typed), in ``trainer.optimizers`` order.

    Call it in ``on_train_start`` (module docstring). ``keys_per_optimizer[i]``: the param-group keys to record for
    optimizer ``i``. ``n_steps``: the optimizer steps to plan; None takes the trainer's remaining planned steps,
    ``estimated_stepping_batches - global_step`` (under manual optimization that counts batches, and
    ``global_step`` counts the steps of all optimizers together). ``start_step`` of each plan is
    ``trainer.global_step``. ``probe_lr_scheduler_step``: whether an overridden ``lr_scheduler_step`` may be probed
    (module docstring); False makes such schedules unreadable.
    """
    view = _TrainerView.of(trainer)
    n_steps, not_known = view.planned_steps(trainer, n_steps)
    results: list[PlannedSchedule | Unreadable] = []
    for index, optimizer in enumerate(_unwrap(o) for o in (getattr(trainer, "optimizers", None) or [])):
        keys = list(keys_per_optimizer[index]) if index < len(keys_per_optimizer) else ["lr", "weight_decay"]
        mine = [c for c in view.configs if _unwrap(getattr(c.scheduler, "optimizer", None)) is optimizer]
        entries = _readable_entries(view, mine, n_steps, not_known, probe_lr_scheduler_step)
        if isinstance(entries, str):
            results.append(Unreadable(index, f"{entries}; {_FALLBACK}."))
            continue
        assert n_steps is not None
        results.append(
            read_schedule(
                optimizer, entries, keys, n_steps, start_step=view.global_step, optimizer_index=index, max_steps=max_steps,
                max_seconds=max_seconds, accumulate_grad_batches=view.accumulate, batches_per_epoch=view.batches,
                start_epoch=view.current_epoch, start_batch=view.start_batch, shared=view.shared, _by_hook=view.overridden,
            )  # fmt: skip
        )
    return results


def _readable_entries(view: _TrainerView, mine: list[Any], n_steps: int | None, not_known: str, probe: bool) -> list[Any] | str:
    """One optimizer's scheduler entries to step (``mine``: its configs), or why they cannot be read ahead."""
    if mine and not view.automatic:
        return "under manual optimization the LightningModule steps its schedulers itself (Lightning does not): they cannot be read ahead"
    if n_steps is None:
        return f"{not_known}, so the schedule cannot be read ahead"
    plateau = next((c for c in mine if getattr(c, "reduce_on_plateau", False) or _is_plateau(c.scheduler)), None)
    if plateau is not None:
        return f"{_name(plateau.scheduler)} reacts to a monitored metric and cannot be read ahead"
    entries = _trainer_entries(mine, view.module if view.overridden else None, probe, {"epoch": view.current_epoch, "step": view.global_step})
    if isinstance(entries, str):
        return entries
    why = _epoch_positions_unknown(entries, view.batches, view.data_ready, view.reloads)
    if why is None and entries and view.handles_accumulation and view.accumulate > 1:
        why = "the strategy accumulates gradients itself, so when the schedulers step cannot be told ahead"
    return why if why is not None else entries


def _trainer_entries(configs: Sequence[Any], module: Any, probe: bool, counters: Mapping[str, int]) -> list[tuple[Any, str, int, SchedulerCall]] | str:
    """The :func:`read_schedule` entries of one optimizer's scheduler configs, or why they cannot be read. ``module``:
    the LightningModule when it overrides ``lr_scheduler_step`` (each scheduler's call is then probed, if ``probe``)."""
    entries: list[tuple[Any, str, int, SchedulerCall]] = []
    for config in configs:  # read_schedule steps the step-interval ones first, as Lightning
        call: SchedulerCall | str = SchedulerCall()
        if module is not None:
            if not probe:
                return "the LightningModule overrides lr_scheduler_step, so its schedulers cannot be read ahead"
            call = _probe(module, config.scheduler, config.interval, counters)
            if isinstance(call, str):
                return f"{call} ({_name(config.scheduler)})"
        entries.append((config.scheduler, config.interval, int(config.frequency), call))
    return entries


def _epoch_positions_unknown(entries: Sequence[tuple[Any, str, int, SchedulerCall]], batches: int | None, data_ready: bool, reloads: int) -> str | None:
    """Why the epoch positions the schedulers step at cannot be told ahead (``None``: they can, or none matter: with
    frequency 1 a step-interval scheduler steps after every optimizer step, wherever the epoch ends)."""
    if not any(interval == "epoch" or frequency > 1 for _, interval, frequency, _ in entries):
        return None
    if batches is None:
        unknown = "it is an iterable without a length" if data_ready else "the training data is not set up yet (read the schedule in on_train_start)"
        return f"the schedulers step at epoch or batch positions and the epoch length is unknown ({unknown})"
    if reloads:
        return "the schedulers step at epoch or batch positions and the training data is reloaded during the fit (its length may change)"
    return None


def plan_of(read: PlannedSchedule | Unreadable, rule: Rule, settings: Mapping[str, object], groups: Sequence[int]) -> tuple[Plan | None, dict[str, Any]]:
    """The :class:`~lightning_smd.analysis.trajectory.Plan` to follow from one optimizer's read (``None``: judge its
    changes as they come) and how the schedule was read, for the summary's ``schedule``. ``groups``: the param-group
    indices the recorder's batches index. The plan starts after the read's ``start_step`` (the Trainer's count,
    restored on a resume; the recorder's own is set only at the first batch)."""
    if isinstance(read, Unreadable):
        return None, {"read": False, "reason": read.reason, "followed": False}
    if not rule.known:
        return None, {"read": True, "source": read.source, "followed": False, "reason": "no rule for the optimizer"}
    columns = [read.columns[g] for g in groups if g < len(read.columns)]
    plan = plan_from_columns(rule, columns, int(read.start_step) + 1, read.source, read.truncated, settings)
    entry: dict[str, Any] = {"read": True, "source": read.source, "steps": plan.n_steps, "truncated": bool(read.truncated), "followed": plan.followed()}
    if plan.followed():
        entry["changes"] = "a few steps (each re-equilibration timed)" if plan.stepwise() else "continuous"
    return (plan if plan.followed() else None), entry


# ----------------------------------------------------------------------------------------------
# A hand-written schedule
# ----------------------------------------------------------------------------------------------


def schedule_from_function(
    fn: Callable[[int], Any],
    optimizer: Any,
    keys: Sequence[str],
    n_steps: int | None,
    *,
    start_step: int = 0,
    optimizer_index: int = 0,
    max_steps: int = MAX_STEPS,
    max_seconds: float = MAX_SECONDS,
) -> PlannedSchedule | Unreadable:
    """The plan of a hand-written loop that sets its settings itself before each optimizer step.

    ``fn(t)`` is called with ``t = start_step + i``, the optimizer steps taken before the step of entry ``i``
    (0-based, as ``for t in range(total): set(fn(t)); optimizer.step()``), and returns either a number (the lr of
    every group), a sequence with one lr per group, or a dict ``key -> number or per-group sequence`` (a tuple key
    such as ``betas`` takes a tuple, or a sequence of tuples, one per group). Keys ``fn`` does not return keep the
    groups' values at read time; keys ``fn`` returns but not in ``keys`` are ignored. The optimizer is only read.
    """
    t0 = time.perf_counter()
    optimizer = _unwrap(optimizer)
    n_planned = _finite_int(n_steps)
    if n_planned is None:
        return Unreadable(optimizer_index, f"the number of planned optimizer steps is unknown, so the schedule cannot be read ahead; {_FALLBACK}.")
    groups = [{k: copy.deepcopy(v) for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    recorder = _Recorder(groups, keys)
    wanted = {key for _, key, _ in recorder.slots}
    n_read = max(min(n_planned, int(max_steps)), 0)
    deadline = t0 + float(max_seconds)
    done, stopped_by = n_read, ""
    previous: list[Any] | None = None
    try:
        for i in range(n_read):
            value = fn(int(start_step) + i)
            settings = value if isinstance(value, Mapping) else {"lr": value}
            for key, given in settings.items():
                if key in wanted:
                    _apply(groups, key, given)
            row = [_freeze(g[k]) for g, k in recorder.pairs]
            if row == previous:
                recorder.same()
            else:
                recorder.rows.append(row)
                recorder.counts.append(1)
                previous = row
            if not (i + 1) & 1023 and time.perf_counter() > deadline:
                done, stopped_by = i + 1, f"the {max_seconds:g} s time cap"
                break
        columns, bools = recorder.columns(len(groups))
    except Exception as exc:  # noqa: BLE001 - a failing user function makes the plan unreadable
        return Unreadable(optimizer_index, f"the schedule function raised {type(exc).__name__} ({exc}), so the schedule cannot be read ahead; {_FALLBACK}.")
    what = "function " + getattr(fn, "__qualname__", type(fn).__name__)
    return _planned(optimizer_index, start_step, columns, bools, what, (done, n_read, n_planned), max_steps, stopped_by)


def _planned(
    optimizer_index: int, start_step: int, columns: list[dict[str, np.ndarray]], bools: frozenset[str], what: str,
    counts: tuple[int, int, int], max_steps: int, stopped_by: str | None,
) -> PlannedSchedule:  # fmt: skip
    """The read plan, its source saying what was read and, when cut short (``done < planned``), what stopped it."""
    done, n_read, n_planned = counts
    if not stopped_by and n_read < n_planned:
        stopped_by = f"the {int(max_steps):,}-step cap"
    truncated = done < n_planned
    if truncated:
        source = f"{what} read for the first {done:,} of {_steps_text(n_planned)} (stopped by {stopped_by})"
    else:
        source = f"{what} read ahead for {_steps_text(n_planned)}"
    return PlannedSchedule(optimizer_index, int(start_step), columns, source, truncated, bools)


def _apply(groups: list[dict[str, Any]], key: str, given: Any) -> None:
    """Set ``key`` of every group to ``given``, or of group ``g`` to ``given[g]`` when ``given`` is per group (a
    sequence of numbers for a number key, a sequence of tuples for a tuple key such as ``betas``)."""
    tuple_key = any(_kind(g.get(key)) == "tuple" for g in groups)
    is_sequence = isinstance(given, Sequence) and not isinstance(given, str)
    per_group = is_sequence and (not tuple_key or (len(given) > 0 and isinstance(given[0], Sequence)))
    if per_group and len(given) != len(groups):
        raise ValueError(f"{key!r}: {len(given)} values for {len(groups)} param groups")
    for g, group in enumerate(groups):
        if key in group:
            group[key] = tuple(given[g]) if per_group and tuple_key else given[g] if per_group else tuple(given) if tuple_key else given


def read_monitor_schedules(optimizers: Sequence[Any], schedule: Any, n_steps: int | None) -> list[PlannedSchedule | Unreadable]:
    """What :class:`~lightning_smd.SMDMonitor` follows: per optimizer, its scheduler (``schedule`` a scheduler or a list
    of one per optimizer, stepped after every optimizer step), a function of the step, or with ``None`` its settings
    as they are (constant)."""
    if schedule is None or callable(schedule) and not hasattr(schedule, "step"):
        given: list[Any] = [schedule] * len(optimizers)
    else:
        given = list(schedule) if isinstance(schedule, (list, tuple)) else [schedule]
        if len(given) == 1 and len(optimizers) > 1:
            given = [next((s for s in given if getattr(s, "optimizer", None) is o), None) for o in optimizers]
        if len(given) != len(optimizers):
            raise ValueError(f"schedule: one scheduler per optimizer ({len(optimizers)}), got {len(given)}")
    out: list[PlannedSchedule | Unreadable] = []
    for i, (optimizer, entry) in enumerate(zip(optimizers, given)):
        keys = rule_for(optimizer).keys
        if n_steps is None:
            out.append(Unreadable(i, "max_steps is not given, so the run's length is unknown; its settings are judged from their changes as they come."))
        elif entry is None:
            out.append(read_schedule(optimizer, [], keys, n_steps, optimizer_index=i))
        elif hasattr(entry, "step"):
            out.append(read_schedule(optimizer, [(entry, "step", 1)], keys, n_steps, optimizer_index=i, start_step=_steps_taken(entry)))
        else:
            out.append(schedule_from_function(entry, optimizer, keys, n_steps, optimizer_index=i))
    return out


def _steps_taken(scheduler: Any) -> int:
    """The optimizer steps a plain loop took before reading (a fresh scheduler: 0)."""
    last = getattr(scheduler, "last_epoch", 0)
    return max(int(last), 0) if isinstance(last, int) else 0
