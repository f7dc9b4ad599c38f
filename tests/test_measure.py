"""The measurement: accuracy against float64 references, the observer property, no host syncs."""

import contextlib
import functools
import math

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from helpers import Module, SmallConvNet, SmallResNet, loader, sgd, trainer

from lightning_smd import SMDCallback, SMDWarning
from lightning_smd.engine.measure import StepRecorder, _Slot


class ReferenceAngles(pl.Callback):
    """Float64 copies of the tracked weights right before and right after every optimizer step."""

    def __init__(self, names):
        self.names = names
        self.angles = []
        self.lrs = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        named = dict(pl_module.named_parameters())
        self._before = {n: named[n].detach().to(torch.float64).clone() for n in self.names}
        self.lrs.append(optimizer.param_groups[0]["lr"])

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        named = dict(pl_module.named_parameters())
        row = []
        for n in self.names:
            a = self._before[n].flatten()
            b = named[n].detach().to(torch.float64).flatten()
            ua, ub = a / a.norm(), b / b.norm()
            row.append(2.0 * math.atan2(float((ua - ub).norm()), float((ua + ub).norm())))
        self.angles.append(row)


def _select_kernel(monkeypatch, kernel):
    """The step path: CPU dot products with all tensors batched as small; conv1 and conv2 (216 and 576
    elements) batched and conv3 (1152) on its own; all on their own; or the accelerators' float64 foreach
    norms."""
    import lightning_smd.engine.measure as measure
    import lightning_smd.engine.session as session

    threshold = {"dots-small": 4096, "dots-mixed": 600, "dots-large": 0}.get(kernel)
    if threshold is None:
        monkeypatch.setattr(session, "StepRecorder", functools.partial(measure.StepRecorder, cpu_dot_products=False))
    else:
        monkeypatch.setattr(measure, "SMALL_NUMEL", threshold)


def _decaying_lr(opt):
    # lr from 0.1 down to 1e-6 over 30 steps: angles from ~1e-2 down to below 1e-5 rad
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 10.0 ** (-5.0 * min(t, 30) / 30))


@pytest.mark.parametrize(
    "optimizer,precision,use_buffer,path,warns",
    [
        (sgd(momentum=0.0), "32-true", True, "snapshot", None),
        # Adam without weight decay: SMD002 (no equilibrium to predict); the angles are measured all the same
        (lambda p: torch.optim.Adam(p, lr=0.1), "32-true", True, "snapshot", r"with weight_decay=0.*\[SMD002\]"),
        (sgd(momentum=0.9), "32-true", False, "snapshot", None),
        (sgd(momentum=0.9), "64-true", True, "momentum_buffer", None),
    ],
    ids=["sgd-snapshot", "adam-snapshot", "sgdm-snapshot", "sgdm-buffer-float64"],
)
@pytest.mark.parametrize("kernel", ["dots-small", "dots-mixed", "dots-large", "foreach-norms"])
def test_angles_match_float64_reference(tmp_path, monkeypatch, optimizer, precision, use_buffer, path, warns, kernel):
    _select_kernel(monkeypatch, kernel)
    torch.manual_seed(0)
    names = ["net.conv1.weight", "net.conv2.weight", "net.conv3.weight"]
    ref = ReferenceAngles(names)
    smd = SMDCallback(keep_history=True, use_momentum_buffer=use_buffer, verbose=False)
    model = Module(SmallConvNet(), optimizer=optimizer, scheduler=_decaying_lr)
    dtype = torch.float64 if precision == "64-true" else torch.float32
    t = trainer(tmp_path, [smd, ref], max_steps=36, precision=precision)
    with pytest.warns(SMDWarning, match=warns) if warns else contextlib.nullcontext():
        t.fit(model, loader(dtype=dtype))
    assert smd.summary()["optimizers"][0]["measurement"] == path
    reference = np.array(ref.angles)
    assert reference.shape == (36, 3)
    assert (reference < 1e-5).any() and (reference > 1e-3).any()
    for j, name in enumerate(names):
        measured = smd.diagnostics.unit_history(name)["angular_update"]
        np.testing.assert_allclose(measured, reference[:, j], rtol=1e-6, atol=0)


def test_weight_norms_are_accurate(tmp_path):
    torch.manual_seed(0)
    smd = SMDCallback(keep_history=True, verbose=False)
    model = Module(SmallConvNet())
    norms = []

    class Norms(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, *args):
            norms.append(float(pl_module.net.conv2.weight.detach().double().norm()))

    trainer(tmp_path, [smd, Norms()], max_steps=12).fit(model, loader())
    h = smd.diagnostics.unit_history("net.conv2.weight")
    # float64 foreach norms on accelerators; float32 dot products on the CPU (angles stay float64-exact, see
    # test_angles_match_float64_reference: the norm difference comes from the cross term, not from norms)
    np.testing.assert_allclose(h["weight_norm"], norms, rtol=1e-6)
    assert list(h["steps"]) == list(range(1, 13))


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize(
    "optimizer",
    [sgd(momentum=0.9), sgd(momentum=0.0), lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1)],
    ids=["sgdm-buffer", "sgd-snapshot", "adamw-snapshot"],
)
def test_callback_is_an_observer_bit_for_bit(tmp_path, optimizer):
    states = []
    for with_cb in (False, True):
        torch.manual_seed(0)
        model = Module(SmallResNet(), optimizer=optimizer)
        callbacks = [SMDCallback(verbose=False)] if with_cb else []
        with warnings_ignored():
            trainer(tmp_path / str(with_cb), callbacks, max_steps=25).fit(model, loader())
        states.append(_state(model))
    assert states[0].keys() == states[1].keys()
    for k in states[0]:
        assert torch.equal(states[0][k], states[1][k]), k


@contextlib.contextmanager
def warnings_ignored():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


class HostSync(AssertionError):
    pass


_SYNCING = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "cpu", "numpy")


@contextlib.contextmanager
def forbid_host_sync():
    """Make every Tensor method that copies a value to the host raise."""
    saved = {name: getattr(torch.Tensor, name) for name in _SYNCING}
    saved_to = torch.Tensor.to

    def raiser(name):
        def f(self, *a, **k):
            raise HostSync(f"Tensor.{name} called on the step path")

        return f

    def to(self, *args, **kwargs):
        dev = kwargs.get("device", args[0] if args else None)
        if isinstance(dev, (str, torch.device)) and torch.device(dev).type == "cpu":
            raise HostSync("Tensor.to('cpu') called on the step path")
        return saved_to(self, *args, **kwargs)

    try:
        for name in _SYNCING:
            setattr(torch.Tensor, name, raiser(name))
        torch.Tensor.to = to
        yield
    finally:
        for name, f in saved.items():
            setattr(torch.Tensor, name, f)
        torch.Tensor.to = saved_to


def test_forbid_host_sync_catches_syncs():
    # The guard used below must be able to fail.
    x = torch.ones(2)
    for call in (lambda: x.sum().item(), lambda: bool(x.sum()), lambda: float(x.sum()), lambda: x.tolist(), lambda: x.to("cpu")):
        with forbid_host_sync(), pytest.raises(HostSync):
            call()
    assert x.sum().item() == 2.0  # restored


@pytest.mark.parametrize("optimizer", [sgd(momentum=0.9), sgd(momentum=0.0)], ids=["buffer", "snapshot"])
def test_no_host_sync_between_log_steps(tmp_path, monkeypatch, optimizer):
    every = 5
    guarded = {"record": 0, "batch_end": 0}
    original_record = _Slot.record
    original_batch_end = SMDCallback.on_train_batch_end

    def record(self):
        with forbid_host_sync():
            original_record(self)
        guarded["record"] += 1

    def batch_end(self, trainer, *args):
        step = trainer.fit_loop.epoch_loop._batches_that_stepped
        if (step + 1) % every:  # not a log step: nothing may reach the host
            with forbid_host_sync():
                original_batch_end(self, trainer, *args)
            guarded["batch_end"] += 1
        else:
            original_batch_end(self, trainer, *args)

    monkeypatch.setattr(_Slot, "record", record)
    monkeypatch.setattr(SMDCallback, "on_train_batch_end", batch_end)
    smd = SMDCallback(verbose=False, log_every_n_steps=every)
    trainer(tmp_path, [smd], max_steps=23).fit(Module(SmallConvNet(), optimizer=optimizer), loader())
    assert guarded["record"] == 23
    assert guarded["batch_end"] == 23 - 4  # steps 5, 10, 15, 20 log
    assert smd.summary()["steps"] == 23


def test_recorder_without_lightning_and_momentum_path_saves_memory():
    torch.manual_seed(0)
    net = SmallConvNet()
    params = [[net.conv1.weight], [net.conv3.weight]]
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    rec = StepRecorder(params, [opt], capacity=4)
    assert rec.slots[0].momentum_path and rec.slots[0].snapshot is None
    data = iter(loader())
    for _ in range(6):  # more steps than the capacity: the buffer spills once
        x, y = next(data)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
    assert rec.pending == 6
    (batch,) = rec.drain()
    assert rec.pending == 0
    assert batch.angular_update.shape == (6, 2) and np.isfinite(batch.angular_update).all()
    assert list(batch.steps) == [1, 2, 3, 4, 5, 6]
    np.testing.assert_allclose(np.sqrt(batch.norm_sq_after[-1]), [float(net.conv1.weight.detach().norm()), float(net.conv3.weight.detach().norm())], rtol=1e-6)
    snap = StepRecorder(params, [torch.optim.SGD(net.parameters(), lr=0.1)], capacity=4)
    weight_bytes = sum(p[0].numel() * 4 for p in params)
    assert snap.extra_bytes - rec.extra_bytes == weight_bytes
    rec.close()
    snap.close()


@pytest.mark.parametrize("momentum", [0.9, 0.0], ids=["buffer", "snapshot"])
def test_per_filter_gradient_statistic_matches_a_float64_reference_and_is_nan_without_gradient(momentum):
    """``L_i = ‖g_i‖²·‖w_i‖²`` of each filter (the norm before the step), recorded on the device at every step: equal
    to a float64 reference, in groups where the unit is measured in groups, and nan at the step a tensor had no
    gradient (the dead-filter test skips it rather than reading a zero as a dead filter)."""
    torch.manual_seed(0)
    net = SmallConvNet()
    params = [[net.conv1.weight], [net.conv3.weight]]
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=momentum, weight_decay=1e-3)
    rec = StepRecorder(params, [opt], capacity=8, unit_filters=[(0, 1), (0, 2)])
    data, want = iter(loader()), []
    for step in range(5):
        x, y = next(data)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(net(x), y).backward()
        if step == 3:
            net.conv3.weight.grad = None  # SGD skips it this step
        rows = []
        for w, group in ((net.conv1.weight, 1), (net.conv3.weight, 2)):
            wr = w.detach().double().flatten(1).reshape(w.shape[0] // group, -1)
            g = w.grad.double().flatten(1).reshape(w.shape[0] // group, -1) if w.grad is not None else torch.full_like(wr, float("nan"))
            rows.append((g.square().sum(1) * wr.square().sum(1)).numpy())
        want.append(rows)
        opt.step()
    (batch,) = rec.drain()
    for u in (0, 1):
        np.testing.assert_allclose(batch.filter_grad_stat[u], np.stack([r[u] for r in want]), rtol=1e-5)
    assert np.isnan(batch.filter_grad_stat[1][3]).all() and np.isfinite(batch.filter_grad_stat[0]).all()
    assert batch.filter_grad_stat[1].shape == (5, net.conv3.weight.shape[0] // 2)
    rec.close()


class ReferenceFilterAngles(pl.Callback):
    """Per-filter float64 angles of one weight (filters along ``dim``, summed in groups of ``group``)."""

    def __init__(self, get, dim=0, group=1, bias=None):
        self.get, self.dim, self.group, self.bias = get, dim, group, bias
        self.rms = []

    def _rows(self, pl_module):
        w = self.get(pl_module).detach().to(torch.float64)
        rows = w.movedim(self.dim, 0).reshape(w.shape[self.dim], -1)
        if self.bias is not None:
            rows = torch.cat([rows, self.bias(pl_module).detach().to(torch.float64)[:, None]], 1)
        return rows.reshape(rows.shape[0] // self.group, -1)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self._before = self._rows(pl_module)

    def on_train_batch_end(self, trainer, pl_module, *args):
        a, b = self._before, self._rows(pl_module)
        ua, ub = a / a.norm(dim=1, keepdim=True), b / b.norm(dim=1, keepdim=True)
        angles = 2 * torch.atan2((ua - ub).norm(dim=1), (ua + ub).norm(dim=1))
        self.rms.append(float(angles.square().mean().sqrt()))


@pytest.mark.parametrize("momentum", [0.9, 0.0], ids=["buffer", "snapshot"])
def test_per_filter_statistics_match_a_float64_reference(tmp_path, momentum):
    from zoo import BiasPairs

    torch.manual_seed(0)
    net = BiasPairs()
    net.head = torch.nn.Linear(12, 10)
    ref_filter = ReferenceFilterAngles(lambda m: m.net.conv.weight, group=4, bias=lambda m: m.net.conv.bias)
    smd = SMDCallback(per_filter=True, keep_history=True, verbose=False)
    precision = "64-true" if momentum else "32-true"
    with warnings_ignored():
        trainer(tmp_path, [smd, ref_filter], max_steps=8, precision=precision).fit(
            Module(net, optimizer=sgd(momentum=momentum)), loader(dtype=torch.float64 if momentum else torch.float32)
        )
    h = smd.diagnostics.unit_history("net.conv.weight+bias")
    np.testing.assert_allclose(h["filter_angular_update_rms"], ref_filter.rms, rtol=1e-6)
    (layer,) = [x for x in smd.summary()["layers"] if x["name"] == "net.conv.weight+bias"]
    assert layer["granularity"] == "group" and layer["group_size"] == 4
    assert layer["filter_angular_update_rms"] > 0
    tensor_only = [x for x in smd.summary()["layers"] if x["name"] == "net.lin.weight+bias"][0]
    assert tensor_only["filter_angular_update_rms"] is None and np.isnan(smd.diagnostics.unit_history("net.lin.weight+bias")["filter_angular_update_rms"]).all()


def test_per_filter_metric_is_logged_only_when_asked(tmp_path):
    import csv

    for flag in (False, True):
        d = tmp_path / str(flag)
        with warnings_ignored():
            trainer(d, [SMDCallback(per_filter=flag, verbose=False)], max_steps=5).fit(Module(SmallConvNet()), loader())
        with open(d / "metrics.csv") as fh:
            header = next(csv.reader(fh))
        assert ("smd/net.conv1.weight/filter_angular_update_rms" in header) is flag


@pytest.mark.parametrize("kernel", ["dots-mixed", "foreach-norms"])
@pytest.mark.parametrize("momentum", [0.9, 0.0], ids=["buffer", "snapshot"])
def test_sampled_steps_are_measured_over_one_step(tmp_path, monkeypatch, kernel, momentum):
    """every_n_steps=3 records steps 3, 6, 9, ...: each over that single step, as a float64 reference says."""
    _select_kernel(monkeypatch, kernel)
    torch.manual_seed(0)
    names = ["net.conv1.weight", "net.conv2.weight", "net.conv3.weight"]
    ref = ReferenceAngles(names)
    smd = SMDCallback(keep_history=True, every_n_steps=3, log_every_n_steps=5, verbose=False)
    with warnings_ignored():
        # (the momentum buffer gives the exact update -lr*buf; float32 weights round it, so compare in float64)
        precision, dtype = ("64-true", torch.float64) if momentum else ("32-true", torch.float32)
        trainer(tmp_path, [smd, ref], max_steps=36, precision=precision).fit(
            Module(SmallConvNet(), optimizer=sgd(momentum=momentum), scheduler=_decaying_lr), loader(dtype=dtype)
        )
    reference = np.array(ref.angles)
    for j, name in enumerate(names):
        h = smd.diagnostics.unit_history(name)
        assert list(h["steps"]) == list(range(3, 37, 3))
        np.testing.assert_allclose(h["angular_update"], reference[2::3, j], rtol=1e-6, atol=0)
    summary = smd.summary()
    assert summary["every_n_steps"] == 3 and summary["steps"] == 36
    assert summary["optimizers"][0]["measurement"] == ("momentum_buffer" if momentum else "snapshot")


def test_sampling_keeps_the_window_and_moving_averages_in_steps():
    """A constant in-band signal sampled every 4 steps is judged steady after the same number of steps (the
    settling time and the window count steps), and counts the same steps in equilibrium."""
    from lightning_smd.analysis.diagnostics import Diagnostics, DiagnosticsConfig
    from lightning_smd.analysis.units import NormalizedWeight
    from lightning_smd.engine.measure import StepBatch
    from lightning_smd.analysis.theory import rule_for

    unit = NormalizedWeight(name="w", params=("w",), shape=(4, 4), numel=16, layer="Linear", norm="LayerNorm", granularity="tensor", found_by="test")
    rule = rule_for(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1, weight_decay=0.05))
    hyper = {"lr": 0.1, "weight_decay": 0.05, "momentum": 0.0, "dampening": 0.0, "nesterov": False}  # τ_r = 50 steps
    pred = rule.angular_update(rule.hyper(hyper))
    first, share = {}, {}
    for stride in (1, 4):
        diag = Diagnostics([unit], DiagnosticsConfig(window=64, ema_steps=20), every_n_steps=stride)
        assert diag.judge_every == 16
        steps = np.arange(stride, 801, stride)
        k = len(steps)
        ones = np.ones((k, 1))
        diag.update(
            StepBatch(0, np.array([0]), steps, ones, ones, ones, ones, np.full((k, 1), pred), [[rule.hyper(hyper)]] * k, np.array([0]), rule)
        )
        assert diag.counted[0] and diag.settle_steps[0] == pytest.approx(200)
        first[stride] = int(diag.first_equilibrium[0])
        share[stride] = diag.summary()["layers"][0]["share_in_equilibrium"]
    assert first[1] == first[4] == 208 - 104 + 1  # judged at step 208 (the first multiple of 16 after 200) on its second half
    assert share[1] == share[4] == pytest.approx((800 - 208) / 800)


def test_flat_group_follows_replaced_storage_and_missing_gradients():
    """The batched small-tensor path caches views of the weights: ``p.data = ...`` must not leave it reading
    the old storage, and a tensor without gradient must count as not moved."""
    torch.manual_seed(0)
    net = SmallConvNet()
    params = [[net.conv1.weight], [net.conv2.weight], [net.fc.weight]]
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    rec = StepRecorder(params, [opt], capacity=8)
    slot = rec.slots[0]
    assert slot.flat is not None and sorted(slot.small) == [0, 1, 2]
    x, y = next(iter(loader()))
    torch.nn.functional.cross_entropy(net(x), y).backward()
    with torch.no_grad():
        net.conv2.weight.data = net.conv2.weight.data * 3.0  # new storage
    before = [p[0].detach().clone() for p in params]
    net.fc.weight.grad = None  # fc does not move this step
    opt.step()
    (batch,) = rec.drain()
    after = [p[0].detach() for p in params]
    expected_norm_sq = [float(a.double().square().sum()) for a in after]
    np.testing.assert_allclose(batch.norm_sq_after[0], expected_norm_sq, rtol=1e-12)
    for j in (0, 1):
        a, b = before[j].double().flatten(), after[j].double().flatten()
        ref = 2 * math.atan2(float((a / a.norm() - b / b.norm()).norm()), float((a / a.norm() + b / b.norm()).norm()))
        assert batch.angular_update[0, j] == pytest.approx(ref, rel=1e-6)
    assert np.isnan(batch.angular_update[0, 2]) and np.isnan(batch.grad_sq[0, 2])
    rec.close()


_S = torch.optim.lr_scheduler
def _adamw(params):
    return torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)


#: One of each schedule family the callback reads ahead and follows (30-step runs).
SCHEDULE_FAMILIES = {
    "warmup_cosine": lambda o: _S.LambdaLR(o, lambda t: (t + 1) / 5 if t < 5 else 0.5 * (1 + math.cos(math.pi * (t - 5) / 25))),
    "linear_to_zero": lambda o: _S.LinearLR(o, start_factor=1.0, end_factor=0.0, total_iters=30),
    "wsd": lambda o: _S.LambdaLR(o, lambda t: 1.0 if t < 24 else (30 - t) / 6),
    "one_cycle": lambda o: _S.OneCycleLR(o, max_lr=0.1, total_steps=30),
    "sequential": lambda o: _S.SequentialLR(o, [_S.LinearLR(o, 0.1, total_iters=5), _S.CosineAnnealingLR(o, 25)], milestones=[5]),
    "chained": lambda o: _S.ChainedScheduler([_S.ExponentialLR(o, 0.97), _S.StepLR(o, 10, 0.5)]),
    "warm_restarts": lambda o: _S.CosineAnnealingWarmRestarts(o, T_0=10),
    "step": lambda o: _S.MultiStepLR(o, [10, 20], 0.3),
}


@pytest.mark.parametrize(
    "family, optimizer",
    # every family with SGD with momentum (its update read from the momentum buffer), and with AdamW (a snapshot of the
    # weights) in the slow tier but for OneCycle, which also cycles AdamW's betas
    [pytest.param(f, sgd(momentum=0.9), id=f"{f}-sgdm") for f in SCHEDULE_FAMILIES]
    + [
        pytest.param(f, _adamw, id=f"{f}-adamw", marks=() if f == "one_cycle" else pytest.mark.slow)
        for f in SCHEDULE_FAMILIES
    ],
)
def test_callback_is_an_observer_under_every_schedule_family(tmp_path, family, optimizer):
    """The schedule is read ahead (a copy stepped on a shadow) and followed: weights, optimizer state and the
    scheduler's state end bit for bit as without the callback, and the plan was followed (not left)."""
    ends = []
    for with_cb in (False, True):
        torch.manual_seed(0)
        model = Module(SmallConvNet(), optimizer=optimizer, scheduler=SCHEDULE_FAMILIES[family])
        smd = SMDCallback(verbose=False)
        with warnings_ignored():
            fitted = trainer(tmp_path / str(with_cb), [smd] if with_cb else [], max_steps=30)
            fitted.fit(model, loader())
        ends.append((_state(model), fitted.optimizers[0].state_dict(), fitted.lr_scheduler_configs[0].scheduler.state_dict()))
    (w0, o0, s0), (w1, o1, s1) = ends
    for k in w0:
        assert torch.equal(w0[k], w1[k]), k
    assert o0["param_groups"] == o1["param_groups"]
    for i, st in o0["state"].items():
        for name, value in st.items():
            assert torch.equal(value, o1["state"][i][name]) if isinstance(value, torch.Tensor) else value == o1["state"][i][name], (i, name)
    assert repr(s0) == repr(s1)
    schedule = smd.summary()["schedule"]["0"]
    # every family is followed; a few changes (two steps; this 30-step WSD's 6 decay steps) are also timed one by one
    assert schedule["read"] and schedule["followed"], schedule
    assert schedule["changes"] == ("a few steps (each re-equilibration timed)" if family in ("step", "wsd") else "continuous"), schedule
