"""Is a layer in its steady state? Drift statistics that know the noise, per unit, on the host.

SMD's equilibrium is a steady state: the angular update Δ and the weight norm ‖w‖ stop drifting for the
hyper-parameters in force. Per step both are noisy and autocorrelated (momentum, Adam's moments, Lion's
long memory), and the noise grows as the layer shrinks, so a rule like "the smoothed ratio stayed inside a
band at every recent step" fails on noise alone. This module answers the question statistically.

Per unit, the sums of the per-step ratio ``x = Δ/Δ*`` and of ``y = log(‖w‖/‖w*‖)`` (the norm relative to its
predicted equilibrium, up to a constant) are kept over consecutive **blocks** of steps. Over the recent
**window** (a few relaxation times ``τ_r``, the time constant with which the theory says the ratio relaxes;
see :mod:`lightning_smd.analysis.diagnostics`), least-squares lines through all its samples give

- the **drift**: the relative change of the ratio per relaxation time, ``D = τ_r·b_x/x̄``, and the change
  of ``Δ/Δ*`` that the norm's drift implies, ``D_w = τ_r·(p/2)·b_y`` (``Δ/Δ* = sqrt(q*/q)`` with
  ``q = ‖w‖^p``). A layer still relaxing with a deviation ε from its steady state drifts by about ε per
  ``τ_r``, so ``|D|`` reads as "the relaxation still to go";
- their standard errors for autocorrelated samples: the per-sample residual variance inflated by the
  lag-1 autocorrelation of the detrended residuals (AR(1), corrected for its small-sample bias), or the
  spread of the block means where that is larger (correlation slower than one step's AR(1)), the inflation
  capped at the theory's bound ``1 + 2τ_r`` (in a steady state the relaxation is the slowest correlation);
  ``blocks − 2`` degrees of freedom;
- the **steady ratio** ``x̄`` (the window's mean of ``Δ/Δ*``) with the same standard error.

:func:`drift_within` is the decision: the drift estimate is within the limit ``δ`` *and* precise enough to
say so, ``|D| <= δ`` and ``t·se <= δ``, with ``t`` the Student quantile at the Bonferroni-corrected two-sided
level ``α/N`` (``N`` units judged). Two error rates follow, whatever the noise level of the layer:

- a stationary unit (true drift 0) whose window is long enough for that precision fails with probability at
  most ``α/N`` (``|D| > δ >= t·se``): at most ``α`` per run;
- a unit still drifting by ``2δ`` or more per relaxation time passes with probability at most ``α/(2N)``.

A window too short or too noisy for the precision is *undetermined* (not steady yet: it grows as the run
goes on). What a statistical test cannot see in a short window, the theory adds (see
:mod:`lightning_smd.analysis.diagnostics`): a unit cannot be steady before several relaxation times have passed since
the last change of its hyper-parameters.

Pure numpy, no torch.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from statistics import NormalDist
from typing import Any

import numpy as np

__all__ = ["BlockSeries", "WindowFit", "t_quantile", "drift_within", "BLOCKS_PER_WINDOW", "FIELDS"]

#: Blocks a window is cut into when the block size is chosen (at the start and after every change).
BLOCKS_PER_WINDOW = 16
#: Fewer complete blocks than this in the window: no judgement (not steady).
MIN_BLOCKS = 6
#: Upper clip of the lag-1 autocorrelation of block means used for the variance inflation.
MAX_RHO = 0.995


@functools.lru_cache(maxsize=1024)
def t_quantile(p: float, df: float) -> float:
    """Quantile ``p`` of Student's t with ``df`` degrees of freedom; a fractional ``df`` is rounded down (a larger,
    conservative quantile) and ``df = inf`` gives the normal quantile. Exact to 1e-10: Newton's method on the
    closed-form CDF of integer degrees of freedom, from the Cornish–Fisher expansion."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"p must be in (0, 1), got {p}")
    z = NormalDist().inv_cdf(p)
    if not math.isfinite(df):
        return z
    nu = int(math.floor(df))
    if nu < 1:
        return math.nan
    x = z + (z**3 + z) / (4.0 * nu) + (5 * z**5 + 16 * z**3 + 3 * z) / (96.0 * nu**2)
    log_norm = math.lgamma((nu + 1) / 2.0) - math.lgamma(nu / 2.0) - 0.5 * math.log(nu * math.pi)
    for _ in range(50):
        pdf = math.exp(log_norm - (nu + 1) / 2.0 * math.log1p(x * x / nu))
        step = (_t_cdf(x, nu) - p) / pdf
        x -= step
        if abs(step) <= 1e-12 * max(1.0, abs(x)):
            break
    return x


def _t_cdf(x: float, nu: int) -> float:
    """P(T <= x) for Student's t with an integer ``nu``: the finite series in ``θ = atan(x/sqrt(nu))``."""
    theta = math.atan(x / math.sqrt(nu))
    c2, s = math.cos(theta) ** 2, math.sin(theta)
    if nu % 2 == 0:
        term, total = 1.0, 1.0
        for k in range(1, nu // 2):
            term *= c2 * (2 * k - 1) / (2 * k)
            total += term
        two_sided = s * total
    else:
        total = 0.0
        if nu > 1:
            term, total = 1.0, 1.0
            for k in range(1, (nu - 1) // 2):
                term *= c2 * (2 * k) / (2 * k + 1)
                total += term
        two_sided = 2.0 / math.pi * (theta + s * math.cos(theta) * total)
    return 0.5 * (1.0 + two_sided)


def drift_within(drift: np.ndarray, se: np.ndarray, quantile: np.ndarray | float, limit: float) -> tuple[np.ndarray, np.ndarray]:
    """``(within, precise)``: the drift estimate is within ``±limit`` *and* precise enough to say so
    (``quantile·se <= limit``); and whether it is precise enough at all. nan → False.

    With ``quantile`` the ``1 − α/2`` quantile: a stationary series (true drift 0) is *not within* with
    probability at most α when it is precise enough (``|drift| > limit >= quantile·se``); a series drifting by
    ``2·limit`` or more is *within* with probability at most α/2 (``drift <= limit <= 2·limit − quantile·se``).
    """
    with np.errstate(invalid="ignore"):
        precise = np.nan_to_num(quantile * se, nan=np.inf) <= limit
        small = np.nan_to_num(np.abs(drift), nan=np.inf) <= limit
    return precise & small, precise


@dataclass
class WindowFit:
    """Per-unit statistics over each unit's recent window (arrays over the units asked for; nan where a unit
    has fewer than ``MIN_BLOCKS`` complete blocks in its window)."""

    blocks: np.ndarray
    """Complete blocks in the window."""
    samples: np.ndarray
    """Samples (steps measured) in the window."""
    mean_x: np.ndarray
    se_mean_x: np.ndarray
    slope_x: np.ndarray
    """Per step."""
    se_slope_x: np.ndarray
    slope_y: np.ndarray
    se_slope_y: np.ndarray
    rho_x: np.ndarray
    """Lag-1 autocorrelation (per sample, detrended, bias-corrected, clipped) of ``x`` behind the inflation."""
    mean_extra: np.ndarray | None = None
    """``[units, extras]``: window means of the passive series given to :meth:`BlockSeries.add` as ``extra``."""

    @property
    def df(self) -> np.ndarray:
        """Degrees of freedom of the t quantile: blocks − 2 (conservative: the variance is estimated from many
        more samples, but their autocorrelation from the blocks' spread)."""
        return np.where(self.blocks >= MIN_BLOCKS, self.blocks - 2.0, np.nan)


# Per-block sufficient statistics. Times are relative to the unit's origin (its last reset). "Pairs" are
# consecutive samples (t−1 = the previous sample of the same unit since its reset).
_SHARED = ("n", "st", "stt", "p", "pt", "ptt")
_PER_SERIES = ("s", "ss", "ts", "ps", "pl", "psl", "pts", "ptl")
FIELDS = _SHARED + tuple(f"{name}_{z}" for z in "xy" for name in _PER_SERIES)
_F = {name: i for i, name in enumerate(FIELDS)}


class BlockSeries:
    """Sufficient statistics of two per-step series ``x`` and ``y`` per unit, in blocks of consecutive samples.

    A least-squares line through all the samples of the recent window, with the lag-1 autocorrelation of its
    residuals, needs only sums (of ``t``, ``t²``, ``x``, ``x²``, ``t·x`` and the products of consecutive samples);
    blocks hold those sums (``data[unit, block, field]``, fields :data:`FIELDS`) so that the window can slide.
    Each unit has its own block size (in samples), set by :meth:`reset` (at the start and after every change of
    the unit's hyper-parameters: older samples describe another steady state and are dropped). When a unit's
    slots are full, the oldest half is dropped if the longest window fits in the other half, otherwise
    neighbouring blocks are merged (the block size doubles).
    """

    def __init__(self, n: int, slots: int = 64, extras: int = 0) -> None:
        if slots < 2 * BLOCKS_PER_WINDOW or slots % 2:
            raise ValueError(f"need an even number of at least {2 * BLOCKS_PER_WINDOW} slots, got {slots}")
        self.slots = slots
        self.stride = 1.0
        self.extras = int(extras)
        """Passive per-sample series summed per block (window means only: no line, no standard error)."""
        width = len(FIELDS) + self.extras
        self.data = np.zeros((n, slots, width))
        self.current = np.zeros((n, width))
        self.filled = np.zeros(n, dtype=np.int64)
        self.block_size = np.ones(n, dtype=np.int64)
        self.max_window = np.zeros(n)
        """The longest window (steps) the caller will ask for, set by :meth:`reset`: when slots run out, blocks
        older than it are dropped rather than merged."""
        self.origin = np.zeros(n)
        self.prev = np.full((n, 3), np.nan)  # (t, x, y) of the previous sample; nan: none since the reset

    def reset(self, units: np.ndarray, block_size: np.ndarray, origin: np.ndarray | float, max_window: np.ndarray | float = 0.0) -> None:
        units = np.asarray(units, dtype=np.int64)
        self.filled[units] = 0
        self.block_size[units] = np.maximum(np.asarray(block_size, dtype=np.int64), 1)
        self.origin[units] = origin
        self.max_window[units] = max_window
        self.prev[units] = np.nan
        self.current[units] = 0.0

    def add(self, units: np.ndarray, step: float, x: np.ndarray, y: np.ndarray, extra: np.ndarray | None = None) -> None:
        """One sample (taken at ``step``) of every unit in ``units``. A non-finite sample is skipped and breaks
        the chain of consecutive pairs. ``extra`` (``[len(units), extras]``) are the passive series' samples (a
        non-finite one counts as 0)."""
        units = np.asarray(units, dtype=np.int64)
        if self.extras:
            extra = np.zeros((len(units), self.extras)) if extra is None else np.asarray(extra, dtype=np.float64).reshape(len(units), self.extras)
            extra = np.where(np.isfinite(extra), extra, 0.0)  # passive: never costs the judged series a sample
        ok = np.isfinite(x) & np.isfinite(y)
        if not ok.all():
            self.prev[units[~ok]] = np.nan
            units, x, y = units[ok], x[ok], y[ok]
            extra = extra[ok] if extra is not None else None
        t = step - self.origin[units]
        prev = self.prev[units]
        pw = np.isfinite(prev[:, 0]).astype(np.float64)  # 1 where the previous sample is there
        lx, ly = np.nan_to_num(prev[:, 1]), np.nan_to_num(prev[:, 2])
        tt = t * t
        columns = [np.ones_like(t), t, tt, pw, pw * t, pw * tt]
        for z, lag in ((x, lx), (y, ly)):
            zp, lp = pw * z, pw * lag
            columns += [z, z * z, t * z, zp, lp, zp * lag, t * zp, t * lp]
        if self.extras and extra is not None:
            columns += list(extra.T)
        self.current[units] += np.stack(columns, axis=1)
        self.prev[units] = np.stack([t, x, y], axis=1)
        done = units[self.current[units, _F["n"]] >= self.block_size[units]]
        if done.size:
            self._close(done)

    def _close(self, units: np.ndarray) -> None:
        for u in units[self.filled[units] >= self.slots]:
            self._make_room(int(u))
        self.data[units, self.filled[units]] = self.current[units]
        self.current[units] = 0.0
        self.filled[units] += 1

    def _make_room(self, u: int) -> None:
        half = self.slots // 2
        need = math.ceil(self.max_window[u] / (self.block_size[u] * self.stride)) + 1
        if need <= half:  # the longest window fits in the newer half: drop the older one
            self.data[u, :half] = self.data[u, half:]
        else:  # merge neighbours: sums add up; the block size doubles
            self.data[u, :half] = self.data[u].reshape(half, 2, self.data.shape[2]).sum(1)
            self.block_size[u] *= 2
        self.data[u, half:] = 0.0
        self.filled[u] = half

    def fit(self, units: np.ndarray, window_steps: np.ndarray, max_inflation: np.ndarray | float = np.inf) -> WindowFit:
        """Least-squares lines through the samples of each unit's last ``window_steps`` steps (whole blocks),
        with standard errors for autocorrelated samples.

        ``max_inflation`` caps the factor by which autocorrelation inflates the variance (the long-run variance
        over the residual variance). In a steady state the slowest correlation is the relaxation itself, with
        time constant ``τ_r``, which bounds the factor by ``1 + 2τ_r/stride``; without the cap a smooth
        curvature (a relaxation's tail) would read as near-perfect correlation."""
        units = np.asarray(units, dtype=np.int64)
        win = self._window(units, window_steps)
        mean_x, se_mean_x, slope_x, se_slope_x, rho_x = _line_fit(win, "x", self.stride, max_inflation)
        _, _, slope_y, se_slope_y, _ = _line_fit(win, "y", self.stride, max_inflation)
        ok = win.ok
        nan = np.full(len(units), np.nan)
        keep = lambda a: np.where(ok, a, nan)  # noqa: E731
        return WindowFit(
            blocks=win.blocks,
            samples=win.tot["n"],
            mean_x=keep(mean_x),
            se_mean_x=keep(se_mean_x),
            slope_x=keep(slope_x),
            se_slope_x=keep(se_slope_x),
            slope_y=keep(slope_y),
            se_slope_y=keep(se_slope_y),
            rho_x=keep(rho_x),
            mean_extra=(np.where(ok, win.sums[len(FIELDS) :] / win.N, np.nan).T if self.extras else None),
        )

    def _window(self, units: np.ndarray, window_steps: np.ndarray) -> _Window:
        """The blocks of ``units`` whose mean time lies within ``window_steps`` of their last block's, summed."""
        filled = self.filled[units]
        everything = len(units) == len(self.filled) and bool((units == np.arange(len(units))).all())
        data = self.data if everything else self.data[units]
        n_k = data[..., _F["n"]]
        with np.errstate(divide="ignore", invalid="ignore"):
            centre = np.where(n_k > 0, data[..., _F["st"]] / n_k, np.nan)  # block mean time (relative to the origin)
        cols = np.arange(self.slots)[None, :]
        have = cols < filled[:, None]
        last = np.take_along_axis(centre, np.maximum(filled - 1, 0)[:, None], 1)[:, 0]
        start = last - np.asarray(window_steps, dtype=np.float64)
        with np.errstate(invalid="ignore"):
            mask = have & (centre > start[:, None])
        w = mask.astype(np.float64)
        sums = np.einsum("usf,us->fu", data, w)
        tot = dict(zip(FIELDS, sums))
        blocks = w.sum(1)
        ok = (blocks >= MIN_BLOCKS) & (tot["n"] > 3)
        N = np.where(ok, tot["n"], 4.0)
        tb = tot["st"] / N
        stt = tot["stt"] - N * tb * tb
        stt_safe = np.where(stt > 0, stt, 1.0)
        return _Window(data, n_k, centre, mask, w, sums, tot, blocks, ok, N, tb, stt, stt_safe)

    # checkpointing ---------------------------------------------------------------------------
    _STATE = ("data", "current", "filled", "block_size", "max_window", "origin", "prev")

    def state_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {name: getattr(self, name).tolist() for name in self._STATE}
        out["stride"] = self.stride
        return out

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name in self._STATE:
            current = getattr(self, name)
            setattr(self, name, np.asarray(state[name], dtype=current.dtype).reshape(current.shape))
        self.stride = float(state.get("stride", 1.0))


@dataclass
class _Window:
    """One :meth:`BlockSeries.fit`'s window, per unit: its blocks and the sums over them (arrays over the units
    asked for; ``[units, slots]`` per block)."""

    data: np.ndarray
    """``[units, slots, fields]``: the blocks' sums."""
    n_k: np.ndarray
    """Samples per block."""
    centre: np.ndarray
    """Block mean time (relative to the unit's origin)."""
    mask: np.ndarray
    """Whether the block is in the window."""
    w: np.ndarray
    """``mask`` as 0/1 weights."""
    sums: np.ndarray
    """``[fields (+ extras), units]``: the sums over the window."""
    tot: dict[str, np.ndarray]
    """``sums`` by field name."""
    blocks: np.ndarray
    """Complete blocks in the window."""
    ok: np.ndarray
    """Enough blocks and samples for a fit."""
    N: np.ndarray
    """Samples (4 where not ``ok``, to keep the arithmetic finite)."""
    tb: np.ndarray
    """Mean time."""
    stt: np.ndarray
    """Centred sum of squared times."""
    stt_safe: np.ndarray
    """``stt`` where positive, else 1."""


def _line_fit(win: _Window, key: str, s: float, max_inflation: np.ndarray | float) -> tuple[np.ndarray, ...]:
    """The line through series ``key`` (``"x"`` or ``"y"``) over the window, with stride ``s``: its mean, the
    standard error of the mean, its slope and the slope's standard error (nan where the times do not spread),
    and the lag-1 autocorrelation of the residuals behind the inflation."""
    tot, N, tb, stt, stt_safe = win.tot, win.N, win.tb, win.stt, win.stt_safe
    zb = tot[f"s_{key}"] / N
    szz = tot[f"ss_{key}"] - N * zb * zb
    stz = tot[f"ts_{key}"] - N * tb * zb
    slope = stz / stt_safe
    ssres = np.maximum(szz - slope * stz, 0.0)
    lag = _residual_lag_cov(tot, key, zb, tb, slope, s)
    with np.errstate(divide="ignore", invalid="ignore"):
        raw = np.where(ssres > 0, lag / ssres, 0.0)
    # the lag-1 autocorrelation of detrended residuals is biased low by about (2 + 4ρ)/N
    rho = np.clip(np.nan_to_num(raw + (2.0 + 4.0 * raw) / N, nan=0.0), 0.0, MAX_RHO)
    infl = np.minimum((1.0 + rho) / (1.0 - rho), max_inflation)
    # detrending also removes about two correlation times' worth of the residuals' variance
    sigma2 = ssres / np.maximum(N - 2.0 * infl, N / 4.0)
    lrv_step = sigma2 * infl
    lrv_blocks, infl_blocks = _block_lrv(win, key, zb, slope)
    with np.errstate(invalid="ignore"):
        cap = np.nan_to_num(sigma2 * max_inflation, nan=np.inf)  # 0·inf: no cap
    lrv = np.minimum(np.maximum(lrv_step, lrv_blocks * infl_blocks), cap)
    se_slope = np.where(stt > 0, np.sqrt(lrv / stt_safe), np.nan)
    return zb, np.sqrt(lrv / N), np.where(stt > 0, slope, np.nan), se_slope, rho


def _residual_lag_cov(tot: dict[str, np.ndarray], key: str, zb: np.ndarray, tb: np.ndarray, slope: np.ndarray, s: float) -> np.ndarray:
    """The detrended lag-1 autocovariance (a sum over the pairs) of the residuals of series ``key`` about the
    line ``zb + slope·(t − tb)``, from the pair sums; ``s`` is the stride (time between consecutive samples)."""
    P, Pt, Ptt = tot["p"], tot["pt"], tot["ptt"]
    Pz, Pl, Pzl, Ptz, Ptl = (tot[f"{m}_{key}"] for m in ("ps", "pl", "psl", "pts", "ptl"))
    cov_zz = Pzl - zb * (Pz + Pl) + P * zb * zb
    cov_z_ul = Ptz - (s + tb) * Pz - zb * (Pt - (s + tb) * P)
    cov_l_ut = Ptl - tb * Pl - zb * (Pt - tb * P)
    cov_uu = Ptt - 2.0 * tb * Pt + P * tb * tb - s * (Pt - tb * P)
    return cov_zz - slope * cov_z_ul - slope * cov_l_ut + slope * slope * cov_uu


def _block_lrv(win: _Window, key: str, zb: np.ndarray, slope: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The long-run variance per sample of series ``key`` from the spread of the blocks' means about the line, and
    the inflation for their own lag-1 autocorrelation (catches correlation slower than a step's AR(1) suggests)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        means = win.data[..., _F[f"s_{key}"]] / win.n_k
        res_k = np.where(win.mask, means - zb[:, None] - slope[:, None] * (win.centre - win.tb[:, None]), 0.0)
    lrv_blocks = (win.n_k * res_k * res_k * win.w).sum(1) / np.maximum(win.blocks - 2.0, 1.0)
    infl_blocks, _ = _ar1_inflation(res_k, win.w, win.blocks)
    return lrv_blocks, infl_blocks


def _ar1_inflation(res: np.ndarray, w: np.ndarray, n: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Variance inflation ``(1+ρ)/(1−ρ)`` of a mean (or slope) of block means with lag-1 autocorrelation ρ.

    ρ is the lag-1 autocorrelation of the residuals, corrected for its small-sample bias (Kendall:
    ``E ρ̂ ≈ ρ − (1 + 3ρ)/n``, so ``ρ ≈ (ρ̂ + 1/n)/(1 − 3/n)``), clipped to ``[0, MAX_RHO]``: negative
    correlation is not credited (conservative)."""
    pairs = (res[:, 1:] * res[:, :-1] * w[:, 1:] * w[:, :-1]).sum(1)
    ss = (res * res).sum(1)
    with np.errstate(divide="ignore", invalid="ignore"):
        raw = np.where(ss > 0, pairs / ss, 0.0)
        nn = np.maximum(n, 4.0)
        rho = (raw + 1.0 / nn) / (1.0 - 3.0 / nn)
    rho = np.clip(np.nan_to_num(rho, nan=0.0), 0.0, MAX_RHO)
    return (1.0 + rho) / (1.0 - rho), rho
