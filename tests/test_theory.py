import math

import pytest
import torch

from lightning_smd.analysis import theory
from lightning_smd.analysis.theory import (
    Rule,
    SGDRule,
    UnknownRule,
    angle_from_norms,
    register,
    rule_for,
    sgd_angular_update,
    sgd_relaxation_time,
    sgd_weight_norm,
)


def test_sgdm_angular_update_matches_worked_example():
    # DESIGN §2: eta = 0.1, lambda = 1e-4, alpha = 0.9 -> 3.2444e-3 rad/step
    assert sgd_angular_update(0.1, 1e-4, 0.9) == pytest.approx(3.2444e-3, rel=2e-5)


@pytest.mark.parametrize("lr,wd,mom", [(0.1, 5e-4, 0.0), (0.05, 1e-3, 0.9), (1.0, 1e-5, 0.5), (3e-3, 0.1, 0.99)])
def test_sgd_closed_forms(lr, wd, mom):
    # heavy ball exactly: cos Δ* = 1 − ηλ/(1+α) (docs/theory.md §1); [Wan] Thm 3 is its first order
    assert sgd_angular_update(lr, wd, mom) == pytest.approx(math.acos(1 - lr * wd / (1 + mom)), rel=1e-9)
    assert sgd_angular_update(lr, wd, mom) == pytest.approx(math.sqrt(2 * lr * wd / (1 + mom)), rel=lr * wd)
    assert sgd_relaxation_time(lr, wd, mom) == pytest.approx((1 - mom) / (2 * lr * wd), rel=1e-12)
    L = 3.7
    expected = (lr * L / (wd * (1 - mom) * (2 - lr * wd / (1 + mom)))) ** 0.25
    assert sgd_weight_norm(lr, wd, mom, L) == pytest.approx(expected, rel=1e-9)


def test_plain_sgd_weight_norm_is_theorem_1():
    lr, wd, L = 0.1, 5e-4, 2.0
    assert sgd_weight_norm(lr, wd, 0.0, L) == pytest.approx((lr * L / (wd * (2 - lr * wd))) ** 0.25, rel=1e-9)


def test_plain_sgd_prediction_is_the_exact_fixed_point():
    lr, wd = 0.1, 1e-4
    assert sgd_angular_update(lr, wd) == pytest.approx(math.acos(1 - lr * wd), rel=1e-9)


def test_no_weight_decay_means_no_equilibrium():
    assert sgd_angular_update(0.1, 0.0, 0.9) == 0.0
    assert sgd_relaxation_time(0.1, 0.0, 0.9) == math.inf
    assert sgd_weight_norm(0.1, 0.0, 0.9, 1.0) == math.inf
    assert "weight_decay is 0" in SGDRule().reason({"lr": 0.1, "weight_decay": 0.0, "momentum": 0.9})
    assert SGDRule().reason({"lr": 0.1, "weight_decay": 1e-4, "momentum": 0.9}) is None


def test_sgd_rule_reads_param_group_and_dampening():
    rule = SGDRule()
    group = {"lr": 0.2, "weight_decay": 1e-3, "momentum": 0.9, "dampening": 0.5, "nesterov": False, "params": []}
    h = rule.hyper(group)
    assert h == {"lr": 0.2, "weight_decay": 1e-3, "momentum": 0.9, "dampening": 0.5, "nesterov": 0.0}
    # dampening tau scales the step like a learning rate eta*(1 - tau)
    assert rule.angular_update(h) == pytest.approx(sgd_angular_update(0.1, 1e-3, 0.9), rel=1e-12)
    assert rule.relaxation_time(h) == pytest.approx(sgd_relaxation_time(0.1, 1e-3, 0.9), rel=1e-12)


# Norms as after an optimizer step (radial change ~ lr*wd) for every angle; a 40 % radial jump only with
# angles >= 1e-3 (documented limit: relative error ~ eps * (radial/tangential change)^2).
_CASES = [(t, 1.0, 1.0) for t in (1e-9, 1e-7, 1e-6, 1e-5, 1e-3, 0.3, 2.5)]
_CASES += [(t, 3.0, 2.9997) for t in (1e-7, 1e-6, 1e-5, 1e-3, 0.3)]
_CASES += [(t, 0.5, 0.7) for t in (1e-3, 0.3, 2.5)]


@pytest.mark.parametrize("theta,r1,r2", _CASES)
def test_angle_from_norms_keeps_precision_for_tiny_angles(theta, r1, r2):
    # |d|^2 written without cancellation: (r1 - r2)^2 + 4 r1 r2 sin^2(theta/2)
    d_sq = (r1 - r2) ** 2 + 4 * r1 * r2 * math.sin(theta / 2) ** 2
    assert angle_from_norms(r1 * r1, r2 * r2, d_sq) == pytest.approx(theta, rel=1e-6)


def test_angle_from_norms_vs_float64_vectors():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(1000, dtype=torch.float64, generator=g)
    b = a + 1e-6 * torch.randn(1000, dtype=torch.float64, generator=g) - 1e-4 * a
    ref = 2 * math.atan2(float((a / a.norm() - b / b.norm()).norm()), float((a / a.norm() + b / b.norm()).norm()))
    got = angle_from_norms(float(a.norm() ** 2), float(b.norm() ** 2), float((b - a).norm() ** 2))
    assert got == pytest.approx(ref, rel=1e-6)
    assert ref < 1e-5


def test_registry_finds_sgd_subclasses_and_wrappers():
    p = [torch.nn.Parameter(torch.zeros(2))]
    opt = torch.optim.SGD(p, lr=0.1)
    assert isinstance(rule_for(opt), SGDRule)

    class MySGD(torch.optim.SGD):
        pass

    assert isinstance(rule_for(MySGD(p, lr=0.1)), SGDRule)

    class Wrapper:  # LightningOptimizer-like
        _optimizer = opt

    assert isinstance(rule_for(Wrapper()), SGDRule)


def test_unknown_optimizer_gets_no_prediction_and_says_how_to_register():
    p = [torch.nn.Parameter(torch.zeros(2))]
    rule = rule_for(torch.optim.Rprop(p))
    assert isinstance(rule, UnknownRule)
    h = rule.hyper({"lr": 0.1})
    assert math.isnan(rule.angular_update(h))
    assert "lightning_smd.analysis.theory.register" in rule.reason(h)


def test_register_custom_rule():
    class MyOpt(torch.optim.SGD):
        pass

    class Fixed(Rule):
        def angular_update(self, h):
            return 0.123

    try:
        register(MyOpt, Fixed(name="fixed"))
        rule = rule_for(MyOpt([torch.nn.Parameter(torch.zeros(1))], lr=0.1))
        assert rule.name == "fixed" and rule.angular_update({}) == 0.123
        with pytest.raises(TypeError):
            register(MyOpt, object())  # type: ignore[arg-type]
    finally:
        theory._REGISTRY.pop(theory._class_key(MyOpt), None)


def test_theory_module_imports_only_the_standard_library():
    import ast
    import sys

    tree = ast.parse(open(theory.__file__).read())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module.split(".")[0])
    assert imported <= set(sys.stdlib_module_names) | {"__future__"}, imported


@pytest.mark.parametrize("beta1", [0.9, 0.95])
def test_adams_start_up_transient_is_that_of_its_bias_corrected_momentum(beta1):
    """torch's AdamW fed independent unit-variance gradients (β2 = 0.99999 and lr tiny: the second moment stays at
    the gradients' scale and the weights do not move): the mean square of the update of step t over its steady value
    (step 400) is ``update_transient(β1, t)`` — 19× at the first step for β1 = 0.9 — to within 3 % (100,000
    coordinates: the Monte Carlo error is about 0.5 %; over seeds 0–2 the largest deviation at these steps is 1.2 %),
    and the rules say which optimizers have it."""
    torch.manual_seed(0)
    n, steps = 100_000, 400
    p = torch.nn.Parameter(torch.zeros(n, dtype=torch.float64))
    opt = torch.optim.AdamW([p], lr=1e-12, betas=(beta1, 0.99999), eps=0.0, weight_decay=0.0)
    ms = []
    for _ in range(steps):
        before = p.detach().clone()
        p.grad = torch.randn(n, dtype=torch.float64)
        opt.step()
        ms.append(float(((p.detach() - before) / 1e-12).pow(2).mean()))
    steady = sum(ms[-50:]) / 50
    for t in (1, 2, 5, 10, 30, 100):
        assert ms[t - 1] / steady == pytest.approx(theory.update_transient(beta1, t), rel=0.03), t
    assert theory.update_transient(0.9, 1) == pytest.approx(19.0)
    assert theory.update_transient(0.0, 1) == 1.0
    # the mean over a stretch of steps (the trajectory's stretches), past the horizon where it is 1 by construction
    for first, last in ((1, 1), (1, 50), (20, 700), (5000, 6000)):
        plain = sum(theory.update_transient(beta1, t) for t in range(first, last + 1)) / (last - first + 1)
        assert theory.mean_update_transient(beta1, first, last) == pytest.approx(plain, rel=1e-12)
    for make, start in (
        (lambda q: torch.optim.AdamW(q, betas=(beta1, 0.999)), beta1),
        (lambda q: torch.optim.Adam(q, betas=(beta1, 0.999), weight_decay=0.1), 0.0),  # coupled L2: another theory
        (lambda q: torch.optim.SGD(q, lr=0.1, momentum=0.9), 0.0),  # its buffer has no bias correction
    ):
        o = make([torch.nn.Parameter(torch.zeros(1))])
        rule = theory.rule_for(o)
        assert rule.first_moment_start(theory.group_hyper(rule, o, o.param_groups[0])) == start


def test_lions_memory_sum_in_closed_tail_equals_the_plain_sum():
    """``_lion_memory`` sums asin's series of the geometric tail instead of thousands of terms (a plan of thousands of
    settings at fit start took seconds): against the plain sum carried to 1e-15 per term, over ηλ from 1e-6 to 0.5 and
    β1, β2 from 0 to 0.999, within 1e-8 relative (the old loop stopped at 1e-12 per term: 1e-9 short at small ηλ)."""

    def plain(e, b1, b2):
        S = (1.0 - b1) ** 2 + b1**2 * (1.0 - b2) / (1.0 + b2)
        d, acc, j = 1.0 - e, 0.0, 1
        while j < 5_000_000:
            cross = (1.0 - b1) * b1 * (1.0 - b2) * b2 ** (j - 1) + b1**2 * (1.0 - b2) * b2**j / (1.0 + b2)
            term = d**j * (2.0 / math.pi) * math.asin(min(cross / S, 1.0))
            acc += term
            if term < 1e-15 and j > 1:
                break
            j += 1
        return acc

    for e in (1e-6, 1e-4, 1e-2, 0.5):
        for b1 in (0.0, 0.5, 0.9, 0.99):
            for b2 in (0.0, 0.5, 0.9, 0.99, 0.999):
                expected = plain(e, b1, b2)
                got, d = theory._lion_memory(e, 1.0, b1, b2)
                assert d == 1.0 - e
                assert got == pytest.approx(expected, rel=1e-8, abs=1e-300), (e, b1, b2)
