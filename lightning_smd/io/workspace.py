"""A Weights & Biases workspace worth opening, built with ``wandb-workspaces`` (``pip install
"lightning-smd[workspace]"``).

    lightning-smd wandb-workspace ENTITY/PROJECT --summary LOG_DIR_OR_SUMMARY [--save]

Sections: **SMD** (open) leads with a handful of charts whatever the model's size — the median ratio Δ/Δ*,
the share of layers in equilibrium, the worst layers' ratios, every layer's ratio in one chart, and the
heatmap images; **SMD per layer** (collapsed) has one chart per layer overlaying the measured and the
predicted angular update (and one for the weight norm and its prediction) when every per-layer series is
logged, or the layer's ratio otherwise. Building needs no network; saving (``--save``,
:func:`save_workspace`) needs a W&B server and an API key.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from lightning_smd.analysis.keys import HEATMAP_KEY, key, layer_metric_keys, worst_key
from lightning_smd.io.dashboard import per_layer_mode

__all__ = ["workspace_panels", "build_workspace", "save_workspace"]

#: The x axis of every line plot: the step the Lightning loggers log at.
STEP = "trainer/global_step"


def workspace_panels(unit_names: Sequence[str], per_layer: bool | str = "auto", worst_k: int = 3) -> list[tuple[str, bool, list[dict[str, Any]]]]:
    """The workspace as plain data: ``[(section, open, [panel])]``, each panel ``{"kind": "line" | "media",
    "title": ..., "keys": [...]}`` — the metric keys are exactly those the callback logs with these options."""
    mode = per_layer_mode(per_layer, len(unit_names))
    overview: list[dict[str, Any]] = [
        {"kind": "line", "title": "median Δ/Δ* (1 = equilibrium)", "keys": [key("angular_update_ratio")]},
        {"kind": "line", "title": "share of layers in equilibrium", "keys": [key("equilibrium_fraction")]},
    ]
    if worst_k:
        overview.append({"kind": "line", "title": "worst layers: Δ/Δ*", "keys": [worst_key(i + 1) for i in range(worst_k)]})
    if mode != "none" and unit_names:
        overview.append({"kind": "line", "title": "every layer: Δ/Δ*", "keys": [layer_metric_keys(n)["angular_update_ratio"] for n in unit_names]})
    overview.append({"kind": "media", "title": "layer × step heatmap of Δ/Δ*", "keys": [HEATMAP_KEY]})
    per_layer_panels: list[dict[str, Any]] = []
    for name in unit_names if mode != "none" else []:
        keys = layer_metric_keys(name)
        if mode == "all":
            per_layer_panels.append({"kind": "line", "title": f"{name}: angular update", "keys": [keys["angular_update"], keys["predicted_angular_update"]]})
            per_layer_panels.append({"kind": "line", "title": f"{name}: weight norm", "keys": [keys["weight_norm"], keys["predicted_weight_norm"]]})
        else:
            per_layer_panels.append({"kind": "line", "title": f"{name}: Δ/Δ*", "keys": [keys["angular_update_ratio"]]})
    sections = [("SMD", True, overview)]
    if per_layer_panels:
        sections.append(("SMD per layer", False, per_layer_panels))
    return sections


def build_workspace(entity: str, project: str, unit_names: Sequence[str], per_layer: bool | str = "auto", worst_k: int = 3, name: str = "SMD") -> Any:
    """A ``wandb_workspaces.workspaces.Workspace`` of :func:`workspace_panels` (no network needed).

    Raises:
        ImportError: ``wandb-workspaces`` is not installed (the message says how to install it).
    """
    try:
        import wandb_workspaces.reports.v2 as wr
        import wandb_workspaces.workspaces as ws
    except ImportError as err:
        raise ImportError('the W&B workspace needs wandb-workspaces: pip install "lightning-smd[workspace]"') from err
    sections = []
    for title, is_open, panels in workspace_panels(unit_names, per_layer, worst_k):
        built = []
        for p in panels:
            if p["kind"] == "media":
                built.append(wr.MediaBrowser(title=p["title"], media_keys=list(p["keys"])))
            else:
                built.append(wr.LinePlot(title=p["title"], x=STEP, y=list(p["keys"])))
        sections.append(ws.Section(name=title, panels=built, is_open=is_open))
    return ws.Workspace(entity=entity, project=project, name=name, sections=sections)


def save_workspace(workspace: Any) -> str:
    """Save ``workspace`` to the W&B server (needs ``WANDB_API_KEY``); returns its URL."""
    workspace.save()
    return str(getattr(workspace, "url", ""))
