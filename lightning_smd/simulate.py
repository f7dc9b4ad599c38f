"""Check an SMD rule against the real optimizer on a scale-invariant simulation.

A weight matrix of ``rows`` independent rows, each scale-invariant on its own: the gradient of a row is isotropic
noise projected orthogonally to the row and scaled by ``1/‖w_row‖`` (what a normalization layer does to the
gradient of the weights before it), so ``L = E‖g‖²‖w‖² = cols − 1`` exactly. The real optimizer steps it; the
angle between consecutive rows and their norms are measured and compared with the rule's prediction.

    from lightning_smd.simulate import simulate
    r = simulate(lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1))
    print(r.angle_ratio, "±", r.angle_ratio_se)

Rows are independent and identically distributed, so the spread of the per-row time means gives an honest
standard error of the simulation itself (``*_se``), whatever the autocorrelation along time. Used by
``tests/test_theory_simulation.py`` and ``benchmarks/theory_accuracy.py``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from lightning_smd.theory import Rule, group_hyper, rule_for

__all__ = ["SimResult", "simulate", "relaxation_time"]


@dataclass
class SimResult:
    """Means over the measured steps and rows; ``*_ratio`` is measured / predicted, ``*_se`` its standard error."""

    angle: float
    predicted_angle: float
    angle_ratio: float
    angle_ratio_se: float
    norm: float
    predicted_norm: float
    norm_ratio: float
    norm_ratio_se: float
    steps: int
    rows: int
    cols: int
    norm_sq_trace: list[float] = field(default_factory=list)
    """Mean over rows of ``‖w_row‖²`` after every step (all steps, burn-in included)."""
    angle_trace: list[float] = field(default_factory=list)
    """Mean over rows of the angular update of every step."""


def simulate(
    make_optimizer: Callable[[Sequence[torch.nn.Parameter]], torch.optim.Optimizer],
    steps: int | None = None,
    burn: int | None = None,
    rows: int = 32,
    cols: int = 1024,
    seed: int = 0,
    lr_factor: Callable[[int], float] | None = None,
    start_norm: float | None = None,
    rule: Rule | None = None,
) -> SimResult:
    """Step ``make_optimizer([w])`` on the scale-invariant problem and compare with ``rule`` (found from the optimizer).

    Args:
        steps: measured steps, after ``burn`` unmeasured ones; by default 6 and 2 relaxation times of the rule.
        lr_factor: multiply every group's initial learning rate by ``lr_factor(step)`` before each step (a
            schedule); predictions follow the settings of each step.
        start_norm: the rows' initial norm; by default the predicted equilibrium norm (a short transient).
    """
    gen = torch.Generator().manual_seed(seed)
    w = torch.nn.Parameter(torch.randn(rows, cols, dtype=torch.float64, generator=gen))
    opt = make_optimizer([w])
    rule = rule or rule_for(opt)
    base_lr = [g["lr"] for g in opt.param_groups]
    unit_grad_sq = float(cols - 1)  # E‖P⊥ξ‖²: the expectation of L, exactly
    numel = cols - 1  # the tangential dimensions that the update's noise fills

    def hyper(step: int) -> dict[str, float]:
        return group_hyper(rule, opt, {**opt.param_groups[0], "_step": step})

    h0 = hyper(1)
    tau = rule.relaxation_time(h0)
    if burn is None:
        burn = int(min(max(2.0 * tau, 1000), 20_000)) if math.isfinite(tau) else 2000
    if steps is None:
        steps = int(min(max(6.0 * tau, 3000), 60_000)) if math.isfinite(tau) else 4000
    norm0 = start_norm if start_norm is not None else rule.weight_norm(h0, unit_grad_sq, numel)
    with torch.no_grad():
        w.mul_(norm0 / w.norm(dim=1, keepdim=True))
    angle_sum = torch.zeros(rows, dtype=torch.float64)
    norm_sum = torch.zeros(rows, dtype=torch.float64)
    pred_angle_sum = pred_norm_sum = 0.0
    norm_trace: list[torch.Tensor] = []
    angle_trace: list[torch.Tensor] = []
    for t in range(burn + steps):
        step = t + 1
        if lr_factor is not None:
            f = float(lr_factor(step))
            for g, lr in zip(opt.param_groups, base_lr):
                g["lr"] = lr * f
        with torch.no_grad():
            norm = w.norm(dim=1, keepdim=True)
            xi = torch.randn(rows, cols, dtype=torch.float64, generator=gen)
            u = w / norm
            g = (xi - (xi * u).sum(dim=1, keepdim=True) * u) / norm
            before = w.detach().clone()
        w.grad = g
        opt.step()
        with torch.no_grad():
            # float64 acos of the cosine: accurate to ~1e-16/Δ² relative, ample for Δ ≥ 1e-5
            norm_sq = torch.einsum("ij,ij->i", w, w)
            cos = torch.einsum("ij,ij->i", before, w) / (norm_sq * norm.squeeze(1).square()).sqrt()
            angle = torch.acos(cos.clamp(-1.0, 1.0))
        norm_trace.append(norm_sq.mean())
        angle_trace.append(angle.mean())
        if t >= burn:
            angle_sum += angle
            norm_sum += norm_sq.sqrt()
            h = hyper(step)
            pred_angle_sum += rule.angular_update(h)
            pred_norm_sum += rule.weight_norm(h, unit_grad_sq, numel)
    angle_rows = angle_sum / steps
    norm_rows = norm_sum / steps
    pa, pn = pred_angle_sum / steps, pred_norm_sum / steps
    return SimResult(
        angle=float(angle_rows.mean()),
        predicted_angle=pa,
        angle_ratio=float(angle_rows.mean()) / pa,
        angle_ratio_se=float(angle_rows.std() / math.sqrt(rows)) / pa,
        norm=float(norm_rows.mean()),
        predicted_norm=pn,
        norm_ratio=float(norm_rows.mean()) / pn,
        norm_ratio_se=float(norm_rows.std() / math.sqrt(rows)) / pn,
        steps=steps,
        rows=rows,
        cols=cols,
        norm_sq_trace=torch.stack(norm_trace).tolist(),
        angle_trace=torch.stack(angle_trace).tolist(),
    )


def relaxation_time(trace: Sequence[float], target: float, start: int, low: float = 0.01, high: float = 0.3) -> float:
    """Time constant (steps) of ``trace`` relaxing to ``target`` from step index ``start`` on: the least-squares slope
    of ``log|x/target − 1|`` over the steps where that deviation is between ``low`` and ``high`` (the tail, where the
    relaxation is linear and the slowest mode dominates), up to its first fall below ``low``."""
    xs, ys = [], []
    for i in range(start, len(trace)):
        dev = abs(trace[i] / target - 1.0)
        if dev < low:
            break
        if dev <= high:
            xs.append(float(i))
            ys.append(math.log(dev))
    if len(xs) < 10:
        return math.nan
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys))
    return -sxx / sxy if sxy else math.nan
