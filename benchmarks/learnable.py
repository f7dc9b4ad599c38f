"""The schedule forecast on learnable data: how the forecast and the trajectory hold where the network learns and its
gradient statistics change as it does (on the verdict sweep's task too, SGD's ``L`` falls 1.6–9.5× after step 50
and rises again through the decay: ``benchmarks/task_statistics.py``; here on real data).

    python benchmarks/learnable.py [--tasks chars digits] [--seeds 0] [--fast]

Two real data sets that need no network:

- ``chars``: a character-level transformer (2 pre-LayerNorm blocks, QK-norm, d = 64, context 64) on the Python
  standard library's own source files (the first ~1 MB of ``.py`` files under ``os.__file__``'s folder, in name
  order), AdamW lr 3e-3, weight decay 0.5 on the matrices (τ = 1/(2·lr·wd) ≈ 333 steps), 200 warm-up steps then
  cosine to 0, 3,000 steps of 32 sequences. The tracked weights are the query and key projections (QK-norm makes
  them scale-invariant, per head: each is tracked as one weight with per-head groups).
- ``digits``: a ResNet-style network (a stem and two residual stages of BatchNorm'ed convolutions, 32 and 64
  channels) on scikit-learn's bundled 8x8 digits (1,797 images; random shifts by up to one pixel and 10 % of the
  labels drawn at random for each batch, so that the gradient noise persists), SGD with momentum 0.9, lr 0.1,
  weight decay 5e-3 on the convolutions (τ = 100 steps), 100 warm-up steps then cosine to 0, 3,000 steps of 64
  images.

Per task and seed it prints the verdict and, per tracked layer, the forecast made at fit start (after the first 50
steps' statistics) and the latest refreshed one against what was observed: the first-equilibrium step (the start of
the first stay of the 50-step average of Δ/Δ* in the band lasting a relaxation time), the freeze-out step (its last
step in the band), and the measured Δ over the trajectory Δ̂ (50-step averages over the whole run: median and 90th
percentile of |Δ/Δ̂ − 1|). ``--fast``: 300 steps, for the test that keeps the script running.
"""

from __future__ import annotations

import argparse
import glob
import math
import os
import re
import statistics
import sys
import time
import warnings
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, IterableDataset

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

#: (lr, weight decay of the normalized weights, warm-up steps) per task.
CHARS = (3e-3, 0.5, 200)
DIGITS = (0.1, 5e-3, 100)
STEPS = 3000


# ----------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------
def stdlib_text(limit: int = 1 << 20) -> bytes:
    """The first ``limit`` bytes of the standard library's ``.py`` files, in name order (the same on every machine with
    the same Python)."""
    out = bytearray()
    for path in sorted(glob.glob(os.path.join(os.path.dirname(os.__file__), "*.py"))):
        with open(path, "rb") as fh:
            out += fh.read()
        if len(out) >= limit:
            break
    return bytes(out[:limit])


class Chars(IterableDataset):
    def __init__(self, data: torch.Tensor, context: int, batch: int, seed: int) -> None:
        self.data, self.context, self.batch, self.seed = data, context, batch, seed

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed)
        while True:
            start = torch.randint(0, len(self.data) - self.context - 1, (self.batch,), generator=g)
            idx = start[:, None] + torch.arange(self.context + 1)
            chunk = self.data[idx]
            yield chunk[:, :-1], chunk[:, 1:]


class Digits(IterableDataset):
    """scikit-learn's 8x8 digits, padded to 10x10 and cropped back at a random shift; 10 % of the labels redrawn."""

    def __init__(self, batch: int, seed: int, noise: float = 0.1) -> None:
        from sklearn.datasets import load_digits

        d = load_digits()
        self.x = torch.tensor(d.images, dtype=torch.float32)[:, None] / 16.0
        self.x = F.pad((self.x - self.x.mean()) / self.x.std(), (1, 1, 1, 1))
        self.y = torch.tensor(d.target)
        self.batch, self.seed, self.noise = batch, seed, noise

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed)
        while True:
            i = torch.randint(0, len(self.y), (self.batch,), generator=g)
            dx, dy = (int(v) for v in torch.randint(0, 3, (2,), generator=g))
            x = self.x[i, :, dy : dy + 8, dx : dx + 8]
            y = self.y[i]
            flip = torch.rand(self.batch, generator=g) < self.noise
            yield x, torch.where(flip, torch.randint(0, 10, (self.batch,), generator=g), y)


# ----------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------
class CausalQKNorm(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.q, self.k, self.v, self.out = (nn.Linear(dim, dim, bias=False) for _ in range(4))
        self.q_norm = nn.LayerNorm(self.head_dim, elementwise_affine=False)
        self.k_norm = nn.LayerNorm(self.head_dim, elementwise_affine=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        split = lambda z: z.view(b, t, self.heads, self.head_dim).transpose(1, 2)  # noqa: E731
        y = F.scaled_dot_product_attention(self.q_norm(split(self.q(x))), self.k_norm(split(self.k(x))), split(self.v(x)), is_causal=True)
        return self.out(y.transpose(1, 2).reshape(b, t, d))


class CharTransformer(nn.Module):
    def __init__(self, vocab: int = 256, context: int = 64, dim: int = 64, heads: int = 4, depth: int = 2) -> None:
        super().__init__()
        self.embed, self.pos = nn.Embedding(vocab, dim), nn.Parameter(torch.randn(context, dim) * 0.02)
        self.blocks = nn.ModuleList()
        for _ in range(depth):
            self.blocks.append(
                nn.ModuleDict(
                    {
                        "ln1": nn.LayerNorm(dim),
                        "attn": CausalQKNorm(dim, heads),
                        "ln2": nn.LayerNorm(dim),
                        "fc1": nn.Linear(dim, 4 * dim),
                        "fc2": nn.Linear(4 * dim, dim),
                    }
                )
            )
        self.ln, self.head = nn.LayerNorm(dim), nn.Linear(dim, vocab)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x) + self.pos[: x.shape[1]]
        for b in self.blocks:
            h = h + b["attn"](b["ln1"](h))
            h = h + b["fc2"](F.gelu(b["fc1"](b["ln2"](h))))
        return self.head(self.ln(h))


class Residual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)
        self.conv2, self.bn2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)
        self.skip = None if stride == 1 and cin == cout else nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return F.relu(y + (x if self.skip is None else self.skip(x)))


class DigitsResNet(nn.Module):
    def __init__(self, width: int = 32) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.stage1, self.stage2 = Residual(width, width, 1), Residual(width, 2 * width, 2)
        self.fc = nn.Linear(2 * width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.stage2(self.stage1(self.stem(x))).mean((2, 3)))


def warmup_cosine(warm: int, steps: int):
    return lambda t: (t + 1) / warm if t < warm else 0.5 * (1.0 + math.cos(math.pi * (t - warm) / max(steps - warm, 1)))


# ----------------------------------------------------------------------------------------------
# One run
# ----------------------------------------------------------------------------------------------
def run(task: str, seed: int, steps: int) -> dict[str, Any]:
    import pytorch_lightning as pl

    from lightning_smd import SMDCallback
    from quiet import quiet_trainer

    torch.set_num_threads(1)  # (more threads on this small a model only add synchronization)
    lr, wd, warm = CHARS if task == "chars" else DIGITS
    torch.manual_seed(seed)
    if task == "chars":
        data = torch.tensor(list(stdlib_text()), dtype=torch.long)
        net: nn.Module = CharTransformer()
        stream: IterableDataset = Chars(data, 64, 32, seed)
    else:
        net, stream = DigitsResNet(), Digits(64, seed)

    class Task(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = net
            self.losses: list[float] = []

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch
            out = self.net(x)
            loss = F.cross_entropy(out.flatten(0, -2), y.flatten())
            self.losses.append(float(loss.detach()))  # the benchmark's bookkeeping (a host sync), not SMD's
            return loss

        def configure_optimizers(self) -> Any:
            named = list(self.net.named_parameters())
            decay = [p for n, p in named if p.dim() >= 2 and not n.startswith(("embed", "pos"))]
            rest = [p for n, p in named if not (p.dim() >= 2 and not n.startswith(("embed", "pos")))]
            groups = [{"params": decay, "weight_decay": wd}, {"params": rest, "weight_decay": 0.0}]
            opt = torch.optim.AdamW(groups, lr=lr) if task == "chars" else torch.optim.SGD(groups, lr=lr, momentum=0.9)
            sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(warm, steps))
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    smd = SMDCallback(verbose=False, summary_path=False, log_every_n_steps=50, keep_history=True)
    model = Task()
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quiet_trainer(steps, [smd]).fit(model, DataLoader(stream, batch_size=None))
    s = smd.summary()
    start_fc = {f["name"]: f for f in s.get("forecast", [])}
    layers = []
    for row in s["layers"]:
        h = smd.diagnostics.unit_history(row["name"])
        measured, trajectory = h["angular_update"], h["trajectory_angular_update"]
        ok = np.isfinite(measured) & np.isfinite(trajectory)
        med = p90 = math.nan
        if ok.sum() > 100:
            kernel = np.ones(50) / 50.0
            a, b = np.convolve(measured[ok], kernel, "valid"), np.convolve(trajectory[ok], kernel, "valid")
            r = a[b > 0] / b[b > 0]
            med, p90 = float(np.median(r)), float(np.percentile(np.abs(r - 1.0), 90))
        first = start_fc.get(row["name"], {})
        layers.append(
            {
                "name": row["name"],
                "state": row["state"],
                "start_equilibrium": first.get("equilibrium_step"),
                "start_freeze_out": first.get("freeze_out_step"),
                "latest_equilibrium": row.get("forecast_equilibrium_step"),
                "latest_freeze_out": row.get("forecast_freeze_out_step"),
                "observed_equilibrium": row.get("observed_equilibrium_step"),
                "observed_freeze_out": row.get("freeze_out_step"),
                "ratio_median": med,
                "ratio_p90": p90,
                "early_ratio": row.get("early_angular_update_ratio"),
            }
        )
    head = statistics.fmean(model.losses[:50])
    tail = statistics.fmean(model.losses[-200:])
    return {"task": task, "seed": seed, "steps": steps, "verdict": s["verdict"], "loss_start": head, "loss_end": tail,
            "seconds": time.perf_counter() - start, "layers": layers,
            "warnings": sorted({c for w in smd.warnings for c in re.findall(r"\[(SMD\d+)\]", w)})}  # fmt: skip


def error(forecast: Any, observed: Any) -> float | None:
    if forecast is None or observed is None or observed <= 0:
        return None
    return abs(forecast - observed) / observed


def report(results: list[dict[str, Any]]) -> str:
    lines = []
    for r in results:
        lines.append(
            f"{r['task']} seed {r['seed']}: {r['steps']} steps in {r['seconds']:.0f} s, loss {r['loss_start']:.2f} -> {r['loss_end']:.2f}, "
            f"verdict {r['verdict']}, warnings {', '.join(r['warnings']) or 'none'}"
        )
    lines += [
        "",
        "| task | layers | first eq. error: fit start / latest (median, max) | freeze-out error: fit start / latest (median, max) "
        "| Δ/Δ̂ median (range) | p90 of |Δ/Δ̂ − 1| (median, worst layer) | not observed |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for task in sorted({r["task"] for r in results}):
        layers = [layer for r in results if r["task"] == task for layer in r["layers"]]

        def cell(key: str, observed: str, layers: list[dict[str, Any]] = layers) -> str:
            e = [x for x in (error(layer[key], layer[observed]) for layer in layers) if x is not None]
            return f"{statistics.median(e):.0%}, {max(e):.0%}" if e else "-"

        meds = [layer["ratio_median"] for layer in layers if math.isfinite(layer["ratio_median"])]
        p90 = [layer["ratio_p90"] for layer in layers if math.isfinite(layer["ratio_p90"])]
        missing = sum(layer["observed_equilibrium"] is None for layer in layers)
        lines.append(
            f"| {task} | {len(layers)} | {cell('start_equilibrium', 'observed_equilibrium')} / {cell('latest_equilibrium', 'observed_equilibrium')} "
            f"| {cell('start_freeze_out', 'observed_freeze_out')} / {cell('latest_freeze_out', 'observed_freeze_out')} "
            f"| {statistics.median(meds):.3f} ({min(meds):.3f}–{max(meds):.3f}) | {statistics.median(p90):.3f}, {max(p90):.3f} | {missing} |"
            if meds and p90
            else f"| {task} | {len(layers)} | - | - | - | - | {missing} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="*", default=["chars", "digits"], choices=["chars", "digits"])
    parser.add_argument("--seeds", nargs="*", type=int, default=[0])
    parser.add_argument("--fast", action="store_true", help="300 steps (the test's size)")
    args = parser.parse_args(argv)
    steps = 300 if args.fast else STEPS
    results = [run(task, seed, steps) for task in args.tasks for seed in args.seeds]
    print(report(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
