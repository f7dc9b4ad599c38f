"""Every GPU check of issue 16 in one run, for a short loan of a CUDA device (issue 31).

    python benchmarks/gpu_check.py --out gpu_check              # on an H100/H200-class GPU: under 8 minutes
    python benchmarks/gpu_check.py --dry --out /tmp/gpu_dry     # on the CPU, tiny sizes: that it runs (the tests do)

The steps run in order, each in its own process with its own time limit, and each writes its full output to
``OUT/NN_<step>.log`` as soon as it ends, so a run cut short still leaves what was done. At the end (or when the
budget runs out) one table goes to the screen and to ``OUT/summary.md``: per step its exit status, seconds, the
figure it measured and the target it is held to.

1. ``environment``: device, driver, CUDA and torch versions.
2. ``gpu_tests``: ``tests/test_gpu.py`` — no host synchronization on the step path under
   ``torch.cuda.set_sync_debug_mode("error")`` in 32-true, 16-mixed and bf16-mixed, both update paths; CUDA
   statistics equal to the CPU's.
3. ``overhead``: ``benchmarks/overhead.py --device cuda`` (ResNet-50-like, batch 256, 16-mixed): SMD's share of the
   step (target ≤ 1 %) against no monitoring and against ``wandb.watch`` (offline).
4. ``scaling``: ``benchmarks/scaling.py --device cuda``: CUDA kernels per step constant in the number of tensors,
   and the time to read the statistics' bytes within 2× of a plain ``torch.sum`` over them.
5. ``sharded``: ``tests/ddp_script.py`` on the device under Lightning's ``FSDPStrategy`` (FSDP1,
   ``use_orig_params``) and ``ModelParallelStrategy`` (FSDP2 ``fully_shard``): SMD's angular update and weight norm
   at every step against a float64 reference from the whole tensors of the same run, to 1e-5. (Against an unsharded
   run it cannot be: one-rank FSDP2 already trains along another float32 trajectory than no strategy, 8 % apart in
   the last angle after 40 steps on the CPU.) One GPU holds one rank, so this checks the sharded code paths on CUDA
   tensors; several ranks are checked on the CPU (gloo) by ``tests/test_distributed.py``.
6. ``training``: ``examples/quickstart.py`` on the device with its summary, then ``lightning-smd plot`` of it.

In ``--dry`` mode every step runs on the CPU at toy sizes (``sharded`` without FSDP1, which Lightning runs on GPUs
only); ``tests/test_benchmarks.py`` runs it so that the script cannot rot between loans.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Step:
    name: str
    commands: list[list[str]]
    limit: float  # seconds, for all its commands
    read: Callable[[str, Path], tuple[str, str, bool | None]]  # (figure, target, met) from its output


def _py(*args: str) -> list[str]:
    return [sys.executable, *args]


def _env_figure(text: str, out: Path) -> tuple[str, str, bool | None]:
    info = dict(line.split("=", 1) for line in text.splitlines() if "=" in line and not line.startswith(" "))
    return f"{info.get('device', '?')}; driver {info.get('driver', '?')}; torch {info.get('torch', '?')}; CUDA {info.get('cuda', '?')}", "", None


def _pytest_figure(text: str, out: Path) -> tuple[str, str, bool | None]:
    tail = [line for line in text.splitlines() if re.search(r"\d+ (passed|failed|skipped|error)", line)]
    last = tail[-1].strip("= ") if tail else "no result"
    failed = re.search(r"(\d+) (failed|error)", last)
    ran = re.search(r"(\d+) passed", last)
    return last, "all pass, none skipped", (not failed and bool(ran) and "skipped" not in last) if tail else False


def _overhead_figure(text: str, out: Path) -> tuple[str, str, bool | None]:
    rows = {m.group(1): m.group(2) for m in re.finditer(r"^\| (\w+)\s*\|.*?\|\s*([\d.]+%)\s*\|", text, re.M)}
    vs = {m.group(1): m.group(2) for m in re.finditer(r"^\| (\w+)\s*\|\s*[\d.]+\s*\|\s*[\d.]+\s*\|\s*([\d.]+x)", text, re.M)}
    share = rows.get("smd_sgdm")
    figure = ", ".join(f"{k} {v} in hooks" for k, v in rows.items()) + "; " + ", ".join(f"{k} {v}" for k, v in vs.items())
    return figure, "smd_sgdm ≤ 1 % of the step", (float(share.rstrip("%")) <= 1.0) if share else False


def _scaling_figure(text: str, out: Path) -> tuple[str, str, bool | None]:
    """Table 1: the compute ops (on CUDA the kernels) of one step's record() by path and number of tensors, which must
    not grow with the number; Table 2: the time over the read bound at the largest size."""
    first, _, second = text.partition("Table 2")
    counts: dict[str, dict[int, str]] = {}
    for line in first.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 7 and cells[0].isdigit():
            counts.setdefault(cells[1], {})[int(cells[0])] = cells[7] if len(cells) > 7 and cells[7] else cells[2].split("+")[0].strip()
    bounds = [float(c.split("|")[-2]) for c in second.splitlines() if re.match(r"^\|\s*\d+ \|", c)]
    constant = bool(counts) and all(len(set(v.values())) == 1 for v in counts.values())
    worst = bounds[-1] if bounds else float("nan")
    shown = "; ".join(f"{path} {' / '.join(v[n] for n in sorted(v))} at {' / '.join(map(str, sorted(v)))} tensors" for path, v in counts.items())
    return f"ops per step: {shown}; largest size {worst:.2f}x the read bound", "constant in the tensors; <= 2x the bound", constant and worst <= 2.0


def _sharded_figure(text: str, out: Path) -> tuple[str, str, bool | None]:
    lines = [line for line in text.splitlines() if line.startswith("COMPARE ")]
    ok = bool(lines) and all(line.endswith(" ok") for line in lines)
    return "; ".join(line[8:] for line in lines) or "no comparison", "every step within 1e-5 of the whole tensors", ok


def _training_figure(text: str, out: Path) -> tuple[str, str, bool | None]:
    summaries = sorted((out / "training").rglob("smd_summary.json"))
    plot = out / "training" / "smd_plot.png"
    if not summaries:
        return "no summary", "a verdict and a plot", False
    s = json.loads(summaries[0].read_text())
    return f"verdict {s.get('verdict')}, {s.get('steps')} steps; plot {'written' if plot.exists() else 'missing'}", "a verdict and a plot", plot.exists()


ENVIRONMENT = r"""
import platform, subprocess, torch, pytorch_lightning as pl
cuda = torch.cuda.is_available()
print("device=" + (torch.cuda.get_device_name() if cuda else "CPU (" + platform.processor() + ")"))
try:
    drv = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True, text=True, timeout=20).stdout.strip()
except Exception as err:
    drv = "n/a (" + type(err).__name__ + ")"
print("driver=" + (drv or "n/a"))
print("torch=" + torch.__version__)
print("cuda=" + str(torch.version.cuda))
print("lightning=" + pl.__version__)
if cuda:
    p = torch.cuda.get_device_properties(0)
    print("memory_gib=%.1f" % (p.total_memory / 2**30))
"""

# Runs tests/ddp_script.py sharded on the device, each run checked against a float64 reference of the same run.
SHARDED = r"""
import os, re, subprocess, sys
out, accel, strategies = sys.argv[1], sys.argv[2], sys.argv[3].split(",")
env = dict(os.environ, SMD_ACCELERATOR=accel, PYTHONWARNINGS="ignore")
for strategy in strategies:
    cmd = [sys.executable, "tests/ddp_script.py", os.path.join(out, strategy), strategy, "1", "reference"]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True)
    m = re.search(r"REFERENCE (.*?),? largest relative difference ([0-9.e+-]+)", p.stdout)
    if "RESULT-OK" not in p.stdout or not m:
        print(p.stdout[-2000:] + p.stderr[-3000:])
        print(f"COMPARE {strategy}: did not run FAIL")
        continue
    ok = "ok" if float(m.group(2)) <= 1e-5 else "FAIL"
    print(f"COMPARE {strategy}: {m.group(1)}, largest relative difference {float(m.group(2)):.1e} against the whole tensors {ok}")
"""


def steps(out: Path, dry: bool) -> list[Step]:
    dev = "cpu" if dry else "cuda"
    overhead = ["--variants", "none", "smd_sgdm"] + ([] if dry else ["wandb_watch_1", "wandb_watch_100"])
    size = ["--depth", "18", "--width", "4", "--batch", "2", "--size", "8", "--steps", "4", "--warmup", "1", "--repeats", "1"] if dry else []
    size = size or ["--steps", "30", "--repeats", "2"]  # on the device: ResNet-50-like, batch 256, 16-mixed
    scaling = ["--repeats", "3", "--max-log2", "16"] if dry else ["--repeats", "100"]
    return [
        Step("environment", [_py("-c", ENVIRONMENT)], 60, _env_figure),
        Step("gpu_tests", [_py("-m", "pytest", "tests/test_gpu.py", "-q", "-rs", "-p", "no:cacheprovider")], 150, _pytest_figure),
        Step("overhead", [_py("benchmarks/overhead.py", "--device", dev, *overhead, *size)], 200, _overhead_figure),
        Step("scaling", [_py("benchmarks/scaling.py", "--device", dev, *scaling)], 90, _scaling_figure),
        Step("sharded", [_py("-c", SHARDED, str(out / "sharded"), "cpu" if dry else "gpu", "fsdp2" if dry else "fsdp2,fsdp1")], 120, _sharded_figure),
        Step(
            "training",
            [
                _py("examples/quickstart.py", "--accelerator", dev, "--out", str(out / "training"), *(["--steps", "60", "--width", "4"] if dry else [])),
                _py("-m", "lightning_smd.io.cli", "plot", str(out / "training"), "-o", str(out / "training" / "smd_plot.png")),
            ],
            90,
            _training_figure,
        ),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="gpu_check")
    parser.add_argument("--dry", action="store_true", help="on the CPU at toy sizes: that every step runs")
    parser.add_argument("--budget", type=float, default=480.0, help="seconds for all steps (a step gets what is left)")
    parser.add_argument("--only", nargs="*", help="run only these steps")
    args = parser.parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, WANDB_MODE="offline", PYTHONUNBUFFERED="1")
    start, rows = time.perf_counter(), []
    for i, step in enumerate(steps(out, args.dry), 1):
        if args.only and step.name not in args.only:
            continue
        left = args.budget - (time.perf_counter() - start)
        log = out / f"{i:02d}_{step.name}.log"
        if left < 10:
            rows.append((step.name, "not run", 0.0, "the budget ran out", "", False))
            continue
        t0, text, rc = time.perf_counter(), "", 0
        for cmd in step.commands:
            limit = min(step.limit, left) - (time.perf_counter() - t0)
            try:
                p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=max(limit, 1.0))
                text += f"$ {' '.join(cmd[:3])} ...\n{p.stdout}{p.stderr}\n"
                rc = rc or p.returncode
            except subprocess.TimeoutExpired as err:  # (its captured output comes as bytes, even with text=True)
                got = "".join(x.decode(errors="replace") if isinstance(x, bytes) else (x or "") for x in (err.stdout, err.stderr))
                text += f"$ {' '.join(cmd[:3])} ...\n{got}\nTIMEOUT after {limit:.0f} s\n"
                rc = 124
            if rc:
                break
        seconds = time.perf_counter() - t0
        log.write_text(text)
        figure, target, met = step.read(text, out)
        rows.append((step.name, str(rc), seconds, figure, target, met if rc == 0 else False))
        print(f"[{i}/6] {step.name}: rc {rc}, {seconds:.0f} s — {figure}", flush=True)
    table = ["| step | rc | s | figure | target | met |", "| --- | --- | ---: | --- | --- | --- |"]
    for name, rc, seconds, figure, target, met in rows:
        table.append(f"| {name} | {rc} | {seconds:.0f} | {figure} | {target} | {'–' if met is None else ('yes' if met else 'NO')} |")
    mode = "dry run on the CPU, toy sizes" if args.dry else "on the device"
    text = f"gpu_check ({mode}), {time.perf_counter() - start:.0f} s in all\n\n" + "\n".join(table) + "\n"
    (out / "summary.md").write_text(text)
    print("\n" + text)
    return 0 if all(r[1] == "0" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
