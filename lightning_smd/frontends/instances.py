"""Several SMDCallbacks in one Trainer (e.g. a lenient and a strict gate): what tells each apart, its label (its
metrics go under ``smd-<label>/…``, its summary to ``smd_summary-<label>.json``), and two that cannot be told apart
refused. Pure functions of the options: nothing here imports torch or Lightning.
"""

from __future__ import annotations

import inspect
import os
import re
from collections.abc import Callable, Sequence
from typing import Any

__all__ = ["distinct_options", "instance_label"]

#: Longest automatic label (from the options that set an instance apart); longer ones become ``2``, ``3``, …
_LABEL_CHARS = 40
#: Options that change how results are shown or where they go, not what is measured or judged: they do not label.
_PRESENTATION = frozenset(
    {
        "verbose", "keep_history", "log_heatmap", "heatmap_every_n_logs", "heatmap_time_share", "wandb_workspace", "log_per_layer", "worst_k",
        "log_every_n_steps", "summary_path",
    }  # fmt: skip
)


def distinct_options(given: dict[str, Any], constructor: Callable[..., Any]) -> dict[str, Any]:
    """The options ``given`` to ``constructor`` that differ from its defaults, in signature order (a path as a
    str, a tuple as a list)."""
    defaults = {k: p.default for k, p in inspect.signature(constructor).parameters.items() if k != "self"}
    out = {}
    for k, v in given.items():
        value = str(v) if isinstance(v, os.PathLike) else v
        if k in defaults and value != defaults[k]:
            out[k] = list(value) if isinstance(value, tuple) else value
    return out


def instance_label(distinct: Sequence[dict[str, Any]], me: int) -> str | None:
    """The label of the ``me``-th of a Trainer's SMDCallbacks, given each one's :func:`distinct_options`: None for
    a Trainer's only one (and for the first one measuring with the default options); else its ``name``, or the
    measuring options that set it apart (``tolerance-0.05``), or its position (``2``) when those are none or too
    long.

    Two with the same options (or one listed twice) are refused: Lightning refuses them when the Trainer is built
    (they have the same ``state_key``), this when one was added to the Trainer's callbacks later."""
    if any(other == distinct[me] for i, other in enumerate(distinct) if i != me):
        raise ValueError(
            "The Trainer was given two SMDCallbacks with the same options: they would measure the same weights twice and "
            "write the same summary and metrics. Keep one, or make them differ, e.g. SMDCallback(name='strict', "
            "require_agreement=True) next to SMDCallback()."
        )
    if len(distinct) <= 1:
        return None
    labels: list[str | None] = []
    plain_taken = False
    for i, options in enumerate(distinct):
        if options.get("name") is not None:
            labels.append(options["name"])
            continue
        measuring = {k: v for k, v in options.items() if k not in _PRESENTATION}
        if not measuring and not plain_taken:
            plain_taken = True
            labels.append(None)
        else:
            auto = "_".join(f"{k}-{v}" for k, v in measuring.items())
            auto = re.sub(r"[^A-Za-z0-9_.\-]+", "", auto.replace(" ", ""))
            labels.append(auto if 0 < len(auto) <= _LABEL_CHARS else str(i + 1))
    clash = {x for x in labels if labels.count(x) > 1}
    if clash:
        raise ValueError(
            f"Two SMDCallbacks of this Trainer would log under the same keys ({', '.join(sorted(map(str, clash)))}): give them different name=... values."
        )
    return labels[me]
