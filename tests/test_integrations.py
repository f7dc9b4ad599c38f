"""Both Lightning namespaces, LightningCLI from YAML, the plain-PyTorch loop API, Fabric, the plot command."""

import json
import math
import os
import struct
import subprocess
import sys
import warnings
import zlib

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from helpers import Module, PlainConvNet, SmallConvNet, loader, sgd, trainer
from torch.nn import functional as F

from lightning_smd import EquilibriumNotReachedError, SMDCallback, SMDMonitor, SMDWarning

HERE = os.path.dirname(os.path.abspath(__file__))


def test_pytorch_lightning_namespace(tmp_path):
    smd = SMDCallback(verbose=False)
    assert isinstance(smd, pl.Callback)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer(tmp_path, [smd], max_steps=8).fit(Module(SmallConvNet(), optimizer=sgd(momentum=0.9)), loader())
    assert smd.summary()["steps"] == 8 and smd.summary()["layers"]


def test_lightning_pytorch_namespace(tmp_path):
    L = pytest.importorskip("lightning.pytorch")

    class LModule(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = SmallConvNet()

        def training_step(self, batch, batch_idx):
            x, y = batch
            return F.cross_entropy(self.net(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-3)

    smd = SMDCallback(verbose=False)
    assert isinstance(smd, L.Callback)
    t = L.Trainer(
        max_steps=8,
        accelerator="cpu",
        logger=L.loggers.CSVLogger(str(tmp_path), name="", version=""),
        callbacks=[smd],
        log_every_n_steps=4,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t.fit(LModule(), loader())
    summary = json.load(open(tmp_path / "smd_summary.json"))
    assert summary["steps"] == 8 and {r["name"] for r in summary["layers"]} >= {"net.conv1.weight", "net.conv3.weight"}
    header = (tmp_path / "metrics.csv").read_text().splitlines()[0].split(",")
    assert "smd/net.conv1.weight/angular_update" in header and "smd/angular_update_ratio" in header


@pytest.mark.slow
def test_lightning_cli_from_yaml(tmp_path):
    pytest.importorskip("jsonargparse")
    (tmp_path / "conf").mkdir()
    config = tmp_path / "conf" / "config.yaml"  # (LightningCLI saves its own config.yaml in the log dir)
    config.write_text(
        f"""
seed_everything: 0
trainer:
  max_steps: 10
  accelerator: cpu
  log_every_n_steps: 5
  enable_progress_bar: false
  enable_checkpointing: false
  default_root_dir: {tmp_path}
  logger:
    class_path: pytorch_lightning.loggers.CSVLogger
    init_args:
      save_dir: {tmp_path}
      name: ""
      version: ""
  callbacks:
    - class_path: lightning_smd.SMDCallback
      init_args:
        tolerance: 0.2
        window: 20
        log_per_layer: false
        verbose: false
        on_no_equilibrium: warn
"""
    )
    script = tmp_path / "cli.py"
    script.write_text(
        f"""
import sys
sys.path.insert(0, {HERE!r})
from pytorch_lightning.cli import LightningCLI
from cli_model import CLIModel, CLIData

LightningCLI(CLIModel, CLIData, args=["fit", "--config", {str(config)!r}])
"""
    )
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.load(open(tmp_path / "smd_summary.json"))
    assert summary["criteria"]["tolerance"] == 0.2 and summary["criteria"]["window"] == 20
    assert summary["steps"] == 10
    header = (tmp_path / "metrics.csv").read_text().splitlines()[0]
    assert "smd/angular_update_ratio" in header and "smd/net.conv1.weight/angular_update" not in header  # log_per_layer: false


@pytest.mark.slow
def test_lightning_cli_rejects_a_bad_option(tmp_path):
    pytest.importorskip("jsonargparse")
    script = tmp_path / "cli.py"
    script.write_text(
        f"""
import sys
sys.path.insert(0, {HERE!r})
from pytorch_lightning.cli import LightningCLI
from cli_model import CLIModel, CLIData

LightningCLI(CLIModel, CLIData, args=["fit", "--trainer.callbacks+=lightning_smd.SMDCallback",
             "--trainer.callbacks.tolerance=not-a-number", "--trainer.max_steps=1"])
"""
    )
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=240)
    assert proc.returncode != 0 and "tolerance" in proc.stderr


def _loop(model, opt, steps, monitor=None, scheduler=None):
    data = iter(loader())
    logged = []
    for step in range(steps):
        x, y = next(data)
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        if scheduler is not None:
            scheduler.step()
        if monitor is not None:
            monitor.observe_loss(loss)
        if monitor is not None and monitor.should_log(step):
            logged.append((step, monitor.metrics()))
    return logged


def test_plain_pytorch_loop_gives_the_callbacks_numbers(tmp_path):
    """SMDMonitor in a hand-written loop measures what SMDCallback measures in the same training."""
    torch.manual_seed(0)
    smd = SMDCallback(verbose=False, keep_history=True)
    model = Module(PlainConvNet(), optimizer=sgd(momentum=0.9))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer(tmp_path, [smd], max_steps=30, log_every_n_steps=10).fit(model, loader())
    torch.manual_seed(0)
    net = Module(PlainConvNet(), optimizer=sgd(momentum=0.9))
    opt = net.configure_optimizers()
    monitor = SMDMonitor(net, opt, log_every_n_steps=10, keep_history=True)
    logged = _loop(net, opt, 30, monitor)
    assert [s for s, _ in logged] == [9, 19, 29]
    assert set(logged[-1][1]) >= {"smd/angular_update_ratio", "smd/net.conv1.weight/angular_update"}
    summary = monitor.close(summary_path=tmp_path / "loop_summary.json")
    assert summary["complete"] and summary["steps"] == 30
    on_disk = json.load(open(tmp_path / "loop_summary.json"))
    assert on_disk["verdict"] == summary["verdict"]
    for name in ("net.conv1.weight", "net.conv2.weight", "net.conv3.weight"):
        a = smd.diagnostics.unit_history(name)["angular_update"]
        b = monitor.diagnostics.unit_history(name)["angular_update"]
        np.testing.assert_allclose(b, a, rtol=1e-6)
    assert "SMD verdict after 30 steps" in monitor.format_summary()
    # closed: the optimizer hooks are gone
    _loop(net, opt, 2)
    assert monitor.recorder.pending == 0


@pytest.mark.parametrize("per_filter", [False, True], ids=["whole", "per-filter"])
def test_callback_and_monitor_write_the_same_summary(tmp_path, per_filter):
    """One engine behind both front ends: the same training through a Trainer with SMDCallback and through a
    hand-written loop with SMDMonitor gives the same summary file, field for field (warnings, detection,
    the numerical check, the verdict), and the same warnings with their codes."""
    options = dict(keep_history=True, per_filter=per_filter, track_distance=True)
    torch.manual_seed(0)
    smd = SMDCallback(verbose=False, summary_path=tmp_path / "callback.json", **options)
    model = Module(PlainConvNet(), optimizer=sgd(momentum=0.9))
    with warnings.catch_warnings(record=True) as from_callback:
        warnings.simplefilter("always")
        trainer(tmp_path / "fit", [smd], max_steps=30, log_every_n_steps=10).fit(model, loader())
    torch.manual_seed(0)
    net = Module(PlainConvNet(), optimizer=sgd(momentum=0.9))
    opt = net.configure_optimizers()
    with warnings.catch_warnings(record=True) as from_monitor:
        warnings.simplefilter("always")
        monitor = SMDMonitor(net, opt, log_every_n_steps=10, max_steps=30, **options)
        _loop(net, opt, 30, monitor)
        monitor.close(summary_path=tmp_path / "monitor.json")
    a = json.load(open(tmp_path / "callback.json"))
    b = json.load(open(tmp_path / "monitor.json"))
    assert a["warnings"], "the run is meant to warn (planned shorter than the relaxation needs)"
    assert a["layers"][0]["verification"] is not None, "the numerical check ran"
    for run in (a, b):  # each run's identity, the one thing two runs never share
        run.pop("run_id"), run.pop("started_at")
    assert a == b
    codes = [[w.message.code for w in record if issubclass(w.category, SMDWarning)] for record in (from_callback, from_monitor)]
    assert codes[0] == codes[1] and "SMD003" in codes[0] and codes[0][-1] == "SMD034"


def test_monitor_gate_raises_after_writing_the_summary(tmp_path):
    """``on_no_equilibrium="raise"``: as the callback, ``close()`` writes the summary, then raises."""
    torch.manual_seed(0)
    net = Module(PlainConvNet(), optimizer=sgd(momentum=0.9))
    opt = net.configure_optimizers()
    monitor = SMDMonitor(net, opt, log_every_n_steps=5, on_no_equilibrium="raise")
    _loop(net, opt, 10)
    with pytest.raises(EquilibriumNotReachedError, match="not_reached") as info:
        monitor.close(summary_path=tmp_path / "s.json")
    assert json.load(open(tmp_path / "s.json"))["verdict"] == "not_reached" == info.value.summary["verdict"]
    with pytest.raises(ValueError, match="on_no_equilibrium"):
        SMDMonitor(net, opt, on_no_equilibrium="fail")


def test_monitor_explains_a_model_without_normalized_weights():
    """As the callback does: one warning that says what to pass, and a ``not_applicable`` verdict; the
    training loop goes on."""
    net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    with pytest.warns(SMDWarning, match=r"no normalized .*include=.*\[SMD001\]") as record:
        monitor = SMDMonitor(net, opt)
    assert [w.message.code for w in record if issubclass(w.category, SMDWarning)] == ["SMD001"]
    net(torch.randn(2, 4)).sum().backward()
    opt.step()
    summary = monitor.close()
    assert summary["verdict"] == "not_applicable" and summary["layers"] == [] and summary["warnings"] == monitor.warnings


def test_fabric_loop(tmp_path):
    fabric_mod = pytest.importorskip("lightning_fabric")
    fabric = fabric_mod.Fabric(accelerator="cpu", devices=1)
    torch.manual_seed(0)
    net = PlainConvNet()
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-3)
    model, optimizer = fabric.setup(net, opt)
    monitor = SMDMonitor(model, optimizer, log_every_n_steps=5)
    assert monitor.units == ["conv1.weight", "conv2.weight", "conv3.weight"]
    data = iter(loader())
    for _ in range(10):
        x, y = next(data)
        optimizer.zero_grad()
        fabric.backward(F.cross_entropy(model(x), y))
        optimizer.step()
    summary = monitor.close()
    assert summary["steps"] == 10 and all(r["angular_update"] > 0 for r in summary["layers"])


def _png_size(path):
    with open(path, "rb") as fh:
        head = fh.read(33)
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", head[16:24])
    assert zlib.crc32(head[12:29]) == struct.unpack(">I", head[29:33])[0]
    return width, height


def test_plot_command_draws_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    from lightning_smd.io.cli import main

    torch.manual_seed(0)
    smd = SMDCallback(verbose=False, window=10, ema_steps=5)
    model = Module(PlainConvNet(), optimizer=sgd(momentum=0.9), scheduler=lambda o: torch.optim.lr_scheduler.StepLR(o, 20, 0.5))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer(tmp_path, [smd], max_steps=40, log_every_n_steps=2).fit(model, loader())
    out = tmp_path / "smd.png"
    assert main(["plot", str(tmp_path), "-o", str(out), "--layers", "2", "--dpi", "50"]) == 0
    width, height = _png_size(out)
    assert (width, height) == (11 * 50, round(2.4 * 3 * 50))  # 1 aggregate row + 2 layers
    assert os.path.getsize(out) > 10_000
    assert main(["plot", str(tmp_path / "metrics.csv"), "-o", str(tmp_path / "all.png"), "--all", "--dpi", "50"]) == 0
    assert _png_size(tmp_path / "all.png")[1] == round(2.4 * 4 * 50)  # 3 layers
    from lightning_smd.io.plot import _lr_changes, load_series

    series, summary = load_series(str(tmp_path))
    changes = _lr_changes(series, "net.conv1.weight")
    assert summary is not None and len(changes) == 1 and 19 <= changes[0] <= 22  # StepLR halves the lr after 20 steps
    assert main(["plot", str(tmp_path / "nothing-here"), "-o", str(out)]) == 2


def _warmup_cosine(opt):
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda t: (t + 1) / 10 if t < 10 else 0.5 * (1 + math.cos(math.pi * (t - 10) / 50)))


def test_callback_and_monitor_follow_the_same_schedule(tmp_path):
    """A warm-up + cosine schedule read ahead by both front ends: the callback from the Trainer's scheduler config,
    the monitor from ``schedule=`` (the scheduler the loop steps, or the same schedule as a function of the step):
    the same summary, trajectory and forecast included."""
    torch.manual_seed(0)
    smd = SMDCallback(verbose=False, summary_path=tmp_path / "callback.json")
    model = Module(PlainConvNet(), optimizer=sgd(momentum=0.9), scheduler=_warmup_cosine)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer(tmp_path / "fit", [smd], max_steps=60, log_every_n_steps=10).fit(model, loader())
    runs = [json.load(open(tmp_path / "callback.json"))]
    for given in ("scheduler", "function"):
        torch.manual_seed(0)
        net = Module(PlainConvNet(), optimizer=sgd(momentum=0.9))
        opt = net.configure_optimizers()
        sched = _warmup_cosine(opt)
        schedule = sched if given == "scheduler" else (lambda t, s=sched: 0.1 * s.lr_lambdas[0](t))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            monitor = SMDMonitor(net, opt, log_every_n_steps=10, max_steps=60, schedule=schedule)
            _loop(net, opt, 60, monitor, scheduler=sched)
            monitor.close(summary_path=tmp_path / f"{given}.json")
        runs.append(json.load(open(tmp_path / f"{given}.json")))
    for run in runs:
        run.pop("run_id"), run.pop("started_at"), run["schedule"]["0"].pop("source")
    assert runs[0]["schedule"]["0"]["followed"] and runs[0]["layers"][0]["trajectory_angular_update"] is not None
    # (a function's plan holds float lrs computed as the scheduler does: the same to the last bit here)
    assert runs[0] == runs[1] == runs[2]
