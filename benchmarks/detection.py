"""Detection time for deep models (target: a 200-layer model in under 2 s on 2 CPU cores).

    python benchmarks/detection.py [--blocks 100] [--repeats 3]

Builds a ResNet-like model of ``blocks`` BasicBlocks (two conv+BN each, plus projection shortcuts at
every stage change), i.e. about 2*blocks + 4 conv layers, and prints the median wall time of:
- the structural analysis with torch.fx (what SMDCallback does at fit start);
- the same with the numerical verification (``example_input=``);
- the recorded forward pass (the fallback when fx cannot trace) with the numerical verification.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn
from torch.nn import functional as F

from lightning_smd import find_normalized_weights


class Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)
        self.conv2, self.bn2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)
        self.short = nn.Sequential()
        if stride != 1 or cin != cout:
            self.short = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))) + self.short(x))


class DeepResNet(nn.Module):
    def __init__(self, blocks: int = 100, width: int = 8) -> None:
        super().__init__()
        self.stem, self.bn = nn.Conv2d(3, width, 3, padding=1, bias=False), nn.BatchNorm2d(width)
        layers, c = [], width
        for i in range(blocks):
            stage_change = i > 0 and i % (blocks // 3 or 1) == 0 and c < 4 * width
            layers.append(Block(c, 2 * c if stage_change else c, 2 if stage_change else 1))
            c = 2 * c if stage_change else c
        self.blocks = nn.Sequential(*layers)
        self.fc = nn.Linear(c, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(F.adaptive_avg_pool2d(self.blocks(F.relu(self.bn(self.stem(x)))), 1).flatten(1))


class Untraceable(nn.Module):
    """The same model behind a data-dependent branch, so torch.fx fails and the forward pass is recorded."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > -1e9:
            return self.inner(x)
        return self.inner(-x)


def _median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(2)
    model = DeepResNet(args.blocks)
    layers = sum(isinstance(m, (nn.Conv2d, nn.Linear)) for m in model.modules())
    x = torch.randn(2, 3, 16, 16)
    det = find_normalized_weights(model)
    t_fx = _median_time(lambda: find_normalized_weights(model), args.repeats)
    t_run = _median_time(lambda: find_normalized_weights(model, example_input=x), args.repeats)
    wrapped = Untraceable(model)
    assert len(find_normalized_weights(wrapped, example_input=x).units) == len(det.units)
    t_rec = _median_time(lambda: find_normalized_weights(wrapped, example_input=x), args.repeats)
    print(f"model: {args.blocks} residual blocks, {layers} conv/linear layers, {len(det.units)} tracked, {len(det.rejected)} not tracked")
    print(f"{'method':<40} {'median s':>9}")
    print(f"{'fx structural analysis':<40} {t_fx:>9.3f}")
    print(f"{'fx + numerical check (example_input)':<40} {t_run:>9.3f}")
    print(f"{'recorded forward pass + numerical check':<40} {t_rec:>9.3f}")
    print(f"target: under 2 s -> {'met' if max(t_fx, t_rec) < 2.0 else 'NOT met'}")


if __name__ == "__main__":
    main()
