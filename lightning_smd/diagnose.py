"""Smoothing, equilibrium verdicts and the run summary, on the host.

:class:`Diagnostics` consumes the :class:`~lightning_smd.measure.StepBatch` es that the recorder drains
once per log interval and keeps, per tracked unit:

- the angular update Δ and the ratio ``Δ/Δ*`` to the prediction *of the step it was measured at*, both
  smoothed by a bias-corrected exponential moving average over ``ema_steps`` steps (so a schedule that
  moves Δ* step by step is compared step by step);
- the online estimate ``L = E‖g‖²‖w‖²`` (same EMA) for the predicted equilibrium norm;
- an "in equilibrium" flag: the smoothed ratio has stayed within ``1 ± tolerance`` for the last
  ``window`` steps; and the first step of the first such window.

The run verdict is ``equilibrium`` when at least ``min_fraction`` of the units with a prediction are in
equilibrium at the end, ``not_reached`` otherwise, and ``not_applicable`` when nothing is tracked or no
tracked unit has a prediction (unknown optimizer).

Pure numpy: usable from a hand-written loop without Lightning.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from lightning_smd.detect import NormalizedWeight
from lightning_smd.measure import StepBatch
from lightning_smd.theory import Rule, UnknownRule, registered_rules, time_to_band

__all__ = ["DiagnosticsConfig", "Diagnostics", "VERDICTS", "diffusion_exponent"]

VERDICTS = ("equilibrium", "not_reached", "not_applicable")


_INVALID = re.compile(r"[^A-Za-z0-9_.\- ]")

LAYER_METRICS = (
    "angular_update",
    "predicted_angular_update",
    "angular_update_ratio",
    "weight_norm",
    "predicted_weight_norm",
    "in_equilibrium",
    "effective_lr",
)


def metric_name(unit_name: str) -> str:
    """The unit's name as it appears in metric keys: characters MLflow (the strictest logger) rejects become
    ``_`` — a weight+bias unit ``net.conv.weight+bias`` is logged as ``smd/net.conv.weight_bias/...``."""
    return _INVALID.sub("_", unit_name)


def layer_metric_keys(unit_name: str, prefix: str = "smd/") -> dict[str, str]:
    base = f"{prefix}{metric_name(unit_name)}/"
    return {m: base + m for m in LAYER_METRICS}



@dataclass(frozen=True)
class DiagnosticsConfig:
    """Criteria of the equilibrium verdict (all documented in the README)."""

    tolerance: float = 0.1
    """A unit is in band when its smoothed ``Δ/Δ*`` is within ``1 ± tolerance``."""
    window: int = 100
    """…and in equilibrium once it has stayed in band for this many consecutive steps."""
    ema_steps: int = 50
    """Time constant (steps) of the exponential moving averages of Δ, Δ/Δ* and L."""
    min_fraction: float = 0.9
    """Share of units (with a prediction) that must be in equilibrium at the end for the run verdict."""
    spike_factor: float = 5.0
    """A step whose angular update exceeds ``spike_factor·Δ*`` in a layer that had reached equilibrium is a
    norm spike."""
    vanishing_factor: float = 4.0
    """Vanishing gradient noise: the smoothed ``L`` fell below its peak divided by this, while the smoothed
    ratio is below ``1 − 2·tolerance``."""

    def __post_init__(self) -> None:
        if not self.tolerance > 0:
            raise ValueError(f"tolerance must be > 0, got {self.tolerance}")
        if self.window < 1 or self.ema_steps < 1:
            raise ValueError(f"window and ema_steps must be >= 1, got {self.window} and {self.ema_steps}")
        if not 0.0 < self.min_fraction <= 1.0:
            raise ValueError(f"min_fraction must be in (0, 1], got {self.min_fraction}")


class _Ema:
    """Bias-corrected exponential moving averages of a vector, skipping nan entries."""

    def __init__(self, n: int, steps: int, stride: int = 1) -> None:
        # one sample every ``stride`` steps decays as much as ``stride`` steps would
        self.beta = (1.0 - 1.0 / steps) ** stride
        self.acc = np.zeros(n)
        self.weight = np.zeros(n)

    def update(self, idx: np.ndarray, x: np.ndarray) -> None:
        ok = np.isfinite(x)
        i = idx[ok]
        self.acc[i] = self.beta * self.acc[i] + (1.0 - self.beta) * x[ok]
        self.weight[i] = self.beta * self.weight[i] + (1.0 - self.beta)

    def value(self, idx: np.ndarray | slice = slice(None)) -> np.ndarray:
        w = self.weight[idx]
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(w > 0, self.acc[idx] / np.where(w > 0, w, 1.0), np.nan)


class Diagnostics:
    """Per-unit smoothing and equilibrium state; see the module docstring.

    Args:
        units: the tracked units, in the order the recorder indexes them.
        config: the verdict criteria.
        keep_history: also keep every step's raw values (for tests, plots and notebooks).
        stride: the recorder samples every ``stride``-th step (``every_n_steps``): the moving averages decay
            per step, not per sample, and the window counts steps.
    """

    def __init__(
        self, units: Sequence[NormalizedWeight], config: DiagnosticsConfig | None = None, keep_history: bool = False, stride: int = 1
    ) -> None:
        self.units = list(units)
        self.config = config or DiagnosticsConfig()
        self.stride = max(int(stride), 1)
        # the window in samples: in band for ``window`` steps = for ceil(window / stride) consecutive samples
        self.window_samples = -(-self.config.window // self.stride)
        n = len(self.units)
        self.delta = _Ema(n, self.config.ema_steps, self.stride)
        self.ratio = _Ema(n, self.config.ema_steps, self.stride)
        self.unit_grad = _Ema(n, self.config.ema_steps, self.stride)
        self.filter_delta = _Ema(n, self.config.ema_steps, self.stride)
        self.per_filter = False
        self.steps = np.zeros(n, dtype=np.int64)
        self.last_delta = np.full(n, np.nan)
        self.norm = np.full(n, np.nan)
        self.predicted = np.full(n, np.nan)
        self.relaxation = np.full(n, np.nan)
        self.band_run = np.zeros(n, dtype=np.int64)
        self.first_equilibrium = np.full(n, -1, dtype=np.int64)
        self.steps_in_equilibrium = np.zeros(n, dtype=np.int64)
        self.hyper: list[dict[str, float] | None] = [None] * n
        self.rules: list[Rule | None] = [None] * n
        self.optimizer: list[int] = [-1] * n
        self.reasons: list[str | None] = [None] * n
        self.state = ["approaching"] * n
        self.ref_pred = np.full(n, np.nan)
        self.ref_hyper: list[dict[str, float] | None] = [None] * n
        self.change_step = np.full(n, -1, dtype=np.int64)
        self.expected_reequilibration = np.full(n, np.nan)
        self.reequilibrations: list[list[dict[str, Any]]] = [[] for _ in range(n)]
        self.initial_norm = np.full(n, np.nan)
        self.unit_grad_peak = np.zeros(n)
        self.vanishing_since = np.full(n, -1, dtype=np.int64)
        self.vanishing_first = np.full(n, -1, dtype=np.int64)
        self.spike_count = np.zeros(n, dtype=np.int64)
        self.spikes: list[dict[str, Any]] = []
        self._spiking = np.zeros(n, dtype=bool)
        self.effective_lr = np.full(n, np.nan)
        self._dev_ring = np.full((self.window_samples, n), np.nan)
        self._dev_pos = np.zeros(n, dtype=np.int64)
        self.events: list[dict[str, Any]] = []
        """New notable events since the caller last cleared it (``vanishing``, ``spike``, ``reequilibrating``)."""
        self.keep_history = keep_history
        self.history: list[dict[str, Any]] = []
        self._memo: dict[tuple[Any, ...], tuple[float, float, str | None]] = {}

    # ------------------------------------------------------------------------------------------
    def _predict(self, rule: Rule, h: dict[str, float]) -> tuple[float, float, str | None]:
        key = (rule, tuple(sorted(h.items())))
        hit = self._memo.get(key)
        if hit is None:
            hit = (rule.angular_update(h), rule.relaxation_time(h), rule.reason(h))
            if len(self._memo) > 4096:
                self._memo.clear()
            self._memo[key] = hit
        return hit

    def update(self, batch: StepBatch) -> None:
        """Fold one drained batch of steps into the per-unit state."""
        idx = batch.unit_index
        cfg = self.config
        k = len(batch.steps)
        n_groups = int(batch.unit_group.max()) + 1 if len(batch.unit_group) else 0
        hist_pred = np.empty((k, len(idx))) if self.keep_history else None
        hist_ratio = np.empty((k, len(idx))) if self.keep_history else None
        if k:
            first = np.isnan(self.initial_norm[idx])
            self.initial_norm[idx[first]] = np.sqrt(batch.norm_sq_before[0][first])
        for r in range(k):
            step = int(batch.steps[r])
            hyper_r = batch.hyper[r]
            preds = [self._predict(batch.rule, hyper_r[g]) for g in range(n_groups)]
            pred = np.array([p[0] for p in preds])[batch.unit_group]
            delta = batch.angular_update[r]
            with np.errstate(divide="ignore", invalid="ignore"):
                ratio = np.where(pred > 0, delta / pred, np.nan)
            self._track_prediction(idx, pred, batch, hyper_r, step)
            self.delta.update(idx, delta)
            self.ratio.update(idx, ratio)
            self.unit_grad.update(idx, batch.grad_sq[r] * batch.norm_sq_before[r])
            if batch.filter_angular_update_rms is not None:
                self.per_filter = True
                self.filter_delta.update(idx, batch.filter_angular_update_rms[r])
            smoothed = self.ratio.value(idx)
            dev = np.abs(smoothed - 1.0)
            self._dev_ring[self._dev_pos[idx] % self.window_samples, idx] = dev
            self._dev_pos[idx] += 1
            in_band = dev <= cfg.tolerance  # nan compares False
            self.band_run[idx] = np.where(in_band, self.band_run[idx] + 1, 0)  # (in samples)
            in_eq = self.band_run[idx] >= self.window_samples
            self.steps_in_equilibrium[idx] += in_eq * self.stride
            newly = in_eq & (self.first_equilibrium[idx] < 0)
            self.first_equilibrium[idx[newly]] = step - (self.window_samples - 1) * self.stride
            self._transitions(idx, in_eq, step)
            self._spikes(idx, ratio, step)
            self._vanishing(idx, smoothed, step)
            if hist_pred is not None and hist_ratio is not None:
                hist_pred[r] = pred
                hist_ratio[r] = smoothed
        self.steps[idx] = batch.steps[-1] if k else self.steps[idx]
        if k:
            self.last_delta[idx] = batch.angular_update[-1]
            self.norm[idx] = np.sqrt(batch.norm_sq_after[-1])
            lr_last = np.array([batch.hyper[-1][int(g)].get("lr", math.nan) for g in batch.unit_group])
            with np.errstate(divide="ignore", invalid="ignore"):
                self.effective_lr[idx] = lr_last / batch.norm_sq_after[-1]
            last = batch.hyper[-1]
            for j, u in enumerate(idx):
                h = last[int(batch.unit_group[j])]
                pred_delta, tau, reason = self._predict(batch.rule, h)
                self.hyper[u] = h
                self.rules[u] = batch.rule
                self.optimizer[u] = batch.optimizer_index
                self.predicted[u] = pred_delta
                self.relaxation[u] = tau
                self.reasons[u] = reason
        if self.keep_history and k:
            lr = np.array([[batch.hyper[r][int(g)].get("lr", math.nan) for g in batch.unit_group] for r in range(k)])
            self.history.append(
                {
                    "optimizer": batch.optimizer_index,
                    "units": idx.copy(),
                    "steps": batch.steps.copy(),
                    "angular_update": batch.angular_update.copy(),
                    "predicted_angular_update": hist_pred,
                    "ratio": hist_ratio,
                    "weight_norm": np.sqrt(batch.norm_sq_after),
                    "grad_norm": np.sqrt(batch.grad_sq),
                    "lr": lr,
                    "filter_angular_update_rms": (
                        batch.filter_angular_update_rms.copy() if batch.filter_angular_update_rms is not None else np.full((k, len(idx)), np.nan)
                    ),
                }
            )

    def _track_prediction(self, idx: np.ndarray, pred: np.ndarray, batch: StepBatch, hyper_r: list, step: int) -> None:
        """A prediction that moved by more than the tolerance (a schedule) starts a re-equilibration."""
        tol = self.config.tolerance
        ref = self.ref_pred[idx]
        unset = np.isnan(ref)
        with np.errstate(divide="ignore", invalid="ignore"):
            moved = ~unset & (np.abs(pred / ref - 1.0) > tol)
        for j in np.nonzero(unset | moved)[0]:
            u = int(idx[j])
            h = hyper_r[int(batch.unit_group[j])]
            if moved[j] and (self.state[u] in ("equilibrium", "re-equilibrating") or self.first_equilibrium[u] >= 0):
                old = self.ref_hyper[u]
                expected = batch.rule.reequilibration_time(old, h, tol) if old is not None else math.nan
                self.state[u] = "re-equilibrating"
                self.change_step[u] = step
                self.expected_reequilibration[u] = expected
                self.reequilibrations[u].append(
                    {"step": step, "from": _num(ref[j]), "to": _num(pred[j]), "expected_steps": _num(expected), "observed_steps": None}
                )
                self.events.append({"kind": "reequilibrating", "unit": u, "step": step, "expected_steps": expected, "from": float(ref[j]), "to": float(pred[j])})
            self.ref_pred[u] = pred[j]
            self.ref_hyper[u] = h

    def _transitions(self, idx: np.ndarray, in_eq: np.ndarray, step: int) -> None:
        window = self.config.window
        for j, u in enumerate(idx):
            u = int(u)
            st = self.state[u]
            if in_eq[j]:
                if st == "re-equilibrating":
                    change = int(self.change_step[u])
                    band_start = step - (int(self.band_run[u]) - 1) * self.stride
                    if band_start > change:  # left the band after the change and came back for a window
                        observed = band_start - change
                    elif step - change + 1 >= window:  # stayed in band through the change
                        observed = 0
                    else:
                        continue
                    if self.reequilibrations[u]:
                        self.reequilibrations[u][-1]["observed_steps"] = observed
                self.state[u] = "equilibrium"
            elif st == "equilibrium":
                self.state[u] = "departed"

    def _spikes(self, idx: np.ndarray, ratio: np.ndarray, step: int) -> None:
        spiking = np.nan_to_num(ratio, nan=0.0) > self.config.spike_factor
        rising = spiking & ~self._spiking[idx] & (self.first_equilibrium[idx] >= 0)
        self._spiking[idx] = spiking
        for j in np.nonzero(rising)[0]:
            u = int(idx[j])
            self.spike_count[u] += 1
            event = {"step": step, "layer": self.units[u].name, "ratio": float(ratio[j])}
            if len(self.spikes) < 100:
                self.spikes.append(event)
            self.events.append({"kind": "spike", "unit": u, "step": step, "ratio": float(ratio[j])})

    def _vanishing(self, idx: np.ndarray, smoothed: np.ndarray, step: int) -> None:
        cfg = self.config
        L = self.unit_grad.value(idx)
        warm = self.unit_grad.weight[idx] > 0.5  # past the first ~ema_steps/2 steps
        self.unit_grad_peak[idx] = np.where(warm, np.fmax(self.unit_grad_peak[idx], L), self.unit_grad_peak[idx])
        collapsed = warm & (L < self.unit_grad_peak[idx] / cfg.vanishing_factor) & (smoothed < 1.0 - 2.0 * cfg.tolerance)
        new = collapsed & (self.vanishing_since[idx] < 0)
        for j in np.nonzero(new)[0]:
            u = int(idx[j])
            self.vanishing_since[u] = step
            if self.vanishing_first[u] < 0:
                self.vanishing_first[u] = step
            self.events.append(
                {"kind": "vanishing", "unit": u, "step": step, "L_peak": float(self.unit_grad_peak[u]), "L_now": float(L[j]), "ratio": float(smoothed[j])}
            )
        recovered = ~collapsed & (self.vanishing_since[idx] >= 0) & (L > self.unit_grad_peak[idx] / 2.0)
        self.vanishing_since[idx[recovered]] = -1

    # ------------------------------------------------------------------------------------------
    # Checkpointing: plain Python types only (loadable with torch.load(weights_only=True))
    # ------------------------------------------------------------------------------------------
    _ARRAYS = (
        "steps", "last_delta", "norm", "predicted", "relaxation", "band_run", "first_equilibrium",
        "steps_in_equilibrium", "ref_pred", "change_step", "expected_reequilibration", "initial_norm",
        "unit_grad_peak", "vanishing_since", "vanishing_first", "spike_count", "_spiking", "effective_lr",
        "_dev_ring", "_dev_pos",
    )  # fmt: skip
    _LISTS = ("hyper", "optimizer", "reasons", "state", "ref_hyper", "reequilibrations", "spikes")

    def state_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"names": [u.name for u in self.units], "per_filter": self.per_filter, "stride": self.stride}
        for name in self._ARRAYS:
            out[name] = _plain(getattr(self, name).tolist())
        for name in self._LISTS:
            out[name] = _plain(getattr(self, name))
        for name in ("delta", "ratio", "unit_grad", "filter_delta"):
            ema = getattr(self, name)
            out[name] = {"acc": _plain(ema.acc.tolist()), "weight": _plain(ema.weight.tolist())}
        out["rules"] = [r.name if r is not None else None for r in self.rules]
        return out

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`; the units must be the same (by name, in order)."""
        names = [u.name for u in self.units]
        if state.get("names") != names:
            raise ValueError(f"the checkpoint tracks other weights ({state.get('names')}) than this run ({names})")
        if int(state.get("stride", 1)) != self.stride:
            raise ValueError(f"the checkpoint sampled every {state.get('stride', 1)} steps, this run every {self.stride}")
        for name in self._ARRAYS:
            current = getattr(self, name)
            setattr(self, name, np.asarray(_unplain(state[name]), dtype=current.dtype).reshape(current.shape))
        for name in self._LISTS:
            setattr(self, name, _unplain(state[name]))
        for name in ("delta", "ratio", "unit_grad", "filter_delta"):
            ema = getattr(self, name)
            ema.acc = np.asarray(_unplain(state[name]["acc"]), dtype=np.float64)
            ema.weight = np.asarray(_unplain(state[name]["weight"]), dtype=np.float64)
        self.per_filter = bool(state.get("per_filter", False))
        known = {r.name: r for r in registered_rules().values()}
        self.rules = [known.get(n, UnknownRule(optimizer=n)) if n is not None else None for n in state["rules"]]

    def window_max_deviation(self) -> np.ndarray:
        """Largest ``|smoothed Δ/Δ* − 1|`` over each unit's last ``window`` steps (nan before ``window`` steps)."""
        full = self._dev_pos >= self.window_samples
        with np.errstate(all="ignore"):
            worst = np.max(np.nan_to_num(self._dev_ring, nan=np.inf), axis=0)
        return np.where(full, worst, np.nan)

    def predicted_time_to_equilibrium(self) -> np.ndarray:
        """Steps from the initial norm to the equilibrium band, predicted with the final settings and ``L``."""
        out = np.full(len(self.units), np.nan)
        pred_norm = self.predicted_weight_norm()
        for u, (rule, h) in enumerate(zip(self.rules, self.hyper)):
            if rule is not None and h is not None and np.isfinite(pred_norm[u]):
                out[u] = rule.time_to_equilibrium(h, float(self.initial_norm[u]), float(pred_norm[u]), self.config.tolerance)
        return out

    def steps_needed(self) -> np.ndarray:
        """From the current smoothed ratio ``r`` (``q/q* = 1/r²``): steps until in equilibrium (band + window)."""
        out = np.full(len(self.units), np.nan)
        r = self.ratio.value()
        for u, (rule, h) in enumerate(zip(self.rules, self.hyper)):
            if rule is None or h is None:
                continue
            if self.in_equilibrium[u]:
                out[u] = 0.0
            elif self.predicted[u] == 0.0:
                out[u] = math.inf
            elif np.isfinite(r[u]) and r[u] > 0:
                t = time_to_band(1.0 / r[u] ** 2, rule.norm_time_constant(h), self.config.tolerance)
                out[u] = t + max(self.config.window - int(self.band_run[u]) * self.stride, 0)
        return out

    # ------------------------------------------------------------------------------------------
    @property
    def in_equilibrium(self) -> np.ndarray:
        return self.band_run >= self.window_samples

    @property
    def applicable(self) -> np.ndarray:
        """Units with a prediction (a prediction of 0, i.e. no weight decay, counts: it is a failure; an unknown
        optimizer or Adam's coupled L2 have none)."""
        out = np.zeros(len(self.units), dtype=bool)
        for u, rule in enumerate(self.rules):
            out[u] = rule is not None and rule.name != "unknown" and bool(np.isfinite(self.predicted[u]))
        return out

    def predicted_weight_norm(self) -> np.ndarray:
        out = np.full(len(self.units), np.nan)
        L = self.unit_grad.value()
        for u, (rule, h) in enumerate(zip(self.rules, self.hyper)):
            if rule is not None and h is not None:
                out[u] = rule.weight_norm(h, float(L[u]), self.units[u].numel)
        return out

    def equilibrium_fraction(self) -> float:
        app = self.applicable
        if not app.any():
            return math.nan
        return float(self.in_equilibrium[app].mean())

    def median_ratio(self) -> float:
        r = self.ratio.value()[self.applicable]
        r = r[np.isfinite(r)]
        return float(np.median(r)) if r.size else math.nan

    def verdict(self) -> tuple[str, str]:
        """``(verdict, one-sentence reason)``."""
        cfg = self.config
        if not self.units:
            return "not_applicable", "no normalized (scale-invariant) weight is tracked"
        app = self.applicable
        if not app.any():
            reasons = {r for r in self.reasons if r}
            if self.steps.max(initial=0) == 0:
                return "not_applicable", "no optimizer step was measured"
            return "not_applicable", "; ".join(sorted(reasons)) or "no tracked weight has an SMD prediction"
        frac = self.equilibrium_fraction()
        n_app = int(app.sum())
        n_eq = int(self.in_equilibrium[app].sum())
        if frac >= cfg.min_fraction:
            return "equilibrium", (
                f"{n_eq}/{n_app} tracked layers ended in equilibrium (smoothed angular update within "
                f"±{cfg.tolerance:.0%} of the prediction for the last {cfg.window} steps; at least {cfg.min_fraction:.0%} required)"
            )
        reason = (
            f"only {n_eq}/{n_app} tracked layers ended in equilibrium; at least {cfg.min_fraction:.0%} must stay within "
            f"±{cfg.tolerance:.0%} of the predicted angular update for the last {cfg.window} steps"
        )
        vanishing = [u for u in range(len(self.units)) if app[u] and self.vanishing_first[u] >= 0 and not self.in_equilibrium[u]]
        if vanishing:
            reason += (
                f"; diagnosed as vanishing gradient noise in {len(vanishing)} of them (the training loss approaches zero: "
                "a property of the run, not a measurement error)"
            )
        no_decay = [u for u in range(len(self.units)) if app[u] and self.predicted[u] == 0.0]
        if no_decay:
            reason += f"; {len(no_decay)} have no weight decay, hence no equilibrium"
        return "not_reached", reason

    # ------------------------------------------------------------------------------------------
    def metrics(self, per_layer: bool = True, prefix: str = "smd/") -> dict[str, float]:
        """The logged metrics: always the same keys for the same units (CSV loggers need that)."""
        out = {
            f"{prefix}angular_update_ratio": self.median_ratio(),
            f"{prefix}equilibrium_fraction": self.equilibrium_fraction(),
        }
        if per_layer:
            smoothed = self.delta.value()
            ratio = self.ratio.value()
            pred_norm = self.predicted_weight_norm()
            eq = self.in_equilibrium
            filter_rms = self.filter_delta.value()
            for u, unit in enumerate(self.units):
                base = f"{prefix}{metric_name(unit.name)}/"
                out[base + "angular_update"] = float(smoothed[u])
                out[base + "predicted_angular_update"] = float(self.predicted[u])
                out[base + "angular_update_ratio"] = float(ratio[u])
                out[base + "weight_norm"] = float(self.norm[u])
                out[base + "predicted_weight_norm"] = float(pred_norm[u])
                out[base + "in_equilibrium"] = float(eq[u])
                out[base + "effective_lr"] = float(self.effective_lr[u])
                if self.per_filter:
                    out[base + "filter_angular_update_rms"] = float(filter_rms[u])
        return out

    def layer_rows(self) -> list[dict[str, Any]]:
        smoothed = self.delta.value()
        ratio = self.ratio.value()
        pred_norm = self.predicted_weight_norm()
        eq = self.in_equilibrium
        filter_rms = self.filter_delta.value()
        dev = self.window_max_deviation()
        t_eq = self.predicted_time_to_equilibrium()
        rows = []
        for u, unit in enumerate(self.units):
            first = int(self.first_equilibrium[u])
            rows.append(
                {
                    "name": unit.name,
                    "params": list(unit.params),
                    "shape": list(unit.shape),
                    "numel": unit.numel,
                    "layer": unit.layer,
                    "normalization": unit.norm,
                    "granularity": unit.granularity,
                    "found_by": unit.found_by,
                    "group_size": unit.group_size,
                    "verification": unit.verification,
                    "optimizer": self.optimizer[u],
                    "rule": self.rules[u].name if self.rules[u] is not None else None,
                    "hyper": self.hyper[u],
                    "steps": int(self.steps[u]),
                    "angular_update": _num(smoothed[u]),
                    "last_angular_update": _num(self.last_delta[u]),
                    "predicted_angular_update": _num(self.predicted[u]),
                    "ratio": _num(ratio[u]),
                    "weight_norm": _num(self.norm[u]),
                    "predicted_weight_norm": _num(pred_norm[u]),
                    "relaxation_time": _num(self.relaxation[u]),
                    "in_equilibrium": bool(eq[u]),
                    "filter_angular_update_rms": _num(filter_rms[u]) if self.per_filter else None,
                    "first_equilibrium_step": first if first >= 0 else None,
                    "steps_in_equilibrium": int(self.steps_in_equilibrium[u]),
                    "share_in_equilibrium": _num(self.steps_in_equilibrium[u] / self.steps[u]) if self.steps[u] else None,
                    "state": self.state[u],
                    "window_max_deviation": _num(dev[u]),
                    "initial_weight_norm": _num(self.initial_norm[u]),
                    "predicted_time_to_equilibrium": _num(t_eq[u]),
                    "effective_lr": _num(self.effective_lr[u]),
                    "reequilibrations": list(self.reequilibrations[u]),
                    "expected_reequilibration_steps": _num(self.expected_reequilibration[u]) if self.state[u] == "re-equilibrating" else None,
                    "spikes": int(self.spike_count[u]),
                    "vanishing_gradient_noise_since": int(self.vanishing_first[u]) if self.vanishing_first[u] >= 0 else None,
                    "unit_grad_sq": _num(self.unit_grad.value(np.array([u]))[0]),
                    "unit_grad_sq_peak": _num(self.unit_grad_peak[u]),
                    "reason": self.reasons[u],
                }
            )
        return rows

    def summary(self) -> dict[str, Any]:
        verdict, reason = self.verdict()
        return {
            "verdict": verdict,
            "reason": reason,
            "steps": int(self.steps.max(initial=0)),
            "criteria": asdict(self.config),
            "equilibrium_fraction": _num(self.equilibrium_fraction()),
            "angular_update_ratio": _num(self.median_ratio()),
            "diagnoses": self.diagnoses(),
            "spikes": list(self.spikes),
            "layers": self.layer_rows(),
        }

    def diagnoses(self) -> dict[str, Any]:
        """Run-level findings, each with the layers concerned."""
        names = [u.name for u in self.units]
        app = self.applicable
        out: dict[str, Any] = {}
        eq = self.in_equilibrium
        vanishing = [names[u] for u in range(len(names)) if self.vanishing_first[u] >= 0 and not eq[u]]
        if vanishing:
            out["vanishing_gradient_noise"] = vanishing
        spiking = [names[u] for u in range(len(names)) if self.spike_count[u] > 0]
        if spiking:
            out["norm_spikes"] = spiking
        reeq = [names[u] for u in range(len(names)) if self.state[u] == "re-equilibrating"]
        if reeq:
            out["re_equilibrating"] = reeq
        reached = [u for u in range(len(names)) if app[u] and self.first_equilibrium[u] >= 0]
        never = [names[u] for u in range(len(names)) if app[u] and self.first_equilibrium[u] < 0]
        if reached and never:
            out["never_in_equilibrium"] = never
        departed = [names[u] for u in range(len(names)) if self.state[u] == "departed"]
        if departed:
            out["departed"] = departed
        return out

    def unit_history(self, name: str) -> dict[str, np.ndarray]:
        """Every recorded step of one unit (needs ``keep_history=True``)."""
        u = [x.name for x in self.units].index(name)
        keys = ("steps", "angular_update", "predicted_angular_update", "ratio", "weight_norm", "grad_norm", "lr", "filter_angular_update_rms")
        parts: dict[str, list[np.ndarray]] = {k: [] for k in keys}
        for h in self.history:
            where = np.nonzero(h["units"] == u)[0]
            if not where.size:
                continue
            j = int(where[0])
            parts["steps"].append(h["steps"])
            for k in keys[1:]:
                parts[k].append(h[k][:, j])
        return {k: (np.concatenate(v) if v else np.empty(0)) for k, v in parts.items()}


def diffusion_exponent(steps: Sequence[float], distance: Sequence[float], min_span: float = 4.0) -> float:
    """Exponent ``c`` of ``distance ∝ t^c``: least squares in log-log (nan with fewer than 3 points or a
    span of ``t`` narrower than ``min_span``). A random walk gives 0.5, ballistic motion 1."""
    t = np.asarray(steps, dtype=np.float64)
    d = np.asarray(distance, dtype=np.float64)
    ok = (t > 0) & (d > 0) & np.isfinite(d)
    t, d = t[ok], d[ok]
    if t.size < 3 or t.max() / t.min() < min_span:
        return math.nan
    x, y = np.log(t), np.log(d)
    slope = float(np.polyfit(x, y, 1)[0])
    return slope


def _plain(obj: Any) -> Any:
    """nan/inf as strings, numpy scalars as Python numbers: a checkpoint-safe copy."""
    if isinstance(obj, (float, np.floating)):
        x = float(obj)
        return x if math.isfinite(x) else repr(x)
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.bool_,)):
        return bool(obj)
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


def _unplain(obj: Any) -> Any:
    if isinstance(obj, str) and obj in ("nan", "inf", "-inf"):
        return float(obj)
    if isinstance(obj, dict):
        return {k: _unplain(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_unplain(v) for v in obj]
    return obj


def _num(x: float) -> float | None:
    """A JSON-safe float: nan and inf become None."""
    x = float(x)
    return x if math.isfinite(x) else None
