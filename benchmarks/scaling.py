"""How the per-step statistics scale: with the number of tracked tensors and with their total size.

    python benchmarks/scaling.py [--device cpu|cuda] [--repeats 200] [--max-log2 24]

No Lightning here: a :class:`lightning_smd.engine.measure.StepRecorder` is attached to a plain optimizer over
``n`` tensors and the benchmark times its per-step work (``record()``, what the step post-hook runs) on its
own, and counts the operators it dispatches per step (aten ops seen by a ``TorchDispatchMode``; on CUDA
also the GPU kernels, from the profiler).

Table 1, the number of tensors (``n`` tensors of 256 elements; SGD momentum and snapshot paths): the op
count must not grow with ``n``. For comparison, ``per-tensor`` is the same recorder with the batching of
small tensors switched off (one dot product per tensor and quantity: what a hand-written loop does).

Table 2, total size (16 tensors, 2^14 to 2^24 elements in all): time per step, the bytes the statistics
must read (weight, update and gradient, once each: ``3 x 4 B x elements``), the bandwidth achieved, and
the ratio to this machine's memory-bandwidth bound (the time a ``torch.sum`` over the same bytes takes).
"""

from __future__ import annotations

import argparse
import statistics
import time
from contextlib import contextmanager

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import lightning_smd.engine.measure as measure
from lightning_smd.engine.measure import StepRecorder


VIEWS = {"view", "_unsafe_view", "alias", "select", "slice", "as_strided", "detach", "expand", "t", "reshape", "unsqueeze", "squeeze"}


class CountOps(TorchDispatchMode):
    """Operators dispatched, split into compute (they read or write data: kernels) and views (metadata)."""

    def __init__(self) -> None:
        super().__init__()
        self.compute = 0
        self.views = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ in VIEWS:
            self.views += 1
        else:
            self.compute += 1
        return func(*args, **(kwargs or {}))


@contextmanager
def small_numel(value: int):
    old = measure.SMALL_NUMEL
    measure.SMALL_NUMEL = value
    try:
        yield
    finally:
        measure.SMALL_NUMEL = old


def _setup(n: int, numel: int, device: str, momentum: bool):
    g = torch.Generator().manual_seed(0)
    params = [torch.randn(numel, generator=g).to(device).requires_grad_() for _ in range(n)]
    for p in params:
        p.grad = torch.randn(numel, generator=g).to(device) * 1e-2
    opt = torch.optim.SGD(params, lr=0.1, momentum=0.9 if momentum else 0.0, weight_decay=1e-4)
    opt.step()  # momentum buffers exist from here on
    # 256 steps buffered: `time_record` drains between its timed batches. (100,000 steps of 1,000 units were a
    # 4 GB float64 buffer: the test suite's 6.7 GB memory peak.)
    rec = StepRecorder([[p] for p in params], [opt], capacity=256)
    return params, opt, rec


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _median_seconds(fn, device: str, repeats: int, between=None) -> float:
    """Median seconds of one ``fn()`` call, timed in batches of 10 (synchronized around each batch)."""
    samples = []
    for _ in range(max(repeats // 10, 3)):
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(10):
            fn()
        _sync(device)
        samples.append((time.perf_counter() - t0) / 10)
        if between is not None:
            between()
    return statistics.median(samples)


def time_record(rec: StepRecorder, device: str, repeats: int) -> float:
    """Median seconds of one ``record()``."""
    slot = rec.slots[0]
    for _ in range(5):
        slot.record()

    def drain_when_nearly_full() -> None:
        if slot.count > slot.capacity - 20:
            rec.drain()

    return _median_seconds(slot.record, device, repeats, drain_when_nearly_full)


def count_ops(rec: StepRecorder) -> tuple[int, int]:
    """(compute ops, view ops) of one ``record()``."""
    mode = CountOps()
    with mode:
        rec.slots[0].record()
    return mode.compute, mode.views


def count_kernels(rec: StepRecorder) -> int | None:
    if rec.slots[0].device.type != "cuda":
        return None
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        rec.slots[0].record()
        torch.cuda.synchronize()
    return sum(e.count for e in prof.key_averages() if e.device_type.name == "CUDA")


def bandwidth_bound(nbytes: int, device: str, repeats: int) -> float:
    """Seconds to read ``nbytes`` once (a float32 sum), the best of ``repeats``."""
    x = torch.randn(max(nbytes // 4, 1), device=device)
    best = float("inf")
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        x.sum()
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return best


def time_step(opt: torch.optim.Optimizer, device: str, repeats: int) -> float:
    """Median seconds of ``opt.step()`` itself (hooks included, when attached)."""
    return _median_seconds(opt.step, device, repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--max-log2", type=int, default=24, help="Table 2 goes up to 2^this elements")
    args = parser.parse_args()
    dev = args.device
    cuda = dev == "cuda"
    where = torch.cuda.get_device_name() if cuda else f"CPU, {torch.get_num_threads()} threads"
    print(f"Per-step statistics of StepRecorder ({where}), medians over {args.repeats} steps")
    print("ops: compute operators (kernels) + view operators (metadata only) dispatched by one step's record()\n")

    print("Table 1: number of tracked tensors (256 elements each); opt.step() is SGD's own step without monitoring")
    head = (
        f"| {'tensors':>7} | {'path':<8} | {'batched ops':>13} | {'batched us':>10} "
        f"| {'per-tensor ops':>14} | {'per-tensor us':>13} | {'opt.step() us':>13} |"
    )
    print(head + (" CUDA kernels |" if cuda else ""))
    print("|" + "|".join("-" * len(c) for c in head.split("|")[1:-1]) + "|" + ("--------------|" if cuda else ""))
    for n in (10, 100, 1000):
        for momentum in (True, False):
            row = {}
            for mode, threshold in (("batched", measure.SMALL_NUMEL), ("per-tensor", 0)):
                with small_numel(threshold):
                    _, opt, rec = _setup(n, 256, dev, momentum)
                    rec.slots[0].record()  # (first call binds the views)
                    row[mode] = (count_ops(rec), time_record(rec, dev, args.repeats), count_kernels(rec))
                    rec.close()
            step = time_step(opt, dev, args.repeats)
            kern = f" {row['batched'][2]:>12} |" if cuda else ""
            path = "momentum" if momentum else "snapshot"
            (bc, bv), (pc, pv) = row["batched"][0], row["per-tensor"][0]
            print(
                f"| {n:>7} | {path:<8} | {f'{bc} + {bv}':>13} | {row['batched'][1] * 1e6:>10.0f} | {f'{pc} + {pv}':>14} | "
                f"{row['per-tensor'][1] * 1e6:>13.0f} | {step * 1e6:>13.0f} |{kern}"
            )

    print("\nTable 2: total size (16 tensors, SGD momentum path: reads weight, momentum buffer and gradient once)")
    print(f"| {'elements':>10} | {'ops':>7} | {'us/step':>8} | {'MB read':>8} | {'GB/s':>6} | {'x bound':>7} |")
    print("|------------|---------|----------|----------|--------|---------|")
    for log2 in [n for n in (14, 16, 18, 20, 22, 24) if n <= args.max_log2]:
        total = 2**log2
        _, _, rec = _setup(16, total // 16, dev, True)
        rec.slots[0].record()
        t = time_record(rec, dev, max(args.repeats // (1 + total // 2**20), 20))
        c, v = count_ops(rec)
        nbytes = 3 * 4 * total
        bound = bandwidth_bound(nbytes, dev, 20)
        rec.close()
        print(f"| {total:>10} | {f'{c} + {v}':>7} | {t * 1e6:>8.0f} | {nbytes / 1e6:>8.2f} | {nbytes / t / 1e9:>6.1f} | {t / bound:>7.2f} |")
    print("\nx bound: the time over that of reading the same bytes once with torch.sum on this device")


if __name__ == "__main__":
    main()
