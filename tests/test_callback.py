"""SMDCallback end to end: logs read back, the summary, schedules, warnings, early ends."""

import csv
import json
import math
import os
import runpy
import warnings
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from helpers import HEALTHY_STEPS, Module, NoNormNet, SmallConvNet, healthy_module, loader, sgd, teacher_loader, trainer, fit_smd, counted

from lightning_smd import SMDCallback, SMDWarning
from lightning_smd.analysis.theory import sgd_angular_update

CONVS = ["net.conv1.weight", "net.conv2.weight", "net.conv3.weight"]
PER_LAYER = (
    "angular_update", "predicted_angular_update", "smoothed_predicted_angular_update", "angular_update_ratio", "weight_norm",
    "predicted_weight_norm", "in_equilibrium",
    "effective_lr", "steady_ratio", "steady_ratio_low", "steady_ratio_high", "drift",
)  # fmt: skip


def read_csv(path):
    with open(path) as fh:
        return list(csv.DictReader(fh))


def smd_warnings(record, end=False):
    """SMD warnings; without ``end``, the end-of-run verdict warning (tested on its own) is left out."""
    msgs = counted([str(w.message) for w in record if issubclass(w.category, SMDWarning)])
    return msgs if end else [m for m in msgs if not m.startswith("No equilibrium reached")]


def test_csv_logs_have_a_fixed_key_set_at_the_log_interval(tmp_path):
    smd = SMDCallback(verbose=False)
    trainer(tmp_path, [smd], max_steps=23, log_every_n_steps=5).fit(Module(SmallConvNet()), loader())
    rows = read_csv(tmp_path / "metrics.csv")
    smd_rows = [r for r in rows if r.get("smd/equilibrium_fraction")]
    # steps 4, 9, 14, 19 (Lightning's 0-based logging step) and the final flush at 22
    assert [int(r["step"]) for r in smd_rows] == [4, 9, 14, 19, 22]
    expected = {"smd/angular_update_ratio", "smd/equilibrium_fraction"} | {f"smd/{n}/{m}" for n in CONVS for m in PER_LAYER}
    expected |= {f"smd/worst/{i}/angular_update_ratio" for i in (1, 2, 3)}
    assert expected <= set(rows[0].keys())
    assert not any(k.startswith("smd/") and k not in expected for k in rows[0])
    last = smd_rows[-1]
    for n in CONVS:
        delta = float(last[f"smd/{n}/angular_update"])
        pred = float(last[f"smd/{n}/predicted_angular_update"])
        assert pred == pytest.approx(sgd_angular_update(0.1, 5e-3, 0.9), rel=1e-9)
        assert 0 < delta < 1 and float(last[f"smd/{n}/weight_norm"]) > 0
        assert float(last[f"smd/{n}/predicted_weight_norm"]) > 0
    ratios = [float(last[f"smd/{n}/angular_update_ratio"]) for n in CONVS]
    assert float(last["smd/angular_update_ratio"]) == pytest.approx(float(np.median(ratios)), rel=1e-9)


def as_json(obj):
    """``obj`` as JSON holds it: nan and inf as null, tuples as lists (anything else JSON cannot hold fails ``dumps``)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: as_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [as_json(v) for v in obj]
    return obj


def test_summary_json_has_every_field(tmp_path):
    torch.manual_seed(0)
    smd = SMDCallback(verbose=False)
    trainer(tmp_path, [smd], max_steps=15).fit(Module(SmallConvNet()), loader())
    path = tmp_path / "smd_summary.json"
    assert smd.summary_file == str(path)
    s = json.loads(path.read_text())
    assert s == json.loads(json.dumps(as_json(smd.summary()), allow_nan=False))  # the file is the summary in memory
    for key in ("verdict", "reason", "steps", "optimizers", "layers", "complete", "criteria", "warnings", "equilibrium_fraction", "angular_update_ratio"):
        assert key in s, key
    # 15 steps are far from the 200 a layer needs to settle (the minimum window): not_reached whatever the seed
    assert s["verdict"] == "not_reached" and s["reason"].startswith("only 0/3 tracked layers ended in equilibrium"), s["reason"]
    assert s["steps"] == 15 and s["complete"] is True
    opt = s["optimizers"][0]
    assert opt["class"] == "SGD" and opt["measurement"] == "momentum_buffer"
    assert opt["param_groups"][0] == {"lr": 0.1, "weight_decay": 5e-3, "momentum": 0.9, "dampening": 0.0, "nesterov": 0.0}
    assert [layer["name"] for layer in s["layers"]] == CONVS
    for layer in s["layers"]:
        for key in (
            "name",
            "numel",
            "angular_update",
            "predicted_angular_update",
            "ratio",
            "weight_norm",
            "predicted_weight_norm",
            "in_equilibrium",
            "first_equilibrium_step",
        ):
            assert key in layer, key
        assert layer["numel"] > 0 and layer["steps"] == 15 and layer["state"] == "approaching"
        assert layer["predicted_angular_update"] == pytest.approx(sgd_angular_update(0.1, 5e-3, 0.9), rel=1e-9)
        assert layer["ratio"] == pytest.approx(layer["angular_update"] / layer["smoothed_predicted_angular_update"], rel=1e-12)
        assert layer["not_in_equilibrium_because"] == "settling: 15 of the 200 steps needed since the last change"
    assert s["layers"][0]["numel"] == 8 * 3 * 9


@pytest.fixture(scope="module")
def healthy_run(tmp_path_factory):
    """The healthy cell of the verdict benchmark (tests/helpers.py), with every default of SMDCallback."""
    root = tmp_path_factory.mktemp("healthy")
    torch.manual_seed(0)
    smd = SMDCallback(verbose=False)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        trainer(root, [smd], max_steps=HEALTHY_STEPS, log_every_n_steps=50).fit(healthy_module(), teacher_loader())
    return smd, smd_warnings(record, end=True), root


@pytest.mark.slow
def test_equilibrium_is_reached_and_reported(healthy_run):
    """Margins over the 20 seeds of the benchmark's cell (head, SGD momentum, healthy): every layer steady with
    |drift| ≤ 0.09 and t·se ≤ 0.55 of the limit; steady ratios 0.974–1.033, inside the asserted 0.8–1.2
    (docs/verdict_reliability.md)."""
    smd, _, root = healthy_run
    s = smd.summary()
    assert s["verdict"] == "equilibrium", s["reason"]
    assert json.loads((root / "smd_summary.json").read_text()) == json.loads(json.dumps(as_json(s), allow_nan=False))
    assert s["schema_version"] == 2
    for layer in s["layers"]:
        assert layer["state"] == "equilibrium" and layer["in_equilibrium"] and layer["steady"]
        assert layer["agreement"] == "agrees" and layer["not_in_equilibrium_because"] is None
        assert 0.8 <= layer["steady_ratio"] <= 1.2
        lo, hi = layer["steady_ratio_ci"]
        assert lo < layer["steady_ratio"] < hi
        assert abs(layer["drift"]) <= 0.1 and layer["quantile"] * layer["drift_se"] <= 0.1
        assert 200 <= layer["first_equilibrium_step"] < HEALTHY_STEPS and layer["window_steps"] == 800  # a window starts at half the steps
        assert layer["steps_since_change"] == HEALTHY_STEPS and layer["settle_steps"] == pytest.approx(400)
        assert layer["predicted_weight_norm"] == pytest.approx(layer["weight_norm"], rel=0.25)
    assert s["statistics"]["false_alarm_rate_per_unit"] == pytest.approx(0.01 / 3)
    rows = read_csv(root / "metrics.csv")
    last = [r for r in rows if r.get("smd/equilibrium_fraction")][-1]
    assert float(last["smd/equilibrium_fraction"]) == 1.0
    layer = s["layers"][0]
    name = layer["name"]
    assert float(last[f"smd/{name}/steady_ratio"]) == pytest.approx(layer["steady_ratio"], rel=1e-6)
    assert float(last[f"smd/{name}/steady_ratio_low"]) == pytest.approx(layer["steady_ratio_ci"][0], rel=1e-6)
    assert float(last[f"smd/{name}/drift"]) == pytest.approx(layer["drift"], rel=1e-6)


def test_scheduler_change_moves_the_prediction_at_the_step_it_takes_effect(tmp_path):
    lrs = []

    class LR(pl.Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            lrs.append(optimizer.param_groups[0]["lr"])

    smd = SMDCallback(keep_history=True, verbose=False)
    step_lr = lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=7, gamma=0.1)  # noqa: E731
    trainer(tmp_path, [smd, LR()], max_steps=20).fit(Module(SmallConvNet(), scheduler=step_lr), loader())
    h = smd.diagnostics.unit_history("net.conv1.weight")
    expected = [sgd_angular_update(lr, 5e-3, 0.9) for lr in lrs]
    np.testing.assert_allclose(h["predicted_angular_update"], expected, rtol=1e-12)
    # the lr used by steps 1..7 is 0.1, by steps 8..14 0.01: the prediction changes exactly at step 8
    assert h["predicted_angular_update"][6] == pytest.approx(sgd_angular_update(0.1, 5e-3, 0.9))
    assert h["predicted_angular_update"][7] == pytest.approx(sgd_angular_update(0.01, 5e-3, 0.9))
    np.testing.assert_allclose(h["lr"], lrs, rtol=0)


def test_per_group_settings_are_honoured(tmp_path):
    def two_groups(params):
        params = list(params)
        return torch.optim.SGD([{"params": params[:1], "lr": 0.05}, {"params": params[1:]}], lr=0.1, momentum=0.9, weight_decay=1e-3)

    smd = SMDCallback(verbose=False)
    trainer(tmp_path, [smd], max_steps=5).fit(Module(SmallConvNet(), optimizer=two_groups), loader())
    layers = {layer["name"]: layer for layer in smd.summary()["layers"]}
    assert layers["net.conv1.weight"]["predicted_angular_update"] == pytest.approx(sgd_angular_update(0.05, 1e-3, 0.9))
    assert layers["net.conv2.weight"]["predicted_angular_update"] == pytest.approx(sgd_angular_update(0.1, 1e-3, 0.9))


# ---------------------------------------------------------------------------------------------
# Warnings at fit start: each in its case, none otherwise
# ---------------------------------------------------------------------------------------------


def _seeded(make):
    torch.manual_seed(0)
    return make()


def _fit_and_collect(tmp_path, model, max_steps, **kw):
    """The set-up warnings of a short fit. Callers build the model after ``torch.manual_seed(0)`` (through
    ``_seeded``): SmallConvNet's conv3 (conv → ReLU → pool → BN) has |cos(g, w)| of 5e-5–1.8e-3 on the first
    batch over seeds 0–5, below the 1e-2 of the eps warning (SMD010), but an unseeded model drew 1.2e-2 after
    other tests had used the RNG."""
    smd, msgs, _ = fit_smd(tmp_path, model, max_steps, **kw)
    return smd, [m for m in msgs if not m.startswith("No equilibrium reached")]


@pytest.mark.slow
def test_no_warning_for_a_sound_setup(healthy_run):
    smd, msgs, _ = healthy_run
    assert msgs == []
    assert smd.summary()["warnings"] == [] and smd.summary()["verdict"] == "equilibrium"


def test_warns_when_no_normalized_weight(tmp_path):
    smd, msgs = _fit_and_collect(tmp_path, _seeded(lambda: Module(NoNormNet(), optimizer=sgd(lr=0.2, weight_decay=0.05))), 5)
    assert len(msgs) == 1 and "no normalized" in msgs[0] and "include=" in msgs[0]
    s = smd.summary()
    assert s["verdict"] == "not_applicable" and s["layers"] == []


def test_warns_on_zero_weight_decay(tmp_path):
    torch.manual_seed(0)  # see _fit_and_collect: the count of warnings assumes no eps warning (SMD010)
    smd = SMDCallback(verbose=False)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        trainer(tmp_path, [smd], max_steps=20).fit(Module(SmallConvNet(), optimizer=sgd(weight_decay=0.0)), loader())
    msgs = smd_warnings(record, end=True)
    assert len(msgs) == 2 and msgs[1].startswith("No equilibrium reached")
    assert "weight_decay=0" in msgs[0] and "net.conv1.weight" in msgs[0] and "weight_decay > 0" in msgs[0]
    s = smd.summary()
    assert s["verdict"] == "not_reached"
    assert all(layer["predicted_angular_update"] == 0.0 and layer["ratio"] is None for layer in s["layers"])


def test_warns_when_run_is_shorter_than_the_relaxation_time(tmp_path):
    # tau = 0.1 / (2 * 0.1 * 5e-3) = 100 steps, the ratio relaxes with tau/2 = 50: judged after 2 * max(100, 2 * 50) = 200
    _, msgs = _fit_and_collect(tmp_path, _seeded(lambda: Module(SmallConvNet())), 20)
    assert len(msgs) == 1 and "planned for 20 optimizer steps" in msgs[0] and "at least 200 steps" in msgs[0]
    _, msgs = _fit_and_collect(tmp_path / "w", _seeded(lambda: Module(SmallConvNet())), 20, window=150)
    assert len(msgs) == 1 and "at least 300 steps" in msgs[0] and "window=150" in msgs[0]


def test_short_run_warning_uses_max_epochs_when_max_steps_is_unset(tmp_path):
    smd = SMDCallback(verbose=False)
    data = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(torch.randn(64, 3, 8, 8), torch.randint(0, 10, (64,))), batch_size=16
    )
    with pytest.warns(SMDWarning, match="planned for 8 optimizer steps"):
        trainer(tmp_path, [smd], max_steps=-1, max_epochs=2).fit(Module(SmallConvNet()), data)


# ---------------------------------------------------------------------------------------------
# Early ends and loggers
# ---------------------------------------------------------------------------------------------


def test_exception_still_writes_an_incomplete_summary(tmp_path):
    class Boom(pl.Callback):
        def on_train_batch_end(self, trainer, *args):
            if trainer.global_step == 7:
                raise RuntimeError("boom")

    smd = SMDCallback(verbose=False)
    with pytest.raises(RuntimeError, match="boom"):
        trainer(tmp_path, [smd, Boom()], max_steps=50).fit(Module(SmallConvNet()), loader())
    s = json.loads((tmp_path / "smd_summary.json").read_text())
    assert s["complete"] is False and "boom" in s["error"]
    assert s["steps"] == 7 and len(s["layers"]) == 3
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


def test_without_any_logger_the_summary_lands_in_default_root_dir(tmp_path, capsys):
    smd = SMDCallback()
    trainer(tmp_path, [smd], max_steps=6, logger=False).fit(Module(SmallConvNet()), loader())
    assert (tmp_path / "smd_summary.json").exists()
    out = capsys.readouterr().out
    assert "tracking 3 normalized weight(s)" in out and "SMD verdict after 6 steps" in out


def test_tensorboard_logger_receives_the_metrics(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = pl.loggers.TensorBoardLogger(str(tmp_path), name="tb", version=0)
    trainer(tmp_path, [SMDCallback(verbose=False)], max_steps=10, logger=logger).fit(Module(SmallConvNet()), loader())
    acc = EventAccumulator(logger.log_dir)
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert "smd/equilibrium_fraction" in tags and "smd/net.conv1.weight/angular_update" in tags
    assert [e.step for e in acc.Scalars("smd/angular_update_ratio")] == [4, 9]


def test_summary_path_option(tmp_path):
    target = tmp_path / "elsewhere" / "run.json"
    smd = SMDCallback(verbose=False, summary_path=target)
    trainer(tmp_path, [smd], max_steps=3).fit(Module(SmallConvNet()), loader())
    assert json.loads(target.read_text())["steps"] == 3
    smd = SMDCallback(verbose=False, summary_path=False)
    trainer(tmp_path / "none", [smd], max_steps=3).fit(Module(SmallConvNet()), loader())
    assert not (tmp_path / "none" / "smd_summary.json").exists() and smd.summary()["steps"] == 3


def test_invalid_options_are_rejected():
    with pytest.raises(ValueError, match="tolerance"):
        SMDCallback(tolerance=0)
    with pytest.raises(ValueError, match="min_fraction"):
        SMDCallback(min_fraction=1.5)
    with pytest.raises(ValueError, match="log_every_n_steps"):
        SMDCallback(log_every_n_steps=0)


@pytest.mark.slow
def test_quickstart_example_reaches_equilibrium(tmp_path, monkeypatch, capsys):
    """Over seeds 0–4 of the CI size (``python benchmarks/examples.py --sizes fast --seeds 0 1 2 3 4 --only quickstart``,
    one thread; the optimizer's groups from ``param_groups`` since issue 30): every layer in equilibrium, the worst
    drift statistic 0.17 of its limit (seed 0 on two threads: 0.29), steady ratios 0.983–0.998."""
    monkeypatch.setenv("SMD_EXAMPLE_FAST", "1")
    script = Path(__file__).parents[1] / "examples" / "quickstart.py"
    module = runpy.run_path(str(script))
    summary = module["main"](["--out", str(tmp_path)])
    assert summary["verdict"] == "equilibrium", summary["reason"]
    assert all(0.9 <= layer["steady_ratio"] <= 1.1 for layer in summary["layers"])
    assert (tmp_path / "metrics.csv").exists() and (tmp_path / "smd_summary.json").exists()
    assert "SMD verdict" in capsys.readouterr().out
    assert not math.isnan(summary["angular_update_ratio"])
