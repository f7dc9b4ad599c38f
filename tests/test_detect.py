import torch
from helpers import Module, NoNormNet, SmallConvNet, SmallResNet
from torch import nn
from torch.nn import functional as F
from zoo import PreActBlock, Shared

from lightning_smd import find_normalized_weights
from lightning_smd.engine.detect import format_detection_table


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
    """One conv used twice, each time before its own BatchNorm: one unit, per filter; with a batch, the numerical check
    agrees (|cos(g, w)| per filter 5e-8–1.5e-7 over seeds 0–2: float32 rounding, against the 1e-2 of SMD010)."""
    units, _ = tracked(Shared())
    assert list(units) == ["conv.weight"] and units["conv.weight"].granularity == "filter"
    torch.manual_seed(0)
    units, det = tracked(Shared(), example_input=torch.randn(4, 3, 8, 8))
    assert list(units) == ["conv.weight"] and units["conv.weight"].granularity == "filter"
    assert units["conv.weight"].verification < 1e-5
    assert set(det.rejected) == {"fc.weight"}


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


def _unit(granularity, refinable, n_filters=8, group_size=None):
    from lightning_smd.analysis.units import NormalizedWeight

    return NormalizedWeight(
        name="w", params=("w",), shape=(n_filters, 10), numel=10 * n_filters, layer="conv2d", norm="?", granularity=granularity,
        found_by="fx", group_size=group_size, refinable=refinable,
    )


def _grad_with_block_cos(w, size, cos):
    """A gradient whose every block of ``size`` rows has ``|cos(g, w)| ≈ cos`` (one sign in each half) and that is
    orthogonal to w over the whole tensor."""
    gen = torch.Generator().manual_seed(3)
    rows = []
    for k in range(w.shape[0] // size):
        wb = w[k * size:(k + 1) * size].flatten().double()
        r = torch.randn(wb.shape, generator=gen, dtype=torch.float64)
        r -= (r @ wb) / (wb @ wb) * wb
        r /= r.norm()
        sign = 1.0 if k < w.shape[0] // size // 2 else -1.0  # the two halves cancel: invariant only as a whole
        rows.append((sign * cos * wb / wb.norm() + (1 - cos * cos) ** 0.5 * r).reshape(size, -1))
    g, wd = torch.cat(rows), w.double()
    g -= (g * wd).sum() / (wd * wd).sum() * wd  # invariant as a whole, as a LayerNorm over all channels makes it
    return g.to(w.dtype)


def test_numerical_check_never_overrides_a_granularity_the_structure_fixes():
    """A LayerNorm over the channels fixes "tensor" (ConvNeXt's depthwise conv): blocks of filters with |cos| = 7e-5,
    under the old fixed 1e-3 limit, must not refine it; a BatchNorm after a conv fixes "filter": a gradient far from
    orthogonal per filter (a near-zero, noisy gradient) must not coarsen it."""
    from lightning_smd.engine.detect import verify_orthogonality

    w = torch.randn(8, 10, generator=torch.Generator().manual_seed(0))
    g = _grad_with_block_cos(w, 2, 7e-5)
    (u,), _ = verify_orthogonality([_unit("tensor", refinable=False)], {"w": w}, {"w": g})
    assert (u.granularity, u.group_size) == ("tensor", None)
    g_noisy = _grad_with_block_cos(w, 1, 0.5)
    (u,), _ = verify_orthogonality([_unit("filter", refinable=False)], {"w": w}, {"w": g_noisy})
    assert u.granularity == "filter" and u.verification > 0.1


def test_refinement_needs_blocks_at_the_noise_floor():
    """Where the structure leaves the granularity open (heads reshaped before a norm), a finer block is taken only if
    its |cos| is within 32× the unit's own floor: 7e-5 against a float32 floor of ~1e-7 is a real violation; 1e-7
    is invariance."""
    from lightning_smd.engine.detect import verify_orthogonality

    w = torch.randn(8, 10, generator=torch.Generator().manual_seed(0))
    (u,), _ = verify_orthogonality([_unit("tensor", refinable=True)], {"w": w}, {"w": _grad_with_block_cos(w, 2, 7e-5)})
    assert (u.granularity, u.group_size) == ("tensor", None)
    (u,), _ = verify_orthogonality([_unit("tensor", refinable=True)], {"w": w}, {"w": _grad_with_block_cos(w, 2, 1e-7)})
    assert (u.granularity, u.group_size) == ("group", 2)


def test_batchnorm_after_linear_is_refined_to_rows_with_its_real_epsilon():
    """BatchNorm1d after a Linear: the structure leaves rows or the whole weight open, and the check on the first
    training gradient refines it. With BatchNorm's real epsilon each row deviates from invariance by 1e-4-6e-4 with a
    random sign, the whole weight by 1e-5 (the signs cancel): measured against the whole weight's figure unscaled,
    rows failed and pairs or blocks of 4-8 rows passed on 9 of these 20 seeds. Every seed must give rows. The largest
    row |cos| over the seeds is 9.0e-4 against the 1e-3 cap: the epsilon's deterministic effect (eps/σ² of a row
    with a small pre-activation variance), not rounding, so the 10 % margin holds across CPUs; the check fails at 5 %."""
    from torch.nn import functional as F

    from lightning_smd.demo import HeadNet, TeacherStream
    from lightning_smd.engine.detect import verify_orthogonality

    worst = 0.0
    for seed in range(20):
        torch.manual_seed(seed)
        net = HeadNet()
        det = find_normalized_weights(net)
        x, y = next(iter(TeacherStream(net.input_shape, seed=seed, flip=0.2)))
        F.cross_entropy(net(x), y).backward()
        named = dict(net.named_parameters())
        units, _ = verify_orthogonality(det.units, {n: named[n] for n in named}, {n: named[n].grad for n in named})
        fc1 = next(u for u in units if u.name == "fc1.weight")
        assert (fc1.granularity, fc1.group_size) == ("filter", None), (seed, fc1)
        worst = max(worst, fc1.verification / 1e-3)
    assert worst < 0.95, worst


def test_hand_written_rms_norm_is_named_in_the_table():
    from zoo import HandRMSNorm

    det = find_normalized_weights(HandRMSNorm())
    (unit,) = det.units
    assert unit.name == "lin.weight" and "rsqrt" in unit.norm, unit.norm


def test_a_bias_that_nothing_cancels_is_named_with_where_weight_and_bias_break():
    """Linear + bias → softmax: the weight alone fails at its bias, the pair at the softmax; the reason says both
    instead of blaming the first reshape."""

    class BiasSoftmax(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(6, 8)

        def forward(self, x):
            return torch.softmax(self.lin(x).view(x.shape[0], 2, 4), -1)

    det = find_normalized_weights(BiasSoftmax())
    why = det.rejected["lin.weight"]
    assert "bias" in why and "softmax" in why, why


def test_an_op_the_recorder_fails_on_breaks_invariance_and_says_so(monkeypatch):
    """The recording front end never drops an op: a dropped ReLU between a conv and the output would make the
    conv's scale vanish from the graph, a false "invariant"."""
    from lightning_smd.engine.detect import DataFlowRecorder

    class Untraceable(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, bias=False)

        def forward(self, x):
            h = F.relu(self.conv(x))
            if h.sum() > -1e9:  # data-dependent control flow: fx cannot trace it
                h = h * 2
            return h.mean((2, 3))

    record = DataFlowRecorder._record

    def failing(self, func, args, kwargs, out):
        if getattr(func, "__name__", "") == "relu":
            raise RuntimeError("simulated recording failure")
        return record(self, func, args, kwargs, out)

    monkeypatch.setattr(DataFlowRecorder, "_record", failing)
    det = find_normalized_weights(Untraceable(), example_input=torch.randn(2, 3, 8, 8))
    assert det.method == "run" and det.units == []
    assert "not recorded" in det.rejected["conv.weight"], det.rejected
