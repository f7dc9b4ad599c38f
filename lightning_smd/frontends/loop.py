"""What :class:`~lightning_smd.SMDMonitor` needs around a hand-written loop (or Lightning Fabric's): the user's module
and optimizers behind their wrappers, checked, and the numerical check of invariance hooked before the first optimizer
step. Nothing here imports Lightning (Fabric's wrappers are read by their attributes).
"""

from __future__ import annotations

from typing import Any

import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook
from torch.utils.hooks import RemovableHandle

from lightning_smd.analysis.theory import unwrap_optimizer
from lightning_smd.engine.session import eval_mode_batch_norms
from lightning_smd.options import OptionError

__all__ = ["inner_model", "checked_optimizers", "hook_verification"]


def inner_model(model: Any) -> torch.nn.Module:
    """The user's module behind Fabric's ``_FabricModule`` and (Distributed)DataParallel; anything but a
    ``torch.nn.Module`` is an :class:`~lightning_smd.options.OptionError`."""
    if not isinstance(model, torch.nn.Module):
        raise OptionError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    for _ in range(4):
        inner = getattr(model, "_original_module", None)  # lightning Fabric
        if isinstance(inner, torch.nn.Module):
            model = inner
            continue
        if type(model).__name__ in ("DistributedDataParallel", "DataParallel") and isinstance(getattr(model, "module", None), torch.nn.Module):
            model = model.module
            continue
        break
    return model


def checked_optimizers(optimizers: Any) -> list[torch.optim.Optimizer]:
    """The optimizers given (one, or a list of them) behind Fabric's wrappers; anything else (a class, an empty list)
    is an :class:`~lightning_smd.options.OptionError`."""
    opts = [optimizers] if not isinstance(optimizers, (list, tuple)) else list(optimizers)
    unwrapped = [unwrap_optimizer(o) for o in opts]
    if not unwrapped or any(not hasattr(o, "param_groups") or isinstance(o, type) for o in unwrapped):
        shown = next((o for o in unwrapped if not hasattr(o, "param_groups") or isinstance(o, type)), optimizers)
        raise OptionError(f"optimizers must be a torch.optim.Optimizer (built on the model's parameters) or a non-empty list of them, got {shown!r}")
    return unwrapped


def hook_verification(monitor: Any, named: dict[str, torch.Tensor]) -> RemovableHandle | None:
    """Hook the numerical check of invariance before the first step of one of ``monitor``'s optimizers, if its
    session still has it to do; the handle, for the monitor to remove once the check is done (never from inside the
    hook). A global pre-hook runs before the optimizers' own hooks, so the check may rebuild the recorder (and its
    hooks) from inside it."""
    return register_optimizer_step_pre_hook(_VerifyHook(monitor, named)) if monitor.session.verify_pending else None


class _VerifyHook:
    """The numerical check of invariance before the first step of one of the monitor's optimizers (a global
    optimizer pre-hook; removed at the next :meth:`SMDMonitor.update`, never from inside itself)."""

    def __init__(self, monitor: Any, named: dict[str, torch.Tensor]) -> None:
        self.monitor = monitor
        self.named = named

    def __call__(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        session = self.monitor.session
        if session.verify_pending and any(optimizer is o for o in self.monitor.optimizers):
            session.eval_norms = eval_mode_batch_norms(self.monitor.model)
            session.verify(self.named)
