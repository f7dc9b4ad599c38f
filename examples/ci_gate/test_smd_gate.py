"""A CI gate: this pytest test fails when a short training does not reach its SMD equilibrium.

    pytest examples/ci_gate                         # CI size when SMD_EXAMPLE_FAST=1 (600 steps)

Put a test like this next to your model's tests: a change that breaks normalization (a removed BatchNorm),
weight decay (forgotten in a param group) or the learning-rate schedule makes it fail, with the reason in
the error. ``on_no_equilibrium="raise"`` raises ``EquilibriumNotReachedError`` at the end of fit, after
the summary is written; the same JSON can be re-checked by ``lightning-smd check``.
"""

import os
import sys

import pytorch_lightning as pl
from torch.utils.data import DataLoader

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from quickstart import ConvNet  # noqa: E402

from lightning_smd import SMDCallback  # noqa: E402
from lightning_smd.demo import NoisyTemplates  # noqa: E402


def test_training_reaches_smd_equilibrium(tmp_path):
    fast = os.environ.get("SMD_EXAMPLE_FAST", "") not in ("", "0")
    pl.seed_everything(0, verbose=False)
    # lr*wd large enough that the relaxation time (1-momentum)/(2*lr*wd) is 50 steps
    model = ConvNet(lr=0.2, weight_decay=5e-3, width=8 if fast else 16)
    smd = SMDCallback(on_no_equilibrium="raise", window=100, verbose=False)
    trainer = pl.Trainer(
        max_steps=600 if fast else 1500,
        accelerator="cpu",
        logger=pl.loggers.CSVLogger(str(tmp_path), name="", version=""),
        callbacks=[smd],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, DataLoader(NoisyTemplates(batch_size=64), batch_size=None))  # raises if not reached
    assert smd.summary()["verdict"] == "equilibrium"
