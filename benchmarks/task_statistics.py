"""What the verdict sweep's task does to the statistics a forecast made at step 50 holds fixed.

    python benchmarks/task_statistics.py            # seed 0 of two sweep cells: about 1 min on 2 cores
    python benchmarks/task_statistics.py --seed 3

Runs two cells of ``benchmarks/verdict_reliability.py --schedules`` (task ``head``: a ``Linear → BatchNorm1d`` head
on a TeacherStream with 20 % label noise) and prints, per tracked layer:

- SGD with momentum, warm-up + cosine: the gradient statistic ``L = ‖g‖²‖w‖²`` (25-step means) along the run, which
  SGD's equilibrium norm follows (``‖w*‖ ∝ L^(1/4)``); and ``Δ²‖w‖²(1 − α²)/(η²‖g‖²)``, the update's mean square
  over what uncorrelated gradients give (1: the gradient is noise; up to ``(1 + α)/(1 − α)`` = 19 for a persistent
  mean gradient), as the range of its 100-step means past step 100.
- Lion, WSD: the memory ``A`` of its sign update (``theory._lion_memory``: the pull of past updates on the norm,
  ``‖w*‖² = η²n(1 + 2A)/(1 − d²)``) read from the measured ``⟨w, u⟩`` of every step as ``−d⟨w, u⟩/(η‖u‖²)``
  (100-step means), next to the white-noise theory's ``A``. The early steps are left out: there the initial weights'
  part of ``⟨w, u⟩`` dominates, and in the decay the memory holds the earlier, larger learning rates.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from typing import Any

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))


def _capture() -> list[tuple[Any, ...]]:
    """Record, at every step the trajectory follows, each unit's learning rate, decoupled decay, ‖w‖², ⟨w, u⟩, ‖u‖²."""
    from lightning_smd.analysis import following

    records: list[tuple[Any, ...]] = []
    original = following.Following._observe_update

    def observe(self: Any, plan: Any, batch: Any, r: int, hyper: Any, e: np.ndarray) -> None:
        if batch.norm_sq_change is not None:
            lr = np.array([float(hyper[int(g)].get("lr", math.nan)) for g in batch.unit_group])
            a, q = batch.norm_sq_before[r], batch.update_sq[r]
            c = 0.5 * (batch.norm_sq_change[r] - q)  # ⟨w, δw⟩ with δw = −e·w − η·u
            with np.errstate(divide="ignore", invalid="ignore"):
                records.append((int(batch.steps[r]), lr, e.copy(), -(c + e * a) / lr, (q + 2.0 * e * c + e * e * a) / (lr * lr)))
        original(self, plan, batch, r, hyper, e)

    following.Following._observe_update = observe  # type: ignore[method-assign]
    return records


def _histories(optimizer: str, condition: str, seed: int) -> tuple[dict[str, Any], dict[str, dict[str, np.ndarray]]]:
    """Run one sweep cell, keeping the callback: its result and each layer's per-step history."""
    import lightning_smd.frontends.callback as cb
    import verdict_reliability as vr

    kept: dict[str, Any] = {}
    init = cb.SMDCallback.__init__

    def keep(self: Any, *a: Any, **k: Any) -> None:
        init(self, *a, **k)
        kept["smd"] = self

    cb.SMDCallback.__init__ = keep  # type: ignore[method-assign]
    try:
        result = vr.run_cell("head", optimizer, condition, seed)
    finally:
        cb.SMDCallback.__init__ = init  # type: ignore[method-assign]
    smd = kept["smd"]
    return result, {row["name"]: {k: np.asarray(v) for k, v in smd.diagnostics.unit_history(row["name"]).items()} for row in result["layers"]}


def sgd_report(seed: int) -> list[str]:
    result, hist = _histories("sgd_momentum", "cosine", seed)
    marks = (50, 150, 250, 400, 600, 900, 1200, 1500)
    out = [f"SGD with momentum 0.9, warm-up + cosine, seed {seed} (verdict {result['verdict']}):", ""]
    out.append("| layer | " + " | ".join(f"L at {m}" for m in marks) + " | update over uncorrelated (100-step means past step 100) |")
    out.append("| --- |" + " --- |" * (len(marks) + 1))
    for name, h in hist.items():
        g, w, d, lr, steps = h["grad_norm"], h["weight_norm"], h["angular_update"], h["lr"], h["steps"]
        L = (g * w) ** 2
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = d**2 * w**2 * (1.0 - 0.9**2) / (lr**2 * g**2)
        mean25 = np.convolve(L, np.ones(25) / 25.0, "same")
        means = [np.nanmean(ratio[k : k + 100]) for k in range(int(np.searchsorted(steps, 100)), len(ratio) - 100, 100)]
        cells = " | ".join(f"{mean25[min(int(np.searchsorted(steps, m)), len(L) - 1)]:.3g}" for m in marks)
        out.append(f"| {name} | {cells} | {min(means):.2f}–{max(means):.2f} |")
    return out


def lion_report(seed: int, records: list[tuple[Any, ...]]) -> list[str]:
    from lightning_smd.analysis.theory import _lion_memory

    records.clear()
    result, _ = _histories("lion", "wsd", seed)
    steps = np.array([r[0] for r in records])
    lr, e, wu, usq = (np.array([r[i] for r in records]) for i in (1, 2, 3, 4))
    marks = (400, 600, 800, 1000, 1200)
    out = ["", f"Lion, WSD (constant from step 100 to 1,280), seed {seed} (verdict {result['verdict']}): the memory A, measured / theory", ""]
    out.append("| layer | " + " | ".join(f"A at {m}" for m in marks) + " |")
    out.append("| --- |" + " --- |" * len(marks))
    for j, row in enumerate(result["layers"]):
        with np.errstate(divide="ignore", invalid="ignore"):
            a = -(1.0 - e[:, j]) * wu[:, j] / (lr[:, j] * usq[:, j])
        cells = []
        for m in marks:
            i = int(np.searchsorted(steps, m))
            theory = _lion_memory(float(lr[i, j]), float(e[i, j] / lr[i, j]), 0.9, 0.99)[0]
            cells.append(f"{np.nanmean(a[max(i - 100, 0) : i]):.1f} / {theory:.1f}")
        out.append(f"| {row['name']} | " + " | ".join(cells) + " |")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    sys.path.insert(0, HERE)
    sys.path.insert(0, os.path.dirname(HERE))
    records = _capture()
    lines = sgd_report(args.seed) + lion_report(args.seed, records)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
