"""Dead filters: how many killed filters the per-filter test flags, how fast, and how many healthy ones it flags.

    python benchmarks/dead_filters.py                          # 20 seeds, both tasks, SGD-momentum and AdamW (~20 min)
    python benchmarks/dead_filters.py --seeds 2 --tasks thin --optimizers adamw

Every run is a real ``pytorch_lightning.Trainer`` fit with ``SMDCallback(per_filter=True)`` on the persistent-noise
tasks of :mod:`lightning_smd.demo` (``thin``, ``head``; verdict_reliability's healthy cells: SGD-momentum lr 0.1,
weight decay 2.5e-3, τ = 200 steps; AdamW lr 0.01, weight decay 0.4, τ = 125), 1,600 steps. In the *killed* runs,
a quarter of the channels of ``bn2`` (the BatchNorm after ``conv2``) are cut at step 400: their output is multiplied
by 0 from then on, so ``conv2``'s filters for them get no gradient at all — a ReLU that never fires, a gain set to 0,
a channel nothing reads. At every log step (every 50 steps) the script reads which filters the callback calls dead.

Filters also die on their own: on ``head``, 6–25 of ``fc1``'s 64 neurons end with a ReLU that never fires (their
BatchNorm1d output stays below 0) and get exactly no gradient. So a flag is checked against a ground truth computed
after the fit, independently of the callback: a filter is **dead** when its scale-free gradient
``‖∇w_i‖·‖w_i‖``, averaged over 10 fresh batches in training mode, is below 1e-6 of the layer's median.

They also go quiet for a while and come back. So every flag is checked against the issue's definition, from the
gradients recorded at every step (independently of the callback): a flag at step ``s`` is **confirmed** when the
filter's ``L`` (its squared scale-free gradient), averaged over the 50 steps before ``s``, is below its peak 50-step
average by 100×.

Every figure is at the callback's granularity: where the detection measures a layer in groups of rows, a filter is
a group, its scale-free gradient ``‖∇w_G‖·‖w_G‖`` and dead when every row in it is.

It prints, per task and optimizer, over the seeds: the share of the killed filters flagged within 2 relaxation times
of the cut (the issue's acceptance: ≥ 95 %), the median and largest delay in relaxation times; the false flags
(flags the gradients do not confirm) as a share of the filters that were not cut and not dead at the end, in the
killed runs and in runs with nothing cut (the healthy cells: ≤ 1 %); and how many of the filters that died on their
own (by the end-of-run truth) are flagged at the end.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any

from quiet import run_all, sweep_args

#: optimizer -> (lr, weight decay of the normalized weights, τ = 1/(2e) of the pure decay in steps)
OPTIMIZERS: dict[str, tuple[float, float, float]] = {
    "sgd_momentum": (0.1, 0.0025, 200.0),
    "adamw": (0.01, 0.4, 125.0),
}
TASKS = ("thin", "head")
STEPS = 1600
CUT_AT = 400
LOG_EVERY = 50


def run(task: str, optimizer: str, seed: int, cut: bool, steps: int = STEPS) -> dict[str, Any]:
    import pytorch_lightning as pl
    import torch
    from torch.nn import functional as F
    from torch.utils.data import DataLoader

    from lightning_smd import SMDCallback
    from lightning_smd.demo import HeadNet, TeacherStream, ThinConvNet, decayed_groups
    from quiet import quiet_trainer

    torch.set_num_threads(1)
    lr, wd, _ = OPTIMIZERS[optimizer]
    killed = list(range(0, 32, 4))  # 8 of bn2's 32 channels

    class Task(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = {"thin": ThinConvNet, "head": HeadNet}[task]()
            self.register_buffer("mask", torch.ones(32))
            self.net.bn2.register_forward_hook(lambda _m, _i, out: out * self.mask.view(1, -1, 1, 1))

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            if cut and self.global_step == CUT_AT:  # the optimizer step CUT_AT + 1 is the first without gradient
                self.mask[killed] = 0.0
            x, y = batch
            return F.cross_entropy(self.net(x), y)

        def configure_optimizers(self) -> Any:
            groups = decayed_groups(self.net, wd)
            return torch.optim.AdamW(groups, lr=lr) if optimizer == "adamw" else torch.optim.SGD(groups, lr=lr, momentum=0.9)

    flagged: dict[str, dict[int, int]] = {}  # layer -> filter -> first step flagged

    grad_log: dict[str, list[Any]] = {}  # layer -> per step, the filters' scale-free gradient ‖∇w_i‖·‖w_i‖

    class Watch(pl.Callback):
        def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: Any, optimizer: Any) -> None:
            for n, w in pl_module.net.named_parameters():
                if w.dim() > 1 and w.grad is not None and not n.startswith("fc."):
                    grad_log.setdefault(f"net.{n}", []).append((w.grad.flatten(1).square().sum(1), w.detach().flatten(1).square().sum(1)))

        def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
            d = smd.diagnostics
            if d is None or trainer.global_step % LOG_EVERY:
                return
            for u, unit in enumerate(d.units):
                dead = d.filters.dead(u)
                if dead is not None:
                    for i in dead.nonzero()[0]:
                        flagged.setdefault(unit.name, {}).setdefault(int(i), trainer.global_step)

    torch.manual_seed(seed)
    model = Task()
    smd = SMDCallback(verbose=False, summary_path=False, log_every_n_steps=LOG_EVERY, per_filter=True)
    start = time.perf_counter()
    quiet_trainer(steps, [smd, Watch()]).fit(model, DataLoader(TeacherStream(model.net.input_shape, seed=seed, flip=0.2), batch_size=None))
    layers = smd.summary()["layers"]
    # the callback's filters are groups of rows where the detection found groups: every figure is per group
    group = {layer["name"]: (layer["group_size"] if layer["granularity"] == "group" else 1) for layer in layers}  # rows per group
    filters = {layer["name"]: layer["shape"][0] // group[layer["name"]] for layer in layers}
    truth = _dead_by_gradient(model, TeacherStream(model.net.input_shape, seed=seed + 1000, flip=0.2), [n[4:] for n in filters], group)
    assert group["net.conv2.weight"] == 1, "the cut channels are conv2's filters: it must be measured per filter"
    grad_log = {k: [_grouped(g, w, group[k]) for g, w in v] for k, v in grad_log.items()}
    window = int(OPTIMIZERS[optimizer][2])
    confirmed = {layer: {str(i): _dead_in_window(grad_log[layer], i, step, window) for i, step in got.items()} for layer, got in flagged.items()}
    last = {u.name: (smd.diagnostics.filters.dead(i) if smd.diagnostics is not None else None) for i, u in enumerate(smd.diagnostics.units)}
    return {
        "truth_dead": truth,
        "confirmed": confirmed,
        **({"grad_log": {k: [list(map(float, row)) for row in v] for k, v in grad_log.items()}} if os.environ.get("SMD_DEAD_DEBUG") else {}),
        "flagged_at_end": {k: ([] if v is None else [int(i) for i in v.nonzero()[0]]) for k, v in last.items()},
        "task": task,
        "optimizer": optimizer,
        "seed": seed,
        "cut": cut,
        "killed": killed if cut else [],
        "filters": filters,
        "group": group,
        "flagged": flagged,
        "dead_filters": {layer["name"]: layer.get("dead_filters") for layer in smd.summary()["layers"]},
        "seconds": time.perf_counter() - start,
    }


def _grouped(g_sq: Any, w_sq: Any, size: int) -> Any:
    """The scale-free gradient ``‖∇w_G‖·‖w_G‖`` of each group of ``size`` rows, from the rows' squared norms."""
    return (g_sq.reshape(-1, size).sum(1) * w_sq.reshape(-1, size).sum(1)).sqrt().numpy()


def _dead_in_window(log: list[Any], i: int, step: int, window: int) -> bool:
    """The issue's definition, from the recorded gradients: filter ``i``'s ``L`` (its squared scale-free gradient)
    has fallen by 100× from its peak — its average over the 50 steps before ``step`` is below the largest 50-step
    average before then over 100. (That its norm followed the pure-decay curve over the ``window`` steps before is
    what the callback measured; the gradients cannot say it better.)"""
    import numpy as np

    g2 = np.array([row[i] for row in log[:step]], dtype=np.float64) ** 2
    if len(g2) < 100:
        return False
    means = np.convolve(g2, np.ones(50) / 50, mode="valid")
    return bool(means[-1] <= means.max() / 100.0)


def _dead_by_gradient(model: Any, stream: Any, names: list[str], group: dict[str, int], batches: int = 10) -> dict[str, list[int]]:
    """The ground truth: per layer (``net.<name>``), the filters (groups of ``group[layer]`` rows) whose scale-free
    gradient ``‖∇w_i‖·‖w_i‖``, averaged over ``batches`` fresh batches in training mode, is below 1e-6 of the layer's
    median."""
    import torch
    from torch.nn import functional as F

    params = dict(model.net.named_parameters())
    total = {n: torch.zeros(params[n].shape[0] // group[f"net.{n}"]) for n in names}
    data = iter(stream)
    model.train()
    for _ in range(batches):
        x, y = next(data)
        model.net.zero_grad()
        F.cross_entropy(model.net(x), y).backward()
        for n in names:
            w = params[n]
            total[n] += torch.as_tensor(_grouped(w.grad.flatten(1).square().sum(1), w.detach().flatten(1).square().sum(1), group[f"net.{n}"]))
    if os.environ.get("SMD_DEAD_DEBUG"):
        print({n: sorted(round(float(v), 5) for v in (t / t.median()) if v < 0.2) for n, t in total.items()})
    return {f"net.{n}": [int(i) for i in (t <= 1e-6 * t.median()).nonzero().flatten()] for n, t in total.items()}


def report(results: list[dict[str, Any]]) -> str:
    lines = [
        "| task | optimizer | killed runs | killed filters flagged within 2τ | delay median / max (τ) "
        "| live filters flagged, killed runs | live filters flagged, nothing cut | died on their own: flagged at the end |",
        "| --- | --- | ---: | ---: | --- | ---: | ---: | ---: |",
    ]
    for task in TASKS:
        for opt, (_, _, tau) in OPTIMIZERS.items():
            runs = [r for r in results if r["task"] == task and r["optimizer"] == opt]
            if not runs:
                continue
            killed_runs = [r for r in runs if r["cut"]]
            delays, total_killed, others, other_total, healthy, healthy_total = [], 0, 0, 0, 0, 0
            natural, natural_flagged = 0, 0
            for r in runs:
                for layer, n in r["filters"].items():
                    got = r["flagged"].get(layer, {})
                    killed = r["killed"] if layer.endswith("conv2.weight") else []
                    dead = set(r["truth_dead"].get(layer, [])) - set(killed)
                    total_killed += len(killed)
                    delays += [(got[i] - CUT_AT) / tau for i in killed if i in got]
                    false = sum(1 for i in got if i not in killed and not r["confirmed"].get(layer, {}).get(str(i), False))
                    live = n - len(killed) - len(dead)
                    natural += len(dead)
                    natural_flagged += len(dead & set(r["flagged_at_end"].get(layer, [])))
                    if r["cut"]:
                        others, other_total = others + false, other_total + live
                    else:
                        healthy, healthy_total = healthy + false, healthy_total + live
            within = sum(1 for d in delays if d <= 2.0)
            delay = f"{sorted(delays)[len(delays) // 2]:.2f} / {max(delays):.2f}" if delays else "–"
            lines.append(
                f"| {task} | {opt} | {len(killed_runs)} | {within}/{total_killed} ({100.0 * within / max(total_killed, 1):.1f} %) | {delay} | "
                f"{others}/{other_total} ({100.0 * others / max(other_total, 1):.2f} %) | "
                f"{healthy}/{healthy_total} ({100.0 * healthy / max(healthy_total, 1):.2f} %) | {natural_flagged}/{natural} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = sweep_args(__doc__, TASKS, OPTIMIZERS, 20, STEPS, argv)
    todo = [(t, o, s, c, args.steps) for t in args.tasks for o in args.optimizers for s in range(args.seeds) for c in (True, False)]
    start = time.perf_counter()
    results = run_all(run, todo, args.workers, args.json)
    print(report(results))
    print(f"\n{len(results)} runs, {time.perf_counter() - start:.0f} s on {args.workers} worker(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
