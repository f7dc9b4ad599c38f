"""Faults told as faults (issue 18): a diverged run, two callbacks in one Trainer, debug runs under the gate,
misleading reasons, the step count after a resume, two writers of one log directory.

Every test here failed on the main branch before the fix it covers (the docstrings say how).
"""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from torch.nn import functional as F

from helpers import HEALTHY_STEPS, Module, PlainConvNet, SmallConvNet, counted, fit_smd, healthy_module, loader, sgd, teacher_loader, trainer
from lightning_smd import EquilibriumNotReachedError, SMDCallback, SMDWarning


class WriteNaN(pl.Callback):
    """Write a NaN into one weight right before the forward pass of batch ``step`` (0-based)."""

    def __init__(self, step: int, param: str = "net.conv2.weight", value: float = math.nan) -> None:
        self.step, self.param, self.value = step, param, value

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx: int) -> None:
        if trainer.global_step == self.step:
            with torch.no_grad():
                dict(pl_module.named_parameters())[self.param].view(-1)[0] = self.value


class InfLossAt(Module):
    """Returns an infinite loss at one step: its gradient is non-finite, and so are the weights after it."""

    def __init__(self, step: int, finite_weights: bool = False, **kw) -> None:
        super().__init__(SmallConvNet(), **kw)
        self.at, self.finite_weights = step, finite_weights

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        if self.global_step == self.at:
            # finite_weights: an infinite value with a finite gradient (a constant added), else an infinite gradient
            loss = loss + torch.tensor(math.inf) if self.finite_weights else loss * math.inf
        return loss


# ---------------------------------------------------------------------------------------------
# 1. A diverged run
# ---------------------------------------------------------------------------------------------
def _check_nan_written_at(tmp_path, model, steps, at, **fit_kw):
    """Train under the raise gate at ``min_fraction=1e-6`` with a NaN written into conv2's weight before the forward
    pass of step ``at + 1``: the gate fails, and nothing reads as in equilibrium from that step on."""
    smd = SMDCallback(verbose=False, on_no_equilibrium="raise", min_fraction=1e-6)
    with pytest.raises(EquilibriumNotReachedError) as err:
        fit_smd(tmp_path, model, steps, smd=smd, callbacks=[WriteNaN(at)], **fit_kw)
    summary = err.value.summary
    step = at + 1  # the first step measured from the NaN weight
    assert summary["verdict"] == "diverged"
    assert summary["diverged_at_step"] == step
    assert summary["reason"].startswith("training diverged: the weights of 3 layers at once")
    assert f"step {step}" in summary["reason"]
    for row in summary["layers"]:
        assert row["state"] == "diverged" and row["diverged_at_step"] == step and not row["in_equilibrium"]
        assert row["ratio"] is None and row["steady_ratio"] is None and row["weight_norm"] is None  # nothing stale
        assert row["not_in_equilibrium_because"].startswith("diverged")
    assert summary["diagnoses"]["diverged"] == [r["name"] for r in summary["layers"]]
    assert any("[SMD025]" in w and f"step {step}" in w for w in summary["warnings"])
    on_disk = json.loads((tmp_path / "smd_summary.json").read_text())
    assert on_disk["verdict"] == "diverged" and on_disk["complete"] is True
    # the logged per-layer ratio is nan from the divergence on, not the last finite value
    rows = [r for r in (tmp_path / "metrics.csv").read_text().splitlines()]
    header = rows[0].split(",")
    col = header.index("smd/net.conv1.weight/angular_update_ratio")
    last = rows[-1].split(",")
    assert last[col] in ("", "nan")


def test_a_nan_written_into_a_weight_fails_the_gate_whatever_min_fraction(tmp_path):
    """The fast twin of the healthy-run test below, end to end: a NaN written at step 10 of 20."""
    pl.seed_everything(0)
    _check_nan_written_at(tmp_path, Module(SmallConvNet()), 20, 10)


def test_a_nan_after_equilibrium_ends_it_whatever_min_fraction():
    """The fast twin of the healthy-run test below, on synthetic batches (tests/test_steady.py's ``feed``): three
    layers steady on the prediction, in equilibrium at min_fraction 1e-6, then weights that are NaN from step 201 on.
    The verdict is 'diverged' at step 201, and no figure keeps its last finite value."""
    from test_steady import feed, units

    from lightning_smd.analysis import Diagnostics, DiagnosticsConfig

    d = Diagnostics(units(3), DiagnosticsConfig(min_fraction=1e-6))
    feed(d, np.ones((200, 3)), lr=np.full(200, 0.1), chunk=200)  # τ_r = 10 steps: steady after the 200-step minimum
    assert d.verdict()[0] == "equilibrium" and d.counted.all()
    nan = np.full((5, 3), np.nan)
    feed(d, nan, nan, lr=np.full(5, 0.1), first=201, chunk=5)
    verdict, reason = d.verdict()
    assert verdict == "diverged" and reason.startswith("training diverged: the weights of 3 layers at once (w0, w1, w2)")
    assert "at optimizer step 201" in reason
    summary = d.summary()
    assert summary["diverged_at_step"] == 201 and summary["angular_update_ratio"] is None and summary["equilibrium_fraction"] == 0.0
    for row in summary["layers"]:
        assert row["state"] == "diverged" and row["diverged_at_step"] == 201 and not row["in_equilibrium"]
        assert row["ratio"] is None and row["steady_ratio"] is None and row["weight_norm"] is None
    metrics = d.metrics()
    assert all(math.isnan(metrics[f"smd/w{i}/{key}"]) for i in range(3) for key in ("angular_update_ratio", "steady_ratio"))


@pytest.mark.slow  # the healthy cell's 1,600 steps; the two tests above are its fast twins
def test_a_nan_written_into_a_weight_late_in_a_healthy_run_fails_the_gate_whatever_min_fraction(tmp_path):
    """The healthy cell (equilibrium from about step 800, docs/verdict_reliability.md) with a NaN written into one
    weight at step 1500. Before the fix the smoothing skipped the NaN samples and the last finite ratios kept every
    layer in equilibrium: verdict 'equilibrium', no warning, and the gate passed."""
    pl.seed_everything(0)
    _check_nan_written_at(tmp_path, healthy_module(), HEALTHY_STEPS, 1500, data=teacher_loader(0))


def test_an_infinite_loss_in_a_short_run_reads_diverged_with_its_step(tmp_path):
    """An inf loss at step 30 of 60. Before the fix this read 'not_reached', every layer 'approaching' with stale
    ratios."""
    pl.seed_everything(0)
    fit = fit_smd(tmp_path, InfLossAt(30), 60)
    summary = fit.smd.summary()
    assert summary["verdict"] == "diverged"
    assert summary["diverged_at_step"] == 31
    assert {r["state"] for r in summary["layers"]} == {"diverged"}
    assert sum("[SMD025]" in w for w in fit.warnings) == 1
    assert not any("[SMD034]" in w for w in fit.warnings)  # the divergence is the message, not "no equilibrium"


def test_the_stop_gate_stops_a_diverged_run_at_the_next_log_step(tmp_path):
    pl.seed_everything(0)
    fit = fit_smd(tmp_path, InfLossAt(30), 200, on_no_equilibrium="stop")
    summary = fit.smd.summary()
    assert summary["verdict"] == "diverged"
    assert summary["stopped_early"].startswith("training diverged")
    assert fit.trainer.global_step <= 35  # log_every_n_steps=5: the drain after step 31


def test_a_non_finite_loss_with_finite_weights_is_a_warning_not_a_divergence(tmp_path):
    """One infinite loss value whose gradient is finite (a skipped mixed-precision step looks like this): the
    weights stay finite, so the run is judged as usual, and the loss is reported once."""
    pl.seed_everything(0)
    fit = fit_smd(tmp_path, InfLossAt(12, finite_weights=True), 40)
    summary = fit.smd.summary()
    assert summary["verdict"] != "diverged" and summary["diverged_at_step"] is None
    assert sum("[SMD026]" in w for w in fit.warnings) == 1
    assert all(r["weight_norm"] is not None for r in summary["layers"])


def test_a_diverged_run_is_told_by_the_plain_pytorch_monitor_too():
    from lightning_smd import SMDMonitor

    torch.manual_seed(0)
    net = SmallConvNet()
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-3)
    monitor = SMDMonitor(net, opt)
    batches = iter(loader())
    for step in range(20):
        x, y = next(batches)
        loss = F.cross_entropy(net(x), y) * (math.inf if step == 10 else 1.0)
        opt.zero_grad()
        loss.backward()
        opt.step()
        monitor.update()
    summary = monitor.close()
    assert summary["verdict"] == "diverged" and summary["diverged_at_step"] == 11


# ---------------------------------------------------------------------------------------------
# 3. The gate in debug runs
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "debug, steps, verdict",
    [({"fast_dev_run": True}, 1, "not_reached"), ({"fast_dev_run": 3}, 3, "not_reached"), ({"limit_train_batches": 0}, 0, "not_applicable")],
    ids=["fdr", "fdr3", "ltb0"],
)
def test_the_raise_gate_stands_down_in_a_debug_run_and_says_so(tmp_path, debug, steps, verdict):
    """Before the fix every fast_dev_run raised EquilibriumNotReachedError (one step is never in equilibrium), and
    limit_train_batches=0 wrote no summary at all (Lightning skips on_train_end): now it is written at fit end,
    'not_applicable' (no step measured)."""
    fit = fit_smd(tmp_path, Module(SmallConvNet()), 20, on_no_equilibrium="raise", trainer_kw=debug)
    summary = fit.smd.summary()
    assert summary["verdict"] == verdict and summary["steps"] == steps and summary["complete"] is True, summary["reason"]
    if not steps:
        assert summary["reason"] == "no optimizer step was measured"
    assert summary["gate"].startswith("stood down: ") and next(iter(debug)) in summary["gate"]
    assert sum("[SMD027]" in w for w in fit.warnings) == 1
    assert not any("[SMD003]" in w for w in fit.warnings)  # "the run is too short" is no news in a debug run
    assert fit.smd.summary_file is not None and json.loads(open(fit.smd.summary_file).read())["gate"] == summary["gate"]


def test_a_diverged_debug_run_still_fails_the_gate(tmp_path):
    with pytest.raises(EquilibriumNotReachedError, match="diverged"):
        fit_smd(tmp_path, InfLossAt(1), 20, on_no_equilibrium="raise", trainer_kw={"fast_dev_run": 3})


def test_an_ordinary_run_keeps_its_gate(tmp_path):
    """The stand-down is for debug runs only: a 20-step run with the raise gate still fails."""
    with pytest.raises(EquilibriumNotReachedError):
        fit_smd(tmp_path, Module(SmallConvNet()), 20, on_no_equilibrium="raise")


# ---------------------------------------------------------------------------------------------
# 6. Steps keep the Trainer's count
# ---------------------------------------------------------------------------------------------
def test_resuming_from_a_checkpoint_made_without_the_callback_counts_from_the_trainers_step(tmp_path):
    """30 steps without the callback, a checkpoint, then 70 more with it. Before the fix the summary said 70 steps
    and every step (first equilibrium, plots) was counted from the resume."""
    pl.seed_everything(0)
    first = trainer(tmp_path / "a", max_steps=30)
    model = Module(SmallConvNet())
    first.fit(model, loader())
    ckpt = tmp_path / "30.ckpt"
    first.save_checkpoint(str(ckpt))
    smd = SMDCallback(verbose=False)
    second = trainer(tmp_path / "b", [smd], max_steps=100)
    second.fit(Module(SmallConvNet()), loader(), ckpt_path=str(ckpt))
    summary = smd.summary()
    assert summary["steps"] == 100 and summary["global_step"] == 100
    for row in summary["layers"]:
        assert row["steps"] == 100 and row["first_measured_step"] == 31
    # the logged steps are the Trainer's: the CSV's step column for the smd/* rows runs from 34 (log interval 5)
    lines = (tmp_path / "b" / "metrics.csv").read_text().splitlines()
    header = lines[0].split(",")
    step_col, key_col = header.index("step"), header.index("smd/angular_update_ratio")
    steps = [int(r.split(",")[step_col]) for r in lines[1:] if r.split(",")[key_col] not in ("",)]
    assert min(steps) >= 30 and max(steps) == 99


def test_a_second_fit_of_one_trainer_continues_the_step_count(tmp_path):
    smd = SMDCallback(verbose=False)
    t = trainer(tmp_path, [smd], max_steps=40)
    model = Module(SmallConvNet())
    t.fit(model, loader())
    assert smd.summary()["steps"] == 40
    t.fit_loop.epoch_loop.max_steps = 80
    t.fit(model, loader())
    summary = smd.summary()
    assert summary["steps"] == 80
    assert {r["first_measured_step"] for r in summary["layers"]} == {41}


# ---------------------------------------------------------------------------------------------
# 2. Several SMDCallbacks in one Trainer
# ---------------------------------------------------------------------------------------------
def test_a_callback_without_a_summary_next_to_a_default_one_runs(tmp_path):
    """SMDCallback() next to SMDCallback(summary_path=False) crashed the Trainer before the fix (Lightning's
    duplicate state_key error): they differ, so both run, under different keys."""
    a, b = SMDCallback(verbose=False), SMDCallback(verbose=False, summary_path=False)
    assert a.state_key != b.state_key
    t = trainer(tmp_path, [a, b], max_steps=20)
    t.fit(Module(SmallConvNet()), loader())
    assert a.namespace == "smd" and b.namespace == "smd-2"
    assert a.summary_file == str(tmp_path / "smd_summary.json") and b.summary_file is None
    header = (tmp_path / "metrics.csv").read_text().splitlines()[0].split(",")
    assert "smd/angular_update_ratio" in header and "smd-2/angular_update_ratio" in header


def test_two_callbacks_with_different_criteria_keep_two_summaries_and_two_sets_of_series(tmp_path):
    """Before the fix both wrote <log dir>/smd_summary.json (the first was lost) and logged the same keys."""
    lenient, strict = SMDCallback(verbose=False), SMDCallback(verbose=False, tolerance=0.05, require_agreement=True)
    named = SMDCallback(verbose=False, name="gate", min_fraction=0.5)
    t = trainer(tmp_path, [lenient, strict, named], max_steps=20)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        t.fit(Module(SmallConvNet()), loader())
    assert strict.namespace == "smd-tolerance-0.05_require_agreement-True" and named.namespace == "smd-gate"
    files = sorted(p.name for p in tmp_path.glob("smd_summary*.json"))
    assert files == ["smd_summary-gate.json", "smd_summary-tolerance-0.05_require_agreement-True.json", "smd_summary.json"]
    for cb in (lenient, strict, named):
        on_disk = json.loads(open(cb.summary_file).read())
        assert on_disk["criteria"]["tolerance"] == cb.config.tolerance and on_disk["name"] == (None if cb is lenient else cb.namespace[4:])
    header = (tmp_path / "metrics.csv").read_text().splitlines()[0].split(",")
    for ns in ("smd", strict.namespace, "smd-gate"):
        assert f"{ns}/net.conv1.weight/angular_update_ratio" in header
    for ns in ("smd", strict.namespace, "smd-gate"):
        assert f"{ns}/angular_update_ratio" in t.callback_metrics
    # each shown warning says which callback it comes from: the default one's bare, the others' after their label
    shown = counted([str(w.message) for w in record if issubclass(w.category, SMDWarning)])
    for cb in (lenient, strict, named):
        prefix = "" if cb is lenient else f"SMDCallback '{cb.namespace[4:]}': "
        own = [m[len(prefix) :] for m in shown if m.startswith(prefix) and not (cb is lenient and m.startswith("SMDCallback '"))]
        # SMD003 (run too short) and SMD034 (no equilibrium), each once per callback, and the summary keeps them unprefixed
        assert [m[-8:] for m in own] == ["[SMD003]", "[SMD034]"], shown
        assert own[0] in cb.summary()["warnings"]


@pytest.mark.parametrize("twice", ["equal options", "same object"])
def test_true_duplicates_are_refused_when_the_trainer_is_built(tmp_path, twice):
    """Two SMDCallbacks with equal options share one ``state_key``: Lightning itself refuses them when the Trainer is
    built (its checkpoint could not tell their states apart), before anything is measured."""
    a = SMDCallback(verbose=False)
    callbacks = [a, SMDCallback(verbose=False)] if twice == "equal options" else [a, a]
    with pytest.raises(RuntimeError, match="more than one stateful callback"):
        trainer(tmp_path, callbacks)


def test_a_duplicate_appended_after_the_trainer_was_built_is_refused_with_our_message_at_fit_start(tmp_path):
    t = trainer(tmp_path, [SMDCallback(verbose=False)])
    t.callbacks.append(SMDCallback(verbose=False))
    with pytest.raises(ValueError, match="two SMDCallbacks with the same options"):
        t.fit(Module(SmallConvNet()), loader())


def test_two_callbacks_with_one_name_are_refused_at_fit_start(tmp_path):
    t = trainer(tmp_path, [SMDCallback(verbose=False, name="x"), SMDCallback(verbose=False, name="x", tolerance=0.2)])
    with pytest.raises(ValueError, match="would log under the same keys"):
        t.fit(Module(SmallConvNet()), loader())


def test_each_callback_resumes_its_own_state_from_one_checkpoint(tmp_path):
    """Two callbacks whose states differ (``a``: 3 layers, 50-step smoothing; ``b``: conv1 left out, 5-step smoothing):
    15 steps, one checkpoint, 15 more give each the figures of an uninterrupted 30-step run, which a swapped, shared
    or restarted state would not (fixed data: one epoch of 15 batches, as in
    tests/test_detect_callback.py::test_resume_continues_as_if_never_interrupted)."""
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_smd.demo import NoisyTemplates

    stream = iter(NoisyTemplates(batch_size=32, size=8))
    batches = [next(stream) for _ in range(15)]
    data = DataLoader(TensorDataset(torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])), batch_size=32)

    def run(root, epochs, ckpt=None):
        torch.manual_seed(0)
        a, b = SMDCallback(verbose=False), SMDCallback(verbose=False, ema_steps=5, exclude=["net.conv1.weight"])
        t = trainer(root, [a, b], max_steps=-1, max_epochs=epochs)
        t.fit(Module(PlainConvNet(), optimizer=sgd(lr=0.2, weight_decay=0.01)), data, ckpt_path=ckpt)
        return a, b, t

    straight = run(tmp_path / "straight", 2)[:2]
    first_a, first_b, t = run(tmp_path / "first", 1)
    t.save_checkpoint(str(tmp_path / "c.ckpt"))
    states = torch.load(str(tmp_path / "c.ckpt"), weights_only=False)["callbacks"]
    assert {first_a.state_key, first_b.state_key} <= set(states) and first_a.state_key != first_b.state_key
    resumed = run(tmp_path / "resumed", 2, ckpt=str(tmp_path / "c.ckpt"))[:2]
    names = (["net.conv1.weight", "net.conv2.weight", "net.conv3.weight"], ["net.conv2.weight", "net.conv3.weight"])
    for s_cb, r_cb, layers in zip(straight, resumed, names):
        s, r = s_cb.summary(), r_cb.summary()
        assert s["steps"] == r["steps"] == 30 and [row["name"] for row in r["layers"]] == layers
        for ls, lr in zip(s["layers"], r["layers"]):
            assert lr["first_measured_step"] == 1  # resumed, not restarted
            for key in ("angular_update", "ratio", "weight_norm", "predicted_weight_norm", "effective_lr"):
                assert lr[key] == pytest.approx(ls[key], rel=1e-9, abs=1e-12), (r_cb.namespace, lr["name"], key)
    # the two states are not alike: the same layer's smoothed figure differs between the callbacks
    a_conv2, b_conv2 = (cb.summary()["layers"][i] for cb, i in zip(resumed, (1, 0)))
    assert abs(a_conv2["angular_update"] / b_conv2["angular_update"] - 1) > 1e-3


# ---------------------------------------------------------------------------------------------
# 5. Reasons that say what happened
# ---------------------------------------------------------------------------------------------
def test_a_learning_rate_of_zero_is_not_reported_as_missing_weight_decay(tmp_path):
    """Before the fix: '3 have no weight decay, hence no equilibrium' (weight_decay was 5e-3)."""
    fit = fit_smd(tmp_path, Module(SmallConvNet(), optimizer=sgd(lr=0.0)), 20)
    reason = fit.smd.summary()["reason"]
    assert "learning rate of 0" in reason and "no weight decay" not in reason


def test_a_schedule_ending_at_zero_says_so_and_the_stop_gate_names_it(tmp_path):
    """lr 0.1 for 10 steps, then 0, in a run planned for 400 (long enough that the gate has no other reason to stop):
    the "stop" gate stops at the first log step a full interval after the change (step 15) naming the learning
    rate, and the reason blames it too, not the weight decay (5e-3)."""
    sched = lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 if step < 10 else 0.0)  # noqa: E731
    torch.manual_seed(0)
    fit = fit_smd(tmp_path, Module(SmallConvNet(), scheduler=sched), 400, on_no_equilibrium="stop")
    summary = fit.smd.summary()
    assert fit.trainer.global_step == summary["steps"] == 15
    names = "net.conv1.weight, net.conv2.weight, net.conv3.weight"
    # the schedule read ahead says the learning rate stays 0 to the end
    assert summary["stopped_early"] == f"3 of 3 normalized layers have a learning rate of 0 for the rest of the planned schedule, so they do not move ({names})"
    stops = [w for w in fit.warnings if w.startswith("Stopping training")]
    assert len(stops) == 1 and summary["stopped_early"] in stops[0], fit.warnings
    assert "learning rate of 0" in summary["reason"] and "no weight decay" not in summary["reason"]


def test_an_optimizer_without_the_normalized_weights_gets_one_consistent_message(tmp_path):
    """Before the fix SMD005 (not updated by any optimizer) was followed by SMD001 (no normalized weight found,
    because the classifier's scale reaches the output): both cannot be true."""

    class HeadOnly(Module):
        def configure_optimizers(self):
            return self._optimizer(self.net.fc.parameters())

    fit = fit_smd(tmp_path, HeadOnly(SmallConvNet()), 10)
    assert any("[SMD005]" in w for w in fit.warnings)
    assert not any("[SMD001]" in w for w in fit.warnings)
    summary = fit.smd.summary()
    assert summary["verdict"] == "not_applicable"
    assert "no optimizer updates them" in summary["reason"] and "net.conv1.weight" in summary["reason"]


# ---------------------------------------------------------------------------------------------
# 8. Two processes, one log directory
# ---------------------------------------------------------------------------------------------
_RUN = """
import os, sys, time
sys.path.insert(0, {tests!r})
import pytorch_lightning as pl
from helpers import Module, SmallConvNet, loader
from lightning_smd import SMDCallback

class Overlap(pl.Callback):
    # the overlap, made certain: the long run says when it has started; each run waits at step 10 for the other's sign
    def on_train_start(self, trainer, *args):
        if {long}:
            open(os.path.join({out!r}, "long-run-started"), "w").close()

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step == 10:
            sign = os.path.join({out!r}, "smd_summary.json" if {long} else "long-run-started")
            deadline = time.time() + 200
            while not os.path.exists(sign) and time.time() < deadline:
                time.sleep(0.1)

pl.seed_everything({seed})
smd = SMDCallback(verbose=False)
t = pl.Trainer(max_steps={steps}, logger=pl.loggers.CSVLogger({out!r}, name="", version=""), callbacks=[smd, Overlap()],
               enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=5)
t.fit(Module(SmallConvNet()), loader({seed}))
print("RUN", smd.session.run_id, smd.summary_file)
"""


@pytest.mark.slow
def test_two_processes_writing_one_log_directory_keep_both_summaries(tmp_path):
    """Two overlapping runs given the same log directory: the short one ends while the long one runs (each waits at
    step 10 for the other's sign). Before the fix the later writer silently replaced the earlier one's summary."""
    import subprocess
    import sys
    from pathlib import Path

    tests = str(Path(__file__).parent)

    def start(seed: int, steps: int, long: bool) -> subprocess.Popen:
        code = _RUN.format(tests=tests, seed=seed, steps=steps, long=long, out=str(tmp_path))
        return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    long_run = start(1, 40, True)
    short_run = start(0, 20, False)
    outs = [p.communicate(timeout=280) for p in (short_run, long_run)]
    assert short_run.returncode == 0 and long_run.returncode == 0, [o[1][-2000:] for o in outs]
    (short_id, short_file), (long_id, long_file) = [o[0].split("RUN ")[1].split() for o in outs]
    assert short_file == str(tmp_path / "smd_summary.json")
    assert long_file == str(tmp_path / f"smd_summary-{long_id}.json")
    assert json.loads((tmp_path / "smd_summary.json").read_text())["run_id"] == short_id
    assert json.loads(Path(long_file).read_text())["run_id"] == long_id
    assert "[SMD047]" in outs[1][1] and short_id in outs[1][1]


def test_a_previous_runs_summary_in_the_directory_is_replaced(tmp_path):
    first = fit_smd(tmp_path, Module(SmallConvNet()), 10).smd
    second = fit_smd(tmp_path, Module(SmallConvNet()), 10)
    assert second.smd.summary_file == first.summary_file == str(tmp_path / "smd_summary.json")
    assert json.loads((tmp_path / "smd_summary.json").read_text())["run_id"] == second.smd.session.run_id
    assert not any("[SMD047]" in w for w in second.warnings)
