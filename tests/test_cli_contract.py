"""The command line's exit-code contract, as a user or a CI job meets it: ``check`` exits 0 when the summary says
equilibrium, 1 for a valid summary that is not in equilibrium (any other verdict, or a run that did not
complete), 2 on bad input or usage — with one line on stderr, never a traceback. ``plot`` exits 0 or 2."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import Module, PlainConvNet, fit_smd, sgd

from lightning_smd.io.cli import main as cli
from lightning_smd.analysis.diagnostics import DiagnosticsConfig
from lightning_smd.io.report import write_summary
from lightning_smd.engine.session import Session

STEPS = 12


class CrashingModule(Module):
    """Raises in its 9th training step: the callback writes the summary of a crashed run."""

    def training_step(self, batch, batch_idx):
        if self.global_step == 8:
            raise RuntimeError("out of memory at step 8")
        return super().training_step(batch, batch_idx)


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A real run's log directory: ``metrics.csv`` and ``smd_summary.json`` (too short for equilibrium)."""
    root = tmp_path_factory.mktemp("run")
    with torch.random.fork_rng():  # the tests after these do not depend on them
        torch.manual_seed(0)
        fit_smd(root, Module(PlainConvNet(), optimizer=sgd()), STEPS, log_heatmap=False)
    return root


@pytest.fixture(scope="module")
def crashed(tmp_path_factory) -> Path:
    """The summary a run that crashed leaves behind (``"complete": false`` and the ``error``)."""
    root = tmp_path_factory.mktemp("crashed")
    with torch.random.fork_rng(), pytest.raises(RuntimeError, match="out of memory"):
        torch.manual_seed(0)
        fit_smd(root, CrashingModule(PlainConvNet(), optimizer=sgd()), STEPS, log_heatmap=False)
    return root / "smd_summary.json"


def _summary(run: Path) -> dict:
    return json.loads((run / "smd_summary.json").read_text())


def _write(tmp_path: Path, summary: object, name: str = "smd_summary.json") -> str:
    path = tmp_path / name
    path.write_text(json.dumps(summary))
    return str(path)


def _check(capsys, *argv: str) -> tuple[int, str]:
    """``lightning-smd check ARGV`` in this process: ``(exit code, stderr)``; one line on stderr when it fails."""
    code = cli(["check", *argv])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    if code:
        assert err.count("\n") <= 1, err
    return code, err


def test_real_summaries_are_judged_by_their_verdict(run, tmp_path, capsys):
    summary = _summary(run)
    assert summary["verdict"] == "not_reached" and summary["complete"] is True
    assert _check(capsys, str(run)) == (1, "")
    assert _check(capsys, str(run), "--min-fraction", "0.5", "--require-agreement") == (1, "")
    assert _check(capsys, _write(tmp_path, {**summary, "verdict": "equilibrium"})) == (0, "")
    # every other verdict exits 1; so does the summary of a session nothing was attached to (no schema_version)
    for verdict in ("not_applicable", "diverged"):
        assert _check(capsys, _write(tmp_path, {**summary, "verdict": verdict})) == (1, "")
    nothing = Session(DiagnosticsConfig()).summary(complete=True)
    assert nothing["verdict"] == "not_applicable" and nothing["layers"] == [] and "schema_version" not in nothing
    write_summary(str(tmp_path / "nothing.json"), nothing)
    assert _check(capsys, str(tmp_path / "nothing.json")) == (1, "")
    assert _check(capsys, str(tmp_path / "nothing.json"), "--min-fraction", "0.5") == (1, "")


@pytest.mark.parametrize("kind", ["cp1252", "gzip", "binary"])
def test_a_file_that_is_not_utf8_json_is_bad_input(run, tmp_path, capsys, kind):
    text = json.dumps(_summary(run), ensure_ascii=False)  # the reasons hold "±", "Δ", "—"
    data = {"cp1252": text.encode("cp1252", errors="replace"), "gzip": gzip.compress(text.encode()), "binary": bytes(range(256))}[kind]
    path = tmp_path / "smd_summary.json"
    path.write_bytes(data)
    code, err = _check(capsys, str(path))
    assert code == 2 and str(path) in err and "not a UTF-8 JSON summary" in err
    if kind == "gzip":
        assert "gunzip" in err


def test_a_layer_without_a_name_is_bad_input(run, tmp_path, capsys):
    summary = _summary(run)
    del summary["layers"][1]["name"]
    code, err = _check(capsys, _write(tmp_path, summary))
    assert code == 2 and "layers[1] has no 'name'" in err


@pytest.mark.parametrize(
    "field, value",
    [
        ("steady_ratio", "0.98"),
        ("drift", "0.01"),
        ("angular_update", "1e-3"),
        ("first_equilibrium_step", 12.5),
        ("steady", "true"),
        ("steady_ratio_ci", ["0.9", 1.1]),
    ],
)
def test_a_layer_figure_that_is_not_a_number_is_bad_input(run, tmp_path, capsys, field, value):
    summary = _summary(run)
    name = summary["layers"][2]["name"]
    summary["layers"][2][field] = value
    code, err = _check(capsys, _write(tmp_path, summary))
    assert code == 2 and f"layer {name!r}: {field!r} must be" in err and json.dumps(value) in err
    assert _check(capsys, _write(tmp_path, summary), "--max-deviation", "0.2")[0] == 2  # re-judging reads the same rows


def test_null_where_the_summary_writes_null_is_accepted(run, tmp_path, capsys):
    summary = _summary(run)
    assert summary["layers"][0]["steady_ratio"] is None and summary["layers"][0]["steady_ratio_ci"] is None  # not judged yet
    for layer in summary["layers"]:
        layer.update(steady_ratio=None, drift=None, predicted_angular_update=None, steady_ratio_ci=[None, None], first_equilibrium_step=None)
    assert _check(capsys, _write(tmp_path, summary)) == (1, "")


@pytest.mark.parametrize(
    "stub, missing",
    [
        ({"verdict": "equilibrium", "layers": []}, "no 'reason', 'steps', 'complete', 'schema_version', 'criteria'"),
        ({"verdict": "equilibrium", "reason": "", "steps": 10, "complete": True, "layers": [{"name": "conv.weight"}]}, "no 'schema_version', 'criteria'"),
        ({"schema_version": 2, "verdict": "equilibrium", "reason": "", "steps": 0, "complete": True, "criteria": {}, "layers": []}, "without any layer"),
        ([{"verdict": "equilibrium"}], "a JSON list, not an object"),
        ("equilibrium", "a JSON string, not an object"),
    ],
)
def test_a_stub_is_not_a_summary(tmp_path, capsys, stub, missing):
    code, err = _check(capsys, _write(tmp_path, stub))
    assert code == 2 and "not an SMD summary" in err and missing in err


def test_a_summary_with_misspelled_top_level_fields_is_bad_input(run, tmp_path, capsys):
    summary = _summary(run)
    for field, value, message in [
        ("complete", "yes", "'complete' must be a boolean"),
        ("steps", "12", "'steps' must be an integer"),
        ("schema_version", "2", "'schema_version' must be an integer"),
        ("criteria", {**summary["criteria"], "tolerance": "0.1"}, "criteria 'tolerance' must be a number"),
        ("layers", {}, "'layers' is not a list"),
    ]:
        code, err = _check(capsys, _write(tmp_path, {**summary, field: value}))
        assert code == 2 and message in err, (field, err)


def test_an_unknown_verdict_is_bad_input(run, tmp_path, capsys):
    code, err = _check(capsys, _write(tmp_path, {**_summary(run), "verdict": "passed"}))
    assert code == 2 and "unknown verdict 'passed'" in err and "diverged" in err


def test_a_diverged_run_is_not_in_equilibrium_whatever_the_criteria(run, tmp_path, capsys):
    diverged = _summary(run)
    diverged.update(verdict="diverged", reason="training diverged: the weights of net.conv2.weight became NaN", diverged_at_step=7)
    diverged["layers"][1].update(state="diverged", diverged_at_step=7)
    assert _check(capsys, _write(tmp_path, diverged)) == (1, "")
    # re-judging does not turn it into equilibrium, not even when every other layer counts
    for layer in diverged["layers"]:
        layer.update(steady=layer["state"] != "diverged", steady_ratio_ci=[0.99, 1.01])
    assert _check(capsys, _write(tmp_path, diverged), "--min-fraction", "0.5") == (1, "")


def test_a_run_that_did_not_complete_does_not_pass(crashed, tmp_path, capsys):
    summary = json.loads(crashed.read_text())
    assert summary["complete"] is False and summary["error"] == "RuntimeError: out of memory at step 8"
    code, err = _check(capsys, str(crashed))
    assert code == 1 and "did not complete" in err and "RuntimeError: out of memory at step 8" in err
    # even where the steps it had were judged in equilibrium
    path = _write(tmp_path, {**summary, "verdict": "equilibrium"})
    code, err = _check(capsys, path)
    assert code == 1 and path in err and "did not complete" in err and "--allow-incomplete" in err
    assert _check(capsys, path, "--allow-incomplete") == (0, "")
    assert _check(capsys, str(crashed), "--allow-incomplete") == (1, "")  # its own verdict: not_reached
    no_error = {key: value for key, value in summary.items() if key != "error"} | {"verdict": "equilibrium"}
    code, err = _check(capsys, _write(tmp_path, no_error))
    assert code == 1 and "did not complete (no error recorded)" in err


@pytest.mark.parametrize(
    "argv, option, accepted",
    [
        (["check", "S", "--min-fraction", "1.5"], "--min-fraction", "(0, 1]"),
        (["check", "S", "--min-fraction", "-0.2"], "--min-fraction", "(0, 1]"),
        (["check", "S", "--min-fraction", "0"], "--min-fraction", "(0, 1]"),
        (["check", "S", "--min-fraction", "nan"], "--min-fraction", "finite"),
        (["check", "S", "--tolerance", "0"], "--tolerance", "> 0"),
        (["check", "S", "--tolerance", "-0.1"], "--tolerance", "> 0"),
        (["check", "S", "--tolerance", "inf"], "--tolerance", "finite"),
        (["check", "S", "--max-deviation", "nan"], "--max-deviation", "finite"),
        (["check", "S", "--max-deviation", "ten"], "--max-deviation", "must be a number"),
        (["plot", "S", "-o", "O", "--layers", "0"], "--layers", ">= 1"),
        (["plot", "S", "-o", "O", "--dpi", "-5"], "--dpi", ">= 1"),
        (["wandb-workspace", "me/proj", "--summary", "S", "--worst-k", "-1"], "--worst-k", ">= 0"),
        (["plot", "S", "-o", "O", "--heatmap", "--layer", "net.conv1.weight"], "--layer", "--heatmap"),
    ],
)
def test_an_option_out_of_its_range_is_a_usage_error(run, tmp_path, capsys, argv, option, accepted):
    with pytest.raises(SystemExit) as exit_:
        cli([{"S": str(run), "O": str(tmp_path / "smd.png")}.get(a, a) for a in argv])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and option in err and accepted in err and "Traceback" not in err


def test_in_range_options_are_accepted(run, capsys):
    assert _check(capsys, str(run), "--min-fraction", "1", "--tolerance", "0.05", "--max-deviation", "2") == (1, "")


def test_plot_creates_the_output_directory(run, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    out = tmp_path / "figures" / "smd" / "run.png"
    assert cli(["plot", str(run), "-o", str(out), "--layers", "1", "--dpi", "30"]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and capsys.readouterr().out.strip() == str(out)
    assert cli(["plot", str(run), "-o", str(tmp_path / "heat" / "map.png"), "--heatmap", "--dpi", "30"]) == 0
    assert (tmp_path / "heat" / "map.png").is_file()
    (tmp_path / "a_file").write_text("")
    assert cli(["plot", str(run), "-o", str(tmp_path / "a_file" / "run.png"), "--dpi", "30"]) == 2  # a file where the directory goes
    err = capsys.readouterr().err
    assert "cannot create the directory" in err and "Traceback" not in err


def test_plot_of_an_unknown_layer_lists_the_layers(run, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    out = tmp_path / "one.png"
    assert cli(["plot", str(run), "-o", str(out), "--layer", "net.conv2.weight", "--dpi", "30"]) == 0 and out.is_file()
    code = cli(["plot", str(run), "-o", str(tmp_path / "typo.png"), "--layer", "net.conv2.weight", "--layer", "net.conv9.weight"])
    err = capsys.readouterr().err
    assert code == 2 and "no layer 'net.conv9.weight'" in err and "net.conv1.weight, net.conv2.weight, net.conv3.weight" in err
    assert not (tmp_path / "typo.png").exists()


def test_plot_of_a_run_with_several_callbacks_draws_the_one_named(tmp_path, capsys):
    """Two labelled SMDCallbacks log ``smd-lenient/*`` and ``smd-strict/*``, each with its summary: ``plot`` without
    ``--name`` is ambiguous and says which there are; ``--name strict`` draws that one's series and reads its
    summary; a name the run did not log lists the logged ones. A lone labelled namespace is taken as is."""
    pytest.importorskip("matplotlib")
    from lightning_smd import SMDCallback
    from lightning_smd.io.plot import load_series

    with torch.random.fork_rng():
        torch.manual_seed(0)
        extra = [SMDCallback(verbose=False, name="strict", tolerance=0.05, log_heatmap=False)]
        fit_smd(tmp_path, Module(PlainConvNet(), optimizer=sgd()), STEPS, name="lenient", tolerance=0.2, log_heatmap=False, callbacks=extra)
    assert cli(["plot", str(tmp_path), "-o", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert "several SMDCallbacks logged here (lenient, strict): choose one with --name" in err and "Traceback" not in err
    assert cli(["plot", str(tmp_path), "-o", str(tmp_path / "strict.png"), "--name", "strict", "--dpi", "30"]) == 0
    assert (tmp_path / "strict.png").is_file()
    series, summary = load_series(str(tmp_path), "strict")
    assert summary is not None and summary["criteria"]["tolerance"] == 0.05 and summary["name"] == "strict"
    assert "smd/net.conv1.weight/angular_update" in series and not any(k.startswith("smd-") for k in series)
    assert load_series(str(tmp_path), "lenient")[1]["criteria"]["tolerance"] == 0.2
    assert cli(["plot", str(tmp_path), "-o", str(tmp_path / "y.png"), "--name", "nope", "--heatmap"]) == 2
    err = capsys.readouterr().err
    assert "no smd-nope/* metrics" in err and "smd-lenient/*, smd-strict/*" in err
    alone = tmp_path / "alone"
    alone.mkdir()
    (alone / "metrics.csv").write_text("step,smd-strict/net.w/angular_update,train_loss\n0,0.1,2.0\n1,0.2,1.9\n")
    series, summary = load_series(str(alone))
    assert series["smd/net.w/angular_update"][1].tolist() == [0.1, 0.2] and summary is None


def _console_script() -> list[str]:
    """``lightning-smd`` as installed next to this interpreter (``python -m lightning_smd.io.cli`` without it)."""
    script = Path(sys.executable).with_name("lightning-smd")
    return [str(script)] if script.exists() else [sys.executable, "-m", "lightning_smd.io.cli"]


def test_exit_codes_through_the_console_script(run, crashed, tmp_path):
    summary = _summary(run)
    (tmp_path / "eq.json").write_text(json.dumps({**summary, "verdict": "equilibrium"}))
    (tmp_path / "s.json.gz").write_bytes(gzip.compress(json.dumps(summary).encode()))
    (tmp_path / "stub.json").write_text(json.dumps({"verdict": "equilibrium", "layers": []}))
    cases = [
        (["check", str(tmp_path / "eq.json")], 0, ""),
        (["check", str(run)], 1, ""),
        (["check", str(crashed)], 1, "did not complete"),
        (["check", str(tmp_path / "s.json.gz")], 2, "not a UTF-8 JSON summary"),
        (["check", str(tmp_path / "stub.json")], 2, "not an SMD summary"),
        (["check", str(tmp_path / "eq.json"), "--min-fraction", "1.5"], 2, "argument --min-fraction: must be in (0, 1]"),
        (["plot", str(run), "-o", str(tmp_path / "x.png"), "--layer", "nope"], 2, "no layer 'nope'"),
    ]
    for argv, code, message in cases:
        proc = subprocess.run([*_console_script(), *argv], capture_output=True, text=True, timeout=120)
        assert proc.returncode == code, (argv, proc.stderr[-2000:])
        assert "Traceback" not in proc.stderr and message in proc.stderr, (argv, proc.stderr[-2000:])
        if code == 2:
            assert proc.stdout == "", (argv, proc.stdout)
