"""How evenly the neurons of a layer rotate, by optimizer: the rotation imbalance of AdamW, SGD with momentum and
Adam with an L2 penalty on the benchmark tasks.

    python benchmarks/rotation_balance.py                      # 10 seeds, both tasks, 2 worker processes (~8 min)
    python benchmarks/rotation_balance.py --seeds 2 --tasks thin --json /tmp/rb.json

Every run is a real ``pytorch_lightning.Trainer`` fit with ``SMDCallback(per_filter=True)`` on the persistent-noise
tasks of :mod:`lightning_smd.demo` (``thin``: :class:`ThinConvNet`, ``head``: :class:`HeadNet`, on a
:class:`TeacherStream` with 20 % label noise, as ``verdict_reliability.py``'s healthy cells), weight decay on the
normalized weights only. The summary's ``rotation_imbalance`` of a layer is the coefficient of variation, over its
filters, of each filter's angular update (the root of its 50-step moving average of the square; every filter has
the same Δ*), at the end of the run. Kosson et al. (ICML 2024, "Rotational Equilibrium") predict that AdamW and
SGD balance the rotation of the neurons of a per-filter normalized layer and that Adam with L2 does not.

The script prints, per task, optimizer and layer, the imbalance over the seeds (mean, min–max), then how often Adam
with L2 scores higher than AdamW on the same task, seed and layer (the issue's acceptance: ≥ 80 % of layers).
"""

from __future__ import annotations

import sys
import time
from typing import Any

from quiet import mean_range, run_all, sweep_args

#: optimizer -> (lr, weight decay of the normalized weights): AdamW and SGD-momentum as verdict_reliability's healthy
#: cells (τ = 125 and 200 steps); Adam with an L2 penalty at AdamW's learning rate (its decay acts through Adam's
#: normalization, so no weight decay matches AdamW's exactly: this one reaches its equilibrium within the run)
OPTIMIZERS: dict[str, tuple[float, float]] = {
    "adamw": (0.01, 0.4),
    "sgd_momentum": (0.1, 0.0025),
    "adam_l2": (0.01, 4e-3),
}
TASKS = ("thin", "head")
STEPS = 1600


def run(task: str, optimizer: str, seed: int, steps: int = STEPS) -> dict[str, Any]:
    import functools

    import torch

    from lightning_smd import SMDCallback
    from quiet import fit_demo_task

    lr, wd = OPTIMIZERS[optimizer]
    make = {
        "adamw": functools.partial(torch.optim.AdamW, lr=lr),
        "adam_l2": functools.partial(torch.optim.Adam, lr=lr),  # weight_decay set per group: the L2 penalty
        "sgd_momentum": functools.partial(torch.optim.SGD, lr=lr, momentum=0.9),
    }[optimizer]
    smd = SMDCallback(verbose=False, summary_path=False, log_every_n_steps=50, per_filter=True)
    start = time.perf_counter()
    fit_demo_task(task, make, wd, seed, steps, smd)
    s = smd.summary()
    keys = ("name", "shape", "granularity", "state", "steady_ratio", "rotation_imbalance")
    return {
        "task": task,
        "optimizer": optimizer,
        "seed": seed,
        "verdict": s["verdict"],
        "seconds": time.perf_counter() - start,
        "layers": [{k: r.get(k) for k in keys} for r in s["layers"]],
    }


def comparison(results: list[dict[str, Any]], higher: str = "adam_l2", lower: str = "adamw") -> tuple[int, int]:
    """How many (task, seed, layer) have a larger imbalance under ``higher`` than under ``lower``, of those
    measured under both."""
    by = {(r["task"], r["optimizer"], r["seed"]): {x["name"]: x["rotation_imbalance"] for x in r["layers"]} for r in results}
    wins = total = 0
    for (task, opt, seed), layers in by.items():
        if opt != higher or (task, lower, seed) not in by:
            continue
        other = by[(task, lower, seed)]
        for name, value in layers.items():
            if value is not None and other.get(name) is not None:
                total += 1
                wins += value > other[name]
    return wins, total


def report(results: list[dict[str, Any]]) -> str:
    lines = ["| task | layer | filters | " + " | ".join(f"{o}: imbalance" for o in OPTIMIZERS) + " |", "| --- | --- | ---: |" + " --- |" * len(OPTIMIZERS)]
    for task in TASKS:
        runs = [r for r in results if r["task"] == task]
        if not runs:
            continue
        names = [x["name"] for x in runs[0]["layers"]]
        shapes = {x["name"]: x["shape"][0] for x in runs[0]["layers"]}
        for name in names:
            cells = []
            for opt in OPTIMIZERS:
                values = [x["rotation_imbalance"] for r in runs if r["optimizer"] == opt for x in r["layers"] if x["name"] == name]
                cells.append(mean_range([v for v in values if v is not None]))
            lines.append(f"| {task} | {name} | {shapes[name]} | " + " | ".join(cells) + " |")
    wins, total = comparison(results)
    sgd_wins, sgd_total = comparison(results, "adam_l2", "sgd_momentum")
    verdicts = {o: sum(r["verdict"] == "equilibrium" for r in results if r["optimizer"] == o) for o in OPTIMIZERS}
    runs = {o: sum(r["optimizer"] == o for r in results) for o in OPTIMIZERS}
    lines += [
        "",
        f"Adam with L2 more imbalanced than AdamW: {wins}/{total} layers ({100.0 * wins / max(total, 1):.0f} %); "
        f"than SGD with momentum: {sgd_wins}/{sgd_total} ({100.0 * sgd_wins / max(sgd_total, 1):.0f} %)",
        "verdict equilibrium: " + ", ".join(f"{o} {verdicts[o]}/{runs[o]}" for o in OPTIMIZERS),
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = sweep_args(__doc__, TASKS, OPTIMIZERS, 10, STEPS, argv)
    todo = [(t, o, s, args.steps) for t in args.tasks for o in args.optimizers for s in range(args.seeds)]
    start = time.perf_counter()
    results = run_all(run, todo, args.workers, args.json)
    print(report(results))
    print(f"\n{len(results)} runs, {time.perf_counter() - start:.0f} s on {args.workers} worker(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
