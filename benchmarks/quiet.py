"""A quiet CPU Trainer for the benchmarks' fits (they read the callback's summary, not Lightning's output)."""

from __future__ import annotations


def quiet_trainer(max_steps: int, callbacks: list) -> object:
    """A CPU ``pytorch_lightning.Trainer`` for benchmark fits: one device, no logger, checkpoint, progress bar or
    model summary, and Lightning's and Python's warnings silenced (the benchmarks read the callback's summary)."""
    import logging
    import warnings

    import pytorch_lightning as pl

    warnings.simplefilter("ignore")
    for name in ("lightning.pytorch", "pytorch_lightning", "lightning.fabric", "lightning_fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    return pl.Trainer(
        max_steps=max_steps,
        accelerator="cpu",
        devices=1,
        logger=False,
        callbacks=callbacks,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
