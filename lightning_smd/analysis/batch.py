"""What the recorder hands the analysis at a log step: the host-side statistics of the steps one optimizer took.

Plain numpy arrays (and the optimizer's :class:`~lightning_smd.analysis.theory.Rule`): built by
:meth:`lightning_smd.engine.measure.StepRecorder.drain`, read by :class:`lightning_smd.analysis.Diagnostics`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lightning_smd.analysis.theory import Rule

__all__ = ["StepBatch"]


@dataclass
class StepBatch:
    """Host-side statistics of the steps one optimizer took since the last drain.

    Arrays are ``[k, n]``: ``k`` steps, ``n`` units (``unit_index`` gives their positions among all
    tracked units). ``steps`` counts this optimizer's steps (1 = after its first step).
    """

    optimizer_index: int
    unit_index: np.ndarray
    steps: np.ndarray
    norm_sq_before: np.ndarray
    norm_sq_after: np.ndarray
    update_sq: np.ndarray
    grad_sq: np.ndarray
    angular_update: np.ndarray
    hyper: list[list[dict[str, float]]]
    """Per step, per param group of this optimizer (``unit_group`` indexes it): the rule's floats."""
    unit_group: np.ndarray
    rule: Rule
    filter_angular_update_rms: np.ndarray | None = None
    """``[k, n]`` RMS over filters (or groups) of the per-filter angular update; nan where not recorded."""
    filter_angles: dict[int, np.ndarray] | None = None
    """Per column (unit position in ``unit_index``) with per-filter rows, ``[k, filters]`` angular update of each
    filter (or group)."""
    filter_norm_sq: dict[int, np.ndarray] | None = None
    """The same columns' ``[k, filters]`` squared norm of each filter (or group) after each step."""
    filter_grad_stat: dict[int, np.ndarray] | None = None
    """The same columns' ``[k, filters]`` gradient statistic of each filter (or group), ``L_i = ‖g_i‖²·‖w_i‖²`` with
    the norm before the step (nan at a step without gradient)."""
    norm_sq_change: np.ndarray | None = None
    """``‖w_{t+1}‖² − ‖w_t‖²`` (from the cross term ``⟨d, w_{t+1}⟩`` where recorded: no cancellation)."""
