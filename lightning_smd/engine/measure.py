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
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch

from lightning_smd.analysis.batch import StepBatch
from lightning_smd.analysis.theory import rule_for, unwrap_optimizer

__all__ = ["StepBatch", "StepRecorder", "DistanceTracker", "angles_from_norms", "local_shard"]

SMALL_NUMEL = 4096
"""CPU dot path: tensors with fewer elements are batched into one concatenated segmented sum."""


def angles_from_norms(
    norm_sq_before: np.ndarray, norm_sq_after: np.ndarray, update_sq: np.ndarray, norm_sq_diff: np.ndarray | None = None
) -> np.ndarray:
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


class _Slot:
    """Everything recorded for one optimizer."""

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
        self.stride = max(int(every_n_steps), 1)
        self._armed = self.stride == 1
        self.optimizer = optimizer
        self.tensors = tensors
        self.rule = rule_for(optimizer)
        self.settings = self.rule.optimizer_settings(unwrap_optimizer(optimizer))  # constant for the optimizer's life
        self._layout(tensor_unit, tensor_group, units)
        # Sharded parameters (FSDP2 DTensors): every statistic is a sum of squares, so each rank records the
        # sums over its own shards and one all-reduce per drain completes them.
        explicit = shard_group is not None
        self.shard_group = _shard_group(tensors) if not explicit else (None if shard_group == "world" else shard_group)
        self.sharded = explicit or self.shard_group is not None
        self.device = local_shard(tensors[0]).device  # type: ignore[union-attr]
        self.momentum_path = use_momentum_buffer and _is_heavy_ball_sgd(optimizer, self.groups)
        self.capacity = max(int(capacity), 1)
        # On the CPU, float32 dot products are ~10x cheaper than float64-accumulated norms (which upcast every
        # element); their ~1e-7 relative error is harmless once ‖w_t‖² − ‖w_{t+1}‖² is taken from the cross
        # term ⟨d, w_{t+1}⟩ instead of subtracting two norms. Accelerators keep the fused float64 foreach norms.
        # (float32/float64 only: a dot product accumulated in bf16/fp16 would lose the precision)
        self.cross = cpu_dot_products and self.device.type == "cpu" and all(t.dtype in (torch.float32, torch.float64) for t in tensors)
        # Columns of a buffer row, each ``len(tensors)`` wide: ‖w_{t+1}‖², ‖d‖², [⟨d, w_{t+1}⟩], ‖g‖², and when
        # sampling without the cross term, ‖w_t‖² (taken in the step pre-hook: the previous recorded row is
        # no longer the previous step).
        self.col_g = 3 if self.cross else 2
        self.col_before = 3 if (self.stride > 1 and not self.cross) else None
        self.columns = 4 if (self.cross or self.col_before is not None) else 3
        self.buffer = torch.zeros(self.capacity, self.columns * len(tensors), dtype=torch.float64, device=self.device)
        sharded = self.sharded or _shard_group(tensors) is not None
        self._plan_kernels(flat_ok=self.cross and not any(f is not None for f in (tensor_filter or [])) and not sharded)
        self.count = 0
        self.steps_taken = 0
        self.start_step = 0  # steps_taken before the first recorded step (StepRecorder.start_at)
        self.step_log: list[int] = []  # the optimizer step of each recorded row
        self.error: str | None = None  # set when recording failed: the slot measures no more
        self.hyper_log: list[tuple[tuple[Any, ...], ...]] = []
        # per recorded step: tensors that had no gradient (the optimizer skipped them: no rotation to measure)
        self.missing_log: list[list[int]] = []
        self.spill: list[tuple[np.ndarray, list[tuple[tuple[Any, ...], ...]], np.ndarray]] = []
        self._zero = torch.zeros(1, dtype=tensors[0].dtype, device=self.device)
        self.collectives = 0  # all-reduces issued (sharded runs): one per drain
        self._initial_reduced = False
        with torch.no_grad():
            self.initial = torch.stack(self._norms(self._locals())).square_()
        self.last_norm_sq: np.ndarray | None = None  # per tensor, host; None until the first drain
        self._plan_filters(tensor_filter, tensor_unit, sharded)

    def _layout(self, tensor_unit: list[int], tensor_group: list[int], units: list[int]) -> None:
        """Where each tracked tensor belongs: its unit (global and local index) and its param group."""
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

    def _plan_kernels(self, flat_ok: bool) -> None:
        """Which tensors share one flat group (the CPU dot path batches small tensors, so their number does not
        multiply the ops) and which get their own kernels (larger, bandwidth-bound tensors; per-filter statistics
        and shards keep every tensor on its own); and the weight snapshots when the update is not read from a
        momentum buffer."""
        locals_ = self._locals_of(self.tensors)
        small = [i for i, t in enumerate(locals_) if 0 < t.numel() < SMALL_NUMEL and t.is_contiguous()] if flat_ok else []
        if len({locals_[i].dtype for i in small}) > 1 or len(small) < 2:
            small = []
        self.flat = _FlatGroup(locals_, small, snapshot=not self.momentum_path) if small else None
        self.small = self.flat.positions if self.flat is not None else []
        in_flat = set(self.small)
        self.large = [i for i in range(len(self.tensors)) if i not in in_flat]
        self.snapshot: list[torch.Tensor] | None = None  # of the large tensors (the flat group has its own)
        if not self.momentum_path:
            self.snapshot = [locals_[i].detach().clone() for i in self.large]
        order = self.large + self.small  # column order within each group of columns
        self.inverse_order = np.argsort(np.array(order, dtype=np.int64)) if order != list(range(len(self.tensors))) else None

    def _plan_filters(self, tensor_filter: list[tuple[int, int] | None] | None, tensor_unit: list[int], sharded: bool) -> None:
        """Per-filter statistics (opt-in): tensor position -> (filter dim, filters per invariant group). Filters
        split across ranks get none."""
        tensors = self.tensors
        self.filter_of = {t: f for t, f in enumerate(tensor_filter or []) if f is not None and tensors[t].numel() > 0 and not sharded}
        self.pf_tensors = sorted(self.filter_of)
        self.pf_rows = [tensors[t].shape[self.filter_of[t][0]] if tensors[t].dim() > 1 else tensors[t].numel() for t in self.pf_tensors]
        self.pf_buffer: torch.Tensor | None = None
        self.pf_log: list[np.ndarray] = []
        self.pf_last: np.ndarray | None = None
        if self.pf_tensors:
            total = sum(self.pf_rows)
            # rows: ‖w_{t+1}‖² per filter, ‖d‖² per filter, and when sampling ‖w_t‖² per filter
            self.pf_buffer = torch.zeros(self.capacity, (3 if self.stride > 1 else 2) * total, dtype=torch.float64, device=self.device)
            with torch.no_grad():
                self.pf_initial = torch.cat(self._row_sq([tensors[t] for t in self.pf_tensors]))

    @property
    def extra_bytes(self) -> int:
        snap = sum(t.numel() * t.element_size() for t in self.snapshot) if self.snapshot is not None else 0
        snap += self.flat.extra_bytes if self.flat is not None else 0
        pf = self.pf_buffer.numel() * self.pf_buffer.element_size() if self.pf_buffer is not None else 0
        return snap + pf + self.buffer.numel() * self.buffer.element_size()

    def _row_sq(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """Squared norm of every filter (row along the filter dim) of each per-filter tensor, in float64."""
        out = []
        for t, pos in zip(tensors, self.pf_tensors):
            dim = self.filter_of[pos][0]
            rows = t.reshape(-1, 1) if t.dim() <= 1 else t.movedim(dim, 0).reshape(t.shape[dim], -1)
            out.append(torch.linalg.vector_norm(rows, dim=1, dtype=torch.float64).square())
        return out

    def _locals(self) -> list[torch.Tensor]:
        if not self.sharded:
            return self.tensors
        return [local_shard(t) for t in self.tensors]  # type: ignore[misc]

    @staticmethod
    def _locals_of(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        return [local_shard(t) for t in tensors]  # type: ignore[misc]

    def _large(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        return tensors if self.flat is None else [tensors[i] for i in self.large]

    def _norms(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """float64 norms; empty tensors (an empty shard) are replaced by a zero, not fed to foreach."""
        zero = self._zero
        return list(torch._foreach_norm([t if t.numel() else zero for t in tensors], 2, dtype=torch.float64))

    def _record_norms(self, tensors: list[torch.Tensor], updates: list[torch.Tensor], grads: list[torch.Tensor]) -> None:
        row = self.buffer[self.count, : 3 * len(tensors)]
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
        row = self.buffer[self.count].view(4, len(tensors))
        if len(parts) == 1:
            row.copy_(parts[0])
        else:
            torch.cat(parts, dim=1, out=row)

    def fail(self, err: BaseException) -> None:
        """Stop measuring after an error in the step hooks; rows already complete stay drainable."""
        self.error = f"{type(err).__name__}: {err} (optimizer step {self.steps_taken + 1})"
        # (the row logs are appended together after every tensor op of a step: a failed step left none)

    def pre_step(self) -> None:
        """Called right before the optimizer steps, when sampling: on a step to be recorded, take ``w_t``
        (the snapshot, ‖w_t‖² and per-filter rows) — the previous recorded row is ``n`` steps old."""
        self._armed = (self.steps_taken + 1) % self.stride == 0
        if not self._armed:
            return
        if self.count == self.capacity:
            self._spill()
        tensors = self._locals()
        n_t = len(tensors)
        with torch.no_grad():
            if self.snapshot:
                torch._foreach_copy_(self.snapshot, self._large(tensors))
            if self.flat is not None:
                self.flat.take_snapshot(tensors)
            if self.col_before is not None:
                row = self.buffer[self.count, self.col_before * n_t : (self.col_before + 1) * n_t]
                torch.stack(self._norms(tensors), out=row)
                row.square_()
            if self.pf_buffer is not None:
                total = sum(self.pf_rows)
                torch.cat(self._row_sq([tensors[t] for t in self.pf_tensors]), out=self.pf_buffer[self.count, 2 * total :])

    def record(self) -> None:
        """Called right after the optimizer stepped. Host-sync free."""
        if not self._armed:  # sampling, and not a sampled step
            self.steps_taken += 1
            return
        if self.stride > 1:
            self._armed = False
        elif self.count == self.capacity:
            self._spill()
        params = self.tensors
        tensors = self._locals()
        zero = self._zero
        missing = [i for i, t in enumerate(params) if t.grad is None]
        with torch.no_grad():
            if self.sharded:
                grads = [local_shard(t.grad) if t.grad is not None else zero for t in params]
            else:
                grads = [zero if g is None else g for g in [t.grad for t in params]]
            pf_updates: list[torch.Tensor] = []
            flat = self.flat
            small = None
            if self.momentum_path:
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
                    updates.append(buf if buf is not None else (torch.zeros_like(tensors[i]) if self.pf_tensors else zero))
                if self.pf_tensors:
                    pf_updates = self._row_sq([updates[t] for t in self.pf_tensors])
                if flat is not None:
                    small = flat.sums(flat.weights(tensors), flat.momentum(buffers), grads, bool(missing))
                if self.cross:
                    self._record_dots(tensors, updates, grads, small)
                else:
                    self._record_norms(tensors, updates, grads)
            else:
                assert self.snapshot is not None
                large = self._large(tensors)
                if large:
                    torch._foreach_sub_(self.snapshot, large)  # snapshot := w_t - w_{t+1}
                if self.pf_tensors:
                    pf_updates = self._row_sq([self.snapshot[t] for t in self.pf_tensors])
                if flat is not None:
                    assert flat.snap is not None
                    w = flat.weights(tensors)
                    small = flat.sums(w, flat.snap.sub_(w), grads, bool(missing))
                    if self.stride == 1:
                        flat.snap.copy_(w)
                if self.cross:
                    self._record_dots(tensors, self.snapshot, grads, small)
                else:
                    self._record_norms(tensors, self.snapshot, grads)
                if self.stride == 1 and large:  # (sampling re-takes it in the pre-hook of the next sampled step)
                    torch._foreach_copy_(self.snapshot, large)
            if self.pf_buffer is not None:
                total = sum(self.pf_rows)
                torch.cat(self._row_sq([tensors[t] for t in self.pf_tensors]) + pf_updates, out=self.pf_buffer[self.count, : 2 * total])
        groups = self.optimizer.param_groups
        keys = self.rule.keys
        step = self.steps_taken + 1
        self.missing_log.append(missing)
        self.step_log.append(step)
        self.hyper_log.append(tuple(tuple(step if k == "_step" else _freeze(groups[g].get(k)) for k in keys) for g in self.groups))
        self.count += 1
        self.steps_taken += 1

    def _reduce_pending(self) -> None:
        """Sum the shard-local partial sums over the shard group: one all-reduce for everything recorded since
        the last drain (and, the first time, the initial norms). Every rank must drain at the same step."""
        import torch.distributed as dist

        parts = [self.buffer[: self.count].reshape(-1)]
        first = self.last_norm_sq is None and not self._initial_reduced
        if first:
            parts.append(self.initial.reshape(-1))
        flat = torch.cat(parts) if len(parts) > 1 or self.count else None
        if flat is None or flat.numel() == 0:
            return
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=self.shard_group)
        self.collectives += 1
        n = self.count * self.buffer.shape[1]
        self.buffer[: self.count].copy_(flat[:n].reshape(self.count, -1))
        if first:
            self.initial = flat[n:].clone()
            self._initial_reduced = True

    def rebase(self) -> None:
        """Take the snapshot and the initial norms again (weights changed since attach: a checkpoint was
        restored, a ``setup``/``on_train_start`` hook re-initialized them). Only before the first step."""
        if self.steps_taken != self.start_step:
            return
        with torch.no_grad():
            tensors = self._locals()
            if self.snapshot:
                torch._foreach_copy_(self.snapshot, self._large(tensors))
            if self.flat is not None:
                self.flat.take_snapshot(tensors)
            self.initial = torch.stack(self._norms(tensors)).square_()
            if self.pf_buffer is not None:
                self.pf_initial = torch.cat(self._row_sq([tensors[t] for t in self.pf_tensors]))

    def _spill(self) -> None:
        # The buffer is full before the owner drained it (log interval longer than the capacity): move it
        # to the host now. This is the only place the step path synchronizes, and only then.
        if self.sharded:
            self._reduce_pending()  # spills happen at the same step on every rank (same capacity)
        data = self.buffer[: self.count].to("cpu", copy=True).numpy()
        steps = np.array(self.step_log[-self.count :], dtype=np.int64)
        self.step_log = []
        self.spill.append((data, self.hyper_log, steps))
        if self.pf_buffer is not None:
            self.pf_log.append(self.pf_buffer[: self.count].to("cpu", copy=True).numpy())
        self.hyper_log = []
        self.count = 0

    def drain(self) -> StepBatch | None:
        if self.sharded:
            self._reduce_pending()
        parts = list(self.spill)
        pf_parts = list(self.pf_log)
        self.spill, self.pf_log = [], []
        if self.count:
            data = self.buffer[: self.count].to("cpu", copy=True).numpy()
            steps = np.array(self.step_log[-self.count :], dtype=np.int64)
            parts.append((data, self.hyper_log, steps))
            if self.pf_buffer is not None:
                pf_parts.append(self.pf_buffer[: self.count].to("cpu", copy=True).numpy())
        self.hyper_log = []
        self.step_log = []
        self.count = 0
        if not parts:
            return None
        data = np.concatenate([p[0] for p in parts])
        raw_hyper = [h for p in parts for h in p[1]]
        missing, self.missing_log = self.missing_log, []
        steps = np.concatenate([p[2] for p in parts])
        n_t = len(self.tensors)
        if self.inverse_order is not None:
            data = data.reshape(len(data), self.columns, n_t)[:, :, self.inverse_order].reshape(len(data), -1)
        w_sq, d_sq = data[:, :n_t], data[:, n_t : 2 * n_t]
        dw = data[:, 2 * n_t : 3 * n_t] if self.cross else None
        g_sq = data[:, self.col_g * n_t : (self.col_g + 1) * n_t]
        if self.last_norm_sq is None:
            self.last_norm_sq = self.initial.to("cpu", copy=True).numpy()  # (summed over shards already)
        if self.col_before is not None:
            before = data[:, self.col_before * n_t : (self.col_before + 1) * n_t]
        else:
            before = np.concatenate([self.last_norm_sq[None, :], w_sq[:-1]], axis=0)
        self.last_norm_sq = w_sq[-1].copy()
        if any(missing):
            d_sq = d_sq.copy()
            g_sq = g_sq.copy()
            dw = dw.copy() if dw is not None else None
            for r, miss in enumerate(missing[-len(d_sq) :]):
                d_sq[r, miss] = np.nan
                g_sq[r, miss] = np.nan
                if dw is not None:
                    dw[r, miss] = np.nan
        keys = self.rule.keys
        hyper = [[self.rule.hyper({**self.settings, **dict(zip(keys, (_thaw(v) for v in group)))}) for group in step] for step in raw_hyper]
        if self.momentum_path:
            # ‖w_{t+1} − w_t‖ = η·‖buf‖ with the lr of the step (read inside the post-hook, before the
            # scheduler moved it).
            lr = np.array([[g.get("lr", math.nan) for g in step] for step in hyper], dtype=np.float64)
            d_sq = d_sq * lr[:, self.tensor_group] ** 2
            if dw is not None:
                dw = dw * lr[:, self.tensor_group]
        diff_u = None
        if dw is not None:
            # ‖w_t‖² − ‖w_{t+1}‖² = 2⟨d, w_{t+1}⟩ + ‖d‖² exactly, with d = w_t − w_{t+1}
            diff = 2.0 * dw + d_sq
            before = w_sq + diff
            diff_u = self._to_units(diff)
        before_u, after_u, upd_u, grad_u = (self._to_units(x) for x in (before, w_sq, d_sq, g_sq))
        filter_rms = self._filter_rms(np.concatenate(pf_parts), hyper) if pf_parts else None
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
            norm_sq_change=-diff_u if diff_u is not None else after_u - before_u,
        )

    def _to_units(self, x: np.ndarray) -> np.ndarray:
        out = np.zeros((x.shape[0], len(self.units)))
        np.add.at(out.T, self.tensor_local_unit, x.T)
        return out

    def _filter_rms(self, pf: np.ndarray, hyper: list[list[dict[str, float]]]) -> np.ndarray:
        """RMS over the filters (or groups) of each unit of the per-filter angular updates: ``[k, n]``."""
        total = sum(self.pf_rows)
        w_sq, d_sq = pf[:, :total], pf[:, total : 2 * total]
        if self.pf_last is None:
            self.pf_last = self.pf_initial.to("cpu", copy=True).numpy()
        if self.stride > 1:
            before = pf[:, 2 * total :]
        else:
            before = np.concatenate([self.pf_last[None, :], w_sq[:-1]], axis=0)
        self.pf_last = w_sq[-1].copy()
        if self.momentum_path:
            lr = np.array([[g.get("lr", math.nan) for g in step] for step in hyper], dtype=np.float64)
            reps = np.repeat(np.array([self.tensor_group[t] for t in self.pf_tensors]), self.pf_rows)
            d_sq = d_sq * lr[:, reps] ** 2
        k = pf.shape[0]
        out = np.full((k, len(self.units)), np.nan)
        # sum the tensors of a unit filter by filter, then filters into groups
        offsets = np.concatenate([[0], np.cumsum(self.pf_rows)])
        per_unit: dict[int, list[int]] = {}
        for j, t in enumerate(self.pf_tensors):
            per_unit.setdefault(self.tensor_unit_local[t], []).append(j)
        for u, js in per_unit.items():
            rows = self.pf_rows[js[0]]
            if any(self.pf_rows[j] != rows for j in js):
                continue
            b = sum(before[:, offsets[j] : offsets[j + 1]] for j in js)
            a = sum(w_sq[:, offsets[j] : offsets[j + 1]] for j in js)
            d = sum(d_sq[:, offsets[j] : offsets[j + 1]] for j in js)
            group = self.filter_of[self.pf_tensors[js[0]]][1]
            if group > 1 and rows % group == 0:
                b, a, d = (x.reshape(k, rows // group, group).sum(2) for x in (b, a, d))
            angles = angles_from_norms(b, a, d)
            out[:, u] = np.sqrt(np.nanmean(angles**2, axis=1))
        return out


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
        if int(every_n_steps) < 1:
            raise ValueError(f"every_n_steps must be >= 1, got {every_n_steps}")
        self.every_n_steps = int(every_n_steps)
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
        return sum(s.count + sum(len(p[2]) for p in s.spill) for s in self.slots)

    def rebase(self) -> None:
        """Re-take snapshots and initial norms before the first step (see :meth:`_Slot.rebase`)."""
        for slot in self.slots:
            slot.rebase()

    def start_at(self, step: int) -> None:
        """Number the steps from ``step`` + 1 (training resumed from a checkpoint without this recorder's state,
        or a second fit of one Trainer: the steps keep the Trainer's count). Only before the first step."""
        for slot in self.slots:
            if slot.steps_taken == slot.start_step:
                slot.steps_taken = slot.start_step = int(step)

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
            slot.snapshot = None
            slot.flat = None


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
