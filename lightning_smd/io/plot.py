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

from lightning_smd.io.loggers import NAMESPACE
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
        cols = [i for i, key in enumerate(header) if _namespace_of(key)]
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
            if _namespace_of(tag):
                events = acc.Scalars(tag)
                out[tag] = (np.array([e.step for e in events]), np.array([e.value for e in events], dtype=np.float64))
    return out


def _namespace_of(key: str) -> str | None:
    """``smd`` or ``smd-<label>`` for a key an SMDCallback logged (``smd/...``, ``smd-strict/...``), else None."""
    first, sep, _ = key.partition("/")
    return first if sep and (first == NAMESPACE or first.startswith(NAMESPACE + "-")) else None


def _one_namespace(path: str, series: Series, name: str | None) -> tuple[Series, str | None]:
    """The series of one SMDCallback, keys as ``smd/...``, and its label: the one called ``name``, else the
    unlabelled one (the Trainer's first), else the only one logged."""
    spaces = sorted({_namespace_of(k) for k in series} - {None})
    labels = [ns[len(NAMESPACE) + 1 :] for ns in spaces if ns != NAMESPACE]
    if name is not None:
        wanted = f"{NAMESPACE}-{name}"
        if wanted not in spaces:
            logged = ", ".join(f"{ns}/*" for ns in spaces)
            raise ValueError(f"{path}: no {wanted}/* metrics (no SMDCallback(name={name!r}) logged here); logged: {logged}")
    elif NAMESPACE in spaces:
        wanted = NAMESPACE
    elif len(labels) == 1:
        wanted = spaces[0]
    else:
        raise ValueError(f"{path}: several SMDCallbacks logged here ({', '.join(labels)}): choose one with --name")
    label = None if wanted == NAMESPACE else wanted[len(NAMESPACE) + 1 :]
    prefix = wanted + "/"
    return {NAMESPACE + "/" + k[len(prefix) :]: v for k, v in series.items() if k.startswith(prefix)}, label


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


def _layers(series: Series) -> list[str]:
    names = []
    for key in series:
        parts = key.split("/")
        if len(parts) == 3 and parts[2] == "angular_update":
            names.append(parts[1])
    return names


def _final(series: Series, key: str) -> float:
    if key not in series or not len(series[key][1]):
        return math.nan
    values = series[key][1]
    finite = values[np.isfinite(values)]
    return float(finite[-1]) if len(finite) else math.nan


#: More learning-rate changes than this are a continuous schedule (cosine, linear warm-up): no line per step.
_MAX_LR_LINES = 12


def _lr_changes(series: Series, layer: str) -> list[int]:
    """Steps where the learning rate (``effective_lr · |w|²``) changed by more than 1e-6 relative; empty when it
    changed at more than ``_MAX_LR_LINES`` steps (a schedule that moves every step is not a set of events)."""
    e, n = series.get(f"smd/{layer}/effective_lr"), series.get(f"smd/{layer}/weight_norm")
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


def plot_run(
    path: str, output: str, layers: int | None = 6, names: Sequence[str] | None = None, dpi: int = 120, name: str | None = None
) -> str:
    """Draw the figure for the run under ``path`` into ``output`` (PNG, PDF or SVG by extension); ``name``: which
    SMDCallback's series, when the run had several (see :func:`load_series`)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:
        raise ValueError('plotting needs matplotlib: pip install "lightning-smd[plot]" (or pip install matplotlib)') from err
    series, summary = load_series(path, name)
    tol = float((summary or {}).get("criteria", {}).get("tolerance", 0.1))
    first_eq = {r["name"]: r.get("first_equilibrium_step") for r in (summary or {}).get("layers", [])}
    from lightning_smd.analysis.diagnostics import metric_name

    first_eq = {metric_name(k): v for k, v in first_eq.items()}
    all_layers = _layers(series)
    if names:
        chosen = [metric_name(n) for n in names if metric_name(n) in all_layers]
    else:
        worst = sorted(
            all_layers,
            key=lambda n: (
                -abs(_final(series, f"smd/{n}/angular_update_ratio") - 1.0)
                if math.isfinite(_final(series, f"smd/{n}/angular_update_ratio"))
                else -math.inf
            ),
        )
        chosen = worst if layers is None else worst[:layers]
    rows = 1 + len(chosen)
    fig, axes = plt.subplots(rows, 2, figsize=(11, 2.4 * rows), squeeze=False)
    verdict = (summary or {}).get("verdict")
    title = "Spherical Motion Dynamics: measured vs predicted" + (f" ({name})" if name else "") + (f" — verdict: {verdict}" if verdict else "")
    fig.suptitle(title, fontsize=12)
    ax_r, ax_f = axes[0]
    aggregate = panel_ratio(series, all_layers)
    if aggregate is not None or "smd/angular_update_ratio" in series:
        # the median of what the panels below show (Δ (EMA) / Δ* (EMA)); runs logged before Δ* (EMA) existed: the
        # logged median of the smoothed per-step ratio
        s, v = aggregate if aggregate is not None else series["smd/angular_update_ratio"]
        label = "median over layers of Δ (EMA) / Δ* (EMA)" if aggregate is not None else "median Δ/Δ* over layers"
        ax_r.plot(*_thin(s, v), color="C0", lw=1.5, label=label)
        ax_r.axhspan(1 - tol, 1 + tol, color="C2", alpha=0.15, label=f"equilibrium band ±{tol:.0%}")
        ax_r.axhline(1.0, color="C2", lw=0.8)
        ax_r.set_ylabel("Δ / Δ*")
        ax_r.legend(loc="best", fontsize=7)
    if "smd/equilibrium_fraction" in series:
        s, v = series["smd/equilibrium_fraction"]
        ax_f.plot(*_thin(s, v), color="C3", lw=1.5)
        ax_f.set_ylim(-0.05, 1.05)
        ax_f.set_ylabel("share in equilibrium")
    ax_r.set_title("all layers", fontsize=9, loc="left")
    for row, layer in enumerate(chosen, start=1):
        ax_d, ax_n = axes[row]
        base = f"smd/{layer}/"
        if base + "angular_update" in series:
            s, v = series[base + "angular_update"]
            ax_d.plot(*_thin(s, v), color="C0", lw=1.5, label="measured Δ (EMA)")
        smoothed = base + "smoothed_predicted_angular_update"
        band = smoothed if smoothed in series else base + "predicted_angular_update"
        if band in series:
            s, p = series[band]
            ok = np.isfinite(p) & (p > 0)
            if ok.any():
                label = "predicted Δ* (EMA, as Δ)" if band == smoothed else "predicted Δ*"
                s, p = _thin(s[ok], p[ok])
                ax_d.plot(s, p, color="k", lw=1.0, ls="--", label=label)
                ax_d.fill_between(s, p * (1 - tol), p * (1 + tol), color="C2", alpha=0.2, lw=0, label=f"±{tol:.0%}")
        if band == smoothed and base + "predicted_angular_update" in series:
            s, p = series[base + "predicted_angular_update"]
            ok = np.isfinite(p) & (p > 0)
            if ok.any():
                ax_d.plot(*_thin(s[ok], p[ok]), color="0.5", lw=0.8, ls=":", label="Δ* of the latest step")
        positive = [series[k][1] for k in (base + "angular_update", base + "predicted_angular_update") if k in series]
        if positive and all((x[np.isfinite(x)] > 0).all() for x in positive):
            ax_d.set_yscale("log")
        eq_step = first_eq.get(layer)
        if eq_step is None and base + "in_equilibrium" in series:
            s, e = series[base + "in_equilibrium"]
            hit = np.nonzero(e > 0.5)[0]
            eq_step = int(s[hit[0]]) if len(hit) else None
        if eq_step is not None:
            ax_d.axvline(eq_step, color="C2", lw=1.2, label=f"first steady window from step {eq_step}")
        for k, step in enumerate(_lr_changes(series, layer)):
            ax_d.axvline(step, color="0.5", lw=0.8, ls=":", label="learning-rate change" if k == 0 else None)
        ax_d.set_ylabel("angular update (rad)")
        ax_d.set_title(layer, fontsize=9, loc="left")
        ax_d.legend(loc="best", fontsize=7)
        if base + "weight_norm" in series:
            s, v = series[base + "weight_norm"]
            ax_n.plot(*_thin(s, v), color="C1", lw=1.5, label="‖w‖")
        if base + "predicted_weight_norm" in series:
            s, v = series[base + "predicted_weight_norm"]
            ax_n.plot(*_thin(s, v), color="k", lw=1.0, ls="--", label="predicted ‖w*‖")
        ax_n.set_ylabel("weight norm")
        ax_n.legend(loc="best", fontsize=7)
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
        d, p = series.get(f"smd/{name}/angular_update"), series.get(f"smd/{name}/smoothed_predicted_angular_update")
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
    """The layer × step heatmap of the logged smoothed Δ/Δ* (``smd/<layer>/angular_update_ratio``), layers in
    network order (the summary's, when found), written to ``output``; returns ``output``."""
    from lightning_smd.io.dashboard import heatmap_figure
    from lightning_smd.analysis.diagnostics import metric_name

    series, summary = load_series(path, name)
    logged = [k.split("/")[1] for k in series if k.count("/") == 2 and k.endswith("/angular_update_ratio") and not k.startswith("smd/worst/")]
    if summary and summary.get("layers"):
        order = [metric_name(str(r.get("name"))) for r in summary["layers"]]
        names = [n for n in order if n in logged] + [n for n in logged if n not in order]
    else:
        names = logged
    if not names:
        raise ValueError(f"{path}: no per-layer smd/<layer>/angular_update_ratio series (log_per_layer='none'?)")
    steps = np.unique(np.concatenate([series[f"smd/{n}/angular_update_ratio"][0] for n in names]).astype(np.int64))
    matrix = np.full((len(names), len(steps)), np.nan)
    for row, n in enumerate(names):
        s, v = series[f"smd/{n}/angular_update_ratio"]
        matrix[row, np.searchsorted(steps, s.astype(np.int64))] = v
    tolerance = float((summary or {}).get("criteria", {}).get("tolerance", 0.1))
    fig = heatmap_figure(steps, matrix, names, tolerance)
    if fig is None:
        raise ValueError('drawing needs matplotlib: pip install "lightning-smd[plot]"')
    fig.savefig(output, dpi=dpi)
    return output
