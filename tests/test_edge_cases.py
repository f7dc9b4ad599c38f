"""Edge cases found in review: ops that look homogeneous but are not, the recorded path's unknown tensors,
granularity when channels move, several losses, late weight changes, non-finite values."""

import math
import warnings

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from helpers import Module, PlainConvNet, SmallConvNet, loader, sgd, trainer
from torch import nn
from torch.nn import functional as F
from zoo import exclude_eps_effects

from lightning_smd import SMDCallback, find_normalized_weights
from lightning_smd.engine.measure import StepRecorder


def img(b=4):
    return torch.randn(b, 3, 8, 8, generator=torch.Generator().manual_seed(0))


class _Untraceable(nn.Module):
    def maybe(self, x):
        return x if x.sum() > -1e9 else -x  # data-dependent: fx fails, the recorded pass is used


class BufferAdd(_Untraceable):
    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.fc = nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.Linear(4, 2)
        self.register_buffer("pe", torch.randn(1, 4, 8, 8))

    def forward(self, x):
        return self.fc(F.relu(self.bn(self.conv(self.maybe(x)) + self.pe)).mean((2, 3)))


class InputAdd(_Untraceable):
    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.fc = nn.Conv2d(3, 3, 3, padding=1, bias=False), nn.BatchNorm2d(3), nn.Linear(3, 2)

    def forward(self, x):
        x = self.maybe(x)
        return self.fc(F.relu(self.bn(self.conv(x) + x)).mean((2, 3)))


class TwoArgMax(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.fc = nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(self.bn(torch.maximum(self.conv(x), torch.full_like(x[:, :1], 0.1))).mean((2, 3)))


class Baddbmm(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin, self.ln, self.head = nn.Linear(6, 6, bias=False), nn.LayerNorm(6), nn.Linear(6, 2)

    def forward(self, x):
        x = x.flatten(2)[:, :, :6]
        y = torch.baddbmm(x, self.lin(x), torch.eye(6).expand(x.shape[0], 6, 6))
        return self.head(self.ln(y)).mean(1)


class CosineClassifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.weight = nn.Parameter(torch.randn(5, 8))

    def forward(self, x):
        feat = F.relu(self.bn(self.conv(x))).mean((2, 3))
        return 10.0 * F.linear(F.normalize(feat, dim=1), F.normalize(self.weight, dim=1))


class LinearOverSequenceBN(nn.Module):
    """Linear on [N, L, C] then BatchNorm1d(L): BN's channels are positions, not features."""

    def __init__(self):
        super().__init__()
        self.lin, self.bn, self.head = nn.Linear(8, 8, bias=False), nn.BatchNorm1d(6), nn.Linear(8, 2)

    def forward(self, x):
        return self.head(F.relu(self.bn(self.lin(x.reshape(x.shape[0], -1)[:, :48].reshape(-1, 6, 8))))).mean(1)


class PixelShuffleBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.shuffle, self.bn = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.PixelShuffle(2), nn.BatchNorm2d(2)
        self.fc = nn.Linear(2, 2)

    def forward(self, x):
        return self.fc(F.relu(self.bn(self.shuffle(self.conv(x)))).mean((2, 3)))


@pytest.mark.parametrize("model", [BufferAdd, InputAdd], ids=["buffer", "input"])
def test_recorded_path_treats_unknown_tensors_as_constants(model):
    torch.manual_seed(0)
    det = find_normalized_weights(exclude_eps_effects(model()), example_input=img())
    assert det.method == "run" and det.units == []
    assert "conv.weight" in det.rejected and det.rejected_verification["conv.weight"] > 1e-3  # not orthogonal


@pytest.mark.parametrize("model", [TwoArgMax, Baddbmm], ids=["maximum", "baddbmm"])
def test_ops_that_add_a_constant_break_invariance(model):
    for kw in ({}, {"example_input": img()}):
        det = find_normalized_weights(model(), **kw)
        assert det.units == [], (kw, det.units)


def test_f_normalize_makes_a_cosine_classifier_invariant():
    det = find_normalized_weights(exclude_eps_effects(CosineClassifier()), example_input=img())
    units = {u.name: u for u in det.units}
    assert set(units) == {"conv.weight", "weight"}
    assert units["weight"].granularity == "filter" and units["weight"].verification < 1e-3


@pytest.mark.parametrize(
    "model,expected",
    [(LinearOverSequenceBN, ("tensor", None)), (PixelShuffleBN, ("group", 4))],
    ids=["linear-over-sequence-bn", "pixel-shuffle-bn"],
)
def test_granularity_when_channels_move_before_the_norm(model, expected):
    det = find_normalized_weights(exclude_eps_effects(model()), example_input=img())
    (unit,) = det.units
    assert (unit.granularity, unit.group_size) == expected
    assert unit.verification < 1e-3


class GAN(pl.LightningModule):
    """Manual optimization, two optimizers and two losses; fx cannot trace the generator."""

    def __init__(self):
        super().__init__()
        self.automatic_optimization = False
        self.gen = nn.Sequential(nn.Linear(4, 16, bias=False), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 12))
        self.disc = nn.Sequential(nn.Linear(12, 16, bias=False), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 1))

    def forward(self, z):
        if z.sum() > -1e9:  # untraceable
            return self.gen(z)
        return self.gen(-z)

    def training_step(self, batch, batch_idx):
        x, _ = batch
        real = x.flatten(1)[:, :12]
        opt_g, opt_d = self.optimizers()
        z = torch.randn(real.shape[0], 4)
        d_loss = F.softplus(-self.disc(real)).mean() + F.softplus(self.disc(self(z).detach())).mean()
        opt_d.zero_grad()
        self.manual_backward(d_loss)
        opt_d.step()
        g_loss = F.softplus(-self.disc(self(z))).mean()
        opt_g.zero_grad()
        self.manual_backward(g_loss)
        opt_g.step()

    def configure_optimizers(self):
        return sgd(lr=0.05, weight_decay=1e-2)(self.gen.parameters()), sgd(lr=0.05, weight_decay=1e-2)(self.disc.parameters())


def test_manual_optimization_with_two_losses_tracks_both_networks(tmp_path):
    smd = SMDCallback(verbose=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer(tmp_path, [smd], max_steps=20).fit(GAN(), loader())
    layers = {layer["name"]: layer for layer in smd.summary()["layers"]}
    # the generator's last layer is invariant too: its output only reaches the losses through the
    # discriminator's first Linear and BatchNorm (real and fake batches are normalized separately)
    assert set(layers) == {"gen.0.weight", "gen.3.weight+bias", "disc.0.weight"}
    assert {layers["gen.0.weight"]["optimizer"], layers["disc.0.weight"]["optimizer"]} == {0, 1}
    # max_steps counts both optimizers' steps: 10 batches. Under manual optimization the first batch is used
    # for detection (all its losses are needed), so measurement starts with the second: 9 steps each
    assert all(layer["steps"] == 9 for layer in layers.values())


class SkipsFirstBatch(Module):
    def forward(self, x):
        if x.sum() > -1e9:  # untraceable
            return self.net(x)
        return self.net(-x)

    def training_step(self, batch, batch_idx):
        if batch_idx == 0:
            return None  # Lightning skips the optimizer step
        return super().training_step(batch, batch_idx)


def test_detection_waits_for_a_batch_with_a_loss(tmp_path):
    smd = SMDCallback(verbose=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer(tmp_path, [smd], max_steps=5).fit(SkipsFirstBatch(PlainConvNet()), loader())
    s = smd.summary()
    assert s["detection_method"] == "run" and len(s["layers"]) == 3


class ReloadsOnTrainStart(Module):
    def on_train_start(self):
        with torch.no_grad():
            for p in self.net.parameters():
                p.mul_(3.0).add_(0.01)


def test_weights_changed_after_fit_start_are_the_baseline_of_the_first_step(tmp_path):
    from test_measure import ReferenceAngles

    names = ["net.conv1.weight", "net.conv2.weight"]
    ref = ReferenceAngles(names)
    smd = SMDCallback(verbose=False, keep_history=True, use_momentum_buffer=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer(tmp_path, [smd, ref], max_steps=4).fit(ReloadsOnTrainStart(PlainConvNet()), loader())
    for j, name in enumerate(names):
        np.testing.assert_allclose(smd.diagnostics.unit_history(name)["angular_update"], np.array(ref.angles)[:, j], rtol=1e-6)


def test_a_non_finite_tensor_spoils_only_its_own_unit():
    a, b = nn.Parameter(torch.randn(4, 3)), nn.Parameter(torch.randn(5, 3))
    opt = torch.optim.AdamW([a, b], lr=0.01)
    rec = StepRecorder([[a], [b]], [opt])
    for step in range(3):
        a.grad = torch.randn_like(a)
        b.grad = torch.randn_like(b)
        if step == 1:
            a.grad[0, 0] = math.inf
        opt.step()
    (batch,) = rec.drain()
    assert np.isfinite(batch.angular_update[:, 1]).all()
    assert not np.isfinite(batch.angular_update[1:, 0]).all()
    rec.close()


def test_a_step_without_gradient_is_not_counted_as_no_rotation():
    a, b = nn.Parameter(torch.randn(4, 3)), nn.Parameter(torch.randn(5, 3))
    for opt in (torch.optim.SGD([a, b], lr=0.1, momentum=0.9), torch.optim.SGD([a, b], lr=0.1)):
        rec = StepRecorder([[a], [b]], [opt])
        for step in range(3):
            a.grad = None if step == 1 else torch.randn_like(a)
            b.grad = torch.randn_like(b)
            opt.step()
        (batch,) = rec.drain()
        assert np.isnan(batch.angular_update[1, 0]) and np.isfinite(batch.angular_update[[0, 2], 0]).all()
        assert np.isfinite(batch.angular_update[:, 1]).all()
        rec.close()


def test_empty_tensors_with_per_filter_statistics():
    a, empty = nn.Parameter(torch.randn(4, 3)), nn.Parameter(torch.empty(0, 3))
    opt = torch.optim.SGD([a, empty], lr=0.1)
    rec = StepRecorder([[a], [empty]], [opt], unit_filters=[(0, 1), (0, 1)])
    for _ in range(2):
        a.grad, empty.grad = torch.randn_like(a), torch.randn_like(empty)
        opt.step()
    (batch,) = rec.drain()
    assert np.isfinite(batch.filter_angular_update_rms[:, 0]).all()
    rec.close()


def test_low_precision_weights_use_float64_norms_not_low_precision_dots():
    a = nn.Parameter(torch.randn(64, 32, dtype=torch.bfloat16))
    opt = torch.optim.SGD([a], lr=0.1)
    rec = StepRecorder([[a]], [opt])
    assert not rec.slots[0].cross  # bf16 dot products would accumulate in bf16
    reference = float(a.detach().double().norm() ** 2)
    a.grad = torch.randn_like(a)
    opt.step()
    (batch,) = rec.drain()
    assert batch.norm_sq_before[0, 0] == pytest.approx(reference, rel=1e-12)
    rec.close()


def test_a_failing_measurement_never_breaks_training(tmp_path, monkeypatch):
    """An exception inside the step hook stops the measurement with a warning; training goes on unchanged."""
    import warnings as _w

    import lightning_smd.engine.measure as measure

    calls = {"n": 0}
    original = measure._Slot.record

    def flaky(self):
        calls["n"] += 1
        if calls["n"] == 4:
            raise RuntimeError("simulated kernel failure")
        return original(self)

    monkeypatch.setattr(measure._Slot, "record", flaky)
    torch.manual_seed(0)
    smd = SMDCallback(verbose=False)
    with _w.catch_warnings(record=True) as caught:
        _w.simplefilter("always")
        t = trainer(tmp_path, [smd], max_steps=12)
        t.fit(Module(SmallConvNet(), optimizer=sgd(momentum=0.9)), loader())
    assert t.global_step == 12
    messages = [str(w.message) for w in caught]
    assert any("simulated kernel failure" in m and "optimizer step 4" in m for m in messages)
    assert smd.summary()["steps"] == 3  # the steps measured before the failure
