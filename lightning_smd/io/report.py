"""The summary as a table and as a file, shared by the callback, the plain-PyTorch monitor and the command line
(no torch: ``lightning-smd check`` and ``report`` read summaries without it)."""

from __future__ import annotations

import json
import math
import os
import tempfile
from typing import Any

import numpy as np

from lightning_smd.messages import SMDWarning

__all__ = [
    "SMDWarning",
    "EquilibriumNotReachedError",
    "SUMMARY_FILENAME",
    "format_summary_table",
    "print_summary_table",
    "table_parts",
    "TABLE_ROWS",
    "state_label",
    "write_summary",
]

SUMMARY_FILENAME = "smd_summary.json"


def summary_filename(label: str | None = None) -> str:
    """``smd_summary.json``, or ``smd_summary-<label>.json`` for a labelled SMDCallback (several in one Trainer)."""
    return SUMMARY_FILENAME if label is None else f"smd_summary-{label}.json"


class EquilibriumNotReachedError(RuntimeError):
    """Raised at the end of fit by ``SMDCallback(on_no_equilibrium="raise")`` when the verdict is not
    ``"equilibrium"`` — after the summary JSON was written, on every rank."""

    def __init__(self, message: str, summary: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.summary = summary or {}


#: Rows of the end-of-training table before it is cut (the whole table then fits 25 terminal lines).
TABLE_ROWS = 20


HEADER = ("layer", "Δ (EMA)", "Δ* (EMA)", "Δ/Δ* (EMA)", "steady Δ/Δ* [CI]", "drift/τ", "|w|", "predicted |w|", "state", "since step")
#: Where the state column is (left-aligned, like the layer names).
_LEFT = (0, 8)


def table_parts(summary: dict[str, Any], max_rows: int | None = None) -> tuple[list[tuple[str, ...]], list[str]]:
    """The end-of-training table as ``(rows of cells, closing lines)``.

    With ``max_rows`` and more layers than that, the layers a reader must see come first — not in
    equilibrium, then off the prediction — and the rest is counted in one closing line (``lightning-smd
    report --all`` prints every row); the last closing line is the verdict."""

    def f(x: Any, spec: str) -> str:
        return "-" if x is None else format(x, spec)

    layers = list(summary.get("layers", []))
    hidden: list[dict[str, Any]] = []
    if max_rows is not None and len(layers) > max_rows:
        order = sorted(range(len(layers)), key=lambda i: (_attention(layers[i]), i))
        hidden = [layers[i] for i in order[max_rows:]]
        layers = [layers[i] for i in order[:max_rows]]
    rows = []
    for r in layers:
        ci = r.get("steady_ratio_ci")
        steady = f(r.get("steady_ratio"), ".3f") + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci and None not in ci else "")
        delta = r.get("angular_update")
        # the smoothed Δ* (a summary from before it existed: the latest Δ*), and the ratio of the two columns
        pred = r.get("smoothed_predicted_angular_update", r.get("predicted_angular_update"))
        ratio = delta / pred if delta is not None and pred else None
        rows.append(
            (
                str(r.get("name")),
                f(delta, ".3e"),
                f(pred, ".3e"),
                f(ratio, ".3f"),
                steady,
                f(r.get("drift"), "+.3f"),
                f(r.get("weight_norm"), ".3f"),
                f(r.get("predicted_weight_norm"), ".3f"),
                state_label(r),
                f(r.get("first_equilibrium_step"), "d"),
            )
        )
    closing = []
    ema_steps = summary.get("criteria", {}).get("ema_steps")
    if layers and ema_steps:  # say what is smoothed, so that no column reads as contradicting another
        closing.append(
            f"Δ: angular update (rad/step); (EMA): moving average over {ema_steps} steps; Δ/Δ* (EMA) = Δ (EMA) / Δ* (EMA); "
            "steady: the judged window's mean"
        )
    if hidden:
        states: dict[str, int] = {}
        for r in hidden:
            states[state_label(r)] = states.get(state_label(r), 0) + 1
        counts = ", ".join(f"{n} {s}" for s, n in sorted(states.items(), key=lambda kv: -kv[1]))
        closing.append(f"... {len(hidden)} more layers ({counts}); every row: lightning-smd report --all")
    state = "" if summary.get("complete", True) else " (incomplete run)"
    closing.append(f"SMD verdict after {summary.get('steps', 0)} steps: {summary.get('verdict', '?')}{state} — {summary.get('reason', '')}")
    return rows, closing


def format_summary_table(summary: dict[str, Any], max_rows: int | None = None) -> str:
    """Format a summary dict (as written to ``smd_summary.json``) as a fixed-width table (see
    :func:`table_parts` for ``max_rows``)."""
    body, closing = table_parts(summary, max_rows)
    rows = [HEADER, *body]
    widths = [max(len(row[i]) for row in rows) for i in range(len(HEADER))]
    lines = ["  ".join(c.ljust(w) if i in _LEFT else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))).rstrip() for row in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines + closing)


def print_summary_table(summary: dict[str, Any], max_rows: int | None = None) -> None:
    """Print the table: with Rich on a terminal when Rich is installed (Lightning's RichProgressBar uses it),
    plain text otherwise (logs, pipes, CI)."""
    import sys

    if sys.stdout.isatty():
        try:
            from rich.console import Console
            from rich.table import Table
        except ImportError:
            pass
        else:
            body, closing = table_parts(summary, max_rows)
            table = Table(*HEADER, title="SMD: measured against predicted", show_lines=False)
            for i, column in enumerate(table.columns):
                column.justify = "left" if i in _LEFT else "right"
                column.no_wrap = i != 0  # a narrow terminal folds the layer names, not the numbers
            for row in body:
                state = row[_LEFT[1]]
                style = None if state == "equilibrium" else ("yellow" if state.startswith("equilibrium") else "red")
                table.add_row(*row, style=style)
            console = Console()
            console.print(table)
            for line in closing:
                console.print(line, markup=False, highlight=False)
            return
    print(format_summary_table(summary, max_rows))


def _attention(row: dict[str, Any]) -> int:
    """0: not in equilibrium (the rows to read first), 1: in equilibrium off the prediction, 2: in equilibrium."""
    if not row.get("in_equilibrium"):
        return 0
    return 1 if row.get("agreement") == "off_prediction" else 2


def state_label(row: dict[str, Any]) -> str:
    """A layer's state for tables: ``equilibrium (off prediction)`` for a counted layer off the prediction."""
    state = str(row.get("state") or "-")
    if state == "equilibrium" and row.get("agreement") == "off_prediction":
        return "equilibrium (off prediction)"
    return state


def write_summary(path: str, data: dict[str, Any]) -> None:
    """Write ``data`` as JSON atomically (a temporary file renamed over ``path``); nan/inf become null."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".smd_summary.", suffix=".tmp", dir=directory)
    try:
        # mkstemp creates the file 0600; a summary is a log file like the others: the umask decides
        mask = os.umask(0)
        os.umask(mask)
        os.fchmod(fd, 0o666 & ~mask)
        with os.fdopen(fd, "w") as fh:
            json.dump(_sanitize(data), fh, indent=2, default=_json_default, allow_nan=False)
            fh.write("\n")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _sanitize(obj: Any) -> Any:
    """JSON has no nan/inf: write them as null."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _sanitize(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_sanitize(v) for v in obj]
    return obj


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        v = float(obj)
        return v if math.isfinite(v) else None
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    return str(obj)


def format_forecast_table(forecast: list[dict[str, Any]], schedule: dict[str, Any]) -> str:
    """The forecast made at fit start, one row per followed layer: when it reaches equilibrium, when the schedule
    outruns it (freeze-out), and when it would with the peak settings kept (what a decay cuts short)."""

    def step(v: Any) -> str:
        return "never" if v is None else f"{v:,}"

    sources = "; ".join(f"optimizer {k}: {v.get('source') or v.get('reason')}" for k, v in schedule.items() if v.get("followed"))
    head = ("layer", "reaches equilibrium", "freeze-out", "at constant peak settings")
    rows = [(f["name"], step(f["equilibrium_step"]), step(f["freeze_out_step"]), step(f["equilibrium_step_at_constant_settings"])) for f in forecast]
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(4)]
    lines = [f"SMD forecast at step {forecast[0]['made_at_step'] if forecast else 0} ({sources}):"]
    lines += ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in [head, *rows]]
    return "\n".join(lines)
