"""Every way Lightning trains: one measurement per real optimizer step, and the weights bit-for-bit
identical with and without the callback wherever the path is deterministic."""

import warnings

import pytest
import pytorch_lightning as pl
import torch
from helpers import Module, PlainConvNet, loader, sgd, trainer
from torch.utils.data import DataLoader, TensorDataset

from lightning_smd import SMDCallback


class StepCounter(pl.Callback):
    """Counts real optimizer steps independently (its own post-hook)."""

    def __init__(self):
        self.steps = 0

    def on_fit_start(self, trainer, pl_module):
        for opt in trainer.optimizers:
            opt.register_step_post_hook(self._count)

    def _count(self, *args):
        self.steps += 1


class WithValidation(Module):
    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", torch.nn.functional.cross_entropy(self(x), y))

    def val_dataloader(self):
        gen = torch.Generator().manual_seed(1)
        return DataLoader(TensorDataset(torch.randn(32, 3, 8, 8, generator=gen), torch.randint(0, 10, (32,), generator=gen)), batch_size=16)


def fixed_data(n=96):
    gen = torch.Generator().manual_seed(0)
    return DataLoader(TensorDataset(torch.randn(n, 3, 8, 8, generator=gen), torch.randint(0, 10, (n,), generator=gen)), batch_size=16)


PATHS = {
    "accumulation": dict(trainer=dict(accumulate_grad_batches=3)),
    "clipping": dict(trainer=dict(gradient_clip_val=0.05)),
    "bf16_mixed": dict(trainer=dict(precision="bf16-mixed")),
    "validation_and_sanity": dict(module=WithValidation, trainer=dict(val_check_interval=5, num_sanity_val_steps=2, limit_val_batches=2)),
    "max_epochs": dict(trainer=dict(max_steps=-1, max_epochs=2), data=fixed_data),
    "early_stopping": dict(
        trainer=dict(max_steps=-1, max_epochs=50),
        data=fixed_data,
        callbacks=lambda: [pl.callbacks.EarlyStopping(monitor="train_loss", patience=0, min_delta=10.0, check_on_train_epoch_end=True)],
    ),
}


def _train(tmp_path, path, with_smd):
    spec = PATHS[path]
    torch.manual_seed(0)
    model = spec.get("module", Module)(PlainConvNet(), optimizer=sgd(lr=0.2, weight_decay=0.01))
    counter = StepCounter()
    smd = SMDCallback(verbose=False)
    callbacks = ([smd] if with_smd else []) + [counter] + (spec["callbacks"]() if "callbacks" in spec else [])
    opts = dict(max_steps=12)
    opts.update(spec.get("trainer", {}))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t = trainer(tmp_path / str(with_smd), callbacks, **opts)
        t.fit(model, (spec.get("data") or loader)())
    return model, smd, counter, t


@pytest.mark.parametrize("path", sorted(PATHS))
def test_loop_path(tmp_path, path):
    model_a, _, counter_a, _ = _train(tmp_path, path, with_smd=False)
    model_b, smd, counter_b, t = _train(tmp_path, path, with_smd=True)
    for (k, a), (_, b) in zip(model_a.state_dict().items(), model_b.state_dict().items()):
        assert torch.equal(a, b), k  # an observer
    s = smd.summary()
    assert counter_b.steps > 0 and s["steps"] == counter_b.steps == counter_a.steps
    assert all(layer["steps"] == counter_b.steps for layer in s["layers"])
    assert s["complete"] is True and len(s["layers"]) == 3
    if path == "accumulation":
        assert counter_b.steps == 12 and t.fit_loop.epoch_loop.batch_progress.total.completed == 36
    if path == "early_stopping":
        assert t.current_epoch < 49  # stopped early, and the summary is complete


class ScaledManual(Module):
    """Manual optimization with a GradScaler (what '16-mixed' does on GPU; Lightning gives the CPU none):
    the gradients of batches 2 and 5 overflow, and the scaler skips those optimizer steps."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.automatic_optimization = False
        self.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)

    def training_step(self, batch, batch_idx):
        x, y = batch
        opt = self.optimizers()
        loss = torch.nn.functional.cross_entropy(self(x), y) * (1e36 if batch_idx in (2, 5) else 1.0)
        opt.zero_grad()
        self.scaler.scale(loss).backward()
        self.scaler.step(opt.optimizer)
        self.scaler.update()


def test_steps_skipped_by_a_grad_scaler_are_not_counted(tmp_path):
    torch.manual_seed(0)
    counter = StepCounter()
    smd = SMDCallback(verbose=False, keep_history=True, use_momentum_buffer=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t = trainer(tmp_path, [smd, counter], max_steps=-1, max_epochs=1, limit_train_batches=10)
        t.fit(ScaledManual(PlainConvNet(), optimizer=sgd(lr=0.2, weight_decay=0.01)), loader())
    assert counter.steps == 8  # 10 batches, 2 skipped
    assert smd.summary()["steps"] == 8
    h = smd.diagnostics.unit_history("net.conv1.weight")
    # the snapshot is not corrupted by a skipped step: every measured step is a real, finite rotation
    assert len(h["angular_update"]) == 8 and (h["angular_update"] > 0).all() and (h["angular_update"] < 1).all()


class NoLog(Module):
    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.cross_entropy(self(x), y)


def test_torch_compiled_lightning_module(tmp_path):
    torch.manual_seed(0)
    model = NoLog(PlainConvNet(), optimizer=sgd(lr=0.2, weight_decay=0.01))
    compiled = torch.compile(model, backend="eager")
    smd = SMDCallback(verbose=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer(tmp_path, [smd], max_steps=6).fit(compiled, loader())
    s = smd.summary()
    assert [layer["name"] for layer in s["layers"]] == ["net.conv1.weight", "net.conv2.weight", "net.conv3.weight"]
    assert s["steps"] == 6


def test_fit_twice_measures_each_fit(tmp_path):
    torch.manual_seed(0)
    model = Module(PlainConvNet(), optimizer=sgd(lr=0.2, weight_decay=0.01))
    smd = SMDCallback(verbose=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer(tmp_path / "a", [smd], max_steps=5).fit(model, loader())
        first = smd.summary()
        trainer(tmp_path / "b", [smd], max_steps=7).fit(model, loader())
    second = smd.summary()
    assert first["steps"] == 5 and second["steps"] == 7
    assert (tmp_path / "a" / "smd_summary.json").exists() and (tmp_path / "b" / "smd_summary.json").exists()


def _observer(tmp_path, make_model, fit_kw=None, **trainer_kw):
    """Train with and without SMDCallback; return both state dicts and the callback."""
    states, smd = [], None
    for with_cb in (False, True):
        torch.manual_seed(0)
        model = make_model()
        callbacks = [SMDCallback(verbose=False)] if with_cb else []
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer(tmp_path / str(with_cb), callbacks, **trainer_kw).fit(model, loader())
        states.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        smd = callbacks[0] if callbacks else smd
    return states, smd


@pytest.mark.parametrize("kind", ["manual_two_optimizers", "grad_scaler", "compiled"])
def test_observer_on_manual_scaled_and_compiled_paths(tmp_path, kind):
    from test_edge_cases import GAN

    makers = {
        "manual_two_optimizers": GAN,
        "grad_scaler": lambda: ScaledManual(PlainConvNet(), optimizer=sgd(lr=0.2, weight_decay=0.01)),
        "compiled": lambda: torch.compile(NoLog(PlainConvNet(), optimizer=sgd(lr=0.2, weight_decay=0.01)), backend="eager"),
    }
    # the scaler steps the raw optimizer, which Lightning's step counter does not see: bound by batches
    (a, b), smd = _observer(tmp_path, makers[kind], max_steps=-1, max_epochs=1, limit_train_batches=10)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert smd.summary()["steps"] > 0
