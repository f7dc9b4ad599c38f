"""Views that stay readable at 50+ layers: the layer × step heatmap of Δ/Δ*, the worst layers, the
progress-bar line and the choice of per-layer series.

Everything here works on the host-side history the session keeps at log steps (one row of smoothed ratios
per log step): nothing touches the step path. matplotlib is imported only to draw, and only when installed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from lightning_smd.analysis.keys import NAMESPACE, progress_key, worst_key

__all = ["RatioHistory", "heatmap_figure", "render_rgb", "worst_units", "worst_metrics", "PER_LAYER_CHOICES", "per_layer_mode", "progress_text"]

#: What ``log_per_layer`` may be: every per-layer series, only the ratio Δ/Δ*, or none.
PER_LAYER_CHOICES = ("all", "ratio", "none")
#: With ``log_per_layer="auto"``, models with more tracked layers than this log the per-layer ratio only.
AUTO_ALL_LAYERS = 16


def per_layer_mode(choice: bool | str, n_layers: int) -> str:
    """``"all"``, ``"ratio"`` or ``"none"`` for the ``log_per_layer`` option (``True``/``False`` are
    ``"all"``/``"none"``; ``"auto"``: all series up to 16 layers, the ratio only above)."""
    if choice is True:
        return "all"
    if choice is False:
        return "none"
    if choice == "auto":
        return "all" if n_layers <= AUTO_ALL_LAYERS else "ratio"
    if choice in PER_LAYER_CHOICES:
        return str(choice)
    raise ValueError(f"log_per_layer must be True, False, 'auto', 'all', 'ratio' or 'none', got {choice!r}")


class RatioHistory:
    """The smoothed Δ/Δ* of every unit at each log step, bounded: past ``max_columns`` columns every other
    one is dropped (the picture keeps its shape, the memory stays below ``units × max_columns`` floats)."""

    def __init__(self, n_units: int, max_columns: int = 2048) -> None:
        self.n_units = n_units
        self.max_columns = max(int(max_columns), 4)
        self.steps: list[int] = []
        self.columns: list[np.ndarray] = []

    def append(self, step: int, ratios: np.ndarray) -> None:
        """Add the column of log step ``step`` (a step not after the last one replaces the last column)."""
        if self.steps and step <= self.steps[-1]:
            self.steps[-1], self.columns[-1] = step, np.array(ratios, dtype=float)
            return
        self.steps.append(int(step))
        self.columns.append(np.array(ratios, dtype=float))
        if len(self.steps) > self.max_columns:
            self.steps, self.columns = self.steps[::2], self.columns[::2]

    def matrix(self) -> np.ndarray:
        """``[units, log steps]``."""
        if not self.columns:
            return np.zeros((self.n_units, 0))
        return np.stack(self.columns, axis=1)

    def __len__(self) -> int:
        return len(self.steps)


def worst_units(ratios: np.ndarray, applicable: np.ndarray, k: int) -> list[int]:
    """The ``k`` units furthest from their prediction (largest ``|log Δ/Δ*|``; units without a ratio last)."""
    r = np.asarray(ratios, dtype=float)
    distance = np.where(applicable & np.isfinite(r) & (r > 0), np.abs(np.log(np.where(r > 0, r, 1.0))), -1.0)
    order = np.argsort(-distance, kind="stable")
    return [int(u) for u in order[:k] if distance[u] >= 0.0]


def worst_metrics(ratios: np.ndarray, applicable: np.ndarray, k: int, namespace: str = NAMESPACE) -> dict[str, float]:
    """``smd/worst/<i>/angular_update_ratio`` (:func:`~lightning_smd.analysis.keys.worst_key`) for i = 1..k, the
    i-th furthest unit's smoothed Δ/Δ* (nan when fewer units have a ratio): a few series whatever the model's size.
    Which layers they are is in the heatmap and the summary."""
    units = worst_units(ratios, applicable, k)
    return {worst_key(i + 1, namespace): (float(ratios[units[i]]) if i < len(units) else math.nan) for i in range(k)}


def progress_text(median_ratio: float, in_equilibrium: int, judged: int, namespace: str = NAMESPACE) -> dict[str, str]:
    """The two aggregates for the progress bar, ``smd Δ/Δ*`` and ``smd eq`` (strings: the bars print them as they
    are)."""
    ratio = "-" if not math.isfinite(median_ratio) else f"{median_ratio:.2f}"
    return {progress_key("Δ/Δ*", namespace): ratio, progress_key("eq", namespace): f"{in_equilibrium}/{judged}"}


def heatmap_figure(
    steps: Sequence[int],
    ratios: np.ndarray,
    names: Sequence[str],
    tolerance: float,
    title: str = "SMD: smoothed angular update / prediction",
) -> Any:
    """A matplotlib figure of ``ratios`` (``[units, log steps]``) as a layer × step heatmap: diverging colours
    centred at Δ/Δ* = 1 on a log scale (blue below, red above; white within ``1 ± tolerance``), layers top
    to bottom in network order. Returns None when matplotlib is not installed."""
    try:  # a Figure without pyplot: no global state, no backend switched in the user's process
        from matplotlib import colormaps
        from matplotlib.colors import BoundaryNorm, ListedColormap
        from matplotlib.figure import Figure
    except ImportError:
        return None
    data = np.asarray(ratios, dtype=float)
    n, m = data.shape if data.ndim == 2 else (len(names), 0)
    log_ratio = np.log2(np.where(np.isfinite(data) & (data > 0), data, np.nan))
    # colour bands: ±tolerance is one neutral band, then steps of the same width up to a factor 2 either way
    band = math.log2(1.0 + tolerance)
    edges_up = [band]
    while edges_up[-1] < 1.0:
        edges_up.append(min(edges_up[-1] + band, 1.0))
    edges = [-e for e in reversed(edges_up)] + edges_up
    levels = len(edges) - 1
    diverging = colormaps["RdBu_r"]
    cmap = ListedColormap(diverging(np.linspace(0.0, 1.0, levels)))
    cmap.set_bad("#d0d0d0")
    cmap.set_under(diverging(0.0))
    cmap.set_over(diverging(1.0))
    norm = BoundaryNorm(edges, cmap.N)
    height = min(max(2.2, 0.16 * n + 1.2), 12.0)
    fig = Figure(figsize=(9.0, height), dpi=80)
    label_width = max((len(_short(s)) for s in names), default=10)
    size = 8 if n <= 30 else (6 if n <= 60 else 4)
    left = min(0.45, 0.02 + label_width * size * 0.6 / (9.0 * 72.0))
    ax = fig.add_axes((left, 0.6 / height, 0.88 - left, 1.0 - 1.0 / height))
    if m:
        x = np.asarray(steps, dtype=float)
        half = (x[1] - x[0]) / 2.0 if m > 1 else 0.5
        # imshow (one image) rather than a mesh of cells: ~10x cheaper to draw; log steps are evenly spaced
        image = ax.imshow(
            np.ma.masked_invalid(log_ratio), cmap=cmap, norm=norm, aspect="auto", interpolation="nearest",
            extent=(x[0] - half, x[-1] + half, n, 0),
        )  # fmt: skip
        cax = fig.add_axes((0.9, 0.6 / height, 0.015, 1.0 - 1.0 / height))
        bar = fig.colorbar(image, cax=cax, extend="both")
        bar.set_ticks([-1.0, 0.0, 1.0])
        bar.set_ticklabels(["0.5", "1", "2"])
        bar.set_label(f"Δ/Δ* (white: 1 ± {tolerance:.0%})", fontsize=8)
    ax.set_ylim(n, 0)
    ax.set_yticks(np.arange(n) + 0.5)
    ax.set_yticklabels([_short(s) for s in names], fontsize=size)
    ax.set_xlabel("optimizer step", fontsize=8)
    ax.tick_params(axis="x", labelsize=8)
    ax.set_title(title, fontsize=9)
    return fig


def render_rgb(figure: Any) -> np.ndarray:
    """The figure's pixels, ``[height, width, 3]`` uint8: drawn once, handed to every logger."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(figure)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def _short(name: str, width: int = 40) -> str:
    return name if len(name) <= width else "…" + name[-(width - 1) :]
