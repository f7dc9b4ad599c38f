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
        return ", ".join(f"{k}={_fmt(v)}" for k, v in h.items())


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
    inner = getattr(optimizer, "_optimizer", None)  # LightningOptimizer
    if inner is not None and not isinstance(optimizer, type):
        optimizer = inner
    cls = optimizer if isinstance(optimizer, type) else type(optimizer)
    for klass in cls.__mro__:
        rule = _REGISTRY.get(_class_key(klass))
        if rule is not None:
            return rule
    return UnknownRule(optimizer=cls.__name__)


register("torch.optim.sgd.SGD", SGDRule())


def _as_float(value: object) -> float:
    # A tensor-valued lr (capturable / compiled optimizers) is converted here, off the step path: the
    # recorder keeps the raw value and calls this at drain time.
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return math.nan


def _fmt(v: float) -> str:
    return f"{v:.4g}"


