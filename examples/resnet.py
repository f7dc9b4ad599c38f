"""A ResNet-18-style BatchNorm network, ready for a GPU: SGD with momentum, a learning-rate drop, mixed precision.

    python examples/resnet.py                          # full size: ResNet-18 (width 64, batch 128, 16-mixed) on a GPU,
                                                       # width 16 and batch 64 on CPU; 4,000 steps
    python examples/resnet.py --devices 4 --strategy ddp --steps 20000
    SMD_EXAMPLE_FAST=1 python examples/resnet.py       # CI size: two stages of one block, 1,200 steps on CPU

Synthetic CIFAR-sized data (no download): replace ``NoisyTemplates`` with your DataLoader. SGD (lr 0.1,
momentum 0.9) decays the conv weights only: weight decay on BatchNorm's scale shrinks whole branches (with it, in
a 900-step run of the CI size, the last shortcut conv sat steady at about 0.6x the prediction, its effective
learning rate over 30x the others'). At a third of the run the learning rate drops x0.2, so the relaxation time (1-momentum)/(2·lr·wd)
grows 5x: 50 -> 250 steps at the full size (wd 1e-2), 20 -> 100 at the CI size (wd 2.5e-2).

What you should see, in both sizes: every conv layer in equilibrium before the drop; at the drop the
prediction falls by sqrt(5) and the angular updates follow it, lagging (each layer's re-equilibration, observed
against expected, is in the summary's ``reequilibrations``); at the end, every layer in equilibrium again and
the verdict ``equilibrium``. (A classic x0.1 drop at 50 % and 75 % of a short run leaves the last stage shorter
than 4 of its relaxation times: the verdict says ``not_reached``, and rightly.) ``--plot smd.png`` draws the run.
"""

from __future__ import annotations

import argparse
import os

import pytorch_lightning as pl
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader

from lightning_smd import SMDCallback
from lightning_smd.demo import NoisyTemplates, decayed_groups


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)
        self.conv2, self.bn2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))) + self.shortcut(x))


class ResNet(pl.LightningModule):
    def __init__(self, width: int = 64, blocks: tuple[int, ...] = (2, 2, 2, 2), lr: float = 0.1, weight_decay: float = 1e-2, steps: int = 4000) -> None:
        super().__init__()
        self.save_hyperparameters()
        layers: list[nn.Module] = [nn.Conv2d(3, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU()]
        c = width
        for stage, n in enumerate(blocks):
            for i in range(n):
                layers.append(BasicBlock(c, width * 2**stage, 2 if stage and not i else 1))
                c = width * 2**stage
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(c, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(self.features(x), 1), 1))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        h = self.hparams
        # weight decay on the conv weights only: decaying BatchNorm's scale would shrink whole branches
        opt = torch.optim.SGD(decayed_groups(self, h.weight_decay), lr=h.lr, momentum=0.9)
        # one drop, x0.2 at a third of the run: the relaxation time grows 5x, and the last stage still holds
        # 4 of the new relaxation times (a x0.1 drop at 50 % and 75 % would leave the last stage far too short)
        sched = torch.optim.lr_scheduler.MultiStepLR(opt, [h.steps // 3], 0.2)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def main(argv: list[str] | None = None) -> dict:
    fast = os.environ.get("SMD_EXAMPLE_FAST", "") not in ("", "0")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    gpu = torch.cuda.is_available() and not fast
    parser.add_argument("--steps", type=int, default=1200 if fast else 4000)
    parser.add_argument("--width", type=int, default=64 if gpu else 16, help="channels of the first stage")
    parser.add_argument("--batch", type=int, default=32 if fast else 128 if gpu else 64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--devices", default="auto")
    parser.add_argument("--strategy", default="auto")
    parser.add_argument("--out", default="smd_runs/resnet")
    parser.add_argument("--plot", default=None, help="also draw the run into this image")
    args = parser.parse_args(argv)
    pl.seed_everything(args.seed, verbose=False)
    # relaxation time (1 - momentum) / (2 * lr * weight_decay): 50 steps, then 250 after the drop (full size);
    # 20, then 100 (CI size)
    model = ResNet(width=args.width, blocks=(1, 1) if fast else (2, 2, 2, 2), weight_decay=2.5e-2 if fast else 1e-2, steps=args.steps)
    smd = SMDCallback()
    trainer = pl.Trainer(
        max_steps=args.steps,
        accelerator="gpu" if gpu else "cpu",
        devices=args.devices if gpu else 1,
        strategy=args.strategy,
        precision="16-mixed" if gpu else "32-true",
        logger=pl.loggers.CSVLogger(args.out, name="", version=""),
        callbacks=[smd],
        log_every_n_steps=10,
        enable_checkpointing=False,
        enable_progress_bar=not fast,
    )
    data = DataLoader(NoisyTemplates(batch_size=args.batch, size=32, seed=args.seed), batch_size=None)
    trainer.fit(model, data)
    if args.plot and trainer.is_global_zero:
        from lightning_smd.io.plot import plot_run

        print(plot_run(args.out, args.plot))
    return smd.summary()


if __name__ == "__main__":
    main()
