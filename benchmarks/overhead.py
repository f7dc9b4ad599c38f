"""What monitoring costs: steps/s and extra peak memory of a BatchNorm ResNet under each monitoring variant,
all measured in one invocation, as ratios to no monitoring (median over repeats).

    python benchmarks/overhead.py [--steps 30] [--repeats 3] [--batch 32] [--variants ...]
    python benchmarks/overhead.py --device cuda          # ResNet-50-like, batch 256, 16-mixed

Every run is a fresh Python process (so that peak memory is its own) training the model with a real
``pytorch_lightning.Trainer`` for ``--steps`` steps; the time of a step is measured from one batch start to
the next (forward, backward, optimizer step and every callback's work), the first ``--warmup`` steps
dropped, and the mean kept (log steps included). Separate processes on a shared machine drift by several
percent, more than the cost being measured; so for the SMD variants the script also times the callback's
own hooks inside the same steps (``in SMD hooks``: exact on the CPU, where every op is synchronous). The
variants run interleaved, repeat after repeat, so slow drifts of the machine hit all of them alike.

Variants:
- ``none``: no monitoring;
- ``smd_sgdm``: ``SMDCallback()``, every step; SGD with heavy-ball momentum (update from the momentum
  buffer, no weight copy);
- ``smd_cosine``: as ``smd_sgdm`` under a warm-up + cosine schedule, read ahead and followed (each layer's
  trajectory per step, the forecast refreshed at every log step): the cost of judging a schedule;
- ``smd_per_filter``: as ``smd_sgdm`` with ``per_filter=True`` (every filter's norm and update, the RMS over
  filters and the rotation imbalance at drains);
- ``smd_snapshot``: ``SMDCallback(use_momentum_buffer=False)``, every step (one copy of the tracked
  weights: the path of every other optimizer);
- ``smd_every_10``: ``SMDCallback(every_n_steps=10, use_momentum_buffer=False)``;
- ``naive_item``: a per-tensor Python loop computing norm and angle with ``.item()`` after every step;
- ``full_clone``: a logger that clones every parameter after every step and computes the angle from it;
- ``wandb_watch_1`` / ``wandb_watch_100``: ``wandb.watch(model, log="parameters", log_freq=1 / 100)``,
  offline (skipped when wandb is not installed).

Extra peak memory: on CUDA, ``torch.cuda.max_memory_allocated`` minus that of ``none``; on the CPU, the
process's peak resident set size minus that of ``none`` (includes whatever a variant imports; W&B's
separate ``wandb-core`` process is not counted).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import warnings

import torch
from torch import nn
from torch.nn import functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from detection import Block  # noqa: E402  (the residual block of the detection benchmark)

VARIANTS = ["none", "smd_sgdm", "smd_cosine", "smd_per_filter", "smd_snapshot", "smd_every_10", "naive_item", "full_clone", "wandb_watch_1", "wandb_watch_100"]


class Bottleneck(nn.Module):
    def __init__(self, cin: int, mid: int, stride: int) -> None:
        super().__init__()
        cout = 4 * mid
        self.c1, self.b1 = nn.Conv2d(cin, mid, 1, bias=False), nn.BatchNorm2d(mid)
        self.c2, self.b2 = nn.Conv2d(mid, mid, 3, stride, 1, bias=False), nn.BatchNorm2d(mid)
        self.c3, self.b3 = nn.Conv2d(mid, cout, 1, bias=False), nn.BatchNorm2d(cout)
        self.short = nn.Sequential()
        if stride != 1 or cin != cout:
            self.short = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.b1(self.c1(x)))
        y = F.relu(self.b2(self.c2(y)))
        return F.relu(self.b3(self.c3(y)) + self.short(x))


class ResNetLike(nn.Module):
    """ResNet-18 (BasicBlocks 2-2-2-2) or ResNet-50 (Bottlenecks 3-4-6-3) layout, 64-512 base channels,
    with a 3x3 stem for 32x32 inputs."""

    def __init__(self, depth: int = 18, width: int = 64, classes: int = 10) -> None:
        super().__init__()
        self.stem, self.bn = nn.Conv2d(3, width, 3, padding=1, bias=False), nn.BatchNorm2d(width)
        layers: list[nn.Module] = []
        c = width
        counts = (2, 2, 2, 2) if depth == 18 else (3, 4, 6, 3)
        for stage, (mult, n) in enumerate(zip((1, 2, 4, 8), counts)):
            for i in range(n):
                stride = 2 if stage > 0 and i == 0 else 1
                if depth == 18:
                    layers.append(Block(c, width * mult, stride))
                    c = width * mult
                else:
                    layers.append(Bottleneck(c, width * mult, stride))
                    c = 4 * width * mult
        self.blocks = nn.Sequential(*layers)
        self.fc = nn.Linear(c, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(F.relu(self.bn(self.stem(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def _time_smd_hooks(smd, total: list[float]) -> None:
    """Accumulate the wall time spent in the callback's hooks and in the recorder's optimizer hooks (on the
    CPU every op is synchronous, so this is exactly the monitoring's own time; on CUDA it is launch time)."""
    import lightning_smd.engine.measure as measure

    def timed(fn):
        def wrapper(*a, **k):
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                total[0] += time.perf_counter() - t0

        return wrapper

    measure._Slot.record = timed(measure._Slot.record)
    measure._Slot.pre_step = timed(measure._Slot.pre_step)
    for hook in ("on_train_batch_start", "on_before_backward", "on_before_optimizer_step", "on_train_batch_end"):
        setattr(smd, hook, timed(getattr(smd, hook)))


def child(args: argparse.Namespace) -> dict:
    """One training run of one variant in this process; returns its figures."""
    import pytorch_lightning as pl
    from torch.utils.data import DataLoader

    from lightning_smd import SMDCallback
    from lightning_smd.demo import NoisyTemplates

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = ResNetLike(args.depth, args.width)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return F.cross_entropy(self.net(x), y)

        def configure_optimizers(self):
            opt = torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
            if args.child != "smd_cosine":
                return opt
            n, warm = args.steps, max(args.steps // 10, 1)
            cosine = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: (t + 1) / warm if t < warm else 0.5 * (1 + math.cos(math.pi * (t - warm) / (n - warm))))
            return {"optimizer": opt, "lr_scheduler": {"scheduler": cosine, "interval": "step"}}

    class NaiveItem(pl.Callback):
        """The obvious implementation: per tensor, norm and angle as Python floats after every step."""

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
                self.angles = [F.cosine_similarity(a.flatten(), b.flatten(), dim=0) for a, b in zip(prev, current)]
            self.prev = current

    times: list[float] = []
    hook_marks: list[float] = []
    cuda = args.device == "cuda"
    hook_time = [0.0]  # seconds spent inside SMDCallback's hooks and the recorder's step hooks (CPU: exact)

    class Timer(pl.Callback):
        """From one batch start to the next: the whole step, every callback's work included."""

        last: float | None = None

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if cuda:
                torch.cuda.synchronize()
            now = time.perf_counter()
            if self.last is not None:
                times.append(now - self.last)
                hook_marks.append(hook_time[0])
            self.last = now

    v = args.child
    tmp = tempfile.mkdtemp(prefix="smd-bench-")
    callbacks: list[pl.Callback] = []
    smd = None
    if v.startswith("smd"):
        kw: dict = {"verbose": False, "summary_path": False}
        if v not in ("smd_sgdm", "smd_cosine", "smd_per_filter"):
            kw["use_momentum_buffer"] = False
        if v == "smd_per_filter":
            kw["per_filter"] = True  # every filter measured: the RMS over filters and the rotation imbalance
        if v.startswith("smd_every_"):
            kw["every_n_steps"] = int(v.rsplit("_", 1)[1])
        smd = SMDCallback(**kw)
        callbacks.append(smd)
        _time_smd_hooks(smd, hook_time)
    elif v == "naive_item":
        callbacks.append(NaiveItem())
    elif v == "full_clone":
        callbacks.append(FullClone())
    torch.manual_seed(0)
    model = Module()
    run_wandb = None
    if v.startswith("wandb_watch"):
        import wandb

        os.environ["WANDB_SILENT"] = "true"
        run_wandb = wandb.init(project="smd-bench", dir=tmp, mode="offline")
        # watch the module whose forward runs (training_step calls self.net; the LightningModule's own
        # forward never does, and wandb.watch logs from a forward hook)
        wandb.watch(model.net, log="parameters", log_freq=int(v.rsplit("_", 1)[1]))
    data = DataLoader(NoisyTemplates(batch_size=args.batch, size=args.size, seed=0), batch_size=None)
    loggers: list = [pl.loggers.CSVLogger(tmp, name="", version="")]
    if args.image_logger:  # a logger that takes the heatmap image (every variant has it: its own cost is not SMD's)
        loggers.append(pl.loggers.TensorBoardLogger(tmp, name="tb", version=""))
    trainer = pl.Trainer(
        accelerator=args.device,
        devices=1,
        precision=args.precision,
        max_steps=args.steps,
        logger=loggers,
        log_every_n_steps=args.log_every,
        callbacks=[*callbacks, Timer()],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp,
    )
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model, data)
    steps = times[args.warmup :]
    spent = [b - a for a, b in zip(hook_marks[args.warmup - 1 :], hook_marks[args.warmup :])]
    out = {
        "seconds_per_step": statistics.fmean(steps),
        "hook_seconds_per_step": statistics.fmean(spent) if smd is not None and spent else 0.0,
        "peak_mib": (torch.cuda.max_memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 2**20,
        "params": sum(p.numel() for p in model.parameters()),
        "threads": torch.get_num_threads(),
        "smd_extra_bytes": (smd.summary().get("extra_memory_bytes") or 0) if smd is not None else 0,
        "tracked": len(smd.detection.units) if smd is not None and smd.detection is not None else 0,
        # heatmaps drawn during the timed steps (the one at the end of fit is not in any step)
        "heatmaps": smd._fit.heatmaps - 1 if smd is not None and smd._fit.heatmaps else 0,
        "heatmap_seconds": smd._fit.heatmap_seconds - smd._fit.heatmap_last_seconds if smd is not None and smd._fit.heatmaps else 0.0,
    }
    if run_wandb is not None:
        run_wandb.finish()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=None, help="default: 32 on the CPU, 256 on CUDA")
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--depth", type=int, choices=(18, 50), default=None, help="default: 18 on the CPU, 50 on CUDA")
    parser.add_argument("--width", type=int, default=64, help="channels of the first stage (ResNet: 64)")
    parser.add_argument("--precision", default=None, help="default: 32-true on the CPU, 16-mixed on CUDA")
    parser.add_argument("--log-every", type=int, default=10, help="the Trainer's log_every_n_steps (SMD drains and logs there)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--variants", nargs="*", default=VARIANTS)
    parser.add_argument(
        "--no-image-logger", dest="image_logger", action="store_false",
        help="CSV only (by default every variant also has a TensorBoard logger, which takes SMD's heatmap images)",
    )  # fmt: skip
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    cuda = args.device == "cuda"
    args.batch = args.batch or (256 if cuda else 32)
    args.depth = args.depth or (50 if cuda else 18)
    args.precision = args.precision or ("16-mixed" if cuda else "32-true")
    if args.child:
        print("RESULT " + json.dumps(child(args)), flush=True)
        return
    variants = list(args.variants)
    try:
        import wandb  # noqa: F401
    except ImportError:
        skipped = [v for v in variants if v.startswith("wandb")]
        variants = [v for v in variants if not v.startswith("wandb")]
        if skipped:
            print(f"(wandb is not installed: {', '.join(skipped)} skipped; pip install wandb)")
    results: dict[str, list[dict]] = {v: [] for v in variants}
    passthrough = [
        f"--steps={args.steps}", f"--warmup={args.warmup}", f"--batch={args.batch}", f"--size={args.size}", f"--depth={args.depth}",
        f"--width={args.width}", f"--precision={args.precision}", f"--log-every={args.log_every}", f"--device={args.device}",
        *([] if args.image_logger else ["--no-image-logger"]),
    ]  # fmt: skip
    env = dict(os.environ, WANDB_MODE="offline", WANDB_SILENT="true")
    for r in range(args.repeats):
        for v in variants:
            proc = subprocess.run([sys.executable, os.path.abspath(__file__), f"--child={v}", *passthrough], capture_output=True, text=True, env=env)
            line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
            if proc.returncode or not line:
                sys.exit(f"variant {v} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
            results[v].append(json.loads(line[0][7:]))
            print(f"  repeat {r + 1}/{args.repeats} {v:<16} {results[v][-1]['seconds_per_step'] * 1e3:8.1f} ms/step", file=sys.stderr, flush=True)
    first = next(iter(results.values()))[0]
    device = torch.cuda.get_device_name() if cuda else f"CPU, {first['threads']} threads"
    print(
        f"ResNet-{args.depth}-like ({first['params'] / 1e6:.1f} M parameters), batch {args.batch}x3x{args.size}x{args.size}, "
        f"{args.precision}, {device}; {args.steps} steps ({args.warmup} warm-up), median of {args.repeats} runs"
    )
    base_t = statistics.median(x["seconds_per_step"] for x in results["none"]) if "none" in results else None
    base_m = statistics.median(x["peak_mib"] for x in results["none"]) if "none" in results else None
    print(f"| {'variant':<16} | {'ms/step':>8} | {'steps/s':>8} | {'vs none':>8} | {'in SMD hooks':>12} | {'extra peak MiB':>14} | {'SMD buffers MiB':>15} |")
    print(f"|{'-' * 18}|{'-' * 10}|{'-' * 10}|{'-' * 10}|{'-' * 14}|{'-' * 16}|{'-' * 17}|")
    for v in variants:
        t = statistics.median(x["seconds_per_step"] for x in results[v])
        m = statistics.median(x["peak_mib"] for x in results[v])
        ratio = f"{t / base_t:.3f}x" if base_t else "-"
        extra = f"{m - base_m:+.0f}" if base_m is not None else "-"
        own = results[v][0]["smd_extra_bytes"] / 2**20
        own_s = f"{own:.1f}" if v.startswith("smd") else ""
        hook = statistics.median(x["hook_seconds_per_step"] / x["seconds_per_step"] for x in results[v])
        hook_s = f"{hook:.2%}" if v.startswith("smd") else ""
        print(f"| {v:<16} | {t * 1e3:>8.1f} | {1 / t:>8.2f} | {ratio:>8} | {hook_s:>12} | {extra:>14} | {own_s:>15} |")
    print(
        "ms/step: mean over the steps after warm-up (log steps included), median over the runs; in SMD hooks: share of "
        "the step spent inside SMDCallback's hooks and the recorder's optimizer hooks, measured in the same steps"
        + (" (the heatmaps drawn during training included)" if args.image_logger else "")
    )
    for v in variants:
        if v.startswith("smd") and args.image_logger:
            drawn = statistics.median(x["heatmaps"] for x in results[v])
            share = statistics.median(x["heatmap_seconds"] / (x["seconds_per_step"] * args.steps) for x in results[v])
            print(f"{v}: {drawn:g} heatmap(s) drawn during training (median), {share:.2%} of its time (within the hooks' share)")


if __name__ == "__main__":
    main()
