"""A zoo of small models modelled on real architectures, each with the weights that must be tracked.

``ZOO`` maps a name to ``(factory, example_input, expected)`` where ``expected`` maps each tracked unit's
name to ``(granularity, group_size)``. Every conv/linear weight not listed must be rejected.
"""

from __future__ import annotations

import torch
from helpers import SmallResNet
from torch import nn
from torch.nn import functional as F


def img(c: int = 3, s: int = 8, b: int = 4) -> torch.Tensor:
    return torch.randn(b, c, s, s, generator=torch.Generator().manual_seed(0))


def seq(d: int = 16, t: int = 6, b: int = 4) -> torch.Tensor:
    return torch.randn(b, t, d, generator=torch.Generator().manual_seed(0))


class ConvReluBN(nn.Module):
    """conv -> ReLU -> BN (invariant), conv(+bias) -> BN (weight alone invariant, bias cancelled)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, bias=True)
        self.bn2 = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        x = self.bn1(F.relu(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        return self.fc(x.mean((2, 3)))


class BiasPairs(nn.Module):
    """conv(+bias) -> GroupNorm and Linear(+bias) -> LayerNorm: only weight and bias together are invariant."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=True)
        self.gn = nn.GroupNorm(2, 8)
        self.lin = nn.Linear(8, 12, bias=True)
        self.ln = nn.LayerNorm(12)
        self.head = nn.Linear(12, 3)

    def forward(self, x):
        x = F.relu(self.gn(self.conv(x))).mean((2, 3))
        return self.head(F.relu(self.ln(self.lin(x))))


class PreActBlock(nn.Module):
    def __init__(self, c=8):
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(c), nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2, self.conv2 = nn.BatchNorm2d(c), nn.Conv2d(c, c, 3, padding=1, bias=False)

    def forward(self, x):
        out = self.conv1(F.relu(self.bn1(x)))
        out = self.conv2(F.relu(self.bn2(out)))
        return x + out


class PreActResNet(nn.Module):
    """Pre-activation ResNet: the last conv of each residual branch is not invariant."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.block1, self.block2 = PreActBlock(), PreActBlock()
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        x = self.block2(self.block1(self.stem(x)))
        return self.fc(F.relu(self.bn(x)).mean((2, 3)))


class GroupNormNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.gn1 = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.GroupNorm(4, 8)
        self.conv2, self.gn2 = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.GroupNorm(8, 8)  # one filter per group
        self.conv3, self.gn3 = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.GroupNorm(1, 8)  # LayerNorm-like
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        x = F.relu(self.gn1(self.conv1(x)))
        x = F.relu(self.gn2(self.conv2(x)))
        x = F.relu(self.gn3(self.conv3(x)))
        return self.fc(x.mean((2, 3)))


class WSConv2d(nn.Conv2d):
    """Weight-standardized convolution (as in BiT): each filter is normalized before use."""

    eps = 1e-5

    def forward(self, x):
        w = self.weight
        mean = w.mean(dim=(1, 2, 3), keepdim=True)
        std = w.std(dim=(1, 2, 3), keepdim=True)
        return F.conv2d(x, (w - mean) / (std + self.eps), None, self.stride, self.padding)


class WeightStandardized(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = WSConv2d(3, 8, 3, padding=1, bias=False)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        return self.fc(F.relu(self.conv(x)).mean((2, 3)))


class WeightNormNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.utils.parametrizations.weight_norm(nn.Conv2d(3, 8, 3, padding=1, bias=False))
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        return self.fc(F.relu(self.conv(x)).mean((2, 3)))


class LinearBN1d(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(16, 32, bias=False)
        self.bn = nn.BatchNorm1d(32)
        self.head = nn.Linear(32, 4)

    def forward(self, x):
        return self.head(F.relu(self.bn(self.lin(x.flatten(1)[:, :16]))))


class Shared(nn.Module):
    """One conv applied twice, each time followed by its own BatchNorm."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1, bias=False)
        self.bn1, self.bn2 = nn.BatchNorm2d(3), nn.BatchNorm2d(3)
        self.fc = nn.Linear(3, 2)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv(x)))
        x = F.relu(self.bn2(self.conv(x)))
        return self.fc(x.mean((2, 3)))


class Frozen(nn.Module):
    def __init__(self):
        super().__init__()
        self.frozen = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.frozen.weight.requires_grad_(False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 2)

    def forward(self, x):
        x = F.relu(self.bn2(self.conv(F.relu(self.bn1(self.frozen(x))))))
        return self.fc(x.mean((2, 3)))


class Untraceable(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace it; the recorded forward pass can."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        for _ in range(int(x.shape[-1] > 4) + 1):  # shape-dependent loop
            if x.mean() > -100:  # data-dependent branch
                x = x + self.bn2(self.conv2(x))
        return self.fc(x.mean((2, 3)))


class FunctionalOnly(nn.Module):
    """Raw parameters and functional calls only: F.conv2d -> F.batch_norm / F.group_norm, F.linear -> F.layer_norm."""

    def __init__(self):
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(8, 3, 3, 3) * 0.3)
        self.w2 = nn.Parameter(torch.randn(12, 8) * 0.3)
        self.w3 = nn.Parameter(torch.randn(8, 8, 1, 1) * 0.3)
        self.head = nn.Parameter(torch.randn(3, 12) * 0.3)

    def forward(self, x):
        x = F.relu(F.batch_norm(F.conv2d(x, self.w1, padding=1), None, None, training=True, eps=1e-10))
        x = F.relu(F.group_norm(F.conv2d(x, self.w3), 2, eps=1e-10))
        x = F.layer_norm(F.linear(x.mean((2, 3)), self.w2), (12,), eps=1e-10)
        return F.linear(F.relu(x), self.head)


class Attention(nn.Module):
    def __init__(self, d=16, heads=4, qk_norm=False):
        super().__init__()
        self.h, self.dh = heads, d // heads
        self.q, self.k, self.v, self.o = (nn.Linear(d, d, bias=False) for _ in range(4))
        self.qn = nn.RMSNorm(self.dh) if qk_norm else None
        self.kn = nn.RMSNorm(self.dh) if qk_norm else None

    def forward(self, x):
        b, t, d = x.shape
        q = self.q(x).view(b, t, self.h, self.dh)
        k = self.k(x).view(b, t, self.h, self.dh)
        v = self.v(x).view(b, t, self.h, self.dh)
        if self.qn is not None:
            q, k = self.qn(q), self.kn(k)
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return self.o(y.transpose(1, 2).reshape(b, t, d))


class MLP(nn.Module):
    def __init__(self, d=16):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class PreLNBlock(nn.Module):
    """GPT-style: x + attn(LN(x)); x + mlp(LN(x)). No projection is invariant (LN comes before them)."""

    def __init__(self, d=16, qk_norm=False):
        super().__init__()
        self.ln1, self.attn, self.ln2, self.mlp = nn.LayerNorm(d), Attention(d, qk_norm=qk_norm), nn.LayerNorm(d), MLP(d)
        self.head = nn.Linear(d, 3)

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        x = x + self.mlp(self.ln2(x))
        return self.head(x)


class PostLNBlock(nn.Module):
    """BERT-style: LN(x + attn(x)); LN(x + mlp(x)). The output projection feeds a residual sum: not invariant."""

    def __init__(self, d=16):
        super().__init__()
        self.attn, self.ln1, self.mlp, self.ln2 = Attention(d), nn.LayerNorm(d), MLP(d), nn.LayerNorm(d)
        self.head = nn.Linear(d, 3)

    def forward(self, x):
        x = self.ln1(x + self.attn(x))
        x = self.ln2(x + self.mlp(x))
        return self.head(x)


class ConvTransposeBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.ConvTranspose2d(3, 6, 2, stride=2, bias=False)
        self.bn = nn.BatchNorm2d(6)
        self.fc = nn.Linear(6, 2)

    def forward(self, x):
        return self.fc(F.relu(self.bn(self.up(x))).mean((2, 3)))


class Conv1d3dInstance(nn.Module):
    """Conv1d -> BatchNorm1d, Conv3d -> BatchNorm3d, Conv2d -> InstanceNorm2d."""

    def __init__(self):
        super().__init__()
        self.c1, self.n1 = nn.Conv1d(3, 4, 3, padding=1, bias=False), nn.BatchNorm1d(4)
        self.c3, self.n3 = nn.Conv3d(1, 4, 3, padding=1, bias=False), nn.BatchNorm3d(4)
        self.c2, self.n2 = nn.Conv2d(3, 4, 3, padding=1, bias=True), nn.InstanceNorm2d(4, affine=True)
        self.fc = nn.Linear(12, 2)

    def forward(self, x):
        a = F.relu(self.n1(self.c1(x.flatten(2)))).mean(2)
        b = F.relu(self.n3(self.c3(x[:, :1].unsqueeze(1)))).mean((2, 3, 4))
        c = F.relu(self.n2(self.c2(x))).mean((2, 3))
        return self.fc(torch.cat([a, b, c], 1))


class LazyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.LazyConv2d(8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.LazyLinear(2)

    def forward(self, x):
        return self.fc(F.relu(self.bn(self.conv(x))).mean((2, 3)))


class MiniDenseNet(nn.Module):
    """DenseNet: each layer's output is concatenated to its input along the channels, and every reader of a
    concatenation is a per-channel BatchNorm, which absorbs each slice's own scale: every conv is invariant per
    filter although the slices have different scales (torchvision's DenseNet-121 has 120 such convs)."""

    def __init__(self, c0=4, growth=3, layers=3):
        super().__init__()
        self.stem = nn.Conv2d(3, c0, 3, padding=1, bias=False)
        self.bns, self.convs = nn.ModuleList(), nn.ModuleList()
        c = c0
        for _ in range(layers):
            self.bns.append(nn.BatchNorm2d(c))
            self.convs.append(nn.Conv2d(c, growth, 3, padding=1, bias=False))
            c += growth
        self.trans_bn, self.trans = nn.BatchNorm2d(c), nn.Conv2d(c, 6, 1, bias=False)
        self.final_bn = nn.BatchNorm2d(6)
        self.fc = nn.Linear(6, 5)

    def forward(self, x):
        feats = [self.stem(x)]
        for bn, conv in zip(self.bns, self.convs):
            feats.append(conv(F.relu(bn(torch.cat(feats, 1)))))
        y = F.avg_pool2d(self.trans(F.relu(self.trans_bn(torch.cat(feats, 1)))), 2)
        return self.fc(F.relu(self.final_bn(y)).mean((2, 3)))


class CatIntoConv(nn.Module):
    """Two branches concatenated and read by a conv before any normalization: the conv mixes the slices, so
    neither branch is invariant (only the mixing conv, before its BatchNorm, is)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.mix, self.bn = nn.Conv2d(8, 8, 1, bias=False), nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        return self.fc(F.relu(self.bn(self.mix(torch.cat([self.a(x), self.b(x)], 1)))).mean((2, 3)))


class GainStdConv2d(nn.Conv2d):
    """Weight standardization with a learned gain, as timm's ScaledStdConv2d (NF-ResNets): the weight is
    standardized per filter by ``F.batch_norm`` over its rows, whose affine weight is the gain."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.gain = nn.Parameter(torch.full((self.out_channels, 1, 1, 1), 1.5))

    def forward(self, x):
        w = F.batch_norm(
            self.weight.reshape(1, self.out_channels, -1), None, None, weight=(self.gain * 0.5).reshape(-1), training=True, momentum=0.0, eps=1e-10
        )
        return F.conv2d(x, w.reshape_as(self.weight), self.bias, self.stride, self.padding)


class NormFreeNet(nn.Module):
    """No activation normalization at all (NF-ResNet): the standardized weights are invariant per filter, a
    residual addition notwithstanding; the plain classifier is not."""

    def __init__(self):
        super().__init__()
        self.conv1 = GainStdConv2d(3, 8, 3, padding=1)
        self.conv2 = GainStdConv2d(8, 8, 3, padding=1, bias=True)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        x = F.relu(self.conv1(x))
        x = x + F.relu(self.conv2(x))
        return self.fc(x.mean((2, 3)))


class ConvNeXtBlock(nn.Module):
    """A depthwise conv with a bias, then a LayerNorm over the channels (channels-last, as ConvNeXt): only the whole
    weight with its bias is invariant; no group of filters is (the numerical check must not refine it)."""

    def __init__(self, c=8):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 2, stride=2)
        self.dw = nn.Conv2d(c, c, 3, padding=1, groups=c)
        self.norm = nn.LayerNorm(c)
        self.pw = nn.Linear(c, 2 * c)
        self.fc = nn.Linear(2 * c, 5)

    def forward(self, x):
        y = self.norm(self.dw(self.stem(x)).permute(0, 2, 3, 1))
        return self.fc(F.gelu(self.pw(y)).mean((1, 2)))


class HandRMSNorm(nn.Module):
    """An RMSNorm written by hand, ``x * rsqrt(mean(x²) + eps)``, after a Linear without bias."""

    def __init__(self, d=16):
        super().__init__()
        self.lin = nn.Linear(d, d, bias=False)
        self.fc = nn.Linear(d, 3)

    def forward(self, x):
        h = self.lin(x)
        return self.fc(h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-12))


class PostNormAttention(nn.Module):
    """Attention whose output projection is normalized before the residual (OLMo2, Gemma3): attention is
    homogeneous of degree 1 in v, so v's and the output projection's weights are invariant as whole tensors; q and
    k (through the softmax) are not."""

    def __init__(self, d=16, heads=2):
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.o = (nn.Linear(d, d, bias=False) for _ in range(4))
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, 3)

    def forward(self, x):
        b, t, d = x.shape

        def split(h):
            return h.view(b, t, self.heads, d // self.heads).transpose(1, 2)

        a = F.scaled_dot_product_attention(split(self.q(x)), split(self.k(x)), split(self.v(x)))
        return self.head(x + self.norm(self.o(a.transpose(1, 2).reshape(b, t, d))))


class SeparableConv(nn.Module):
    """Xception / one-shot-aggregation style separable conv: depthwise → pointwise → BatchNorm, no norm between.
    The pointwise conv sums over the depthwise channels before the norm, so only the whole depthwise weight is
    invariant (scaling one depthwise filter changes the output); with ``groups`` it sums within blocks of
    ``8 / groups`` channels, and at ``groups=8`` it keeps each depthwise filter apart."""

    def __init__(self, groups: int = 1) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(8)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False)
        self.pw = nn.Conv2d(8, 16, 1, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn0(self.stem(x)))
        x = F.relu(self.bn(self.pw(self.dw(x))))
        return self.fc(x.mean((2, 3)))


class TimeMixing(nn.Module):
    """Conv1d → a Linear over the time axis → BatchNorm1d over the channels: the Linear sums over time, not over the
    conv's channels, so each conv filter stays invariant (the structure alone cannot tell which axis it sums over:
    refined by the numerical check); the Linear's rows are not, only its whole weight."""

    def __init__(self) -> None:
        super().__init__()
        self.c = nn.Conv1d(3, 8, 3, padding=1, bias=False)
        self.t = nn.Linear(8, 8, bias=False)
        self.bn = nn.BatchNorm1d(8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(F.relu(self.bn(self.t(self.c(x)))).mean(-1))


def exclude_eps_effects(model: nn.Module) -> nn.Module:
    """Make the normalizations' eps negligible, so that the numerical invariance check sees the structure
    alone (BatchNorm's eps is a real, separate effect when activations are tiny)."""
    for m in model.modules():
        if hasattr(m, "eps") and isinstance(m.eps, float):
            m.eps = 1e-12
    return model


def _resnet_expected():
    model = SmallResNet()
    return {f"{n}.weight": ("filter", None) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}


ZOO = {
    "conv_relu_bn": (ConvReluBN, img, {"conv1.weight": ("filter", None), "conv2.weight": ("filter", None)}),
    "bias_pairs_gn_ln": (BiasPairs, img, {"conv.weight+bias": ("group", 4), "lin.weight+bias": ("tensor", None)}),
    "preact_resnet": (
        PreActResNet,
        img,
        # the stem feeds the residual stream directly: not invariant either
        {"block1.conv1.weight": ("filter", None), "block2.conv1.weight": ("filter", None)},
    ),
    "resnet": (SmallResNet, img, _resnet_expected()),
    "group_norm": (GroupNormNet, img, {"conv1.weight": ("group", 2), "conv2.weight": ("filter", None), "conv3.weight": ("tensor", None)}),
    "weight_standardization": (WeightStandardized, img, {"conv.weight": ("filter", None)}),
    "weight_norm": (WeightNormNet, img, {"conv.parametrizations.weight.original1": ("filter", None)}),
    "linear_bn1d": (LinearBN1d, img, {"lin.weight": ("filter", None)}),
    "shared_weight": (Shared, img, {"conv.weight": ("filter", None)}),
    "frozen": (Frozen, img, {"conv.weight": ("filter", None)}),
    "untraceable": (Untraceable, img, {"conv1.weight": ("filter", None), "conv2.weight": ("filter", None)}),
    "functional_only": (FunctionalOnly, img, {"w1": ("filter", None), "w2": ("tensor", None), "w3": ("group", 4)}),
    "torch_compile": (
        lambda: torch.compile(ConvReluBN()),
        img,
        {"_orig_mod.conv1.weight": ("filter", None), "_orig_mod.conv2.weight": ("filter", None)},
    ),
    "pre_ln_transformer": (PreLNBlock, seq, {}),
    "post_ln_transformer": (PostLNBlock, seq, {}),
    "qk_norm_attention": (
        lambda: PreLNBlock(qk_norm=True),
        seq,
        {"attn.q.weight": ("group", 4), "attn.k.weight": ("group", 4)},
    ),
    "conv_transpose": (ConvTransposeBN, img, {"up.weight": ("filter", None)}),
    "conv1d_conv3d_instance_norm": (
        Conv1d3dInstance,
        img,
        {"c1.weight": ("filter", None), "c3.weight": ("filter", None), "c2.weight": ("filter", None)},
    ),
    "lazy_modules": (LazyNet, img, {"conv.weight": ("filter", None)}),
    "densenet_concatenation": (
        MiniDenseNet,
        img,
        {n: ("filter", None) for n in ("stem.weight", "convs.0.weight", "convs.1.weight", "convs.2.weight", "trans.weight")},
    ),
    "concatenation_into_a_conv": (CatIntoConv, img, {"mix.weight": ("filter", None)}),
    "weight_standardization_with_gain": (NormFreeNet, img, {"conv1.weight": ("filter", None), "conv2.weight": ("filter", None)}),
    "convnext_depthwise_layer_norm": (ConvNeXtBlock, img, {"dw.weight+bias": ("tensor", None)}),
    "rms_norm_by_hand": (HandRMSNorm, seq, {"lin.weight": ("tensor", None)}),
    "post_norm_attention": (PostNormAttention, seq, {"v.weight": ("tensor", None), "o.weight": ("tensor", None)}),
    "separable_conv": (SeparableConv, img, {"stem.weight": ("filter", None), "dw.weight": ("tensor", None), "pw.weight": ("filter", None)}),
    "separable_conv_grouped_pointwise": (
        lambda: SeparableConv(groups=2),
        img,
        {"stem.weight": ("filter", None), "dw.weight": ("group", 4), "pw.weight": ("filter", None)},
    ),
    "linear_over_time": (TimeMixing, lambda: torch.randn(4, 3, 8), {"c.weight": ("filter", None), "t.weight": ("tensor", None)}),
}
