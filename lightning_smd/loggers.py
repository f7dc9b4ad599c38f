"""What each Lightning logger gets beyond ``log_metrics``: recognized by class name, so both Lightning
namespaces (and subclasses) are served, and nothing here imports a logger's package unless that logger is
in use.

- TensorBoard: a custom-scalars layout (the *Custom Scalars* tab) with one chart per layer holding the
  measured and the predicted angular update, another for the weight norm and its prediction, and the two
  aggregates.
- Weights & Biases: ``define_metric`` so that every ``smd/*`` series is plotted against
  ``trainer/global_step``; at the end, the verdict and per-layer ratios in the run summary, a per-layer
  table (``smd/layers``) and a measured-vs-predicted scatter chart (``smd/measured_vs_predicted``).
- MLflow and every other logger: metric keys only use ``[A-Za-z0-9_./ -]`` (see :func:`metric_name`).

A logger that refuses something gets a warning, never an exception: monitoring must not break training.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from lightning_smd.diagnose import layer_metric_keys, metric_name

__all__ = ["setup_loggers", "finish_loggers", "tensorboard_layout"]

def _kind(logger: Any) -> str:
    names = {k.__name__ for k in type(logger).__mro__}
    for kind in ("TensorBoardLogger", "WandbLogger", "MLFlowLogger", "CSVLogger"):
        if kind in names:
            return kind
    return type(logger).__name__


def _prefixed(logger: Any, key: str) -> str:
    prefix = getattr(logger, "_prefix", "") or ""
    join = getattr(logger, "LOGGER_JOIN_CHAR", "-")
    return f"{prefix}{join}{key}" if prefix else key


def tensorboard_layout(logger: Any, unit_names: Sequence[str]) -> dict[str, dict[str, list[Any]]]:
    """The custom-scalars layout: {category: {chart title: ["Multiline", [tags]]}}."""
    agg = {
        "median ratio to prediction": ["Multiline", [_prefixed(logger, "smd/angular_update_ratio")]],
        "share of layers in equilibrium": ["Multiline", [_prefixed(logger, "smd/equilibrium_fraction")]],
    }
    delta: dict[str, list[Any]] = {}
    norm: dict[str, list[Any]] = {}
    for name in unit_names:
        keys = layer_metric_keys(name)
        delta[name] = ["Multiline", [_prefixed(logger, keys["angular_update"]), _prefixed(logger, keys["predicted_angular_update"])]]
        norm[name] = ["Multiline", [_prefixed(logger, keys["weight_norm"]), _prefixed(logger, keys["predicted_weight_norm"])]]
    return {"SMD": agg, "SMD angular update: measured vs predicted": delta, "SMD weight norm: measured vs predicted": norm}


def setup_loggers(loggers: Sequence[Any], unit_names: Sequence[str], per_layer: bool, warn: Any) -> None:
    """Once, before the first ``log_metrics`` (rank zero only). ``warn(code, **fields)`` reports a logger that
    refused (see :mod:`lightning_smd.messages`)."""
    for logger in loggers:
        kind = _kind(logger)
        try:
            if kind == "TensorBoardLogger":
                writer = logger.experiment
                if hasattr(writer, "add_custom_scalars"):
                    writer.add_custom_scalars(tensorboard_layout(logger, unit_names if per_layer else []))
            elif kind == "WandbLogger":
                run = logger.experiment
                if hasattr(run, "define_metric"):
                    run.define_metric("trainer/global_step")
                    run.define_metric(_prefixed(logger, "smd/*"), step_metric="trainer/global_step")
        except Exception as err:  # noqa: BLE001 - a logger's failure must not stop training
            warn("SMD041", what="set up the SMD charts", logger=type(logger).__name__, error=f"{type(err).__name__}: {err}")


TABLE_COLUMNS = [
    "layer",
    "angular_update",
    "predicted_angular_update",
    "ratio",
    "steady_ratio",
    "steady_ratio_low",
    "steady_ratio_high",
    "drift",
    "weight_norm",
    "predicted_weight_norm",
    "in_equilibrium",
    "agreement",
    "first_equilibrium_step",
    "state",
]


def summary_rows(summary: dict[str, Any]) -> list[list[Any]]:
    rows = []
    for r in summary.get("layers", []):
        ci = r.get("steady_ratio_ci") or [None, None]
        rows.append(
            [
                r.get("name"),
                r.get("angular_update"),
                r.get("predicted_angular_update"),
                r.get("ratio"),
                r.get("steady_ratio"),
                ci[0],
                ci[1],
                r.get("drift"),
                r.get("weight_norm"),
                r.get("predicted_weight_norm"),
                bool(r.get("in_equilibrium")),
                r.get("agreement"),
                r.get("first_equilibrium_step"),
                r.get("state"),
            ]
        )
    return rows


def finish_loggers(loggers: Sequence[Any], summary: dict[str, Any], warn: Any) -> None:
    """At the end of training (rank zero only): the verdict and the per-layer table where a logger has a
    place for them."""
    for logger in loggers:
        if _kind(logger) != "WandbLogger":
            continue
        try:
            import wandb

            run = logger.experiment
            run.summary[_prefixed(logger, "smd/verdict")] = str(summary.get("verdict"))
            run.summary[_prefixed(logger, "smd/reason")] = summary.get("reason")
            run.summary[_prefixed(logger, "smd/steps")] = summary.get("steps")
            for r in summary.get("layers", []):
                if r.get("ratio") is not None:
                    run.summary[_prefixed(logger, f"smd/{metric_name(r['name'])}/final_ratio")] = r["ratio"]
                if r.get("steady_ratio") is not None:
                    run.summary[_prefixed(logger, f"smd/{metric_name(r['name'])}/steady_ratio")] = r["steady_ratio"]
            table = wandb.Table(columns=TABLE_COLUMNS, data=summary_rows(summary))
            chart = wandb.plot.scatter(table, "predicted_angular_update", "angular_update", title="SMD: measured vs predicted angular update")
            step = summary.get("global_step", summary.get("steps", 0))
            run.log({_prefixed(logger, "smd/layers"): table, _prefixed(logger, "smd/measured_vs_predicted"): chart, "trainer/global_step": step})
        except Exception as err:  # noqa: BLE001
            warn("SMD041", what="write the SMD summary table", logger=type(logger).__name__, error=f"{type(err).__name__}: {err}")
