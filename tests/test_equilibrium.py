"""Verdicts end to end on a task whose gradient noise persists: schedules, the gate, vanishing gradient noise,
long-run motion, the CLI. (Every common optimizer's healthy and unhealthy runs: tests/test_verdict_reliability.py.)"""

import functools
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import HEALTHY_STEPS, HeadNet, Module, PlainConvNet, healthy_module, sgd, teacher_loader, fit_smd

from lightning_smd import EquilibriumNotReachedError
from lightning_smd.io.cli import main as cli
from lightning_smd.demo import ThinConvNet
from lightning_smd.analysis.diagnostics import diffusion_exponent
from lightning_smd.analysis.theory import adam_l2_equilibrium, adam_taps, sgd_angular_update

pytestmark = pytest.mark.slow  # long fits to equilibrium

ROOT = Path(__file__).parents[1]


def _fit(tmp_path, model, steps, data=None, **smd_kw):
    return fit_smd(tmp_path, model, steps, data=data, trainer_kw={"log_every_n_steps": 50}, **smd_kw)


@pytest.fixture(scope="module")
def healthy_run(tmp_path_factory):
    """The benchmark's healthy cell (tests/helpers.py) with the "stop" gate and the long-run distance on."""
    root = tmp_path_factory.mktemp("healthy")
    torch.manual_seed(0)
    smd, msgs, t = _fit(root, healthy_module(), HEALTHY_STEPS, data=teacher_loader(), on_no_equilibrium="stop", track_distance=True)
    return smd, msgs, t, root


def test_step_decay_reports_reequilibration_within_a_factor_three_of_the_prediction(tmp_path):
    """Plain SGD on the benchmark's HeadNet cell (lr 0.1, wd 0.025: τ = 200 steps, τ_r = 100), lr ÷2 at step 600: the
    ratio relaxes with the new τ_r = 200 steps and every layer is steady again by the end. The decay is read ahead
    and followed along the trajectory, and still timed as a re-equilibration. Measured over 10 seeds (0–9 of this
    set-up: this fit with ``torch.manual_seed(seed)`` and ``teacher_loader(seed=seed)``, 30 layer-events): every
    run in equilibrium at the end with no warning, steady Δ/Δ̂ 0.990–1.004, observed/expected re-equilibration
    0.60–1.83 (the test's bounds are 1/3–3; fc1 is the slow one: learning still lowers its L)."""
    torch.manual_seed(0)
    decay = lambda opt: torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[600], gamma=0.5)  # noqa: E731
    smd, msgs, _ = _fit(tmp_path, healthy_module(weight_decay=0.025, momentum=0.0, scheduler=decay), 2200, data=teacher_loader())
    s = smd.summary()
    assert s["verdict"] == "equilibrium", s["reason"]
    for layer in s["layers"]:
        (event,) = layer["reequilibrations"]
        assert event["step"] == 601  # the first step taken with the decayed learning rate
        assert event["from"] == pytest.approx(sgd_angular_update(0.1, 0.025), rel=1e-9)
        assert event["to"] == pytest.approx(sgd_angular_update(0.05, 0.025), rel=1e-9)  # ≈ from/sqrt(2): Δ* ~ sqrt(lr)
        assert event["observed_steps"] is not None
        ratio = event["observed_steps"] / event["expected_steps"]
        assert 1 / 3 <= ratio <= 3.0, (layer["name"], event)
        # the decay was read ahead and followed: judged along the trajectory (the samples did not restart at it)
        assert layer["state"] == "equilibrium" and layer["steps_since_change"] == 1600
    assert s["schedule"]["0"]["followed"] and s["schedule"]["0"]["changes"].startswith("a few steps"), s["schedule"]
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


def test_stop_does_not_stop_a_healthy_run(healthy_run):
    smd, msgs, t, _ = healthy_run
    assert t.global_step == HEALTHY_STEPS and smd.summary()["stopped_early"] is None
    assert smd.summary()["verdict"] == "equilibrium" and msgs == []


CI_SCRIPT = """
import sys, warnings
sys.path.insert(0, {tests!r})
warnings.simplefilter("ignore")
from helpers import HEALTHY_STEPS, healthy_module, teacher_loader, trainer
from lightning_smd import SMDCallback
weight_decay = float(sys.argv[1])
smd = SMDCallback(on_no_equilibrium="raise", verbose=False)
trainer({out!r} + sys.argv[1], [smd], max_steps=int(sys.argv[2]), log_every_n_steps=50).fit(
    healthy_module(weight_decay=weight_decay), teacher_loader()
)
print("passed the gate")
"""


def test_ci_style_script_exits_non_zero_and_check_agrees(tmp_path, capsys):
    """The good run is the benchmark's healthy cell (margins in tests/helpers.py); the bad one has no weight decay."""
    script = tmp_path / "train_gate.py"
    script.write_text(CI_SCRIPT.format(tests=str(ROOT / "tests"), out=str(tmp_path / "run_")))
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    bad = subprocess.run([sys.executable, str(script), "0.0", "40"], capture_output=True, text=True, timeout=300, env=env)
    assert bad.returncode != 0 and "EquilibriumNotReachedError" in bad.stderr and "passed the gate" not in bad.stdout
    good = subprocess.run([sys.executable, str(script), "0.0025", str(HEALTHY_STEPS)], capture_output=True, text=True, timeout=300, env=env)
    assert good.returncode == 0, good.stderr[-2000:]
    assert cli(["check", str(tmp_path / "run_0.0" / "smd_summary.json")]) == 1
    assert cli(["check", str(tmp_path / "run_0.0025")]) == 0  # a directory: the summary below it
    out = capsys.readouterr().out
    assert "SMD verdict" in out and "net.conv1.weight" in out


def test_memorizing_run_is_diagnosed_as_vanishing_gradient_noise(tmp_path):
    """The benchmark's healthy cell on 64 fixed samples without label noise: the network memorizes them. Over 10 seeds
    (0–9) every run ended not_reached with the loss below 0.02, vanishing gradient noise diagnosed in 3/3 layers
    and no layer in equilibrium."""
    torch.manual_seed(0)
    smd, msgs, t = _fit(tmp_path, healthy_module(), 800, data=teacher_loader(memorize=64, flip=0.0))
    s = smd.summary()
    assert float(t.callback_metrics["train_loss"]) < 0.1  # it memorized the 64 samples
    assert s["verdict"] == "not_reached" and "vanishing gradient noise" in s["reason"]
    assert set(s["diagnoses"]["vanishing_gradient_noise"]) == {layer["name"] for layer in s["layers"]}
    assert any(m.startswith("Vanishing gradient noise") for m in msgs)
    assert not any(layer["in_equilibrium"] for layer in s["layers"])


def test_persistent_label_noise_is_never_diagnosed_as_vanishing_gradient_noise(tmp_path):
    """A ResNet-50-like net (53 convs, width 8) on the 20 %-label-noise stream: learning lowers the gradient statistic
    L by more than 20x from its early peak while the norms are still far above equilibrium, but the loss stays
    above 1. Before the diagnosis needed the loss, this run was diagnosed as vanishing gradient noise in 52 of 53
    layers (benchmarks/dashboard.py, same settings); now never: the loss fell by 4.7x, not the 10x required."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from overhead import ResNetLike
    from torch.utils.data import DataLoader

    from lightning_smd.demo import NoisyTemplates

    torch.manual_seed(0)
    model = Module(ResNetLike(depth=50, width=8), optimizer=sgd(lr=0.2, momentum=0.9, weight_decay=5e-3))
    data = DataLoader(NoisyTemplates(batch_size=16, size=16, seed=0), batch_size=None)
    smd, msgs, t = fit_smd(tmp_path, model, 300, data=data, trainer_kw={"log_every_n_steps": 10}, log_heatmap=False)
    s = smd.summary()
    assert len(s["layers"]) == 53
    # the loss is nowhere near zero. Seeds 0-2 (this test with torch.manual_seed(1) and (2) in place of 0): peak
    # 9.0-11.3 early, 1.79-2.14 at the end - a 4.7-5.3x fall, at least 1.9x short of the 10x the diagnosis needs, and
    # no SMD020 on any of them
    assert s["training_loss"]["last"] > 1.0 and s["training_loss"]["last"] > s["training_loss"]["peak"] / 10
    assert not any("[SMD020]" in m for m in msgs) and "vanishing_gradient_noise" not in s["diagnoses"]
    assert not any(layer["state"] == "vanishing_noise" for layer in s["layers"])


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


def test_long_run_motion_is_reported_on_the_persistent_noise_run(healthy_run):
    smd, _, _, root = healthy_run
    s = smd.summary()
    for layer in s["layers"]:
        assert layer["distance_reference_step"] is not None and layer["angular_distance"] > 0
        # the angle from the reference grows sub-ballistically (and saturates on the sphere)
        assert 0.0 < layer["diffusion_exponent"] < 1.0, layer["diffusion_exponent"]
    assert s["extra_memory_bytes"] >= sum(layer["numel"] * 4 for layer in s["layers"])
    rows = (root / "metrics.csv").read_text().splitlines()
    assert "smd/net.conv1.weight/angular_distance" in rows[0]


def test_adam_with_coupled_l2_is_judged_per_layer_and_flagged(tmp_path):
    """``Adam(lr=2e-3, weight_decay=0.05)`` (coupled L2) on the benchmark's HeadNet cell: each layer's prediction
    follows its own L and size (docs/theory.md §2b), every layer settles and agrees with it, and the warning says
    coupled L2 is probably not what was meant. Measured over 10 seeds (0–9, 30 layers): every run `equilibrium` with
    every layer in equilibrium, steady ratios 0.90–1.06 (ThinConvNet, same settings: 0.93–1.02), asserted within
    ±15 % (a margin of 0.05 over the worst seed)."""
    torch.manual_seed(0)
    model = Module(HeadNet(), optimizer=functools.partial(torch.optim.Adam, lr=2e-3), decay=0.05)
    smd, msgs, _ = _fit(tmp_path, model, 3000, data=teacher_loader())
    assert any("coupled L2" in m and "AdamW" in m for m in msgs), msgs
    s = smd.summary()
    assert s["verdict"] == "equilibrium", s["reason"]
    taus = []
    for layer in s["layers"]:
        assert layer["rule"] == "Adam" and layer["state"] == "equilibrium", layer
        assert layer["steady_ratio"] == pytest.approx(1.0, abs=0.15), layer
        # the per-layer prediction: Δ* ∝ (C²/L)^(1/6) at these settings, with the summary's own L
        delta, _, tau = adam_l2_equilibrium(2e-3, 0.05, adam_taps(0.9), layer["unit_grad_sq"], layer["numel"])
        assert layer["predicted_angular_update"] == pytest.approx(delta, rel=1e-9)  # with the L the summary reports
        taus.append(tau)
    assert max(taus) > 2 * min(taus)  # the layers really do get different relaxation times


def test_a_thin_first_layer_below_the_closed_form_is_explained_by_its_measured_update(tmp_path):
    """AdamW on ThinConvNet (verdict_reliability's healthy AdamW cell: lr 0.01, wd 0.4, 1,600 steps; a first conv of
    144 weights). The thin conv1 settles below the closed form while the wide layers sit on it; its update is pulled
    inwards more (κ above the wide layers'), and the balance accounts for every layer's steady ratio: steady ≈
    direction_ratio·(1 + balance_drift/2) (an identity of the measured step up to O(ηλ), so it must close; the
    attribution to κ is the finding). Measured over 10 seeds (benchmarks/update_balance.py): conv3 − conv1
    closed-form gap 0.059–0.126 (asserted > 0.03), κ(conv1) − κ(conv4) 1.9–4.9 (asserted > 1), |balance_drift|
    ≤ 0.035 (asserted < 0.06)."""
    torch.manual_seed(0)
    model = Module(ThinConvNet(), optimizer=functools.partial(torch.optim.AdamW, lr=0.01), decay=0.4)
    smd, _, _ = _fit(tmp_path, model, 1600, data=teacher_loader(shape=ThinConvNet.input_shape))
    s = smd.summary()
    assert s["verdict"] == "equilibrium", s["reason"]
    layers = {layer["name"].split(".")[1]: layer for layer in s["layers"]}
    for layer in layers.values():
        assert abs(layer["balance_drift"]) < 0.06, layer
        closes = layer["direction_ratio"] * (1.0 + layer["balance_drift"] / 2.0)
        assert layer["steady_ratio"] == pytest.approx(closes, abs=0.01), layer
    assert layers["conv3"]["steady_ratio"] - layers["conv1"]["steady_ratio"] > 0.03
    assert layers["conv1"]["update_kappa"] - layers["conv4"]["update_kappa"] > 1.0
    assert layers["conv1"]["direction_ratio"] < layers["conv3"]["direction_ratio"]


def test_unknown_optimizer_is_measured_not_guessed(tmp_path):
    smd, msgs, _ = _fit(tmp_path, Module(PlainConvNet(), optimizer=lambda p: torch.optim.Rprop(p, lr=1e-3)), 20)
    assert any("No SMD rule is known for optimizer Rprop" in m and "theory.register" in m for m in msgs)
    s = smd.summary()
    assert s["verdict"] == "not_applicable" and all(layer["angular_update"] > 0 for layer in s["layers"])


def test_check_rejudges_and_reports_bad_input(healthy_run, tmp_path, capsys):
    _, _, _, root = healthy_run
    path = str(root / "smd_summary.json")
    assert cli(["check", path]) == 0
    assert cli(["check", path, "--require-agreement"]) == 0  # every layer agrees within ±10 %
    # re-judging applies the bands to each layer's steady-ratio interval: one layer steady at 0.85–0.88
    edited = json.loads(open(path).read())
    edited["layers"][0]["steady_ratio_ci"] = [0.85, 0.88]
    (tmp_path / "edited.json").write_text(json.dumps(edited))
    assert cli(["check", str(tmp_path / "edited.json")]) == 0  # the stored verdict
    assert cli(["check", str(tmp_path / "edited.json"), "--min-fraction", "0.9"]) == 0  # off the prediction counts
    assert cli(["check", str(tmp_path / "edited.json"), "--require-agreement"]) == 1  # ... unless agreement is required
    assert cli(["check", str(tmp_path / "edited.json"), "--require-agreement", "--tolerance", "0.2"]) == 0
    assert cli(["check", str(tmp_path / "edited.json"), "--max-deviation", "0.1"]) == 1  # far off: never counts
    assert cli(["report", str(root)]) == 0
    (tmp_path / "broken.json").write_text("{not json")
    assert cli(["check", str(tmp_path / "broken.json")]) == 2
    assert cli(["check", str(tmp_path / "nothing-here")]) == 2
    assert "cannot read" in capsys.readouterr().err
    old = json.loads(open(path).read())
    old["schema_version"] = 1
    (tmp_path / "v1.json").write_text(json.dumps(old))
    assert cli(["check", str(tmp_path / "v1.json"), "--min-fraction", "0.5"]) == 2  # cannot re-judge the old layout
