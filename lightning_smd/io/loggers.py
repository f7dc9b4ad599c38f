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

Every key starts with the callback's *namespace*: ``smd`` — or ``smd-<label>`` for each further
``SMDCallback`` of one Trainer (:func:`renamed`), so that two callbacks never write the same series.

A logger that refuses something gets a warning, never an exception: monitoring must not break training.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from lightning_smd.analysis.diagnostics import layer_metric_keys, metric_name

__all__ = ["setup_loggers", "finish_loggers", "tensorboard_layout", "renamed", "NAMESPACE"]

#: The namespace of the keys of a Trainer's only (or first) SMDCallback.
NAMESPACE = "smd"


def renamed(key: str, namespace: str = NAMESPACE) -> str:
    """``key`` (``smd/...``) in ``namespace`` (``smd-strict/...``)."""
    if namespace == NAMESPACE or not key.startswith(NAMESPACE + "/"):
        return key
    return namespace + key[len(NAMESPACE) :]


def _kind(logger: Any) -> str:
    names = {k.__name__ for k in type(logger).__mro__}
    for kind in ("TensorBoardLogger", "WandbLogger", "MLFlowLogger", "CSVLogger"):
        if kind in names:
            return kind
    return type(logger).__name__


def _prefixed(logger: Any, key: str, namespace: str = NAMESPACE) -> str:
    key = renamed(key, namespace)
    prefix = getattr(logger, "_prefix", "") or ""
    join = getattr(logger, "LOGGER_JOIN_CHAR", "-")
    return f"{prefix}{join}{key}" if prefix else key


def tensorboard_layout(
    logger: Any, unit_names: Sequence[str], per_layer: str = "all", worst_k: int = 3, namespace: str = NAMESPACE
) -> list[tuple[str, bool, dict[str, list[str]]]]:
    """The custom-scalars layout as ``[(category, closed, {chart title: [tag regexes]})]``.

    The first category (open) holds a handful of charts whatever the model's size: the two aggregates, the
    worst layers' ratios, and every layer's ratio in one chart. With ``per_layer="all"`` two closed categories
    follow, one chart per layer each: measured vs predicted angular update, and weight norm vs its prediction.
    """
    tag = lambda key: re.escape(_prefixed(logger, key, namespace))  # noqa: E731 - chart tags are regular expressions
    overview = {
        "median ratio to prediction": [tag("smd/angular_update_ratio")],
        "share of layers in equilibrium": [tag("smd/equilibrium_fraction")],
    }
    if worst_k:
        overview["worst layers: ratio to prediction"] = [tag("smd/worst/") + r"\d+/angular_update_ratio"]
    if per_layer != "none" and unit_names:
        overview["every layer: ratio to prediction"] = [tag("smd/") + r"(?!worst/)[^/]+/angular_update_ratio"]
    title = "SMD" if namespace == NAMESPACE else namespace.upper()
    layout = [(title, False, overview)]
    if per_layer == "all" and unit_names:
        delta: dict[str, list[str]] = {}
        norm: dict[str, list[str]] = {}
        for name in unit_names:
            keys = layer_metric_keys(name)
            delta[name] = [tag(keys["angular_update"]), tag(keys["predicted_angular_update"])]
            norm[name] = [tag(keys["weight_norm"]), tag(keys["predicted_weight_norm"])]
        layout += [
            (f"{title} per layer: angular update, measured vs predicted", True, delta),
            (f"{title} per layer: weight norm, measured vs predicted", True, norm),
        ]
    return layout


def _write_tensorboard_layout(writer: Any, layout: list[tuple[str, bool, dict[str, list[str]]]]) -> None:
    """Write the layout with its categories' ``closed`` flags (``SummaryWriter.add_custom_scalars`` has none);
    falls back to ``add_custom_scalars`` (all categories open) where the protos are not importable."""
    try:
        from tensorboard.compat.proto.summary_pb2 import Summary, SummaryMetadata
        from tensorboard.compat.proto.tensor_pb2 import TensorProto
        from tensorboard.compat.proto.tensor_shape_pb2 import TensorShapeProto
        from tensorboard.plugins.custom_scalar import layout_pb2, metadata
    except ImportError:
        writer.add_custom_scalars({title: {c: ["Multiline", tags] for c, tags in charts.items()} for title, _, charts in layout})
        return
    proto = layout_pb2.Layout(
        category=[
            layout_pb2.Category(
                title=title,
                closed=closed,
                chart=[layout_pb2.Chart(title=c, multiline=layout_pb2.MultilineChartContent(tag=tags)) for c, tags in charts.items()],
            )
            for title, closed, charts in layout
        ]
    )
    meta = SummaryMetadata(plugin_data=SummaryMetadata.PluginData(plugin_name=metadata.PLUGIN_NAME))
    tensor = TensorProto(dtype="DT_STRING", string_val=[proto.SerializeToString()], tensor_shape=TensorShapeProto())
    writer.file_writer.add_summary(Summary(value=[Summary.Value(tag=metadata.CONFIG_SUMMARY_TAG, tensor=tensor, metadata=meta)]))


def setup_loggers(loggers: Sequence[Any], unit_names: Sequence[str], per_layer: str, worst_k: int, warn: Any, namespace: str = NAMESPACE) -> None:
    """Once, before the first ``log_metrics`` (rank zero only). ``warn(code, **fields)`` reports a logger that
    refused (see :mod:`lightning_smd.messages`)."""
    for logger in loggers:
        kind = _kind(logger)
        try:
            if kind == "TensorBoardLogger":
                writer = logger.experiment
                if hasattr(writer, "file_writer"):
                    _write_tensorboard_layout(writer, tensorboard_layout(logger, unit_names, per_layer, worst_k, namespace))
            elif kind == "WandbLogger":
                run = logger.experiment
                if hasattr(run, "define_metric"):
                    run.define_metric("trainer/global_step")
                    run.define_metric(_prefixed(logger, "smd/*", namespace), step_metric="trainer/global_step")
        except Exception as err:  # noqa: BLE001 - a logger's failure must not stop training
            warn("SMD041", what="set up the SMD charts", logger=type(logger).__name__, error=f"{type(err).__name__}: {err}")


HEATMAP_KEY = "smd/heatmap"


def log_heatmap(loggers: Sequence[Any], image: Any, step: int, warn: Any, namespace: str = NAMESPACE) -> list[str]:
    """Log the heatmap (``[height, width, 3]`` uint8 pixels, drawn once) to every logger that takes images
    (W&B ``wandb.Image``, TensorBoard ``add_image``, MLflow ``log_image``); returns the kinds of the loggers
    that took it. A logger that refuses gets warning SMD041 (the session deduplicates the text)."""
    took = []
    for logger in loggers:
        kind = _kind(logger)
        try:
            if kind == "WandbLogger":
                import wandb

                logger.experiment.log({_prefixed(logger, HEATMAP_KEY, namespace): wandb.Image(image), "trainer/global_step": step})
            elif kind == "TensorBoardLogger":
                logger.experiment.add_image(_prefixed(logger, HEATMAP_KEY, namespace), image, global_step=step, dataformats="HWC")
            elif kind == "MLFlowLogger":
                logger.experiment.log_image(logger.run_id, image, artifact_file=f"{namespace}/heatmap_step{step:07d}.png")
            else:
                continue
            took.append(kind)
        except Exception as err:  # noqa: BLE001 - an image a logger refuses must not stop training
            warn("SMD041", what="log the SMD heatmap", logger=type(logger).__name__, error=f"{type(err).__name__}: {err}")
    return took


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


def finish_loggers(loggers: Sequence[Any], summary: dict[str, Any], warn: Any, namespace: str = NAMESPACE) -> None:
    """At the end of training (rank zero only): the verdict and the per-layer table where a logger has a
    place for them."""
    for logger in loggers:
        if _kind(logger) != "WandbLogger":
            continue
        try:
            import wandb

            run = logger.experiment
            run.summary[_prefixed(logger, "smd/verdict", namespace)] = str(summary.get("verdict"))
            run.summary[_prefixed(logger, "smd/reason", namespace)] = summary.get("reason")
            run.summary[_prefixed(logger, "smd/steps", namespace)] = summary.get("steps")
            for r in summary.get("layers", []):
                if r.get("ratio") is not None:
                    run.summary[_prefixed(logger, f"smd/{metric_name(r['name'])}/final_ratio", namespace)] = r["ratio"]
                if r.get("steady_ratio") is not None:
                    run.summary[_prefixed(logger, f"smd/{metric_name(r['name'])}/steady_ratio", namespace)] = r["steady_ratio"]
            table = wandb.Table(columns=TABLE_COLUMNS, data=summary_rows(summary))
            chart = wandb.plot.scatter(table, "predicted_angular_update", "angular_update", title="SMD: measured vs predicted angular update")
            step = summary.get("global_step", summary.get("steps", 0))
            keys = [_prefixed(logger, k, namespace) for k in ("smd/layers", "smd/measured_vs_predicted")]
            run.log({keys[0]: table, keys[1]: chart, "trainer/global_step": step})
        except Exception as err:  # noqa: BLE001
            warn("SMD041", what="write the SMD summary table", logger=type(logger).__name__, error=f"{type(err).__name__}: {err}")
