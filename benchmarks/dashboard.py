"""What a user sees at ResNet-50 scale (53 tracked convs): how many live charts, where the heatmap lands,
the progress bar, the end table, and what the heatmap costs per log step.

    python benchmarks/dashboard.py [--steps 300] [--out smd_runs/dashboard]

Trains a ResNet-50-like network (Bottlenecks 3-4-6-3, base width 8, 16x16 inputs, CPU) with
``SMDCallback()`` at its defaults and four loggers at once (CSV, TensorBoard, MLflow's file store, W&B
offline), then reads each logger's own files back and prints:

- the number of charts in the TensorBoard custom-scalars layout's open category and in the W&B
  workspace's open section (the live charts), and the per-layer charts in the collapsed ones;
- the heatmap images found in each logger's output;
- the progress-bar entries at the end, and the height of the end-of-fit table;
- the heatmap's cost per drawing (the figure from the host-side history, and its PNG) against the time of a
  training step, drawn here every ``heatmap_every_n_logs`` (10) log steps with ``heatmap_time_share=1.0`` (the
  default, 0.005, bounds the drawings during training to 0.5 % of the wall time: with it this short run would
  draw only at the end).
"""

from __future__ import annotations

import argparse
import glob
import os
import statistics
import sys
import time
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from overhead import ResNetLike  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--out", default="smd_runs/dashboard")
    parser.add_argument("--batch", type=int, default=16)
    args = parser.parse_args()
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("WANDB_SILENT", "true")
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    import pytorch_lightning as pl
    from torch.nn import functional as F
    from torch.utils.data import DataLoader

    from lightning_smd import SMDCallback
    from lightning_smd.demo import NoisyTemplates
    from lightning_smd.frontends.callback import HEATMAP_FIRST_SECONDS
    from lightning_smd.io.dashboard import render_rgb
    from lightning_smd.io.loggers import tensorboard_layout
    from lightning_smd.io.report import TABLE_ROWS

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = ResNetLike(depth=50, width=8)

        def training_step(self, batch, batch_idx):
            x, y = batch
            loss = F.cross_entropy(self.net(x), y)
            self.log("train_loss", loss, prog_bar=True)
            return loss

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.2, momentum=0.9, weight_decay=5e-3)

    torch.manual_seed(0)
    out = os.path.abspath(args.out)
    loggers = [
        pl.loggers.CSVLogger(out, name="csv", version=0),
        pl.loggers.TensorBoardLogger(out, name="tb", version=0),
        pl.loggers.MLFlowLogger(experiment_name="smd-dashboard", tracking_uri=f"file:{os.path.join(out, 'mlruns')}"),
        pl.loggers.WandbLogger(project="smd-dashboard", save_dir=out, offline=True),
    ]
    smd = SMDCallback(verbose=False, heatmap_time_share=1.0)  # every 10th log step: the unbounded cost
    step_times: list[float] = []
    heatmap_calls: list[float] = []
    log_heatmap = smd._log_heatmap

    def timed_heatmap(*a, **k):  # drawing, and each logger's own PNG encoding and writing
        t0 = time.perf_counter()
        log_heatmap(*a, **k)
        heatmap_calls.append(time.perf_counter() - t0)

    smd._log_heatmap = timed_heatmap

    class StepTimer(pl.Callback):
        def on_train_batch_start(self, *a):
            self.t0 = time.perf_counter()

        def on_train_batch_end(self, *a):
            step_times.append(time.perf_counter() - self.t0)

    trainer = pl.Trainer(
        max_steps=args.steps,
        accelerator="cpu",
        logger=loggers,
        callbacks=[smd, StepTimer()],
        log_every_n_steps=10,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=False,
    )
    data = DataLoader(NoisyTemplates(batch_size=args.batch, size=16, seed=0), batch_size=None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(Module(), data)
    names = [u.name for u in smd.diagnostics.units]
    print(f"tracked layers: {len(names)}; steps: {trainer.global_step}; verdict: {smd.summary()['verdict']}")

    layout = tensorboard_layout(loggers[1], names, "ratio")
    open_charts = sum(len(c) for _, closed, c in layout if not closed)
    closed_charts = sum(len(c) for _, closed, c in layout if closed)
    print(f"TensorBoard layout: {open_charts} live charts (open), {closed_charts} per-layer charts (collapsed)")
    try:
        from lightning_smd.io.workspace import build_workspace

        ws = build_workspace("ENTITY", "PROJECT", names)
        for s in ws.sections:
            print(f"W&B workspace section {s.name!r}: {len(s.panels)} panels ({'open' if s.is_open else 'collapsed'})")
    except ImportError as err:
        print(f"W&B workspace: not built ({err})")

    tb_images = 0
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(loggers[1].log_dir, size_guidance={"images": 0})
    acc.Reload()
    tb_images = len(acc.Images("smd/heatmap")) if "smd/heatmap" in acc.Tags().get("images", []) else 0
    mlflow_images = len(glob.glob(os.path.join(out, "mlruns", "*", "*", "artifacts", "smd", "heatmap_step*.png")))
    run_dir = loggers[3].experiment.dir.rsplit("/files", 1)[0]
    loggers[3].experiment.finish()
    wandb_images = len(glob.glob(os.path.join(run_dir, "files", "media", "images", "smd", "heatmap_*.png")))
    print(f"heatmap images: TensorBoard {tb_images}, MLflow {mlflow_images}, W&B offline {wandb_images}")

    bar = {k: v for k, v in trainer.progress_bar_metrics.items() if k.startswith("smd")}
    print(f"progress bar: {bar}")
    table = smd.format_summary()
    print(f"end table: {len(table.splitlines())} lines (at most {TABLE_ROWS} layer rows)")
    print(table)

    draws = []
    for _ in range(5):
        t0 = time.perf_counter()
        render_rgb(smd.session.heatmap())
        draws.append(time.perf_counter() - t0)
    step = statistics.median(step_times[10:])
    per_call = statistics.median(heatmap_calls)
    print(
        f"heatmap of {len(names)} layers x {len(smd.session.history)} log steps: {statistics.median(draws) * 1e3:.0f} ms to draw "
        f"(once); {per_call * 1e3:.0f} ms per drawing with the 3 image loggers' own encoding ({len(heatmap_calls)} drawings, "
        f"median) = {per_call / step:.1f} training steps of {step * 1e3:.0f} ms; drawn every 10th log step (every 100 steps "
        f"here): {per_call / 10:.3f} s per log step, {per_call / (100 * step):.1%} of the training time"
    )
    print(
        f"at the default heatmap_time_share=0.005 (this run sets 1.0): the drawings during training take at most 0.5 % of "
        f"its wall time, the first after {HEATMAP_FIRST_SECONDS / 0.005:.0f} s of training, then at most one per "
        f"{per_call / 0.005:.0f} s here"
    )

if __name__ == "__main__":
    main()
