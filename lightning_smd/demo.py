"""Data streams whose gradient noise never vanishes, and two small normalized networks, for examples, tests
and benchmarks.

Spherical Motion Dynamics describes training with persistent gradient noise. A data set the network can
memorize drives the loss — and the gradient noise — to zero, and then no equilibrium is reached (the
weight norms shrink geometrically instead, or the run turns unstable). Two streams avoid that:

- :class:`NoisyTemplates`: freshly drawn noisy images of a few class templates, a share of the labels
  flipped at random;
- :class:`TeacherStream`: fresh Gaussian inputs labelled by a fixed random teacher network, a share of the
  labels flipped. The network can learn the teacher, never the flips, so the noise persists. With
  ``memorize=n`` it instead cycles through ``n`` fixed samples without label noise: a data set the network
  memorizes (the unhealthy case).

:class:`ThinConvNet` (a first convolution with one input channel: 144 weights) and :class:`HeadNet` (a
``Linear → BatchNorm1d`` head) are the two architectures of ``benchmarks/verdict_reliability.py``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import IterableDataset

__all__ = ["NoisyTemplates", "TeacherStream", "ThinConvNet", "HeadNet", "decayed_groups"]


class NoisyTemplates(IterableDataset):
    """An endless, reproducible stream of ``(images, labels)`` batches (use ``DataLoader(ds, batch_size=None)``).

    Args:
        batch_size: images per batch.
        size: height and width of the images.
        channels: image channels.
        classes: number of class templates.
        noise: standard deviation of the Gaussian noise added to the template.
        flip: share of labels replaced by a random class (label noise keeps the loss away from zero).
        seed: seeds the templates and the stream; the same seed gives the same batches.
        dtype: dtype of the images.
        stream: which noise stream to draw (same task, other samples): give each DDP rank its own.
    """

    def __init__(
        self,
        batch_size: int = 64,
        size: int = 16,
        channels: int = 3,
        classes: int = 10,
        noise: float = 1.0,
        flip: float = 0.2,
        seed: int = 0,
        dtype: torch.dtype = torch.float32,
        stream: int = 0,
    ) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.templates = torch.randn(classes, channels, size, size, generator=g)
        self.batch_size, self.classes, self.noise, self.flip, self.seed, self.dtype = batch_size, classes, noise, flip, seed, dtype
        self.stream = stream

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        g = torch.Generator().manual_seed(self.seed + 1 + 7919 * self.stream)
        while True:
            y = torch.randint(0, self.classes, (self.batch_size,), generator=g)
            x = self.templates[y] + self.noise * torch.randn(self.batch_size, *self.templates.shape[1:], generator=g)
            flip = torch.rand(self.batch_size, generator=g) < self.flip
            y = torch.where(flip, torch.randint(0, self.classes, (self.batch_size,), generator=g), y)
            yield x.to(self.dtype), y


class TeacherStream(IterableDataset):
    """An endless, reproducible stream of ``(inputs, labels)`` batches labelled by a fixed random teacher (use
    ``DataLoader(ds, batch_size=None)``).

    Args:
        shape: shape of one input (Gaussian, freshly drawn for every batch).
        classes: number of classes; the teacher is ``argmax(relu(x·W1)·W2)`` with random ``W1, W2``.
        batch_size: samples per batch.
        flip: share of labels replaced by a random class.
        seed: seeds the teacher and the stream.
        memorize: if > 0, cycle through this many fixed samples (shuffled, labels without flips) instead of
            drawing fresh ones: a data set the network can memorize.
    """

    def __init__(
        self, shape: tuple[int, ...], classes: int = 10, batch_size: int = 32, flip: float = 0.2, seed: int = 0, memorize: int = 0
    ) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(10_000 + seed)
        dim = math.prod(shape)
        self.shape, self.classes, self.batch_size, self.flip, self.seed, self.memorize = tuple(shape), classes, batch_size, flip, seed, memorize
        self.w1 = torch.randn(dim, 64, generator=g) / math.sqrt(dim)
        self.w2 = torch.randn(64, classes, generator=g) / 8.0
        if memorize:
            self.inputs = torch.randn(memorize, *self.shape, generator=g)
            self.labels = self.label(self.inputs)

    def label(self, x: torch.Tensor) -> torch.Tensor:
        return (F.relu(x.flatten(1) @ self.w1) @ self.w2).argmax(1)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        g = torch.Generator().manual_seed(20_000 + self.seed)
        while True:
            if self.memorize:
                idx = torch.randperm(self.memorize, generator=g)[: self.batch_size]
                yield self.inputs[idx], self.labels[idx]
                continue
            x = torch.randn(self.batch_size, *self.shape, generator=g)
            y = self.label(x)
            flip = torch.rand(self.batch_size, generator=g) < self.flip
            yield x, torch.where(flip, torch.randint(0, self.classes, (self.batch_size,), generator=g), y)


class ThinConvNet(nn.Module):
    """Four conv → BatchNorm → ReLU layers on 1×8×8 inputs; the first convolution has one input channel (16 filters
    of 9 weights: a thin layer, whose angular update is the noisiest)."""

    input_shape = (1, 8, 8)

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(1, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16)
        self.conv2, self.bn2 = nn.Conv2d(16, 32, 3, padding=1, stride=2, bias=False), nn.BatchNorm2d(32)
        self.conv3, self.bn3 = nn.Conv2d(32, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32)
        self.conv4, self.bn4 = nn.Conv2d(32, 64, 3, padding=1, stride=2, bias=False), nn.BatchNorm2d(64)
        self.fc = nn.Linear(64, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        x = F.relu(self.bn3(self.conv3(x)))
        x = F.relu(self.bn4(self.conv4(x)))
        return self.fc(x.mean((2, 3)))


class HeadNet(nn.Module):
    """Two strided conv → BatchNorm → ReLU layers on 3×8×8 inputs, global pooling, then a ``Linear → BatchNorm1d →
    ReLU`` head before the classifier."""

    input_shape = (3, 8, 8)

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 16, 3, padding=1, stride=2, bias=False), nn.BatchNorm2d(16)
        self.conv2, self.bn2 = nn.Conv2d(16, 32, 3, padding=1, stride=2, bias=False), nn.BatchNorm2d(32)
        self.fc1, self.bnf = nn.Linear(32, 64, bias=False), nn.BatchNorm1d(64)
        self.fc = nn.Linear(64, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        x = F.relu(self.bnf(self.fc1(x.mean((2, 3)))))
        return self.fc(x)


def decayed_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Param groups with weight decay on the normalized weights only (matrices and kernels, except those of a
    submodule named ``fc``, the classifier), none on BatchNorm's affine parameters, biases and the classifier."""
    decay = [p for n, p in model.named_parameters() if p.dim() > 1 and n.split(".")[-2:-1] != ["fc"]]
    ids = {id(p) for p in decay}
    return [{"params": decay, "weight_decay": weight_decay}, {"params": [p for p in model.parameters() if id(p) not in ids], "weight_decay": 0.0}]
