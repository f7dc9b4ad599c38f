"""Run by tests/test_distributed.py: StepRecorder on torch FSDP1 (flat ``use_orig_params`` shard views,
some empty) on CPU, without Lightning (whose FSDPStrategy runs on GPUs only).

    python tests/fsdp1_script.py OUT_DIR WORLD_SIZE

Writes OUT_DIR/angles_<world>.json (rank zero): per step and unit, the angular update and weight norm, the
recorder's and a float64 reference's from the whole tensors (gathered with ``summon_full_params``).
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402
from ddp_script import GLOBAL_BATCH, GroupNormNet  # noqa: E402
from torch.nn import functional as F  # noqa: E402

from lightning_smd.demo import NoisyTemplates  # noqa: E402
from lightning_smd.engine.measure import StepRecorder  # noqa: E402

UNITS = ["conv1.weight", "conv2.weight", "conv3.weight"]  # conv2 has one filter: an empty shard somewhere


def _whole(model: torch.nn.Module, world: int) -> dict[str, torch.Tensor]:
    """The tracked weights as whole tensors, in float64 (gathered from the shards under FSDP: a collective)."""
    if world == 1:
        return {n: p.detach().to(torch.float64).flatten().clone() for n, p in model.named_parameters() if n in UNITS}
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    with FSDP.summon_full_params(model, writeback=False):
        named = {n.replace("_fsdp_wrapped_module.", ""): p for n, p in model.named_parameters()}
        return {u: named[u].detach().to(torch.float64).flatten().clone() for u in UNITS}


def _angle(a: torch.Tensor, b: torch.Tensor) -> float:
    ua, ub = a / a.norm(), b / b.norm()
    return float(2 * torch.atan2((ua - ub).norm(), (ua + ub).norm()))


def run(rank: int, world: int, out: str) -> None:
    torch.set_num_threads(1)
    if world > 1:
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29561")
        dist.init_process_group("gloo", rank=rank, world_size=world)
    stream = iter(NoisyTemplates(batch_size=GLOBAL_BATCH, size=8))
    torch.manual_seed(0)
    model = GroupNormNet()
    if world > 1:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        model = FSDP(model, use_orig_params=True, device_id=torch.device("cpu"))
    named = {n.replace("_fsdp_wrapped_module.", ""): p for n, p in model.named_parameters()}
    opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9, weight_decay=0.01)
    recorder = StepRecorder([[named[u]] for u in UNITS], [opt], capacity=64, shard_group="world" if world > 1 else None)
    ref_angles, ref_norms = [], []
    for _ in range(30):
        x, y = next(stream)
        x, y = x[rank::world], y[rank::world]
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        before = _whole(model, world)
        opt.step()
        after = _whole(model, world)
        ref_angles.append([_angle(before[u], after[u]) for u in UNITS])
        ref_norms.append([float(after[u].norm()) for u in UNITS])
    (batch,) = recorder.drain()  # a collective under sharding: every rank drains
    if rank == 0:
        with open(os.path.join(out, f"angles_{world}.json"), "w") as fh:
            json.dump(
                {
                    "angular_update": batch.angular_update.tolist(),
                    "weight_norm": (batch.norm_sq_after**0.5).tolist(),
                    "shapes": {u: list(named[u].shape) for u in UNITS},
                    "collectives": sum(s.collectives for s in recorder.slots),
                    "reference_angular_update": ref_angles,
                    "reference_weight_norm": ref_norms,
                },
                fh,
            )
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
        # gloo's worker threads can abort the interpreter's own shutdown ("terminate called without an active
        # exception", twice in one CI run): the results are written, leave without running the C++ destructors
        os._exit(0)


if __name__ == "__main__":
    out, world = sys.argv[1], int(sys.argv[2])
    if world == 1:
        run(0, 1, out)
    else:
        mp.spawn(run, args=(world, out), nprocs=world)
