"""The rows of the fault and bad-input matrix (docs/reliability.md) that no other test file covers: unusual
models, optimizers and Trainer set-ups, interruptions, I/O faults and CLI inputs. Each test drives the case the
way a user meets it (a real Trainer, a real file, a real subprocess) and asserts what happens, what the user
reads and what is kept."""

from __future__ import annotations

import errno
import json
import math
import sys

import pytest
import pytorch_lightning as pl
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

from helpers import Module, SmallConvNet, fit_smd, loader, run_python, trainer
from lightning_smd import SMDCallback
from lightning_smd.io.cli import main as cli


def _summary(path) -> dict:
    return json.loads(open(path).read())


# ---------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------
class DictOut(nn.Module):
    """A model whose forward returns a dict (as Hugging Face models do)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = SmallConvNet()

    def forward(self, x):
        return {"logits": self.net(x), "aux": x.mean()}


class TupleOut(DictOut):
    def forward(self, x):
        out = super().forward(x)
        return out["logits"], out["aux"]


class StructuredModule(Module):
    """``training_step`` returns ``{"loss": ...}``; the model's output is a dict or a tuple."""

    def training_step(self, batch, batch_idx):
        x, y = batch
        out = self(x)
        logits = out["logits"] if isinstance(out, dict) else out[0]
        return {"loss": F.cross_entropy(logits, y)}


@pytest.mark.parametrize("net", [DictOut, TupleOut], ids=["dict", "tuple"])
def test_dict_and_tuple_outputs_are_measured(tmp_path, net):
    fit = fit_smd(tmp_path, StructuredModule(net()), 12)
    summary = fit.smd.summary()
    assert [r["name"] for r in summary["layers"]] == ["net.net.conv1.weight", "net.net.conv2.weight", "net.net.conv3.weight"]
    assert all(r["steps"] == 12 for r in summary["layers"]) and summary["training_loss"]["last"] is not None


class Checkpointed(nn.Module):
    """Activation checkpointing inside forward (torch.utils.checkpoint)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = SmallConvNet()

    def forward(self, x):
        n = self.net
        x = checkpoint(lambda t: F.relu(n.bn1(n.conv1(t))), x, use_reentrant=False)
        x = F.max_pool2d(F.relu(n.bn2(n.conv2(x))), 2)
        x = n.bn3(F.max_pool2d(F.relu(n.conv3(x)), 2))
        return n.fc(torch.flatten(F.adaptive_avg_pool2d(F.relu(x), 1), 1))


def test_activation_checkpointing_is_measured(tmp_path):
    """The recomputed forward pass changes nothing: 3 layers measured every step, the numerical check passes (|cos(g,
    w)| 6e-6 to 2e-4 here, as without checkpointing; the warning threshold is 1e-2) and no warning about it."""
    pl.seed_everything(0)
    fit = fit_smd(tmp_path, Module(Checkpointed()), 12)
    layers = fit.smd.summary()["layers"]
    assert len(layers) == 3 and all(r["steps"] == 12 and r["verification"] is not None for r in layers)
    assert not any(code in w for w in fit.warnings for code in ("[SMD010]", "[SMD011]", "[SMD012]"))


class UnfreezeAt(pl.Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            pl_module.net.conv1.weight.requires_grad_(True)


def test_a_layer_unfrozen_mid_run_is_named_as_not_measured(tmp_path):
    """Detection runs at fit start: a frozen conv is left out then. Unfreezing it later is told at the end
    (SMD017), instead of the layer silently missing from the table."""
    model = Module(SmallConvNet())
    model.net.conv1.weight.requires_grad_(False)
    fit = fit_smd(tmp_path, model, 20, callbacks=[UnfreezeAt(5)])
    assert "net.conv1.weight" not in [r["name"] for r in fit.smd.summary()["layers"]]
    assert any("[SMD017]" in w and "net.conv1.weight" in w for w in fit.warnings)


def test_clipping_every_gradient_to_almost_zero_is_measured_not_faulted(tmp_path):
    """A clip norm of 1e-12 makes every update (but the weight decay) vanish: the angular update is then tiny and
    finite, nothing diverges, and the verdict is an honest not_reached."""
    fit = fit_smd(tmp_path, Module(SmallConvNet()), 20, trainer_kw={"gradient_clip_val": 1e-12})
    summary = fit.smd.summary()
    assert summary["verdict"] == "not_reached" and summary["diverged_at_step"] is None
    assert all(r["angular_update"] is not None and r["angular_update"] < 1e-6 for r in summary["layers"])


class LazyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.LazyConv2d(8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.LazyLinear(10)

    def forward(self, x):
        return self.fc(F.relu(self.bn(self.conv(x))).mean((2, 3)))


class CrashAtOnce(Module):
    def training_step(self, batch, batch_idx):
        raise RuntimeError("broken data loader")


def test_a_lazy_model_that_crashes_on_its_first_batch_still_leaves_a_summary(tmp_path):
    """Detection of a lazy model waits for the first batch; a crash before it left no summary at all before the fix
    (so `check` said 'no such file' instead of 'did not complete')."""
    with pytest.raises(RuntimeError, match="broken data loader"):
        fit_smd(tmp_path, CrashAtOnce(LazyNet()), 20)
    summary = _summary(tmp_path / "smd_summary.json")
    assert summary["complete"] is False and "broken data loader" in summary["error"]
    assert summary["verdict"] == "not_applicable" and "before its first training batch" in summary["reason"]
    assert cli(["check", str(tmp_path)]) == 1


# ---------------------------------------------------------------------------------------------
# Optimizers
# ---------------------------------------------------------------------------------------------
class MySGD(torch.optim.SGD):
    """A subclass that only adds a counter: it keeps SGD's update, so SGD's theory applies."""

    def step(self, closure=None):
        self.calls = getattr(self, "calls", 0) + 1
        return super().step(closure)


class SignDescent(torch.optim.Optimizer):
    """A hand-written optimizer no rule is registered for."""

    def __init__(self, params, lr=0.01, weight_decay=1e-3):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            with torch.enable_grad():
                closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.mul_(1 - group["lr"] * group["weight_decay"]).add_(p.grad.sign(), alpha=-group["lr"])


def test_an_sgd_subclass_gets_sgds_theory(tmp_path):
    fit = fit_smd(tmp_path, Module(SmallConvNet(), optimizer=lambda p: MySGD(p, lr=0.1, momentum=0.9, weight_decay=5e-3)), 12)
    rows = fit.smd.summary()["layers"]
    assert {r["rule"] for r in rows} == {"SGD"} and all(r["predicted_angular_update"] > 0 for r in rows)


def test_a_hand_written_optimizer_is_measured_and_not_judged(tmp_path):
    fit = fit_smd(tmp_path, Module(SmallConvNet(), optimizer=SignDescent), 12)
    summary = fit.smd.summary()
    assert summary["verdict"] == "not_applicable"
    assert any("[SMD004]" in w and "SignDescent" in w for w in fit.warnings)
    assert all(r["angular_update"] is not None and r["state"] == "no_prediction" for r in summary["layers"])


class LBFGSModule(Module):
    def configure_optimizers(self):
        return torch.optim.LBFGS(self.parameters(), lr=0.1, max_iter=3)


def test_lbfgs_is_measured_once_per_step_and_not_judged(tmp_path):
    """LBFGS evaluates the closure several times per step; the callback still records one row per optimizer step."""
    fit = fit_smd(tmp_path, LBFGSModule(SmallConvNet()), 8)
    summary = fit.smd.summary()
    assert summary["verdict"] == "not_applicable" and any("[SMD004]" in w for w in fit.warnings)
    assert all(r["steps"] == 8 for r in summary["layers"])


# ---------------------------------------------------------------------------------------------
# Trainer set-ups
# ---------------------------------------------------------------------------------------------
def test_max_steps_one_is_an_honest_not_reached(tmp_path):
    fit = fit_smd(tmp_path, Module(SmallConvNet()), 1)
    summary = _summary(tmp_path / "smd_summary.json")
    assert summary["verdict"] == "not_reached" and summary["steps"] == 1 and summary["complete"] is True
    assert any("[SMD003]" in w for w in fit.warnings)  # a real run this short is worth a word (unlike fast_dev_run)


class EvalModule(Module):
    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", F.cross_entropy(self(x), y))

    def test_step(self, batch, batch_idx):
        return self.validation_step(batch, batch_idx)

    def predict_step(self, batch, batch_idx):
        return self(batch[0])


def test_validate_test_and_predict_with_the_callback_attached_measure_nothing_and_keep_the_fit_summary(tmp_path):
    smd = SMDCallback(verbose=False)
    t = trainer(tmp_path, [smd], max_steps=10, limit_val_batches=2, limit_test_batches=2, limit_predict_batches=2)
    model = EvalModule(SmallConvNet())
    t.fit(model, loader(), loader(1))
    after_fit = _summary(smd.summary_file)
    t.validate(model, loader(1))
    t.test(model, loader(1))
    assert len(t.predict(model, loader(1))) == 2
    assert _summary(smd.summary_file) == after_fit and smd.summary()["steps"] == 10


def test_a_checkpoint_with_the_callbacks_state_resumes_into_a_trainer_without_it(tmp_path):
    smd = SMDCallback(verbose=False)
    t = trainer(tmp_path / "a", [smd], max_steps=10)
    t.fit(Module(SmallConvNet()), loader())
    t.save_checkpoint(str(tmp_path / "c.ckpt"))
    plain = trainer(tmp_path / "b", [], max_steps=20)
    plain.fit(Module(SmallConvNet()), loader(), ckpt_path=str(tmp_path / "c.ckpt"))
    assert plain.global_step == 20  # the callback's state in the checkpoint is ignored, training is unaffected


def test_a_warm_up_from_a_learning_rate_of_zero_is_not_stopped_for_it(tmp_path):
    """A linear warm-up starting at lr = 0: the stop gate must not read the first steps as 'no equilibrium'. It
    stops this 60-step run once the warm-up is over, for the right reason: too few steps left."""
    sched = lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, s / 20))  # noqa: E731
    fit = fit_smd(tmp_path, Module(SmallConvNet(), scheduler=sched), 60, on_no_equilibrium="stop")
    reason = fit.smd.summary()["stopped_early"]
    assert fit.trainer.global_step > 20 and "remaining steps" in reason and "learning rate" not in reason


class EvalBN(Module):
    def on_train_epoch_start(self):
        for m in self.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.eval()


def test_batchnorm_left_in_eval_mode_is_named_as_the_cause(tmp_path):
    """Before the fix SMD011 blamed 'an explicit L2 penalty in the loss, a hook, a path around the normalization'."""
    fit = fit_smd(tmp_path, EvalBN(SmallConvNet()), 10)
    assert any("[SMD016]" in w and "eval mode" in w and "net.bn1" in w for w in fit.warnings)
    assert not any("[SMD011]" in w for w in fit.warnings)


# ---------------------------------------------------------------------------------------------
# Interruptions
# ---------------------------------------------------------------------------------------------
class InterruptAt(pl.Callback):
    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step == 7:
            raise KeyboardInterrupt


def test_keyboard_interrupt_leaves_an_incomplete_summary(tmp_path):
    """Lightning shuts down gracefully on Ctrl-C (and exits with status 1); the summary is written first."""
    with pytest.raises((SystemExit, KeyboardInterrupt)):
        fit_smd(tmp_path, Module(SmallConvNet()), 50, callbacks=[InterruptAt()])
    summary = _summary(tmp_path / "smd_summary.json")
    assert summary["complete"] is False and summary["error"] == "KeyboardInterrupt: interrupted (Ctrl-C)"
    assert summary["steps"] == 7 and len(summary["layers"]) == 3


_SIGTERM = """
import os, signal, sys
sys.path.insert(0, {tests!r})
import pytorch_lightning as pl
from helpers import Module, SmallConvNet, loader, trainer
from lightning_smd import SMDCallback

class Term(pl.Callback):
    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step == 9:
            os.kill(os.getpid(), signal.SIGTERM)

trainer({out!r}, [SMDCallback(verbose=False), Term()], max_steps=200).fit(Module(SmallConvNet()), loader())
"""


@pytest.mark.skipif(sys.platform == "win32", reason="SIGTERM semantics")
def test_sigterm_in_a_subprocess_leaves_an_incomplete_summary(tmp_path):
    from pathlib import Path

    # Lightning's handler turns SIGTERM into a SIGTERMException (a SystemExit: the exit status is its own business)
    run_python(["-c", _SIGTERM.format(tests=str(Path(__file__).parent), out=str(tmp_path))], check=False)
    summary = _summary(tmp_path / "smd_summary.json")
    assert summary["complete"] is False and 9 <= summary["steps"] < 200
    assert summary["error"].startswith("SIGTERMException: the process received SIGTERM")


# ---------------------------------------------------------------------------------------------
# I/O
# ---------------------------------------------------------------------------------------------
def test_a_summary_path_under_a_file_warns_and_training_finishes(tmp_path):
    """A regular file where the summary's directory should be: unwritable even for root (NotADirectoryError)."""
    (tmp_path / "blocker").write_text("x")
    fit = fit_smd(tmp_path, Module(SmallConvNet()), 10, summary_path=tmp_path / "blocker" / "s.json")
    assert fit.trainer.global_step == 10 and fit.smd.summary_file is None
    assert any("[SMD042]" in w for w in fit.warnings)
    assert any("[SMD042]" in w for w in fit.smd.summary()["warnings"])  # kept in memory for the caller


def test_a_summary_path_that_is_a_directory_warns_and_training_finishes(tmp_path):
    (tmp_path / "occupied").mkdir()
    fit = fit_smd(tmp_path, Module(SmallConvNet()), 10, summary_path=tmp_path / "occupied")
    assert fit.trainer.global_step == 10 and fit.smd.summary_file is None
    assert any("[SMD042]" in w for w in fit.warnings) and (tmp_path / "occupied").is_dir()


def test_a_full_disk_warns_and_leaves_no_temporary_file(tmp_path, monkeypatch):
    import lightning_smd.io.report as report

    real = report.json.dump

    def full(obj, fh, **kw):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(report.json, "dump", full)
    fit = fit_smd(tmp_path, Module(SmallConvNet()), 10)
    monkeypatch.setattr(report.json, "dump", real)
    assert fit.trainer.global_step == 10 and any("[SMD042]" in w and "No space left" in w for w in fit.warnings)
    assert not list(tmp_path.glob(".smd_summary.*.tmp")) and not (tmp_path / "smd_summary.json").exists()


def test_a_second_fit_whose_summary_cannot_be_written_does_not_name_the_firsts(tmp_path):
    smd = SMDCallback(verbose=False, summary_path=tmp_path / "s.json")
    t = trainer(tmp_path, [smd], max_steps=5)
    model = Module(SmallConvNet())
    t.fit(model, loader())
    assert smd.summary_file == str(tmp_path / "s.json")
    (tmp_path / "s.json").unlink()
    (tmp_path / "s.json").mkdir()  # the path is now occupied
    t.fit_loop.epoch_loop.max_steps = 10
    t.fit(model, loader())
    assert smd.summary_file is None


# ---------------------------------------------------------------------------------------------
# CLI inputs
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("content", ["", "   \n", '{"verdict": "equilibrium", "layers": [', "[1, 2"], ids=["empty", "blank", "truncated", "truncated-list"])
@pytest.mark.parametrize("command", ["check", "report"])
def test_empty_and_truncated_summaries_are_bad_input(tmp_path, capsys, content, command):
    (tmp_path / "smd_summary.json").write_text(content)
    assert cli([command, str(tmp_path / "smd_summary.json")]) == 2
    err = capsys.readouterr().err
    assert "smd_summary.json" in err and "Traceback" not in err


@pytest.mark.parametrize("command", ["check", "report"])
def test_a_missing_summary_is_bad_input(tmp_path, capsys, command):
    assert cli([command, str(tmp_path / "nowhere.json")]) == 2
    assert "nowhere.json" in capsys.readouterr().err


def test_plot_of_a_csv_without_smd_columns_is_bad_input(tmp_path, capsys):
    (tmp_path / "metrics.csv").write_text("step,train_loss\n0,2.3\n1,2.2\n")
    assert cli(["plot", str(tmp_path), "-o", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert "no smd/* metrics" in err and not (tmp_path / "x.png").exists()


def test_the_large_csv_benchmark_runs_and_prints_its_figures(tmp_path):
    """benchmarks/plot_large.py times `lightning-smd plot` on a generated metrics.csv (10^6 rows by default);
    here at 2,000 rows, to see that it runs and what it prints."""
    proc = run_python(["benchmarks/plot_large.py", "--rows", "2000", "--dir", str(tmp_path)])
    assert "rows" in proc.stdout and "plot:" in proc.stdout and math.isfinite(float(proc.stdout.split("plot:")[1].split()[0]))


def test_a_long_series_is_thinned_for_drawing_keeping_its_extremes():
    """Row 79: a line is drawn through at most 4,000 points, the smallest and largest of each bucket in step
    order, so a one-step spike and the series' range survive, and a gap is not bridged."""
    import numpy as np

    from lightning_smd.io.plot import _MAX_POINTS, _thin

    steps = np.arange(1_000_003)
    values = np.sin(steps / 5_000.0)
    values[123_457] = 50.0  # a spike
    values[600_000:700_000] = np.nan  # a gap (a run resumed later)
    s, v = _thin(steps, values)
    assert len(s) <= _MAX_POINTS and np.all(np.diff(s) > 0)
    assert 123_457 in s and np.nanmax(v) == 50.0 and np.nanmin(v) == np.nanmin(values)
    gap = (s >= 600_000) & (s < 700_000)
    assert gap.any() and np.isnan(v[gap]).all()  # the gap keeps nan points, so the line breaks there
    short = np.arange(10.0)
    assert _thin(short, short)[0] is short  # short series: untouched


def test_a_continuous_schedule_draws_no_line_per_step():
    """A cosine schedule changes the learning rate at every step: no vertical line per step (20,000 lines made
    a 20,000-row plot take 89 s); a step schedule's two changes are drawn."""
    import numpy as np

    from lightning_smd.io.plot import _lr_changes

    steps = np.arange(0, 2_000, 2)
    norm = np.full(len(steps), 3.0)
    cosine = 0.5 * (1 + np.cos(np.pi * steps / 2_000)) * 0.1 / 9.0
    stepped = np.where(steps < 600, 0.1, np.where(steps < 1_200, 0.01, 0.001)) / 9.0
    layer = "smd/net.conv1.weight/"
    assert _lr_changes({layer + "effective_lr": (steps, cosine), layer + "weight_norm": (steps, norm)}, "net.conv1.weight") == []
    assert _lr_changes({layer + "effective_lr": (steps, stepped), layer + "weight_norm": (steps, norm)}, "net.conv1.weight") == [600, 1200]


def test_csv_cells_that_are_empty_unparsable_short_or_repeated_are_read_as_a_user_expects(tmp_path):
    """The chunked reader: an empty or unparsable cell is no point, a short row is padded, a repeated step keeps
    its last value, a row without a step is skipped; across a chunk boundary nothing is lost."""
    import lightning_smd.io.plot as plot

    lines = ["step,smd/a/angular_update,smd/a/weight_norm,train_loss"]
    lines += [f"{i},{0.01 * i},{1 + i},2.0" for i in range(7)]
    lines += ["3,,,1.0", "4,oops,9.5,1.0", "5,0.5", ",0.9,0.9,0.9", "2,0.77,7.7,1.0"]
    (tmp_path / "metrics.csv").write_text("\n".join(lines) + "\n")
    old = plot._CSV_CHUNK
    try:
        plot._CSV_CHUNK = 4  # several chunks
        series, _ = plot.load_series(str(tmp_path))
    finally:
        plot._CSV_CHUNK = old
    s, d = series["smd/a/angular_update"]
    assert s.tolist() == [0, 1, 2, 3, 4, 5, 6]
    assert d.tolist() == pytest.approx([0.0, 0.01, 0.77, 0.03, 0.04, 0.5, 0.06])  # step 2 re-logged; 3, 4 kept
    s, n = series["smd/a/weight_norm"]
    assert dict(zip(s.tolist(), n.tolist())) == {0: 1, 1: 2, 2: 7.7, 3: 4, 4: 9.5, 5: 6, 6: 7}
    assert "train_loss" not in series
