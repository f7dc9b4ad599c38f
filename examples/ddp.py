"""SMDCallback under DDP: every rank measures, rank zero logs and writes the summary, decisions agree.

    python examples/ddp.py                          # full size: all GPUs if present, else 2 CPU processes (gloo); 2,000 steps
    SMD_EXAMPLE_FAST=1 python examples/ddp.py       # CI size: 2 CPU processes, 800 steps of a narrower net

With ``strategy="ddp"`` Lightning re-launches this script once per extra process; the per-rank batch here is
half the single-process batch, so the global batch (and the SMD statistics) match a one-process run.
For FSDP2 use ``ModelParallelStrategy`` with ``fully_shard`` (see the README's distributed section).

What you should see, in both sizes: the quickstart's story (the same network and settings, relaxation time 100
steps) with one table, one verdict line and one summary file, all from rank zero; the verdict ``equilibrium``.
"""

from __future__ import annotations

import argparse
import os

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from lightning_smd import SMDCallback
from lightning_smd.demo import NoisyTemplates

from quickstart import ConvNet  # noqa: E402  (the quickstart's model)


def main(argv: list[str] | None = None) -> None:
    fast = os.environ.get("SMD_EXAMPLE_FAST", "") not in ("", "0")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=800 if fast else 2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="smd_runs/ddp")
    args = parser.parse_args(argv)
    gpu = torch.cuda.is_available() and not fast
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # two CPU processes on a small machine
    pl.seed_everything(args.seed, verbose=False)
    smd = SMDCallback()
    trainer = pl.Trainer(
        max_steps=args.steps,
        accelerator="gpu" if gpu else "cpu",
        devices="auto" if gpu else 2,
        strategy="ddp",
        logger=pl.loggers.CSVLogger(args.out, name="", version=""),
        callbacks=[smd],
        log_every_n_steps=20,
        enable_checkpointing=False,
        enable_progress_bar=False,
    )
    world = trainer.world_size
    # same task on every rank, each rank its own samples: together they form the global batch
    data = DataLoader(NoisyTemplates(batch_size=64 // world, seed=args.seed, stream=trainer.global_rank), batch_size=None)
    trainer.fit(ConvNet(width=16 if fast else 32), data)
    if trainer.is_global_zero:
        print(f"verdict: {smd.summary()['verdict']} (summary: {smd.summary_file})")


if __name__ == "__main__":
    main()
