"""A CI gate: this pytest test fails when a short training does not reach its SMD equilibrium.

    pytest examples/ci_gate                         # 1,600 steps (CI size when SMD_EXAMPLE_FAST=1: the same)

Put a test like this next to your model's tests: a change that breaks normalization (a removed BatchNorm),
weight decay (forgotten in a param group) or the learning-rate schedule makes it fail, with the reason in
the error. ``on_no_equilibrium="raise"`` raises ``EquilibriumNotReachedError`` at the end of fit, after
the summary is written; the same JSON can be re-checked by ``lightning-smd check``.

The model, data and settings are the healthy cell of ``benchmarks/verdict_reliability.py`` (SGD with momentum
on :class:`lightning_smd.demo.HeadNet`, a persistent-noise :class:`~lightning_smd.demo.TeacherStream`): over
20 seeds every layer ended steady with margins to spare (``docs/verdict_reliability.md``). Train your own
model long enough: the verdict needs 4 relaxation times of unchanged settings, and twice that to judge well.
"""

import pytorch_lightning as pl
import torch
from torch.nn import functional as F
from torch.utils.data import DataLoader

from lightning_smd import SMDCallback
from lightning_smd.demo import HeadNet, TeacherStream, decayed_groups


class Classifier(pl.LightningModule):
    def __init__(self, lr: float = 0.1, weight_decay: float = 2.5e-3) -> None:
        super().__init__()
        self.net, self.lr, self.weight_decay = HeadNet(), lr, weight_decay

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        # relaxation time (1 - momentum) / (2 * lr * weight_decay) = 200 steps
        return torch.optim.SGD(decayed_groups(self.net, self.weight_decay), lr=self.lr, momentum=0.9)


def test_training_reaches_smd_equilibrium(tmp_path):
    pl.seed_everything(0, verbose=False)
    smd = SMDCallback(on_no_equilibrium="raise", verbose=False)
    trainer = pl.Trainer(
        max_steps=1600,
        accelerator="cpu",
        logger=pl.loggers.CSVLogger(str(tmp_path), name="", version=""),
        callbacks=[smd],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    model = Classifier(weight_decay=2.5e-3)
    trainer.fit(model, DataLoader(TeacherStream(HeadNet.input_shape), batch_size=None))  # raises if not reached
    assert smd.summary()["verdict"] == "equilibrium"
