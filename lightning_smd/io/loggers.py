"""What each Lightning logger gets beyond ``log_metrics``: recognized by class name, so both Lightning
namespaces (and subclasses) are served, and nothing here imports a logger's package unless that logger is
in use.

- TensorBoard: a custom-scalars layout (the *Custom Scalars* tab) with one chart per layer holding the
  measured and the predicted angular update, another for the weight norm and its prediction, and the two
  aggregates.
- Weights & Biases: ``define_metric`` so that every ``smd/*`` series is plotted against
  ``trainer/global_step``; at the end, the verdict and per-layer ratios in the run summary, a per-layer
  table (``smd/layers``) and a measured-vs-predicted scatter chart (``smd/measured_vs_predicted``).
- MLflow and every other logger: metric keys only use ``[A-Za-z0-9_./ -]`` (see :func:`lightning_smd.analysis.keys.metric_name`).

Every key starts with the callback's *namespace*: ``smd`` — or ``smd-<label>`` for each further
``SMDCallback`` of one Trainer (:func:`renamed`), so that two callbacks never write the same series.

A logger that refuses something gets a warning, never an exception: monitoring must not break training.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from lightning_smd.analysis.keys import HEATMAP_KEY, NAMESPACE, WORST, key, layer_key, layer_metric_keys, renamed

__all__ = ["setup_loggers", "finish_loggers", "log_heatmap", "takes_images", "tensorboard_layout", "renamed", "NAMESPACE", "HEATMAP_KEY"]

#: The loggers :func:`log_heatmap` hands an image to (by class name, subclasses included).
IMAGE_LOGGERS = ("WandbLogger", "TensorBoardLogger", "MLFlowLogger")


def _kind(logger: Any) -> str:
    names = {k.__name__ for k in type(logger).__mro__}
    for kind in ("TensorBoardLogger", "WandbLogger", "MLFlowLogger", "CSVLogger"):
        if kind in names:
            return kind
    return type(logger).__name__


def takes_images(loggers: Sequence[Any]) -> bool:
    """Whether any of ``loggers`` takes the heatmap image (W&B, TensorBoard, MLflow: see :func:`log_heatmap`);
    with none of them (a CSVLogger only) the heatmap need not be drawn, and a missing matplotlib is no loss."""
    return any(_kind(logger) in IMAGE_LOGGERS for logger in loggers)


def _prefixed(logger: Any, name: str, namespace: str = NAMESPACE) -> str:
    """``name`` (a key in ``smd/...``) as ``logger`` stores it: in ``namespace``, after the logger's own prefix."""
    name = renamed(name, namespace)
    prefix = getattr(logger, "_prefix", "") or ""
    join = getattr(logger, "LOGGER_JOIN_CHAR", "-")
    return f"{prefix}{join}{name}" if prefix else name


def tensorboard_layout(
    logger: Any, unit_names: Sequence[str], per_layer: str = "all", worst_k: int = 3, namespace: str = NAMESPACE
) -> list[tuple[str, bool, dict[str, list[str]]]]:
    """The custom-scalars layout as ``[(category, closed, {chart title: [tag regexes]})]``.

    The first category (open) holds a handful of charts whatever the model's size: the two aggregates, the
    worst layers' ratios, and every layer's ratio in one chart. With ``per_layer="all"`` two closed categories
    follow, one chart per layer each: measured vs predicted angular update, and weight norm vs its prediction.
    """
    tag = lambda name: re.escape(_prefixed(logger, name, namespace))  # noqa: E731 - chart tags are regular expressions
    overview = {
        "median ratio to prediction": [tag(key("angular_update_ratio"))],
        "share of layers in equilibrium": [tag(key("equilibrium_fraction"))],
    }
    if worst_k:  # key(..., "") ends in "/": the tag is that prefix and a pattern
        overview["worst layers: ratio to prediction"] = [tag(key(WORST, "")) + r"\d+/angular_update_ratio"]
    if per_layer != "none" and unit_names:
        overview["every layer: ratio to prediction"] = [tag(key("")) + f"(?!{WORST}/)" + r"[^/]+/angular_update_ratio"]
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
                    run.define_metric(_prefixed(logger, key("*"), namespace), step_metric="trainer/global_step")
        except Exception as err:  # noqa: BLE001 - a logger's failure must not stop training
            warn("SMD041", what="set up the SMD charts", logger=type(logger).__name__, error=f"{type(err).__name__}: {err}")


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
    """The summary's layer rows as the W&B table's rows (:data:`TABLE_COLUMNS`, the interval split in two)."""
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
            run.summary[_prefixed(logger, key("verdict"), namespace)] = str(summary.get("verdict"))
            run.summary[_prefixed(logger, key("reason"), namespace)] = summary.get("reason")
            run.summary[_prefixed(logger, key("steps"), namespace)] = summary.get("steps")
            for r in summary.get("layers", []):
                if r.get("ratio") is not None:
                    run.summary[_prefixed(logger, layer_key(r["name"], "final_ratio"), namespace)] = r["ratio"]
                if r.get("steady_ratio") is not None:
                    run.summary[_prefixed(logger, layer_key(r["name"], "steady_ratio"), namespace)] = r["steady_ratio"]
            table = wandb.Table(columns=TABLE_COLUMNS, data=summary_rows(summary))
            chart = wandb.plot.scatter(table, "predicted_angular_update", "angular_update", title="SMD: measured vs predicted angular update")
            step = summary.get("global_step", summary.get("steps", 0))
            keys = [_prefixed(logger, key(k), namespace) for k in ("layers", "measured_vs_predicted")]
            run.log({keys[0]: table, keys[1]: chart, "trainer/global_step": step})
        except Exception as err:  # noqa: BLE001
            warn("SMD041", what="write the SMD summary table", logger=type(logger).__name__, error=f"{type(err).__name__}: {err}")
