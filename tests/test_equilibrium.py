"""Verdicts end to end: every common optimizer reaches its predicted equilibrium on a task whose gradient
noise persists; schedules, the gate, vanishing gradient noise, long-run motion, the CLI."""

import json
import math
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from helpers import Module, PlainConvNet, decay_only_conv_weights, loader, sgd, trainer
from torch.utils.data import DataLoader, TensorDataset

from lightning_smd import EquilibriumNotReachedError, SMDCallback, SMDWarning
from lightning_smd.cli import main as cli
from lightning_smd.diagnose import diffusion_exponent

ROOT = Path(__file__).parents[1]


def _lion(params, **kw):
    lion = pytest.importorskip("lion_pytorch")
    return lion.Lion(params, **kw)


# tau = 1/(2*lr*wd) (x(1-momentum) for SGD): 25 to 50 steps everywhere
OPTIMIZERS = {
    "sgd": (lambda p: torch.optim.SGD(p, lr=0.2, weight_decay=0.05), 500),
    "sgd_momentum": (lambda p: torch.optim.SGD(p, lr=0.2, momentum=0.9, weight_decay=0.01), 500),
    "sgd_nesterov": (lambda p: torch.optim.SGD(p, lr=0.2, momentum=0.9, nesterov=True, weight_decay=0.01), 500),
    "adamw": (lambda p: torch.optim.AdamW(decay_only_conv_weights(p, 1.0), lr=0.01), 500),
    "lion": (lambda p: _lion(decay_only_conv_weights(p, 10.0), lr=1e-3), 800),
}


def _fit(tmp_path, model, steps, **kw):
    data = kw.pop("data", None) or loader()
    smd = SMDCallback(verbose=False, **{k: v for k, v in kw.items() if k in SMDCallback.__init__.__code__.co_varnames})
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        t = trainer(tmp_path, [smd], max_steps=steps, log_every_n_steps=50, **{k: v for k, v in kw.items() if k not in SMDCallback.__init__.__code__.co_varnames})
        t.fit(model, data)
    return smd, [str(w.message) for w in record if issubclass(w.category, SMDWarning)], t


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_optimizer_reaches_its_predicted_equilibrium(tmp_path, name):
    make, steps = OPTIMIZERS[name]
    torch.manual_seed(0)
    smd, msgs, _ = _fit(tmp_path, Module(PlainConvNet(), optimizer=make), steps)
    s = smd.summary()
    assert s["verdict"] == "equilibrium", (s["reason"], [layer["ratio"] for layer in s["layers"]])
    assert msgs == []
    assert len(s["layers"]) == 3
    for layer in s["layers"]:
        assert 0.9 <= layer["ratio"] <= 1.1, layer
        assert layer["state"] == "equilibrium"
        assert layer["share_in_equilibrium"] > 0.3
        assert layer["predicted_time_to_equilibrium"] is not None and layer["effective_lr"] > 0
    assert "vanishing_gradient_noise" not in s["diagnoses"]


def test_step_decay_reports_reequilibration_within_a_factor_two_of_the_prediction(tmp_path):
    torch.manual_seed(0)
    decay = lambda opt: torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[300], gamma=0.25)  # noqa: E731
    model = Module(PlainConvNet(), optimizer=sgd(lr=0.2, momentum=0.9, weight_decay=0.01), scheduler=decay)
    smd, msgs, _ = _fit(tmp_path, model, 900)
    s = smd.summary()
    assert s["verdict"] == "equilibrium", s["reason"]
    for layer in s["layers"]:
        (event,) = layer["reequilibrations"]
        assert event["step"] == 301  # the first step taken with the decayed learning rate
        assert event["to"] == pytest.approx(event["from"] / 2, rel=1e-9)  # Delta* ~ sqrt(lr)
        assert event["observed_steps"] is not None
        ratio = event["observed_steps"] / event["expected_steps"]
        assert 0.5 <= ratio <= 2.0, (layer["name"], event)
        assert layer["state"] == "equilibrium"
    assert msgs == []


def test_a_decay_too_late_to_reequilibrate_is_explained(tmp_path):
    torch.manual_seed(0)
    decay = lambda opt: torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[300], gamma=0.1)  # noqa: E731
    model = Module(PlainConvNet(), optimizer=sgd(lr=0.2, momentum=0.9, weight_decay=0.01), scheduler=decay)
    smd, msgs, _ = _fit(tmp_path, model, 340)
    assert any("re-equilibrate" in m and "planned steps remain" in m for m in msgs), msgs
    s = smd.summary()
    assert s["verdict"] == "not_reached"
    assert set(s["diagnoses"]["re_equilibrating"]) == {layer["name"] for layer in s["layers"]}
    assert all(layer["state"] == "re-equilibrating" and layer["expected_reequilibration_steps"] > 40 for layer in s["layers"])


def test_no_weight_decay_warns_fails_and_raises(tmp_path):
    smd, msgs, _ = _fit(tmp_path / "warn", Module(PlainConvNet(), optimizer=sgd(weight_decay=0.0)), 60)
    assert any("weight_decay=0" in m for m in msgs)
    assert smd.summary()["verdict"] == "not_reached" and "no weight decay" in smd.summary()["reason"]
    with pytest.raises(EquilibriumNotReachedError, match="not_reached") as info:
        _fit(tmp_path / "raise", Module(PlainConvNet(), optimizer=sgd(weight_decay=0.0)), 30, on_no_equilibrium="raise")
    written = json.loads((tmp_path / "raise" / "smd_summary.json").read_text())
    assert written["verdict"] == "not_reached" and written["complete"] is True  # written before raising
    assert info.value.summary["verdict"] == "not_reached"


def test_stop_ends_training_when_equilibrium_is_impossible(tmp_path):
    smd, msgs, t = _fit(tmp_path, Module(PlainConvNet(), optimizer=sgd(weight_decay=0.0)), 400, on_no_equilibrium="stop")
    assert t.global_step < 400 and t.global_step == 50  # the first log step
    s = smd.summary()
    assert s["stopped_early"] and "no weight decay" in s["stopped_early"] and s["verdict"] == "not_reached"
    assert any(m.startswith("Stopping training") for m in msgs)


def test_stop_does_not_stop_a_healthy_run(tmp_path):
    make, steps = OPTIMIZERS["sgd_momentum"]
    torch.manual_seed(0)
    smd, _, t = _fit(tmp_path, Module(PlainConvNet(), optimizer=make), 300, on_no_equilibrium="stop")
    assert t.global_step == 300 and smd.summary()["stopped_early"] is None


CI_SCRIPT = """
import sys, warnings
sys.path.insert(0, {tests!r})
warnings.simplefilter("ignore")
from helpers import Module, PlainConvNet, loader, sgd, trainer
from lightning_smd import SMDCallback
weight_decay = float(sys.argv[1])
smd = SMDCallback(on_no_equilibrium="raise", verbose=False, window=20)
trainer({out!r} + sys.argv[1], [smd], max_steps=int(sys.argv[2])).fit(
    Module(PlainConvNet(), optimizer=sgd(lr=0.2, weight_decay=weight_decay)), loader()
)
print("passed the gate")
"""


def test_ci_style_script_exits_non_zero_and_check_agrees(tmp_path, capsys):
    script = tmp_path / "train_gate.py"
    script.write_text(CI_SCRIPT.format(tests=str(ROOT / "tests"), out=str(tmp_path / "run_")))
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    bad = subprocess.run([sys.executable, str(script), "0.0", "40"], capture_output=True, text=True, timeout=300, env=env)
    assert bad.returncode != 0 and "EquilibriumNotReachedError" in bad.stderr and "passed the gate" not in bad.stdout
    good = subprocess.run([sys.executable, str(script), "0.01", "300"], capture_output=True, text=True, timeout=300, env=env)
    assert good.returncode == 0, good.stderr[-2000:]
    assert cli(["check", str(tmp_path / "run_0.0" / "smd_summary.json")]) == 1
    assert cli(["check", str(tmp_path / "run_0.01")]) == 0  # a directory: the summary below it
    out = capsys.readouterr().out
    assert "SMD verdict" in out and "net.conv1.weight" in out


def test_memorizing_run_is_diagnosed_as_vanishing_gradient_noise(tmp_path):
    gen = torch.Generator().manual_seed(0)
    data = DataLoader(TensorDataset(torch.randn(64, 3, 8, 8, generator=gen), torch.randint(0, 10, (64,), generator=gen)), batch_size=32, shuffle=True)
    torch.manual_seed(0)
    smd, msgs, t = _fit(tmp_path, Module(PlainConvNet(), optimizer=sgd(lr=0.2, weight_decay=0.01)), 600, data=data)
    s = smd.summary()
    assert float(t.callback_metrics["train_loss"]) < 0.2  # it memorized the 64 samples
    assert s["verdict"] == "not_reached" and "vanishing gradient noise" in s["reason"] and "not a measurement error" in s["reason"]
    assert set(s["diagnoses"]["vanishing_gradient_noise"]) == {layer["name"] for layer in s["layers"]}
    assert any(m.startswith("Vanishing gradient noise") for m in msgs)
    for layer in s["layers"]:
        assert layer["ratio"] < 0.9 and layer["unit_grad_sq"] < layer["unit_grad_sq_peak"] / 2


def test_diffusion_exponent_of_a_random_walk_on_the_sphere():
    gen = torch.Generator().manual_seed(0)
    dim, eps = 2000, 1e-3
    w0 = torch.randn(dim, dtype=torch.float64, generator=gen)
    w0 /= w0.norm()
    w = w0.clone()
    steps, distances = [], []
    for t in range(1, 4001):
        step = torch.randn(dim, dtype=torch.float64, generator=gen) * eps / math.sqrt(dim)
        step -= (step @ w) * w
        w = w + step
        w /= w.norm()
        if t % 50 == 0:
            steps.append(t)
            distances.append(2 * math.atan2(float((w - w0).norm()), float((w + w0).norm())))
    c = diffusion_exponent(steps, distances)
    assert c == pytest.approx(0.5, abs=0.05)
    assert diffusion_exponent(steps, [s * 1e-4 for s in steps]) == pytest.approx(1.0)  # ballistic
    assert math.isnan(diffusion_exponent([1, 2], [0.1, 0.2]))


def test_long_run_motion_is_reported_on_the_persistent_noise_run(tmp_path):
    make, _ = OPTIMIZERS["sgd_momentum"]
    torch.manual_seed(0)
    smd, _, _ = _fit(tmp_path, Module(PlainConvNet(), optimizer=make), 500, track_distance=True)
    s = smd.summary()
    for layer in s["layers"]:
        assert layer["distance_reference_step"] is not None and layer["angular_distance"] > 0
        # the angle from the reference grows sub-ballistically (and saturates on the sphere)
        assert 0.0 < layer["diffusion_exponent"] < 1.0, layer["diffusion_exponent"]
    assert s["extra_memory_bytes"] >= sum(layer["numel"] * 4 for layer in s["layers"])
    rows = (tmp_path / "metrics.csv").read_text().splitlines()
    assert "smd/net.conv1.weight/angular_distance" in rows[0]


def test_coupled_l2_adam_is_measured_but_not_judged(tmp_path):
    smd, msgs, _ = _fit(tmp_path, Module(PlainConvNet(), optimizer=lambda p: torch.optim.Adam(p, lr=1e-3, weight_decay=1e-2)), 30)
    assert any("coupled L2" in m and "AdamW" in m for m in msgs)
    s = smd.summary()
    assert s["verdict"] == "not_applicable" and "coupled L2" in s["reason"]
    assert all(layer["ratio"] is None and layer["angular_update"] > 0 for layer in s["layers"])


def test_unknown_optimizer_is_measured_not_guessed(tmp_path):
    smd, msgs, _ = _fit(tmp_path, Module(PlainConvNet(), optimizer=lambda p: torch.optim.Rprop(p, lr=1e-3)), 20)
    assert any("No SMD rule is known for optimizer Rprop" in m and "theory.register" in m for m in msgs)
    s = smd.summary()
    assert s["verdict"] == "not_applicable" and all(layer["angular_update"] > 0 for layer in s["layers"])


def test_check_rejudges_and_reports_bad_input(tmp_path, capsys):
    make, _ = OPTIMIZERS["sgd_momentum"]
    torch.manual_seed(0)
    _fit(tmp_path, Module(PlainConvNet(), optimizer=make), 400)
    path = str(tmp_path / "smd_summary.json")
    assert cli(["check", path]) == 0
    assert cli(["check", path, "--tolerance", "0.0001"]) == 1  # no layer stays within 0.01 %
    assert cli(["report", str(tmp_path)]) == 0
    (tmp_path / "broken.json").write_text("{not json")
    assert cli(["check", str(tmp_path / "broken.json")]) == 2
    assert cli(["check", str(tmp_path / "nothing-here")]) == 2
    assert "cannot read" in capsys.readouterr().err
