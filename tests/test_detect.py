import torch
from helpers import Module, NoNormNet, SmallConvNet, SmallResNet
from torch import nn
from torch.nn import functional as F
from zoo import PreActBlock, Shared

from lightning_smd import find_normalized_weights
from lightning_smd.detect import format_detection_table


def tracked(model, **kw):
    det = find_normalized_weights(model, **kw)
    return {u.name: u for u in det.units}, det


def test_small_convnet():
    units, det = tracked(SmallConvNet())
    assert set(units) == {"conv1.weight", "conv2.weight", "conv3.weight"}
    # conv2's bias is cancelled by BatchNorm: the weight alone is the unit, the bias is not tracked
    assert units["conv2.weight"].params == ("conv2.weight",)
    assert all(u.granularity == "filter" and u.found_by == "fx" for u in units.values())
    assert units["conv3.weight"].norm == "BatchNorm2d"
    assert "fc.weight" in det.rejected


def test_small_resnet_tracks_every_conv_and_nothing_else():
    model = SmallResNet()
    units, det = tracked(model)
    convs = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    assert set(units) == convs
    assert len(convs) == 9  # stem + 2 per block + 2 projection shortcuts
    params = {p for u in units.values() for p in u.params}
    assert not any(".bn" in p or "shortcut.1" in p or p.endswith("bias") for p in params)
    assert "fc.weight" in det.rejected and "fc.bias" not in params


def test_lightning_module_names_match_named_parameters():
    module = Module(SmallResNet())
    units, _ = tracked(module)
    named = dict(module.named_parameters())
    assert units and all(p in named for u in units.values() for p in u.params)
    assert "net.layer2.shortcut.0.weight" in units


def test_residual_addition_breaks_invariance():
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), PreActBlock(), nn.Flatten(), nn.LazyLinear(4))
    net(torch.randn(2, 3, 4, 4))  # materialize the lazy classifier
    units, det = tracked(net)
    assert set(units) == {"0.weight", "2.conv1.weight"}
    assert "addition" in det.rejected["2.conv2.weight"]


class Funky(nn.Module):
    """Functional calls, Linear -> BatchNorm1d, conv(+bias) -> GroupNorm and Linear(+bias) -> LayerNorm."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(8, 3, 3, 3))
        self.gn_conv = nn.Conv2d(8, 8, 3, padding=1)
        self.gn = nn.GroupNorm(2, 8)
        self.lin = nn.Linear(8, 16, bias=False)
        self.bn1d = nn.BatchNorm1d(16)
        self.ln_lin = nn.Linear(16, 16)
        self.ln = nn.LayerNorm(16)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        x = F.relu(F.batch_norm(F.conv2d(x, self.w, padding=1), None, None, training=True))
        x = F.relu(self.gn(self.gn_conv(x)))
        x = x.mean(dim=(2, 3))
        x = F.relu(self.bn1d(self.lin(x)))
        x = self.ln(self.ln_lin(x))
        return self.head(x)


def test_functional_layers_and_weight_bias_units():
    units, det = tracked(Funky())
    assert set(units) == {"w", "gn_conv.weight+bias", "lin.weight", "ln_lin.weight+bias"}
    assert units["gn_conv.weight+bias"].params == ("gn_conv.weight", "gn_conv.bias")
    assert units["gn_conv.weight+bias"].granularity == "group"
    assert units["ln_lin.weight+bias"].granularity == "tensor"
    assert units["lin.weight"].norm == "BatchNorm1d"
    assert units["w"].layer == "conv2d" and units["w"].norm == "batch_norm"
    assert units["gn_conv.weight+bias"].numel == 8 * 8 * 9 + 8
    assert set(det.rejected) == {"head.weight"}


def test_no_normalization_tracks_nothing():
    units, det = tracked(NoNormNet())
    assert units == {}
    assert set(det.rejected) == {"conv.weight", "fc.weight"}


def test_frozen_weights_are_not_tracked():
    net = SmallConvNet()
    net.conv1.weight.requires_grad_(False)
    units, det = tracked(net)
    assert "conv1.weight" not in units and "frozen" in det.rejected["conv1.weight"]


def test_shared_weight_is_tracked_once():
    units, _ = tracked(Shared())
    assert list(units) == ["conv.weight"]


def test_include_and_exclude_overrides():
    units, det = tracked(SmallConvNet(), include=["fc.weight"], exclude=["conv2.*"])
    assert set(units) == {"conv1.weight", "conv3.weight", "fc.weight"}
    assert units["fc.weight"].found_by == "include"
    assert det.rejected["conv2.weight"] == "excluded by the user"
    _, det = tracked(SmallConvNet(), include=["nothing.*"])
    assert "include:nothing.*" in det.rejected


def test_untraceable_model_gets_a_clear_message_not_a_crash():
    class DataDependent(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, bias=False)
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow: fx cannot trace this
                x = -x
            return self.bn(self.conv(x)).mean()

    det = find_normalized_weights(DataDependent())
    assert det.units == [] and det.error is not None
    assert "include=" in det.error
    units, det = tracked(DataDependent(), include=["conv.weight"])
    assert list(units) == ["conv.weight"]


def test_detection_table_lists_units():
    det = find_normalized_weights(SmallConvNet())
    table = format_detection_table(det)
    assert "conv1.weight" in table and "BatchNorm2d" in table and "filter" in table
