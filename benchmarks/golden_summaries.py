"""Golden runs: the summary JSON of fixed, seeded runs, for checking that a refactoring changes no figure.

    python benchmarks/golden_summaries.py --out golden_before        # on the old code
    python benchmarks/golden_summaries.py --out golden_after         # on the new code
    python benchmarks/golden_summaries.py --compare golden_before golden_after

Each run writes its ``smd_summary.json``; the script keeps a copy without the fields that differ between two
runs of the same code (``run_id``, ``started_at`` and the paths of the run's own directory). ``--compare``
says, per scenario, whether the two copies are byte-identical, and prints the first differing lines if not
(exit 1). Floating-point results are reproducible on one machine, not across CPU models: compare runs made on
the same machine.

Scenarios (each a few seconds on 2 CPU cores):

- ``quickstart``: ``examples/quickstart.py`` at its CI size (SGD with momentum, a CSV logger);
- ``per_filter``: ``SMDCallback(per_filter=True, track_distance=True)`` on a four-conv net under AdamW whose learning
  rate drops ×0.2 at step 400 of 700 (a re-equilibration; the decoupled decay's update balance);
- ``resumed``: SGD with momentum on a ``Linear → BatchNorm1d`` head, stopped at step 200 by a checkpoint and resumed
  from it to step 450 by a new Trainer;
- ``monitor``: :class:`~lightning_smd.SMDMonitor` in a plain loop, Adam with coupled L2 (a per-layer prediction
  from the measured gradient statistics), measuring every second step, the loss observed;
- ``diverged``: :class:`~lightning_smd.SMDMonitor` with SGD whose weights are made NaN at step 90;
- ``no_decay``: ``SMDCallback(on_no_equilibrium="stop")`` on SGD without weight decay on one layer group.
"""

from __future__ import annotations

import argparse
import difflib
import glob
import json
import os
import shutil
import subprocess
import sys
import tempfile
import warnings
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SCENARIOS = ("quickstart", "per_filter", "resumed", "monitor", "diverged", "no_decay")
#: Fields that differ between two runs of the same code.
VOLATILE = ("run_id", "started_at")


def _lit(net: Any, optimizer: Any, scheduler: Any = None) -> Any:
    import pytorch_lightning as pl
    import torch.nn.functional as F

    class Lit(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = net

        def forward(self, x: Any) -> Any:
            return self.net(x)

        def training_step(self, batch: Any, batch_idx: int) -> Any:
            x, y = batch
            return F.cross_entropy(self(x), y)

        def configure_optimizers(self) -> Any:
            opt = optimizer(self.parameters() if not hasattr(optimizer, "groups") else optimizer.groups(self.net))
            if scheduler is None:
                return opt
            return {"optimizer": opt, "lr_scheduler": {"scheduler": scheduler(opt), "interval": "step"}}

    return Lit()


def _trainer(root: str, steps: int, callbacks: list, **kwargs: Any) -> Any:
    import logging

    import pytorch_lightning as pl
    from pytorch_lightning.loggers import CSVLogger

    for name in ("lightning.pytorch", "pytorch_lightning", "lightning.fabric", "lightning_fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    return pl.Trainer(
        max_steps=steps,
        accelerator="cpu",
        devices=1,
        logger=CSVLogger(root, name="run", version=0),
        callbacks=callbacks,
        log_every_n_steps=25,
        enable_progress_bar=False,
        enable_model_summary=False,
        **kwargs,
    )


def _loader(stream: Any) -> Any:
    from torch.utils.data import DataLoader

    return DataLoader(stream, batch_size=None)


def run_quickstart(root: str) -> str:
    env = {**os.environ, "SMD_EXAMPLE_FAST": "1"}
    subprocess.run([sys.executable, os.path.join(ROOT, "examples", "quickstart.py"), "--out", root], check=True, env=env, capture_output=True)
    return _newest(root)


def run_per_filter(root: str) -> str:
    import pytorch_lightning as pl
    import torch

    from lightning_smd import SMDCallback
    from lightning_smd.demo import TeacherStream, ThinConvNet, decayed_groups

    pl.seed_everything(3, verbose=False)
    net = ThinConvNet()

    class Opt:
        groups = staticmethod(lambda n: decayed_groups(n, 1.0))

        def __call__(self, groups: Any) -> Any:
            return torch.optim.AdamW(groups, lr=0.01)

    model = _lit(net, Opt(), lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=400, gamma=0.2))
    smd = SMDCallback(per_filter=True, track_distance=True, verbose=False)
    _trainer(root, 700, [smd], enable_checkpointing=False).fit(model, _loader(TeacherStream(ThinConvNet.input_shape, seed=3)))
    return str(smd.summary_file)


def run_resumed(root: str) -> str:
    import pytorch_lightning as pl
    import torch
    from pytorch_lightning.callbacks import ModelCheckpoint

    from lightning_smd import SMDCallback
    from lightning_smd.demo import HeadNet, TeacherStream

    def model() -> Any:
        pl.seed_everything(5, verbose=False)
        return _lit(HeadNet(), lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=1e-2))

    ckpt = ModelCheckpoint(dirpath=os.path.join(root, "ckpt"), every_n_train_steps=200, save_top_k=-1)
    first = SMDCallback(verbose=False)
    _trainer(root, 200, [first, ckpt]).fit(model(), _loader(TeacherStream(HeadNet.input_shape, seed=5)))
    path = sorted(glob.glob(os.path.join(root, "ckpt", "*.ckpt")))[-1]
    second = SMDCallback(verbose=False)
    _trainer(root, 450, [second], enable_checkpointing=False).fit(model(), _loader(TeacherStream(HeadNet.input_shape, seed=5)), ckpt_path=path)
    return str(second.summary_file)


def run_monitor(root: str) -> str:
    import torch

    from lightning_smd import SMDMonitor
    from lightning_smd.demo import HeadNet, TeacherStream

    torch.manual_seed(7)
    net = HeadNet()
    opt = torch.optim.Adam(net.parameters(), lr=1e-3, weight_decay=5e-4)
    stream = iter(TeacherStream(HeadNet.input_shape, seed=7))
    monitor = SMDMonitor(net, opt, log_every_n_steps=20, every_n_steps=2, max_steps=300)
    return _plain_loop(root, net, opt, stream, monitor, 300)


def _plain_loop(root: str, net: Any, opt: Any, stream: Any, monitor: Any, steps: int, after_step: Any = None) -> str:
    import torch.nn.functional as F

    for step in range(steps):
        x, y = next(stream)
        loss = F.cross_entropy(net(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if after_step is not None:
            after_step(step)
        monitor.observe_loss(loss)
        if monitor.should_log(step):
            monitor.metrics()
    path = os.path.join(root, "smd_summary.json")
    monitor.close(summary_path=path)
    return path


def run_diverged(root: str) -> str:
    import torch

    from lightning_smd import SMDMonitor
    from lightning_smd.demo import TeacherStream, ThinConvNet

    torch.manual_seed(11)
    net = ThinConvNet()
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-3)
    stream = iter(TeacherStream(ThinConvNet.input_shape, seed=11))
    monitor = SMDMonitor(net, opt, log_every_n_steps=25, max_steps=150)

    def poison(step: int) -> None:
        if step == 89:
            with torch.no_grad():
                net.conv2.weight[0, 0, 0, 0] = float("nan")

    return _plain_loop(root, net, opt, stream, monitor, 150, poison)


def run_no_decay(root: str) -> str:
    import pytorch_lightning as pl
    import torch

    from lightning_smd import SMDCallback
    from lightning_smd.demo import HeadNet, TeacherStream

    pl.seed_everything(13, verbose=False)
    net = HeadNet()

    class Opt:
        groups = staticmethod(lambda n: [{"params": list(n.parameters()), "weight_decay": 0.0}])

        def __call__(self, groups: Any) -> Any:
            return torch.optim.SGD(groups, lr=0.1, momentum=0.9)

    smd = SMDCallback(on_no_equilibrium="stop", verbose=False)
    _trainer(root, 400, [smd], enable_checkpointing=False).fit(_lit(net, Opt()), _loader(TeacherStream(HeadNet.input_shape, seed=13)))
    return str(smd.summary_file)


def _newest(root: str) -> str:
    found = sorted(glob.glob(os.path.join(root, "**", "smd_summary*.json"), recursive=True), key=os.path.getmtime)
    if not found:
        raise RuntimeError(f"no summary written under {root}")
    return found[-1]


def normalized(path: str, root: str) -> str:
    """The summary's JSON without its volatile fields, the run's directory written as ``<run>``."""
    with open(path, encoding="utf-8") as fh:
        data = json.load(fh)
    for key in VOLATILE:
        data.pop(key, None)
    text = json.dumps(data, indent=2, sort_keys=False)
    return text.replace(os.path.realpath(root), "<run>").replace(root, "<run>") + "\n"


def write(out: str, scenarios: list[str]) -> None:
    os.makedirs(out, exist_ok=True)
    warnings.simplefilter("ignore")
    for name in scenarios:
        root = tempfile.mkdtemp(prefix=f"smd_golden_{name}_")
        try:
            path = globals()[f"run_{name}"](root)
            with open(os.path.join(out, f"{name}.json"), "w", encoding="utf-8") as fh:
                fh.write(normalized(path, root))
            print(f"{name}: written")
        finally:
            shutil.rmtree(root, ignore_errors=True)


def compare(a: str, b: str) -> int:
    failed = 0
    for name in SCENARIOS:
        pa, pb = os.path.join(a, f"{name}.json"), os.path.join(b, f"{name}.json")
        if not (os.path.exists(pa) and os.path.exists(pb)):
            print(f"{name}: missing in {'the first' if not os.path.exists(pa) else 'the second'} directory")
            failed += 1
            continue
        with open(pa, "rb") as fa, open(pb, "rb") as fb:
            ra, rb = fa.read(), fb.read()
        if ra == rb:
            print(f"{name}: byte-identical ({len(ra):,} bytes)")
            continue
        failed += 1
        diff = list(difflib.unified_diff(ra.decode().splitlines(), rb.decode().splitlines(), a, b, lineterm="", n=1))
        print(f"{name}: DIFFERS ({sum(1 for x in diff if x.startswith(('+', '-')) and not x.startswith(('+++', '---')))} lines)")
        print("\n".join(diff[:40]))
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="directory for the normalized summaries")
    parser.add_argument("--only", nargs="+", choices=SCENARIOS, help="these scenarios only")
    parser.add_argument("--compare", nargs=2, metavar=("BEFORE", "AFTER"), help="compare two directories written by --out")
    args = parser.parse_args(argv)
    if args.compare:
        return compare(*args.compare)
    if not args.out:
        parser.error("give --out DIR or --compare BEFORE AFTER")
    write(args.out, list(args.only or SCENARIOS))
    return 0


if __name__ == "__main__":
    sys.exit(main())
