"""A data stream whose gradient noise never vanishes, for examples, tests and benchmarks.

Spherical Motion Dynamics describes training with persistent gradient noise. A data set the network can
memorize drives the loss — and the gradient noise — to zero, and then no equilibrium is reached (the
weight norms shrink geometrically instead). :class:`NoisyTemplates` avoids that: every batch is freshly
drawn noisy images of a few class templates, with a share of the labels flipped at random.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import IterableDataset

__all__ = ["NoisyTemplates"]


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
