"""Every optimizer rule against a simulation of the exact update: a weight vector driven by random
gradients orthogonal to it, with the scale-invariant magnitude ``‖g‖ ∝ 1/‖w‖``, stepped by the real
optimizer. The mean measured angular update must match ``Δ*`` within 2 % (and the norm ``‖w*‖``)."""

import math

import pytest
import torch

from lightning_smd.theory import rule_for, time_to_band


def simulate(make_opt, dim=2000, steps=6000, burn=3000, seed=0):
    gen = torch.Generator().manual_seed(seed)
    w = torch.nn.Parameter(torch.randn(dim, dtype=torch.float64, generator=gen))
    opt = make_opt([w])
    rule = rule_for(opt)
    h = rule.hyper({**opt.param_groups[0], "_step": (burn + steps) // 2})
    predicted_norm = rule.weight_norm(h, float(dim - 1), dim)  # E‖g‖²‖w‖² = dim - 1 after the projection
    with torch.no_grad():
        w.mul_(predicted_norm / w.norm())  # start near equilibrium: shorter transient
    angles, norms = [], []
    for t in range(steps):
        with torch.no_grad():
            g = torch.randn(dim, dtype=torch.float64, generator=gen)
            g -= (g @ w) / (w @ w) * w
            g /= w.norm()
        w.grad = g
        before = w.detach().clone()
        opt.step()
        if t >= burn:
            after = w.detach()
            ua, ub = before / before.norm(), after / after.norm()
            angles.append(2 * math.atan2(float((ua - ub).norm()), float((ua + ub).norm())))
            norms.append(float(after.norm()))
    return sum(angles) / len(angles), rule.angular_update(h), sum(norms) / len(norms), predicted_norm


def _lion(p, **kw):
    lion = pytest.importorskip("lion_pytorch")
    return lion.Lion(p, **kw)


CASES = {
    "sgd": (lambda p: torch.optim.SGD(p, lr=0.1, weight_decay=0.01), {}),
    "sgd_momentum": (lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=0.01), {}),
    "sgd_nesterov": (lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01), {}),
    "sgd_dampening": (lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, dampening=0.5, weight_decay=0.01), {}),
    "adamw": (lambda p: torch.optim.AdamW(p, lr=0.01, weight_decay=0.1), {}),
    "adam_decoupled": (lambda p: torch.optim.Adam(p, lr=0.01, weight_decay=0.1, decoupled_weight_decay=True), {}),
    "nadam_decoupled": (
        lambda p: torch.optim.NAdam(p, lr=0.01, weight_decay=0.1, decoupled_weight_decay=True, momentum_decay=1.0),
        {},
    ),
    "radam_decoupled": (
        lambda p: torch.optim.RAdam(p, lr=0.01, betas=(0.9, 0.99), weight_decay=0.1, decoupled_weight_decay=True),
        {},
    ),
    "lion": (lambda p: _lion(p, lr=1e-3, weight_decay=1.0), {}),
    "lion_large_decay": (lambda p: _lion(p, lr=1e-3, weight_decay=20.0), {}),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_rule_matches_simulated_equilibrium(name):
    make, kw = CASES[name]
    measured, predicted, norm, predicted_norm = simulate(make, **kw)
    assert predicted > 0
    assert measured == pytest.approx(predicted, rel=0.02), (measured, predicted)
    assert norm == pytest.approx(predicted_norm, rel=0.02), (norm, predicted_norm)


def test_adam_with_coupled_l2_has_no_prediction_but_says_why():
    p = [torch.nn.Parameter(torch.zeros(3))]
    for opt in (torch.optim.Adam(p, weight_decay=1e-2), torch.optim.RAdam(p, weight_decay=1e-2), torch.optim.NAdam(p, weight_decay=1e-2)):
        rule = rule_for(opt)
        h = rule.hyper(opt.param_groups[0])
        assert math.isnan(rule.angular_update(h)) and "coupled L2" in rule.reason(h)


def test_adamw_closed_forms():
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(3))], lr=1e-3, betas=(0.9, 0.95), weight_decay=0.05)
    rule = rule_for(opt)
    h = rule.hyper(opt.param_groups[0])
    assert rule.angular_update(h) == pytest.approx(math.sqrt(2 * 1e-3 * 0.05 * 0.1 / 1.9), rel=1e-12)
    assert rule.weight_norm(h, 1.0, 1000) == pytest.approx(math.sqrt(1e-3 * 1000 / (2 * 0.05)), rel=1e-12)
    assert rule.relaxation_time(h) == pytest.approx(1 / (2 * 1e-3 * 0.05), rel=1e-12)


def test_lion_leading_order_is_the_published_formula():
    lion = pytest.importorskip("lion_pytorch")
    opt = lion.Lion([torch.nn.Parameter(torch.zeros(3))], lr=1e-4, betas=(0.9, 0.99), weight_decay=0.1)  # eta*lambda = 1e-5
    rule = rule_for(opt)
    h = rule.hyper(opt.param_groups[0])
    S = 0.1**2 + 0.81 * 0.01 / 1.99
    kosson = math.sqrt(math.pi / 2) * math.sqrt(2 * 1e-4 * 0.1) * math.sqrt(S)
    assert rule.angular_update(h) == pytest.approx(kosson, rel=0.01)


def test_lion_is_recognized_by_duck_typing():
    class Lion(torch.optim.Optimizer):
        def __init__(self, params, lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0):
            super().__init__(params, dict(lr=lr, betas=betas, weight_decay=weight_decay))

    assert rule_for(Lion([torch.nn.Parameter(torch.zeros(1))])).name == "Lion"


def test_wrapped_optimizers_are_unwrapped():
    from torch.distributed.optim import ZeroRedundancyOptimizer

    class FakeZero:  # the attribute layout of ZeroRedundancyOptimizer without a process group
        pass

    FakeZero.__name__ = "ZeroRedundancyOptimizer"
    z = FakeZero()
    z.optim = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))])
    assert rule_for(z).name == "AdamW"
    assert ZeroRedundancyOptimizer.__name__ == "ZeroRedundancyOptimizer"


@pytest.mark.parametrize("q0,tol,expected", [(1.0, 0.1, 0.0), (1.1, 0.1, 0.0), (10.0, 0.1, math.log(9 / (1 / 0.81 - 1))), (0.1, 0.1, math.log(0.9 / (1 - 1 / 1.21)))])
def test_time_to_band(q0, tol, expected):
    assert time_to_band(q0, 1.0, tol) == pytest.approx(expected, rel=1e-12)


def test_reequilibration_after_a_step_decay():
    rule = rule_for(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1, momentum=0.9))
    old = {"lr": 0.1, "weight_decay": 1e-3, "momentum": 0.9, "dampening": 0.0, "nesterov": 0.0}
    new = {**old, "lr": 0.01}
    tau_new = (1 - 0.9) / (2 * 0.01 * 1e-3)
    # x = |w|^4 relaxes with tau/2 from 10 x* to x*: band reached when x/x* - 1 = 1/0.81 - 1
    # (second-order terms of the exact norm formula make the ratio 10 * (1 - 1e-5))
    assert rule.reequilibration_time(old, new, 0.1) == pytest.approx(tau_new / 2 * math.log(9 / (1 / 0.81 - 1)), rel=1e-4)
    assert rule.reequilibration_time(old, old, 0.1) == 0.0
