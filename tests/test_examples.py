"""Every example runs in its CI size (SMD_EXAMPLE_FAST=1) and does what its docstring says."""

import json
import os

import pytest
from helpers import ROOT, run_python

EXAMPLES = os.path.join(ROOT, "examples")


def _run(args, tmp_path, timeout=280, check=True):
    env = dict(SMD_EXAMPLE_FAST="1", OMP_NUM_THREADS="1" if "ddp.py" in args[0] else os.environ.get("OMP_NUM_THREADS", "2"))
    return run_python(args, cwd=tmp_path, env=env, timeout=timeout, check=check)


def _summary(path):
    with open(path) as fh:
        return json.load(fh)


@pytest.mark.slow
def test_quickstart(tmp_path):
    """Margins over seeds 0–9: see tests/test_callback.py::test_quickstart_example_reaches_equilibrium."""
    proc = _run([os.path.join(EXAMPLES, "quickstart.py"), "--out", str(tmp_path / "q")], tmp_path)
    summary = _summary(tmp_path / "q" / "smd_summary.json")
    assert summary["verdict"] == "equilibrium", summary["reason"]
    assert "SMD verdict" in proc.stdout


@pytest.mark.slow
def test_resnet(tmp_path):
    """The docstring's story: equilibrium before the drop at step 400, the drop timed per layer, equilibrium at
    the end. Margins over seeds 0–4 (``python benchmarks/examples.py --sizes fast --seeds 0 1 2 3 4 --only resnet``):
    every layer in equilibrium, the worst drift statistic (``|drift|`` or ``t·se``, of Δ/Δ* or the norm) at 0.35 of
    its limit, steady Δ/Δ* 0.975–1.017 (at 900 steps it was 0.85: the CI size was lengthened for that)."""
    _run([os.path.join(EXAMPLES, "resnet.py"), "--out", str(tmp_path / "r"), "--plot", str(tmp_path / "r.png")], tmp_path)
    summary = _summary(tmp_path / "r" / "smd_summary.json")
    assert summary["steps"] == 1200 and len(summary["layers"]) == 6
    assert summary["verdict"] == "equilibrium", summary["reason"]
    for layer in summary["layers"]:
        assert layer["state"] == "equilibrium" and layer["steps_since_change"] == 800, layer["name"]
        (event,) = layer["reequilibrations"]  # the one drop
        assert event["step"] == 401  # the first step at the new learning rate (the scheduler steps after step 400)
    assert os.path.getsize(tmp_path / "r.png") > 10_000


@pytest.mark.slow
def test_transformer_with_qk_norm(tmp_path):
    """Margins over seeds 0–4 (``python benchmarks/examples.py --sizes fast --seeds 0 1 2 3 4 --only
    transformer_qknorm``): every layer in equilibrium, the worst drift statistic at 0.61 of its limit, steady Δ/Δ*
    0.989–1.030."""
    _run([os.path.join(EXAMPLES, "transformer_qknorm.py"), "--out", str(tmp_path / "t")], tmp_path)
    summary = _summary(tmp_path / "t" / "smd_summary.json")
    names = {r["name"]: r for r in summary["layers"]}
    assert set(names) == {"blocks.0.attn.q.weight", "blocks.0.attn.k.weight"}
    assert names["blocks.0.attn.q.weight"]["granularity"] in ("group", "filter")  # per head
    assert summary["optimizers"][0]["rule"].lower() == "adamw"
    assert summary["verdict"] == "equilibrium", summary["reason"]


@pytest.mark.slow
def test_ddp_two_processes(tmp_path):
    """Margins over seeds 0–4 (``python benchmarks/examples.py --sizes fast --seeds 0 1 2 3 4 --only ddp``):
    every layer in
    equilibrium, the worst drift statistic at 0.25 of its limit, steady Δ/Δ* 0.983–0.997."""
    proc = _run([os.path.join(EXAMPLES, "ddp.py"), "--out", str(tmp_path / "d")], tmp_path)
    summary = _summary(tmp_path / "d" / "smd_summary.json")
    assert summary["steps"] == 800
    assert summary["verdict"] == "equilibrium", summary["reason"]
    assert proc.stdout.count("verdict:") == 1  # rank zero only


@pytest.mark.slow
def test_plain_pytorch(tmp_path):
    """Margins over seeds 0–4 (``python benchmarks/examples.py --sizes fast --seeds 0 1 2 3 4 --only plain_pytorch``):
    every
    layer in equilibrium, the worst drift statistic at 0.51 of its limit, steady Δ/Δ* 0.965–1.004."""
    proc = _run([os.path.join(EXAMPLES, "plain_pytorch.py"), "--summary", str(tmp_path / "p.json")], tmp_path)
    summary = _summary(tmp_path / "p.json")
    assert summary["steps"] == 500 and summary["complete"]
    assert summary["verdict"] == "equilibrium", summary["reason"]
    assert proc.stdout.count("median Δ/Δ*") == 5


@pytest.mark.slow
def test_ci_gate_passes_and_can_fail(tmp_path):
    """The gate's training is the verdict benchmark's healthy cell (HeadNet, SGD momentum; margins in tests/helpers.py)."""
    _run(["-m", "pytest", "-q", "-p", "no:cacheprovider", os.path.join(EXAMPLES, "ci_gate")], tmp_path)
    # the same gate on a run without weight decay on the normalized weights must fail
    failing = tmp_path / "test_failing_gate.py"
    source = open(os.path.join(EXAMPLES, "ci_gate", "test_smd_gate.py")).read()
    assert "Classifier(weight_decay=2.5e-3)" in source
    failing.write_text(source.replace("Classifier(weight_decay=2.5e-3)", "Classifier(weight_decay=0.0)"))
    proc = _run(["-m", "pytest", "-q", "-p", "no:cacheprovider", str(failing)], tmp_path, check=False)
    assert proc.returncode == 1 and "EquilibriumNotReachedError" in proc.stdout


@pytest.mark.parametrize("name", ["quickstart.py", "resnet.py", "transformer_qknorm.py", "ddp.py", "plain_pytorch.py"])
def test_examples_document_their_sizes(name):
    """Each example says how to run both sizes and what each shows."""
    doc = open(os.path.join(EXAMPLES, name)).read().split('"""')[1]
    assert "SMD_EXAMPLE_FAST=1" in doc and "python examples/" + name in doc
    assert "full size" in doc and "CI size" in doc and "What you should see" in doc
