"""Equilibrium predictions of Spherical Motion Dynamics (SMD), one small rule per optimizer.

Pure math: this module imports nothing but the standard library, so it can be used (and tested)
without torch or Lightning. Every formula names the paper and equation it comes from.

Notation: ``lr`` η, ``weight_decay`` λ, ``momentum`` α, ``L = E‖g̃‖²`` with the *unit gradient*
``g̃_t = g_t·‖w_t‖`` (``g`` the loss gradient only, before weight decay is added).

Sources
-------
- [Wan] Wan, Zhu, Zhang, Sun, *Spherical Motion Dynamics: Learning Dynamics of Normalized Neural
  Network using SGD and Weight Decay*, NeurIPS 2021, arXiv:2006.08419.
- [Kosson] Kosson, Messmer, Jaggi, *Rotational Equilibrium: How Weight Decay Balances Learning
  Across Neural Networks*, ICML 2024.
- [Kosson] (above) for AdamW, Lion and the rotational-equilibrium view of decoupled weight decay.
- [Li] Li, Lyu, Arora, *Reconciling Modern Deep Learning with Traditional Optimization Analyses:
  The Intrinsic Learning Rate*, NeurIPS 2020.

A rule maps the hyper-parameters of one optimizer param group at one step to predictions. Rules
are found by the optimizer's class (or any base class) through :func:`rule_for`; users add their
own with :func:`register`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

__all__ = [
    "Hyper",
    "Rule",
    "SGDRule",
    "AdamWRule",
    "AdamRule",
    "RAdamRule",
    "NAdamRule",
    "LionRule",
    "UnknownRule",
    "unwrap_optimizer",
    "filter_angular_update",
    "adam_taps",
    "lion_angular_update",
    "time_to_band",
    "register",
    "rule_for",
    "registered_rules",
    "sgd_angular_update",
    "sgd_weight_norm",
    "sgd_relaxation_time",
    "nesterov_factor",
    "angle_from_norms",
]

#: Hyper-parameters of one param group at one step, as plain floats (``nesterov`` as 0.0 / 1.0).
Hyper = Mapping[str, float]


# ----------------------------------------------------------------------------------------------
# Closed forms
# ----------------------------------------------------------------------------------------------


def nesterov_factor(momentum: float) -> float:
    """Ratio of the Nesterov to the heavy-ball equilibrium angular update, ``sqrt(1 + 2α(1−α²))``.

    Derived here (not in [Wan]) with the same balance argument as [Wan] Thm 3: Nesterov's update
    ``u_t = (1+α)(g_t + λw_t) + α²·buf_{t−1}`` has the same radial (weight-decay) part and the same
    cumulative displacement as heavy ball, so the equilibrium *norm* is unchanged, but its per-step
    displacement is larger: ``E‖u‖² = ‖g‖²(1 + 2α − 2α³)/(1 − α²)`` against ``‖g‖²/(1 − α²)``.
    At α = 0.9 the factor is 1.158 (a CPU measurement in DESIGN.md §2 found ≈ 1.15).
    """
    a = float(momentum)
    return math.sqrt(1.0 + 2.0 * a * (1.0 - a * a))


def sgd_angular_update(lr: float, weight_decay: float, momentum: float = 0.0, nesterov: bool = False) -> float:
    """Equilibrium angular update Δ* (rad/step) of PyTorch SGD with coupled weight decay.

    ``Δ* = sqrt(2ηλ/(1+α))`` — [Wan] Theorem 3 (α = 0 gives the plain-SGD value ``sqrt(2ηλ)``, the
    first-order expansion of the exact fixed point ``arccos(1 − ηλ)``). Nesterov multiplies by
    :func:`nesterov_factor`. Returns 0 when ``ηλ <= 0`` (no equilibrium: the norm grows without bound
    and the angular update decays towards zero).
    """
    if lr <= 0.0 or weight_decay <= 0.0:
        return 0.0
    delta = math.sqrt(2.0 * lr * weight_decay / (1.0 + momentum))
    return delta * nesterov_factor(momentum) if nesterov else delta


def sgd_weight_norm(lr: float, weight_decay: float, momentum: float, unit_grad_sq: float) -> float:
    """Equilibrium weight norm ‖w*‖ of PyTorch SGD(M) given ``L = E‖g‖²‖w‖²``.

    ``‖w*‖⁴ = η·L / (λ·(1−α)·(2 − ηλ/(1+α)))`` — [Wan] Theorem 2 (Theorem 1 for α = 0, where it reads
    ``η·L/(λ(2 − ηλ))``; to first order ``(ηL/(2λ(1−α)))^{1/4}``). The same holds for Nesterov (same
    cumulative displacement). Returns ``inf`` without weight decay (the norm grows without bound) and
    ``nan`` when ``L`` is unknown.
    """
    if not math.isfinite(unit_grad_sq) or unit_grad_sq < 0.0:
        return math.nan
    if weight_decay <= 0.0:
        return math.inf
    if lr <= 0.0:
        return math.nan
    denom = weight_decay * (1.0 - momentum) * (2.0 - lr * weight_decay / (1.0 + momentum))
    if denom <= 0.0:
        return math.nan
    return (lr * unit_grad_sq / denom) ** 0.25


def sgd_relaxation_time(lr: float, weight_decay: float, momentum: float = 0.0) -> float:
    """Relaxation time constant (steps) of the weight norm towards equilibrium under SGD(M).

    ``τ = (1−α)/(2ηλ)`` — [Wan] Eq. 8 (α = 0) and Eq. 12; the norm approaches its equilibrium linearly
    (geometrically) with this time constant. [Li]: the intrinsic learning rate ηλ sets the speed.
    ``inf`` without weight decay.
    """
    if lr <= 0.0 or weight_decay <= 0.0:
        return math.inf
    return (1.0 - momentum) / (2.0 * lr * weight_decay)


def angle_from_norms(norm_before_sq: float, norm_after_sq: float, update_sq: float) -> float:
    """Angle between ``a`` and ``b = a + d`` from ``‖a‖²``, ``‖b‖²`` and ``‖d‖²``, accurate for tiny angles.

    ``‖â − b̂‖² = (‖d‖² − (‖a‖ − ‖b‖)²)/(‖a‖‖b‖)`` and ``Δ = 2·asin(‖â − b̂‖/2)``; unlike ``arccos`` of a
    cosine this keeps full relative precision down to angles far below 1e-6 rad. Its relative error is
    about ``eps·(r/2)²`` with ``r`` the ratio of the radial to the tangential change (``|‖b‖−‖a‖| /
    (‖a‖·Δ)``): negligible for optimizer steps, where the radial change per step is of order ``ηλ``.
    """
    a = math.sqrt(norm_before_sq)
    b = math.sqrt(norm_after_sq)
    if a == 0.0 or b == 0.0:
        return math.nan
    chord_sq = (update_sq - (a - b) ** 2) / (a * b)
    chord_sq = min(max(chord_sq, 0.0), 4.0)
    return 2.0 * math.asin(math.sqrt(chord_sq) / 2.0)


def filter_angular_update(lr: float, weight_decay: float, taps_sum: float, taps_sq_sum: float) -> float:
    """Δ* of a decoupled-weight-decay optimizer whose update is a linear filter ``u_t = Σ a_k ĝ_{t−k}`` of
    unit-variance gradients ĝ orthogonal to the weight (Adam-type normalization): ``Δ*² = 2ηλ·Σa²/(Σa)²``.

    Derived with the balance argument of [Wan] Thm 3: ``E‖w_{t+1}‖² = ‖w_t‖²`` with the correlation of past
    updates with the current one gives ``2ηλ‖w*‖² = η²C(Σa)²``, hence ``‖w*‖² = ηC(Σa)²/(2λ)`` and
    ``Δ*² = η²CΣa²/‖w*‖²``. Adam(W) momentum (``a_k = (1−β1)β1^k``) gives ``2ηλ(1−β1)/(1+β1)`` — the value
    of [Kosson] — and heavy-ball SGD, read with its coupled decay ``λ/(1−α)``, gives [Wan]'s ``2ηλ/(1+α)``.
    """
    if lr <= 0.0 or weight_decay <= 0.0 or taps_sum <= 0.0:
        return 0.0
    return math.sqrt(2.0 * lr * weight_decay * taps_sq_sum) / taps_sum


def adam_taps(beta1: float, nesterov: bool = False) -> tuple[float, float]:
    """``(Σa, Σa²)`` of Adam's momentum filter ``a_k = (1−β1)β1^k`` (NAdam: ``β1·m_t + (1−β1)·g_t``)."""
    b = beta1
    if not nesterov:
        return 1.0, (1.0 - b) / (1.0 + b) if b < 1.0 else 0.0
    # NAdam: a_0 = (1−β1)(1+β1), a_k = (1−β1)β1^{k+1}
    sq = (1.0 - b) ** 2 * ((1.0 + b) ** 2 + b**4 / (1.0 - b * b)) if b < 1.0 else 0.0
    return 1.0, sq


def lion_angular_update(lr: float, weight_decay: float, beta1: float, beta2: float) -> float:
    """Δ* of Lion (``u = sign(β1·m + (1−β1)·g)``, ``m ← β2·m + (1−β2)·g``, decoupled weight decay).

    [Kosson] give ``sqrt(π/2)·sqrt(2ηλ)·sqrt(S)`` with ``S = (1−β1)² + β1²(1−β2)/(1+β2)``, the leading order
    for strong momentum. Here the balance ``E‖w_{t+1}‖² = ‖w_t‖²`` is solved with the sign's exact
    autocorrelation (arcsine law, ``E[sign(c_t)sign(c_{t−j})] = (2/π)·asin(ρ_j)``) and the decay
    ``d = 1 − ηλ`` over Lion's long momentum memory: with ``A = Σ_j d^j (2/π) asin ρ_j``,
    ``‖w*‖² = η²C(1 + 2A)/(1 − d²)`` and, counting only the tangential part of the update,
    ``Δ*² = q(1 − qA²/d²)`` with ``q = (1 − d²)/(1 + 2A)``. The two agree within 1 % for ``ηλ ≲ 1e-4``
    (typical use); this form stays right for larger ``ηλ`` (checked by simulation in the tests).
    """
    if lr <= 0.0 or weight_decay <= 0.0:
        return 0.0
    b1, b2 = beta1, beta2
    S = (1.0 - b1) ** 2 + b1**2 * (1.0 - b2) / (1.0 + b2)
    if S <= 0.0:
        return 0.0
    d = 1.0 - lr * weight_decay
    if not 0.0 < d < 1.0:
        return math.nan
    acc, j, term = 0.0, 1, 1.0
    while j < 1_000_000:
        cross = (1.0 - b1) * b1 * (1.0 - b2) * b2 ** (j - 1) + b1**2 * (1.0 - b2) * b2**j / (1.0 + b2)
        rho = min(cross / S, 1.0)
        term = d**j * (2.0 / math.pi) * math.asin(rho)
        acc += term
        if term < 1e-12:
            break
        j += 1
    q = (1.0 - d * d) / (1.0 + 2.0 * acc)  # η²C/‖w*‖²: the whole update, per unit norm
    # Only the tangential part of the update turns the weight; Lion's long memory makes the radial part
    # ⟨ŵ, u⟩ = −ηC·A/(d‖w‖) non-negligible: Δ*² = q·(1 − q·A²/d²).
    return math.sqrt(max(q * (1.0 - q * acc * acc / (d * d)), 0.0))


def time_to_band(q0_over_qstar: float, time_constant: float, tolerance: float) -> float:
    """Steps until the smoothed ratio ``Δ/Δ* = sqrt(q*/q)`` is within ``1 ± tolerance``, when ``q`` relaxes
    linearly to ``q*`` with ``time_constant`` (``q = ‖w‖⁴`` for SGD, ``‖w‖²`` for decoupled optimizers).
    0 when already in band, ``inf`` when it never relaxes."""
    if not (math.isfinite(q0_over_qstar) and q0_over_qstar > 0.0) or not math.isfinite(time_constant):
        return math.inf if not math.isfinite(time_constant) else math.nan
    if q0_over_qstar > 1.0:
        band = 1.0 / (1.0 - tolerance) ** 2 - 1.0 if tolerance < 1.0 else math.inf
        excess = q0_over_qstar - 1.0
    else:
        band = 1.0 - 1.0 / (1.0 + tolerance) ** 2
        excess = 1.0 - q0_over_qstar
    if excess <= band:
        return 0.0
    return time_constant * math.log(excess / band)


# ----------------------------------------------------------------------------------------------
# Rules
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Rule:
    """How one optimizer's hyper-parameters map to SMD predictions.

    Subclass and override the methods, then :func:`register` the rule for an optimizer class.
    ``hyper`` turns the ``keys`` of a ``param_group`` (copied on every step, converted only when the
    statistics are read) into floats. Every prediction may be ``nan`` where the theory has none; ``reason`` then
    says why in one sentence.
    """

    name: str = "rule"
    #: The ``param_group`` keys :meth:`hyper` reads; the recorder copies just these on every step.
    keys: tuple[str, ...] = ("lr", "weight_decay")

    def hyper(self, group: Mapping) -> dict[str, float]:
        return {"lr": _as_float(group.get("lr", math.nan)), "weight_decay": _as_float(group.get("weight_decay", 0.0))}

    def angular_update(self, h: Hyper) -> float:
        return math.nan

    def weight_norm(self, h: Hyper, unit_grad_sq: float, numel: int) -> float:
        return math.nan

    def relaxation_time(self, h: Hyper) -> float:
        return math.nan

    def reason(self, h: Hyper) -> str | None:
        """Why there is no prediction for these hyper-parameters (``None`` when there is one)."""
        return None

    def describe(self, h: Hyper) -> str:
        return ", ".join(f"{k}={_fmt(v)}" for k, v in h.items() if not k.startswith("_"))

    # Relaxation of the norm. The norm variable ``q = ‖w‖^norm_power`` relaxes linearly towards ``q*`` with
    # ``norm_time_constant`` steps, and the angular-update ratio is ``sqrt(q*/q)``.
    norm_power: float = 2.0
    #: Exponent of the gradient statistic ``L`` in the equilibrium norm (``‖w*‖ ∝ L^grad_exponent``): 0 where the
    #: equilibrium norm depends on the hyper-parameters only (AdamW, Lion), 1/4 for SGD.
    grad_exponent: float = 0.0

    def equilibrium_scale(self, h: Hyper) -> float:
        """A quantity proportional to ``q*`` at fixed gradient statistics (for ratios of ``q*``)."""
        return math.nan

    def norm_time_constant(self, h: Hyper) -> float:
        return self.relaxation_time(h)

    def time_to_equilibrium(self, h: Hyper, norm: float, predicted_norm: float, tolerance: float) -> float:
        """Predicted steps from a weight norm ``norm`` to the equilibrium band around ``predicted_norm``."""
        if not (norm > 0.0 and predicted_norm > 0.0 and math.isfinite(predicted_norm)):
            return math.nan
        return time_to_band((norm / predicted_norm) ** self.norm_power, self.norm_time_constant(h), tolerance)

    def reequilibration_time(self, h_old: Hyper, h_new: Hyper, tolerance: float) -> float:
        """Predicted steps to re-enter the equilibrium band after the settings change from ``h_old`` to
        ``h_new``, starting from equilibrium under ``h_old`` (gradient statistics unchanged).

        ([Wan] Corollary 3.1 gives the order of magnitude ``log(k)·τ`` for a learning rate divided by k;
        this is the same linear relaxation solved for the band.)"""
        old, new = self.equilibrium_scale(h_old), self.equilibrium_scale(h_new)
        if not (old > 0.0 and new > 0.0):
            return math.nan
        return time_to_band(old / new, self.norm_time_constant(h_new), tolerance)


@dataclass(frozen=True)
class SGDRule(Rule):
    """``torch.optim.SGD``: plain, heavy-ball momentum, Nesterov and dampening (PyTorch convention:
    ``v ← μv + (1−τ)(g + λw); w ← w − ηv``, [Wan] Eq. 10–11). Dampening τ acts as a learning rate
    ``η(1−τ)`` (the first step, undamped in PyTorch, is neglected)."""

    name: str = "SGD"
    keys: tuple[str, ...] = ("lr", "weight_decay", "momentum", "dampening", "nesterov")

    def hyper(self, group: Mapping) -> dict[str, float]:
        return {
            "lr": _as_float(group.get("lr", math.nan)),
            "weight_decay": _as_float(group.get("weight_decay", 0.0)),
            "momentum": _as_float(group.get("momentum", 0.0)),
            "dampening": _as_float(group.get("dampening", 0.0)),
            "nesterov": 1.0 if group.get("nesterov", False) else 0.0,
        }

    @staticmethod
    def _effective_lr(h: Hyper) -> float:
        momentum = h.get("momentum", 0.0)
        return h["lr"] * (1.0 - h.get("dampening", 0.0)) if momentum > 0.0 else h["lr"]

    def angular_update(self, h: Hyper) -> float:
        return sgd_angular_update(self._effective_lr(h), h["weight_decay"], h.get("momentum", 0.0), h.get("nesterov", 0.0) > 0.0)

    def weight_norm(self, h: Hyper, unit_grad_sq: float, numel: int) -> float:
        return sgd_weight_norm(self._effective_lr(h), h["weight_decay"], h.get("momentum", 0.0), unit_grad_sq)

    def relaxation_time(self, h: Hyper) -> float:
        return sgd_relaxation_time(self._effective_lr(h), h["weight_decay"], h.get("momentum", 0.0))

    norm_power: float = 4.0
    grad_exponent: float = 0.25

    def norm_time_constant(self, h: Hyper) -> float:
        # x = ‖w‖⁴ obeys dx/dt = −(2/τ)x + const ([Wan] Eq. 8/12 in continuous time)
        return self.relaxation_time(h) / 2.0

    def equilibrium_scale(self, h: Hyper) -> float:
        return sgd_weight_norm(self._effective_lr(h), h["weight_decay"], h.get("momentum", 0.0), 1.0) ** 4

    def describe(self, h: Hyper) -> str:
        parts = [f"lr={_fmt(h['lr'])}", f"weight_decay={_fmt(h['weight_decay'])}", f"momentum={_fmt(h.get('momentum', 0.0))}"]
        if h.get("dampening", 0.0):
            parts.append(f"dampening={_fmt(h['dampening'])}")
        if h.get("nesterov", 0.0):
            parts.append("nesterov=True")
        return ", ".join(parts)

    def reason(self, h: Hyper) -> str | None:
        if not h["weight_decay"] > 0.0:
            return (
                "weight_decay is 0: without weight decay there is no equilibrium; the weight norm grows without "
                "bound and the effective learning rate lr/|w|^2 decays towards zero"
            )
        if not self._effective_lr(h) > 0.0:
            return "the learning rate is 0: the weights do not move"
        return None


def _beta(h: Hyper, i: int) -> float:
    return h.get(f"beta{i}", math.nan)


@dataclass(frozen=True)
class AdamWRule(Rule):
    """``torch.optim.AdamW`` (and Adam/RAdam/NAdam with ``decoupled_weight_decay=True``):
    ``w ← w − ηλw − η·m̂/(√v̂+ε)``.

    ``Δ* = sqrt(2ηλ(1−β1)/(1+β1))`` and ``‖w*‖ = sqrt(ηC/(2λ))`` — [Kosson] — assuming the update is
    noise-dominated with unit second moment per coordinate before momentum (Adam's normalization with β2
    close to 1); relaxation time ``1/(2ηλ)`` (``‖w‖²`` relaxes linearly with it).
    """

    name: str = "AdamW"
    keys: tuple[str, ...] = ("lr", "weight_decay", "betas", "decoupled_weight_decay")
    nesterov: bool = False
    coupled_by_default: bool = False

    def hyper(self, group: Mapping) -> dict[str, float]:
        betas = group.get("betas", (0.9, 0.999)) or (0.9, 0.999)
        decoupled = group.get("decoupled_weight_decay", None)
        if decoupled is None:
            decoupled = not self.coupled_by_default
        return {
            "lr": _as_float(group.get("lr", math.nan)),
            "weight_decay": _as_float(group.get("weight_decay", 0.0)),
            "beta1": _as_float(betas[0]),
            "beta2": _as_float(betas[1]),
            "decoupled": 1.0 if decoupled else 0.0,
        }

    def _lr(self, h: Hyper) -> float:
        return h["lr"]

    def _taps(self, h: Hyper) -> tuple[float, float]:
        return adam_taps(_beta(h, 1), self.nesterov)

    def angular_update(self, h: Hyper) -> float:
        if not h.get("decoupled", 1.0):
            return math.nan
        a, a2 = self._taps(h)
        return filter_angular_update(self._lr(h), h["weight_decay"], a, a2)

    def weight_norm(self, h: Hyper, unit_grad_sq: float, numel: int) -> float:
        if not h.get("decoupled", 1.0):
            return math.nan
        if not h["weight_decay"] > 0.0:
            return math.inf
        a, _ = self._taps(h)
        return math.sqrt(self._lr(h) * numel * a * a / (2.0 * h["weight_decay"]))

    def relaxation_time(self, h: Hyper) -> float:
        if not h.get("decoupled", 1.0):
            return math.nan
        lr, wd = self._lr(h), h["weight_decay"]
        return math.inf if not (lr > 0.0 and wd > 0.0) else 1.0 / (2.0 * lr * wd)

    def equilibrium_scale(self, h: Hyper) -> float:
        wd = h["weight_decay"]
        return self._lr(h) / wd if wd > 0.0 and h.get("decoupled", 1.0) else math.nan

    def reason(self, h: Hyper) -> str | None:
        if not h.get("decoupled", 1.0):
            return (
                f"{self.name} with coupled L2 weight decay (weight_decay added to the gradient before Adam's "
                "normalization) has no hyper-parameter-only equilibrium: the angular update depends on the gradient "
                "norm. Use AdamW, or decoupled_weight_decay=True"
            )
        if not h["weight_decay"] > 0.0:
            return (
                "weight_decay is 0: without weight decay there is no equilibrium; the weight norm grows without "
                "bound and the effective learning rate lr/|w|^2 decays towards zero"
            )
        return None

    def describe(self, h: Hyper) -> str:
        return (
            f"lr={_fmt(h['lr'])}, weight_decay={_fmt(h['weight_decay'])}, betas=({_fmt(_beta(h, 1))}, {_fmt(_beta(h, 2))})"
            + ("" if h.get("decoupled", 1.0) else ", coupled L2")
        )


@dataclass(frozen=True)
class AdamRule(AdamWRule):
    """``torch.optim.Adam``: coupled L2 by default (no prediction, measured anyway), AdamW's rule with
    ``decoupled_weight_decay=True``."""

    name: str = "Adam"
    coupled_by_default: bool = True


@dataclass(frozen=True)
class RAdamRule(AdamWRule):
    """``torch.optim.RAdam`` in decoupled mode: the update is rectified (``η·r_t``, ``r_t → 1`` as training
    goes on) but the decay is not (``η·λ``). The balance then gives AdamW's Δ* (independent of ``r_t``) and
    an equilibrium norm ``r_t·sqrt(ηC/(2λ))``; the first 5 steps, un-adapted, are treated like later ones."""

    name: str = "RAdam"
    keys: tuple[str, ...] = ("lr", "weight_decay", "betas", "decoupled_weight_decay", "_step")
    coupled_by_default: bool = True

    def hyper(self, group: Mapping) -> dict[str, float]:
        h = super().hyper(group)
        h["step"] = _as_float(group.get("_step", math.nan))
        return h

    @staticmethod
    def rectification(h: Hyper) -> float:
        b2, t = _beta(h, 2), h.get("step", math.nan)
        if not (0.0 < b2 < 1.0 and t > 0):
            return 1.0
        rho_inf = 2.0 / (1.0 - b2) - 1.0
        rho = rho_inf - 2.0 * t * b2**t / (1.0 - b2**t)
        if rho <= 5.0:
            return 1.0
        return math.sqrt((rho - 4.0) * (rho - 2.0) * rho_inf / ((rho_inf - 4.0) * (rho_inf - 2.0) * rho))

    def weight_norm(self, h: Hyper, unit_grad_sq: float, numel: int) -> float:
        return self.rectification(h) * super().weight_norm(h, unit_grad_sq, numel)

    def equilibrium_scale(self, h: Hyper) -> float:
        return self.rectification(h) ** 2 * super().equilibrium_scale(h)


@dataclass(frozen=True)
class NAdamRule(AdamWRule):
    """``torch.optim.NAdam``: decoupled mode with Nesterov momentum ``β1·m_t + (1−β1)·g_t``, whose filter
    gives AdamW's Δ* times :func:`nesterov_factor` (β1). NAdam's momentum warms up as
    ``μ_t = β1(1 − ½·0.96^{tψ})``; the rule uses ``μ_t`` of the step in place of β1."""

    name: str = "NAdam"
    keys: tuple[str, ...] = ("lr", "weight_decay", "betas", "decoupled_weight_decay", "momentum_decay", "_step")
    nesterov: bool = True
    coupled_by_default: bool = True

    def hyper(self, group: Mapping) -> dict[str, float]:
        h = super().hyper(group)
        h["momentum_decay"] = _as_float(group.get("momentum_decay", 4e-3))
        h["step"] = _as_float(group.get("_step", math.nan))
        return h

    def _taps(self, h: Hyper) -> tuple[float, float]:
        t, psi = h.get("step", math.nan), h.get("momentum_decay", 4e-3)
        mu = _beta(h, 1) * (1.0 - 0.5 * 0.96 ** (t * psi)) if t > 0 else _beta(h, 1)
        return adam_taps(mu, nesterov=True)


@dataclass(frozen=True)
class LionRule(Rule):
    """Lion (``lion-pytorch``, or any optimizer named Lion with ``betas``): ``w ← w(1 − ηλ) −
    η·sign(β1·m + (1−β1)·g)``; see :func:`lion_angular_update`. ``‖w*‖² = η²C/Δ*²`` (every coordinate of
    the update is ±1), relaxation ``1/(2ηλ)``."""

    name: str = "Lion"
    keys: tuple[str, ...] = ("lr", "weight_decay", "betas")

    def hyper(self, group: Mapping) -> dict[str, float]:
        betas = group.get("betas", (0.9, 0.99)) or (0.9, 0.99)
        return {
            "lr": _as_float(group.get("lr", math.nan)),
            "weight_decay": _as_float(group.get("weight_decay", 0.0)),
            "beta1": _as_float(betas[0]),
            "beta2": _as_float(betas[1]),
        }

    def angular_update(self, h: Hyper) -> float:
        return lion_angular_update(h["lr"], h["weight_decay"], _beta(h, 1), _beta(h, 2))

    def weight_norm(self, h: Hyper, unit_grad_sq: float, numel: int) -> float:
        q = self._q(h)
        return math.inf if not q > 0.0 else h["lr"] * math.sqrt(numel / q)

    @staticmethod
    def _q(h: Hyper) -> float:
        # ‖w*‖² = η²C/q; recover q from Δ* = sqrt(q(1 − qA²/d²)) is awkward, so recompute it
        lr, wd, b1, b2 = h["lr"], h["weight_decay"], _beta(h, 1), _beta(h, 2)
        if not (lr > 0.0 and wd > 0.0):
            return 0.0
        S = (1.0 - b1) ** 2 + b1**2 * (1.0 - b2) / (1.0 + b2)
        d = 1.0 - lr * wd
        acc, j = 0.0, 1
        while j < 1_000_000:
            cross = (1.0 - b1) * b1 * (1.0 - b2) * b2 ** (j - 1) + b1**2 * (1.0 - b2) * b2**j / (1.0 + b2)
            term = d**j * (2.0 / math.pi) * math.asin(min(cross / S, 1.0))
            acc += term
            if term < 1e-12:
                break
            j += 1
        return (1.0 - d * d) / (1.0 + 2.0 * acc)

    def relaxation_time(self, h: Hyper) -> float:
        lr, wd = h["lr"], h["weight_decay"]
        return math.inf if not (lr > 0.0 and wd > 0.0) else 1.0 / (2.0 * lr * wd)

    def equilibrium_scale(self, h: Hyper) -> float:
        q = self._q(h)
        return h["lr"] ** 2 / q if q > 0.0 else math.nan

    def reason(self, h: Hyper) -> str | None:
        return AdamWRule.reason(self, {**h, "decoupled": 1.0})  # type: ignore[arg-type]


@dataclass(frozen=True)
class UnknownRule(Rule):
    """The rule used for an optimizer no rule is registered for: everything is measured, nothing predicted."""

    name: str = "unknown"
    optimizer: str = "?"

    def reason(self, h: Hyper) -> str | None:
        return (
            f"no SMD rule is registered for optimizer {self.optimizer}: the measurements are logged but there is "
            "no prediction to compare them with; register one with lightning_smd.theory.register(OptimizerClass, rule)"
        )


_REGISTRY: dict[str, Rule] = {}


def _class_key(cls: type | str) -> str:
    if isinstance(cls, str):
        return cls
    return f"{cls.__module__}.{cls.__qualname__}"


def register(optimizer: type | str, rule: Rule) -> None:
    """Use ``rule`` for ``optimizer`` (a class, or its ``"module.QualName"``) and its subclasses.

    A rule registered for a class wins over one registered for a base class; registering the same class
    again replaces the earlier rule.
    """
    if not isinstance(rule, Rule):
        raise TypeError(f"rule must be a lightning_smd.theory.Rule, got {type(rule).__name__}")
    _REGISTRY[_class_key(optimizer)] = rule


def registered_rules() -> dict[str, Rule]:
    """A copy of the registry: ``{"module.QualName": rule}``."""
    return dict(_REGISTRY)


def rule_for(optimizer: object) -> Rule:
    """The rule for an optimizer instance (or class): the closest registered class in its MRO.

    Lightning's ``LightningOptimizer`` and similar wrappers are unwrapped through their ``optimizer``
    attribute. An optimizer with no registered rule gets an :class:`UnknownRule`.
    """
    optimizer = unwrap_optimizer(optimizer)
    cls = optimizer if isinstance(optimizer, type) else type(optimizer)
    for klass in cls.__mro__:
        rule = _REGISTRY.get(_class_key(klass))
        if rule is not None:
            return rule
    # Duck typing: Lion implementations other than lion-pytorch's
    if cls.__name__.lower() == "lion" and not isinstance(optimizer, type):
        groups = getattr(optimizer, "param_groups", None) or [{}]
        if "betas" in groups[0]:
            return LionRule()
    return UnknownRule(optimizer=cls.__name__)


def unwrap_optimizer(optimizer: object) -> object:
    """The optimizer doing the work behind Lightning's ``LightningOptimizer`` and torch's
    ``ZeroRedundancyOptimizer`` (whose param groups keep the wrapped optimizer's settings)."""
    for _ in range(4):
        if isinstance(optimizer, type):
            return optimizer
        inner = getattr(optimizer, "_optimizer", None)  # LightningOptimizer
        if inner is None and type(optimizer).__name__ == "ZeroRedundancyOptimizer":
            inner = getattr(optimizer, "optim", None) or getattr(optimizer, "_optim_constructor", None)
        if inner is None:
            return optimizer
        optimizer = inner
    return optimizer


register("torch.optim.sgd.SGD", SGDRule())
register("torch.optim.adamw.AdamW", AdamWRule())
register("torch.optim.adam.Adam", AdamRule())
register("torch.optim.radam.RAdam", RAdamRule())
register("torch.optim.nadam.NAdam", NAdamRule())
register("lion_pytorch.lion_pytorch.Lion", LionRule())


def _as_float(value: object) -> float:
    # A tensor-valued lr (capturable / compiled optimizers) is converted here, off the step path: the
    # recorder keeps the raw value and calls this at drain time.
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return math.nan


def _fmt(v: float) -> str:
    return f"{v:.4g}"


