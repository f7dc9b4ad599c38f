"""Dead layers and dead filters (lightning_smd.analysis.dead, the dead-filter tests of lightning_smd.analysis.filters):
a weight the loss no longer reaches, told from vanishing noise by the loss and from a large norm by its gradient."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from helpers import run_python

from lightning_smd.analysis.dead import DEAD_FACTOR, DeadWatch
from lightning_smd.analysis.filters import FilterStats

E = 2.5e-3  # pure decay per step; relaxation time 1/(2e) = 200 steps


def _drains(watch, norms, Ls, peak, loss_ok=True, k=50):
    """Feed one unit drain by drain (``k`` steps each): norms after each drain, ``L`` at each; returns the events."""
    out = []
    for j, (n, L) in enumerate(zip(norms, Ls)):
        out += watch.observe(np.array([0]), np.array([n * n]), (j + 1) * k, np.full((k, 1), E), np.array([L]), np.array([peak]), loss_ok)
    return out


def test_a_layer_on_the_pure_decay_curve_with_its_gradient_gone_is_dead_until_the_gradient_returns():
    steps = np.arange(1, 13) * 50
    decaying = 5.0 * (1 - E) ** steps  # the pure-decay curve exactly
    watch = DeadWatch(1)
    events = _drains(watch, decaying, [1.0] * 2 + [0.5 / DEAD_FACTOR] * 10, peak=1.0)
    # dead at the first drain with a relaxation time (200 steps) of curve behind it and L at peak/200
    assert [e.step for e in events] == [250] and watch.dead_since[0] == 250 and watch.dead_first[0] == 250
    # the gradient comes back: no longer dead (the first time is kept)
    _drains(watch, [decaying[-1]], [0.5], peak=1.0)
    assert watch.dead_since[0] == -1 and watch.dead_first[0] == 250


def test_not_dead_when_the_norm_does_not_follow_the_curve_or_the_loss_vanished_or_the_gradient_merely_fell_20x():
    steps = np.arange(1, 13) * 50
    decaying = 5.0 * (1 - E) ** steps
    steady = np.full(12, 5.0)  # a rotating layer in equilibrium: its norm stays
    assert _drains(DeadWatch(1), steady, [0.5 / DEAD_FACTOR] * 12, peak=1.0) == []
    slow = 5.0 * (1 - 0.7 * E) ** steps  # shrinking at 70 % of the curve's rate: outside the 15 % tolerance
    assert _drains(DeadWatch(1), slow, [0.5 / DEAD_FACTOR] * 12, peak=1.0) == []
    assert _drains(DeadWatch(1), decaying, [0.5 / DEAD_FACTOR] * 12, peak=1.0, loss_ok=False) == []  # vanishing noise
    assert _drains(DeadWatch(1), decaying, [1.0 / 20] * 12, peak=1.0) == []  # what learning alone does to L
    assert _drains(DeadWatch(1), decaying, [0.5 / DEAD_FACTOR] * 12, peak=1.0) != []  # the same, with L 200x down


def test_dead_filters_follow_the_curve_with_their_gradient_gone_and_a_large_norm_is_not_dead():
    """Five filters: rotating at a steady norm; dead (pure decay, its L gone); far above equilibrium (shrinking almost
    as pure decay, but with its gradient); one whose gradient fell 900× but keeps its norm; one on the curve whose
    L fell only 50× (not yet the 100× of a dead one)."""
    stats = FilterStats(1, ema_steps=50)
    k, norms = 50, np.array([2.0, 2.0, 60.0, 2.0, 2.0])
    for j in range(12):
        steps = np.arange(j * k + 1, (j + 1) * k + 1)
        decay = (1 - E) ** steps[:, None]
        d = decay[:, 0]
        n = np.stack([np.full(k, norms[0]), norms[1] * d, norms[2] * d**0.98, np.full(k, norms[3]), norms[4] * d], axis=1)
        late = j >= 2
        L = np.array([1.0, 1e-9 if late else 1.0, 1.0, 1.0 / 900 if late else 1.0, 1.0 / 50 if late else 1.0])
        angles = np.tile(np.sqrt(L) * 0.08, (k, 1)) / n**2  # SGD: Δ·‖w‖² goes as √L
        stats.update(np.array([0]), {0: angles}, {0: n**2}, steps.astype(float), np.full((k, 1), E), {0: np.tile(L, (k, 1))})
    assert stats.dead(0).tolist() == [False, True, False, False, False]
    assert stats.dead_counts()[0] == 1.0
    stats.forget(0)
    assert stats.dead(0) is None


def test_a_real_fit_with_two_channels_cut_warns_smd049_and_counts_them(tmp_path):
    """A real Trainer with ``per_filter=True``: two of conv2's eight channels multiplied by 0 after BatchNorm from step
    40 on get no gradient; with SGD at lr 0.1, momentum 0.5 and weight decay 0.1 on the normalized weights (pure decay
    0.02 per step, relaxation time 25 steps; momentum 0.9 at such a decay would make the decay ring, outside the
    theory's overdamped regime) both are flagged dead by step 250 (their averaged ``L`` thousands of times below its
    peak there, against the 100× asked, whatever the CPU: it decays as exp(-t/25) after the cut) — their norms on the pure-decay
    curve — the summary counts them, and the once-per-fit ``SMD049`` is given (at its first dead filters: one of
    conv3's, whose ReLU before its BatchNorm stops firing, is found first on this seed)."""
    import pytorch_lightning as pl
    import torch
    from helpers import Module, SmallConvNet, fit_smd, sgd

    torch.manual_seed(0)
    net = SmallConvNet()
    mask = torch.ones(8)
    net.bn2.register_forward_hook(lambda _m, _i, out: out * mask.view(1, -1, 1, 1))

    class Cut(pl.Callback):
        def on_train_batch_start(self, trainer, *args):
            if trainer.global_step == 40:
                mask[[0, 2]] = 0.0

    module = Module(net, optimizer=sgd(lr=0.1, momentum=0.5), decay=0.1)
    fit = fit_smd(tmp_path, module, 250, per_filter=True, log_every_n_steps=10, callbacks=[Cut()])
    d = fit.smd.diagnostics
    (conv2,) = [n for n in d.names if n.startswith("net.conv2.")]
    dead = d.filters.dead(d.names.index(conv2))
    assert dead is not None and dead[[0, 2]].all(), dead
    (warning,) = [w for w in fit.warnings if w.endswith("[SMD049]")]  # once per fit, at the first dead filters:
    assert re.match(r"\d+ filter\(s\) are dead at step \d+ \(net\.conv\d\.weight \(\d+\)", warning), warning  # (one of conv3's dies too)
    layers = {layer["name"]: layer for layer in fit.smd.summary()["layers"]}
    assert layers[conv2]["dead_filters"] >= 2


@pytest.mark.slow
def test_the_two_block_transformer_reads_dead_for_its_first_block(tmp_path):
    """``examples/transformer_qknorm.py --depth 2`` (its docstring's story) at the CI size: the reversal needs one
    attention layer; the first block's q/k gradient falls from 0.60 to 0.003 while the loss stays at its noise floor,
    their norms follow AdamW's pure decay, and they read ``dead``; the second block keeps rotating at the prediction.
    Before issue 30 the first block read ``approaching`` or ``departed``. Margins over seeds 0–2 (``--seed``) and two
    CPUs: first found dead (the warning's step) at step 540–600 of 1,500, with ``L`` 102–280× below its peak at that
    drain (the threshold is 100×). The second block's verdict depends on the CPU's trajectory — ``equilibrium`` on one, ``approaching`` on
    another (its 750-step window too noisy to bound the drift) — so the test asks only that it is alive, not dead and
    steady within 0.15 of the prediction (seen: 0.94–1.03)."""
    env = {"SMD_EXAMPLE_FAST": "1"}
    proc = run_python(["examples/transformer_qknorm.py", "--depth", "2", "--out", str(tmp_path)], env=env)
    summary = json.loads((tmp_path / "smd_summary.json").read_text())
    layers = {layer["name"]: layer for layer in summary["layers"]}
    assert set(layers) == {f"blocks.{b}.attn.{p}.weight" for b in (0, 1) for p in "qk"}, set(layers)
    for p in "qk":
        assert layers[f"blocks.0.attn.{p}.weight"]["state"] == "dead", layers[f"blocks.0.attn.{p}.weight"]["state"]
        alive = layers[f"blocks.1.attn.{p}.weight"]
        assert alive["state"] in ("equilibrium", "approaching") and alive["dead_since"] is None, alive["state"]
        assert abs(alive["steady_ratio"] - 1.0) < 0.15, alive["steady_ratio"]
    assert set(summary["diagnoses"]["dead"]) == {"blocks.0.attn.q.weight", "blocks.0.attn.k.weight"}
    assert any(w.endswith("[SMD048]") for w in summary["warnings"]), summary["warnings"]
    assert "SMD048" in proc.stderr


@pytest.mark.slow
def test_killed_filters_are_flagged_within_two_relaxation_times_and_live_ones_are_not(tmp_path):
    """``benchmarks/dead_filters.py`` on ``thin``, seed 0: a quarter of conv2's channels cut at step 400. Every killed
    filter is flagged, and no live filter in the killed or the uncut run. Over 20 seeds (``python
    benchmarks/dead_filters.py``): SGD-momentum flags every killed filter 1.0 relaxation time after the cut, AdamW
    1.2–1.6 (the log steps every 50 steps are 0.4 τ apart), and 1 of 11,144 live filters of ``thin`` was flagged (seed
    3, not this one). The delay bounds here, 2 τ and 3 τ, keep two log steps of margin for AdamW."""
    out = tmp_path / "dead.json"
    run_python(["benchmarks/dead_filters.py", "--seeds", "1", "--tasks", "thin", "--workers", "1", "--steps", "1000", "--json", out])
    runs = json.loads(out.read_text())
    tau = {"sgd_momentum": 200.0, "adamw": 125.0}
    for r in runs:
        flagged = r["flagged"].get("net.conv2.weight", {})
        if r["cut"]:
            delays = [(flagged[str(i)] - 400) / tau[r["optimizer"]] for i in r["killed"] if str(i) in flagged]
            bound = 2.0 if r["optimizer"] == "sgd_momentum" else 3.0
            assert len(delays) == len(r["killed"]) == 8 and max(delays) <= bound, (r["optimizer"], delays)
        for layer, got in r["flagged"].items():
            killed = r["killed"] if layer.endswith("conv2.weight") else []
            false = [i for i in got if int(i) not in killed and not r["confirmed"][layer][i]]
            assert not false, (r["optimizer"], r["cut"], layer, false)
