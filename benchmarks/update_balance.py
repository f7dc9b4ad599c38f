"""Where a layer's deviation from the closed form comes from: the direction of its update, or its norm's drift.

    python benchmarks/update_balance.py                  # 10 seeds per cell, 2 worker processes
    python benchmarks/update_balance.py --seeds 3 --cells thin-adamw

The closed-form Δ* assumes the update is isotropic white noise around the sphere. With a decoupled weight decay
the step splits exactly into decay and update, and a stationary norm gives ``Δ_c² = (2e − e²)(1 − ρ)/(1 +
(1 − e)κ)`` with the update's measured inward pull ``κ = −2⟨w, ηu⟩/‖ηu‖²`` and radial share ``ρ``
(``Diagnostics._balance``). That is an accounting identity — ``Δ_c`` restates the measured angle up to the norm's
drift — so it is not evidence of a prediction; what it gives is the attribution: ``direction_ratio = Δ_c/Δ*`` is
the part of the steady ``Δ/Δ*`` due to the update's direction (gradient statistics beyond white noise), and
``balance_drift`` (``δ/(2e)``, ``δ`` the relative drift of ``‖w‖²`` per step) the part due to a norm not yet
stationary: ``steady ratio ≈ direction_ratio·(1 + balance_drift/2)``. Every run is a real
``pytorch_lightning.Trainer`` fit with ``SMDCallback`` on the persistent-noise tasks of :mod:`lightning_smd.demo`
(as ``verdict_reliability.py``'s healthy cells); the script prints both ratios, ``κ``, the drift, and how well
the accounting closes.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from quiet import mean_range, run_all

#: cell -> (task, optimizer, lr, weight decay of the normalized weights, steps): ≥ 12 relaxation times 1/(2ηλ)
CELLS: dict[str, tuple[str, str, float, float, int]] = {
    "thin-adamw": ("thin", "adamw", 0.01, 0.4, 1600),  # τ = 125: verdict_reliability's healthy AdamW cell
    "thin-adamw-wd0.1": ("thin", "adamw", 0.01, 0.1, 6000),  # τ = 500
    "head-adamw": ("head", "adamw", 0.01, 0.4, 1600),
    "thin-lion": ("thin", "lion", 3e-4, 4e-3 / 3e-4, 1600),
    "head-lion": ("head", "lion", 3e-4, 4e-3 / 3e-4, 1600),
}


def run(cell: str, seed: int) -> dict[str, Any]:
    import torch

    from lightning_smd import SMDCallback
    from quiet import fit_demo_task

    task, optimizer, lr, wd, steps = CELLS[cell]

    def make(groups: Any) -> Any:
        if optimizer == "lion":
            from lion_pytorch import Lion

            return Lion(groups, lr=lr)
        return torch.optim.AdamW(groups, lr=lr)

    smd = SMDCallback(verbose=False, summary_path=False, log_every_n_steps=50)
    start = time.perf_counter()
    fit_demo_task(task, make, wd, seed, steps, smd)
    s = smd.summary()
    keys = ("name", "numel", "state", "steady_ratio", "direction_ratio", "update_kappa", "update_radial_share", "balance_drift")
    return {
        "cell": cell,
        "seed": seed,
        "verdict": s["verdict"],
        "seconds": time.perf_counter() - start,
        "layers": [{k: r.get(k) for k in keys} for r in s["layers"]],
    }


def report(results: list[dict[str, Any]]) -> str:
    lines = [
        "| cell | layer | weights | steady Δ/Δ* (closed form) | direction_ratio (measured κ, ρ) | κ | balance_drift δ/(2e) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    worst = 0.0
    for cell in CELLS:
        runs = [r for r in results if r["cell"] == cell]
        if not runs:
            continue
        for name in [layer["name"] for layer in runs[0]["layers"]]:
            rows = [layer for r in runs for layer in r["layers"] if layer["name"] == name]
            closed = [x["steady_ratio"] for x in rows if x["steady_ratio"] is not None]
            direction = [x["direction_ratio"] for x in rows if x["direction_ratio"] is not None]
            kappa = [x["update_kappa"] for x in rows if x["update_kappa"] is not None]
            drift = [x["balance_drift"] for x in rows if x["balance_drift"] is not None]
            for x in rows:  # how well steady ≈ direction·(1 + drift/2) closes
                if None not in (x["steady_ratio"], x["direction_ratio"], x["balance_drift"]):
                    worst = max(worst, abs(x["steady_ratio"] / (x["direction_ratio"] * (1.0 + x["balance_drift"] / 2.0)) - 1.0))
            k = f"{sum(kappa) / len(kappa):.1f}" if kappa else "-"
            lines.append(f"| {cell} | {name} | {rows[0]['numel']} | {mean_range(closed)} | {mean_range(direction)} | {k} | {mean_range(drift)} |")
    verdicts = sum(r["verdict"] == "equilibrium" for r in results)
    lines.append("")
    lines.append(
        f"{len(results)} runs, {verdicts} with verdict equilibrium; "
        f"the accounting closes to {worst:.4f} (largest |steady / (direction·(1 + drift/2)) − 1|)"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--cells", nargs="*", default=list(CELLS), choices=list(CELLS))
    parser.add_argument("--json", help="also write every run's per-layer figures here")
    args = parser.parse_args(argv)
    todo = [(c, s) for c in args.cells for s in range(args.seeds)]
    start = time.perf_counter()
    results = run_all(run, todo, args.workers, args.json)
    print(report(results))
    print(f"\n{time.perf_counter() - start:.0f} s on {args.workers} worker(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
