"""Where a thin layer's extra inward pull under AdamW comes from: Adam's per-coordinate scaling.

    python benchmarks/adam_anisotropy.py                 # seeds 0 and 1, ~1 min on 2 cores
    python benchmarks/adam_anisotropy.py --seeds 0 1 2 --weight-decay 0.1 --steps 6000 --start 3000

For a momentum update with one scale for every coordinate, ``κ = −2⟨w, ηu⟩/‖ηu‖²`` is exactly
``κ_β = 2β1/(1 − β1(1 − e))`` (``theory.momentum_inward_pull``). Adam divides by ``√v̂`` per coordinate
(``D = 1/(√v̂ + ε)``, ``u = D·m̂``), and the momentum recursion then gives ``κ = κ_β·A`` with
``A = ⟨w, Dm⟩⟨m, Dm⟩ / (⟨w, m⟩⟨Dm, Dm⟩)`` (``A = 1`` for a uniform ``D``). The script trains ``demo.ThinConvNet`` with
``torch.optim.AdamW`` on the persistent-noise stream (plain PyTorch, the verdict cell of
``benchmarks/update_balance.py``), reads ``m̂`` and ``v̂`` from the optimizer state after every step from
``--start`` on, and prints per layer the measured ``κ/κ_β``, ``A``, and how well the recursion
``⟨w, m⟩ = −β1·η⟨m, Dm⟩/(1 − β1(1 − e))`` closes. It reads optimizer state the library never reads: a study, not
something the callback does.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from torch.nn import functional as F

from lightning_smd.demo import TeacherStream, ThinConvNet, decayed_groups
from lightning_smd.analysis.theory import momentum_inward_pull

LAYERS = ("conv1", "conv2", "conv3", "conv4")


def run(seed: int, lr: float, wd: float, steps: int, start: int) -> dict[str, np.ndarray]:
    torch.manual_seed(seed)
    net = ThinConvNet()
    opt = torch.optim.AdamW(decayed_groups(net, wd), lr=lr)
    beta1, beta2 = opt.param_groups[0]["betas"]
    eps, e = opt.param_groups[0]["eps"], lr * wd
    stream = iter(TeacherStream(net.input_shape, seed=seed, flip=0.2))
    sums = {n: np.zeros(6) for n in LAYERS}  # ⟨w,ηu⟩, ‖ηu‖², ⟨w,m⟩, ⟨m,Dm⟩, ⟨w,Dm⟩, ⟨Dm,Dm⟩
    for t in range(steps):
        x, y = next(stream)
        opt.zero_grad()
        F.cross_entropy(net(x), y).backward()
        before = {n: getattr(net, n).weight.detach().double().flatten().clone() for n in LAYERS}
        opt.step()
        if t < start:
            continue
        for n in LAYERS:
            p = getattr(net, n).weight
            state = opt.state[p]
            k = float(state["step"])
            m = (state["exp_avg"] / (1 - beta1**k)).double().flatten()
            d = 1.0 / ((state["exp_avg_sq"] / (1 - beta2**k)).sqrt() + eps).double().flatten()
            w, dm = before[n], d * m
            update = (1 - e) * w - p.detach().double().flatten()  # ηu, from the step's split into decay and update
            sums[n] += [float(w @ update), float(update @ update), float(w @ m), float(m @ dm), float(w @ dm), float(dm @ dm)]
    out = {}
    k_beta = momentum_inward_pull(beta1, e)
    for n, (wu, uu, wm, mdm, wdm, dmdm) in sums.items():
        out[n] = np.array([-2 * wu / uu / k_beta, wdm * mdm / (wm * dmdm), -beta1 * lr * mdm / (1 - beta1 * (1 - e)) / wm])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--weight-decay", type=float, default=0.4)
    parser.add_argument("--steps", type=int, default=1600)
    parser.add_argument("--start", type=int, default=600, help="first measured step (after the norm has settled)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    runs = [run(s, args.lr, args.weight_decay, args.steps, args.start) for s in args.seeds]
    print(f"AdamW lr={args.lr} wd={args.weight_decay}, seeds {args.seeds}, steps {args.start}-{args.steps} (means over seeds)")
    print("layer   κ/κ_β    A       recursion")
    for n in LAYERS:
        kappa, a, rec = np.mean([r[n] for r in runs], axis=0)
        print(f"{n:7s} {kappa:.4f}  {a:.4f}  {rec:.4f}")


if __name__ == "__main__":
    main()
