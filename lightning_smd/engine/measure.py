"""On-device statistics after every optimizer step: the hot path.

:class:`StepRecorder` hooks ``torch.optim.Optimizer.register_step_post_hook`` on each optimizer, so it
sees every *real* step (manual optimization, several optimizers and gradient accumulation included; a
step skipped by AMP's GradScaler never calls the hook). On each step it records, per tracked tensor,
three squared norms in float64 into a device buffer:

- ``‖w_{t+1}‖²`` the weight after the step;
- ``‖w_{t+1} − w_t‖²`` the update. For PyTorch SGD with heavy-ball momentum the update is exactly
  ``−η·buf`` (``w ← w − η·buf`` in ``torch.optim.SGD``), so ``‖buf‖²`` is recorded and no copy of the weights is kept; every other
  optimizer keeps one snapshot of the tracked weights and subtracts it;
- ``‖g_t‖²`` the loss gradient the step used (``p.grad``), for the online estimate of ``L``.

The step path is a constant number of foreach launches per optimizer, whatever the number of tensors,
and never synchronizes the host: no ``.item()``, no ``float(tensor)``, no branching on tensor values.
:meth:`StepRecorder.drain` copies the buffer to the host once per log interval and turns it, in float64
on the host, into per-unit norms and angular updates (``Δ = 2·asin(‖â − b̂‖/2)``, accurate to far
below 1e-6 rad).

This module does not import Lightning: a hand-written loop can use it directly.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch

from lightning_smd.analysis.batch import StepBatch
from lightning_smd.analysis.theory import Rule, rule_for, unwrap_optimizer
from lightning_smd.options import check_int

__all__ = ["StepBatch", "StepRecorder", "DistanceTracker", "angles_from_norms", "local_shard"]

SMALL_NUMEL = 4096
"""CPU dot path: tensors with fewer elements are batched into one concatenated segmented sum."""


def angles_from_norms(norm_sq_before: np.ndarray, norm_sq_after: np.ndarray, update_sq: np.ndarray, norm_sq_diff: np.ndarray | None = None) -> np.ndarray:
    """Vectorized :func:`lightning_smd.analysis.theory.angle_from_norms` in float64 (nan where a norm is 0).

    ``norm_sq_diff`` (``‖a‖² − ‖b‖²`` computed directly as ``2⟨d, b⟩ + ‖d‖²``, with ``d = a − b``) gives
    ``‖a‖ − ‖b‖`` without the cancellation of subtracting two norms: then the norms themselves need only a
    modest relative accuracy (float32 accumulation)."""
    a = np.sqrt(np.asarray(norm_sq_before, dtype=np.float64))
    b = np.sqrt(np.asarray(norm_sq_after, dtype=np.float64))
    with np.errstate(divide="ignore", invalid="ignore"):
        diff = a - b if norm_sq_diff is None else np.asarray(norm_sq_diff, dtype=np.float64) / (a + b)
        chord_sq = (np.asarray(update_sq, dtype=np.float64) - diff**2) / (a * b)
    chord_sq = np.clip(chord_sq, 0.0, 4.0)
    out = 2.0 * np.arcsin(np.sqrt(chord_sq) / 2.0)
    return np.where((a > 0) & (b > 0), out, np.nan)


class _FlatGroup:
    """The small tensors of a slot on the CPU dot path, measured as one flat vector per quantity.

    Per-tensor work is the real cost of many small tensors (a Python-level ``view`` or ``dot`` costs ~1.5 us
    whatever the size). Here the weights are gathered by one ``cat`` from views made once (re-made when a
    tensor's storage moves), the snapshot is itself flat, and the four sums of each tensor come from one
    float64 product per quantity and one reduction per run of equal-sized tensors: a fixed number of ops,
    whatever the number of tensors. float32 products in float64 are exact, so the sums are float64-accurate.
    """

    def __init__(self, locals_: list[torch.Tensor], positions: list[int], snapshot: bool) -> None:
        self.positions = sorted(positions, key=lambda i: locals_[i].numel())  # equal sizes adjacent
        self.sizes = [locals_[i].numel() for i in self.positions]
        self.total = sum(self.sizes)
        self.runs: list[tuple[int, int, int]] = []  # (first element, tensors, size) of each run of equal sizes
        start = 0
        for size in self.sizes:
            if self.runs and self.runs[-1][2] == size:
                first, count, _ = self.runs[-1]
                self.runs[-1] = (first, count + 1, size)
            else:
                self.runs.append((start, 1, size))
            start += size
        first_t = locals_[self.positions[0]]
        self.device, self.dtype = first_t.device, first_t.dtype
        self.work = torch.empty(2, self.total, dtype=self.dtype, device=self.device)  # w_{t+1}, momentum buffer
        self.products = torch.empty(4, self.total, dtype=torch.float64, device=self.device)
        self._bind([locals_[i] for i in self.positions])
        self.snap = torch.empty(self.total, dtype=self.dtype, device=self.device) if snapshot else None
        self._buf_src: list[torch.Tensor] | None = None
        self._buf_views: list[torch.Tensor] = []
        self.take_snapshot(locals_)

    @property
    def extra_bytes(self) -> int:
        own = self.work.numel() * self.work.element_size() + self.products.numel() * 8
        return own + (self.snap.numel() * self.snap.element_size() if self.snap is not None else 0)

    def _bind(self, tensors: list[torch.Tensor]) -> None:
        self._ptrs = [t.data_ptr() for t in tensors]
        # views share the storage, so they follow the optimizer's in-place updates; a tensor that is no longer
        # contiguous (re-assigned ``p.data``) cannot be viewed flat: then gather by copy every step
        self._contiguous = all(t.is_contiguous() for t in tensors)
        self._views = [t.detach().view(-1) for t in tensors] if self._contiguous else []

    def weights(self, locals_: list[torch.Tensor]) -> torch.Tensor:
        tensors = [locals_[i] for i in self.positions]
        if [t.data_ptr() for t in tensors] != self._ptrs:  # a tensor's storage was replaced (``p.data = ...``)
            self._bind(tensors)
        if not self._contiguous:
            return torch.cat([t.detach().reshape(-1) for t in tensors], out=self.work[0])
        return torch.cat(self._views, out=self.work[0])

    def take_snapshot(self, locals_: list[torch.Tensor]) -> None:
        if self.snap is not None:
            self.snap.copy_(self.weights(locals_))

    def momentum(self, buffers: list[torch.Tensor | None]) -> torch.Tensor:
        """The momentum buffers (``None``: the tensor did not move, its update is 0) as one flat vector."""
        mine = [buffers[i] for i in self.positions]
        if any(b is None or not b.is_contiguous() for b in mine):
            return torch.cat([b.reshape(-1) if b is not None else torch.zeros(n, dtype=self.dtype, device=self.device) for b, n in zip(mine, self.sizes)])
        if self._buf_src is None or any(a is not b for a, b in zip(mine, self._buf_src)):
            self._buf_src = mine  # type: ignore[assignment]
            self._buf_views = [b.view(-1) for b in mine]  # type: ignore[union-attr]
        return torch.cat(self._buf_views, out=self.work[1])

    def sums(self, w: torch.Tensor, d: torch.Tensor, grads: list[torch.Tensor], missing: bool) -> torch.Tensor:
        """``[4, n]`` float64: ‖w‖², ‖d‖², ⟨d, w⟩, ‖g‖² of each tensor (in ``positions`` order)."""
        gs = [grads[i] for i in self.positions]
        if missing:
            gs = [g if g.numel() == n else torch.zeros(n, dtype=self.dtype, device=self.device) for g, n in zip(gs, self.sizes)]
        P = self.products  # preallocated: fresh multi-MB temporaries cost page faults every step
        P[0].copy_(w)
        P[1].copy_(d)
        P[3].copy_(_flatten(gs))
        torch.mul(P[1], P[0], out=P[2])
        P[:2].square_()
        P[3].square_()
        parts = [P[:, a : a + k * n].reshape(4, k, n).sum(2) for a, k, n in self.runs]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


def _flatten(tensors: list[torch.Tensor]) -> torch.Tensor:
    """One flat concatenation (views made in C++: ~0.7 us per tensor instead of ~1.3 us from Python)."""
    try:
        return torch._utils._flatten_dense_tensors(tensors)
    except (AttributeError, RuntimeError):  # pragma: no cover - private helper gone or changed
        return torch.cat([t.reshape(-1) for t in tensors])


class _Rows(NamedTuple):
    """The columns of drained rows, by quantity: ``[k, n]`` arrays (``k`` steps, ``n`` tensors, tracked order)."""

    weight: np.ndarray  # ‖w_{t+1}‖²
    update: np.ndarray  # ‖d‖²: of w_t − w_{t+1}, or of the momentum buffer
    dot: np.ndarray | None  # ⟨d, w_{t+1}⟩ (the CPU dot path)
    grad: np.ndarray  # ‖g_t‖²
    before: np.ndarray | None  # ‖w_t‖² (taken in the pre-hook: sampling without the dot term)


@dataclass(frozen=True, eq=False)
class _Columns:
    """Where each quantity sits in a row of a slot's device buffer (one row per recorded step).

    A row is blocks of ``n`` columns, one column per tracked tensor: ‖w_{t+1}‖², ‖d‖², [⟨d, w_{t+1}⟩ on the
    dot path], ‖g‖², and when sampling without the dot term ‖w_t‖² (taken in the step pre-hook: the previous
    recorded row is no longer the previous step). Within a block the kernels write the tensors in the order
    ``large + small`` (see :meth:`_Slot._plan_kernels`); ``inverse_order`` puts them back in tracked order."""

    n: int
    weight: slice
    update: slice
    dot: slice | None
    grad: slice
    before: slice | None
    blocks: int
    inverse_order: np.ndarray | None

    @classmethod
    def plan(cls, n: int, *, dots: bool, sampled: bool, inverse_order: np.ndarray | None) -> _Columns:
        names = ["weight", "update"] + (["dot"] if dots else []) + ["grad"] + (["before"] if sampled and not dots else [])
        at = {name: slice(i * n, (i + 1) * n) for i, name in enumerate(names)}
        return cls(n, at["weight"], at["update"], at.get("dot"), at["grad"], at.get("before"), len(names), inverse_order)

    @property
    def width(self) -> int:
        """Columns in a row."""
        return self.blocks * self.n

    def split(self, data: np.ndarray) -> _Rows:
        """The host copy of some rows, in tracked tensor order, cut into its quantities (views, no copies)."""
        if self.inverse_order is not None:
            data = data.reshape(len(data), self.blocks, self.n)[:, :, self.inverse_order].reshape(len(data), -1)
        dot = data[:, self.dot] if self.dot is not None else None
        before = data[:, self.before] if self.before is not None else None
        return _Rows(data[:, self.weight], data[:, self.update], dot, data[:, self.grad], before)


class _Placement:
    """Where each tracked tensor of a slot belongs: its unit (global and slot-local index) and its param group;
    and the per-unit sums of per-tensor columns."""

    def __init__(self, tensor_unit: list[int], tensor_group: list[int], units: list[int]) -> None:
        self.groups = sorted(set(tensor_group))  # optimizer param-group indices used by tracked tensors
        pos = {g: i for i, g in enumerate(self.groups)}
        self.tensor_group = np.array([pos[g] for g in tensor_group], dtype=np.int64)
        self.units = units  # global unit indices, in local order
        local = {u: i for i, u in enumerate(units)}
        # Per-unit sums of per-tensor squares (np.add.at: a non-finite tensor only spoils its own unit).
        self.tensor_local_unit = np.array([local[u] for u in tensor_unit], dtype=np.int64)
        self.tensor_unit_local = [local[u] for u in tensor_unit]
        unit_group = np.zeros(len(units), dtype=np.int64)
        for t, u in enumerate(tensor_unit):
            unit_group[local[u]] = self.tensor_group[t]
        self.unit_group = unit_group

    def to_units(self, x: np.ndarray) -> np.ndarray:
        """``[k, tensors]`` -> ``[k, units]``: the sum over the tensors of each unit."""
        out = np.zeros((x.shape[0], len(self.units)))
        np.add.at(out.T, self.tensor_local_unit, x.T)
        return out


class _Shards:
    """How a slot's tensors are split across ranks (FSDP). Every statistic is a sum of squares, so each rank
    records the sums over its own shards and one all-reduce per drain completes them."""

    def __init__(self, tensors: Sequence[torch.Tensor], shard_group: Any) -> None:
        explicit = shard_group is not None
        #: the process group to sum over (None: the default group)
        self.group = _shard_group(tensors) if not explicit else (None if shard_group == "world" else shard_group)
        self.sharded = explicit or self.group is not None
        self.collectives = 0  # all-reduces issued: one per drain
        self.initial_reduced = False

    def all_reduce(self, rows: torch.Tensor, initial: torch.Tensor | None) -> torch.Tensor | None:
        """Sum the shard-local ``rows`` (a slice of the buffer, summed in place) and ``initial`` (the initial norms,
        the first time) over the shard group in one all-reduce; returns the summed initial norms."""
        import torch.distributed as dist

        count = rows.shape[0]
        parts = [rows.reshape(-1)]
        if initial is not None:
            parts.append(initial.reshape(-1))
        flat = torch.cat(parts) if len(parts) > 1 or count else None
        if flat is None or flat.numel() == 0:
            return None
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=self.group)
        self.collectives += 1
        n = count * rows.shape[1]
        if count:
            rows.copy_(flat[:n].reshape(count, -1))
        if initial is None:
            return None
        self.initial_reduced = True
        return flat[n:].clone()


class _StepClock:
    """Counts an optimizer's steps and says which are recorded: all, or when sampling every ``stride``-th (armed
    in the step pre-hook, so that ``w_t`` is taken right before the step)."""

    def __init__(self, stride: int) -> None:
        self.stride = stride
        self.armed = stride == 1
        self.taken = 0  # optimizer steps seen
        self.start = 0  # steps taken before the first one seen (StepRecorder.start_at)

    def arm(self) -> bool:
        """In the pre-hook (sampling): whether the coming step is one to record."""
        self.armed = (self.taken + 1) % self.stride == 0
        return self.armed

    def recording(self) -> bool:
        """In the post-hook: whether the step just taken is recorded (one not recorded is counted here)."""
        if not self.armed:
            self.taken += 1
            return False
        if self.stride > 1:
            self.armed = False
        return True


class _HostLog:
    """What a slot recorded since the last drain, on the host: per step its number, its hyper-parameters and the
    tensors without gradient (appended together after every tensor op of a step: a failed step left none), and
    the rows already copied off the device (``parts``, with the per-filter rows in ``filter_parts``)."""

    def __init__(self) -> None:
        self.steps: list[int] = []  # the optimizer step of each row still on the device
        self.hyper: list[tuple[tuple[Any, ...], ...]] = []
        self.missing: list[list[int]] = []  # per recorded step: tensors the optimizer skipped (no gradient)
        self.parts: list[tuple[np.ndarray, list[tuple[tuple[Any, ...], ...]], np.ndarray]] = []
        self.filter_parts: list[np.ndarray] = []

    @property
    def rows(self) -> int:
        """Rows copied to the host and not drained yet."""
        return sum(len(p[2]) for p in self.parts)

    def add(self, step: int, hyper: tuple[tuple[Any, ...], ...], missing: list[int]) -> None:
        self.missing.append(missing)
        self.steps.append(step)
        self.hyper.append(hyper)

    def keep(self, data: np.ndarray, filter_data: np.ndarray | None) -> None:
        """Keep the host copy of the device rows (``len(data)`` of them, the last steps logged)."""
        steps = np.array(self.steps[-len(data) :], dtype=np.int64)
        self.steps = []
        self.parts.append((data, self.hyper, steps))
        if filter_data is not None:
            self.filter_parts.append(filter_data)
        self.hyper = []

    def take(self) -> tuple[list[tuple[np.ndarray, list[tuple[tuple[Any, ...], ...]], np.ndarray]], list[np.ndarray], list[list[int]]]:
        """The host parts, per-filter parts and missing tensors to drain; the log starts afresh."""
        parts, filter_parts = self.parts, self.filter_parts
        self.parts, self.filter_parts, self.hyper, self.steps = [], [], [], []
        missing: list[list[int]] = []
        if parts:
            missing, self.missing = self.missing, []
        return parts, filter_parts, missing


class _PerFilter:
    """Per-filter statistics of a slot (opt-in): ‖w‖², ‖d‖² and ‖g‖² of every filter (a row along the filter dim)
    of the tensors that have filters, reported as the RMS over a unit's filters (or groups) of their angular updates,
    and per filter its angle, norm and gradient statistic ``L_i = ‖g_i‖²·‖w_i‖²``.

    Buffer rows: ‖w_{t+1}‖² per filter, ‖d‖² per filter, ‖g_t‖² per filter, and when sampling ‖w_t‖² per filter."""

    def __init__(self, tensors: list[torch.Tensor], filter_of: dict[int, tuple[int, int]], *, capacity: int, sampled: bool, device: torch.device) -> None:
        self.filter_of = filter_of  # tensor position -> (filter dim, filters per invariant group)
        self.tensors = sorted(filter_of)  # positions of the tensors with filters
        self.rows = [tensors[t].shape[filter_of[t][0]] if tensors[t].dim() > 1 else tensors[t].numel() for t in self.tensors]
        self.total = sum(self.rows)
        self.sampled = sampled
        self.buffer = torch.zeros(capacity, (4 if sampled else 3) * self.total, dtype=torch.float64, device=device)
        self.last: np.ndarray | None = None  # per filter, host: ‖w‖² after the last drained step
        with torch.no_grad():
            self.initial = torch.cat(self.row_sq([tensors[t] for t in self.tensors]))

    @classmethod
    def plan(cls, tensors: list[torch.Tensor], tensor_filter: list[tuple[int, int] | None] | None, **kwargs: Any) -> _PerFilter | None:
        """The per-filter part of a slot, or None when no tracked tensor has filters (empty tensors have none)."""
        filter_of = {t: f for t, f in enumerate(tensor_filter or []) if f is not None and tensors[t].numel() > 0}
        return cls(tensors, filter_of, **kwargs) if filter_of else None

    @property
    def extra_bytes(self) -> int:
        return self.buffer.numel() * self.buffer.element_size()

    def row_sq(self, tensors: list[torch.Tensor | None], dtype: torch.dtype = torch.float64) -> list[torch.Tensor]:
        """Squared norm of every filter (row along the filter dim) of each per-filter tensor, accumulated in ``dtype``
        (float64 for the weights and updates, whose angles need it) and returned in float64; zeros for None (a missing
        gradient, masked on the host)."""
        out = []
        for t, pos, n in zip(tensors, self.tensors, self.rows):
            if t is None:
                out.append(self.buffer.new_zeros(n))
                continue
            dim = self.filter_of[pos][0]
            rows = t.reshape(-1, 1) if t.dim() <= 1 else t.movedim(dim, 0).reshape(t.shape[dim], -1)
            out.append(torch.linalg.vector_norm(rows, dim=1, dtype=torch.promote_types(rows.dtype, dtype)).to(torch.float64).square())
        return out

    def of(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """The per-filter tensors among a slot's tensors (all of them, in tracked order)."""
        return [tensors[t] for t in self.tensors]

    def record_before(self, row: int, tensors: list[torch.Tensor]) -> None:
        torch.cat(self.row_sq(self.of(tensors)), out=self.buffer[row, 3 * self.total :])

    def record(self, row: int, tensors: list[torch.Tensor], update_sq: list[torch.Tensor], grads: list[torch.Tensor | None]) -> None:
        """Step row ``row``: the filters' ‖w_{t+1}‖², the given ‖d‖² and the ‖g_t‖² of ``grads`` (the slot's gradients
        in tracked order, None where a tensor has none)."""
        # the gradient's only use is L_i's fall from its peak: float32 (a tenth of float64's cost on a CPU) is plenty
        torch.cat(self.row_sq(self.of(tensors)) + update_sq + self.row_sq(self.of(grads), torch.float32), out=self.buffer[row, : 3 * self.total])

    def rebase(self, tensors: list[torch.Tensor]) -> None:
        self.initial = torch.cat(self.row_sq(self.of(tensors)))

    def to_host(self, count: int) -> np.ndarray:
        return self.buffer[:count].to("cpu", copy=True).numpy()

    def rms(
        self, pf: np.ndarray, hyper: list[list[dict[str, float]]], placement: _Placement, momentum_path: bool, missing: list[list[int]] | None = None
    ) -> tuple[np.ndarray, dict[int, np.ndarray], dict[int, np.ndarray], dict[int, np.ndarray]]:
        """RMS over the filters (or groups) of each unit of the per-filter angular updates: ``[k, n]``; and, by unit
        column, ``[k, filters]``: the per-filter angular updates, squared norms after each step and gradient
        statistics ``L_i = ‖g_i‖²·‖w_i‖²`` (with the norm before the step; nan at a step where a tensor of the unit
        had no gradient, ``missing``: per row, the slot's tensor positions)."""
        total = self.total
        w_sq, d_sq, g_sq = pf[:, :total], pf[:, total : 2 * total], pf[:, 2 * total : 3 * total]
        offsets = np.concatenate([[0], np.cumsum(self.rows)])
        if missing and any(missing):
            g_sq = g_sq.copy()
            at = {t: j for j, t in enumerate(self.tensors)}
            for r, miss in enumerate(missing[-len(g_sq) :]):
                for t in miss:
                    if t in at:
                        g_sq[r, offsets[at[t]] : offsets[at[t] + 1]] = np.nan
        if self.last is None:
            self.last = self.initial.to("cpu", copy=True).numpy()
        if self.sampled:
            before = pf[:, 3 * total :]
        else:
            before = np.concatenate([self.last[None, :], w_sq[:-1]], axis=0)
        self.last = w_sq[-1].copy()
        if momentum_path:
            lr = np.array([[g.get("lr", math.nan) for g in step] for step in hyper], dtype=np.float64)
            reps = np.repeat(np.array([placement.tensor_group[t] for t in self.tensors]), self.rows)
            d_sq = d_sq * lr[:, reps] ** 2
        k = pf.shape[0]
        out = np.full((k, len(placement.units)), np.nan)
        per_filter: dict[int, np.ndarray] = {}
        norms: dict[int, np.ndarray] = {}
        grads: dict[int, np.ndarray] = {}
        # sum the tensors of a unit filter by filter, then filters into groups
        per_unit: dict[int, list[int]] = {}
        for j, t in enumerate(self.tensors):
            per_unit.setdefault(placement.tensor_unit_local[t], []).append(j)
        for u, js in per_unit.items():
            rows = self.rows[js[0]]
            if any(self.rows[j] != rows for j in js):
                continue
            b = sum(before[:, offsets[j] : offsets[j + 1]] for j in js)
            a = sum(w_sq[:, offsets[j] : offsets[j + 1]] for j in js)
            d = sum(d_sq[:, offsets[j] : offsets[j + 1]] for j in js)
            g = sum(g_sq[:, offsets[j] : offsets[j + 1]] for j in js)
            group = self.filter_of[self.tensors[js[0]]][1]
            if group > 1 and rows % group == 0:
                b, a, d, g = (x.reshape(k, rows // group, group).sum(2) for x in (b, a, d, g))
            angles = angles_from_norms(b, a, d)
            out[:, u] = np.sqrt(np.nanmean(angles**2, axis=1))
            per_filter[u] = angles
            norms[u] = a
            grads[u] = g * b
        return out, per_filter, norms, grads


class _Slot:
    """Everything recorded for one optimizer (on one device): the step hooks' device work and the drain.

    The measurement varies along a few independent choices, each kept in one place: the update from the
    momentum buffer or from a weight snapshot (:attr:`momentum_path`), dot products or float64 norms
    (:attr:`cross`, laid out by :class:`_Columns`), a flat group of small tensors (:class:`_FlatGroup`),
    per-filter statistics (:class:`_PerFilter`), sampling (:class:`_StepClock`) and sharding (:class:`_Shards`).
    """

    def __init__(
        self,
        index: int,
        optimizer: torch.optim.Optimizer,
        tensors: list[torch.Tensor],
        *,
        tensor_unit: list[int],
        tensor_group: list[int],
        units: list[int],
        capacity: int,
        use_momentum_buffer: bool,
        tensor_filter: list[tuple[int, int] | None] | None = None,
        shard_group: Any = None,
        every_n_steps: int = 1,
        cpu_dot_products: bool = True,
    ) -> None:
        self.index = index
        self.clock = _StepClock(every_n_steps)
        self.optimizer = optimizer
        self.tensors = tensors
        self.rule = rule_for(optimizer)
        self.settings = self.rule.optimizer_settings(unwrap_optimizer(optimizer))  # constant for the optimizer's life
        self.placement = _Placement(tensor_unit, tensor_group, units)
        self.shards = _Shards(tensors, shard_group)
        self.device = local_shard(tensors[0]).device  # type: ignore[union-attr]
        self.momentum_path = use_momentum_buffer and _is_heavy_ball_sgd(optimizer, self.placement.groups)
        self.capacity = max(int(capacity), 1)
        # On the CPU, float32 dot products are ~10x cheaper than float64-accumulated norms (which upcast every
        # element); their ~1e-7 relative error is harmless once ‖w_t‖² − ‖w_{t+1}‖² is taken from the cross
        # term ⟨d, w_{t+1}⟩ instead of subtracting two norms. Accelerators keep the fused float64 foreach norms.
        # (float32/float64 only: a dot product accumulated in bf16/fp16 would lose the precision)
        cross = cpu_dot_products and self.device.type == "cpu" and all(t.dtype in (torch.float32, torch.float64) for t in tensors)
        flat_ok = cross and not any(f is not None for f in (tensor_filter or [])) and not self.shards.sharded
        self.columns = _Columns.plan(len(tensors), dots=cross, sampled=self.clock.stride > 1, inverse_order=self._plan_kernels(flat_ok))
        self.buffer = torch.zeros(self.capacity, self.columns.width, dtype=torch.float64, device=self.device)
        self.count = 0  # rows recorded in the buffer
        self.error: str | None = None  # set when recording failed: the slot measures no more
        self.log = _HostLog()
        self._zero = torch.zeros(1, dtype=tensors[0].dtype, device=self.device)
        with torch.no_grad():
            self.initial = torch.stack(self._norms(self._locals())).square_()
        self.last_norm_sq: np.ndarray | None = None  # per tensor, host; None until the first drain
        # (filters split across ranks get none)
        filters = None if self.shards.sharded else tensor_filter
        self.pf = _PerFilter.plan(tensors, filters, capacity=self.capacity, sampled=self.clock.stride > 1, device=self.device)

    def _plan_kernels(self, flat_ok: bool) -> np.ndarray | None:
        """Which tensors share one flat group (the CPU dot path batches small tensors, so their number does not
        multiply the ops) and which get their own kernels (larger, bandwidth-bound tensors; per-filter statistics
        and shards keep every tensor on its own); and the weight snapshots when the update is not read from a
        momentum buffer. Returns the permutation from kernel order to tracked order (None: the same)."""
        locals_: list[torch.Tensor] = [local_shard(t) for t in self.tensors]  # type: ignore[misc]
        small = [i for i, t in enumerate(locals_) if 0 < t.numel() < SMALL_NUMEL and t.is_contiguous()] if flat_ok else []
        if len({locals_[i].dtype for i in small}) > 1 or len(small) < 2:
            small = []
        self.flat = _FlatGroup(locals_, small, snapshot=not self.momentum_path) if small else None
        in_flat = set(self.small)
        self.large = [i for i in range(len(self.tensors)) if i not in in_flat]
        self.snapshot: list[torch.Tensor] | None = None  # of the large tensors (the flat group has its own)
        if not self.momentum_path:
            self.snapshot = [locals_[i].detach().clone() for i in self.large]
        order = self.large + self.small  # column order within each block of columns
        return np.argsort(np.array(order, dtype=np.int64)) if order != list(range(len(self.tensors))) else None

    # -- what the owner reads ------------------------------------------------------------------
    @property
    def small(self) -> list[int]:
        """Positions of the tensors in the flat group (in its order)."""
        return self.flat.positions if self.flat is not None else []

    @property
    def cross(self) -> bool:
        """The CPU dot path: ⟨d, w_{t+1}⟩ recorded, float32/float64 dot products instead of float64 norms."""
        return self.columns.dot is not None

    @property
    def sharded(self) -> bool:
        """The tensors are shards: the recorded sums are partial until the drain's all-reduce."""
        return self.shards.sharded

    @property
    def collectives(self) -> int:
        """All-reduces issued so far (sharded: one per drain)."""
        return self.shards.collectives

    @property
    def steps_taken(self) -> int:
        """The optimizer's steps, recorded or not (numbered from :meth:`start_at`)."""
        return self.clock.taken

    @property
    def groups(self) -> list[int]:
        """The optimizer's param-group indices that hold tracked tensors."""
        return self.placement.groups

    @property
    def units(self) -> list[int]:
        """The global indices of the units measured here."""
        return self.placement.units

    @property
    def unit_group(self) -> np.ndarray:
        """Per unit measured here: its param group, as a position in :attr:`groups`."""
        return self.placement.unit_group

    @property
    def pending(self) -> int:
        """Steps recorded and not drained yet (host counters only: no sync)."""
        return self.count + self.log.rows

    @property
    def extra_bytes(self) -> int:
        snap = sum(t.numel() * t.element_size() for t in self.snapshot) if self.snapshot is not None else 0
        snap += self.flat.extra_bytes if self.flat is not None else 0
        pf = self.pf.extra_bytes if self.pf is not None else 0
        return snap + pf + self.buffer.numel() * self.buffer.element_size()

    def start_at(self, step: int) -> None:
        """Number the steps from ``step`` + 1, unless a step was seen."""
        if self.clock.taken == self.clock.start:
            self.clock.taken = self.clock.start = int(step)

    def resume(self, steps_taken: int) -> None:
        """Continue counting from a checkpoint's step count."""
        self.clock.taken = steps_taken

    def close(self) -> None:
        """Free the weight copies (the hooks are the recorder's)."""
        self.snapshot = None
        self.flat = None

    # -- the step path ---------------------------------------------------------------------------
    def _locals(self) -> list[torch.Tensor]:
        if not self.shards.sharded:
            return self.tensors
        return [local_shard(t) for t in self.tensors]  # type: ignore[misc]

    def _large(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        return tensors if self.flat is None else [tensors[i] for i in self.large]

    def _norms(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """float64 norms; empty tensors (an empty shard) are replaced by a zero, not fed to foreach."""
        zero = self._zero
        return list(torch._foreach_norm([t if t.numel() else zero for t in tensors], 2, dtype=torch.float64))

    def _record_norms(self, tensors: list[torch.Tensor], updates: list[torch.Tensor], grads: list[torch.Tensor]) -> None:
        row = self.buffer[self.count, : self.columns.grad.stop]  # weight, update, grad: the first three blocks
        torch.stack(self._norms(tensors) + self._norms(updates) + self._norms(grads), out=row)
        row.square_()

    def _record_dots(self, tensors: list[torch.Tensor], updates: list[torch.Tensor], grads: list[torch.Tensor], small: torch.Tensor | None) -> None:
        """‖w‖², ‖d‖², ⟨d, w⟩, ‖g‖² per tensor (``d`` the update direction: ``w_t − w_{t+1}`` or the
        momentum buffer; ``updates`` for the large tensors only), columns in ``large + small`` order;
        ``small`` the flat group's sums."""
        parts = []
        if self.large:
            w = [tensors[i].reshape(-1) for i in self.large]
            d = [t.reshape(-1) for t in updates]
            g = [grads[i].reshape(-1) for i in self.large]
            vals = [torch.dot(x, x) for x in w] + [torch.dot(x, x) for x in d]
            vals += [torch.dot(x, y) if x.numel() == y.numel() else x.new_zeros(()) for x, y in zip(d, w)]
            vals += [torch.dot(x, x) for x in g]
            parts.append(torch.stack(vals).view(4, len(self.large)).to(torch.float64))
        if small is not None:
            parts.append(small)
        row = self.buffer[self.count].view(self.columns.blocks, len(tensors))
        if len(parts) == 1:
            row.copy_(parts[0])
        else:
            torch.cat(parts, dim=1, out=row)

    def fail(self, err: BaseException) -> None:
        """Stop measuring after an error in the step hooks; rows already complete stay drainable."""
        self.error = f"{type(err).__name__}: {err} (optimizer step {self.clock.taken + 1})"
        # (the row logs are appended together after every tensor op of a step: a failed step left none)

    def _take_snapshots(self, tensors: list[torch.Tensor]) -> None:
        if self.snapshot:
            torch._foreach_copy_(self.snapshot, self._large(tensors))
        if self.flat is not None:
            self.flat.take_snapshot(tensors)

    def pre_step(self) -> None:
        """Called right before the optimizer steps, when sampling: on a step to be recorded, take ``w_t``
        (the snapshot, ‖w_t‖² and per-filter rows) — the previous recorded row is ``n`` steps old."""
        if not self.clock.arm():
            return
        if self.count == self.capacity:
            self._spill()
        tensors = self._locals()
        with torch.no_grad():
            self._take_snapshots(tensors)
            if self.columns.before is not None:
                row = self.buffer[self.count, self.columns.before]
                torch.stack(self._norms(tensors), out=row)
                row.square_()
            if self.pf is not None:
                self.pf.record_before(self.count, tensors)

    def _momentum_updates(
        self, params: list[torch.Tensor], tensors: list[torch.Tensor], grads: list[torch.Tensor], missing: bool
    ) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        """The update directions read from SGD's momentum buffers (the large tensors'), and the flat group's sums."""
        state = self.optimizer.state
        buffers: list[torch.Tensor | None] = []
        for t in params:
            st = state.get(t)
            buf = st.get("momentum_buffer") if st else None
            # A tensor without gradient is skipped by SGD: it did not move this step.
            buffers.append(local_shard(buf) if buf is not None and t.grad is not None else None)
        updates = []
        for i in self.large:
            buf = buffers[i]
            # (per-filter rows need the full shape; the dot path pairs a size mismatch with 0)
            updates.append(buf if buf is not None else (torch.zeros_like(tensors[i]) if self.pf is not None else self._zero))
        flat = self.flat
        small = flat.sums(flat.weights(tensors), flat.momentum(buffers), grads, missing) if flat is not None else None
        return updates, small

    def _snapshot_updates(self, tensors: list[torch.Tensor], grads: list[torch.Tensor], missing: bool) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        """The updates ``w_t − w_{t+1}``, made in the snapshot of the large tensors, and the flat group's sums."""
        assert self.snapshot is not None
        large = self._large(tensors)
        if large:
            torch._foreach_sub_(self.snapshot, large)  # snapshot := w_t - w_{t+1}
        flat = self.flat
        small = None
        if flat is not None:
            assert flat.snap is not None
            w = flat.weights(tensors)
            small = flat.sums(w, flat.snap.sub_(w), grads, missing)
            if self.clock.stride == 1:
                flat.snap.copy_(w)
        return self.snapshot, small

    def record(self) -> None:
        """Called right after the optimizer stepped. Host-sync free."""
        if not self.clock.recording():  # sampling, and not a sampled step
            return
        if self.clock.stride == 1 and self.count == self.capacity:
            self._spill()
        params = self.tensors
        tensors = self._locals()
        zero = self._zero
        missing = [i for i, t in enumerate(params) if t.grad is None]
        with torch.no_grad():
            if self.shards.sharded:
                grads = [local_shard(t.grad) if t.grad is not None else zero for t in params]
            else:
                grads = [zero if g is None else g for g in [t.grad for t in params]]
            # (the per-filter part and the flat group exclude each other: the op order is that of either)
            if self.momentum_path:
                updates, small = self._momentum_updates(params, tensors, grads, bool(missing))
            else:
                updates, small = self._snapshot_updates(tensors, grads, bool(missing))
            pf_updates = self.pf.row_sq(self.pf.of(updates)) if self.pf is not None else []
            if self.cross:
                self._record_dots(tensors, updates, grads, small)
            else:
                self._record_norms(tensors, updates, grads)
            if not self.momentum_path and self.clock.stride == 1 and self.large:
                # (sampling re-takes it in the pre-hook of the next sampled step)
                torch._foreach_copy_(self.snapshot, self._large(tensors))  # type: ignore[arg-type]
            if self.pf is not None:
                self.pf.record(self.count, tensors, pf_updates, [t.grad for t in params])
        groups = self.optimizer.param_groups
        keys = self.rule.keys
        step = self.clock.taken + 1
        self.log.add(step, tuple(tuple(step if k == "_step" else _freeze(groups[g].get(k)) for k in keys) for g in self.placement.groups), missing)
        self.count += 1
        self.clock.taken += 1

    def rebase(self) -> None:
        """Take the snapshot and the initial norms again (weights changed since attach: a checkpoint was
        restored, a ``setup``/``on_train_start`` hook re-initialized them). Only before the first step."""
        if self.clock.taken != self.clock.start:
            return
        with torch.no_grad():
            tensors = self._locals()
            self._take_snapshots(tensors)
            self.initial = torch.stack(self._norms(tensors)).square_()
            if self.pf is not None:
                self.pf.rebase(tensors)

    # -- to the host -----------------------------------------------------------------------------
    def _reduce_pending(self) -> None:
        """Sum the shard-local partial sums over the shard group: one all-reduce for everything recorded since
        the last drain (and, the first time, the initial norms). Every rank must drain at the same step."""
        first = self.last_norm_sq is None and not self.shards.initial_reduced
        initial = self.shards.all_reduce(self.buffer[: self.count], self.initial if first else None)
        if initial is not None:
            self.initial = initial

    def _to_host(self) -> None:
        """Copy the rows on the device to the host log (a synchronization) and empty the buffer."""
        data = self.buffer[: self.count].to("cpu", copy=True).numpy()
        self.log.keep(data, self.pf.to_host(self.count) if self.pf is not None else None)
        self.count = 0

    def _spill(self) -> None:
        # The buffer is full before the owner drained it (log interval longer than the capacity): move it
        # to the host now. This is the only place the step path synchronizes, and only then.
        if self.shards.sharded:
            self._reduce_pending()  # spills happen at the same step on every rank (same capacity)
        self._to_host()

    def drain(self) -> StepBatch | None:
        """Everything recorded since the last drain, as per-unit host statistics (None: nothing recorded)."""
        if self.shards.sharded:
            self._reduce_pending()
        if self.count:
            self._to_host()
        parts, pf_parts, missing = self.log.take()
        if not parts:
            return None
        data = np.concatenate([p[0] for p in parts])
        raw_hyper = [h for p in parts for h in p[1]]
        steps = np.concatenate([p[2] for p in parts])
        rows = self.columns.split(data)
        w_sq = rows.weight
        if self.last_norm_sq is None:
            self.last_norm_sq = self.initial.to("cpu", copy=True).numpy()  # (summed over shards already)
        if rows.before is not None:
            before = rows.before
        else:
            before = np.concatenate([self.last_norm_sq[None, :], w_sq[:-1]], axis=0)
        self.last_norm_sq = w_sq[-1].copy()
        d_sq, g_sq, dw = _mask_missing(missing, rows.update, rows.grad, rows.dot)
        keys = self.rule.keys
        hyper = [[self.rule.hyper({**self.settings, **dict(zip(keys, (_thaw(v) for v in group)))}) for group in step] for step in raw_hyper]
        if self.momentum_path:
            # ‖w_{t+1} − w_t‖ = η·‖buf‖ with the lr of the step (read inside the post-hook, before the
            # scheduler moved it).
            lr = np.array([[g.get("lr", math.nan) for g in step] for step in hyper], dtype=np.float64)
            d_sq = d_sq * lr[:, self.placement.tensor_group] ** 2
            if dw is not None:
                dw = dw * lr[:, self.placement.tensor_group]
        to_units = self.placement.to_units
        diff_u = None
        if dw is not None:
            # ‖w_t‖² − ‖w_{t+1}‖² = 2⟨d, w_{t+1}⟩ + ‖d‖² exactly, with d = w_t − w_{t+1}
            diff = 2.0 * dw + d_sq
            before = w_sq + diff
            diff_u = to_units(diff)
        before_u, after_u, upd_u, grad_u = (to_units(x) for x in (before, w_sq, d_sq, g_sq))
        filter_rms, filter_angles, filter_norms, filter_grads = (
            self.pf.rms(np.concatenate(pf_parts), hyper, self.placement, self.momentum_path, missing) if pf_parts else (None, None, None, None)
        )
        return StepBatch(
            optimizer_index=self.index,
            unit_index=np.array(self.units, dtype=np.int64),
            steps=steps,
            norm_sq_before=before_u,
            norm_sq_after=after_u,
            update_sq=upd_u,
            grad_sq=grad_u,
            angular_update=angles_from_norms(before_u, after_u, upd_u, diff_u),
            hyper=hyper,
            unit_group=self.unit_group,
            rule=self.rule,
            filter_angular_update_rms=filter_rms,
            filter_angles=filter_angles,
            filter_norm_sq=filter_norms,
            filter_grad_stat=filter_grads,
            norm_sq_change=-diff_u if diff_u is not None else after_u - before_u,
        )


def _mask_missing(missing: list[list[int]], d_sq: np.ndarray, g_sq: np.ndarray, dw: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """The update, gradient and dot columns with nan where a tensor had no gradient (copies when any)."""
    if any(missing):
        d_sq = d_sq.copy()
        g_sq = g_sq.copy()
        dw = dw.copy() if dw is not None else None
        for r, miss in enumerate(missing[-len(d_sq) :]):
            d_sq[r, miss] = np.nan
            g_sq[r, miss] = np.nan
            if dw is not None:
                dw[r, miss] = np.nan
    return d_sq, g_sq, dw


def _dtensor_type() -> type | None:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch without distributed
        return None
    return DTensor


_DTENSOR = _dtensor_type()


def local_shard(t: torch.Tensor | None) -> torch.Tensor | None:
    """The rank-local part of a sharded tensor (FSDP2's DTensor parameters, their grads and optimizer
    state); the tensor itself otherwise. No communication."""
    if t is not None and _DTENSOR is not None and isinstance(t, _DTENSOR):
        return t._local_tensor  # type: ignore[attr-defined]
    return t


def _shard_group(tensors: Sequence[torch.Tensor]) -> Any:
    """The process group over which the tensors' shards must be summed, or None when not sharded."""
    if _DTENSOR is None:
        return None
    for t in tensors:
        if isinstance(t, _DTENSOR):
            from torch.distributed.tensor.placement_types import Shard

            mesh = t.device_mesh
            dims = [i for i, p in enumerate(t.placements) if isinstance(p, Shard)]
            if not dims:
                return None
            return mesh.get_group(dims[0]) if mesh.ndim > 1 else mesh.get_group()
    return None


def _freeze(value: Any) -> Any:
    # A tensor hyper-parameter (capturable/compiled optimizers) is updated in place by schedulers: keep a
    # device copy now and convert it to a float at drain time, never on the step path.
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, tuple):  # betas
        return tuple(_freeze(v) for v in value)
    return value


def _thaw(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return float(value)
    if isinstance(value, tuple):  # betas
        return tuple(_thaw(v) for v in value)
    return value


def _is_heavy_ball_sgd(optimizer: torch.optim.Optimizer, groups: Iterable[int]) -> bool:
    if type(optimizer) is not torch.optim.SGD:
        return False
    for g in groups:
        group = optimizer.param_groups[g]
        if not group.get("momentum", 0.0) or group.get("nesterov", False) or group.get("maximize", False):
            return False
    return True


class StepRecorder:
    """Records the SMD statistics of tracked tensors after every step of every optimizer.

    Args:
        unit_params: for each tracked unit, its parameter tensors.
        optimizers: the optimizers to hook; a tracked parameter none of them holds is reported by
            :attr:`unoptimized` and not measured.
        capacity: steps buffered on the device between drains (a full buffer is moved to the host on
            the step that fills it — the only host synchronization of the step path).
        use_momentum_buffer: measure heavy-ball SGD's update from its momentum buffer instead of a
            weight snapshot (exact, and saves one copy of the tracked weights).
        unit_filters: per unit, ``(filter dim, filters per invariant group)`` to also record per-filter
            statistics (reported as the RMS over filters of the per-filter angular update), or ``None``.
            This costs a few launches per tracked tensor and step, so it is opt-in.
        shard_group: the process group over which plain-tensor shards must be summed (FSDP1's flat
            ``use_orig_params`` views; ``"world"`` for the default group). DTensor shards (FSDP2) are
            recognized without it.
        every_n_steps: record only every n-th step of each optimizer (steps n, 2n, ...). A sampled step
            is still measured over that one step: a step pre-hook takes ``w_t`` right before it, so the
            angular update and its prediction keep their meaning; other steps cost two integer checks.
        cpu_dot_products: on the CPU, measure float32/float64 weights with dot products (see :class:`_Slot`);
            ``False`` uses the accelerators' float64 foreach norms on every device.
    """

    def __init__(
        self,
        unit_params: Sequence[Sequence[torch.Tensor]],
        optimizers: Sequence[torch.optim.Optimizer],
        capacity: int = 64,
        use_momentum_buffer: bool = True,
        unit_filters: Sequence[tuple[int, int] | None] | None = None,
        shard_group: Any = None,
        every_n_steps: int = 1,
        cpu_dot_products: bool = True,
    ) -> None:
        self.every_n_steps: int = check_int("every_n_steps", every_n_steps, 1)  # type: ignore[assignment]
        self.n_units = len(unit_params)
        self.slots: list[_Slot] = []
        owner: dict[int, tuple[int, int]] = {}
        for oi, opt in enumerate(optimizers):
            for gi, group in enumerate(opt.param_groups):
                for p in group["params"]:
                    owner.setdefault(id(p), (oi, gi))
        # one slot per (optimizer, device): stacking needs one device
        per_opt: dict[tuple[int, str], tuple[list[torch.Tensor], list[int], list[int], list[int]]] = {}
        per_opt_filter: dict[tuple[int, str], list[tuple[int, int] | None]] = {}
        self.unoptimized: list[int] = []
        for u, params in enumerate(unit_params):
            where = [owner.get(id(p)) for p in params]
            if any(w is None for w in where) or len({w[0] for w in where if w}) != 1 or len({str(p.device) for p in params}) != 1:
                self.unoptimized.append(u)
                continue
            oi = where[0][0]  # type: ignore[index]
            key = (oi, str(params[0].device))
            tensors, t_unit, t_group, units = per_opt.setdefault(key, ([], [], [], []))
            spec = unit_filters[u] if unit_filters is not None else None
            for j, (p, w) in enumerate(zip(params, where)):
                tensors.append(p)
                t_unit.append(u)
                t_group.append(w[1])  # type: ignore[index]
                # the filter dim applies to the weight; further tensors of a unit (a bias) are 1-D per filter
                per_opt_filter.setdefault(key, []).append(None if spec is None else (spec[0] if j == 0 else 0, spec[1]))
            units.append(u)
        self._handles = []
        for key in sorted(per_opt):
            oi = key[0]
            tensors, t_unit, t_group, units = per_opt[key]
            slot = _Slot(
                oi,
                optimizers[oi],
                tensors,
                tensor_unit=t_unit,
                tensor_group=t_group,
                units=units,
                capacity=capacity,
                use_momentum_buffer=use_momentum_buffer,
                tensor_filter=per_opt_filter.get(key),
                shard_group=shard_group,
                every_n_steps=self.every_n_steps,
                cpu_dot_products=cpu_dot_products,
            )
            self.slots.append(slot)
            if self.every_n_steps > 1:
                self._handles.append(optimizers[oi].register_step_pre_hook(_Hook(slot, "pre_step")))
            self._handles.append(optimizers[oi].register_step_post_hook(_Hook(slot, "record")))

    @property
    def extra_bytes(self) -> int:
        """Device memory this recorder holds: weight snapshots plus the statistics buffers."""
        return sum(s.extra_bytes for s in self.slots)

    @property
    def pending(self) -> int:
        """Steps recorded on the device and not drained yet (host counters only: no sync)."""
        return sum(s.pending for s in self.slots)

    @property
    def sharded(self) -> bool:
        """Some tracked tensors are shards (FSDP): each rank records partial sums, completed at every drain."""
        return any(s.sharded for s in self.slots)

    @property
    def global_step(self) -> int:
        """The most steps any hooked optimizer took (0 before the first)."""
        return max((s.steps_taken for s in self.slots), default=0)

    def failures(self) -> list[tuple[int, torch.optim.Optimizer, str]]:
        """``(optimizer index, optimizer, error)`` of each optimizer whose recording failed (it measures no more)."""
        return [(s.index, s.optimizer, s.error) for s in self.slots if s.error is not None]

    def measurement(self, index: int) -> tuple[str | None, int]:
        """How optimizer ``index``'s update is measured (``"momentum_buffer"`` or ``"snapshot"``; None: it holds no
        tracked weight) and the steps it took."""
        slot = next((s for s in self.slots if s.index == index), None)
        if slot is None:
            return None, 0
        return ("momentum_buffer" if slot.momentum_path else "snapshot"), slot.steps_taken

    def unit_groups(self) -> Iterator[tuple[int, torch.optim.Optimizer, Rule, int, int]]:
        """``(optimizer index, optimizer, its rule, unit, param-group index)`` of each measured unit."""
        for s in self.slots:
            for u_local, u in enumerate(s.units):
                yield s.index, s.optimizer, s.rule, u, s.groups[int(s.unit_group[u_local])]

    def optimizer_groups(self) -> Iterator[tuple[int, torch.optim.Optimizer, Rule, dict[str, Any], list[int], int]]:
        """``(optimizer index, optimizer, its rule, the rule's optimizer settings, the param-group indices a batch's
        ``unit_group`` indexes, steps taken)`` of each recorded optimizer."""
        for s in self.slots:
            yield s.index, s.optimizer, s.rule, dict(s.settings), list(s.groups), s.steps_taken

    def param_groups(self) -> Iterator[tuple[torch.optim.Optimizer, Rule, int]]:
        """``(optimizer, its rule, param-group index)`` of each param group holding measured tensors."""
        for s in self.slots:
            for g in s.groups:
                yield s.optimizer, s.rule, g

    def step_counts(self) -> list[list[Any]]:
        """``[optimizer index, device, steps taken]`` per recorded optimizer and device: the checkpointed count."""
        return [[s.index, str(s.device), s.steps_taken] for s in self.slots]

    def load_step_counts(self, counts: Iterable[Sequence[Any]]) -> None:
        """Continue counting the steps from :meth:`step_counts` of a checkpoint (optimizers not in it keep theirs)."""
        steps = {(int(i), str(d)): int(n) for i, d, n in counts}
        for s in self.slots:
            s.resume(steps.get((s.index, str(s.device)), s.steps_taken))

    def rebase(self) -> None:
        """Re-take snapshots and initial norms before the first step (see :meth:`_Slot.rebase`)."""
        for slot in self.slots:
            slot.rebase()

    def start_at(self, step: int) -> None:
        """Number the steps from ``step`` + 1 (training resumed from a checkpoint without this recorder's state,
        or a second fit of one Trainer: the steps keep the Trainer's count). Only before the first step."""
        for slot in self.slots:
            slot.start_at(step)

    def drain(self) -> list[StepBatch]:
        """Copy the recorded steps to the host (one synchronization) and return them per optimizer."""
        out = []
        for slot in self.slots:
            batch = slot.drain()
            if batch is not None:
                out.append(batch)
        return out

    def close(self) -> None:
        """Remove the optimizer hooks and free the device buffers."""
        for h in self._handles:
            h.remove()
        self._handles = []
        for slot in self.slots:
            slot.close()


class _Hook:
    """A picklable optimizer step hook calling ``slot.<method>()`` (a bound lambda would not survive
    ``ddp_spawn``): ``record`` after the step, ``pre_step`` before it when sampling. A failure of the
    measurement never reaches the training loop: the slot stops measuring and keeps the error, which the
    owner reports."""

    def __init__(self, slot: _Slot, method: str) -> None:
        self.slot = slot
        self.method = method

    def __call__(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if self.slot.error is not None:
            return
        try:
            getattr(self.slot, self.method)()
        except Exception as err:  # noqa: BLE001 - an observer must not break the step
            self.slot.fail(err)


class DistanceTracker:
    """Angular distance travelled by each unit since a reference point (Kunin et al., *Limiting dynamics
    of SGD*: parameters keep moving long after the loss converged). Holds one copy of the weights of the
    units it tracks; measured at log steps only (one host synchronization there)."""

    def __init__(self, unit_params: Sequence[Sequence[torch.Tensor]]) -> None:
        self.unit_params = [list(p) for p in unit_params]
        self.reference: dict[int, list[torch.Tensor]] = {}
        self.reference_step: dict[int, int] = {}
        self.series: dict[int, list[tuple[int, float]]] = {}

    @property
    def extra_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for ts in self.reference.values() for t in ts)

    def take(self, unit: int, step: int) -> None:
        with torch.no_grad():
            self.reference[unit] = [p.detach().clone() for p in self.unit_params[unit]]
        self.reference_step[unit] = step
        self.series[unit] = []

    def measure(self, step: int) -> dict[int, float]:
        """Angle between each unit's reference and its current value, appended to its series."""
        units = sorted(self.reference)
        if not units:
            return {}
        refs = [t for u in units for t in self.reference[u]]
        curs = [p.detach() for u in units for p in self.unit_params[u]]
        with torch.no_grad():
            diffs = torch._foreach_sub(curs, refs)
            stacked = torch.stack(
                torch._foreach_norm(refs, 2, dtype=torch.float64)
                + torch._foreach_norm(curs, 2, dtype=torch.float64)
                + torch._foreach_norm(diffs, 2, dtype=torch.float64)
            ).square_()
        values = stacked.to("cpu").numpy()
        n = len(refs)
        out: dict[int, float] = {}
        pos = 0
        for u in units:
            k = len(self.reference[u])
            a, b, d = (values[pos : pos + k].sum(), values[n + pos : n + pos + k].sum(), values[2 * n + pos : 2 * n + pos + k].sum())
            pos += k
            angle = float(angles_from_norms(np.array(a), np.array(b), np.array(d)))
            out[u] = angle
            t = step - self.reference_step[u]
            if t > 0:
                self.series[u].append((t, angle))
        return out

    def close(self) -> None:
        self.reference = {}
