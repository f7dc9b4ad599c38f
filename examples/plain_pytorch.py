"""SMD in a hand-written PyTorch loop: ``SMDMonitor`` instead of the callback, same numbers.

    python examples/plain_pytorch.py                      # full size: 1,500 steps
    SMD_EXAMPLE_FAST=1 python examples/plain_pytorch.py   # CI size: 500 steps

The monitor hooks the optimizer's step (no change to the loop), keeps its statistics on the device, and
synchronizes only when ``metrics()`` is called — here every ``log_every_n_steps`` steps.

What you should see, in both sizes: the quickstart's network and settings (relaxation time 100 steps), a line
every 100 steps with the median Δ/Δ* approaching 1, the end table and the verdict ``equilibrium``.
"""

from __future__ import annotations

import argparse
import os

import torch
from torch import nn
from torch.nn import functional as F

from lightning_smd import SMDMonitor, param_groups
from lightning_smd.demo import NoisyTemplates


class ConvNet(nn.Module):
    """The quickstart's network as a plain ``nn.Module``: three conv → BatchNorm → ReLU layers, a classifier."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        w = width
        self.conv1, self.bn1 = nn.Conv2d(3, w, 3, padding=1, bias=False), nn.BatchNorm2d(w)
        self.conv2, self.bn2 = nn.Conv2d(w, 2 * w, 3, padding=1, stride=2, bias=False), nn.BatchNorm2d(2 * w)
        self.conv3, self.bn3 = nn.Conv2d(2 * w, 4 * w, 3, padding=1, stride=2, bias=False), nn.BatchNorm2d(4 * w)
        self.fc = nn.Linear(4 * w, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        x = F.relu(self.bn3(self.conv3(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def main(argv: list[str] | None = None) -> dict:
    fast = os.environ.get("SMD_EXAMPLE_FAST", "") not in ("", "0")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=500 if fast else 1500)
    parser.add_argument("--summary", default="smd_runs/plain/smd_summary.json")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    model = ConvNet(width=16)
    optimizer = torch.optim.SGD(param_groups(model, weight_decay=5e-3), lr=0.1, momentum=0.9)
    monitor = SMDMonitor(model, optimizer, log_every_n_steps=100)
    print("tracking:", ", ".join(monitor.units))
    data = iter(NoisyTemplates(batch_size=64, seed=args.seed))
    for step in range(args.steps):
        x, y = next(data)
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        monitor.observe_loss(loss)  # optional: grounds the vanishing-noise diagnosis in the loss (no sync)
        if monitor.should_log(step):
            m = monitor.metrics()
            print(
                f"step {step + 1:5d}  loss {loss.item():.3f}  median Δ/Δ* {m['smd/angular_update_ratio']:.3f}  "
                f"in equilibrium {m['smd/equilibrium_fraction']:.0%}"
            )
    summary = monitor.close(summary_path=args.summary)
    print(monitor.format_summary())
    return summary


if __name__ == "__main__":
    main()
