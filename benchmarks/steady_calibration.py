"""How well calibrated are the steady-state statistics? Stationary AR(1) series, no training.

    python benchmarks/steady_calibration.py [--series 4000] [--seed 0]

For each per-step autocorrelation ρ, noise level σ and ratio relaxation time τ_r, the script feeds
``--series`` independent stationary AR(1) series around ``Δ/Δ* = 1`` through :class:`lightning_smd.analysis.steady.BlockSeries`
exactly as :class:`lightning_smd.analysis.diagnostics.Diagnostics` does (blocks of ``max(100, 2τ_r)/16`` steps, a window of
``8τ_r`` steps, at least 400) and prints

- how often ``|drift| > t·se`` (the two-sided test at level 1 %: nominal 0.010) — the calibration of the
  standard error, which the decision rule's error rates rest on;
- how often a stationary series would fail the decision rule ``|drift| <= δ and t·se <= δ`` with δ = 0.1 per
  relaxation time and the level 1 %/4 of a run with four layers (nominal ≤ 0.0025 when precise enough);
- how often the steady ratio's confidence interval at level 99 % misses the true mean (nominal 0.010).

The window is ``n`` correlation times long, ``n = window·(1 − ρ)/(1 + ρ)``: the estimates are calibrated when it
holds ≥ 10, and too small (the test anti-conservative) when it holds only a few — that is what the drift
limit's margin and the precision requirement are for.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

import numpy as np


def run(rho: float, sigma: float, tau_r: int, series: int, rng: np.random.Generator) -> dict[str, float]:
    from lightning_smd.analysis.steady import BLOCKS_PER_WINDOW, BlockSeries, drift_within, t_quantile

    window = max(400, 8 * tau_r)
    steps = 2 * window
    block = max(1, max(100, 2 * tau_r) // BLOCKS_PER_WINDOW)
    s = BlockSeries(series)
    units = np.arange(series)
    s.reset(units, np.full(series, block), 0.0, float(window))
    e = rng.standard_normal(series) * sigma
    for t in range(steps):
        e = rho * e + math.sqrt(1 - rho * rho) * sigma * rng.standard_normal(series)
        s.add(units, float(t + 1), 1.0 + e, 0.3 * e)
    fit = s.fit(units, np.full(series, float(window)), 1.0 + 2.0 * tau_r)
    drift, se = tau_r * fit.slope_x / fit.mean_x, tau_r * fit.se_slope_x / fit.mean_x
    q1 = np.array([t_quantile(0.995, d) for d in fit.df])
    q4 = np.array([t_quantile(1 - 0.01 / 8, d) for d in fit.df])
    within, precise = drift_within(drift, se, q4, 0.1)
    return {
        "test": float((np.abs(drift) > q1 * se).mean()),
        "fail": float((~within).mean()),
        "imprecise": float((~precise).mean()),
        "ci_miss": float((np.abs(fit.mean_x - 1.0) > q1 * fit.se_mean_x).mean()),
        "corr_times": window * (1 - rho) / (1 + rho),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--series", type=int, default=4000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    rng = np.random.default_rng(args.seed)
    start = time.perf_counter()
    print(f"stationary AR(1) around 1, {args.series} series per row; window 8 τ_r (at least 400 steps)\n")
    print(
        "| ρ | σ | τ_r | correlation times in the window | test rate (nominal 0.010) "
        "| fails the rule (δ = 0.1, N = 4) | of which imprecise | CI misses (nominal 0.010) |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for rho in (0.0, 0.5, 0.9, 0.97, 0.99):
        for sigma in (0.02, 0.1, 0.3):
            for tau_r in (25, 100, 500):
                r = run(rho, sigma, tau_r, args.series, rng)
                print(
                    f"| {rho:g} | {sigma:g} | {tau_r} | {r['corr_times']:.0f} | {r['test']:.4f} | {r['fail']:.4f} | "
                    f"{r['imprecise']:.4f} | {r['ci_miss']:.4f} |"
                )
    print(f"\n{time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    sys.exit(main())
