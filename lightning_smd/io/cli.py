"""``lightning-smd``: check and report runs from their summary.

    lightning-smd check SUMMARY.json [--min-fraction 0.9] [--require-agreement] [--tolerance 0.1] [--max-deviation 0.3]
                        [--allow-incomplete]
        exit 0 when the run reached equilibrium, 1 when it did not (any other verdict, or a run that did not
        complete: crashed or interrupted, unless --allow-incomplete), 2 on bad input or usage: a file that is
        not an SMD summary, an option out of its range — with one line on stderr saying what is wrong
    lightning-smd report LOG_DIR_OR_SUMMARY [--all]
        the per-layer table of a run (the newest smd_summary.json under a directory); above 20 layers, those
        not in equilibrium first and the rest counted, unless --all
    lightning-smd plot LOG_DIR_OR_CSV -o smd.png [--layers 6 | --all | --layer NAME ... | --heatmap]
        measured vs predicted angular update and weight norm per layer, or the layer x step heatmap of
        their ratio (needs matplotlib); the directory of -o is created; exit 2 on bad input (a --layer the
        run did not log: the message lists those it did)
    lightning-smd wandb-workspace ENTITY/PROJECT --summary LOG_DIR_OR_SUMMARY [--save]
        the W&B workspace for a run's layers: printed; saved with --save (needs wandb-workspaces)
    lightning-smd recommend --lr LR (--tau-steps N | --tau-epochs X --steps-per-epoch N) [--steps N]
                            [--optimizer adamw ...] [--momentum 0.9] [--betas 0.9 0.999] [--window 100] [--json]
        the weight decay that puts each optimizer's relaxation time at the timescale asked
        (lightning_smd.recommend), the steps before the verdict can judge a layer, and notes on the timescale
        against an epoch and the run; exit 2 on bad input

``check`` re-judges the verdict when an option is given, from each layer's steady state and the confidence
interval of its steady ratio in the summary: a layer counts as in equilibrium when it is steady and its
interval is not entirely outside ``1 ± max_deviation`` (and, with ``--require-agreement``, not entirely
outside ``1 ± tolerance``). Steadiness itself (settling, drift) is not re-judged: it needs the run's samples,
and a ``diverged`` run stays diverged whatever the options say.

A summary is what :class:`~lightning_smd.SMDCallback` and :class:`~lightning_smd.SMDMonitor` write: a UTF-8
JSON object with at least :data:`REQUIRED_FIELDS` (and :data:`MEASURED_FIELDS` once layers were measured), a
known verdict, and layer rows with a name whose figures are numbers or null. ``check`` accepts nothing less;
``report`` and ``wandb-workspace`` need only a verdict and the layers (their rows checked alike).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from lightning_smd.analysis.judgement import agreement_words, classify, reached
from lightning_smd.analysis.states import Agreement, UnitState, Verdict
from lightning_smd.io.plot import newest_file
from lightning_smd.io.report import SUMMARY_FILENAME, TABLE_ROWS, format_summary_table
from lightning_smd.messages import shown_names

__all__ = ["main", "find_summary", "judge"]


#: Top-level fields of every summary the package writes.
REQUIRED_FIELDS = ("verdict", "reason", "steps", "layers", "complete")
#: ... and of every summary written once layers were measured (all but "nothing was attached" ones).
MEASURED_FIELDS = ("schema_version", "criteria")
#: The verdicts a summary can hold.
VERDICTS = tuple(v.value for v in Verdict)

#: The types of the fields the commands read, as the summary writes them: ``(type, whether it may be null)``.
_SUMMARY_TYPES: dict[str, tuple[str, bool]] = {
    "verdict": ("string", False),
    "reason": ("string", False),
    "steps": ("integer", False),
    "complete": ("boolean", False),
    "error": ("string", True),
    "schema_version": ("integer", False),
}
_CRITERIA_TYPES: dict[str, tuple[str, bool]] = {
    "tolerance": ("number", False),
    "min_fraction": ("number", False),
    "max_deviation": ("number", False),
    "require_agreement": ("boolean", False),
}
_LAYER_TYPES: dict[str, tuple[str, bool]] = {
    "angular_update": ("number", True),
    "predicted_angular_update": ("number", True),
    "smoothed_predicted_angular_update": ("number", True),
    "steady_ratio": ("number", True),
    "drift": ("number", True),
    "weight_norm": ("number", True),
    "predicted_weight_norm": ("number", True),
    "first_equilibrium_step": ("integer", True),
    "steady": ("boolean", False),
    "in_equilibrium": ("boolean", False),
    "state": ("string", False),
    "agreement": ("string", True),
}


class InputError(Exception):
    """Bad input or usage: reported as one line on stderr, exit status 2."""


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


def _read_json(path: str) -> Any:
    """The JSON document in the file ``path``, which must be UTF-8 text."""
    try:
        with open(path, "rb") as fh:
            raw = fh.read()
    except OSError as err:
        raise InputError(f"{path}: cannot read an SMD summary ({err.strerror or err})") from err
    if raw.startswith(b"\x1f\x8b"):
        raise InputError(f"{path}: gzip-compressed, not a UTF-8 JSON summary: decompress it first (gunzip -k {path})")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise InputError(f"{path}: not a UTF-8 JSON summary (byte {err.start} is not UTF-8 text)") from err
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise InputError(f"{path}: cannot read an SMD summary: not JSON ({err})") from err


def _json_kind(value: Any) -> str:
    """The JSON type of a decoded value, in words."""
    if value is None:
        return "null"
    for kind, types in (("boolean", bool), ("integer", int), ("number", float), ("string", str), ("list", list)):
        if isinstance(value, types):
            return kind
    return "object"


def _type_problem(value: Any, kind: str, nullable: bool) -> str | None:
    """What is wrong with ``value`` as a ``kind`` (number, integer, boolean, string), or None."""
    if value is None and nullable:
        return None
    if _json_kind(value) == kind or (kind == "number" and _json_kind(value) == "integer"):
        return None
    article = "an" if kind == "integer" else "a"
    return f"must be {article} {kind}{' or null' if nullable else ''}, not {json.dumps(value)[:40]} (a {_json_kind(value)})"


def _field_problems(where: str, obj: dict[str, Any], types: dict[str, tuple[str, bool]]) -> list[str]:
    """What is wrong with the fields of ``obj`` that ``types`` names (those present)."""
    problems = []
    for key, (kind, nullable) in types.items():
        why = _type_problem(obj[key], kind, nullable) if key in obj else None
        if why:
            problems.append(f"{where}{key!r} {why}")
    return problems


def _layer_problems(index: int, layer: Any) -> list[str]:
    """What is wrong with one layer row of a summary."""
    if not isinstance(layer, dict):
        return [f"layers[{index}] is not an object"]
    name = layer.get("name")
    if not isinstance(name, str) or not name:
        return [f"layers[{index}] has no 'name'" if name is None else f"layers[{index}]: 'name' is not a non-empty string"]
    where = f"layer {name!r}: "
    problems = _field_problems(where, layer, _LAYER_TYPES)
    ci = layer.get("steady_ratio_ci")
    if ci is not None and not (isinstance(ci, list) and len(ci) == 2 and all(_type_problem(x, "number", True) is None for x in ci)):
        problems.append(f"{where}'steady_ratio_ci' must be a pair of numbers (each may be null) or null, not {json.dumps(ci)[:40]}")
    return problems


def summary_problems(data: Any, strict: bool = True) -> list[str]:
    """What keeps ``data`` from being an SMD summary (empty: nothing). Without ``strict``, only a verdict and
    layers are required (``report``); with it, every field a summary of this package has (``check``)."""
    if not isinstance(data, dict):
        return [f"a JSON {_json_kind(data)}, not an object"]
    required = REQUIRED_FIELDS if strict else ("verdict", "layers")
    if strict and (data.get("layers") or data.get("verdict") != Verdict.NOT_APPLICABLE):
        required += MEASURED_FIELDS
    missing = [key for key in required if key not in data]
    if missing:
        return [f"no {', '.join(map(repr, missing))} (an SMD summary is the {SUMMARY_FILENAME} SMDCallback or SMDMonitor writes)"]
    problems = _field_problems("", data, _SUMMARY_TYPES)
    criteria = data.get("criteria", {})
    problems += _field_problems("criteria ", criteria, _CRITERIA_TYPES) if isinstance(criteria, dict) else ["'criteria' is not an object"]
    if not isinstance(data["layers"], list):
        return [*problems, "'layers' is not a list"]
    for index, layer in enumerate(data["layers"]):
        problems += _layer_problems(index, layer)
    if strict and not problems:
        if data["verdict"] not in VERDICTS:
            problems.append(f"unknown verdict {data['verdict']!r} (known: {', '.join(VERDICTS)})")
        elif data["verdict"] == Verdict.EQUILIBRIUM and not data["layers"]:
            problems.append("verdict 'equilibrium' without any layer")
    return problems


def load(path: str, strict: bool = False) -> dict[str, Any]:
    """The summary at ``path`` (a file, or a directory with one below it); :class:`InputError` if it is none
    (``strict``: see :func:`summary_problems`)."""
    path = find_summary(path)
    data = _read_json(path)
    problems = summary_problems(data, strict)
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise InputError(f"{path}: not an SMD summary: {'; '.join(problems[:3])}{more}")
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


def _classified(layers: Sequence[dict[str, Any]], tol: float, strict: bool, far: float) -> list[tuple[bool, str, str]]:
    """``(counted, state, agreement)`` of each layer under the given bands (its steadiness as the run judged it), by
    the run's own rule (:func:`lightning_smd.analysis.judgement.classify`)."""
    steady = np.array([bool(layer.get("steady")) for layer in layers], dtype=bool)
    ci = [layer.get("steady_ratio_ci") or [None, None] for layer in layers]
    lo = np.array([math.nan if c[0] is None or c[1] is None else c[0] for c in ci], dtype=np.float64)
    hi = np.array([math.nan if c[0] is None or c[1] is None else c[1] for c in ci], dtype=np.float64)
    far_off, off, counted = classify(steady, lo, hi, tol, far, strict)
    # a layer not steady keeps the run's state (approaching where the run had counted it), and its interval's
    # agreement with the band is shown as the run would for a steady one
    _, outside, _ = classify(np.ones(len(layers), dtype=bool), lo, hi, tol, math.inf, False)
    out = []
    for i, layer in enumerate(layers):
        if not steady[i]:
            state = layer.get("state") or UnitState.APPROACHING
            kept = UnitState.APPROACHING if state in (UnitState.EQUILIBRIUM, UnitState.OFF_PREDICTION, UnitState.STEADY_FAR_OFF) else state
            out.append((False, str(kept), str(Agreement.OFF_PREDICTION if outside[i] else Agreement.AGREES)))
            continue
        words = agreement_words(steady[i : i + 1], far_off[i : i + 1], off[i : i + 1])[0]
        state = UnitState.EQUILIBRIUM if counted[i] else UnitState.STEADY_FAR_OFF if far_off[i] else UnitState.OFF_PREDICTION
        out.append((bool(counted[i]), str(state), str(words)))
    return out


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
    if summary["verdict"] == Verdict.DIVERGED:
        return summary["verdict"], summary.get("reason", "")  # non-finite weights: no criteria make it pass
    tol, frac, strict, far = _criteria(summary, tolerance, min_fraction, require_agreement, max_deviation)
    layers = [layer for layer in summary["layers"] if layer.get("predicted_angular_update") is not None]
    if not layers:
        return Verdict.NOT_APPLICABLE, "no tracked layer has an SMD prediction"
    if summary.get("schema_version", 1) < 2:
        raise InputError("this summary predates the steady-state verdict (schema_version 1): re-judge it with the version that wrote it")
    n_ok = sum(counted for counted, _, _ in _classified(layers, tol, strict, far))
    rule = f"steady, steady ratio not entirely outside ±{far:.0%}" + (f" nor ±{tol:.0%}" if strict else "")
    reason = f"{n_ok}/{len(layers)} layers in equilibrium ({rule}; {frac:.0%} required)"
    return (Verdict.EQUILIBRIUM if reached(n_ok, len(layers), frac) else Verdict.NOT_REACHED), reason


def rejudged_summary(
    summary: dict[str, Any], tolerance: float | None, min_fraction: float | None, require_agreement: bool | None, max_deviation: float | None
) -> dict[str, Any]:
    """The summary with its verdict and every layer's state re-judged under the given criteria, so that the
    table's per-layer column agrees with the verdict under it."""
    verdict, reason = judge(summary, tolerance, min_fraction, require_agreement, max_deviation)
    tol, frac, strict, far = _criteria(summary, tolerance, min_fraction, require_agreement, max_deviation)
    judged = [layer for layer in summary["layers"] if layer.get("predicted_angular_update") is not None]
    new = iter(_classified(judged, tol, strict, far))
    layers = []
    for layer in summary["layers"]:
        if layer.get("predicted_angular_update") is None:
            layers.append(layer)
            continue
        counted, state, agreement = next(new)
        layers.append({**layer, "in_equilibrium": counted, "state": state, "agreement": agreement})
    criteria = {**summary.get("criteria", {}), "tolerance": tol, "min_fraction": frac, "require_agreement": strict, "max_deviation": far}
    return {**summary, "verdict": verdict, "reason": reason, "layers": layers, "criteria": criteria}


def incomplete_text(summary: dict[str, Any]) -> str | None:
    """Why the summary's run did not complete (crashed, interrupted), or None when it did."""
    if summary.get("complete", True):
        return None
    error = summary.get("error")
    return f"the run did not complete ({f'error: {error}' if error else 'no error recorded'})"


def _check(args: argparse.Namespace) -> int:
    path = find_summary(args.summary)
    summary = load(path, strict=True)
    options = (args.tolerance, args.min_fraction, args.require_agreement, args.max_deviation)
    verdict, _ = judge(summary, *options)
    if any(v is not None for v in options):
        summary = rejudged_summary(summary, *options)
    print(format_summary_table(summary, TABLE_ROWS))
    incomplete = incomplete_text(summary)
    if incomplete and not args.allow_incomplete:
        note = f"its verdict ({verdict}) is of the steps before it stopped and does not pass (--allow-incomplete judges it anyway)"
        print(f"lightning-smd: {path}: {incomplete}: {note}", file=sys.stderr)
        return 1
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


def _recommend(args: argparse.Namespace) -> int:
    from lightning_smd.analysis.recommend import OPTIMIZERS, recommend

    if (args.tau_steps is None) == (args.tau_epochs is None):
        raise InputError("give the timescale with --tau-steps N or with --tau-epochs X (and --steps-per-epoch N)")
    if args.tau_epochs is not None and args.steps_per_epoch is None:
        raise InputError("--tau-epochs needs --steps-per-epoch (the optimizer steps of one epoch)")
    settings: dict[str, dict[str, Any]] = {}
    for name in OPTIMIZERS:
        given: dict[str, Any] = {}
        if args.momentum is not None and name in ("sgd-momentum", "nesterov"):
            given["momentum"] = args.momentum
        if args.betas is not None and name in ("adamw", "lion"):
            given["betas"] = tuple(args.betas)
        settings[name] = given
    try:
        rows = recommend(
            args.lr, relaxation_time=args.tau_steps, tau_epochs=args.tau_epochs, steps_per_epoch=args.steps_per_epoch, steps=args.steps,
            optimizers=args.optimizer, settings=settings, window=args.window,
        )  # fmt: skip
    except ValueError as err:
        raise InputError(str(err)) from None
    if args.json:
        print(json.dumps([r.as_dict() for r in rows], indent=2, allow_nan=False))
        return 0
    asked = args.tau_steps if args.tau_steps is not None else args.tau_epochs * args.steps_per_epoch
    print(f"weight decay for a relaxation time of {asked:.0f} steps at lr {args.lr:g}:")
    width = max(len(r.optimizer) for r in rows)

    def num(x: float, width: int, spec: str) -> str:
        return f"{x:>{width}{spec}}" if math.isfinite(x) else f"{'-':>{width}}"

    print(f"  {'optimizer':<{width}}  {'weight_decay':>12}  {'1/(lr*wd)':>10}  {'judged after':>12}  settings")
    for r in rows:
        print(f"  {r.optimizer:<{width}}  {num(r.weight_decay, 12, '.4g')}  {num(r.tau_iter, 10, '.0f')}  {num(r.judgeable_after, 12, '.0f')}  {r.settings}")
        for note in r.notes:
            print(f"  {'':<{width}}  note: {note}")
    return 0


def _check_layer_names(path: str, names: Sequence[str], name: str | None = None) -> None:
    """:class:`InputError` unless every name in ``names`` is a layer the run logged per-layer series for."""
    from lightning_smd.analysis.keys import metric_name
    from lightning_smd.io.plot import _layers as logged_layers
    from lightning_smd.io.plot import load_series

    logged = logged_layers(load_series(path, name)[0])
    unknown = [layer for layer in names if metric_name(layer) not in logged]
    if not unknown:
        return
    if not logged:
        raise InputError(f"{path}: no per-layer series logged, so no --layer to draw (log them with SMDCallback(log_per_layer='all'))")
    shown = shown_names(logged)
    raise InputError(f"{path}: no layer {', '.join(map(repr, unknown))} in the logged series; the layers: {shown}")


def _plot(args: argparse.Namespace) -> int:
    from lightning_smd.io.plot import heatmap_run, plot_run

    if not os.path.exists(args.path):
        raise InputError(f"{args.path}: no such file or directory")
    try:
        if args.layer:
            _check_layer_names(args.path, args.layer, args.name)
        directory = os.path.dirname(os.path.abspath(args.output))
        try:
            os.makedirs(directory, exist_ok=True)
        except OSError as err:
            raise InputError(f"{args.output}: cannot create the directory {directory} ({err.strerror or err})") from err
        if args.heatmap:
            out = heatmap_run(args.path, args.output, dpi=args.dpi, name=args.name)
        else:
            layers = None if args.all else args.layers
            out = plot_run(args.path, args.output, layers=layers, names=args.layer or None, dpi=args.dpi, name=args.name)
    except UnicodeDecodeError as err:
        raise InputError(f"{args.path}: a metrics file or summary that is not UTF-8 text ({err.reason} at byte {err.start})") from err
    except ValueError as err:
        raise InputError(str(err)) from err
    except OSError as err:  # reading the metrics, writing the image
        raise InputError(f"{err.filename or args.output}: {err.strerror or err}") from err
    except (KeyError, TypeError, AttributeError) as err:
        raise InputError(f"{args.path}: a malformed metrics file or {SUMMARY_FILENAME} ({type(err).__name__}: {err})") from err
    print(out)
    return 0


def _workspace(args: argparse.Namespace) -> int:
    from lightning_smd.io.workspace import build_workspace, save_workspace, workspace_panels

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


def _number(text: str) -> float:
    """A finite number (the options' types raise ``ArgumentTypeError``: argparse names the option and exits 2)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def _positive(text: str) -> float:
    """A finite number > 0."""
    value = _number(text)
    if not value > 0.0:
        raise argparse.ArgumentTypeError(f"must be a number > 0, got {text!r}")
    return value


def _share(text: str) -> float:
    """A share of the layers, in (0, 1] (``--min-fraction``, as ``SMDCallback(min_fraction=...)``)."""
    value = _number(text)
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1] (a share of the layers), got {text!r}")
    return value


def _band(text: str) -> float:
    """A relative band ``±value``: finite and > 0 (``--tolerance``, ``--max-deviation``)."""
    value = _number(text)
    if not value > 0.0:
        raise argparse.ArgumentTypeError(f"must be a number > 0 (a relative band: 0.1 is ±10%), got {text!r}")
    return value


def _count(minimum: int) -> Callable[[str], int]:
    """The type of an integer option >= ``minimum``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be an integer >= {minimum}, got {text!r}")
        return value

    return parse


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lightning-smd", description="Check and report Spherical Motion Dynamics runs.")
    sub = parser.add_subparsers(dest="command", required=True)
    c = sub.add_parser(
        "check",
        help="exit 0 if the run reached equilibrium, 1 if not (or if it did not complete), 2 on bad input",
        description="Exit 0 if the run reached equilibrium; 1 for any other verdict, or for a run that did not complete "
        "(crashed or interrupted) unless --allow-incomplete; 2 on bad input or options.",
    )
    c.add_argument("summary", help="smd_summary.json, or a directory holding one")
    c.add_argument("--min-fraction", type=_share, default=None, help="re-judge: share of layers that must be in equilibrium, in (0, 1]")
    c.add_argument("--require-agreement", action="store_true", default=None, help="re-judge: steady layers off the prediction do not count")
    c.add_argument("--tolerance", type=_band, default=None, help="re-judge: the agreement band ±tolerance, > 0 (with --require-agreement)")
    c.add_argument("--max-deviation", type=_band, default=None, help="re-judge: steady layers further off than ±this (> 0) never count")
    c.add_argument(
        "--allow-incomplete",
        action="store_true",
        help='judge a run that did not complete ("complete": false: it crashed or was interrupted) by its verdict too (default: exit 1)',
    )
    c.set_defaults(fn=_check)
    r = sub.add_parser("report", help="print the per-layer table of a run")
    r.add_argument("path", help="smd_summary.json or a log directory")
    r.add_argument("--all", action="store_true", help=f"every layer (default: at most {TABLE_ROWS} rows, those not in equilibrium first)")
    r.set_defaults(fn=_report)
    p = sub.add_parser("plot", help="draw measured vs predicted per layer into an image")
    p.add_argument("path", help="a log directory (metrics.csv or TensorBoard event files below it) or a metrics.csv")
    p.add_argument("-o", "--output", default="smd.png", help="image file (.png, .pdf, .svg); default smd.png")
    p.add_argument("--layers", type=_count(1), default=6, help="how many layers: the worst by final |ratio - 1| (default 6)")
    p.add_argument("--all", action="store_true", help="every layer")
    p.add_argument("--layer", action="append", help="this layer (repeatable; one the run logged); overrides --layers")
    p.add_argument("--heatmap", action="store_true", help="the layer x step heatmap of the smoothed ratio, every layer")
    p.add_argument("--dpi", type=_count(1), default=120)
    p.add_argument("--name", default=None, help="with several SMDCallbacks in the run: the one called NAME (its smd-NAME/* series)")
    p.set_defaults(fn=_plot)
    w = sub.add_parser("wandb-workspace", help="build (and with --save, save) a W&B workspace for the SMD metrics")
    w.add_argument("target", help="ENTITY/PROJECT")
    w.add_argument("--summary", required=True, help="smd_summary.json or a log directory: the layers of the workspace")
    w.add_argument("--per-layer", default="auto", choices=["auto", "all", "ratio", "none"], help="as SMDCallback(log_per_layer=...)")
    w.add_argument("--worst-k", type=_count(0), default=3, help="as SMDCallback(worst_k=...)")
    w.add_argument("--name", default="SMD", help="the workspace's name")
    w.add_argument("--save", action="store_true", help="save it to the W&B server (needs wandb-workspaces and an API key)")
    w.set_defaults(fn=_workspace)
    rc = sub.add_parser(
        "recommend",
        help="the weight decay that puts the relaxation time at a timescale, per optimizer",
        description="The weight decay that puts each optimizer's relaxation time (how fast the weight norm forgets where it "
        "started and settles at its equilibrium) at the timescale asked, at the learning rate given. Wang & Aitchison "
        "(ICML 2025): the timescale should lie between about one epoch and the whole run.",
    )
    rc.add_argument("--lr", type=_positive, required=True, help="the learning rate (the peak of a schedule)")
    rc.add_argument("--tau-steps", type=_positive, default=None, help="the relaxation time asked for, in optimizer steps")
    rc.add_argument("--tau-epochs", type=_positive, default=None, help="the relaxation time asked for, in epochs (with --steps-per-epoch)")
    rc.add_argument("--steps-per-epoch", type=_count(1), default=None, help="optimizer steps per epoch")
    rc.add_argument("--steps", type=_count(1), default=None, help="the planned run, in optimizer steps (for the notes)")
    rc.add_argument("--optimizer", action="append", default=None, help="only this one (repeatable): sgd, sgd-momentum, nesterov, adamw, lion")
    rc.add_argument("--momentum", type=_number, default=None, help="SGD's momentum (default 0.9 for sgd-momentum and nesterov)")
    rc.add_argument("--betas", type=_number, nargs=2, default=None, help="AdamW's or Lion's betas (defaults 0.9 0.999 and 0.9 0.99)")
    rc.add_argument("--window", type=_count(1), default=100, help="the callback's window (default 100): for the steps before judging")
    rc.add_argument("--json", action="store_true", help="print the rows as JSON")
    rc.set_defaults(fn=_recommend)
    args = parser.parse_args(argv)
    if args.command == "plot" and args.heatmap and args.layer:
        p.error("--layer does not apply to --heatmap, which draws every layer")
    try:
        return int(args.fn(args))
    except InputError as err:
        print(f"lightning-smd: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
