"""On a CUDA device: the step path never synchronizes the host (``torch.cuda.set_sync_debug_mode("error")``
turns any synchronization into an error), and its results match the CPU's. Skipped without CUDA; the CPU
counterpart is ``test_measure.py::test_no_host_sync_between_log_steps``."""

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from helpers import Module, SmallConvNet, loader, sgd, trainer

from lightning_smd import SMDCallback

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

LOG_EVERY = 5


class SyncGuard(pl.Callback):
    """Errors on any host synchronization from right before the optimizer's own step (after Lightning's
    closure and GradScaler's inf check, which synchronize by design) to the end of the SMD callback's
    batch-end hook, on steps away from a log step. Placed before and after SMDCallback in the list."""

    def __init__(self, role: str) -> None:
        self.role = role
        self.guarded = 0

    def on_train_start(self, trainer, pl_module):
        if self.role == "open":  # registered after SMDCallback attached: runs after its hooks
            for opt in trainer.optimizers:
                opt.register_step_pre_hook(lambda *args, t=trainer: self._open(t))

    def _open(self, trainer):
        # steps whose batch end might log (whatever the off-by-one of the step counter) are left alone
        if trainer.global_step > 1 and trainer.global_step % LOG_EVERY not in (LOG_EVERY - 2, LOG_EVERY - 1, 0):
            torch.cuda.set_sync_debug_mode("error")
            self.guarded += 1

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.role == "close":
            torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("momentum", [0.9, 0.0], ids=["momentum_buffer", "snapshot"])
@pytest.mark.parametrize("precision", ["32-true", "16-mixed", "bf16-mixed"])
def test_no_host_sync_on_cuda(tmp_path, momentum, precision):
    torch.manual_seed(0)
    opened, closed = SyncGuard("open"), SyncGuard("close")
    smd = SMDCallback(verbose=False, log_every_n_steps=LOG_EVERY)
    # Lightning runs callbacks in list order: the guard opens before SMD's hooks and closes after them
    t = trainer(tmp_path, [opened, smd, closed], max_steps=23, accelerator="cuda", precision=precision, log_every_n_steps=LOG_EVERY)
    try:
        t.fit(Module(SmallConvNet(), optimizer=sgd(momentum=momentum)), loader())
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert opened.guarded >= 6
    assert smd.summary()["steps"] == 23


def test_cuda_statistics_match_the_cpu(tmp_path):
    """The foreach float64 norms of the accelerator path against the CPU dot path, same training."""
    runs = {}
    for device in ("cpu", "cuda"):
        torch.manual_seed(0)
        smd = SMDCallback(verbose=False, keep_history=True)
        t = trainer(tmp_path / device, [smd], max_steps=12, accelerator=device, precision="64-true")
        t.fit(Module(SmallConvNet(), optimizer=sgd(momentum=0.9)), loader(dtype=torch.float64))
        runs[device] = smd.diagnostics.unit_history("net.conv1.weight")
    np.testing.assert_allclose(runs["cuda"]["weight_norm"], runs["cpu"]["weight_norm"], rtol=1e-7)
    np.testing.assert_allclose(runs["cuda"]["angular_update"], runs["cpu"]["angular_update"], rtol=1e-5)
