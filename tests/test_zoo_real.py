"""The zoo audit on real models (timm, torchvision, Hugging Face transformers), in CI.

``benchmarks/zoo_audit.py --quick`` builds real architectures at random init, computes an independent ground
truth (float64 Euler test and direct scaling test, no code shared with the detector) and compares, weight by
weight. Precision, recall, the unit (weight vs weight + bias) and the granularity must all agree, and every
conv/linear weight must be tracked or listed with a reason.

Why a subprocess with ``.zoo-deps`` on its path: PyPI's torchvision wheels are CUDA builds; with the CPU torch
their compiled ops do not load and ``import torchvision`` raises — and torchmetrics imports torchvision when it
is installed, so Lightning would not import in the test environment. timm needs torchvision. The README's
test command therefore installs timm and torchvision into ``.zoo-deps`` (not into the environment), and only the
audit's process sees them; the audit imports torchvision without its compiled ops (the model definitions are
pure Python; the detection ops such as ``nms`` are not needed). transformers is a test dependency proper.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from helpers import run_python

ROOT = Path(__file__).resolve().parents[1]
ZOO_DEPS = ROOT / ".zoo-deps"


@pytest.mark.slow
def test_detection_is_exact_on_real_models(tmp_path):
    if not (ZOO_DEPS / "timm").is_dir():
        pytest.skip("timm/torchvision not in .zoo-deps: run the README's test command (it installs them there)")
    out = tmp_path / "zoo.json"
    env = {"PYTHONPATH": os.pathsep.join([str(ZOO_DEPS), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    run_python([ROOT / "benchmarks" / "zoo_audit.py", "--quick", "--json", out], env=env)  # ~30 s alone
    models = json.loads(out.read_text())["models"]
    sources = {m["source"] for m in models}
    assert {"torchvision", "timm", "transformers"} <= sources, sources
    for m in models:
        name = m["model"]
        assert m["error"] is None and m["detector_error"] is None, (name, m["error"], m["detector_error"])
        assert m["tracked"] == m["true_positives"] == m["invariant"], (name, m["disagreements"])  # precision = recall = 1
        assert m["units_ok"] == m["granularity_ok"] == m["true_positives"], (name, m["disagreements"])
        assert m["unaccounted"] == 0, (name, m["disagreements"])


@pytest.mark.slow
def test_param_group_audit_on_real_models(tmp_path):
    """Issue 30, item 1: timm's, nanoGPT's and ``param_groups()``'s grouping give no finding; with
    ``model.parameters()`` decayed, the audit names every normalization gain and shift of the ground truth (a
    behavioural one: modules whose output ignores the scale of their input). One model family per library at least."""
    if not (ZOO_DEPS / "timm").is_dir():
        pytest.skip("timm/torchvision not in .zoo-deps: run the README's test command (it installs them there)")
    out = tmp_path / "groups.json"
    env = {"PYTHONPATH": os.pathsep.join([str(ZOO_DEPS), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    run_python([ROOT / "benchmarks" / "zoo_audit.py", "--groups", "--quick", "--threads", "1", "--json", out], env=env)  # ~12 s alone
    models = json.loads(out.read_text())["models"]
    sources = {m["source"] for m in models}
    assert {"torchvision", "timm", "transformers"} <= sources, sources
    for m in models:
        name, truth = m["model"], m["truth"]
        assert m["error"] is None and m["detector_error"] is None, (name, m["error"], m["detector_error"])
        for grouping in ("timm", "nanogpt", "param_groups"):
            assert m["findings"][grouping] == 0, (name, grouping, m["audits"][grouping])
        assert m["pg_vs_nanogpt"] == {"only_param_groups": [], "only_nanogpt": []}, (name, m["pg_vs_nanogpt"])
        if m["norm_by_class"]:  # the model has normalization layers: the truth must find their gains
            assert truth["gains"], (name, truth)
        if truth["gains"]:
            assert m["recall"] == 1.0, (name, m["missed"])
        assert not truth["unchecked"], (name, truth["unchecked"])
