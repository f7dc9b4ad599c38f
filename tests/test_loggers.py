"""Every logger gets what its users expect, read back from what it wrote: CSV rows, TensorBoard event files
and the custom-scalars layout, the W&B offline run directory, the MLflow file store."""

import csv
import glob
import json
import os
import re
import struct
import time
import warnings

import pytest
import pytorch_lightning as pl
import torch
from helpers import Module, PlainConvNet, SmallConvNet, loader, sgd, trainer

from lightning_smd import SMDCallback
from lightning_smd.analysis.diagnostics import LAYER_METRICS, metric_name


def _fit(tmp_path, logger, steps=12, model=None, **smd_kw):
    torch.manual_seed(0)
    smd = SMDCallback(verbose=False, **smd_kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer(tmp_path, [smd], max_steps=steps, logger=logger).fit(model or Module(SmallConvNet(), optimizer=sgd(momentum=0.9)), loader())
    return smd


def _expected_keys(smd):
    keys = {"smd/angular_update_ratio", "smd/equilibrium_fraction"}
    for u in smd.diagnostics.units:
        keys |= {f"smd/{metric_name(u.name)}/{m}" for m in LAYER_METRICS}
    return keys


def test_csv_has_a_fixed_key_set_from_the_first_row(tmp_path):
    logger = pl.loggers.CSVLogger(str(tmp_path), name="", version="")
    smd = _fit(tmp_path, logger, steps=12)
    with open(os.path.join(logger.log_dir, "metrics.csv")) as fh:
        rows = list(csv.DictReader(fh))
    expected = _expected_keys(smd)
    assert expected <= set(rows[0])
    smd_rows = [r for r in rows if r["smd/angular_update_ratio"] != ""]
    assert [int(r["step"]) for r in smd_rows] == [4, 9, 11]  # log_every_n_steps=5, plus the last step
    for r in smd_rows:  # every key has a value in every SMD row: nothing appears later
        assert all(r[k] != "" for k in expected)


def test_mlflow_names_are_valid_for_weight_bias_units(tmp_path, monkeypatch):
    """A weight+bias unit's '+' is not allowed by MLflow: its keys use '_', and no key gets rewritten."""
    from zoo import BiasPairs

    net = BiasPairs()
    net.head = torch.nn.Linear(12, 10)
    pytest.importorskip("mlflow")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 keeps the file store behind this switch
    logger = pl.loggers.MLFlowLogger(experiment_name="smd", tracking_uri=f"file:{tmp_path / 'mlruns'}")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        smd = _fit(tmp_path, logger, steps=6, model=Module(net, optimizer=sgd(momentum=0.9)))
    assert not [w for w in caught if "MLFlow only allows" in str(w.message)]
    names = [u.name for u in smd.diagnostics.units]
    assert "net.conv.weight+bias" in names
    run_dir = glob.glob(str(tmp_path / "mlruns" / "*" / logger.run_id))[0]
    metric = os.path.join(run_dir, "metrics", "smd", "net.conv.weight_bias", "angular_update")
    with open(metric) as fh:
        lines = [line.split() for line in fh.read().splitlines()]
    assert [int(x[2]) for x in lines] == [4, 5]  # (timestamp, value, step) rows
    assert all(float(x[1]) > 0 for x in lines)


def _tb_events(log_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(log_dir, size_guidance={"scalars": 0})
    acc.Reload()
    return acc


def test_tensorboard_scalars_and_custom_scalars_layout(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.plugins.custom_scalar import layout_pb2, metadata

    logger = pl.loggers.TensorBoardLogger(str(tmp_path), name="tb", version=0)
    smd = _fit(tmp_path, logger, steps=12)
    acc = _tb_events(logger.log_dir)
    tags = set(acc.Tags()["scalars"])
    assert _expected_keys(smd) <= tags
    name = metric_name("net.conv1.weight")
    assert [e.step for e in acc.Scalars(f"smd/{name}/angular_update")] == [4, 9, 11]
    # the layout is stored as a tensor summary of the custom_scalars plugin
    from tensorboard.backend.event_processing import event_file_loader

    raw = None

    for path in glob.glob(os.path.join(logger.log_dir, "events.out.tfevents.*")):
        for event in event_file_loader.EventFileLoader(path).Load():
            for value in event.summary.value:
                if value.metadata.plugin_data.plugin_name == metadata.PLUGIN_NAME:
                    raw = value.tensor.string_val[0]
    assert raw is not None, "no custom-scalars layout written"
    layout = layout_pb2.Layout.FromString(raw)
    charts = {cat.title: {c.title: list(c.multiline.tag) for c in cat.chart} for cat in layout.category}
    closed = {cat.title: cat.closed for cat in layout.category}
    # the overview leads, open, with a handful of charts; the per-layer charts follow in closed categories
    assert [cat.title for cat in layout.category][0] == "SMD" and not closed["SMD"]
    overview = charts["SMD"]
    assert list(overview) == [
        "median ratio to prediction",
        "share of layers in equilibrium",
        "worst layers: ratio to prediction",
        "every layer: ratio to prediction",
    ]
    every_layer, worst = re.compile(overview["every layer: ratio to prediction"][0]), re.compile(overview["worst layers: ratio to prediction"][0])
    assert {t for t in tags if every_layer.fullmatch(t)} == {f"smd/{metric_name(u.name)}/angular_update_ratio" for u in smd.diagnostics.units}
    assert {t for t in tags if worst.fullmatch(t)} == {f"smd/worst/{i}/angular_update_ratio" for i in (1, 2, 3)}
    delta = charts["SMD per layer: angular update, measured vs predicted"]
    assert closed["SMD per layer: angular update, measured vs predicted"]
    assert sorted(t for t in tags if any(re.fullmatch(r, t) for r in delta["net.conv1.weight"])) == sorted(
        [f"smd/{name}/angular_update", f"smd/{name}/predicted_angular_update"]
    )
    assert set(delta) == {u.name for u in smd.diagnostics.units}
    norm = charts["SMD per layer: weight norm, measured vs predicted"]
    assert sorted(t for t in tags if any(re.fullmatch(r, t) for r in norm["net.conv1.weight"])) == sorted(
        [f"smd/{name}/weight_norm", f"smd/{name}/predicted_weight_norm"]
    )


def _wandb_records(run_dir):
    """Records of an offline W&B run file (the LevelDB-style log: 7-byte file header, 32 KiB blocks of
    chunks with a 7-byte header: crc32 (4), length (2), type (1: full, 2: first, 3: middle, 4: last))."""
    from wandb.proto import wandb_internal_pb2

    path = glob.glob(os.path.join(run_dir, "*.wandb"))[0]
    data = open(path, "rb").read()
    assert data[:4] == b":W&B"
    pos, block, records, pending = 7, 32768, [], b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0 and length == 0:
            pos += left
            continue
        if pos + 7 + length > len(data):  # a record still being written
            break
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind == 1:
            records.append(chunk)
        elif kind == 2:
            pending = chunk
        elif kind == 3:
            pending += chunk
        elif kind == 4:
            records.append(pending + chunk)
    out = []
    for raw in records:
        r = wandb_internal_pb2.Record()
        r.ParseFromString(raw)
        out.append(r)
    return out


def _finished_wandb_records(run_dir):
    """The records of a finished offline W&B run: wandb-core may still be writing the run file right after finish()
    on a loaded machine, so read until the exit record is there (60 s at most)."""
    deadline = time.monotonic() + 60
    while True:
        records = _wandb_records(run_dir)
        if "exit" in [r.WhichOneof("record_type") for r in records] or time.monotonic() > deadline:
            return records
        time.sleep(0.5)


def _wandb_history(records):
    """The history rows of a W&B run's records, as ``{key: value}``."""
    rows = []
    for r in records:
        if r.WhichOneof("record_type") == "history":
            rows.append({"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in r.history.item})
    return rows


def test_wandb_offline_history_summary_and_table(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    logger = pl.loggers.WandbLogger(project="smd-test", save_dir=str(tmp_path), offline=True)
    smd = _fit(tmp_path, logger, steps=12)
    run_dir = logger.experiment.dir.rsplit("/files", 1)[0]
    logger.experiment.finish()
    records = _finished_wandb_records(run_dir)
    kinds = [r.WhichOneof("record_type") for r in records]
    smd_rows = [h for h in _wandb_history(records) if "smd/angular_update_ratio" in h]
    assert [h["trainer/global_step"] for h in smd_rows] == [4, 9, 11], sorted(set(kinds))
    assert _expected_keys(smd) <= set(smd_rows[0])
    defined = {r.metric.glob_name or r.metric.name: r.metric.step_metric for r in records if r.WhichOneof("record_type") == "metric"}
    assert defined.get("smd/*") == "trainer/global_step"
    summary = {}
    for r in records:
        if r.WhichOneof("record_type") == "summary":
            for item in r.summary.update:
                summary["/".join(item.nested_key) or item.key] = json.loads(item.value_json)
    assert summary["smd/verdict"] == smd.summary()["verdict"]
    assert "smd/net.conv1.weight/final_ratio" in summary
    tables = glob.glob(os.path.join(run_dir, "files", "media", "table", "smd", "layers_*.table.json"))
    assert tables, "no per-layer table written"
    table = json.load(open(tables[0]))
    assert table["columns"][:3] == ["layer", "angular_update", "predicted_angular_update"]
    assert sorted(row[0] for row in table["data"]) == sorted(u.name for u in smd.diagnostics.units)


def test_several_loggers_at_once_and_none(tmp_path):
    pytest.importorskip("tensorboard")
    csv_logger = pl.loggers.CSVLogger(str(tmp_path), name="csv", version=0)
    tb = pl.loggers.TensorBoardLogger(str(tmp_path), name="tb", version=0)
    smd = _fit(tmp_path / "both", [csv_logger, tb], steps=12)
    with open(os.path.join(csv_logger.log_dir, "metrics.csv")) as fh:
        csv_steps = [int(r["step"]) for r in csv.DictReader(fh) if r["smd/angular_update_ratio"]]
    tb_steps = [e.step for e in _tb_events(tb.log_dir).Scalars("smd/angular_update_ratio")]
    assert csv_steps == tb_steps == [4, 9, 11]
    assert os.path.exists(os.path.join(csv_logger.log_dir, "smd_summary.json"))  # the first logger's directory
    # no logger: the summary (under default_root_dir) and the table still come
    torch.manual_seed(0)
    smd = SMDCallback(verbose=True)
    root = tmp_path / "none"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer(root, [smd], max_steps=12, logger=False).fit(Module(PlainConvNet(), optimizer=sgd(momentum=0.9)), loader())
    summary = json.load(open(root / "smd_summary.json"))
    assert summary["steps"] == 12 and summary["layers"]


class Refusing(pl.loggers.CSVLogger):
    def log_metrics(self, metrics, step=None):
        if any(k.startswith("smd/") for k in metrics):
            raise ValueError("this logger takes no smd metric")
        super().log_metrics(metrics, step)


def test_a_logger_that_refuses_a_metric_gets_a_warning_not_a_crash(tmp_path):
    """A logger that raises on every SMD log step (4, 9, 11): one warning for the run, training goes on, the other
    logger gets every row and the summary is written."""
    torch.manual_seed(0)
    smd = SMDCallback(verbose=False)
    other = pl.loggers.CSVLogger(str(tmp_path), name="other", version=0)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        trainer(tmp_path, [smd], max_steps=12, logger=[Refusing(str(tmp_path), name="", version=""), other]).fit(
            Module(SmallConvNet(), optimizer=sgd(momentum=0.9)), loader()
        )
    refused = [str(w.message) for w in record if "Refusing refused the SMD metrics" in str(w.message)]
    assert len(refused) == 1 and "[SMD040]" in refused[0], refused
    assert [w for w in smd.summary()["warnings"] if "[SMD040]" in w] == refused
    assert smd.summary()["steps"] == 12
    with open(os.path.join(other.log_dir, "metrics.csv")) as fh:
        assert [int(r["step"]) for r in csv.DictReader(fh) if r["smd/angular_update_ratio"]] == [4, 9, 11]
    assert json.load(open(smd.summary_file))["steps"] == 12


def _png_in(path):
    with open(path, "rb") as fh:
        return fh.read(8) == b"\x89PNG\r\n\x1a\n"


def test_heatmap_image_reaches_wandb_tensorboard_and_mlflow(tmp_path, monkeypatch):
    """The layer × step heatmap is logged as an image every ``heatmap_every_n_logs`` log steps and at the end;
    each logger's own files hold it (read back here)."""
    pytest.importorskip("matplotlib")
    pytest.importorskip("tensorboard")
    pytest.importorskip("mlflow")
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    tb = pl.loggers.TensorBoardLogger(str(tmp_path), name="tb", version=0)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    mlflow = pl.loggers.MLFlowLogger(experiment_name="smd", tracking_uri=f"file:{tmp_path / 'mlruns'}")
    wb = pl.loggers.WandbLogger(project="smd-test", save_dir=str(tmp_path), offline=True)
    smd = _fit(tmp_path, [tb, mlflow, wb], steps=12, heatmap_every_n_logs=2, heatmap_time_share=1.0, wandb_workspace=True)
    # log steps 4, 9 and the final flush at 11, in each logger's scalars; live images at the 2nd log step, and one at
    # the end
    acc = _tb_events(tb.log_dir)
    assert [e.step for e in acc.Scalars("smd/angular_update_ratio")] == [4, 9, 11]
    with open(glob.glob(str(tmp_path / "mlruns" / "*" / mlflow.run_id / "metrics" / "smd" / "angular_update_ratio"))[0]) as fh:
        assert [int(line.split()[2]) for line in fh.read().splitlines()] == [4, 9, 11]  # (timestamp, value, step) rows
    assert [e.step for e in acc.Images("smd/heatmap")] == [9, 11]
    image = acc.Images("smd/heatmap")[-1]
    assert image.width > 300 and image.height > 100 and image.encoded_image_string[:8] == b"\x89PNG\r\n\x1a\n"
    figures = sorted(glob.glob(str(tmp_path / "mlruns" / "*" / "*" / "artifacts" / "smd" / "heatmap_step*.png")))
    assert [os.path.basename(f) for f in figures] == ["heatmap_step0000009.png", "heatmap_step0000011.png"]
    assert all(_png_in(f) for f in figures)
    run_dir = wb.experiment.dir.rsplit("/files", 1)[0]
    wb.experiment.finish()
    history = _wandb_history(_finished_wandb_records(run_dir))
    assert [h["trainer/global_step"] for h in history if "smd/angular_update_ratio" in h] == [4, 9, 11]
    images = glob.glob(os.path.join(run_dir, "files", "media", "images", "smd", "heatmap_*.png"))
    assert len(images) == 2 and all(_png_in(f) for f in images)
    assert not [w for w in smd.summary()["warnings"] if "SMD041" in w]
    # an offline run cannot save a workspace: one warning with the command that does it later
    assert [w for w in smd.warnings if "[SMD046]" in w] == [
        "The W&B workspace was not saved (the W&B run is offline); build and save it later with: lightning-smd "
        "wandb-workspace ENTITY/PROJECT --summary LOG_DIR --save. [SMD046]"
    ]


@pytest.mark.parametrize("share, expected", [(1.0, [4, 9, 11]), (0.005, [11])], ids=["unbounded", "default"])
def test_heatmap_drawings_during_training_stay_within_their_time_share(tmp_path, share, expected):
    """``heatmap_time_share`` bounds the wall time of the heatmaps drawn during training: a drawing is made only while
    the drawings so far and one more (the last one's cost, or ``HEATMAP_FIRST_SECONDS`` = 0.25 s before any) stay
    within the share of the fit's wall time; the one at the end is always drawn. At the default 0.5 % the first
    drawing needs 50 s of training: this fit of a few seconds draws at the end only."""
    pytest.importorskip("matplotlib")
    pytest.importorskip("tensorboard")
    tb = pl.loggers.TensorBoardLogger(str(tmp_path), name="tb", version=0)
    smd = _fit(tmp_path, tb, steps=12, heatmap_every_n_logs=1, heatmap_time_share=share)
    acc = _tb_events(tb.log_dir)
    assert [e.step for e in acc.Scalars("smd/angular_update_ratio")] == [4, 9, 11]
    assert [e.step for e in acc.Images("smd/heatmap")] == expected
    assert smd._fit.heatmap_seconds > 0.0


def test_a_logger_that_refuses_an_image_gets_one_warning(tmp_path):
    pytest.importorskip("matplotlib")
    pytest.importorskip("tensorboard")

    class NoImages(pl.loggers.TensorBoardLogger):
        @property
        def experiment(self):
            writer = super().experiment

            def refuse(*args, **kwargs):
                raise RuntimeError("no images here")

            writer.add_image = refuse
            return writer

    logger = NoImages(str(tmp_path), name="tb", version=0)
    smd = _fit(tmp_path, logger, steps=12, heatmap_every_n_logs=1)
    refused = [w for w in smd.summary()["warnings"] if "[SMD041]" in w]
    assert len(refused) == 1 and "log the SMD heatmap" in refused[0] and "no images here" in refused[0]
    assert smd.summary()["steps"] == 12
