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


def run_all(run: object, todo: list, workers: int, json_path: str | None = None) -> list:
    """``run(*args)`` for every ``args`` of ``todo``, in ``workers`` spawned processes (in this one for 1), in order;
    the results also written to ``json_path`` as JSON when given."""
    import json
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    if workers > 1:
        with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
            results = list(pool.map(run, *zip(*todo)))
    else:
        results = [run(*args) for args in todo]
    if json_path:
        with open(json_path, "w") as f:
            json.dump(results, f, indent=1)
    return results


def mean_range(values: list[float]) -> str:
    """``mean (min–max)`` to three decimals, ``-`` for none."""
    if not values:
        return "-"
    return f"{sum(values) / len(values):.3f} ({min(values):.3f}–{max(values):.3f})"


def sweep_args(doc: str, tasks: object, optimizers: object, seeds: int, steps: int, argv: list | None = None) -> object:
    """The command line of a sweep over tasks, optimizers and seeds (``--seeds --steps --workers --tasks --optimizers
    --json``), parsed."""
    import argparse

    parser = argparse.ArgumentParser(description=doc.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=seeds)
    parser.add_argument("--steps", type=int, default=steps)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--tasks", nargs="*", default=list(tasks), choices=list(tasks))
    parser.add_argument("--optimizers", nargs="*", default=list(optimizers), choices=list(optimizers))
    parser.add_argument("--json", help="also write every run's figures here")
    return parser.parse_args(argv)


def fit_demo_task(task: str, optimizer: object, weight_decay: float, seed: int, steps: int, smd: object) -> object:
    """A real fit of :mod:`lightning_smd.demo`'s ``task`` (``thin``: ``ThinConvNet``, ``head``: ``HeadNet``) on a
    ``TeacherStream`` with 20 % label noise (verdict_reliability's healthy cells), one thread, ``seed``;
    ``optimizer(groups)`` makes the optimizer of :func:`lightning_smd.demo.decayed_groups` (``weight_decay`` on the
    normalized weights only). Returns the module."""
    import pytorch_lightning as pl
    import torch
    from torch.nn import functional as F
    from torch.utils.data import DataLoader

    from lightning_smd.demo import HeadNet, TeacherStream, ThinConvNet, decayed_groups

    torch.set_num_threads(1)

    class Task(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = {"thin": ThinConvNet, "head": HeadNet}[task]()

        def training_step(self, batch: object, batch_idx: int) -> torch.Tensor:
            x, y = batch
            return F.cross_entropy(self.net(x), y)

        def configure_optimizers(self) -> object:
            return optimizer(decayed_groups(self.net, weight_decay))

    torch.manual_seed(seed)
    model = Task()
    quiet_trainer(steps, [smd]).fit(model, DataLoader(TeacherStream(model.net.input_shape, seed=seed, flip=0.2), batch_size=None))
    return model
