"""Every example in its CI size and its full size: the verdict, the margins it had, and the time it took.

    python benchmarks/examples.py                                  # both sizes, seed 0 (README's examples table)
    python benchmarks/examples.py --sizes fast --seeds 0 1 2 3 4   # the CI sizes over 5 seeds (the tests' margins)
    python benchmarks/examples.py --only resnet ddp --python /path/to/fresh/venv/bin/python

Each run is a fresh interpreter in its own temporary directory (``SMD_EXAMPLE_FAST=1`` for the CI size), timed
from start to exit: imports, detection, training, the summary. Per run it prints the verdict, how many layers
ended in equilibrium, the worst drift margin (the largest of ``|drift|`` and ``t·se`` of Δ/Δ* and of the norm,
over the layers, as a share of the limit: below 1 passes), the range of the steady Δ/Δ* and of the weight norm over
the norm predicted from the measured gradient statistics (``‖w‖ / predicted ‖w‖``, both smoothed over the last 50
steps, as in the table the examples print). Then one line per example and size over the seeds.

The CI gate (``examples/ci_gate``) is a pytest file with its own seed and one size; it runs once per size.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"

#: name -> the arguments of one run, given its output directory and seed
RUNS = {
    "quickstart": lambda out, seed: [EXAMPLES / "quickstart.py", "--out", out, "--seed", seed],
    "resnet": lambda out, seed: [EXAMPLES / "resnet.py", "--out", out, "--seed", seed],
    "transformer_qknorm": lambda out, seed: [EXAMPLES / "transformer_qknorm.py", "--out", out, "--seed", seed],
    "ddp": lambda out, seed: [EXAMPLES / "ddp.py", "--out", out, "--seed", seed],
    "plain_pytorch": lambda out, seed: [EXAMPLES / "plain_pytorch.py", "--summary", Path(out) / "smd_summary.json", "--seed", seed],
    "ci_gate": None,  # a pytest file: see run_ci_gate
}


def margins(summary: dict) -> dict:
    """The figures of one run's summary."""
    layers = summary["layers"]
    limit = summary["criteria"]["drift_limit"]

    def worst(layer: dict) -> float:
        def num(key: str) -> float:  # None (not judged) -> nan; 0.0 stays 0.0
            value = layer.get(key)
            return float("nan") if value is None else float(value)

        q = num("quantile")
        values = [abs(num("drift")), abs(num("norm_drift")), q * num("drift_se"), q * num("norm_drift_se")]
        return max(values) / limit if all(v == v for v in values) else float("inf")  # nan: not judged

    steady = [layer["steady_ratio"] for layer in layers if layer.get("steady_ratio") is not None]
    norm = [layer["weight_norm"] / layer["predicted_weight_norm"] for layer in layers if layer.get("weight_norm") and layer.get("predicted_weight_norm")]
    return {
        "verdict": summary["verdict"],
        "steps": summary["steps"],
        "in_equilibrium": f"{sum(bool(layer['in_equilibrium']) for layer in layers)}/{len(layers)}",
        "worst_drift": max((worst(layer) for layer in layers), default=float("nan")),
        "steady": (min(steady), max(steady)) if steady else None,
        "norm": (min(norm), max(norm)) if norm else None,
    }


def run_example(python: str, name: str, size: str, seed: int, timeout: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "SMD_EXAMPLE_FAST"}
    if size == "fast":
        env["SMD_EXAMPLE_FAST"] = "1"
    env.setdefault("PYTHONWARNINGS", "ignore")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(EXAMPLES), env.get("PYTHONPATH", "")]))
    with tempfile.TemporaryDirectory(prefix=f"smd_{name}_") as tmp:
        out = Path(tmp) / "run"
        if RUNS[name] is None:
            args = ["-m", "pytest", "-q", "-p", "no:cacheprovider", str(EXAMPLES / "ci_gate")]
        else:
            args = [str(a) for a in RUNS[name](str(out), str(seed))]
        start = time.perf_counter()
        proc = subprocess.run([python, *args], cwd=tmp, env=env, capture_output=True, text=True, timeout=timeout)
        seconds = time.perf_counter() - start
        if proc.returncode != 0:
            return {"error": (proc.stdout + proc.stderr)[-600:], "seconds": seconds}
        if RUNS[name] is None:
            passed = "1 passed" in proc.stdout
            return {"verdict": "equilibrium (gate passed)" if passed else "gate failed", "seconds": seconds}
        result = margins(json.loads((out / "smd_summary.json").read_text()))
        result["seconds"] = seconds
        return result


def _fmt_steady(steady: tuple[float, float] | None) -> str:
    return "-" if steady is None else f"{steady[0]:.3f}–{steady[1]:.3f}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=["fast", "full"], choices=["fast", "full"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--only", nargs="+", default=list(RUNS), choices=list(RUNS))
    parser.add_argument("--python", default=sys.executable, help="the interpreter to run the examples with")
    parser.add_argument("--timeout", type=int, default=3600, help="seconds per run")
    args = parser.parse_args(argv)
    print(f"examples with {args.python}, {os.cpu_count()} CPUs; sizes {args.sizes}, seeds {args.seeds}\n")
    print("| example | size | seed | steps | verdict | layers in equilibrium | worst drift / limit | steady Δ/Δ* | ‖w‖ / predicted ‖w‖ | time (s) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    table: dict[tuple[str, str], list[dict]] = {}
    for name in args.only:
        for size in args.sizes:
            for seed in args.seeds if RUNS[name] is not None else args.seeds[:1]:
                r = run_example(args.python, name, size, seed, args.timeout)
                table.setdefault((name, size), []).append(r)
                if "error" in r:
                    print(f"| {name} | {size} | {seed} | - | ERROR | - | - | - | - | {r['seconds']:.0f} |\n{r['error']}")
                elif "steps" not in r:
                    print(f"| {name} | {size} | {seed} | - | {r['verdict']} | - | - | - | - | {r['seconds']:.0f} |")
                else:
                    print(
                        f"| {name} | {size} | {seed} | {r['steps']} | {r['verdict']} | {r['in_equilibrium']} | {r['worst_drift']:.2f} "
                        f"| {_fmt_steady(r['steady'])} | {_fmt_steady(r['norm'])} | {r['seconds']:.0f} |",
                        flush=True,
                    )
    print("\nOver the seeds:")
    print("| example | size | runs | verdicts | worst drift / limit | steady Δ/Δ* | ‖w‖ / predicted ‖w‖ | time (s) |")
    print("|---|---|---|---|---|---|---|---|")
    for (name, size), rs in table.items():
        ok = [r for r in rs if "error" not in r]
        verdicts = ", ".join(f"{v} {sum(r['verdict'] == v for r in ok)}" for v in sorted({r["verdict"] for r in ok}))
        errors = len(rs) - len(ok)
        worst = max((r["worst_drift"] for r in ok if "worst_drift" in r), default=float("nan"))
        steady = [r["steady"] for r in ok if r.get("steady")]
        lo_hi = (min(s[0] for s in steady), max(s[1] for s in steady)) if steady else None
        norms = [r["norm"] for r in ok if r.get("norm")]
        norm = (min(n[0] for n in norms), max(n[1] for n in norms)) if norms else None
        times = [r["seconds"] for r in rs]
        print(
            f"| {name} | {size} | {len(rs)} | {verdicts}{f', errors {errors}' if errors else ''} | {worst:.2f} | {_fmt_steady(lo_hi)} "
            f"| {_fmt_steady(norm)} | {min(times):.0f}–{max(times):.0f} |"
        )


if __name__ == "__main__":
    main()
