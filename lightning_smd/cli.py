"""``lightning-smd``: check and report runs from their summary.

    lightning-smd check SUMMARY.json [--min-fraction 0.9] [--require-agreement] [--tolerance 0.1] [--max-deviation 0.3]
        exit 0 when the run reached equilibrium, 1 when it did not, 2 on unreadable input
    lightning-smd report LOG_DIR_OR_SUMMARY [--all]
        the per-layer table of a run (the newest smd_summary.json under a directory); above 20 layers, those
        not in equilibrium first and the rest counted, unless --all
    lightning-smd plot LOG_DIR_OR_CSV -o smd.png [--layers 6 | --all | --layer NAME ... | --heatmap]
        measured vs predicted angular update and weight norm per layer, or the layer x step heatmap of
        their ratio (needs matplotlib)
    lightning-smd wandb-workspace ENTITY/PROJECT --summary LOG_DIR_OR_SUMMARY [--save]
        the W&B workspace for a run's layers: printed; saved with --save (needs wandb-workspaces)

``check`` re-judges the verdict when an option is given, from each layer's steady state and the confidence
interval of its steady ratio in the summary: a layer counts as in equilibrium when it is steady and its
interval is not entirely outside ``1 ± max_deviation`` (and, with ``--require-agreement``, not entirely
outside ``1 ± tolerance``). Steadiness itself (settling, drift) is not re-judged: it needs the run's samples.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Sequence
from typing import Any

from lightning_smd.diagnose import Verdict
from lightning_smd.plot import newest_file
from lightning_smd.report import SUMMARY_FILENAME, TABLE_ROWS, format_summary_table

__all__ = ["main", "find_summary", "judge"]


class InputError(Exception):
    pass


def find_summary(path: str) -> str:
    """``path`` itself if it is a file, else the newest ``smd_summary.json`` below the directory."""
    if os.path.isfile(path):
        return path
    if not os.path.isdir(path):
        raise InputError(f"{path}: no such file or directory")
    found = newest_file(path, SUMMARY_FILENAME)
    if found is None:
        raise InputError(f"{path}: no {SUMMARY_FILENAME} found below this directory")
    return found


def load(path: str) -> dict[str, Any]:
    try:
        with open(find_summary(path)) as fh:
            data = json.load(fh)
    except (OSError, json.JSONDecodeError) as err:
        raise InputError(f"{path}: cannot read an SMD summary ({err})") from err
    if not isinstance(data, dict) or "verdict" not in data or not isinstance(data.get("layers"), list):
        raise InputError(f"{path}: not an SMD summary (no 'verdict' and 'layers')")
    return data


def _criteria(
    summary: dict[str, Any], tolerance: float | None, min_fraction: float | None, require_agreement: bool | None, max_deviation: float | None
) -> tuple[float, float, bool, float]:
    """``(tolerance, min_fraction, require_agreement, max_deviation)``: the given ones, else the run's."""
    criteria = summary.get("criteria", {})
    return (
        tolerance if tolerance is not None else criteria.get("tolerance", 0.1),
        min_fraction if min_fraction is not None else criteria.get("min_fraction", 0.9),
        require_agreement if require_agreement is not None else bool(criteria.get("require_agreement", False)),
        max_deviation if max_deviation is not None else criteria.get("max_deviation", 0.3),
    )


def _outside(layer: dict[str, Any], band: float) -> bool:
    """The layer's steady ratio interval lies entirely outside ``1 ± band``."""
    ci = layer.get("steady_ratio_ci")
    return bool(ci) and None not in ci and (ci[1] < 1.0 - band or ci[0] > 1.0 + band)


def _rejudged(layer: dict[str, Any], tol: float, strict: bool, far: float) -> tuple[bool, str, str]:
    """``(counted, state, agreement)`` of one layer under the given bands (its steadiness as the run judged it)."""
    agreement = "off_prediction" if _outside(layer, tol) else "agrees"
    if not layer.get("steady"):
        state = layer.get("state") or "approaching"
        return False, ("approaching" if state in ("equilibrium", "off_prediction", "steady_far_off") else state), agreement
    if _outside(layer, far):
        return False, "steady_far_off", "far_off"
    if strict and _outside(layer, tol):
        return False, "off_prediction", agreement
    return True, "equilibrium", agreement


def judge(
    summary: dict[str, Any],
    tolerance: float | None = None,
    min_fraction: float | None = None,
    require_agreement: bool | None = None,
    max_deviation: float | None = None,
) -> tuple[str, str]:
    """The verdict of a summary, re-judged with other criteria when they are given."""
    if tolerance is None and min_fraction is None and require_agreement is None and max_deviation is None:
        return summary["verdict"], summary.get("reason", "")
    tol, frac, strict, far = _criteria(summary, tolerance, min_fraction, require_agreement, max_deviation)
    layers = [layer for layer in summary["layers"] if layer.get("predicted_angular_update") is not None]
    if not layers:
        return Verdict.NOT_APPLICABLE, "no tracked layer has an SMD prediction"
    if summary.get("schema_version", 1) < 2:
        raise InputError("this summary predates the steady-state verdict (schema_version 1): re-judge it with the version that wrote it")
    ok = [layer for layer in layers if _rejudged(layer, tol, strict, far)[0]]
    share = len(ok) / len(layers)
    rule = f"steady, steady ratio not entirely outside ±{far:.0%}" + (f" nor ±{tol:.0%}" if strict else "")
    reason = f"{len(ok)}/{len(layers)} layers in equilibrium ({rule}; {frac:.0%} required)"
    return (Verdict.EQUILIBRIUM if share >= frac - 1e-12 else Verdict.NOT_REACHED), reason


def rejudged_summary(
    summary: dict[str, Any], tolerance: float | None, min_fraction: float | None, require_agreement: bool | None, max_deviation: float | None
) -> dict[str, Any]:
    """The summary with its verdict and every layer's state re-judged under the given criteria, so that the
    table's per-layer column agrees with the verdict under it."""
    verdict, reason = judge(summary, tolerance, min_fraction, require_agreement, max_deviation)
    tol, frac, strict, far = _criteria(summary, tolerance, min_fraction, require_agreement, max_deviation)
    layers = []
    for layer in summary["layers"]:
        if layer.get("predicted_angular_update") is None:
            layers.append(layer)
            continue
        counted, state, agreement = _rejudged(layer, tol, strict, far)
        layers.append({**layer, "in_equilibrium": counted, "state": state, "agreement": agreement})
    criteria = {**summary.get("criteria", {}), "tolerance": tol, "min_fraction": frac, "require_agreement": strict, "max_deviation": far}
    return {**summary, "verdict": verdict, "reason": reason, "layers": layers, "criteria": criteria}


def _check(args: argparse.Namespace) -> int:
    summary = load(args.summary)
    options = (args.tolerance, args.min_fraction, args.require_agreement, args.max_deviation)
    verdict, _ = judge(summary, *options)
    if any(v is not None for v in options):
        summary = rejudged_summary(summary, *options)
    print(format_summary_table(summary, TABLE_ROWS))
    return 0 if verdict == Verdict.EQUILIBRIUM else 1


def _report(args: argparse.Namespace) -> int:
    path = find_summary(args.path)
    summary = load(path)
    print(f"{path}")
    print(format_summary_table(summary, None if args.all else TABLE_ROWS))
    extra = []
    for key, names in (summary.get("diagnoses") or {}).items():
        extra.append(f"  {key.replace('_', ' ')}: {', '.join(names)}")
    if extra:
        print("diagnoses:\n" + "\n".join(extra))
    for w in summary.get("warnings", []):
        print(f"warning: {w}")
    return 0


def _plot(args: argparse.Namespace) -> int:
    from lightning_smd.plot import heatmap_run, plot_run

    try:
        if args.heatmap:
            out = heatmap_run(args.path, args.output, dpi=args.dpi)
        else:
            out = plot_run(args.path, args.output, layers=None if args.all else args.layers, names=args.layer or None, dpi=args.dpi)
    except ValueError as err:
        raise InputError(str(err)) from err
    print(out)
    return 0


def _workspace(args: argparse.Namespace) -> int:
    from lightning_smd.workspace import build_workspace, save_workspace, workspace_panels

    if args.target.count("/") != 1 or not all(args.target.split("/")):
        raise InputError(f"{args.target}: give the W&B target as ENTITY/PROJECT")
    entity, project = args.target.split("/")
    summary = load(args.summary)
    names = [str(row.get("name")) for row in summary["layers"]]
    sections = workspace_panels(names, args.per_layer, args.worst_k)
    for title, is_open, panels in sections:
        print(f"section {title!r} ({'open' if is_open else 'collapsed'}): {len(panels)} panels")
        for p in panels[: 8 if not is_open else len(panels)]:
            print(f"  {p['kind']:5s} {p['title']}: {', '.join(p['keys'][:4])}{' ...' if len(p['keys']) > 4 else ''}")
    if not args.save:
        print("(not saved: --save writes it to the W&B server)")
        return 0
    try:
        workspace = build_workspace(entity, project, names, args.per_layer, args.worst_k, name=args.name)
    except ImportError as err:
        raise InputError(str(err)) from err
    print(save_workspace(workspace))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lightning-smd", description="Check and report Spherical Motion Dynamics runs.")
    sub = parser.add_subparsers(dest="command", required=True)
    c = sub.add_parser("check", help="exit 0 if the run reached equilibrium, 1 if not, 2 on unreadable input")
    c.add_argument("summary", help="smd_summary.json, or a directory holding one")
    c.add_argument("--min-fraction", type=float, default=None, help="re-judge: share of layers that must be in equilibrium")
    c.add_argument("--require-agreement", action="store_true", default=None, help="re-judge: steady layers off the prediction do not count")
    c.add_argument("--tolerance", type=float, default=None, help="re-judge: the agreement band ±tolerance (with --require-agreement)")
    c.add_argument("--max-deviation", type=float, default=None, help="re-judge: steady layers further off than ±this never count")
    c.set_defaults(fn=_check)
    r = sub.add_parser("report", help="print the per-layer table of a run")
    r.add_argument("path", help="smd_summary.json or a log directory")
    r.add_argument("--all", action="store_true", help=f"every layer (default: at most {TABLE_ROWS} rows, those not in equilibrium first)")
    r.set_defaults(fn=_report)
    p = sub.add_parser("plot", help="draw measured vs predicted per layer into an image")
    p.add_argument("path", help="a log directory (metrics.csv or TensorBoard event files below it) or a metrics.csv")
    p.add_argument("-o", "--output", default="smd.png", help="image file (.png, .pdf, .svg); default smd.png")
    p.add_argument("--layers", type=int, default=6, help="how many layers: the worst by final |ratio - 1| (default 6)")
    p.add_argument("--all", action="store_true", help="every layer")
    p.add_argument("--layer", action="append", help="this layer (repeatable); overrides --layers")
    p.add_argument("--heatmap", action="store_true", help="the layer x step heatmap of the smoothed ratio, every layer")
    p.add_argument("--dpi", type=int, default=120)
    p.set_defaults(fn=_plot)
    w = sub.add_parser("wandb-workspace", help="build (and with --save, save) a W&B workspace for the SMD metrics")
    w.add_argument("target", help="ENTITY/PROJECT")
    w.add_argument("--summary", required=True, help="smd_summary.json or a log directory: the layers of the workspace")
    w.add_argument("--per-layer", default="auto", choices=["auto", "all", "ratio", "none"], help="as SMDCallback(log_per_layer=...)")
    w.add_argument("--worst-k", type=int, default=3, help="as SMDCallback(worst_k=...)")
    w.add_argument("--name", default="SMD", help="the workspace's name")
    w.add_argument("--save", action="store_true", help="save it to the W&B server (needs wandb-workspaces and an API key)")
    w.set_defaults(fn=_workspace)
    args = parser.parse_args(argv)
    for name in ("tolerance", "min_fraction", "max_deviation"):
        value = getattr(args, name, None)
        if value is not None and not (math.isfinite(value) and value > 0):
            parser.error(f"--{name.replace('_', '-')} must be a positive number")
    try:
        return int(args.fn(args))
    except InputError as err:
        print(f"lightning-smd: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
