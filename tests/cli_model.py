"""A LightningModule and a DataModule with typed constructors, for the LightningCLI test."""

import pytorch_lightning as pl
import torch
from helpers import SmallConvNet, loader
from torch.nn import functional as F


class CLIModel(pl.LightningModule):
    def __init__(self, lr: float = 0.1, weight_decay: float = 5e-3) -> None:
        super().__init__()
        self.lr, self.weight_decay = lr, weight_decay
        self.net = SmallConvNet()

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9, weight_decay=self.weight_decay)


class CLIData(pl.LightningDataModule):
    def train_dataloader(self):
        return loader()
