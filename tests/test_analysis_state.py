"""The analysis' checkpoint: every declared per-unit field survives a round trip whatever its contents, and a
checkpoint written before the analysis was split into parts loads key for key and continues to the same summary."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
from test_steady import ar1, feed, units

from lightning_smd.analysis import Diagnostics
from lightning_smd.analysis.following import Following
from lightning_smd.analysis.warmup import EarlyWatch
from lightning_smd.analysis.diagnostics import _PARTS
from lightning_smd.analysis.fields import Field, vector
from lightning_smd.analysis.dead import DeadWatch
from lightning_smd.analysis.filters import FilterStats
from lightning_smd.analysis.states import Agreement, UnitState

FIXTURE = os.path.join(os.path.dirname(__file__), "data", "diagnostics_state_v2.json")
#: Keys of the checkpoint that belong to the facade or to a part's non-field state.
NON_FIELD_KEYS = {
    *("schema_version", "names", "stride", "series", "rules", "per_filter", "loss", "spikes"),
    *("delta", "ratio", "unit_grad", "filter_delta", "predicted_smooth"),
    *("trajectory_ratio", "trajectory_update", "trajectory_gradient", "trajectory_smooth", "early_delta"),
}


def _json(obj):
    """What a checkpoint is after being written and read (tuples become lists, str enums their values)."""
    return json.loads(json.dumps(obj))


def _old_run_inputs():
    """The series the fixture was made from (seeded: the same on every machine)."""
    rng = np.random.default_rng(5)
    ratio = 1.0 + ar1(rng, 1200, 3, 0.9, 0.05)
    lr = np.where(np.arange(1, 1201) < 400, 0.01, 0.005)
    loss = np.linspace(2.0, 1.0, 1200)
    return ratio, lr, loss


def _close(a, b, path="summary"):
    """``a`` equals ``b``: floats to 1e-9 relative (numpy's sums may differ in the last bits between CPUs), the rest exactly."""
    if isinstance(a, float) or isinstance(b, float):
        assert isinstance(a, (int, float)) and isinstance(b, (int, float)), f"{path}: {a!r} != {b!r}"
        assert a == pytest.approx(b, rel=1e-9, abs=1e-12, nan_ok=True), f"{path}: {a!r} != {b!r}"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and list(a) == list(b), f"{path}: keys {list(a)} != {list(b)}"
        for k in a:
            _close(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b), f"{path}: {a!r} != {b!r}"
        for i, (x, y) in enumerate(zip(a, b)):
            _close(x, y, f"{path}[{i}]")
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


def test_a_checkpoint_written_before_the_split_loads_key_for_key_and_continues_to_the_same_summary():
    with open(FIXTURE) as f:
        fixture = json.load(f)
    d = Diagnostics(units(3))
    d.load_state_dict(fixture["state"])
    # every key of the old layout is read and written back unchanged (no key lost); the keys added since are those of
    # the trajectory that follows a planned schedule (lightning_smd.analysis.following), the last change that did
    # not restart the samples (a followed plan's step) and the warm-up check (lightning_smd.analysis.warmup), and only
    # those
    state = _json(d.state_dict())
    assert {k: state[k] for k in fixture["state"]} == fixture["state"]
    added = {f.checkpoint_key for f in (*Following.FIELDS, *EarlyWatch.FIELDS, *FilterStats.FIELDS, *DeadWatch.FIELDS)}
    added |= {"trajectory_ratio", "trajectory_update", "trajectory_gradient", "trajectory_smooth", "last_change", "early_delta"}
    assert set(state) - set(fixture["state"]) == added
    ratio, lr, loss = _old_run_inputs()
    feed(d, ratio[700:], lr=lr[700:], first=701, loss=loss[700:])
    summary = _json(d.summary())
    for layer in summary["layers"]:  # added since the fixture (per-filter rows: None without them; no dead layer)
        assert layer.pop("rotation_imbalance") is None and layer.pop("dead_filters") is None and layer.pop("dead_since") is None
    _close(summary, fixture["summary"])
    # the fixture's run reached equilibrium after its change of the learning rate: the check has something to compare
    assert fixture["summary"]["verdict"] == "equilibrium"
    assert all(layer["reequilibrations"] for layer in fixture["summary"]["layers"])


def _random_value(f: Field, n: int, rng: np.random.Generator):
    """Random contents for field ``f`` of ``n`` units, nan and inf included for floats."""
    shape = (n, f.width) if f.width else (n,)
    if f.dtype is float:
        x = rng.standard_normal(shape)
        x[rng.random(shape) < 0.2] = np.nan
        x[rng.random(shape) < 0.1] = np.inf
        x[rng.random(shape) < 0.1] = -np.inf
        return x
    if f.dtype is int:
        return rng.integers(-5, 10**6, size=shape).astype(np.int64)
    if f.dtype is bool:
        return rng.random(shape) < 0.5
    if f.kind is UnitState:
        return [UnitState(s) for s in rng.choice([s.value for s in UnitState], n)]
    if f.kind is vector:
        return [None if rng.random() < 0.3 else rng.standard_normal(int(rng.integers(1, 6))) for _ in range(n)]
    if f.kind is Agreement:
        return [None if rng.random() < 0.3 else Agreement(a) for a in rng.choice([a.value for a in Agreement], n)]
    choices = [None, int(rng.integers(0, 9)), "a reason", {"lr": float(rng.random()), "weight_decay": math.nan}, [{"step": 3, "observed_steps": None}]]
    return [choices[int(rng.integers(0, len(choices)))] for _ in range(n)]


def _equal(a, b) -> bool:
    if isinstance(a, np.ndarray):
        return a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b, equal_nan=a.dtype.kind == "f")
    return json.dumps(a, default=str) == json.dumps(b, default=str) and [type(x) for x in a] == [type(x) for x in b]


@pytest.mark.parametrize("seed", [0, 1])
def test_every_declared_per_unit_field_survives_a_round_trip_with_random_contents(seed):
    rng = np.random.default_rng(seed)
    n = 5
    a = Diagnostics(units(n))
    written = {}
    for attr, part in _PARTS.items():
        for f in part.FIELDS:
            value = _random_value(f, n, rng)
            setattr(getattr(a, attr), f.name, value)
            written[(attr, f.name)] = value
    state = _json(a.state_dict())
    declared = {f.checkpoint_key for part in _PARTS.values() for f in part.FIELDS}
    assert set(state) == declared | NON_FIELD_KEYS, "the checkpoint holds exactly the declared fields and the known extras"
    b = Diagnostics(units(n))
    b.load_state_dict(state)
    for (attr, name), value in written.items():
        got = getattr(getattr(b, attr), name)
        assert _equal(got, value), f"{attr}.{name}: wrote {value!r}, read {got!r}"
        assert _equal(getattr(b, name), value), f"the facade's {name} is not {attr}.{name}"
    assert _json(b.state_dict()) == state


def test_a_checkpoint_without_a_required_field_names_it():
    d = Diagnostics(units(2))
    state = _json(d.state_dict())
    del state["ref_pred"]
    with pytest.raises(KeyError, match="ref_pred"):
        Diagnostics(units(2)).load_state_dict(state)
    # fields added after the layout was set may be missing (an older checkpoint): they keep their initial values
    state = _json(d.state_dict())
    del state["first_step"], state["diverged_step"]
    e = Diagnostics(units(2))
    e.load_state_dict(state)
    assert e.first_step.tolist() == [-1, -1] and e.diverged_step.tolist() == [-1, -1]
