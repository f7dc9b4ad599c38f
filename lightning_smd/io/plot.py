"""Pictures of a run: measured against predicted, per layer, from what the loggers wrote.

    lightning-smd plot LOG_DIR_OR_CSV -o smd.png [--layers 6] [--all] [--name LABEL]

Reads the ``smd/*`` series from a CSVLogger ``metrics.csv`` (or, when there is none, from TensorBoard event
files) and, when it finds one, the run's ``smd_summary.json`` (tolerance, equilibrium steps); with several
SMDCallbacks in the run, ``--name LABEL`` picks one (``smd-LABEL/*``, ``smd_summary-LABEL.json``). One row per
layer — by default the ``--layers`` worst, by final distance of their ratio to 1 — after a first row with
the aggregates:

- left: the smoothed angular update and its prediction (log scale), the ``1 ± tolerance`` band around the
  prediction, the step the layer reached equilibrium (solid vertical line), and learning-rate changes
  (dotted vertical lines: the prediction moves with them; a schedule that changes it at more than 12 steps
  draws none);
- right: the weight norm and its predicted equilibrium value.

Under a schedule read ahead, the left panel also draws the layer's trajectory ``Δ̂`` (what it is judged against:
the moving equilibrium with the layer's lag), and the heatmap shows ``Δ/Δ̂``.

Needs matplotlib (``pip install "lightning-smd[plot]"``).
"""

from __future__ import annotations

import csv
import itertools
import json
import math
import os
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np

from lightning_smd.analysis.keys import NAMESPACE, WORST, key, label_of, metric_name, namespace_for, namespace_of, split_layer_key
from lightning_smd.io.report import summary_filename

__all__ = ["load_series", "plot_run", "heatmap_run", "newest_file"]

Series = dict[str, tuple[np.ndarray, np.ndarray]]


def newest_file(directory: str, filename: str) -> str | None:
    """The most recently modified file called ``filename`` anywhere below ``directory``, or None."""
    found = []
    for root, _, files in os.walk(directory):
        if filename in files:
            full = os.path.join(root, filename)
            found.append((os.path.getmtime(full), full))
    return max(found)[1] if found else None


def _find(path: str, filename: str) -> str | None:
    if os.path.isfile(path):
        return path if os.path.basename(path) == filename or filename.endswith(".csv") else None
    return newest_file(path, filename)


#: Rows of a metrics.csv parsed at a time: memory holds one chunk of strings, and the ``smd/*`` columns as floats.
_CSV_CHUNK = 50_000


def _number(text: str) -> float:
    try:
        return float(text) if text else math.nan
    except ValueError:
        return math.nan


def _numbers(cells: Sequence[str]) -> np.ndarray:
    """A column of CSV cells as floats, empty or unparsable cells as nan (the cell-by-cell parse, a third
    slower, only for a column that has such a cell)."""
    try:
        return np.fromiter(map(float, cells), dtype=np.float64, count=len(cells))
    except ValueError:
        return np.array([_number(c) for c in cells], dtype=np.float64)


def _from_csv(path: str) -> Series:
    """The ``smd/*`` (and ``smd-<label>/*``) columns of a CSVLogger file as float arrays, read in chunks of rows,
    a column at a time (a 10⁶-row file is held as ``8 bytes × rows × smd columns``, not a dict per cell). Empty or
    unparsable cells and rows without a step are skipped; where a step appears twice, its last value counts."""
    with open(path, newline="") as fh:
        reader = csv.reader(fh)
        header = next(reader, [])
        if "step" not in header:
            return {}
        width = len(header)
        step_col = header.index("step")
        cols = [i for i, name in enumerate(header) if namespace_of(name)]
        steps: list[np.ndarray] = []
        values: list[list[np.ndarray]] = [[] for _ in cols]
        while True:
            chunk = list(itertools.islice(reader, _CSV_CHUNK))
            if not chunk:
                break
            if any(len(row) != width for row in chunk):  # as DictReader: short rows padded, extra cells dropped
                chunk = [(row + [""] * (width - len(row)))[:width] for row in chunk]
            columns = list(zip(*chunk))
            steps.append(_numbers(columns[step_col]))
            for j, i in enumerate(cols):
                values[j].append(_numbers(columns[i]))
    if not steps:
        return {}
    step = np.concatenate(steps)
    out: Series = {}
    for j, i in enumerate(cols):
        column = np.concatenate(values[j])
        ok = np.isfinite(step) & np.isfinite(column)
        if not ok.any():
            continue
        s, v = step[ok].astype(np.int64), column[ok]
        # the last value of a repeated step: unique over the reversed arrays keeps the first occurrence there
        uniq, first = np.unique(s[::-1], return_index=True)
        out[header[i]] = (uniq, v[::-1][first])
    return out


def _from_tensorboard(path: str) -> Series:
    try:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    except ImportError as err:  # pragma: no cover - tensorboard is a test dependency
        raise ValueError(f"{path}: no metrics.csv, and reading TensorBoard event files needs tensorboard ({err})") from err
    dirs = sorted({root for root, _, files in os.walk(path) if any(f.startswith("events.out.tfevents") for f in files)})
    out: Series = {}
    for d in dirs:
        acc = EventAccumulator(d, size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags().get("scalars", []):
            if namespace_of(tag):
                events = acc.Scalars(tag)
                out[tag] = (np.array([e.step for e in events]), np.array([e.value for e in events], dtype=np.float64))
    return out


def _one_namespace(path: str, series: Series, name: str | None) -> tuple[Series, str | None]:
    """The series of one SMDCallback, keys as ``smd/...``, and its label: the one called ``name``, else the
    unlabelled one (the Trainer's first), else the only one logged."""
    spaces = sorted({namespace_of(k) for k in series} - {None})
    labels = [label_of(ns) for ns in spaces if ns != NAMESPACE]
    if name is not None:
        wanted = namespace_for(name)
        if wanted not in spaces:
            logged = ", ".join(f"{ns}/*" for ns in spaces)
            raise ValueError(f"{path}: no {wanted}/* metrics (no SMDCallback(name={name!r}) logged here); logged: {logged}")
    elif NAMESPACE in spaces:
        wanted = NAMESPACE
    elif len(labels) == 1:
        wanted = spaces[0]
    else:
        raise ValueError(f"{path}: several SMDCallbacks logged here ({', '.join(labels)}): choose one with --name")
    prefix = wanted + "/"
    return {key(k[len(prefix) :]): v for k, v in series.items() if k.startswith(prefix)}, label_of(wanted)


def load_series(path: str, name: str | None = None) -> tuple[Series, dict[str, Any] | None]:
    """The logged ``smd/*`` series (key -> (steps, values)) under ``path``, and the run summary if found.

    ``name``: the label of one of several SMDCallbacks in the run (``SMDCallback(name=...)``, or the label its
    warnings carry): its ``smd-<name>/*`` series, returned as ``smd/*``, and its ``smd_summary-<name>.json``.
    Without it: the unlabelled callback's, or the only one's."""
    if not os.path.exists(path):
        raise ValueError(f"{path}: no such file or directory")
    csv_path = path if os.path.isfile(path) else _find(path, "metrics.csv")
    series = _from_csv(csv_path) if csv_path else _from_tensorboard(path)
    if not series:
        raise ValueError(f"{path}: no smd/* metrics found (log with a CSVLogger or TensorBoardLogger and SMDCallback)")
    series, label = _one_namespace(path, series, name)
    summary = None
    base = os.path.dirname(csv_path) if csv_path else path
    summary_path = _find(base, summary_filename(label))
    if summary_path:
        try:
            with open(summary_path) as fh:
                summary = json.load(fh)
        except (OSError, json.JSONDecodeError):
            summary = None
    return series, summary


def _layers(series: Series, metric: str = "angular_update") -> list[str]:
    """The layers (as their keys name them) with a ``smd/<layer>/<metric>`` series, in the series' order."""
    return [parts[0] for parts in map(split_layer_key, series) if parts is not None and parts[1] == metric]


def _final(series: Series, name: str) -> float:
    """The last finite value of the series ``name``, or nan."""
    if name not in series or not len(series[name][1]):
        return math.nan
    values = series[name][1]
    finite = values[np.isfinite(values)]
    return float(finite[-1]) if len(finite) else math.nan


#: More learning-rate changes than this are a continuous schedule (cosine, linear warm-up): no line per step.
_MAX_LR_LINES = 12


def _lr_changes(series: Series, layer: str) -> list[int]:
    """Steps where the learning rate (``effective_lr · |w|²``) changed by more than 1e-6 relative; empty when it
    changed at more than ``_MAX_LR_LINES`` steps (a schedule that moves every step is not a set of events)."""
    e, n = series.get(key(layer, "effective_lr")), series.get(key(layer, "weight_norm"))
    if e is None or n is None or len(e[0]) != len(n[0]) or len(e[0]) < 2:
        return []
    lr = e[1] * n[1] ** 2
    with np.errstate(divide="ignore", invalid="ignore"):
        moved = np.isfinite(lr[1:]) & np.isfinite(lr[:-1]) & (np.abs(lr[1:] / lr[:-1] - 1.0) > 1e-6)
    steps = e[0][1:][moved]
    return [] if len(steps) > _MAX_LR_LINES else [int(x) for x in steps]


#: Points drawn per line at most: a panel is ~600 pixels wide, so more points draw the same picture, slower.
_MAX_POINTS = 4000


def _thin(steps: np.ndarray, values: np.ndarray, limit: int = _MAX_POINTS) -> tuple[np.ndarray, np.ndarray]:
    """At most ``limit`` points of a series for drawing: the smallest and the largest value of each of
    ``limit / 2`` consecutive buckets, in step order, so spikes stay visible; a bucket with no finite value keeps
    one nan, so the line breaks across a gap (a diverged stretch) instead of bridging it."""
    count = len(steps)
    if count <= limit:
        return steps, values
    size = -(-count // (limit // 2))  # points per bucket, rounded up
    buckets = -(-count // size)
    padded = np.full(buckets * size, np.nan)
    padded[:count] = values
    table = padded.reshape(buckets, size)
    finite = np.isfinite(table)
    low = np.where(finite, table, np.inf).argmin(axis=1)
    high = np.where(finite, table, -np.inf).argmax(axis=1)
    base = np.arange(buckets) * size
    keep = np.unique(np.concatenate([base + low, base + high]))
    keep = keep[keep < count]
    return steps[keep], values[keep]


def _pyplot() -> Any:
    """``matplotlib.pyplot`` on the Agg backend (files only, no window); ValueError saying how to install it."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:
        raise ValueError('plotting needs matplotlib: pip install "lightning-smd[plot]" (or pip install matplotlib)') from err
    return plt


def _chosen_layers(series: Series, all_layers: list[str], layers: int | None, names: Sequence[str] | None) -> list[str]:
    """The layers to draw a row for: those in ``names`` that were logged, else the ``layers`` (None: all) furthest
    from their prediction by the final ratio (layers without a finite one last)."""
    if names:
        return [metric_name(n) for n in names if metric_name(n) in all_layers]

    def distance(layer: str) -> float:
        final = _final(series, key(layer, "angular_update_ratio"))
        return -abs(final - 1.0) if math.isfinite(final) else -math.inf

    worst = sorted(all_layers, key=distance)
    return worst if layers is None else worst[:layers]


def _draw_aggregates(axes: Any, series: Series, all_layers: Sequence[str], tol: float) -> None:
    """The first row: the median ratio with the equilibrium band (left), the share of layers in equilibrium (right)."""
    ax_r, ax_f = axes
    aggregate = panel_ratio(series, all_layers)
    if aggregate is not None or key("angular_update_ratio") in series:
        # the median of what the panels below show (Δ (EMA) / Δ* (EMA)); runs logged before Δ* (EMA) existed: the
        # logged median of the smoothed per-step ratio
        s, v = aggregate if aggregate is not None else series[key("angular_update_ratio")]
        label = "median over layers of Δ (EMA) / Δ* (EMA)" if aggregate is not None else "median Δ/Δ* over layers"
        ax_r.plot(*_thin(s, v), color="C0", lw=1.5, label=label)
        ax_r.axhspan(1 - tol, 1 + tol, color="C2", alpha=0.15, label=f"equilibrium band ±{tol:.0%}")
        ax_r.axhline(1.0, color="C2", lw=0.8)
        ax_r.set_ylabel("Δ / Δ*")
        ax_r.legend(loc="best", fontsize=7)
    if key("equilibrium_fraction") in series:
        s, v = series[key("equilibrium_fraction")]
        ax_f.plot(*_thin(s, v), color="C3", lw=1.5)
        ax_f.set_ylim(-0.05, 1.05)
        ax_f.set_ylabel("share in equilibrium")
    ax_r.set_title("all layers", fontsize=9, loc="left")


def _draw_prediction(ax: Any, series: Series, layer: str, tol: float) -> None:
    """The layer's prediction Δ* (its EMA, as Δ is smoothed, where logged) with the ``1 ± tol`` band around it, and
    the prediction of the latest step as a dotted line beside the EMA."""
    smoothed = key(layer, "smoothed_predicted_angular_update")
    latest = key(layer, "predicted_angular_update")
    band = smoothed if smoothed in series else latest
    if band in series:
        s, p = series[band]
        ok = np.isfinite(p) & (p > 0)
        if ok.any():
            label = "predicted Δ* (EMA, as Δ)" if band == smoothed else "predicted Δ*"
            s, p = _thin(s[ok], p[ok])
            ax.plot(s, p, color="k", lw=1.0, ls="--", label=label)
            ax.fill_between(s, p * (1 - tol), p * (1 + tol), color="C2", alpha=0.2, lw=0, label=f"±{tol:.0%}")
    if band == smoothed and latest in series:
        s, p = series[latest]
        ok = np.isfinite(p) & (p > 0)
        if ok.any():
            ax.plot(*_thin(s[ok], p[ok]), color="0.5", lw=0.8, ls=":", label="Δ* of the latest step")


def _equilibrium_step(series: Series, layer: str, from_summary: int | None) -> int | None:
    """The step the layer first reached equilibrium: the summary's, else the first logged ``in_equilibrium``."""
    if from_summary is None and key(layer, "in_equilibrium") in series:
        s, e = series[key(layer, "in_equilibrium")]
        hit = np.nonzero(e > 0.5)[0]
        return int(s[hit[0]]) if len(hit) else None
    return from_summary


def _draw_angular_update(ax: Any, series: Series, layer: str, tol: float, eq_step: int | None) -> None:
    """A layer's left panel: measured Δ against the prediction, the equilibrium step and learning-rate changes."""
    if key(layer, "angular_update") in series:
        s, v = series[key(layer, "angular_update")]
        ax.plot(*_thin(s, v), color="C0", lw=1.5, label="measured Δ (EMA)")
    _draw_prediction(ax, series, layer, tol)
    if key(layer, "trajectory_angular_update") in series:  # a schedule followed: the trajectory it is judged against
        s, v = series[key(layer, "trajectory_angular_update")]
        ok = np.isfinite(v) & (v > 0)
        if ok.any():
            ax.plot(*_thin(s[ok], v[ok]), color="C3", lw=1.2, label="trajectory Δ̂ (EMA, as Δ): the moving equilibrium")
    positive = [series[k][1] for k in (key(layer, "angular_update"), key(layer, "predicted_angular_update")) if k in series]
    if positive and all((x[np.isfinite(x)] > 0).all() for x in positive):
        ax.set_yscale("log")
    if eq_step is not None:
        ax.axvline(eq_step, color="C2", lw=1.2, label=f"first steady window from step {eq_step}")
    for k, step in enumerate(_lr_changes(series, layer)):
        ax.axvline(step, color="0.5", lw=0.8, ls=":", label="learning-rate change" if k == 0 else None)
    ax.set_ylabel("angular update (rad)")
    ax.set_title(layer, fontsize=9, loc="left")
    ax.legend(loc="best", fontsize=7)


def _draw_weight_norm(ax: Any, series: Series, layer: str) -> None:
    """A layer's right panel: the weight norm and its predicted equilibrium value."""
    if key(layer, "weight_norm") in series:
        s, v = series[key(layer, "weight_norm")]
        ax.plot(*_thin(s, v), color="C1", lw=1.5, label="‖w‖")
    if key(layer, "predicted_weight_norm") in series:
        s, v = series[key(layer, "predicted_weight_norm")]
        ax.plot(*_thin(s, v), color="k", lw=1.0, ls="--", label="predicted ‖w*‖")
    ax.set_ylabel("weight norm")
    ax.legend(loc="best", fontsize=7)


def plot_run(path: str, output: str, layers: int | None = 6, names: Sequence[str] | None = None, dpi: int = 120, name: str | None = None) -> str:
    """Draw the figure for the run under ``path`` into ``output`` (PNG, PDF or SVG by extension); ``name``: which
    SMDCallback's series, when the run had several (see :func:`load_series`)."""
    plt = _pyplot()
    series, summary = load_series(path, name)
    tol = float((summary or {}).get("criteria", {}).get("tolerance", 0.1))
    first_eq = {r["name"]: r.get("first_equilibrium_step") for r in (summary or {}).get("layers", [])}
    first_eq = {metric_name(k): v for k, v in first_eq.items()}
    all_layers = _layers(series)
    chosen = _chosen_layers(series, all_layers, layers, names)
    rows = 1 + len(chosen)
    fig, axes = plt.subplots(rows, 2, figsize=(11, 2.4 * rows), squeeze=False)
    verdict = (summary or {}).get("verdict")
    title = "Spherical Motion Dynamics: measured vs predicted" + (f" ({name})" if name else "") + (f" — verdict: {verdict}" if verdict else "")
    fig.suptitle(title, fontsize=12)
    _draw_aggregates(axes[0], series, all_layers, tol)
    for row, layer in enumerate(chosen, start=1):
        ax_d, ax_n = axes[row]
        _draw_angular_update(ax_d, series, layer, tol, _equilibrium_step(series, layer, first_eq.get(layer)))
        _draw_weight_norm(ax_n, series, layer)
    for ax in axes[-1]:
        ax.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(output, dpi=dpi)
    plt.close(fig)
    return output


def panel_ratio(series: Series, layers: Sequence[str]) -> tuple[np.ndarray, np.ndarray] | None:
    """``(steps, median over layers of Δ (EMA) / Δ* (EMA))``: the aggregate of exactly what the layer panels show,
    or None when the run did not log Δ* (EMA)."""
    per_layer = []
    for name in layers:
        d, p = series.get(key(name, "angular_update")), series.get(key(name, "smoothed_predicted_angular_update"))
        if d is None or p is None or len(d[0]) != len(p[0]) or not np.array_equal(d[0], p[0]):
            continue
        with np.errstate(divide="ignore", invalid="ignore"):
            per_layer.append((d[0], np.where(p[1] > 0, d[1] / p[1], np.nan)))
    if not per_layer:
        return None
    steps = np.unique(np.concatenate([s for s, _ in per_layer]).astype(np.int64))
    matrix = np.full((len(per_layer), len(steps)), np.nan)
    for row, (s, v) in enumerate(per_layer):
        matrix[row, np.searchsorted(steps, s.astype(np.int64))] = v
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a step where no layer has a ratio: nan
        return steps, np.nanmedian(matrix, axis=0)


def heatmap_run(path: str, output: str, dpi: int = 120, name: str | None = None) -> str:
    """The layer × step heatmap of the logged smoothed Δ/Δ* (``smd/<layer>/angular_update_ratio``; Δ/Δ̂,
    ``trajectory_ratio``, for a layer that follows a schedule), layers in network order (the summary's, when found),
    written to ``output``; returns ``output``."""
    from lightning_smd.io.dashboard import heatmap_figure

    series, summary = load_series(path, name)
    logged = [layer for layer in _layers(series, "angular_update_ratio") if layer != WORST]
    if summary and summary.get("layers"):
        order = [metric_name(str(r.get("name"))) for r in summary["layers"]]
        names = [n for n in order if n in logged] + [n for n in logged if n not in order]
    else:
        names = logged
    if not names:
        raise ValueError(f"{path}: no per-layer smd/<layer>/angular_update_ratio series (log_per_layer='none'?)")
    steps = np.unique(np.concatenate([series[key(n, "angular_update_ratio")][0] for n in names]).astype(np.int64))
    matrix = np.full((len(names), len(steps)), np.nan)
    for row, n in enumerate(names):
        # a layer judged against its trajectory through a schedule: Δ/Δ̂ (Δ/Δ* falls in an annealing tail by design)
        s, v = series[key(n, "trajectory_ratio")] if key(n, "trajectory_ratio") in series else series[key(n, "angular_update_ratio")]
        matrix[row, np.searchsorted(steps, s.astype(np.int64))] = v
    tolerance = float((summary or {}).get("criteria", {}).get("tolerance", 0.1))
    fig = heatmap_figure(steps, matrix, names, tolerance)
    if fig is None:
        raise ValueError('drawing needs matplotlib: pip install "lightning-smd[plot]"')
    fig.savefig(output, dpi=dpi)
    return output
