"""What :class:`~lightning_smd.SMDCallback` reads from and writes to a Lightning Trainer, without importing Lightning
(the objects are read by their attributes and class names, so both Lightning namespaces are served): the step a batch
logs at, whether it is a log step, the steps planned, a debug run, the log directory and the summary's path there, a
strategy it cannot measure; the loggers set up, a log step's metrics handed to them, the callback metrics and the
progress bar, the loggers closed and the W&B workspace at the end; how every rank takes one decision, how a warning is
shown once, and what is printed when. Also what the callback keeps about one fit (:class:`FitState`).
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from lightning_smd.analysis.keys import AGGREGATES, key
from lightning_smd.analysis.states import Verdict
from lightning_smd.engine.session import Session
from lightning_smd.frontends.shared import LossSum
from lightning_smd.frontends.weights import FirstBatch
from lightning_smd.io.dashboard import per_layer_mode
from lightning_smd.io.loggers import finish_loggers, setup_loggers
from lightning_smd.io.report import summary_filename
from lightning_smd.messages import SMDWarning

#: A Lightning Trainer of either namespace (``pytorch_lightning`` or ``lightning.pytorch``), read by its attributes.
Trainer = Any

__all__ = [
    "FitState",
    "logger_step",
    "log_interval",
    "is_log_step",
    "optimizer_steps",
    "planned_steps",
    "debug_run",
    "stood_down",
    "log_dir",
    "summary_target",
    "unsupported_strategy",
    "fsdp1_group",
    "prepare_loggers",
    "publish",
    "close_loggers",
    "save_wandb_workspace",
    "every_rank",
    "rank_zero_emitter",
    "describe",
    "print_plan",
]


@dataclass
class FitState:
    """What SMDCallback keeps about one fit of a Trainer besides its session: made anew at every fit start."""

    label: str | None = None
    """None for a Trainer's only (or first, default) SMDCallback, else what tells it from the others."""
    loss: LossSum = field(default_factory=LossSum)
    first: FirstBatch = field(default_factory=FirstBatch)
    summary: dict[str, Any] | None = None
    summary_file: str | None = None
    last_logged_step: int = -1
    logs: int = 0
    heatmap_step: int = -1
    heatmap_seconds: float = 0.0
    """Wall time spent drawing and logging heatmaps in this fit."""
    heatmap_last_seconds: float = 0.0
    heatmaps: int = 0
    """Heatmaps drawn and logged in this fit."""
    started_at: float | None = None
    """``time.perf_counter()`` at train start (the heatmaps' time budget counts from it)."""
    loggers_ready: bool = False
    rebased: bool = False
    finished: bool = False
    schedules: list[Any] | None = None
    """The schedules read ahead at train start (one per optimizer), until the session follows them."""
    forecast_shown: bool = False
    plan_to_print: bool = False
    """The fit-start line of ``print_plan`` is still to be printed (verbose, not a resume)."""


def logger_step(trainer: Trainer) -> int:
    """The step Lightning logs the current batch's metrics at (``_batches_that_stepped``)."""
    step = getattr(trainer.fit_loop.epoch_loop, "_batches_that_stepped", None)
    return int(step) if step is not None else max(int(trainer.global_step) - 1, 0)


def log_interval(trainer: Trainer, own: int | None) -> int:
    """The log interval in optimizer steps: the callback's ``own`` (``log_every_n_steps``), else the Trainer's."""
    return int(own or max(int(trainer.log_every_n_steps or 1), 1))


def is_log_step(trainer: Trainer, interval: int) -> bool:
    """Whether the batch that just ended is a log step: it stepped the optimizer (not one accumulating gradients)
    and ends a log ``interval``, or training stops now."""
    should_accumulate = getattr(trainer.fit_loop.epoch_loop, "_should_accumulate", None)
    if callable(should_accumulate) and should_accumulate():
        return False
    return (logger_step(trainer) + 1) % interval == 0 or bool(trainer.should_stop)


def optimizer_steps(trainer: Trainer) -> int:
    """Steps each optimizer has taken so far: the global step with one optimizer (it counts every optimizer's
    steps), the batches that stepped with several (manual optimization stepping each once per batch)."""
    return int(trainer.global_step) if len(trainer.optimizers) <= 1 else logger_step(trainer)


def planned_steps(trainer: Trainer) -> int | None:
    """The optimizer steps this fit will take, when known."""
    if trainer.max_steps is not None and trainer.max_steps > 0:
        return int(trainer.max_steps)
    try:
        est = trainer.estimated_stepping_batches
    except Exception:  # noqa: BLE001 - an unknown plan just means no warning
        return None
    if est is None or not math.isfinite(float(est)):
        return None
    return int(est)


def debug_run(trainer: Trainer) -> str | None:
    """What makes this fit a debug run too short to be judged by design (``fast_dev_run``,
    ``limit_train_batches=0``), or None."""
    if getattr(trainer, "fast_dev_run", False):
        return f"fast_dev_run={trainer.fast_dev_run}"
    if getattr(trainer, "limit_train_batches", None) == 0:
        return "limit_train_batches=0"
    return None


def stood_down(trainer: Trainer, verdict: Any) -> str | None:
    """The summary's ``gate``: a debug run (:func:`debug_run`) tests the pipeline, not the dynamics; too short to be
    judged, it does not fail the gate, which stands down and says why (a diverged one still does: a NaN in a debug
    run is a real fault). None otherwise."""
    debug = debug_run(trainer)
    return f"stood down: {debug}" if debug and verdict != Verdict.DIVERGED else None


def log_dir(trainer: Trainer) -> str:
    """The first logger's directory, else ``default_root_dir``. Unlike ``trainer.log_dir`` this issues no
    collective (``trainer.log_dir`` broadcasts from rank zero, which hangs when called on one rank only)."""
    for logger in trainer.loggers:
        d = getattr(logger, "log_dir", None) or getattr(logger, "save_dir", None)
        if d:
            return str(d)
    return trainer.default_root_dir


def summary_target(trainer: Trainer, summary_path: Any, label: str | None) -> str:
    """Where the summary JSON goes: ``summary_path`` when it is a path, else ``smd_summary.json`` (``-<label>`` for
    one of several SMDCallbacks) in the log directory."""
    return str(summary_path) if summary_path not in (None, True) else os.path.join(log_dir(trainer), summary_filename(label))


def unsupported_strategy(trainer: Trainer) -> str | None:
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


def fsdp1_group(trainer: Trainer) -> str | None:
    """FSDP1 (Lightning's FSDPStrategy) shards plain tensors (flat views) over the default group."""
    return "world" if type(trainer.strategy).__name__ == "FSDPStrategy" else None


def prepare_loggers(trainer: Trainer, session: Session, per_layer: bool | str, namespace: str) -> None:
    """At the first log step, on rank zero: tell the loggers that keep a layout (W&B's panels, TensorBoard's custom
    scalars) which series are coming, for the layers tracked and ``per_layer`` (the callback's ``log_per_layer``)."""
    if trainer.is_global_zero:
        names = [u.name for u in session.diagnostics.units]  # type: ignore[union-attr]
        setup_loggers(trainer.loggers, names, per_layer_mode(per_layer, len(names)), session.worst_k, session.warn, namespace)


def publish(trainer: Trainer, metrics: dict[str, float], progress: dict[str, str], step: int, namespace: str, warn: Any) -> None:
    """A log step's ``metrics`` to every logger of the Trainer (one that refuses them gets a warning, through ``warn``),
    the two aggregates to ``callback_metrics`` (what ``ModelCheckpoint(monitor=...)`` reads) and ``progress`` to the
    progress bars (TQDM and Rich show ``progress_bar_metrics``, which keeps what is put there)."""
    for logger in trainer.loggers:
        try:
            logger.log_metrics(metrics, step=step)
        except Exception as err:  # noqa: BLE001 - a logger refusing a metric must not stop training
            warn("SMD040", logger=type(logger).__name__, error=f"{type(err).__name__}: {err}")
    for aggregate in (key(name, namespace=namespace) for name in AGGREGATES):
        trainer.callback_metrics[aggregate] = torch.tensor(metrics[aggregate])
    trainer.progress_bar_metrics.update(progress)


def close_loggers(trainer: Trainer, session: Session, summary: dict[str, Any], namespace: str, per_layer: bool | str, *, workspace: bool) -> None:
    """At the end of fit, on rank zero: the summary to the loggers, and with ``workspace`` (the callback's
    ``wandb_workspace``) a W&B workspace for the layers tracked."""
    if not trainer.is_global_zero:
        return
    finish_loggers(trainer.loggers, summary, session.warn, namespace)
    if workspace:
        names = [u.name for u in session.diagnostics.units]  # type: ignore[union-attr]
        save_wandb_workspace(trainer, names, per_layer, session.worst_k, session.warn)


def save_wandb_workspace(trainer: Trainer, names: list[str], per_layer: bool | str, worst_k: int, warn: Any) -> None:
    """Save a W&B workspace for these layers to the project of the Trainer's ``WandbLogger``; without one, offline,
    or failing: a warning (``SMD046``, through ``warn``) that says how to do it later."""
    run = next((logger.experiment for logger in trainer.loggers if "WandbLogger" in {k.__name__ for k in type(logger).__mro__}), None)
    if run is None:
        warn("SMD046", why="the Trainer has no WandbLogger")
        return
    if getattr(getattr(run, "settings", None), "mode", "") in ("offline", "disabled") or not getattr(run, "entity", None):
        warn("SMD046", why="the W&B run is offline")
        return
    try:
        from lightning_smd.io.workspace import build_workspace, save_workspace

        save_workspace(build_workspace(run.entity, run.project, names, per_layer, worst_k))
    except Exception as err:  # noqa: BLE001 - a workspace that cannot be saved must not fail the run
        warn("SMD046", why=f"{type(err).__name__}: {err}")


def every_rank(trainer: Trainer) -> Callable[[bool], bool]:
    """A decision every rank takes alike (true when it is true on any rank), so that none is left waiting in a
    collective."""
    return lambda decision: bool(trainer.strategy.reduce_boolean_decision(decision, all=False))


def rank_zero_emitter(trainer: Trainer, label: str | None = None) -> Callable[[str, str], None]:
    """Warnings are kept on every rank (and in the summary) but shown on rank zero only; with several
    SMDCallbacks, each shown warning says which one it comes from."""

    def emit(message: str, code: str) -> None:
        if trainer.is_global_zero:
            shown = message if label is None else f"SMDCallback {label!r}: {message}"
            warnings.warn(SMDWarning(shown, code), stacklevel=5)

    return emit


def describe(exception: BaseException) -> str:
    """The summary's ``error``: the exception's type and message (Lightning raises a bare SIGTERMException when the
    process receives SIGTERM, and Ctrl-C is a bare KeyboardInterrupt: those are said in words)."""
    name = type(exception).__name__
    text = str(exception)
    if not text and name == "SIGTERMException":
        text = "the process received SIGTERM (training stopped by the Trainer's signal handler)"
    elif not text and isinstance(exception, KeyboardInterrupt):
        text = "interrupted (Ctrl-C)"
    return f"{name}: {text}" if text else name


def print_plan(trainer: Trainer, judgeable_after: tuple[int, str, float] | None) -> None:
    """On rank zero, at fit start: after how many steps of unchanged settings equilibrium can be judged (the
    session's ``judgeable_after``: steps, slowest layer, its relaxation time), next to the steps planned."""
    if trainer.is_global_zero and judgeable_after:
        steps, name, tau = judgeable_after
        planned = planned_steps(trainer)
        print(
            f"SMDCallback: equilibrium can be judged after about {steps} steps of unchanged settings (slowest layer "
            f"{name}, relaxation time {tau:.0f} steps); planned: {planned if planned is not None else 'unknown'} steps"
        )
