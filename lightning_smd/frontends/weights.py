"""How :class:`~lightning_smd.SMDCallback` finds the weights to track under Lightning, and when: in ``setup``, before
configure_model and the strategy shard or wrap the model; at fit start, from that analysis when it still applies,
else by name (``include=``) when the parameters are sharded already; or from the first training batch, for a model
torch.fx cannot trace (or with lazy parameters): its data flow is recorded and analysed instead (:class:`FirstBatch`,
a small state machine driven by the callback's hooks). Also the parameter names detection uses, and whole tensors of
shards for the numerical check. Nothing here imports Lightning.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from typing import Any

import torch

from lightning_smd.engine.detect import DataFlowRecorder, Detection, detect_from_graph, find_normalized_weights, units_from_patterns
from lightning_smd.engine.measure import local_shard

__all__ = ["FirstBatch", "at_setup", "at_fit_start", "from_flow", "named_parameters", "full_tensor", "is_sharded"]


def at_setup(module: torch.nn.Module, include: Sequence[str], exclude: Sequence[str]) -> Detection | None:
    """The analysis in ``setup``, before the strategy shards or wraps the model (FSDP2 replaces parameters by DTensor
    shards); None when there is nothing to analyse yet (no parameter, or sharded) or it failed (retried at fit start)."""
    try:
        if any(True for _ in module.parameters()) and not is_sharded(module.parameters()):
            return find_normalized_weights(module, include=include, exclude=exclude)
    except Exception:  # noqa: BLE001 - detection is retried at fit start
        pass
    return None


def at_fit_start(module: torch.nn.Module, early: Detection | None, include: Sequence[str], exclude: Sequence[str]) -> Detection:
    """The weights to track at fit start: ``early`` (:func:`at_setup`'s) when its weights are all still there; else
    analysed now."""
    named = named_parameters(module)
    if early is not None and early.units and all(p in named for u in early.units for p in u.params):
        return early
    if not is_sharded(named.values()):
        return find_normalized_weights(module, include=include, exclude=exclude)
    # Layers created in configure_model are sharded before any hook could analyse them, and tracing a sharded model
    # is not safe: only include= can name its weights.
    det = units_from_patterns(module, include, exclude)
    if not det.units:
        det.error = (
            "the model's parameters were already sharded when SMDCallback could first see them (layers created "
            "in configure_model): name the normalized weights with SMDCallback(include=[...]), or create the "
            "layers in __init__ and shard them in configure_model"
        )
    return det


def from_flow(module: torch.nn.Module, flow: DataFlowRecorder, losses: list[Any], include: Sequence[str], exclude: Sequence[str]) -> Detection:
    """Detection from a batch's recorded data flow (:class:`FirstBatch`); a failure is a detection without units
    that says why."""
    try:
        return detect_from_graph(module, flow.graph(losses), include, exclude)
    except Exception as err:  # noqa: BLE001 - never crash the training run over detection
        return Detection(method="none", error=f"the recorded data flow could not be analysed ({type(err).__name__}: {err})")


class _Stage(enum.Enum):
    IDLE = "idle"  # nothing to detect on a batch: detection was done at fit start, or is done
    WAITING = "waiting"  # detection needs a real batch: the next one is recorded
    RECORDING = "recording"  # a batch's data flow is being recorded


class FirstBatch:
    """Deferred detection: for a model torch.fx cannot trace (or with lazy parameters), the data flow of the first
    training batch is recorded and analysed instead. One method per transition:

    ``IDLE`` —:meth:`wait` (fit start)→ ``WAITING`` —:meth:`record` (a batch starts)→ ``RECORDING``
    (:meth:`saw_loss` keeps each loss backpropagated) —:meth:`take`→ ``IDLE``: the recording and its losses are
    handed over for analysis before the batch's optimizer step (one loss, automatic optimization), else at the
    batch's end (several losses, or the loss ``training_step`` returned); a batch without a loss goes back to
    ``WAITING`` (:meth:`stop`, also on an exception), until the third batch is taken as it is."""

    def __init__(self) -> None:
        self.stage = _Stage.IDLE
        self.flow: DataFlowRecorder | None = None
        self.losses: list[Any] = []
        self.batches = 0

    def wait(self) -> None:
        self.stage = _Stage.WAITING

    def record(self, module: torch.nn.Module) -> None:
        if self.stage is _Stage.WAITING:
            self.flow, self.losses, self.stage = DataFlowRecorder(dict(module.named_parameters())), [], _Stage.RECORDING
            self.batches += 1
            self.flow.__enter__()

    def saw_loss(self, loss: torch.Tensor) -> None:
        if self.stage is _Stage.RECORDING:
            self.losses.append(loss)

    def take_before_step(self, automatic: bool) -> tuple[DataFlowRecorder, list[Any]] | None:
        """The recording, when this batch's one loss is known before its optimizer step."""
        return self.take(self.losses) if self.stage is _Stage.RECORDING and self.losses and automatic else None

    def take_at_batch_end(self, outputs: Any) -> tuple[DataFlowRecorder, list[Any]] | None:
        """The recording, at the end of its batch (manual optimization, or a batch without a backward seen)."""
        if self.stage is not _Stage.RECORDING:
            return None
        losses = list(self.losses) or returned_loss(outputs)
        if losses or self.batches >= 3:
            return self.take(losses)
        self.stop()  # nothing to analyse yet (training_step skipped this batch): record the next one
        return None

    def take(self, losses: list[Any]) -> tuple[DataFlowRecorder, list[Any]]:
        flow = self.stop()
        assert flow is not None
        self.stage, self.losses = _Stage.IDLE, []
        return flow, losses

    def stop(self) -> DataFlowRecorder | None:
        """End a recording (back to ``WAITING``); returns it."""
        flow, self.flow = self.flow, None
        if flow is not None:
            flow.__exit__(None, None, None)
            self.stage = _Stage.WAITING
        return flow


def returned_loss(outputs: Any) -> list[torch.Tensor]:
    """The loss ``training_step`` returned, when it can be backpropagated (a tensor, or a dict's ``"loss"``)."""
    if isinstance(outputs, torch.Tensor):
        return [outputs] if outputs.requires_grad else []
    if isinstance(outputs, dict) and isinstance(outputs.get("loss"), torch.Tensor):
        return [outputs["loss"]]
    return []


#: Segments that FSDP1 and activation checkpointing insert into parameter names after setup().
_WRAPPER_SEGMENTS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")


def named_parameters(module: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
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


def full_tensor(t: Any) -> Any:
    """The whole tensor of a DTensor shard (a collective: every rank must call it in the same order)."""
    return t.full_tensor() if t is not None and local_shard(t) is not t else t


def is_sharded(params: Any) -> bool:
    """Whether any of ``params`` is a DTensor shard (FSDP2)."""
    return any(local_shard(p) is not p for p in params)
