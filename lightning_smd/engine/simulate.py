"""Check an SMD rule against the real optimizer on a scale-invariant simulation.

A weight matrix of ``rows`` independent rows, each scale-invariant on its own: the gradient of a row is isotropic
noise projected orthogonally to the row and scaled by ``1/‖w_row‖`` (what a normalization layer does to the
gradient of the weights before it), so ``L = E‖g‖²‖w‖² = cols − 1`` exactly. The real optimizer steps it; the
angle between consecutive rows and their norms are measured and compared with the rule's prediction.

    from lightning_smd.engine.simulate import simulate
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

from lightning_smd.analysis.theory import Rule, group_hyper, rule_for

__all__ = ["SimResult", "simulate", "relaxation_time", "Relaxation", "fit_relaxation", "paired_relaxation"]


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
    update_kappa: float = math.nan
    """The update's inward pull ``κ = −2⟨w, ηu⟩/‖ηu‖²`` over the measured steps (ratio of means), from the step's
    split ``δw = −e·w − ηu`` into a decoupled decay and the update; ``nan`` where the decay is not decoupled."""


def _invariant_grad(w: torch.Tensor, xi: torch.Tensor) -> torch.Tensor:
    """The gradient a normalization gives each row: the noise ``xi`` projected orthogonally to the row, over its norm."""
    norm = w.norm(dim=1, keepdim=True)
    u = w / norm
    return (xi - (xi * u).sum(dim=1, keepdim=True) * u) / norm


class _Setting:
    """The optimizer under test, its rule, and how the rule's predictions are scaled to this problem's size."""

    def __init__(self, opt: torch.optim.Optimizer, rule: Rule, cols: int) -> None:
        self.opt = opt
        self.rule = rule
        self.unit_grad_sq = float(cols - 1)  # E‖P⊥ξ‖²: the expectation of L, exactly
        self.numel = cols - 1  # the tangential dimensions that the update's noise fills

    def hyper(self, step: int) -> dict[str, float]:
        """The rule's hyper-parameters at ``step``, read from the first param group."""
        return group_hyper(self.rule, self.opt, {**self.opt.param_groups[0], "_step": step})

    def factors(self, h: dict[str, float]) -> tuple[float, float]:
        """The (angle, time) factors of a unit-dependent rule (Adam with coupled L2) on this problem; (1, 1) otherwise."""
        return self.rule.unit_factors(h, self.unit_grad_sq, self.numel) if self.rule.unit_dependent(h) else (1.0, 1.0)

    def weight_norm(self, h: dict[str, float]) -> float:
        """The rule's equilibrium norm of a row under ``h``."""
        return self.rule.weight_norm(h, self.unit_grad_sq, self.numel)


def _lengths(setting: _Setting, h0: dict[str, float], burn: int | None, steps: int | None) -> tuple[int, int]:
    """``burn`` and ``steps``, defaulting to 2 and 6 relaxation times of the rule (within fixed bounds)."""
    tau = setting.rule.relaxation_time(h0) * setting.factors(h0)[1]
    if burn is None:
        burn = int(min(max(2.0 * tau, 1000), 20_000)) if math.isfinite(tau) else 2000
    if steps is None:
        steps = int(min(max(6.0 * tau, 3000), 60_000)) if math.isfinite(tau) else 4000
    return burn, steps


def _noisy_step(
    w: torch.nn.Parameter, opt: torch.optim.Optimizer, gen: torch.Generator, xi: torch.Tensor | None, phi: float, noise_scale: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Draw the step's noise (AR(1) with lag-1 correlation ``phi`` where ``xi`` is the previous one), hand the
    optimizer the invariant gradient and step it; returns the rows' norms and the weights before the step, and the noise."""
    with torch.no_grad():
        norm = w.norm(dim=1, keepdim=True)
        eps = torch.randn(*w.shape, dtype=torch.float64, generator=gen)
        xi = phi * xi + math.sqrt(1.0 - phi * phi) * eps if xi is not None else eps
        g = _invariant_grad(w, xi if noise_scale is None else xi * noise_scale)
        before = w.detach().clone()
    w.grad = g
    opt.step()
    return norm, before, xi


def _measure(w: torch.Tensor, before: torch.Tensor, norm: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's squared norm after the step and its angular update (from its norm ``norm`` before it)."""
    with torch.no_grad():
        # float64 acos of the cosine: accurate to ~1e-16/Δ² relative, ample for Δ ≥ 1e-5
        norm_sq = torch.einsum("ij,ij->i", w, w)
        cos = torch.einsum("ij,ij->i", before, w) / (norm_sq * norm.squeeze(1).square()).sqrt()
        angle = torch.acos(cos.clamp(-1.0, 1.0))
    return norm_sq, angle


@dataclass
class _Sums:
    """Running sums over the measured steps: per-row angles and norms, the predictions, and the update's pull."""

    angle: torch.Tensor
    norm: torch.Tensor
    pred_angle: float = 0.0
    pred_norm: float = 0.0
    pull: float = 0.0
    update_sq: float = 0.0

    def add(self, setting: _Setting, h: dict[str, float], angle: torch.Tensor, norm_sq: torch.Tensor, before: torch.Tensor, w: torch.Tensor) -> None:
        """Add one measured step taken under the hyper-parameters ``h``."""
        rule = setting.rule
        self.angle += angle
        self.norm += norm_sq.sqrt()
        e = rule.decoupled_decay(h)
        if math.isfinite(e):
            with torch.no_grad():
                update = (1.0 - e) * before - w  # ηu
                self.pull -= 2.0 * float(torch.einsum("ij,ij->", before, update))
                self.update_sq += float(torch.einsum("ij,ij->", update, update))
        self.pred_angle += rule.angular_update(h) * setting.factors(h)[0]
        self.pred_norm += setting.weight_norm(h)

    def result(self, steps: int, rows: int, cols: int, norm_trace: list[torch.Tensor], angle_trace: list[torch.Tensor]) -> SimResult:
        """The means over ``steps`` measured steps, their ratios to the predictions, and the traces."""
        angle_rows = self.angle / steps
        norm_rows = self.norm / steps
        pa, pn = self.pred_angle / steps, self.pred_norm / steps
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
            update_kappa=self.pull / self.update_sq if self.update_sq > 0.0 else math.nan,
        )


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
    noise_scale: torch.Tensor | None = None,
    noise_correlation: float = 0.0,
) -> SimResult:
    """Step ``make_optimizer([w])`` on the scale-invariant problem and compare with ``rule`` (found from the optimizer).

    Args:
        steps: measured steps, after ``burn`` unmeasured ones; by default 6 and 2 relaxation times of the rule.
        lr_factor: multiply every group's initial learning rate by ``lr_factor(step)`` before each step (a
            schedule); predictions follow the settings of each step.
        start_norm: the rows' initial norm; by default the predicted equilibrium norm (a short transient).
        noise_scale: per-coordinate standard deviations of the noise (``cols`` values; default: all 1, isotropic).
        noise_correlation: lag-1 correlation ``φ`` of the noise in time (AR(1): ``ξ_t = φ·ξ_{t−1} +
            sqrt(1 − φ²)·ε_t``); 0 is white noise. The predictions still assume ``L = cols − 1``, so a
            ``noise_scale`` should have a mean square of 1.
    """
    gen = torch.Generator().manual_seed(seed)
    w = torch.nn.Parameter(torch.randn(rows, cols, dtype=torch.float64, generator=gen))
    opt = make_optimizer([w])
    setting = _Setting(opt, rule or rule_for(opt), cols)
    base_lr = [g["lr"] for g in opt.param_groups]
    h0 = setting.hyper(1)
    burn, steps = _lengths(setting, h0, burn, steps)
    norm0 = start_norm if start_norm is not None else setting.weight_norm(h0)
    with torch.no_grad():
        w.mul_(norm0 / w.norm(dim=1, keepdim=True))
    sums = _Sums(torch.zeros(rows, dtype=torch.float64), torch.zeros(rows, dtype=torch.float64))
    norm_trace: list[torch.Tensor] = []
    angle_trace: list[torch.Tensor] = []
    phi = float(noise_correlation)
    xi = torch.randn(rows, cols, dtype=torch.float64, generator=gen) if phi else None
    for t in range(burn + steps):
        step = t + 1
        if lr_factor is not None:
            f = float(lr_factor(step))
            for g, lr in zip(opt.param_groups, base_lr):
                g["lr"] = lr * f
        norm, before, xi = _noisy_step(w, opt, gen, xi, phi, noise_scale)
        norm_sq, angle = _measure(w, before, norm)
        norm_trace.append(norm_sq.mean())
        angle_trace.append(angle.mean())
        if t >= burn:
            sums.add(setting, setting.hyper(step), angle, norm_sq, before, w)
    return sums.result(steps, rows, cols, norm_trace, angle_trace)


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


@dataclass
class Relaxation:
    """``tau``: fitted time constant (steps) of ``‖w‖²`` after the change; ``tau_se``: its standard error (jackknife
    over the independent row groups); ``predicted``: the rule's at the new settings; ``deviation``: mean‖w‖² of
    the changed run over that of the reference, minus 1, after every step from the change on."""

    tau: float
    tau_se: float
    predicted: float
    deviation: list[float] = field(default_factory=list)


def fit_relaxation(dev: Sequence[float], low: float = 0.005, high: float = 0.1) -> float:
    """Time constant of a deviation ``y`` decaying to 0: least squares of ``ln|y| = c − t/τ + a·y`` over the steps
    where ``low ≤ |y| ≤ high``, up to the first fall below ``low``. The ``a·y`` term absorbs the leading
    nonlinearity (``dy/dt = −(y/τ)(1 + a·y)`` integrates to this form to first order in ``y``), so ``τ`` is the
    linear time constant at the fixed point; a plain log-slope over 10 %→0.5 % is 2–3 % off for AdamW's lr ×0.1
    / ×10."""
    rows = []
    for i, y in enumerate(dev):
        if abs(y) < low:
            break
        if abs(y) <= high:
            rows.append((1.0, float(i), float(y), math.log(abs(y))))
    if len(rows) < 10:
        return math.nan
    X = torch.tensor([r[:3] for r in rows], dtype=torch.float64)
    Y = torch.tensor([r[3] for r in rows], dtype=torch.float64).unsqueeze(1)
    slope = float(torch.linalg.lstsq(X, Y).solution[1, 0])
    return -1.0 / slope if slope < 0.0 else math.nan


def paired_relaxation(
    make_optimizer: Callable[[Sequence[torch.nn.Parameter]], torch.optim.Optimizer],
    factor: float,
    change: int,
    steps: int,
    rows: int = 64,
    cols: int = 1024,
    groups: int = 16,
    seed: int = 0,
    low: float = 0.005,
    high: float = 0.1,
) -> Relaxation:
    """Relaxation time of ``‖w‖²`` after every group's learning rate is multiplied by ``factor`` at step
    ``change + 1``, on the scale-invariant problem of :func:`simulate`, for ``steps`` steps after the change.

    A reference copy runs at the new learning rate from the start and receives the same noise ``ξ`` at every
    step; the deviation is measured against it (``mean‖w‖² / mean‖w_ref‖² − 1``), so the target is the true
    simulated equilibrium (not the rule's norm, 0.7 % off in ``‖w‖²``, nor a noisy tail mean) and most of the
    common fluctuation cancels. Fitted with :func:`fit_relaxation`; the standard error is the jackknife over
    ``groups`` groups of independent rows. Both copies start at the rule's equilibrium norm for their settings.
    """
    if rows % groups:
        raise ValueError(f"rows ({rows}) must be a multiple of groups ({groups})")
    gen = torch.Generator().manual_seed(seed)
    params, opts = [], []
    for k in (1.0, factor):
        w = torch.nn.Parameter(torch.randn(rows, cols, dtype=torch.float64, generator=gen))
        opt = make_optimizer([w])
        for g in opt.param_groups:
            g["lr"] = g["lr"] * k
        rule = rule_for(opt)
        norm0 = rule.weight_norm(group_hyper(rule, opt, {**opt.param_groups[0], "_step": 1}), float(cols - 1), cols - 1)
        with torch.no_grad():
            w.mul_(norm0 / w.norm(dim=1, keepdim=True))
        params.append(w)
        opts.append(opt)
    h = group_hyper(rule, opts[1], {**opts[1].param_groups[0], "_step": change + 1})
    predicted = rule.relaxation_time(h) * (rule.unit_factors(h, float(cols - 1), cols - 1)[1] if rule.unit_dependent(h) else 1.0)
    trace = torch.empty(2, steps, groups, dtype=torch.float64)
    for t in range(change + steps):
        if t == change:
            for g in opts[0].param_groups:
                g["lr"] = g["lr"] * factor
        xi = torch.randn(rows, cols, dtype=torch.float64, generator=gen)
        for j, (w, opt) in enumerate(zip(params, opts)):
            with torch.no_grad():
                w.grad = _invariant_grad(w, xi)
            opt.step()
            if t >= change:
                with torch.no_grad():
                    trace[j, t - change] = torch.einsum("ij,ij->i", w, w).view(groups, -1).mean(1)

    def tau_of(keep: torch.Tensor) -> float:
        return fit_relaxation((trace[0][:, keep].sum(1) / trace[1][:, keep].sum(1) - 1.0).tolist(), low, high)

    everything = torch.ones(groups, dtype=torch.bool)
    tau = tau_of(everything)
    jack = []
    for g in range(groups):
        keep = everything.clone()
        keep[g] = False
        jack.append(tau_of(keep))
    jk = torch.tensor(jack, dtype=torch.float64)
    se = math.sqrt((groups - 1) / groups * float(((jk - jk.mean()) ** 2).sum()))
    dev = (trace[0].sum(1) / trace[1].sum(1) - 1.0).tolist()
    return Relaxation(tau=tau, tau_se=se, predicted=predicted, deviation=dev)
