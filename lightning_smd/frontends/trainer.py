"""What :class:`~lightning_smd.SMDCallback` reads from and writes to a Lightning Trainer, without importing Lightning
(the objects are read by their attributes and class names, so both Lightning namespaces are served): the step a batch
logs at, the steps planned, a debug run, the log directory, a strategy it cannot measure; a log step's metrics handed
to the loggers, the callback metrics and the progress bar; the W&B workspace; how every rank takes one decision and
how a warning is shown once.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any

import torch

from lightning_smd.analysis.keys import AGGREGATES, key
from lightning_smd.messages import SMDWarning

#: A Lightning Trainer of either namespace (``pytorch_lightning`` or ``lightning.pytorch``), read by its attributes.
Trainer = Any

__all__ = [
    "logger_step",
    "optimizer_steps",
    "planned_steps",
    "debug_run",
    "log_dir",
    "unsupported_strategy",
    "fsdp1_group",
    "publish",
    "save_wandb_workspace",
    "every_rank",
    "rank_zero_emitter",
    "describe",
]


def logger_step(trainer: Trainer) -> int:
    """The step Lightning logs the current batch's metrics at (``_batches_that_stepped``)."""
    step = getattr(trainer.fit_loop.epoch_loop, "_batches_that_stepped", None)
    return int(step) if step is not None else max(int(trainer.global_step) - 1, 0)


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


def log_dir(trainer: Trainer) -> str:
    """The first logger's directory, else ``default_root_dir``. Unlike ``trainer.log_dir`` this issues no
    collective (``trainer.log_dir`` broadcasts from rank zero, which hangs when called on one rank only)."""
    for logger in trainer.loggers:
        d = getattr(logger, "log_dir", None) or getattr(logger, "save_dir", None)
        if d:
            return str(d)
    return trainer.default_root_dir


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
