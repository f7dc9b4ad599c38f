"""Multi-process DDP on CPU (gloo): the same statistics as a single process, logs and summary written once."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).with_name("ddp_script.py")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def _run(out: Path, strategy: str, devices: int) -> dict:
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), str(out), strategy, str(devices)], capture_output=True, text=True, timeout=300, env=ENV, cwd=out.parent
    )
    assert proc.returncode == 0 and "RESULT-OK" in proc.stdout, proc.stderr[-3000:]
    summaries = list(out.rglob("smd_summary.json"))
    assert len(summaries) == 1, summaries  # written once, by rank zero
    assert len(list(out.rglob("metrics.csv"))) == 1
    return json.loads(summaries[0].read_text())


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    return _run(tmp_path_factory.mktemp("single"), "auto", 1)


@pytest.mark.parametrize("strategy", ["ddp_spawn", "ddp"])
def test_ddp_summary_equals_single_process(tmp_path, single, strategy):
    multi = _run(tmp_path / strategy, strategy, 2)
    assert multi["steps"] == single["steps"] == 40
    assert multi["verdict"] == single["verdict"]
    for a, b in zip(single["layers"], multi["layers"]):
        assert a["name"] == b["name"]
        for key in ("angular_update", "last_angular_update", "ratio", "weight_norm", "predicted_weight_norm", "unit_grad_sq"):
            assert b[key] == pytest.approx(a[key], rel=1e-6), (a["name"], key)
        for key in ("first_equilibrium_step", "steps_in_equilibrium", "state", "granularity"):
            assert b[key] == a[key], (a["name"], key)
    rows = (tmp_path / strategy / "metrics.csv").read_text().splitlines()
    smd_rows = [r for r in rows[1:] if r.split(",")[rows[0].split(",").index("smd/equilibrium_fraction")]]
    assert len(smd_rows) == 8  # logged once per interval, not once per rank
