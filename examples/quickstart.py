"""Quickstart: watch a BatchNorm ConvNet reach its Spherical Motion Dynamics equilibrium on CPU.

    python examples/quickstart.py                      # full size: 2,000 steps, ~35 s on 2 cores
    SMD_EXAMPLE_FAST=1 python examples/quickstart.py   # CI size: 800 steps of a narrower net, ~7 s
    python examples/quickstart.py --schedule cosine    # 100 warm-up steps, then cosine to 0

The task is a noisy synthetic classification problem that draws a *fresh* batch every step and flips
20 % of the labels, so the gradient noise never vanishes — the regime SMD describes. (A data set the
network can memorize drives the loss, and with it the gradient noise, to zero: then the weight norms
shrink geometrically and no equilibrium is reached. See the README's FAQ.)

With SGD (lr 0.1, momentum 0.9, weight decay 5e-3) the predicted equilibrium angular update of every
convolution is sqrt(2·lr·wd/(1+momentum)) = 0.0229 rad/step and the relaxation time
(1−momentum)/(2·lr·wd) = 100 steps. The callback logs measured vs predicted values to CSV and prints a
table and a verdict at the end; the summary JSON lands next to the CSV file.

What you should see, in both sizes: every convolution's smoothed Δ/Δ* within a few per cent of 1 from about
step 200 on, weight norms near the predicted ones, and the verdict ``equilibrium``.

With ``--schedule cosine`` the equilibrium moves with the learning rate: the schedule is read at fit start, a
forecast is printed after the first log steps, and each layer is judged against its trajectory Δ̂ (the moving
equilibrium it can follow): Δ follows Δ̂ through the decay while Δ/Δ* falls far below 1 in the tail, where the
schedule outruns the layer (the freeze-out). The verdict is ``equilibrium`` too.
"""

from __future__ import annotations

import argparse
import math
import os
import time

import pytorch_lightning as pl
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader

from lightning_smd import SMDCallback, param_groups
from lightning_smd.demo import NoisyTemplates


class ConvNet(pl.LightningModule):
    def __init__(self, lr: float = 0.1, momentum: float = 0.9, weight_decay: float = 5e-3, width: int = 32, schedule: str = "constant", steps: int = 2000):
        super().__init__()
        self.save_hyperparameters()
        w = width
        self.conv1 = nn.Conv2d(3, w, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(w)
        self.conv2 = nn.Conv2d(w, 2 * w, 3, padding=1, stride=2, bias=False)
        self.bn2 = nn.BatchNorm2d(2 * w)
        self.conv3 = nn.Conv2d(2 * w, 4 * w, 3, padding=1, stride=2, bias=False)
        self.bn3 = nn.BatchNorm2d(4 * w)
        self.fc = nn.Linear(4 * w, 10)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        x = F.relu(self.bn3(self.conv3(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        h = self.hparams
        # weight decay on the weights, none on BatchNorm's gains and shifts nor on the biases (SMD038 tells when they are)
        opt = torch.optim.SGD(param_groups(self, weight_decay=h.weight_decay), lr=h.lr, momentum=h.momentum)
        if h.schedule == "constant":
            return opt
        warm = 100  # then cosine to 0 at the last step
        cosine = lambda t: (t + 1) / warm if t < warm else 0.5 * (1.0 + math.cos(math.pi * (t - warm) / max(h.steps - warm, 1)))  # noqa: E731
        return {"optimizer": opt, "lr_scheduler": {"scheduler": torch.optim.lr_scheduler.LambdaLR(opt, cosine), "interval": "step"}}


def main(argv: list[str] | None = None) -> dict:
    fast = os.environ.get("SMD_EXAMPLE_FAST", "") not in ("", "0")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=800 if fast else 2000)
    parser.add_argument("--out", default="smd_runs/quickstart_fast" if fast else "smd_runs/quickstart", help="log directory")
    parser.add_argument("--width", type=int, default=16 if fast else 32, help="channels of the first conv")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--schedule", choices=("constant", "cosine"), default="constant", help="cosine: 100 warm-up steps, then cosine to 0")
    parser.add_argument("--accelerator", default="cpu", help="Lightning's accelerator (benchmarks/gpu_check.py runs it on cuda)")
    args = parser.parse_args(argv)

    pl.seed_everything(args.seed, verbose=False)
    smd = SMDCallback()
    trainer = pl.Trainer(
        max_steps=args.steps,
        accelerator=args.accelerator,
        devices=1,
        logger=pl.loggers.CSVLogger(args.out, name="", version=""),
        callbacks=[smd],
        log_every_n_steps=25,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    start = time.perf_counter()
    model = ConvNet(width=args.width, schedule=args.schedule, steps=args.steps)
    trainer.fit(model, DataLoader(NoisyTemplates(seed=args.seed), batch_size=None))
    summary = smd.summary()
    print(
        f"\n{args.steps} steps in {time.perf_counter() - start:.1f} s; "
        f"metrics: {os.path.join(os.path.normpath(trainer.logger.log_dir), 'metrics.csv')}; summary: {smd.summary_file}"
    )
    return summary


if __name__ == "__main__":
    main()
