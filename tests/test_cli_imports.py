"""``lightning-smd --help``, ``check`` and ``report`` read JSON and judge with numpy: they start without torch and
without Lightning (loading them took seconds on a busy machine). Each command runs in a fresh interpreter, as the
console script runs it, and ``-X importtime`` lists every module it imported."""

import json

import pytest
from helpers import run_python
from test_cli_check import _layer as layer_row

#: The console script ``lightning-smd`` (``lightning_smd.io.cli:main``), with the arguments after ``-c``.
ENTRY = "import sys; from lightning_smd.io.cli import main; sys.exit(main(sys.argv[1:]))"
#: Top-level packages the commands must not import.
HEAVY = {"torch", "pytorch_lightning", "lightning", "lightning_fabric"}


def _layer(name, ci, steady=True):
    """A layer row as the summary writes it (``test_cli_check``'s, with the columns ``report --all`` shows)."""
    mid = sum(ci) / 2
    row = layer_row(name, ci, steady)
    row.update(smoothed_predicted_angular_update=0.01, ratio=mid, drift=0.001, weight_norm=1.0, predicted_weight_norm=1.0)
    row["first_equilibrium_step"] = 400 if steady else None
    return row


@pytest.fixture(scope="module")
def summary_dir(tmp_path_factory):
    """A log directory holding a complete summary (the fields ``check`` requires, diagnoses and a warning for ``report``)."""
    directory = tmp_path_factory.mktemp("run") / "version_0"
    directory.mkdir()
    summary = {
        "schema_version": 2,
        "verdict": "equilibrium",
        "reason": "2/3 layers in equilibrium",
        "steps": 1000,
        "complete": True,
        "error": None,
        "criteria": {"tolerance": 0.1, "min_fraction": 0.6, "require_agreement": False, "max_deviation": 0.3},
        "layers": [_layer("conv1", (0.985, 1.01)), _layer("conv2", (0.90, 0.95)), _layer("conv3", (0.5, 1.5), steady=False)],
        "diagnoses": {"never_reached": ["conv3"]},
        "warnings": ["a warning [SMD032]"],
    }
    (directory / "smd_summary.json").write_text(json.dumps(summary))
    return directory


def _imported(stderr: str) -> set[str]:
    """The top-level packages in ``-X importtime``'s report (``import time: self | cumulative | name``)."""
    return {line.rsplit("|", 1)[1].strip().split(".")[0] for line in stderr.splitlines() if line.startswith("import time:") and "|" in line}


@pytest.mark.parametrize(
    "args, code, shown",
    [
        (["--help"], 0, "check"),
        (["check", "{summary}"], 0, "conv2"),
        (["check", "{summary}", "--tolerance", "0.02", "--require-agreement"], 1, "off_prediction"),
        (["report", "{dir}", "--all"], 0, "never reached: conv3"),
    ],
    ids=["help", "check", "check-rejudged", "report"],
)
def test_help_check_and_report_import_neither_torch_nor_lightning(summary_dir, args, code, shown):
    argv = [a.format(summary=summary_dir / "smd_summary.json", dir=summary_dir.parent) for a in args]
    proc = run_python(["-X", "importtime", "-c", ENTRY, *argv], check=False)
    assert proc.returncode == code, (proc.stdout[-2000:], proc.stderr[-2000:])
    assert shown in proc.stdout  # the command did its work, not an early exit
    imported = _imported(proc.stderr)
    assert "lightning_smd" in imported and "numpy" in imported  # the report lists what it should
    assert not imported & HEAVY, sorted(imported & HEAVY)
