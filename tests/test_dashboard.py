"""Views that scale with the number of layers: per-layer series choice, worst layers, the heatmap, the
progress bar, an end table that fits a terminal."""

import json

import numpy as np
import pytest
import torch
from helpers import Module, PlainConvNet, fit_smd, sgd
from torch import nn

from lightning_smd.io.cli import main as cli
from lightning_smd.io.dashboard import RatioHistory, heatmap_figure, per_layer_mode, worst_metrics, worst_units
from lightning_smd.io.report import TABLE_ROWS, format_summary_table


def test_per_layer_mode():
    assert per_layer_mode(True, 100) == "all" and per_layer_mode(False, 1) == "none"
    assert per_layer_mode("auto", 16) == "all" and per_layer_mode("auto", 17) == "ratio"
    assert per_layer_mode("ratio", 3) == "ratio"
    with pytest.raises(ValueError, match="log_per_layer"):
        per_layer_mode("some", 3)


def test_worst_layers_are_the_furthest_on_a_log_scale():
    ratios = np.array([1.0, 0.5, 1.9, np.nan, 1.05])
    applicable = np.array([True, True, True, True, False])
    # |log 0.5| = 0.69 > |log 1.9| = 0.64; nan and non-applicable units are never "worst"
    assert worst_units(ratios, applicable, 3) == [1, 2, 0]
    m = worst_metrics(ratios, applicable, 5)
    assert m["smd/worst/1/angular_update_ratio"] == 0.5 and m["smd/worst/3/angular_update_ratio"] == 1.0
    assert np.isnan(m["smd/worst/4/angular_update_ratio"]) and len(m) == 5


def test_ratio_history_stays_bounded():
    h = RatioHistory(2, max_columns=8)
    for step in range(1, 40):
        h.append(step, np.array([step, -step]))
    assert len(h) <= 8 and h.matrix().shape == (2, len(h)) and h.steps == sorted(h.steps)
    assert h.steps[-1] >= 32  # recent columns kept, every other old one dropped
    h.append(h.steps[-1], np.array([0.0, 0.0]))  # the same step again (a final flush) replaces the column
    assert h.matrix()[0, -1] == 0.0


def test_heatmap_figure_and_its_absence_without_matplotlib(monkeypatch):
    pytest.importorskip("matplotlib")
    names = [f"layer{i}.weight" for i in range(53)]
    fig = heatmap_figure(list(range(10, 210, 10)), np.exp(np.random.default_rng(0).normal(0, 0.2, (53, 20))), names, 0.1)
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == names  # network order, top to bottom
    assert ax.get_ylim() == (53.0, 0.0)
    import builtins

    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError("no matplotlib here")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    assert heatmap_figure([1], np.ones((1, 1)), ["a"], 0.1) is None


def _summary(n_layers, not_steady=(), off=()):
    layers = []
    for i in range(n_layers):
        eq = i not in not_steady
        layers.append(
            {
                "name": f"block{i}.conv.weight",
                "angular_update": 0.01,
                "predicted_angular_update": 0.01,
                "steady_ratio": 1.0,
                "in_equilibrium": eq,
                "state": "equilibrium" if eq else "approaching",
                "agreement": "off_prediction" if i in off else "agrees",
            }
        )
    return {"verdict": "not_reached", "reason": "test", "steps": 100, "layers": layers}


def test_end_table_fits_a_terminal_and_puts_the_layers_to_read_first():
    summary = _summary(53, not_steady=(40, 7), off=(30,))
    lines = format_summary_table(summary, TABLE_ROWS).splitlines()
    assert len(lines) <= 25
    rows = [line.split()[0] for line in lines[2 : 2 + TABLE_ROWS]]
    assert rows[:3] == ["block7.conv.weight", "block40.conv.weight", "block30.conv.weight"]
    assert lines[-2].startswith("... 33 more layers (33 equilibrium)") and "report --all" in lines[-2]
    assert len(format_summary_table(summary).splitlines()) == 53 + 3  # header, rule, rows, verdict


def test_report_all_prints_every_row(tmp_path, capsys):
    path = tmp_path / "smd_summary.json"
    path.write_text(json.dumps(_summary(30)))
    assert cli(["report", str(path)]) == 0
    short = capsys.readouterr().out
    assert cli(["report", str(path), "--all"]) == 0
    full = capsys.readouterr().out
    assert short.count(".conv.weight") == TABLE_ROWS and full.count(".conv.weight") == 30


class WideNet(nn.Module):
    """20 normalized convs in a row: more than the 16 layers up to which every per-layer series is logged."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.blocks = nn.Sequential(*[nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU()) for _ in range(19)])
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        return self.fc(self.blocks(self.stem(x)).mean((2, 3)))


def test_large_models_log_a_handful_of_series_and_the_progress_bar_shows_the_aggregates(tmp_path):
    torch.manual_seed(0)
    fit = fit_smd(tmp_path, Module(WideNet(), optimizer=sgd(momentum=0.9)), 12, trainer_kw={"enable_progress_bar": True}, log_heatmap=False)
    import csv

    with open(tmp_path / "metrics.csv") as fh:
        header = next(csv.reader(fh))
    smd_keys = [k for k in header if k.startswith("smd/")]
    assert len(fit.smd.diagnostics.units) == 20
    # auto: per layer only the ratio (20), plus the 2 aggregates and the 3 worst layers
    assert len(smd_keys) == 20 + 2 + 3 and all(k.endswith("/angular_update_ratio") or k.count("/") == 1 for k in smd_keys)
    bar = fit.trainer.progress_bar_metrics
    assert bar["smd eq"].endswith("/20") and bar["smd Δ/Δ*"] not in ("", None)
    summary = fit.smd.summary()
    assert len(summary["layers"]) == 20 and "weight_norm" in summary["layers"][0]  # the summary keeps everything


def test_every_series_for_a_small_model_by_default(tmp_path):
    torch.manual_seed(0)
    fit = fit_smd(tmp_path, Module(PlainConvNet(), optimizer=sgd(momentum=0.9)), 6, log_heatmap=False)
    with open(tmp_path / "metrics.csv") as fh:
        header = fh.readline()
    assert "smd/net.conv1.weight/weight_norm" in header and "smd/worst/3/angular_update_ratio" in header
    assert fit.smd.summary()["steps"] == 6


def test_wandb_workspace_has_a_handful_of_live_charts_and_the_logged_keys(tmp_path, capsys):
    """Built offline; every metric key a panel names is one the callback logs with the same options."""
    pytest.importorskip("wandb_workspaces")
    from lightning_smd.io.workspace import build_workspace

    torch.manual_seed(0)
    fit = fit_smd(tmp_path, Module(WideNet(), optimizer=sgd(momentum=0.9)), 12, log_heatmap=False)
    names = [u.name for u in fit.smd.diagnostics.units]
    ws = build_workspace("me", "proj", names)
    sections = {s.name: s for s in ws.sections}
    assert list(sections) == ["SMD", "SMD per layer"] and sections["SMD"].is_open and not sections["SMD per layer"].is_open
    live = sections["SMD"].panels
    assert len(live) <= 10 and len(sections["SMD per layer"].panels) == 20
    import csv

    with open(tmp_path / "metrics.csv") as fh:
        logged = set(next(csv.reader(fh)))
    for section in ws.sections:
        for panel in section.panels:
            keys = getattr(panel, "y", None) or []
            assert set(keys) <= logged, (panel.title, set(keys) - logged)
    assert [p.media_keys for p in live if hasattr(p, "media_keys")] == [["smd/heatmap"]]
    assert cli(["wandb-workspace", "me/proj", "--summary", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "section 'SMD' (open): 5 panels" in out and "section 'SMD per layer' (collapsed): 20 panels" in out
    assert cli(["wandb-workspace", "no-project", "--summary", str(tmp_path)]) == 2


@pytest.mark.parametrize("bar", ["tqdm", "rich"])
def test_both_progress_bars_show_the_aggregates(tmp_path, bar):
    import pytorch_lightning as pl

    if bar == "rich":
        pytest.importorskip("rich")
        progress = pl.callbacks.RichProgressBar()
    else:
        progress = pl.callbacks.TQDMProgressBar()
    torch.manual_seed(0)
    model = Module(PlainConvNet(), optimizer=sgd(momentum=0.9))
    fit = fit_smd(tmp_path, model, 6, trainer_kw={"enable_progress_bar": True}, callbacks=[progress], log_heatmap=False)
    assert fit.trainer.progress_bar_callback is progress
    shown = progress.get_metrics(fit.trainer, model)
    assert shown["smd eq"] == "0/3" and shown["smd Δ/Δ*"] != "-"


@pytest.mark.parametrize("image_logger", [False, True], ids=["csv-only", "with-tensorboard"])
def test_without_matplotlib_one_warning_only_where_a_logger_takes_images(tmp_path, monkeypatch, image_logger):
    """Without matplotlib the run and its summary are complete; [SMD045] is said once where a logger takes the
    heatmap image (TensorBoard here), and not at all with a CSVLogger only (the quickstart): nothing is lost there."""
    import pytorch_lightning as pl

    import lightning_smd.engine.session as session_module
    import lightning_smd.frontends.callback as callback_module

    monkeypatch.setattr(session_module, "heatmap_figure", lambda *a, **k: None)  # what it returns without matplotlib
    monkeypatch.setattr(callback_module, "_has_matplotlib", lambda: False)
    loggers = [pl.loggers.CSVLogger(str(tmp_path), name="", version="")]
    if image_logger:
        loggers.append(pl.loggers.TensorBoardLogger(str(tmp_path), name="tb", version=""))
    torch.manual_seed(0)
    fit = fit_smd(tmp_path, Module(PlainConvNet(), optimizer=sgd(momentum=0.9)), 12, trainer_kw={"logger": loggers}, heatmap_every_n_logs=1)
    # three log steps each try to draw: one warning, issued once, with an image logger; none without
    expected = 1 if image_logger else 0
    assert sum("[SMD045]" in w for w in fit.smd.warnings) == expected and sum("[SMD045]" in w for w in fit.warnings) == expected
    assert fit.smd.summary()["steps"] == 12 and fit.smd.summary()["complete"]


def test_end_table_uses_rich_on_a_terminal_and_plain_text_elsewhere(capsys, monkeypatch):
    pytest.importorskip("rich")
    import sys

    from lightning_smd.io.report import print_summary_table

    summary = _summary(30, not_steady=(3,))
    print_summary_table(summary, TABLE_ROWS)
    plain = capsys.readouterr().out
    assert plain == format_summary_table(summary, TABLE_ROWS) + "\n"
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True, raising=False)
    monkeypatch.setenv("COLUMNS", "200")  # a wide terminal
    print_summary_table(summary, TABLE_ROWS)
    rich_out = capsys.readouterr().out
    assert "━" in rich_out and "block3.conv.weight" in rich_out and "... 10 more layers" in rich_out
    assert rich_out.rstrip().splitlines()[-1].startswith("SMD verdict after 100 steps: not_reached")


def test_table_columns_divide_to_the_ratio_after_a_schedule_change(tmp_path):
    """After a learning-rate drop the smoothed Δ still carries the old rate: the table shows it next to Δ* smoothed
    the same way (not the latest Δ*), so that the two columns divide to the ratio column (within 1 %, rounding)."""
    torch.manual_seed(0)
    model = Module(PlainConvNet(), optimizer=sgd(momentum=0.9), scheduler=lambda o: torch.optim.lr_scheduler.StepLR(o, 20, 0.5))
    fit = fit_smd(tmp_path, model, 40, log_heatmap=False)
    table = fit.smd.format_summary()
    header, *lines = table.splitlines()
    assert header.split()[1:7] == ["Δ", "(EMA)", "Δ*", "(EMA)", "Δ/Δ*", "(EMA)"]
    rows = [line.split() for line in lines if line.startswith("net.")]
    assert len(rows) == 3
    for row, layer in zip(rows, fit.smd.summary()["layers"]):
        delta, pred, ratio = float(row[1]), float(row[2]), float(row[3])
        assert delta / pred == pytest.approx(ratio, rel=0.01)
        # the smoothed Δ* lies between the latest prediction and the one before the drop (twice as large for SGD's √lr)
        latest = layer["predicted_angular_update"]
        assert latest < pred < latest * 2**0.5
    assert "(EMA): moving average over 50 steps" in table


def test_plot_aggregate_is_the_median_of_what_its_panels_show(tmp_path):
    """After a learning-rate drop the plot's top row (the median over layers) is computed from exactly the two
    series each layer panel draws, Δ (EMA) and Δ* (EMA): the aggregate cannot contradict the panels."""
    pytest.importorskip("matplotlib")
    import csv

    from lightning_smd.io.plot import load_series, panel_ratio, plot_run

    torch.manual_seed(0)
    model = Module(PlainConvNet(), optimizer=sgd(momentum=0.9), scheduler=lambda o: torch.optim.lr_scheduler.StepLR(o, 20, 0.5))
    fit_smd(tmp_path, model, 40, trainer_kw={"log_every_n_steps": 2}, log_heatmap=False)
    series, _ = load_series(str(tmp_path))
    steps, median = panel_ratio(series, ["net.conv1.weight", "net.conv2.weight", "net.conv3.weight"])
    with open(tmp_path / "metrics.csv") as fh:
        last = [r for r in csv.DictReader(fh) if r["smd/net.conv1.weight/angular_update"]][-1]
    quotients = [
        float(last[f"smd/net.conv{i}.weight/angular_update"]) / float(last[f"smd/net.conv{i}.weight/smoothed_predicted_angular_update"])
        for i in (1, 2, 3)
    ]
    assert steps[-1] == int(last["step"]) and median[-1] == pytest.approx(float(np.median(quotients)), rel=1e-9)
    assert plot_run(str(tmp_path), str(tmp_path / "smd.png"), layers=2, dpi=40) == str(tmp_path / "smd.png")
