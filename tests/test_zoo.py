"""Detection on a zoo of architectures: 100 % precision and recall, granularities, numerical agreement."""


import pytest
import torch
from helpers import SmallConvNet
from torch import nn
from zoo import ZOO, exclude_eps_effects

from lightning_smd import find_normalized_weights
from lightning_smd.engine.detect import ORTHOGONALITY_TOLERANCE

_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d, nn.Linear)


def _candidate_weights(model):
    """Every conv/linear weight (the weight-norm direction for parametrized ones) and raw conv/linear params."""
    names = set()
    for n, m in model.named_modules():
        if isinstance(m, _LAYERS):
            if hasattr(m, "parametrizations"):
                names.add(f"{n}.parametrizations.weight.original1")
            else:
                names.add(f"{n}.weight")
    names |= {n for n, p in model.named_parameters() if "." not in n}  # raw functional parameters
    return names


@pytest.mark.parametrize("name", sorted(ZOO))
def test_zoo_with_a_real_batch(name):
    factory, make_input, expected = ZOO[name]
    torch.manual_seed(0)
    model = exclude_eps_effects(factory())
    x = make_input()
    det = find_normalized_weights(model, example_input=x)
    assert det.error is None, det.error
    got = {u.name: (u.granularity, u.group_size) for u in det.units}
    assert got == expected  # 100 % precision and recall, and the granularity
    # numerical agreement: tracked units are orthogonal at their granularity, the rest clearly not
    for u in det.units:
        assert u.verification is not None and u.verification < ORTHOGONALITY_TOLERANCE, (u.name, u.verification)
    tracked_params = {p for u in det.units for p in u.params}
    assert not tracked_params & set(det.rejected)  # tracked and not_tracked partition the candidates
    for w in _candidate_weights(model) - tracked_params:
        assert w in det.rejected, w
        if "frozen" in det.rejected[w]:
            continue
        assert det.rejected_verification[w] > ORTHOGONALITY_TOLERANCE, (w, det.rejected_verification[w])


@pytest.mark.parametrize("name", sorted(ZOO))
def test_zoo_structural_answer_without_input(name):
    factory, _, expected = ZOO[name]
    det = find_normalized_weights(factory())
    if name in ("untraceable", "lazy_modules"):
        assert det.method == "deferred" and det.units == [] and det.error
        return
    assert det.method == "fx"
    assert {u.name for u in det.units} == set(expected)
    # without a gradient, the structural granularity is never finer than the verified one
    order = {"filter": 0, "group": 1, "tensor": 2}
    for u in det.units:
        assert order[u.granularity] >= order[expected[u.name][0]], (u.name, u.granularity)


def test_detection_restores_the_model():
    torch.manual_seed(0)
    model = SmallConvNet().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    find_normalized_weights(model, example_input=torch.randn(4, 3, 8, 8))
    assert not model.training
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(p.grad is None for p in model.parameters())


def test_torch_compile_wrapped_model():
    compiled = torch.compile(SmallConvNet())
    det = find_normalized_weights(compiled)
    assert {u.name for u in det.units} == {"_orig_mod.conv1.weight", "_orig_mod.conv2.weight", "_orig_mod.conv3.weight"}
    named = dict(compiled.named_parameters())
    assert all(p in named for u in det.units for p in u.params)


def test_sync_batch_norm_is_a_normalization():
    net = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.SyncBatchNorm(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, 2))
    det = find_normalized_weights(net)
    assert [(u.name, u.norm, u.granularity) for u in det.units] == [("0.weight", "SyncBatchNorm", "filter")]


def test_conv_bias_before_batch_norm_gets_no_gradient_and_is_not_tracked():
    from zoo import ConvReluBN

    model = ConvReluBN()
    det = find_normalized_weights(model)
    assert "conv2.bias" not in {p for u in det.units for p in u.params}
    model.train()
    model(torch.randn(4, 3, 8, 8)).sum().backward()
    assert model.conv2.bias.grad.abs().max() < 1e-6  # BatchNorm's mean subtraction cancels it


def test_weight_norm_unit_is_the_direction_parameter():
    model = ZOO["weight_norm"][0]()
    (unit,) = find_normalized_weights(model).units
    assert unit.layer == "weight_norm" and unit.params == ("conv.parametrizations.weight.original1",)
    assert "conv.parametrizations.weight.original0" not in {p for p in unit.params}


def test_detection_with_an_input_leaves_the_random_number_generator_alone():
    """The analysed forward pass runs dropout in training mode; the training that follows must draw the same
    random numbers as without detection (the callback and the monitor are observers)."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Dropout(0.5), nn.Flatten(), nn.LazyLinear(2))
    x = torch.randn(2, 3, 6, 6)
    model(x)  # materialize the lazy layer
    torch.manual_seed(7)
    find_normalized_weights(model, example_input=x)
    after = torch.rand(3)
    torch.manual_seed(7)
    assert torch.equal(after, torch.rand(3))
