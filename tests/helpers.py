"""Small models and a Lightning wrapper shared by the tests."""

from __future__ import annotations

import functools
import os
import subprocess
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import pytorch_lightning as pl
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader

from lightning_smd.demo import HeadNet, NoisyTemplates, TeacherStream, decayed_groups

IMAGE = 8  # image height/width used by the test models


class SmallConvNet(nn.Module):
    """conv-BN-ReLU x3 (one conv with a bias BN cancels, one ReLU *before* BN), pooling, classifier."""

    def __init__(self, width: int = 8, classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, bias=True)  # bias cancelled by BN
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, 2 * width, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(2 * width)  # conv -> ReLU -> pool -> BN: still invariant
        self.fc = nn.Linear(2 * width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.max_pool2d(F.relu(self.bn2(self.conv2(x))), 2)
        x = self.bn3(F.max_pool2d(F.relu(self.conv3(x)), 2))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(F.relu(x), 1), 1))


class PlainConvNet(nn.Module):
    """conv -> BN -> ReLU x3 with strided convs (no ReLU before a BatchNorm, so no dead filters)."""

    def __init__(self, width: int = 8, classes: int = 10) -> None:
        super().__init__()
        w = width
        self.conv1, self.bn1 = nn.Conv2d(3, w, 3, padding=1, bias=False), nn.BatchNorm2d(w)
        self.conv2, self.bn2 = nn.Conv2d(w, 2 * w, 3, padding=1, stride=2, bias=False), nn.BatchNorm2d(2 * w)
        self.conv3, self.bn3 = nn.Conv2d(2 * w, 4 * w, 3, padding=1, stride=2, bias=False), nn.BatchNorm2d(4 * w)
        self.fc = nn.Linear(4 * w, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        x = F.relu(self.bn3(self.conv3(x)))
        return self.fc(x.mean((2, 3)))


def decay_only_conv_weights(params: Any, weight_decay: float) -> list[dict[str, Any]]:
    """Param groups: weight decay on the (normalized) conv weights only, none on BN, biases, classifier."""
    params = list(params)
    return [
        {"params": [p for p in params if p.dim() == 4], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() != 4], "weight_decay": 0.0},
    ]


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class SmallResNet(nn.Module):
    """A ResNet-18-like stem + 3 stages of one BasicBlock each, with 1x1 projection shortcuts."""

    def __init__(self, width: int = 8, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, width, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(width)
        self.layer1 = BasicBlock(width, width)
        self.layer2 = BasicBlock(width, 2 * width, stride=2)
        self.layer3 = BasicBlock(2 * width, 4 * width, stride=2)
        self.fc = nn.Linear(4 * width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn(self.stem(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class NoNormNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(F.adaptive_avg_pool2d(F.relu(self.conv(x)), 1).flatten(1))


def sgd(lr: float = 0.1, momentum: float = 0.9, weight_decay: float = 5e-3, **kw: Any) -> Callable:
    """A picklable optimizer factory (``ddp_spawn`` pickles the module)."""
    return functools.partial(torch.optim.SGD, lr=lr, momentum=momentum, weight_decay=weight_decay, **kw)


class Module(pl.LightningModule):
    """Wraps a plain ``nn.Module`` with a cross-entropy step and a configurable optimizer/scheduler. With ``decay``,
    the optimizer factory gets param groups: ``decay`` on the normalized weights, none on the rest
    (:func:`lightning_smd.demo.decayed_groups`)."""

    def __init__(self, net: nn.Module, optimizer: Callable | None = None, scheduler: Callable | None = None, decay: float | None = None) -> None:
        super().__init__()
        self.net = net
        self._optimizer = optimizer or sgd()
        self._scheduler = scheduler
        self._decay = decay

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> Any:
        opt = self._optimizer(self.parameters() if self._decay is None else decayed_groups(self.net, self._decay))
        if self._scheduler is None:
            return opt
        return {"optimizer": opt, "lr_scheduler": {"scheduler": self._scheduler(opt), "interval": "step"}}


#: The healthy cell of ``benchmarks/verdict_reliability.py`` that end-to-end tests build on: HeadNet, SGD with
#: momentum 0.9, lr 0.1, weight decay 2.5e-3 on the normalized weights (τ = 200 steps, the ratio relaxes with
#: τ_r = 100), a TeacherStream with 20 % label noise, 1,600 steps. Over 20 seeds of the sweep its largest |drift| is
#: 0.09 of the limit and its largest t·se 0.55 of it, steady ratios 0.974–1.033 (docs/verdict_reliability.md).
HEALTHY_STEPS = 1600


def healthy_module(lr: float = 0.1, weight_decay: float = 2.5e-3, scheduler: Callable | None = None, momentum: float = 0.9) -> Module:
    return Module(HeadNet(), optimizer=functools.partial(torch.optim.SGD, lr=lr, momentum=momentum), scheduler=scheduler, decay=weight_decay)


def teacher_loader(seed: int = 0, shape: tuple[int, ...] = HeadNet.input_shape, **kw: Any) -> DataLoader:
    """A persistent-noise stream (:class:`lightning_smd.demo.TeacherStream`)."""
    return DataLoader(TeacherStream(shape, seed=seed, **kw), batch_size=None)


def loader(seed: int = 0, batch_size: int = 32, dtype: torch.dtype = torch.float32) -> DataLoader:
    return DataLoader(NoisyTemplates(batch_size=batch_size, size=IMAGE, seed=seed, dtype=dtype), batch_size=None)


def trainer(tmp_path: Any, callbacks: list | None = None, max_steps: int = 20, logger: Any = True, **kw: Any) -> pl.Trainer:
    if logger is True:
        logger = pl.loggers.CSVLogger(str(tmp_path), name="", version="")
    opts: dict[str, Any] = dict(
        max_steps=max_steps,
        accelerator="cpu",
        devices=1,
        logger=logger,
        callbacks=callbacks or [],
        log_every_n_steps=5,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(tmp_path),
    )
    opts.update(kw)
    return pl.Trainer(**opts)


# ---------------------------------------------------------------------------------------------
# One way to train with the callback, one way to run a script: every test file uses these.
# ---------------------------------------------------------------------------------------------
class Fit(NamedTuple):
    smd: Any  # the SMDCallback
    warnings: list[str]  # the SMD warnings issued during the fit, in order (SMD038 left out, see ``counted``)
    trainer: pl.Trainer


#: The test models decay their BatchNorm gains through ``self.parameters()``, as most training scripts do, so every
#: fit says SMD038 (weight decay on gains and biases) at its start. It is tested in ``tests/test_groups.py``; the tests
#: that count the other warnings leave it out.
NOT_COUNTED = "[SMD038]"


def counted(msgs: Sequence[str]) -> list[str]:
    """``msgs`` without :data:`NOT_COUNTED`."""
    return [m for m in msgs if not m.endswith(NOT_COUNTED)]


def fit_smd(
    tmp_path: Any,
    model: pl.LightningModule,
    steps: int = 20,
    *,
    data: Any = None,
    smd: Any = None,
    trainer_kw: dict[str, Any] | None = None,
    callbacks: Sequence[Any] = (),
    **smd_kw: Any,
) -> Fit:
    """Train ``model`` for ``steps`` optimizer steps with an ``SMDCallback(verbose=False, **smd_kw)`` (or
    ``smd``) and ``callbacks``, a CSV logger under ``tmp_path`` and the test stream; records the SMD warnings."""
    from lightning_smd import SMDCallback, SMDWarning

    smd = smd if smd is not None else SMDCallback(**{"verbose": False, **smd_kw})
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        t = trainer(tmp_path, [smd, *callbacks], max_steps=steps, **(trainer_kw or {}))
        t.fit(model, loader() if data is None else data)
    return Fit(smd, counted([str(w.message) for w in record if issubclass(w.category, SMDWarning)]), t)


ROOT = Path(__file__).resolve().parents[1]


def run_python(
    args: Sequence[str], *, cwd: Any = ROOT, env: dict[str, str] | None = None, timeout: float = 280, check: bool = True
) -> subprocess.CompletedProcess:
    """Run ``python *args`` (a script and its arguments, or ``-c CODE``) in a fresh interpreter with W&B
    offline and, unless ``OMP_NUM_THREADS`` is set, one intra-op thread (as the suite's own fits, tests/conftest.py);
    ``check`` asserts exit status 0 and shows the ends of both streams otherwise. The timeout stays under the
    suite's per-test limit so that a hang is reported with its output."""
    full_env = dict({"OMP_NUM_THREADS": "1"}, **os.environ)
    full_env.update(WANDB_MODE="offline", **(env or {}))
    proc = subprocess.run([sys.executable, *map(str, args)], cwd=str(cwd), env=full_env, capture_output=True, text=True, timeout=timeout)
    if check:
        assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-4000:])
    return proc


def plan_columns(opt: torch.optim.Optimizer, rule: Any, lr: Any) -> dict[str, Any]:
    """The planned columns of ``opt``'s first param group as the schedule read-ahead gives them: ``lr`` per step, every
    other key the rule reads held at the group's value (a tuple key split as ``"betas.0"``)."""
    import numpy as np

    lr = np.asarray(lr, dtype=np.float64)
    cols: dict[str, Any] = {"lr": lr}
    for key in rule.keys:
        value = opt.param_groups[0].get(key)
        if key == "lr" or value is None:
            continue
        if isinstance(value, tuple):
            for i, x in enumerate(value):
                cols[f"{key}.{i}"] = np.full(len(lr), float(x))
        else:
            cols[key] = np.full(len(lr), float(value))
    return cols
