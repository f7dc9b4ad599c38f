"""Multi-process DDP on CPU (gloo): the same statistics as a single process, logs and summary written once."""

import json
import re
from pathlib import Path

import pytest
from helpers import run_python

SCRIPT = Path(__file__).with_name("ddp_script.py")
ENV = {"OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}

pytestmark = pytest.mark.slow


def _run(out: Path, strategy: str, devices: int) -> dict:
    proc = run_python([SCRIPT, out, strategy, devices], env=ENV, cwd=out.parent)
    assert "RESULT-OK" in proc.stdout, proc.stderr[-3000:]
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


def _run_counting(out: Path, strategy: str, extras: str = "count") -> tuple[dict, list[str], str]:
    proc = run_python([SCRIPT, out, strategy, 2, extras], env=ENV, cwd=out.parent)
    assert "RESULT-OK" in proc.stdout, proc.stderr[-3000:]
    counts = [(out / f"collectives_rank{rank}.txt").read_text().strip() for rank in (0, 1)]
    assert all(re.fullmatch(rf"COLLECTIVES rank={rank} all_reduce=\d+ flushes=\d+", c) for rank, c in enumerate(counts)), counts
    return json.loads(next(out.rglob("smd_summary.json")).read_text()), counts, proc.stdout


def test_fsdp2_sharded_statistics_equal_the_whole_tensors(tmp_path):
    """FSDP2 (ModelParallelStrategy + fully_shard) on CPU over 2 ranks: per-layer norms and angles from shard-local
    partial sums, including conv2 whose single filter leaves one rank an empty shard, equal at every step a float64
    reference from the whole tensors (``full_tensor()``) of the same run. (Compared with an unsharded run instead,
    the test passed on one CPU and failed on another: FSDP2 trains along another float32 trajectory than no strategy,
    0.6 % apart in conv1's angle after 40 steps, with one rank as with two.)"""
    sharded, counts, stdout = _run_counting(tmp_path / "fsdp2", "fsdp2", "count,reference")
    assert any(layer["shape"][0] == 1 for layer in sharded["layers"])  # the layer with an empty shard
    assert all(layer["steps"] == 40 for layer in sharded["layers"])
    worst = re.search(r"REFERENCE 3 layers x 40 steps, largest relative difference ([0-9.e+-]+)", stdout)
    assert worst and float(worst.group(1)) <= 1e-5, stdout[-2000:]
    # one all-reduce per log interval (40 steps / 5), whatever the number of layers and metrics
    for line in counts:
        assert "all_reduce=8 flushes=8" in line, line


def test_plain_ddp_issues_no_collective_for_the_statistics(tmp_path):
    _, counts, _ = _run_counting(tmp_path / "ddp", "ddp")
    for line in counts:
        assert "all_reduce=0 " in line, line


def test_unsupported_strategies_are_named_at_fit_start():
    from lightning_smd.frontends.trainer import unsupported_strategy as _unsupported_strategy

    class DeepSpeedStrategy:
        pass

    class FSDPStrategy:
        pass

    class Fake:
        def __init__(self, strategy):
            self.strategy = strategy

    assert "not supported" in _unsupported_strategy(Fake(DeepSpeedStrategy()))
    hybrid = FSDPStrategy()
    hybrid.sharding_strategy = "ShardingStrategy.HYBRID_SHARD"
    assert "use_orig_params=True" in _unsupported_strategy(Fake(hybrid))
    full = FSDPStrategy()
    full.sharding_strategy, full.kwargs = "ShardingStrategy.FULL_SHARD", {"use_orig_params": True}
    assert _unsupported_strategy(Fake(full)) is None
    assert _unsupported_strategy(Fake(object())) is None


def test_fsdp1_flat_shards_equal_the_whole_tensors(tmp_path):
    """torch FSDP1 with use_orig_params=True on CPU: 1-D shard views, empty on some ranks; the recorder's
    partial sums over the shard group give the norms and angles of the whole tensors at every step."""
    script = SCRIPT.with_name("fsdp1_script.py")
    for world in (1, 2):
        proc = run_python([script, tmp_path, world], env=ENV, check=False)
        if proc.returncode != 0 and "terminate called without an active exception" in proc.stderr:
            # a gloo worker thread aborting at process shutdown (seen once in 4 CI runs, never in the measurement
            # itself): run again once; any other failure, or the same one twice, fails the test
            proc = run_python([script, tmp_path, world], env=ENV, check=False)
        assert proc.returncode == 0, proc.stderr[-3000:]
    single = json.loads((tmp_path / "angles_1.json").read_text())
    sharded = json.loads((tmp_path / "angles_2.json").read_text())
    assert sharded["shapes"]["conv2.weight"] != single["shapes"]["conv2.weight"]  # flat shard views
    assert sharded["collectives"] == 1
    import numpy as np

    # each run against its own whole tensors: two runs cannot be compared with each other (the sharded one sums its
    # gradient over two half batches; on one CPU the float32 trajectories stayed within 1e-5, on another they parted
    # by 3 % in 30 steps)
    for run in (single, sharded):
        np.testing.assert_allclose(run["angular_update"], run["reference_angular_update"], rtol=1e-5)
        np.testing.assert_allclose(run["weight_norm"], run["reference_weight_norm"], rtol=1e-5)
