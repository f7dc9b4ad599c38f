"""Run by tests/test_distributed.py: one training run, single-process or 2-process DDP on CPU (gloo).

    python tests/ddp_script.py OUT_DIR STRATEGY DEVICES [extra[,extra]]   # extras: count, reference, raise

``SMD_ACCELERATOR`` (default ``cpu``) picks Lightning's accelerator: ``benchmarks/gpu_check.py`` runs it on a GPU,
where ``fsdp1`` (Lightning's ``FSDPStrategy``, GPU only) is a strategy too.

The global batch is the same whatever the number of processes (each rank takes every world_size-th sample
of each global batch of 16), the model normalizes per sample (GroupNorm) and computes in float64, so DDP must
reproduce the single-process statistics up to rounding.
"""

import os
import sys
import warnings

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
warnings.simplefilter("ignore")

import pytorch_lightning as pl  # noqa: E402
import torch  # noqa: E402
from helpers import Module, sgd  # noqa: E402
from torch import nn  # noqa: E402
from torch.nn import functional as F  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from lightning_smd import SMDCallback  # noqa: E402
from lightning_smd.demo import NoisyTemplates  # noqa: E402

GLOBAL_BATCH = 16


class GroupNormNet(nn.Module):
    """conv2 has a single filter: sharded over 2 ranks along dim 0, one rank holds an empty shard."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.gn1 = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.GroupNorm(4, 8)
        self.conv2, self.gn2 = nn.Conv2d(8, 1, 3, padding=1, bias=False), nn.GroupNorm(1, 1)
        self.conv3, self.gn3 = nn.Conv2d(1, 16, 3, padding=1, stride=2, bias=False), nn.GroupNorm(4, 16)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = F.relu(self.gn1(self.conv1(x)))
        x = F.relu(self.gn2(self.conv2(x)))
        x = F.relu(self.gn3(self.conv3(x)))
        return self.fc(x.mean((2, 3)))


class ShardedModule(Module):
    """Each rank takes its share (every world_size-th sample) of every global batch, in order."""

    def __init__(self, net, data, **kw):
        super().__init__(net, **kw)
        self.data = data

    def configure_model(self):
        if isinstance(self.trainer.strategy, pl.strategies.ModelParallelStrategy):
            from torch.distributed.fsdp import fully_shard

            for m in (self.net.conv1, self.net.conv2, self.net.conv3, self.net.fc):
                fully_shard(m)
            fully_shard(self.net)

    def train_dataloader(self):
        world, rank = self.trainer.world_size, self.trainer.global_rank
        x, y = self.data
        return DataLoader(TensorDataset(x[rank::world], y[rank::world]), batch_size=GLOBAL_BATCH // world, shuffle=False)


class Reference(pl.Callback):
    """Extra ``reference``: each tracked weight's angular update and norm after every step, in float64 from the
    whole tensor (``full_tensor()`` of an FSDP2 DTensor; FSDP1's ``use_orig_params`` views are whole on one rank),
    independently of SMD: the sharded run is checked against itself, not against another run's trajectory."""

    NAMES = ("conv1.weight", "conv2.weight", "conv3.weight")

    def __init__(self) -> None:
        self.angles: dict[str, list[float]] = {n: [] for n in self.NAMES}
        self.norms: dict[str, list[float]] = {n: [] for n in self.NAMES}

    def _whole(self, pl_module):
        params = dict(pl_module.net.named_parameters())
        out = {}
        for n in self.NAMES:
            t = params[n].detach()
            t = t.full_tensor() if hasattr(t, "full_tensor") else t
            out[n] = t.to(torch.float64).flatten().cpu()
        return out

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self._before = self._whole(pl_module)

    def on_train_batch_end(self, trainer, pl_module, *args):
        after = self._whole(pl_module)
        for n in self.NAMES:
            a, b = self._before[n], after[n]
            ua, ub = a / a.norm(), b / b.norm()
            self.angles[n].append(float(2 * torch.atan2((ua - ub).norm(), (ua + ub).norm())))
            self.norms[n].append(float(b.norm()))


def main() -> None:
    out, strategy, devices = sys.argv[1], sys.argv[2], int(sys.argv[3])
    # ModelParallelStrategy (FSDP2) runs float32 only: "auto32" is its single-process reference
    dtype = torch.float32 if strategy in ("fsdp1", "fsdp2", "auto32") else torch.float64
    if strategy == "fsdp2":
        strategy = pl.strategies.ModelParallelStrategy()
    elif strategy == "fsdp1":
        strategy = pl.strategies.FSDPStrategy(use_orig_params=True)
    elif strategy == "auto32":
        strategy = "auto"
    extras = set(sys.argv[4].split(",")) if len(sys.argv) > 4 else set()
    torch.set_num_threads(1)
    stream = iter(NoisyTemplates(batch_size=GLOBAL_BATCH, size=8, dtype=dtype))
    batches = [next(stream) for _ in range(40)]
    data = (torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches]))
    torch.manual_seed(0)
    model = ShardedModule(GroupNormNet(), data, optimizer=sgd(lr=0.2, weight_decay=0.01))
    smd = SMDCallback(verbose=False, window=10, keep_history="reference" in extras, on_no_equilibrium="raise" if "raise" in extras else "warn")
    reference = Reference() if "reference" in extras else None
    trainer = pl.Trainer(
        accelerator=os.environ.get("SMD_ACCELERATOR", "cpu"),
        devices=devices,
        strategy=strategy,
        max_steps=40,
        precision="64-true" if dtype == torch.float64 else "32-true",
        log_every_n_steps=5,
        logger=pl.loggers.CSVLogger(out, name="", version=""),
        callbacks=[smd] + ([reference] if reference else []),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=out,
        use_distributed_sampler=False,
    )
    if "count" in extras:  # count the collectives SMDCallback issues while it drains, per log interval
        import torch.distributed as dist

        from lightning_smd.frontends.callback import SMDCallback as C

        calls = {"n": 0, "flushes": 0}
        real = dist.all_reduce

        def counting(*a, **k):
            calls["n"] += 1
            return real(*a, **k)

        flush = C._flush

        def counted_flush(self, trainer, step):
            dist.all_reduce = counting
            try:
                flush(self, trainer, step)
            finally:
                dist.all_reduce = real
            calls["flushes"] += 1

        C._flush = counted_flush
    trainer.fit(model)
    if "count" in extras:  # one file per rank: two processes writing one pipe may interleave their lines
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, f"collectives_rank{trainer.global_rank}.txt"), "w") as fh:
            fh.write(f"COLLECTIVES rank={trainer.global_rank} all_reduce={calls['n']} flushes={calls['flushes']}\n")
    if reference is not None and trainer.global_rank == 0:
        got = {n: smd.diagnostics.unit_history(f"net.{n}") for n in Reference.NAMES}
        worst = 0.0
        for n in Reference.NAMES:
            for mine, ref in ((got[n]["angular_update"], reference.angles[n]), (got[n]["weight_norm"], reference.norms[n])):
                assert len(mine) == len(ref) == 40, (n, len(mine), len(ref))
                worst = max(worst, max(abs(float(x) - y) / max(abs(y), 1e-30) for x, y in zip(mine, ref)))
        print(f"REFERENCE {len(Reference.NAMES)} layers x 40 steps, largest relative difference {worst:.1e}")
    if trainer.global_rank == 0:
        print("RESULT-OK")


if __name__ == "__main__":
    main()
