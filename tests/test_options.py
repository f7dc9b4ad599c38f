"""Arguments that mean nonsense are refused, or say what they did (issue 18, item 4).

The tables are rows of a reliability matrix: each is (constructor argument, bad value, what the user reads). Every
rejection is a ``ValueError`` whose message names the option, the value given and what is accepted. The behavioural
tests below them: a str is one include/exclude pattern; a pattern that matches nothing is a warning; an included
weight that is not scale-invariant is measured, but out of the verdict.
"""

from __future__ import annotations

import dataclasses
import math
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.optim.optimizer as torch_optimizer
from helpers import HEALTHY_STEPS, Module, SmallConvNet, healthy_module, teacher_loader

from lightning_smd import SMDCallback, SMDMonitor, SMDWarning
from lightning_smd.engine.detect import find_normalized_weights
from lightning_smd.analysis.diagnostics import DiagnosticsConfig
from lightning_smd.messages import MESSAGES

ROOT = Path(__file__).resolve().parents[1]
NAN, INF = float("nan"), float("inf")

#: The equilibrium criteria: constructor arguments of DiagnosticsConfig, SMDCallback and SMDMonitor alike.
CRITERIA = [
    ("tolerance", 10, "tolerance must be a number in (0, 1) (a fraction: 0.1 means 10 %), got 10"),
    ("tolerance", INF, "tolerance must be a number in (0, 1) (a fraction: 0.1 means 10 %), got inf"),
    ("tolerance", NAN, "tolerance must be a number in (0, 1)"),
    ("tolerance", 1.0, "tolerance must be a number in (0, 1)"),
    ("tolerance", 0, "tolerance must be a number in (0, 1)"),
    ("tolerance", "0.1", "tolerance must be a number in (0, 1) (a fraction: 0.1 means 10 %), got '0.1'"),
    ("tolerance", True, "tolerance must be a number in (0, 1) (a fraction: 0.1 means 10 %), got True"),
    ("window", 2.5, "window must be an integer >= 1 (steps), got 2.5"),
    ("window", True, "window must be an integer >= 1 (steps), got True"),
    ("window", 0, "window must be an integer >= 1 (steps), got 0"),
    ("window", "100", "window must be an integer >= 1 (steps), got '100'"),
    ("ema_steps", "50", "ema_steps must be an integer >= 1 (steps), got '50'"),
    ("ema_steps", 2.5, "ema_steps must be an integer >= 1 (steps), got 2.5"),
    ("ema_steps", 0, "ema_steps must be an integer >= 1 (steps), got 0"),
    ("min_fraction", 0, "min_fraction must be a number in (0, 1] (a share of the layers: 0.9 means 90 %; 0 would pass any run), got 0"),
    ("min_fraction", 1.5, "min_fraction must be a number in (0, 1]"),
    ("min_fraction", NAN, "min_fraction must be a number in (0, 1]"),
    ("max_deviation", 30, "max_deviation must be a number in (0, 1] (a fraction: 0.3 means 30 %), got 30"),
    ("max_deviation", INF, "max_deviation must be a number in (0, 1] (a fraction: 0.3 means 30 %), got inf"),
    ("max_deviation", 0.05, "max_deviation must be >= tolerance (0.1)"),
    ("drift_limit", 0, "drift_limit must be a number in (0, 1] or None (a fraction per relaxation time: 0.1 means 10 %; None: the tolerance), got 0"),
    ("drift_limit", INF, "drift_limit must be a number in (0, 1] or None"),
    ("drift_limit", 10, "drift_limit must be a number in (0, 1] or None"),
    ("significance", 0, "significance must be a number in (0, 1) (a false-alarm rate: 0.01 means 1 %), got 0"),
    ("significance", 1, "significance must be a number in (0, 1)"),
    ("significance", NAN, "significance must be a number in (0, 1)"),
    ("require_agreement", "yes", "require_agreement must be True or False, got 'yes'"),
    ("require_agreement", 1, "require_agreement must be True or False, got 1"),
]
#: DiagnosticsConfig only (not arguments of the front ends).
CONFIG_ONLY = [
    ("spike_factor", 1.0, "spike_factor must be a finite number > 1 (a factor above 1), got 1.0"),
    ("spike_factor", INF, "spike_factor must be a finite number > 1"),
    ("vanishing_factor", 0.5, "vanishing_factor must be a finite number > 1 (a factor above 1), got 0.5"),
    ("vanishing_factor", NAN, "vanishing_factor must be a finite number > 1"),
    ("loss_factor", -10, "loss_factor must be a finite number > 1 (a factor above 1), got -10"),
    ("loss_factor", "10", "loss_factor must be a finite number > 1"),
    ("vanishing_factor_without_loss", 1, "vanishing_factor_without_loss must be a finite number > 1 (a factor above 1), got 1"),
    ("vanishing_factor_without_loss", INF, "vanishing_factor_without_loss must be a finite number > 1"),
]
#: Options both front ends take, beyond the criteria.
SHARED = [
    ("include", [1], "include must hold parameter-name globs (strings) only, got 1 in [1]"),
    ("include", [None], "include must hold parameter-name globs (strings) only, got None"),
    ("include", 5, "include must be a parameter-name glob (a str) or a list of them, got 5"),
    ("include", b"conv1.weight", "include must be a parameter-name glob (a str) or a list of them"),
    ("exclude", [3.0], "exclude must hold parameter-name globs (strings) only, got 3.0"),
    ("exclude", ["net.fc.weight", Path("x")], "exclude must hold parameter-name globs (strings) only"),
    ("log_every_n_steps", 0, "log_every_n_steps must be an integer >= 1"),
    ("log_every_n_steps", 2.5, "log_every_n_steps must be an integer >= 1"),
    ("log_every_n_steps", True, "log_every_n_steps must be an integer >= 1"),
    ("log_every_n_steps", "5", "log_every_n_steps must be an integer >= 1"),
    ("every_n_steps", 0, "every_n_steps must be an integer >= 1, got 0"),
    ("every_n_steps", 2.5, "every_n_steps must be an integer >= 1, got 2.5"),
    ("every_n_steps", True, "every_n_steps must be an integer >= 1, got True"),
    ("on_no_equilibrium", "fail", "on_no_equilibrium must be one of 'warn', 'stop', 'raise', got 'fail'"),
    ("on_no_equilibrium", None, "on_no_equilibrium must be one of 'warn', 'stop', 'raise', got None"),
    ("keep_history", "x", "keep_history must be True or False, got 'x'"),
    ("use_momentum_buffer", None, "use_momentum_buffer must be True or False, got None"),
    ("per_filter", 1, "per_filter must be True or False, got 1"),
    ("track_distance", "x", "track_distance must be True or False, got 'x'"),
]
CALLBACK_ONLY = [
    ("log_every_n_steps", -1, "log_every_n_steps must be an integer >= 1 or None (None: the Trainer's), got -1"),
    ("log_per_layer", 1, "log_per_layer must be True, False, 'auto', 'all', 'ratio' or 'none', got 1"),
    ("log_per_layer", "some", "log_per_layer must be True, False, 'auto', 'all', 'ratio' or 'none', got 'some'"),
    ("worst_k", -1, "worst_k must be an integer >= 0, got -1"),
    ("worst_k", 2.0, "worst_k must be an integer >= 0, got 2.0"),
    ("worst_k", True, "worst_k must be an integer >= 0, got True"),
    ("log_heatmap", "no", "log_heatmap must be True or False, got 'no'"),
    ("heatmap_every_n_logs", -1, "heatmap_every_n_logs must be an integer >= 0 (0: only at the end), got -1"),
    ("heatmap_every_n_logs", 1.5, "heatmap_every_n_logs must be an integer >= 0 (0: only at the end), got 1.5"),
    ("heatmap_time_share", 1.5, "heatmap_time_share must be a number in (0, 1], got 1.5"),
    ("heatmap_time_share", 0, "heatmap_time_share must be a number in (0, 1], got 0"),
    ("wandb_workspace", "yes", "wandb_workspace must be True or False, got 'yes'"),
    ("summary_path", 123, "summary_path must be a path (a non-empty str or os.PathLike), True or None (the default place) or False (none), got 123"),
    ("summary_path", "", "summary_path must be a path (a non-empty str or os.PathLike), True or None (the default place) or False (none), got ''"),
    ("verbose", "no", "verbose must be True or False, got 'no'"),
    ("verbose", 0, "verbose must be True or False, got 0"),
    ("name", 3, "name must be a short label of letters, digits, '_', '.' and '-', got 3"),
    ("name", "a b", "name must be a short label of letters, digits, '_', '.' and '-', got 'a b'"),
]
MONITOR_ONLY = [
    ("max_steps", 0, "max_steps must be an integer >= 1 or None (None: unknown), got 0"),
    ("max_steps", -1, "max_steps must be an integer >= 1 or None (None: unknown), got -1"),
    ("max_steps", 2.5, "max_steps must be an integer >= 1 or None (None: unknown), got 2.5"),
    ("log_every_n_steps", None, "log_every_n_steps must be an integer >= 1, got None"),
]


def _refused(fragment: str, make) -> str | None:
    """What is wrong with ``make()``'s refusal, or None: it must raise a ``ValueError`` whose message holds ``fragment``."""
    try:
        make()
    except ValueError as e:
        return None if fragment in str(e) else f"message {str(e)!r} lacks {fragment!r}"
    except Exception as e:  # noqa: BLE001 - any other exception is a failure of the case, reported with the others
        return f"{type(e).__name__} instead of ValueError: {e}"
    return "accepted"


def _check_each(rows, front: str, check) -> None:
    """Run ``check(option, value, fragment)`` (a message when the case fails, else None) on every row; the failures are
    reported together, each with its case id ``front-option=value``."""
    failures = []
    for option, value, fragment in rows:
        problem = check(option, value, fragment)
        if problem:
            failures.append(f"{front}-{option}={value!r}: {problem}")
    assert not failures, "\n".join(failures)


def test_diagnostics_config_rejects():
    _check_each(CRITERIA + CONFIG_ONLY, "config", lambda option, value, fragment: _refused(fragment, lambda: DiagnosticsConfig(**{option: value})))


def test_callback_rejects():
    def check(option, value, fragment):
        return _refused(fragment, lambda: SMDCallback(**{"verbose": False, option: value}))

    _check_each(CRITERIA + SHARED + CALLBACK_ONLY, "callback", check)


def _net_and_optimizer():
    torch.manual_seed(0)
    net = SmallConvNet()
    return net, torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)


MONITOR_ARGS = [
    ("model", "not a model", "model must be a torch.nn.Module, got str"),
    ("optimizers", [], "optimizers must be a torch.optim.Optimizer (built on the model's parameters) or a non-empty list of them, got []"),
    ("optimizers", torch.optim.SGD, "optimizers must be a torch.optim.Optimizer"),
    ("optimizers", None, "optimizers must be a torch.optim.Optimizer"),
]


def test_monitor_rejects():
    def check(option, value, fragment):
        net, opt = _net_and_optimizer()
        args = {"model": net, "optimizers": opt}
        kwargs = {}
        if option in args:
            args[option] = value
        else:
            kwargs[option] = value
        hooks_before = len(torch_optimizer._global_optimizer_pre_hooks)
        problem = _refused(fragment, lambda: SMDMonitor(args["model"], args["optimizers"], **kwargs))
        # refused before anything was hooked: the optimizer steps on untouched
        if len(torch_optimizer._global_optimizer_pre_hooks) != hooks_before or opt._optimizer_step_post_hooks:
            problem = f"{problem or 'refused'}, but a hook was left on the optimizer"
        return problem

    _check_each(CRITERIA + SHARED + MONITOR_ONLY + MONITOR_ARGS, "monitor", check)


def test_every_criterion_has_a_row():
    """A field added to DiagnosticsConfig gets a check and a row here."""
    tested = {option for option, _, _ in CRITERIA + CONFIG_ONLY}
    assert {f.name for f in dataclasses.fields(DiagnosticsConfig)} <= tested


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(tolerance=0.5, max_deviation=1.0, min_fraction=1.0, drift_limit=1.0, significance=0.5),
        dict(tolerance=np.float32(0.05), window=np.int64(1), ema_steps=np.int32(1), drift_limit=None, require_agreement=np.bool_(True)),
        dict(tolerance=0.3, max_deviation=0.3),
    ],
    ids=["upper-bounds", "numpy-scalars", "max_deviation=tolerance"],
)
def test_values_in_range_are_accepted_as_plain_numbers(kwargs):
    cfg = DiagnosticsConfig(**kwargs)
    for key, value in kwargs.items():
        stored = getattr(cfg, key)
        assert stored == value and (stored is None or type(stored) in (int, float, bool)), (key, stored)
    SMDCallback(verbose=False, **kwargs)


@pytest.mark.parametrize("summary_path", [None, True, False, "run.json", Path("run.json")])
def test_summary_path_values_accepted(summary_path):
    assert SMDCallback(verbose=False, summary_path=summary_path).summary_path == summary_path


def test_callback_accepts_its_documented_values():
    smd = SMDCallback(verbose=True, log_per_layer=True, worst_k=0, heatmap_every_n_logs=0, log_every_n_steps=None, every_n_steps=np.int64(2))
    assert smd.every_n_steps == 2 and type(smd.every_n_steps) is int
    for mode in ("auto", "all", "ratio", "none", False):
        SMDCallback(verbose=False, log_per_layer=mode)


# ----------------------------------------------------------------------------------------------
# A str is one pattern
# ----------------------------------------------------------------------------------------------
def test_a_str_is_one_pattern():
    smd = SMDCallback(verbose=False, include="net.fc.weight", exclude="net.conv1.weight")
    assert smd.include == ["net.fc.weight"] and smd.exclude == ["net.conv1.weight"]
    # the same options as with lists: the same state key and label
    assert smd._distinct == SMDCallback(verbose=False, include=["net.fc.weight"], exclude=["net.conv1.weight"])._distinct
    det = find_normalized_weights(SmallConvNet(), include="fc.weight", exclude="conv1.weight")
    assert "fc.weight" in det.names and "conv1.weight" not in det.names
    assert det.rejected["conv1.weight"] == "excluded by the user"


def test_a_str_is_one_pattern_in_a_fit(fit):
    """``include="*"`` split into characters is still ``"*"``: the real harm was ``include="net.fc.weight"`` adding
    nothing and ``exclude="net.conv1.weight"`` excluding nothing, silently."""
    torch.manual_seed(0)
    result = fit(Module(SmallConvNet()), 10, include="net.fc.weight", exclude="net.conv1.weight")
    rows = {row["name"]: row for row in result.smd.summary()["layers"]}
    assert "net.conv1.weight" not in rows
    assert rows["net.fc.weight"]["found_by"] == "include"
    assert not [w for w in result.warnings if "[SMD013]" in w or "[SMD014]" in w]


def test_a_str_is_one_pattern_for_the_monitor():
    net, opt = _net_and_optimizer()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        monitor = SMDMonitor(net, opt, include="fc.weight", exclude="conv1.weight")
    assert "fc.weight" in monitor.units and "conv1.weight" not in monitor.units
    monitor.close()


# ----------------------------------------------------------------------------------------------
# A pattern that matches nothing
# ----------------------------------------------------------------------------------------------
def test_an_include_pattern_that_matches_nothing_is_a_warning(fit):
    """``conv1.weight`` for a LightningModule whose network is ``self.net``: the warning names the pattern and the
    parameter name meant, once."""
    torch.manual_seed(0)
    result = fit(Module(SmallConvNet()), 10, include=["conv1.weight", "net.fc.weight"], exclude=["fc.bias"])
    include = [w for w in result.warnings if "[SMD013]" in w]
    assert len(include) == 1, result.warnings
    assert "'conv1.weight'" in include[0] and "'net.fc.weight'" not in include[0].split("match")[0]
    assert "Did you mean 'net.conv1.weight'?" in include[0]
    assert "parameter names read like" in include[0]
    exclude = [w for w in result.warnings if "[SMD014]" in w]
    assert len(exclude) == 1 and "'fc.bias'" in exclude[0] and "'net.fc.bias'" in exclude[0]
    det = result.smd.detection
    assert det.unmatched_patterns == {"include": ["conv1.weight"], "exclude": ["fc.bias"]}
    summary = result.smd.summary()
    assert include[0] in summary["warnings"]
    assert "net.fc.weight" in [row["name"] for row in summary["layers"]]  # the pattern that matches still works


def test_an_exclude_pattern_for_an_untracked_parameter_is_no_warning(fit):
    torch.manual_seed(0)
    result = fit(Module(SmallConvNet()), 5, exclude=["*.bias", "net.fc.*"])
    assert not [w for w in result.warnings if "[SMD014]" in w or "[SMD013]" in w]


def test_the_monitor_warns_about_a_pattern_that_matches_nothing():
    net, opt = _net_and_optimizer()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        monitor = SMDMonitor(net, opt, include=["net.conv1.weight"], exclude=["conv9.weight"])
    texts = [str(w.message) for w in record if issubclass(w.category, SMDWarning)]
    assert [t for t in texts if "[SMD013]" in t and "'net.conv1.weight'" in t and "'conv1.weight'" in t]
    assert [t for t in texts if "[SMD014]" in t and "'conv9.weight'" in t]
    monitor.close()


# ----------------------------------------------------------------------------------------------
# An included weight that is not scale-invariant
# ----------------------------------------------------------------------------------------------
def _check_included_head(result, tmp_path, steps):
    """The head named by include= is measured and logged, warned about once, and out of the verdict's count."""
    summary = result.smd.summary()
    rows = {row["name"]: row for row in summary["layers"]}
    head = rows["net.fc.weight"]
    assert head["found_by"] == "include" and head["verification"] > 0.01
    assert head["state"] == "no_prediction" and not head["in_equilibrium"]
    why = head["not_in_equilibrium_because"]
    assert why.startswith("not scale-invariant (|cos(g, w)| = ") and "on the first batch" in why, why
    assert head["steps"] == steps and math.isfinite(head["angular_update"]) and math.isfinite(head["weight_norm"])
    warned = [w for w in result.warnings if "[SMD015]" in w]
    assert len(warned) == 1 and "net.fc.weight" in warned[0] and "left out of the verdict" in warned[0]
    assert not [w for w in result.warnings if "[SMD010]" in w or "[SMD011]" in w]
    assert summary["statistics"]["units_judged"] == 3
    # still logged per layer
    header = (tmp_path / "metrics.csv").read_text().splitlines()[0]
    assert "smd/net.fc.weight/angular_update" in header
    return summary


def test_an_included_head_is_measured_but_not_judged_in_a_short_run(fit, tmp_path):
    """The fast twin of the next test: 20 steps, too few for equilibrium, but the count is already of the three
    normalized layers (0/3, not 0/4)."""
    torch.manual_seed(0)
    summary = _check_included_head(fit(healthy_module(), 20, data=teacher_loader(), include=["net.fc.weight"]), tmp_path, 20)
    assert summary["verdict"] == "not_reached" and summary["reason"].startswith("only 0/3 tracked layers"), summary["reason"]


@pytest.mark.slow  # the healthy cell's 1,600 steps
def test_an_included_head_is_measured_but_not_judged(fit, tmp_path):
    """The classifier's weight named by include=: |cos(g, w)| ~0.1 on the first batch. It used to count in the verdict
    (here: 3/4 layers in equilibrium, `not_reached`); now it is measured and logged, warned about, and out of it."""
    torch.manual_seed(0)
    summary = _check_included_head(fit(healthy_module(), HEALTHY_STEPS, data=teacher_loader(), include=["net.fc.weight"]), tmp_path, HEALTHY_STEPS)
    # the verdict and the aggregates are those of the three normalized layers
    assert summary["verdict"] == "equilibrium", summary["reason"]
    assert summary["reason"].startswith("3/3 tracked layers")
    assert summary["equilibrium_fraction"] == 1.0


def test_readme_explains_every_code():
    """Every warning code has its row in the README's Warning codes table."""
    text = (ROOT / "README.md").read_text()
    missing = [code for code in MESSAGES if not re.search(rf"^\| {code} \| ", text, re.M)]
    assert not missing, f"no README row for {missing}"
