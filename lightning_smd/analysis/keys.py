"""Every metric key the package logs or reads, built in one place.

A key is ``<namespace>/<metric>`` for an aggregate (``smd/equilibrium_fraction``), ``<namespace>/<layer>/<metric>``
for a layer's series (``smd/conv1.weight/angular_update_ratio``) and ``<namespace>/worst/<i>/angular_update_ratio``
for the i-th worst layer. The namespace is ``smd`` — or ``smd-<label>`` for each further ``SMDCallback`` of one
Trainer (:func:`renamed`), so that two callbacks never write the same series. Layer names are written with the
characters MLflow (the strictest logger) accepts (:func:`metric_name`).
"""

from __future__ import annotations

import re

__all__ = [
    "NAMESPACE",
    "AGGREGATES",
    "WORST",
    "LAYER_METRICS",
    "HEATMAP_KEY",
    "metric_name",
    "key",
    "layer_key",
    "layer_metric_keys",
    "worst_key",
    "renamed",
    "namespace_of",
    "namespace_for",
    "label_of",
    "split_layer_key",
    "progress_key",
]

#: The namespace of the keys of a Trainer's only (or first) SMDCallback.
NAMESPACE = "smd"
#: The two run-level series, logged at every log step whatever the options.
AGGREGATES = ("angular_update_ratio", "equilibrium_fraction")
#: The per-layer series (``log_per_layer="all"``); ``"ratio"`` logs ``angular_update_ratio`` only.
LAYER_METRICS = (
    "angular_update",
    "predicted_angular_update",
    "smoothed_predicted_angular_update",
    "angular_update_ratio",
    "weight_norm",
    "predicted_weight_norm",
    "in_equilibrium",
    "effective_lr",
    "steady_ratio",
    "steady_ratio_low",
    "steady_ratio_high",
    "drift",
)
#: The part of a worst-layer key between the namespace and the rank.
WORST = "worst"

_INVALID = re.compile(r"[^A-Za-z0-9_.\- ]")


def metric_name(unit_name: str) -> str:
    """The unit's name as it appears in metric keys: characters MLflow (the strictest logger) rejects become
    ``_`` — a weight+bias unit ``net.conv.weight+bias`` is logged as ``smd/net.conv.weight_bias/...``."""
    return _INVALID.sub("_", unit_name)


def key(*parts: str, namespace: str = NAMESPACE) -> str:
    """``<namespace>/<part>/...``."""
    return "/".join((namespace, *parts))


def layer_key(unit_name: str, metric: str, namespace: str = NAMESPACE) -> str:
    """The key of one layer's series."""
    return key(metric_name(unit_name), metric, namespace=namespace)


def layer_metric_keys(unit_name: str, namespace: str = NAMESPACE) -> dict[str, str]:
    """Every per-layer series of a unit: metric -> key."""
    return {m: layer_key(unit_name, m, namespace) for m in LAYER_METRICS}


def worst_key(rank: int, namespace: str = NAMESPACE) -> str:
    """The smoothed ratio of the ``rank``-th (1-based) layer furthest from its prediction."""
    return key(WORST, str(rank), "angular_update_ratio", namespace=namespace)


#: The heatmap image's key.
HEATMAP_KEY = key("heatmap")


def renamed(name: str, namespace: str = NAMESPACE) -> str:
    """``name`` (a key in ``smd/...``) in ``namespace`` (``smd-strict/...``)."""
    if namespace == NAMESPACE or not name.startswith(NAMESPACE + "/"):
        return name
    return namespace + name[len(NAMESPACE) :]


def namespace_of(name: str) -> str | None:
    """``smd`` or ``smd-<label>`` for a key an SMDCallback logged (``smd/...``, ``smd-strict/...``), else None."""
    first, sep, _ = name.partition("/")
    return first if sep and (first == NAMESPACE or first.startswith(NAMESPACE + "-")) else None


def namespace_for(label: str | None) -> str:
    """The namespace of the SMDCallback called ``label``: ``smd`` for None (the Trainer's first), else ``smd-<label>``."""
    return NAMESPACE if label is None else f"{NAMESPACE}-{label}"


def label_of(namespace: str) -> str | None:
    """The label in a namespace (``strict`` for ``smd-strict``), None for ``smd``: :func:`namespace_for` undone."""
    return None if namespace == NAMESPACE else namespace[len(NAMESPACE) + 1 :]


def split_layer_key(name: str) -> tuple[str, str] | None:
    """``(layer, metric)`` of a per-layer key (``smd/<layer>/<metric>``), else None (an aggregate, a worst-layer key)."""
    parts = name.split("/")
    if len(parts) != 3 or namespace_of(name) is None:  # (a worst-layer key has four parts)
        return None
    return parts[1], parts[2]


def progress_key(what: str, namespace: str = NAMESPACE) -> str:
    """A progress-bar entry's name: ``smd Δ/Δ*``, ``smd-strict eq``."""
    return f"{namespace} {what}"
