"""``lightning-smd check`` with re-judging options: the per-layer column agrees with the verdict under it."""

import json

import pytest

from lightning_smd.io.cli import main as cli


def _layer(name, ci, steady=True):
    mid = sum(ci) / 2
    return {
        "name": name,
        "angular_update": 0.01 * mid,
        "predicted_angular_update": 0.01,
        "steady": steady,
        "steady_ratio": mid,
        "steady_ratio_ci": list(ci),
        "in_equilibrium": steady,
        "state": "equilibrium" if steady else "approaching",
        "agreement": "agrees",
    }


def _rows(out):
    lines = out.splitlines()
    header = lines[0]
    start = header.index("state")
    return {line.split()[0]: line[start:].split("  ")[0].strip() for line in lines[2:] if line.startswith("conv")}


@pytest.mark.parametrize(
    "options, states, code",
    [
        ([], {"conv1": "equilibrium", "conv2": "equilibrium", "conv3": "approaching"}, 0),
        # ±2 % agreement band, enforced: conv2's interval [0.90, 0.95] lies outside it
        (["--tolerance", "0.02", "--require-agreement"], {"conv1": "equilibrium", "conv2": "off_prediction", "conv3": "approaching"}, 1),
        # ±2 % without --require-agreement: conv2 counts, off the prediction
        (["--tolerance", "0.02"], {"conv1": "equilibrium", "conv2": "equilibrium (off prediction)", "conv3": "approaching"}, 0),
        # ±4 % deviation limit: conv2 is another regime
        (["--max-deviation", "0.04"], {"conv1": "equilibrium", "conv2": "steady_far_off", "conv3": "approaching"}, 1),
    ],
)
def test_check_rejudges_every_layer_with_the_options_given(tmp_path, capsys, options, states, code):
    summary = {
        "schema_version": 2,
        "verdict": "equilibrium",
        "reason": "as the run judged it",
        "steps": 1000,
        "complete": True,
        "criteria": {"tolerance": 0.1, "min_fraction": 0.6, "require_agreement": False, "max_deviation": 0.3},
        "layers": [_layer("conv1", (0.985, 1.01)), _layer("conv2", (0.90, 0.95)), _layer("conv3", (0.5, 1.5), steady=False)],
    }
    path = tmp_path / "smd_summary.json"
    path.write_text(json.dumps(summary))
    assert cli(["check", str(path), *options]) == code
    out = capsys.readouterr().out
    assert _rows(out) == states
    counted = sum(state.startswith("equilibrium") for state in states.values())
    if options:
        assert f"{counted}/3 layers in equilibrium" in out
