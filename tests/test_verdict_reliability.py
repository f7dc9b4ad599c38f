"""The verdict over the quick sweep of ``benchmarks/verdict_reliability.py`` (one seed per cell, one task per
optimizer): every healthy run ends ``equilibrium`` and passes ``on_no_equilibrium="raise"``, every unhealthy one
(no weight decay, a learning-rate cut too late, a run shorter than one relaxation time, a memorized data set)
does not, and the gate raises.

Margins, from the full sweep (``python benchmarks/verdict_reliability.py``, 20 seeds per cell, both tasks, 1,000 runs;
see ``docs/verdict_reliability.md``): over the 700 layers of the 200 healthy runs the largest |drift| is 0.35 of the
limit and the largest t·se 0.55 of it (a layer is steady below 1 for both). The unhealthy runs fail by construction
(no weight decay; a late cut or a short run leaves every layer short of its settling time), or, memorizing, with a
layer whose gradient noise vanished (485 of 700 layers) or that drifts: the closest memorizing run has its
layers drifting at 1.37 and 1.41 times the limit; no layer of a memorizing run ends in equilibrium.
"""

from __future__ import annotations

import json

import pytest
from helpers import run_python

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def quick_sweep(tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep") / "quick.json"
    proc = run_python(["benchmarks/verdict_reliability.py", "--quick", "--json", out], timeout=900, check=False)
    return proc, json.loads(out.read_text())


def test_quick_sweep_exits_zero_and_prints_its_confusion_table(quick_sweep):
    proc, runs = quick_sweep
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "| equilibrium (healthy) | 5 | 0 |" in proc.stdout
    assert "| not equilibrium (unhealthy) | 0 | 20 |" in proc.stdout
    assert len(runs) == 25


def test_every_healthy_cell_passes_the_raise_gate(quick_sweep):
    _, runs = quick_sweep
    healthy = [r for r in runs if r["condition"] == "healthy"]
    assert sorted(r["optimizer"] for r in healthy) == ["adamw", "lion", "nesterov", "sgd", "sgd_momentum"]
    for r in healthy:
        assert r["verdict"] == "equilibrium" and not r["raised"], r
        for layer in r["layers"]:
            assert layer["state"] == "equilibrium", (r["optimizer"], layer)
            assert abs(layer["steady_ratio"] - 1.0) < 0.15, (r["optimizer"], layer)


@pytest.mark.parametrize("condition", ["no_decay", "late_cut", "short", "memorize"])
def test_every_unhealthy_cell_fails_the_raise_gate(quick_sweep, condition):
    _, runs = quick_sweep
    cells = [r for r in runs if r["condition"] == condition]
    assert len(cells) == 5
    for r in cells:
        assert r["verdict"] == "not_reached" and r["raised"], r
        if condition == "no_decay":
            assert all(layer["state"] == "no_equilibrium" for layer in r["layers"])
        if condition in ("late_cut", "short"):
            assert not any(layer["state"] == "equilibrium" for layer in r["layers"])
    if condition == "memorize":
        assert all(r["min_loss"] < 0.01 for r in cells)  # the data set was memorized
