"""What monitoring costs: steps/s and extra peak memory of a ResNet-18-like BatchNorm ConvNet, measured in
one run for every variant, as ratios to no monitoring (median of several repeats).

    python benchmarks/overhead.py [--steps 30] [--repeats 3] [--batch 32] [--size 32] [--variants ...]

Variants:
- ``none``: no monitoring;
- ``smd_sgdm``: SMDCallback, SGD with heavy-ball momentum (update from the momentum buffer, no copy);
- ``smd_snapshot``: SMDCallback with ``use_momentum_buffer=False`` (one copy of the tracked weights);
- ``naive_item``: a per-tensor Python loop computing norm and angle with ``.item()`` after every step;
- ``full_clone``: a logger that clones every parameter after every step and computes the angle from it;
- ``wandb_watch_1`` / ``wandb_watch_100``: ``wandb.watch(model, log="parameters", log_freq=...)``, offline
  (only when wandb is installed).

On a GPU (``--device cuda``) the same table is printed for the device's timings (synchronized per step).
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import tempfile
import time
import tracemalloc
import warnings

import pytorch_lightning as pl
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader

from detection import Block  # the same residual block as the detection benchmark  # noqa: E402

from lightning_smd import SMDCallback
from lightning_smd.demo import NoisyTemplates


class ResNet18Like(nn.Module):
    """ResNet-18's layout (4 stages of 2 BasicBlocks, 64-512 channels) for 32x32 inputs."""

    def __init__(self, width: int = 64, classes: int = 10) -> None:
        super().__init__()
        self.stem, self.bn = nn.Conv2d(3, width, 3, padding=1, bias=False), nn.BatchNorm2d(width)
        layers, c = [], width
        for stage, mult in enumerate((1, 2, 4, 8)):
            for i in range(2):
                stride = 2 if stage > 0 and i == 0 else 1
                layers.append(Block(c, width * mult, stride))
                c = width * mult
        self.blocks = nn.Sequential(*layers)
        self.fc = nn.Linear(c, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(F.relu(self.bn(self.stem(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class Module(pl.LightningModule):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.net = ResNet18Like(width)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)


class NaiveItem(pl.Callback):
    """The obvious implementation: per tensor, norms and angle as Python floats after every step."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.before = {n: p.detach().clone() for n, p in pl_module.named_parameters() if p.dim() > 1}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.values = {}
        for n, p in pl_module.named_parameters():
            if n in self.before:
                a, b = self.before[n], p.detach()
                cos = (a * b).sum().item() / (a.norm().item() * b.norm().item())
                self.values[n] = (b.norm().item(), cos)


class FullClone(pl.Callback):
    """A research logger: clone every parameter after every step, compare with the previous clone."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        current = [p.detach().clone() for p in pl_module.parameters()]
        prev = getattr(self, "prev", None)
        if prev is not None:
            self.angles = [torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0) for a, b in zip(prev, current)]
        self.prev = current


def _callbacks(variant: str, tmp: str) -> tuple[list, object]:
    if variant == "smd_sgdm":
        return [SMDCallback(verbose=False, summary_path=False)], None
    if variant == "smd_snapshot":
        return [SMDCallback(verbose=False, summary_path=False, use_momentum_buffer=False)], None
    if variant == "naive_item":
        return [NaiveItem()], None
    if variant == "full_clone":
        return [FullClone()], None
    return [], None


def run(variant: str, args: argparse.Namespace) -> tuple[float, float]:
    """(median seconds per step after warm-up, extra peak memory in MiB relative to the model's own)."""
    torch.manual_seed(0)
    model = Module(args.width)
    tmp = tempfile.mkdtemp(prefix="smd-bench-")
    callbacks, _ = _callbacks(variant, tmp)
    times: list[float] = []

    class Timer(pl.Callback):
        """Time from one batch start to the next: the whole step, every callback's work included."""

        last: float | None = None

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if args.device == "cuda":
                torch.cuda.synchronize()
            now = time.perf_counter()
            if self.last is not None:
                times.append(now - self.last)
            self.last = now

    run_wandb = None
    if variant.startswith("wandb_watch"):
        import wandb

        os.environ["WANDB_MODE"] = "offline"
        os.environ["WANDB_SILENT"] = "true"
        run_wandb = wandb.init(project="smd-bench", dir=tmp, mode="offline")
        wandb.watch(model, log="parameters", log_freq=int(variant.rsplit("_", 1)[1]))
    data = DataLoader(NoisyTemplates(batch_size=args.batch, size=args.size), batch_size=None)
    trainer = pl.Trainer(
        accelerator=args.device,
        devices=1,
        max_steps=args.steps,
        logger=pl.loggers.CSVLogger(tmp, name="", version=""),
        log_every_n_steps=args.log_every,
        callbacks=[*callbacks, Timer()],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp,
    )
    gc.collect()
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    else:
        tracemalloc.start()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model, data)
    if args.device == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = tracemalloc.get_traced_memory()[1] / 2**20  # Python-side allocations (torch CPU tensors: not seen)
        tracemalloc.stop()
    if run_wandb is not None:
        run_wandb.finish()
    warm = times[args.warmup :]
    return statistics.median(warm), peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--width", type=int, default=64, help="channels of the first stage (ResNet-18: 64)")
    parser.add_argument("--log-every", type=int, default=50)
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--variants",
        nargs="*",
        default=["none", "smd_sgdm", "smd_snapshot", "naive_item", "full_clone", "wandb_watch_1", "wandb_watch_100"],
    )
    args = parser.parse_args()
    torch.set_num_threads(max(1, min(os.cpu_count() or 1, 16)))
    variants = list(args.variants)
    try:
        import wandb  # noqa: F401
    except ImportError:
        skipped = [v for v in variants if v.startswith("wandb")]
        variants = [v for v in variants if not v.startswith("wandb")]
        if skipped:
            print(f"(wandb is not installed: {', '.join(skipped)} skipped; pip install wandb)")
    results: dict[str, list[float]] = {v: [] for v in variants}
    peaks: dict[str, float] = {}
    for _ in range(args.repeats):  # interleaved, so drifts of the machine hit every variant alike
        for v in variants:
            t, peak = run(v, args)
            results[v].append(t)
            peaks[v] = peak
    base = statistics.median(results["none"]) if "none" in results else None
    params = sum(p.numel() for p in ResNet18Like(args.width).parameters())
    print(
        f"ResNet-18-like ({params / 1e6:.1f} M parameters), batch {args.batch}x3x{args.size}x{args.size}, "
        f"{args.device}, {torch.get_num_threads()} threads, {args.steps} steps ({args.warmup} warm-up), "
        f"median of {args.repeats}"
    )
    print(f"{'variant':<18} {'s/step':>9} {'steps/s':>9} {'vs none':>9}")
    for v in variants:
        t = statistics.median(results[v])
        ratio = f"{t / base:>8.3f}x" if base else "-"
        print(f"{v:<18} {t:>9.4f} {1 / t:>9.2f} {ratio:>9}")


if __name__ == "__main__":
    main()
