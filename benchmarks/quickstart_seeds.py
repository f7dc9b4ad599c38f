"""The quickstart's figures that the README quotes, per seed and over the seeds: the steady Δ/Δ* of each convolution,
its drift, and its weight norm against the norm predicted from the measured gradient statistics.

    python benchmarks/quickstart_seeds.py                          # seeds 0-9, full size (2,000 steps, ~40 s a seed on 2 cores)
    python benchmarks/quickstart_seeds.py --seeds 0 --steps 300    # a quick look

Each seed is ``examples/quickstart.py --seed S`` in a fresh interpreter, in its own temporary directory; the figures
are read from its ``smd_summary.json``: ``steady_ratio`` (the judged window's mean Δ/Δ*), ``drift`` (of Δ/Δ*, per
relaxation time), and ``weight_norm / predicted_weight_norm`` (both smoothed over the last 50 steps, as in the
table the quickstart prints).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_seed(python: str, seed: int, steps: int | None, timeout: int) -> dict:
    """One quickstart run's summary."""
    env = {k: v for k, v in os.environ.items() if k != "SMD_EXAMPLE_FAST"}
    env.setdefault("PYTHONWARNINGS", "ignore")
    with tempfile.TemporaryDirectory(prefix="smd_quickstart_") as tmp:
        out = Path(tmp) / "run"
        args = [python, str(ROOT / "examples" / "quickstart.py"), "--out", str(out), "--seed", str(seed)]
        if steps is not None:
            args += ["--steps", str(steps)]
        proc = subprocess.run(args, cwd=tmp, env=env, capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            raise RuntimeError(f"seed {seed} failed:\n{(proc.stdout + proc.stderr)[-2000:]}")
        return json.loads((out / "smd_summary.json").read_text())


def figures(summary: dict) -> dict:
    """Per seed: the ranges over the layers (None where a layer was not judged steady)."""
    layers = summary["layers"]
    steady = [row["steady_ratio"] for row in layers]
    drift = [row["drift"] for row in layers]
    norm = [row["weight_norm"] / row["predicted_weight_norm"] for row in layers]
    judged = all(v is not None for v in steady + drift)
    return {
        "verdict": summary["verdict"],
        "steps": summary["steps"],
        "delta_star": layers[0]["predicted_angular_update"],
        "steady": (min(steady), max(steady)) if judged else None,
        "drift": max(abs(v) for v in drift) if judged else None,
        "norm": (min(norm), max(norm)),
    }


def _range(pair: tuple[float, float] | None) -> str:
    return "-" if pair is None else f"{pair[0]:.3f}–{pair[1]:.3f}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", nargs="+", type=int, default=list(range(10)))
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps (default: the quickstart's 2,000)")
    parser.add_argument("--python", default=sys.executable, help="the interpreter to run the quickstart with")
    parser.add_argument("--timeout", type=int, default=1800, help="seconds per run")
    args = parser.parse_args(argv)
    print(f"examples/quickstart.py over seeds {args.seeds}\n")
    print("| seed | steps | verdict | Δ* (rad/step) | steady Δ/Δ* | max abs drift per τ | |w| / predicted |w| |")
    print("|---|---|---|---|---|---|---|")
    rows = []
    for seed in args.seeds:
        r = figures(run_seed(args.python, seed, args.steps, args.timeout))
        rows.append(r)
        drift = "-" if r["drift"] is None else f"{r['drift']:.3f}"
        print(f"| {seed} | {r['steps']} | {r['verdict']} | {r['delta_star']:.4f} | {_range(r['steady'])} | {drift} | {_range(r['norm'])} |", flush=True)
    steady = [r["steady"] for r in rows if r["steady"]]
    drifts = [r["drift"] for r in rows if r["drift"] is not None]
    verdicts = ", ".join(f"{v} {sum(r['verdict'] == v for r in rows)}" for v in sorted({r["verdict"] for r in rows}))
    print(f"\nover {len(rows)} seeds: verdicts {verdicts}")
    print(f"steady Δ/Δ*: {_range((min(s[0] for s in steady), max(s[1] for s in steady)) if steady else None)}")
    print(f"max abs drift per τ: {max(drifts):.3f}" if drifts else "max abs drift per τ: -")
    print(f"|w| / predicted |w|: {_range((min(r['norm'][0] for r in rows), max(r['norm'][1] for r in rows)))}")


if __name__ == "__main__":
    main()
