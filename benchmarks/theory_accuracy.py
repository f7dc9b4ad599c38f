"""How close is each rule to the real optimizer? The scale-invariant simulation of :mod:`lightning_smd.engine.simulate`.

    python benchmarks/theory_accuracy.py             # every case, ~10 min on 2 cores
    python benchmarks/theory_accuracy.py --quick     # a few cases

For each optimizer setting the script steps the real optimizer (``torch.optim`` and ``lion-pytorch``) on 32
independent scale-invariant rows of 1,024 weights and prints the measured mean angular update and weight norm
against the rule's prediction and against the published first-order form, with the simulation's own standard
error (from the spread over the independent rows). A second table gives AdamW's relaxation time after a
learning-rate change, measured against a reference run at the new settings with the same noise
(``simulate.paired_relaxation``), against ``theory.adam_relaxation_time`` and [Kosson]'s ``1/(2ηλ)``.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from typing import Any


def cases(quick: bool) -> list[tuple[str, Any, dict[str, Any], Any]]:
    """(name, optimizer factory, simulate() kwargs, published Δ* as a function of the hyper-parameters or None)."""
    import torch

    def sgd(lr, wd, **kw):
        return lambda p: torch.optim.SGD(p, lr=lr, weight_decay=wd, **kw)

    def wan(h):  # [Wan] Thm 3, Nesterov by the first-order factor
        a = h.get("momentum", 0.0)
        d = math.sqrt(2 * h["lr"] * h["weight_decay"] / (1 + a))
        return d * math.sqrt(1 + 2 * a * (1 - a * a)) if h.get("nesterov") else d

    def kosson_adam(h):
        return math.sqrt(2 * h["lr"] * h["weight_decay"] * (1 - h["beta1"]) / (1 + h["beta1"]))

    def kosson_lion(h):
        b1, b2 = h["beta1"], h["beta2"]
        S = (1 - b1) ** 2 + b1**2 * (1 - b2) / (1 + b2)
        return math.sqrt(math.pi / 2) * math.sqrt(2 * h["lr"] * h["weight_decay"]) * math.sqrt(S)

    def lion(**kw):
        import lion_pytorch

        return lambda p: lion_pytorch.Lion(p, **kw)

    out = [
        ("SGD ηλ=1e-3", sgd(0.1, 0.01), {}, wan),
        ("SGD ηλ=0.05", sgd(0.5, 0.1), {}, wan),
        ("SGD α=0.9 ηλ=1e-3", sgd(0.1, 0.01, momentum=0.9), {}, wan),
        ("Nesterov α=0.9 ηλ=1e-3", sgd(0.1, 0.01, momentum=0.9, nesterov=True), {}, wan),
        ("Nesterov α=0.99 ηλ=1e-3", sgd(0.1, 0.01, momentum=0.99, nesterov=True), {}, wan),
        ("AdamW ηλ=1e-3", lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1), {}, kosson_adam),
        ("AdamW ηλ=1e-2", lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=1.0), {}, kosson_adam),
        (
            "NAdam warm-up (steps 5k-7k)",
            lambda p: torch.optim.NAdam(p, lr=1e-3, weight_decay=1.0, decoupled_weight_decay=True),
            {"burn": 5000, "steps": 2000},
            None,
        ),
        ("Adam coupled L2 λ=1 (per unit)", lambda p: torch.optim.Adam(p, lr=1e-3, weight_decay=1.0), {}, None),
        ("Adam coupled L2 λ=0.1 (per unit)", lambda p: torch.optim.Adam(p, lr=1e-2, weight_decay=0.1), {}, None),
        ("Lion ηλ=1e-3", lion(lr=1e-3, weight_decay=1.0), {}, kosson_lion),
        ("Lion ηλ=1e-2 β=(0.95, 0.98)", lion(lr=1e-3, weight_decay=10.0, betas=(0.95, 0.98)), {}, kosson_lion),
        ("Lion decoupled_weight_decay", lion(lr=1e-3, weight_decay=1e-3, decoupled_weight_decay=True), {}, kosson_lion),
    ]
    return out[:3] + out[5:6] + out[8:9] + out[10:11] if quick else out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--no-relaxation", action="store_true", help="skip the relaxation-time table")
    args = parser.parse_args(argv)
    import torch

    from lightning_smd.engine.simulate import paired_relaxation, simulate
    from lightning_smd.analysis.theory import group_hyper, rule_for

    torch.set_num_threads(1)
    start = time.perf_counter()
    print("| case | Δ* rule | measured / rule | published / measured − 1 | ‖w‖ measured / rule | sim. s.e. |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, make, kw, published in cases(args.quick):
        try:
            r = simulate(make, **kw)
        except ImportError as exc:
            print(f"| {name} | skipped: {exc} | | | | |")
            continue
        opt = make([torch.nn.Parameter(torch.zeros(1))])
        h = group_hyper(rule_for(opt), opt, opt.param_groups[0])
        pub = f"{published(h) / r.angle - 1:+.1%}" if published else "-"
        se = max(r.angle_ratio_se, r.norm_ratio_se)
        print(f"| {name} | {r.predicted_angle:.5f} | {r.angle_ratio:.4f} | {pub} | {r.norm_ratio:.4f} | {se:.4f} |")
    if not args.no_relaxation:
        print()
        print("AdamW relaxation time of ‖w‖² after a learning-rate change (paired reference run, fit with the leading nonlinearity)")
        print()
        print("| change | β2 | ηλ after | τ rule | τ measured / rule | s.e. | 1/(2ηλ) / measured |")
        print("| --- | --- | --- | --- | --- | --- | --- |")
        # lr before, β2, factor, steps after the change (wd 0.1: ηλ 1e-2 ↔ 1e-3)
        todo = [(0.1, 0.99, 0.1, 5000), (0.01, 0.99, 10.0, 1800)]
        if not args.quick:
            todo += [(0.1, 0.999, 0.1, 13500), (0.01, 0.999, 10.0, 13500)]
        for lr0, beta2, k, steps in todo:
            r = paired_relaxation(lambda p: torch.optim.AdamW(p, lr=lr0, weight_decay=0.1, betas=(0.9, beta2)), k, 1000, steps)  # noqa: B023
            first = 1.0 / (2.0 * lr0 * k * 0.1)
            print(
                f"| lr ×{k:g} | {beta2:g} | {lr0 * k * 0.1:.0e} | {r.predicted:.0f} | {r.tau / r.predicted:.4f} "
                f"| {r.tau_se / r.predicted:.4f} | {first / r.tau:.3f} |"
            )
    print(f"\n{time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    sys.exit(main())
