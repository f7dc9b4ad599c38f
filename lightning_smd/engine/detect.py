"""Which parameters are scale-invariant ("normalized"), at what granularity, and why.

A weight ``W`` is scale-invariant when the model's outputs do not change if ``W`` is multiplied by any
``k > 0``. This module decides that from the model's real data flow, never from module order. It builds a
small data-flow graph of the forward pass — with :mod:`torch.fx` where the model traces, otherwise by
recording the torch calls of one real forward pass — and propagates, for each candidate weight, the
*degree of homogeneity* of every value in that weight's scale:

- a value that does not depend on the scale of ``W`` has degree 0;
- ``conv(x, W)`` has degree 1; positively homogeneous ops (ReLU, LeakyReLU, pooling, reshapes, dropout,
  scalar multiplication, concatenation of equal degrees) keep the degree; products add degrees, quotients
  subtract them, ``sqrt`` halves them;
- a normalization (BatchNorm, GroupNorm, LayerNorm, InstanceNorm, RMSNorm and their functional forms)
  maps any non-zero degree back to 0: it absorbs the scale. So does dividing a weight by its own norm or
  standard deviation (weight standardization, weight normalization);
- anything else that mixes degrees (a residual addition, a bias added after, a non-homogeneous activation
  before the norm, the model output) breaks invariance.

``W`` is tracked when every output has degree 0 in it. A conv/linear bias that a per-channel
normalization cancels (BatchNorm, InstanceNorm) does not stop its weight from being tracked; where the
bias is not cancelled, the weight and the bias are invariant only *together* and become one unit.

The structural answer is then checked numerically where a gradient is at hand: scale invariance implies
``⟨∇L(W), W⟩ = 0`` (per filter where the invariance is per filter), see :func:`verify_orthogonality`.
"""

from __future__ import annotations

import fnmatch
import heapq
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, NamedTuple

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from lightning_smd.analysis.units import NOT_ORTHOGONAL_WARNING, ORTHOGONALITY_TOLERANCE, NormalizedWeight

__all__ = [
    "NormalizedWeight",
    "Detection",
    "find_normalized_weights",
    "format_detection_table",
    "verify_orthogonality",
    "ORTHOGONALITY_TOLERANCE",
    "NOT_ORTHOGONAL_WARNING",
    "DataFlowRecorder",
    "detect_from_graph",
    "units_from_patterns",
]

#: The reason a frozen weight (``requires_grad=False``) is not tracked (it may thaw later: the session warns).
FROZEN = "frozen (requires_grad=False)"

@dataclass
class Detection:
    """The outcome of :func:`find_normalized_weights`."""

    units: list[NormalizedWeight] = field(default_factory=list)
    rejected: dict[str, str] = field(default_factory=dict)
    """Conv/linear weights that are *not* tracked, with the reason."""
    method: str = "fx"
    """``fx``, ``run`` (recorded forward pass), ``deferred`` (needs a real batch) or ``none``."""
    error: str | None = None
    """Why the data flow could not be analysed (then only ``include`` patterns are honoured)."""
    rejected_verification: dict[str, float] = field(default_factory=dict)
    """``|cos(∇L(W), W)|`` of the rejected weights, where a gradient was at hand."""
    unmatched_patterns: dict[str, list[str]] = field(default_factory=dict)
    """``include`` / ``exclude`` patterns that match no parameter name (an ``exclude`` pattern: nor a unit name), by
    option; only the options that have some."""
    pattern_hint: dict[str, str] = field(default_factory=dict)
    """For the warnings about :attr:`unmatched_patterns`, by option: the names nearest its patterns, and a few of the
    model's."""

    @property
    def names(self) -> list[str]:
        return [u.name for u in self.units]

    def pattern_warnings(self) -> list[tuple[str, dict[str, Any]]]:
        """The warnings about :attr:`unmatched_patterns` as ``(code, fields)`` for ``Session.warn(code, **fields)``:
        ``SMD013`` for ``include``, ``SMD014`` for ``exclude``, each once per set of patterns."""
        out = []
        for option, code in (("include", "SMD013"), ("exclude", "SMD014")):
            patterns = self.unmatched_patterns.get(option)
            if patterns:
                shown = ", ".join(repr(p) for p in patterns)
                out.append((code, {"once": f"{code}:{shown}", "patterns": shown, "hint": self.pattern_hint.get(option, "")}))
        return out


# ----------------------------------------------------------------------------------------------
# Op semantics, by name (shared by the fx and the recording front ends)
# ----------------------------------------------------------------------------------------------

_LAYERS = {
    "conv1d": 1,
    "conv2d": 1,
    "conv3d": 1,
    "conv_transpose1d": 1,
    "conv_transpose2d": 1,
    "conv_transpose3d": 1,
    "linear": -1,
}
_NORMS = {
    "normalize": "l2",  # F.normalize: x / ‖x‖ along a dim (cosine classifiers, QK-normalization)
    "batch_norm": "batch",
    "instance_norm": "instance",
    "group_norm": "group",
    "layer_norm": "layer",
    "rms_norm": "rms",
}
# kind -> (granularity, cancels a per-channel constant)
_NORM_KINDS = {
    "batch": ("filter", True),
    "instance": ("filter", True),
    "group": ("group", False),
    "layer": ("tensor", False),
    "rms": ("tensor", False),
    "l2": ("tensor", False),
}
# Positively homogeneous of degree 1 in their first argument.
_UNARY = {
    "relu", "relu_", "leaky_relu", "leaky_relu_", "prelu", "hardtanh_zero",
    "max_pool1d", "max_pool2d", "max_pool3d", "_max_pool1d", "_max_pool2d", "_max_pool3d",
    "max_pool1d_with_indices", "max_pool2d_with_indices", "max_pool3d_with_indices",
    "avg_pool1d", "avg_pool2d", "avg_pool3d",
    "adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d",
    "adaptive_max_pool1d", "adaptive_max_pool2d", "adaptive_max_pool3d",
    "adaptive_max_pool1d_with_indices", "adaptive_max_pool2d_with_indices", "adaptive_max_pool3d_with_indices",
    "dropout", "dropout_", "dropout1d", "dropout2d", "dropout3d", "alpha_dropout", "feature_alpha_dropout",
    "pad", "interpolate", "upsample", "pixel_shuffle", "pixel_unshuffle", "zero_pad",
    "flatten", "unflatten", "view", "view_as", "reshape", "reshape_as", "permute", "transpose", "transpose_", "t", "T", "mT",
    "contiguous", "squeeze", "squeeze_", "unsqueeze", "unsqueeze_", "expand", "expand_as", "repeat", "repeat_interleave",
    "neg", "negative", "__neg__", "__pos__", "positive", "mean", "sum", "nansum", "amax", "amin", "max", "min",
    "narrow", "chunk", "split", "unbind", "roll", "flip", "clone", "detach", "float", "double", "half", "bfloat16",
    "to", "type_as", "__getitem__", "select", "index_select", "gather", "movedim", "moveaxis", "swapaxes", "swapdims",
    "identity", "data", "as_strided", "getitem", "tile", "unfold", "fold", "im2col", "col2im",
}
# Unary ops that also commute with adding a per-channel constant (a bias before them stays cancellable).
_BIAS_TRANSPARENT = {
    "max_pool1d", "max_pool2d", "max_pool3d", "_max_pool1d", "_max_pool2d", "_max_pool3d",
    "max_pool1d_with_indices", "max_pool2d_with_indices", "max_pool3d_with_indices",
    "avg_pool1d", "avg_pool2d", "avg_pool3d", "adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d",
    "adaptive_max_pool1d", "adaptive_max_pool2d", "adaptive_max_pool3d", "identity", "contiguous", "clone",
}
# Unary ops (function, method or module class names) that act on each channel alone: a concatenation's
# channel slices keep their own degrees through them.
_CHANNELWISE = {
    "relu", "relu_", "leaky_relu", "leaky_relu_", "prelu", "hardtanh_zero", "ReLU", "LeakyReLU", "PReLU",
    "max_pool1d", "max_pool2d", "max_pool3d", "_max_pool1d", "_max_pool2d", "_max_pool3d",
    "max_pool1d_with_indices", "max_pool2d_with_indices", "max_pool3d_with_indices",
    "avg_pool1d", "avg_pool2d", "avg_pool3d", "adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d",
    "adaptive_max_pool1d", "adaptive_max_pool2d", "adaptive_max_pool3d",
    "MaxPool1d", "MaxPool2d", "MaxPool3d", "AvgPool1d", "AvgPool2d", "AvgPool3d", "AdaptiveAvgPool1d",
    "AdaptiveAvgPool2d", "AdaptiveAvgPool3d", "AdaptiveMaxPool1d", "AdaptiveMaxPool2d", "AdaptiveMaxPool3d",
    "dropout", "dropout_", "dropout1d", "dropout2d", "dropout3d", "Dropout", "Dropout1d", "Dropout2d", "Dropout3d",
    "interpolate", "upsample", "Upsample", "identity", "Identity", "contiguous", "clone", "detach", "float", "double",
    "half", "bfloat16", "to", "type_as", "data",
}
# Unary ops that can move channels into other dimensions or split them (before a normalization, they leave the
# structural granularity open: the numerical check may refine or coarsen it).
_CHANNEL_MOVING = {
    "view", "view_as", "reshape", "reshape_as", "flatten", "unflatten", "Flatten", "Unflatten", "pixel_shuffle",
    "pixel_unshuffle", "PixelShuffle", "PixelUnshuffle", "split", "chunk", "unbind", "__getitem__", "getitem",
    "narrow", "select", "index_select", "gather", "unfold", "fold", "im2col", "col2im", "as_strided",
}
_MATMUL = {"matmul", "__matmul__", "__rmatmul__", "bmm", "mm", "einsum", "outer", "baddbmm"}
# f(kx) = k^p f(x)
_POWER = {
    "sqrt": 0.5, "sqrt_": 0.5, "rsqrt": -0.5, "rsqrt_": -0.5, "reciprocal": -1.0, "norm": 1.0, "std": 1.0,
    "var": 2.0, "abs": 1.0, "__abs__": 1.0, "square": 2.0, "vector_norm": 1.0, "matrix_norm": 1.0,
}
_MUL = {"mul", "mul_", "__mul__", "__rmul__", "multiply", "matmul", "__matmul__", "__rmatmul__", "bmm", "mm", "einsum", "outer", "baddbmm"}
_DIV = {"div", "div_", "__truediv__", "truediv", "true_divide", "divide"}
_RDIV = {"__rtruediv__", "__rdiv__"}
_ADD = {"add", "add_", "__add__", "__radd__", "__iadd__", "sub", "sub_", "__sub__", "__rsub__", "__isub__", "subtract"}
_CAT = {"cat", "concat", "concatenate", "stack", "hstack", "vstack"}
_META = {"size", "dim", "numel", "type", "__len__", "shape", "dtype", "device", "ndim", "is_cuda", "requires_grad",
         "is_floating_point", "element_size", "stride", "storage_offset", "is_contiguous", "get_device", "data_ptr",
         "nelement", "ndimension", "layout", "is_leaf", "grad_fn", "_version"}
# Scalar constants added to a homogeneous value that still count as "a stabilizing epsilon" (like
# BatchNorm's eps): weight standardization divides by ``std + eps``.
_EPS = 1e-3

_NORM_MODULES: list[tuple[type[nn.Module], str]] = [
    (nn.SyncBatchNorm, "batch"),
    (nn.modules.batchnorm._BatchNorm, "batch"),
    (nn.modules.instancenorm._InstanceNorm, "instance"),
    (nn.GroupNorm, "group"),
    (nn.LayerNorm, "layer"),
]
if hasattr(nn, "RMSNorm"):
    _NORM_MODULES.append((nn.RMSNorm, "rms"))
_LAYER_MODULES = {
    nn.Conv1d: "conv1d", nn.Conv2d: "conv2d", nn.Conv3d: "conv3d",
    nn.ConvTranspose1d: "conv_transpose1d", nn.ConvTranspose2d: "conv_transpose2d", nn.ConvTranspose3d: "conv_transpose3d",
    nn.Linear: "linear",
}
_UNARY_MODULES = (
    nn.ReLU, nn.LeakyReLU, nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d,
    nn.AdaptiveMaxPool3d, nn.Flatten, nn.Unflatten, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d,
    nn.Identity, nn.ZeroPad2d, nn.PixelShuffle, nn.PixelUnshuffle, nn.Upsample,
)
_BIAS_TRANSPARENT_MODULES = (
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, nn.Identity,
)


# ----------------------------------------------------------------------------------------------
# The graph
# ----------------------------------------------------------------------------------------------


@dataclass
class _Op:
    kind: str  # input|param|layer|norm|unary|power|mul|div|rdiv|add|cat|meta|weight_norm|attention|opaque|output
    args: list[int | None]  # node ids of the tensor operands, in order (None: a constant)
    label: str = ""
    name: str = ""
    consts: list[Any] = field(default_factory=list)  # scalar operands (add: the epsilon test)
    norm_kind: str = ""
    transparent: bool = False
    power: float = 1.0
    weight: int | None = None
    bias: int | None = None
    param: str | None = None  # kind == "param"
    own_params: tuple[str, ...] = ()  # parameters an opaque op/norm uses directly
    feature_axis: int = 1  # layers: where the output features are (1 conv, -1 linear)
    filter_dim: int = 0  # layers: weight dim indexing output filters
    groups: int | None = None  # group norms: number of groups; layers: the conv's groups (1 mixes every channel; None unknown)
    channel_cat: bool = False  # cat: along dim 1, the channel axis of conv and (N, C) activations


def _op_from_name(name: str, args: list[int | None], consts: list[Any], label: str) -> _Op:
    """Classify a call by the name of the torch function / Tensor method."""
    if name in _LAYERS:
        x, w, b = (args + [None, None, None])[:3]
        transposed = name.startswith("conv_transpose")
        return _Op("layer", [x], label=label, weight=w, bias=b, feature_axis=_LAYERS[name], filter_dim=1 if transposed else 0)
    if name in _NORMS:
        return _Op("norm", args, label=label, norm_kind=_NORMS[name])
    if name in _META:
        return _Op("meta", [], label=label)
    if name in ("max", "min", "maximum", "minimum", "fmax", "fmin") and len(args) > 1:
        return _Op("cat", args[:2], label=label)  # elementwise max of two tensors: homogeneous only at equal degrees
    if name in ("addmm", "baddbmm", "addbmm", "addmv", "addr", "addcmul", "addcmul_", "addmm_", "baddbmm_"):
        return _Op("addmm", args[:3], label=label)
    if name in _UNARY:
        return _Op("unary", args[:1], label=label, transparent=name in _BIAS_TRANSPARENT)
    if name in _POWER:
        return _Op("power", args[:1], label=label, power=_POWER[name])
    if name in ("pow", "pow_", "__pow__") and consts and isinstance(consts[0], (int, float)):
        return _Op("power", args[:1], label=label, power=float(consts[0]))
    if name in _MUL:
        return _Op("mul", args, label=label)
    if name in _DIV:
        return _Op("div", args[:2], label=label)
    if name in _RDIV:
        return _Op("rdiv", args[:2], label=label)
    if name in _ADD:
        return _Op("add", args, label=label, consts=consts)
    if name in _CAT:
        dims = [c for c in consts if isinstance(c, int) and not isinstance(c, bool)]
        return _Op("cat", args, label=label, channel_cat=name in ("cat", "concat", "concatenate") and dims == [1])
    if name in ("_weight_norm", "weight_norm"):
        return _Op("weight_norm", args[:2], label=label)
    if name == "scaled_dot_product_attention":
        return _Op("attention", args, label=label)
    return _Op("opaque", args, label=label)


_AFF = "aff"  # degree 1 plus a per-channel constant (a layer's bias, analysing its weight alone)
_BROKEN = "broken"


class _Parts(tuple):
    """The degrees of the channel slices of a concatenation along the channel axis, where they differ (DenseNet's
    ``cat(features, 1)``): a per-channel normalization absorbs each slice's own scale; ops that act per channel
    keep them; anything that mixes channels (a layer, a matmul, a reshape, another normalization) breaks."""


def _parts(values: Iterable[Any]) -> Any:
    flat: list[Any] = []
    for v in values:
        flat.extend(v if isinstance(v, _Parts) else (v,))
    if _BROKEN in flat:
        return _BROKEN
    return flat[0] if all(v == flat[0] for v in flat) else _Parts(flat)


def _nz(d: float) -> Any:
    return 0.0 if abs(d) < 1e-12 else d


def _product(a: Any, b: Any) -> Any:
    if a == 0.0:
        return b if b != _AFF else _BROKEN
    if b == 0.0:
        return a if a != _AFF else _BROKEN
    if isinstance(a, float) and isinstance(b, float):
        return _nz(a + b)
    return _BROKEN



class _Propagation(NamedTuple):
    """The outcome of :meth:`_Graph.propagate`: whether the unit is invariant, why not (a sentence), the absorbing
    normalizations as (node, degree in, whether an op that can move or split channels lies between the unit and
    the normalization, the fewest groups of a layer that mixed the unit's channels on the way there: None when no
    layer did, 1 for a dense conv or a linear), and whether a layer's own bias broke the invariance."""

    invariant: bool
    why: str
    absorbed: list[tuple[int, Any, bool, _Mix | None]]
    by_bias: bool = False


class _Mix(NamedTuple):
    """Layers between a unit and a value that sum over the unit's channels: the groups they leave apart (the gcd of
    their groups: 1 when one mixes them all), the feature axis they share (None when they differ or are unknown),
    and whether the structure shows it for certain (known groups, channels as the unit made them)."""

    groups: int
    axis: int | None
    certain: bool

    @staticmethod
    def join(mixes: Iterable[_Mix]) -> _Mix | None:
        """Layers in series (or on joining paths): a channel mixed by any of them is mixed."""
        out: _Mix | None = None
        for m in mixes:
            if out is None:
                out = m
            else:
                out = _Mix(math.gcd(out.groups, m.groups), out.axis if out.axis == m.axis else None, out.certain and m.certain)
        return out


class _Scope(NamedTuple):
    """What the per-kind rules of :meth:`_Graph._eval` read during one propagation: the unit's parameter names,
    the layer bias allowed to ride along with its weight (``weight_only_bias``), the degree of a node so far
    (``val``), and the list the absorbing ops are appended to as (node, degree in)."""

    unit: set[str]
    wob: str | None
    val: Callable[[int | None], Any]
    absorbed: list


class _Graph:
    """Ops in topological order; ``outputs`` are the node ids whose values the loss sees."""

    def __init__(self) -> None:
        self.ops: list[_Op] = []
        self.outputs: list[int] = []
        self.param_node: dict[str, int] = {}

    def add(self, op: _Op) -> int:
        self.ops.append(op)
        if not op.name:
            op.name = f"{op.label}_{len(self.ops) - 1}"
        return len(self.ops) - 1

    def param(self, name: str) -> int:
        if name not in self.param_node:
            self.param_node[name] = self.add(_Op("param", [], label=name, name=name, param=name))
        return self.param_node[name]

    def finalize(self) -> None:
        n = len(self.ops)
        self.users: list[list[int]] = [[] for _ in range(n)]
        for i, op in enumerate(self.ops):
            refs = list(op.args) + [op.weight, op.bias]
            for a in refs:
                if a is not None:
                    self.users[a].append(i)
        self.param_users: dict[str, list[int]] = {}
        for i, op in enumerate(self.ops):
            for p in op.own_params:
                self.param_users.setdefault(p, []).append(i)
        self.out_set = set(self.outputs)

    # ------------------------------------------------------------------------------------------
    def layer_weights(self) -> list[tuple[str, int]]:
        """(parameter, layer node) for every layer whose weight is a parameter or derived from one alone."""
        out = []
        for i, op in enumerate(self.ops):
            if op.kind == "layer" and op.weight is not None:
                p = self._source_param(op.weight)
                if p is not None:
                    out.append((p, i))
        return out

    def _source_param(self, node: int) -> str | None:
        """The one parameter a layer's weight is computed from (itself, a weight-norm direction, a
        standardized weight …), or None when it is computed from several tensors or from none."""
        op = self.ops[node]
        if op.kind == "param":
            return op.param
        if op.kind == "weight_norm":  # w = g * v / |v|: the direction parameter v is the invariant one
            v = op.args[0] if op.args else None
            return self.ops[v].param if v is not None and self.ops[v].kind == "param" else None
        found: set[str] = set()
        stack, seen = [node], set()
        while stack:
            i = stack.pop()
            if i in seen:
                continue
            seen.add(i)
            o = self.ops[i]
            if o.kind == "param":
                found.add(o.param)  # type: ignore[arg-type]
            elif o.kind == "input" or o.own_params or len(seen) > 64:
                return None
            elif o.kind == "norm":  # weight standardization with a learned gain: the gain is not the weight's scale
                stack.extend(o.args[:1])
            else:
                stack.extend(a for a in list(o.args) + [o.weight, o.bias] if a is not None)
        return next(iter(found)) if len(found) == 1 else None

    def param_of(self, node: int | None) -> str | None:
        return self.ops[node].param if node is not None and self.ops[node].kind == "param" else None

    def propagate(self, unit: set[str], weight_only_bias: str | None) -> _Propagation:
        """Propagate the degree of every value in the scale of ``unit``."""
        value: dict[int, Any] = {}
        start = [self.param_node[p] for p in unit if p in self.param_node]
        start += [i for p in unit for i in self.param_users.get(p, [])]
        if not start:
            return _Propagation(False, "not used in the forward pass", [])
        heap = list(set(start))
        heapq.heapify(heap)
        queued = set(heap)
        absorbed: list[tuple[int, Any, bool, _Mix | None]] = []
        moved: set[int] = set()  # values that went through an op that can move or split channels
        catted: set[int] = set()  # values that went through a channel concatenation (channels at new positions)
        # values that went through a layer summing over the unit's channels: the fewest groups of such a layer (a
        # depthwise conv after a depthwise conv keeps the filters apart; a pointwise conv mixes them all, so that
        # only the whole depthwise weight is invariant under the normalization after it)
        mixed: dict[int, _Mix] = {}

        def val(a: int | None) -> Any:
            return 0.0 if a is None else value.get(a, 0.0)

        scope = _Scope(unit, weight_only_bias, val, absorbed)
        while heap:
            i = heapq.heappop(heap)
            op = self.ops[i]
            n_absorbed = len(absorbed)
            v = self._eval(op, scope, i)
            is_moved = any(a in moved for a in op.args if a is not None) or (op.kind == "unary" and op.label in _CHANNEL_MOVING)
            is_catted = any(a in catted for a in op.args if a is not None) or (op.kind == "cat" and op.channel_cat)
            mix = _Mix.join(mixed[a] for a in op.args if a is not None and a in mixed)
            if len(absorbed) > n_absorbed:
                absorbed[n_absorbed:] = [(j, x, is_moved, mix) for j, x, *_ in absorbed[n_absorbed:]]
            if op.kind == "layer" and op.args and val(op.args[0]) != 0.0:  # the unit's scale enters a layer's input
                # certain only for known groups over an input whose channels came straight from the unit (a
                # concatenation or a channel-moving op before it changes which channels a group holds)
                placed = not any(a in moved or a in catted for a in op.args[:1] if a is not None)
                this = _Mix(op.groups or 1, op.feature_axis, op.groups is not None and placed)
                mix = _Mix.join([m for m in (mix, this) if m is not None])
            elif op.kind == "mul" and op.label in _MATMUL and any(val(a) != 0.0 for a in op.args):
                mix = _Mix.join([m for m in (mix, _Mix(1, None, False)) if m is not None])  # a matmul / einsum may sum over them
            if v != 0.0:
                value[i] = v
                if is_moved:
                    moved.add(i)
                if is_catted:
                    catted.add(i)
                if mix is not None:
                    mixed[i] = mix
                if i in self.out_set:
                    why, by_bias = self._explain(i, value)
                    return _Propagation(False, why, absorbed, by_bias)
                for u in self.users[i]:
                    if u not in queued:
                        queued.add(u)
                        heapq.heappush(heap, u)
        return _Propagation(True, "", absorbed)

    def _eval(self, op: _Op, s: _Scope, i: int) -> Any:
        """The degree of node ``i``'s value from its operands' degrees, by the rule for ``op.kind`` (see ``_RULES``)."""
        return _Graph._RULES.get(op.kind, _Graph._eval_opaque)(self, op, s, i)

    # One rule per op kind: each returns the node's degree and appends to ``s.absorbed`` what absorbs the scale.

    def _eval_param(self, op: _Op, s: _Scope, i: int) -> Any:
        return 1.0 if op.param in s.unit else 0.0

    def _eval_layer(self, op: _Op, s: _Scope, i: int) -> Any:
        val = s.val
        x = val(op.args[0]) if op.args else 0.0
        if isinstance(x, _Parts):
            return _BROKEN  # a layer sums over the input channels
        core = _product(x, val(op.weight))
        if op.bias is None:
            return core
        b = val(op.bias)
        if core == b:
            return core
        if core == 1.0 and b == 0.0 and s.wob is not None and self.param_of(op.bias) == s.wob:
            return _AFF
        return _BROKEN

    def _eval_norm(self, op: _Op, s: _Scope, i: int) -> Any:
        val = s.val
        x = val(op.args[0]) if op.args else 0.0
        if any(val(a) != 0.0 for a in op.args[1:]) or any(p in s.unit for p in op.own_params):
            return _BROKEN
        if x == 0.0:
            return 0.0
        per_channel = _NORM_KINDS[op.norm_kind][1]
        if (x == _AFF or isinstance(x, _Parts)) and not per_channel:
            return _BROKEN
        if x == _BROKEN:
            return _BROKEN
        s.absorbed.append((i, x))
        return 0.0

    def _eval_unary(self, op: _Op, s: _Scope, i: int) -> Any:
        x = s.val(op.args[0]) if op.args else 0.0
        if any(p in s.unit for p in op.own_params) or (x == _AFF and not op.transparent):
            return _BROKEN
        if isinstance(x, _Parts) and op.label not in _CHANNELWISE:
            return _BROKEN
        return x

    def _eval_power(self, op: _Op, s: _Scope, i: int) -> Any:
        x = s.val(op.args[0]) if op.args else 0.0
        return _nz(x * op.power) if isinstance(x, float) else _BROKEN

    def _eval_mul(self, op: _Op, s: _Scope, i: int) -> Any:
        vals = [s.val(a) for a in op.args]
        if op.label in _MATMUL and any(isinstance(x, _Parts) for x in vals):
            return _BROKEN
        v: Any = 0.0
        for x in vals:
            v = _product(v, x)
        if v == 0.0 and any(x != 0.0 for x in vals):
            s.absorbed.append((i, next(x for x in vals if x != 0.0)))  # x · rsqrt(mean(x²)): a normalization by hand
        return v

    def _eval_div(self, op: _Op, s: _Scope, i: int) -> Any:
        """``div`` (a / b) and ``rdiv`` (b / a)."""
        val = s.val
        a, b = (op.args + [None, None])[:2]
        num, den = (val(a), val(b)) if op.kind == "div" else (val(b), val(a))
        if den != 0.0 and isinstance(den, float) and isinstance(num, float) and _nz(num - den) == 0.0:
            s.absorbed.append((i, den))  # w / |w|, w / std(w): a normalization of the weight itself
        return _product(num, -den if isinstance(den, float) else _BROKEN)

    def _eval_add(self, op: _Op, s: _Scope, i: int) -> Any:
        # a tensor the graph does not know (a model input, a buffer, a constant) has degree 0
        vals = [s.val(a) for a in op.args]
        nonzero = [x for x in vals if x != 0.0]
        if not nonzero:
            return 0.0
        first = nonzero[0]
        if any(x != first for x in nonzero) or len(nonzero) < len(vals):
            return _BROKEN
        consts = [c for c in op.consts if isinstance(c, (int, float)) and not isinstance(c, bool) and c != 0]
        if consts and not (isinstance(first, float) and all(0 < abs(c) <= _EPS for c in consts)):
            return _BROKEN
        return first

    def _eval_cat(self, op: _Op, s: _Scope, i: int) -> Any:
        vals = [s.val(a) for a in op.args]
        nonzero = [x for x in vals if x != 0.0]
        if not nonzero:
            return 0.0
        if all(x == nonzero[0] for x in vals):
            return nonzero[0]
        return _parts(vals) if op.channel_cat else _BROKEN

    def _eval_weight_norm(self, op: _Op, s: _Scope, i: int) -> Any:
        val = s.val
        v_deg, g_deg = val(op.args[0]) if op.args else 0.0, val(op.args[1]) if len(op.args) > 1 else 0.0
        if not isinstance(v_deg, float):
            return _BROKEN
        if v_deg != 0.0:
            s.absorbed.append((i, v_deg))
        return g_deg

    def _eval_addmm(self, op: _Op, s: _Scope, i: int) -> Any:
        """input + a @ b (baddbmm, addmm, addcmul, ...)."""
        val = s.val
        if any(isinstance(val(a), _Parts) for a in op.args):
            return _BROKEN
        first = val(op.args[0]) if op.args else 0.0
        prod = _product(val(op.args[1]) if len(op.args) > 1 else 0.0, val(op.args[2]) if len(op.args) > 2 else 0.0)
        if first == prod:
            return first
        return _BROKEN

    def _eval_attention(self, op: _Op, s: _Scope, i: int) -> Any:
        """softmax(q·kᵀ)·v: homogeneous of degree 1 in v, not at all in q, k or the mask."""
        val = s.val
        if any(val(a) != 0.0 for a in op.args[:2] + op.args[3:]):
            return _BROKEN
        v = val(op.args[2]) if len(op.args) > 2 else 0.0
        return v if isinstance(v, float) else _BROKEN

    def _eval_meta(self, op: _Op, s: _Scope, i: int) -> Any:
        return 0.0

    def _eval_opaque(self, op: _Op, s: _Scope, i: int) -> Any:
        """Any other kind: fine only when nothing it reads depends on the scale."""
        if any(p in s.unit for p in op.own_params) or any(s.val(a) != 0.0 for a in op.args):
            return _BROKEN
        return 0.0

    _RULES: dict[str, Callable[[_Graph, _Op, _Scope, int], Any]] = {
        "param": _eval_param,
        "layer": _eval_layer,
        "norm": _eval_norm,
        "unary": _eval_unary,
        "power": _eval_power,
        "mul": _eval_mul,
        "div": _eval_div,
        "rdiv": _eval_div,
        "add": _eval_add,
        "cat": _eval_cat,
        "weight_norm": _eval_weight_norm,
        "addmm": _eval_addmm,
        "attention": _eval_attention,
        "meta": _eval_meta,
    }

    def _explain(self, out: int, value: dict[int, Any]) -> tuple[str, bool]:
        """Name the op where the scale stopped being absorbed; and whether a layer's own bias broke it."""
        i = out
        seen: set[int] = set()
        while i not in seen:
            seen.add(i)
            op = self.ops[i]
            if value.get(i) != _BROKEN:
                return f"its scale reaches the model output through {op.name} ({op.label}) without a normalization", False
            preds = [a for a in list(op.args) + [op.weight, op.bias] if a is not None and value.get(a) == _BROKEN]
            if not preds and any(a is not None and value.get(a) == _AFF for a in op.args):
                return f"its layer's bias is not cancelled by a normalization: {op.name} ({op.label}) sees the bias's offset", True
            if not preds and any(isinstance(value.get(a), _Parts) for a in op.args if a is not None):
                return (
                    f"not scale-invariant at {op.name} ({op.label}): it mixes the channels of a concatenation whose slices "
                    "have different scales (only a per-channel normalization absorbs them)",
                    False,
                )
            if not preds:
                why = {
                    "add": "an addition mixes it with a term of another scale (e.g. a residual connection or a bias added after it)",
                    "layer": "a bias is added that no normalization cancels",
                    "cat": "it is concatenated with values of another scale",
                    "norm": "the normalization's own parameters depend on it",
                }.get(op.kind, "this op is not positively homogeneous")
                return f"not scale-invariant at {op.name} ({op.label}): {why}", op.kind == "layer"
            i = preds[0]
        return "not scale-invariant", False


# ----------------------------------------------------------------------------------------------
# Front end 1: torch.fx
# ----------------------------------------------------------------------------------------------


def _norm_kind_of_module(mod: nn.Module) -> str | None:
    for cls, kind in _NORM_MODULES:
        if isinstance(mod, cls):
            return kind
    return None


def _layer_groups(name: str, args: Sequence[Any], kwargs: Mapping[str, Any]) -> int | None:
    """The ``groups`` of a functional conv call (the 7th argument of ``conv*d`` and ``conv_transpose*d``); 1 for
    ``linear``; None when it is not a plain int (a traced value)."""
    if name == "linear":
        return 1
    groups = args[6] if len(args) > 6 else kwargs.get("groups", 1)
    return groups if isinstance(groups, int) and not isinstance(groups, bool) and groups > 0 else None


def _layer_name_of_module(mod: nn.Module) -> str | None:
    for cls, name in _LAYER_MODULES.items():
        if isinstance(mod, cls):
            return name
    return None


def _flatten_args(obj: Any) -> Iterable[Any]:
    if isinstance(obj, (list, tuple)):
        for item in obj:
            yield from _flatten_args(item)
    elif isinstance(obj, dict):
        for item in obj.values():
            yield from _flatten_args(item)
    elif isinstance(obj, slice):
        yield from _flatten_args((obj.start, obj.stop, obj.step))
    else:
        yield obj


def _weight_refs(g: _Graph, mod: nn.Module, prefix: str, pname: Mapping[int, str]) -> tuple[int | None, int | None]:
    """Param nodes of a layer module's weight and bias (a weight-norm parametrization becomes its op)."""
    w_ref: int | None = None
    parametrizations = getattr(mod, "parametrizations", None)
    if parametrizations is not None and "weight" in parametrizations:
        plist = parametrizations["weight"]
        kinds = [type(p).__name__ for p in plist]
        g_param, v_param = getattr(plist, "original0", None), getattr(plist, "original1", None)
        if kinds == ["_WeightNorm"] and g_param is not None and v_param is not None:
            v = g.param(pname[id(v_param)]) if id(v_param) in pname else None
            gg = g.param(pname[id(g_param)]) if id(g_param) in pname else None
            w_ref = g.add(_Op("weight_norm", [v, gg], label="weight_norm"))
        else:
            # An unknown parametrization: the weight's originals reach the output through opaque math.
            own = tuple(pname[id(p)] for p in plist.parameters() if id(p) in pname)
            w_ref = g.add(_Op("opaque", [], label="parametrization", own_params=own))
    else:
        w = getattr(mod, "weight", None)
        if isinstance(w, torch.Tensor) and id(w) in pname:
            w_ref = g.param(pname[id(w)])
    b = getattr(mod, "bias", None)
    b_ref = g.param(pname[id(b)]) if isinstance(b, torch.Tensor) and id(b) in pname else None
    return w_ref, b_ref


def _graph_from_fx(model: nn.Module, pname: Mapping[int, str]) -> _Graph:
    traced = torch.fx.Tracer().trace(model)
    modules = dict(model.named_modules())
    g = _Graph()
    node_id: dict[torch.fx.Node, int] = {}

    def ref(a: Any) -> int | None:
        return node_id.get(a) if isinstance(a, torch.fx.Node) else None

    for node in traced.nodes:
        args = list(_flatten_args(node.args)) + list(_flatten_args(node.kwargs))
        refs = [ref(a) for a in args if isinstance(a, torch.fx.Node)]
        consts = [a for a in args if not isinstance(a, torch.fx.Node)]
        if node.op == "placeholder":
            node_id[node] = g.add(_Op("input", [], label="input", name=node.name))
        elif node.op == "get_attr":
            obj = _resolve_attr(model, str(node.target))
            if isinstance(obj, torch.Tensor) and id(obj) in pname:
                node_id[node] = g.param(pname[id(obj)])
            else:
                node_id[node] = g.add(_Op("input", [], label="constant", name=node.name))
        elif node.op == "output":
            g.outputs.extend(r for r in refs if r is not None)
        elif node.op == "call_module":
            mod = modules[str(node.target)]
            label = type(mod).__name__
            first = ref(node.args[0]) if node.args else (refs[0] if refs else None)
            layer = _layer_name_of_module(mod)
            kind = _norm_kind_of_module(mod)
            own = tuple(pname[id(p)] for p in mod.parameters() if id(p) in pname)
            if layer is not None:
                w_ref, b_ref = _weight_refs(g, mod, str(node.target), pname)
                op = _op_from_name(layer, [first, w_ref, b_ref], [], label)
                op.groups = int(getattr(mod, "groups", 1) or 1)
            elif kind is not None:
                op = _Op("norm", [first], label=label, norm_kind=kind, own_params=own, groups=getattr(mod, "num_groups", None))
            elif isinstance(mod, nn.PReLU):
                op = _Op("unary", [first], label=label)
            elif isinstance(mod, _UNARY_MODULES):
                op = _Op("unary", [first], label=label, transparent=isinstance(mod, _BIAS_TRANSPARENT_MODULES))
            else:
                op = _Op("opaque", refs, label=label, own_params=own)
            op.name = node.name
            node_id[node] = g.add(op)
        elif node.op in ("call_function", "call_method"):
            target = node.target
            if node.op == "call_method":
                name = str(target)
            elif target is getattr:
                name = str(node.args[1]) if len(node.args) > 1 else "getattr"
            else:
                name = getattr(target, "__name__", str(target))
            if name in _LAYERS:
                x = node.args[0] if node.args else node.kwargs.get("input")
                w = node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
                b = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
                op = _op_from_name(name, [ref(x), ref(w), ref(b)], [], name)
                op.groups = _layer_groups(name, node.args, node.kwargs)
            elif name in _NORMS:
                op = _op_from_name(name, refs, consts, name)
                if name == "group_norm" and len(node.args) > 1 and isinstance(node.args[1], int):
                    op.groups = node.args[1]
            else:
                op = _op_from_name(name, refs, consts, name)
            op.name = node.name
            node_id[node] = g.add(op)
    g.finalize()
    return g


def _resolve_attr(root: nn.Module, target: str) -> Any:
    obj: Any = root
    for part in target.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


# ----------------------------------------------------------------------------------------------
# Front end 2: recording one real forward pass
# ----------------------------------------------------------------------------------------------


class DataFlowRecorder(TorchFunctionMode):
    """Records the data flow of the torch calls made while it is active (``with recorder: loss = ...``).

    Works for any model, whatever Python control flow it uses: it sees every torch function and Tensor
    method called on real tensors, with parameters recognized by identity. Call :meth:`graph` with the
    tensor(s) the loss is computed from.
    """

    def __init__(self, named_params: Mapping[str, torch.Tensor]) -> None:
        super().__init__()
        # Lazy parameters keep their identity when they are materialized, so ids found now stay valid.
        self.pname = {id(p): n for n, p in named_params.items()}
        self.g = _Graph()
        self._producer: dict[int, int] = {}
        self._keep: list[Any] = []
        self.calls = 0

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        try:
            self._record(func, args, kwargs, out)
        except Exception as err:  # noqa: BLE001 - recording must never break the forward pass
            # Never drop the op: its outputs would then look like constants (degree 0), a path to a false
            # "invariant". It becomes an opaque op of its tensor inputs, which breaks invariance and says why.
            self._record_unknown(func, args, kwargs, out, err)
        return out

    def _record_unknown(self, func: Any, args: Any, kwargs: Any, out: Any, err: Exception) -> None:
        name = getattr(func, "__name__", "") or type(func).__name__
        flat = list(_flatten_args(args)) + list(_flatten_args(kwargs))
        refs = [self._ref(a) for a in flat if isinstance(a, torch.Tensor)]
        i = self.g.add(_Op("opaque", refs, label=f"{name}, not recorded: {type(err).__name__}"))
        for t in _flatten_args(out):
            if isinstance(t, torch.Tensor) and id(t) not in self.pname:
                self._producer[id(t)] = i
                self._keep.append(t)

    def _ref(self, t: torch.Tensor) -> int | None:
        # A parameter is a leaf: whatever in-place initialization ran on it (lazy modules), its value in the
        # forward pass is the parameter itself.
        name = self.pname.get(id(t))
        if name is not None:
            return self.g.param(name)
        return self._producer.get(id(t))

    def _record(self, func: Any, args: Any, kwargs: Any, out: Any) -> None:
        self.calls += 1
        name = getattr(func, "__name__", "")
        if name == "__get__":
            owner = getattr(func, "__self__", None)
            name = getattr(owner, "__name__", "__get__")
        flat = list(_flatten_args(args)) + list(_flatten_args(kwargs))
        refs = [self._ref(a) if isinstance(a, torch.Tensor) else None for a in flat if isinstance(a, torch.Tensor)]
        consts = [a for a in flat if not isinstance(a, torch.Tensor)]
        if name in _LAYERS:
            positional = list(args) + [kwargs.get("weight"), kwargs.get("bias")]
            x, w, b = (positional + [None, None, None])[:3]
            op = _op_from_name(name, [self._tref(x), self._tref(w), self._tref(b)], consts, name)
            op.groups = _layer_groups(name, args, kwargs)
        else:
            op = _op_from_name(name, refs, consts, name)
            if name == "group_norm":
                op.groups = next((c for c in consts if isinstance(c, int) and not isinstance(c, bool)), None)
        i = self.g.add(op)
        for t in _flatten_args(out):
            if isinstance(t, torch.Tensor) and id(t) not in self.pname:
                self._producer[id(t)] = i
                self._keep.append(t)  # keep alive so that ids are not reused while recording

    def _tref(self, t: Any) -> int | None:
        return self._ref(t) if isinstance(t, torch.Tensor) else None

    def graph(self, outputs: Any) -> _Graph:
        g = self.g
        for t in _flatten_args(outputs):
            if isinstance(t, torch.Tensor):
                r = self._ref(t)
                if r is not None:
                    g.outputs.append(r)
        g.finalize()
        self._keep = []
        self._producer = {}
        return g


# ----------------------------------------------------------------------------------------------
# Analysis
# ----------------------------------------------------------------------------------------------


def _unwrap(model: nn.Module) -> tuple[nn.Module, str]:
    """Strip wrappers whose parameters live under a prefix (``torch.compile``'s ``_orig_mod``)."""
    prefix = ""
    while isinstance(getattr(model, "_orig_mod", None), nn.Module):
        model = model._orig_mod  # type: ignore[assignment]
        prefix += "_orig_mod."
    return model, prefix


def _analyse(g: _Graph, params: Mapping[str, nn.Parameter], found_by: str, prefix: str, det: Detection) -> list[NormalizedWeight]:
    units: list[NormalizedWeight] = []
    if not g.outputs:
        det.error = "the forward pass produced no tensor output to analyse"
        return units
    by_weight: dict[str, list[int]] = {}
    for p, i in g.layer_weights():
        by_weight.setdefault(p, []).append(i)
    for w, layer_nodes in by_weight.items():
        p = params[w]
        if not p.requires_grad:
            det.rejected[prefix + w] = FROZEN
            continue
        first = g.ops[layer_nodes[0]]
        via_weight_norm = g.ops[first.weight].kind == "weight_norm" if first.weight is not None else False
        biases = {g.param_of(g.ops[i].bias) for i in layer_nodes}
        bias = next(iter(biases)) if len(biases) == 1 else None
        alone = g.propagate({w}, weight_only_bias=bias)
        ok, why, absorbed = alone.invariant, alone.why, alone.absorbed
        unit_params: tuple[str, ...] = (w,)
        if not ok and bias is not None and params[bias].requires_grad and not via_weight_norm:
            together = g.propagate({w, bias}, weight_only_bias=None)
            if together.invariant:
                ok, absorbed, unit_params = True, together.absorbed, (w, bias)
            elif alone.by_bias:  # the bias broke the weight alone: where weight and bias together break says more
                why = f"{why}; with its bias, {together.why}"
        if not ok:
            det.rejected[prefix + w] = why
            continue
        norms = sorted({_absorber_label(g, i) for i, *_ in absorbed})
        granularity, group_size, refinable = _granularity(g, absorbed, layer_nodes[0], p)
        units.append(
            NormalizedWeight(
                name=prefix + w + ("+bias" if len(unit_params) > 1 else ""),
                params=tuple(prefix + n for n in unit_params),
                shape=tuple(p.shape),
                numel=sum(params[n].numel() for n in unit_params),
                layer="weight_norm" if via_weight_norm else first.label,
                norm="+".join(norms),
                granularity=granularity,
                found_by=found_by,
                group_size=group_size,
                filter_dim=first.filter_dim,
                refinable=refinable,
            )
        )
    return units


def _layer_weight_names(model: nn.Module) -> list[str]:
    """The weights of the model's conv and linear layers (any subclass: timm's ScaledStdConv2d, …), and of
    Hugging Face's ``Conv1D``: the candidates every one of which detection must account for."""
    names = []
    for mod_name, mod in model.named_modules():
        if isinstance(mod, tuple(_LAYER_MODULES)) or type(mod).__name__ == "Conv1D":
            w = mod._parameters.get("weight")
            if isinstance(w, nn.Parameter):
                names.append(f"{mod_name}.weight" if mod_name else "weight")
    return names


def _account_for_layers(model: nn.Module, prefix: str, g: _Graph | None, det: Detection) -> None:
    """Give every conv/linear weight that is neither tracked nor rejected its reason (nothing is left out silently)."""
    tracked = {p for u in det.units for p in u.params}
    params = dict(model.named_parameters())
    for n in _layer_weight_names(model):
        full = prefix + n
        if full in tracked or full in det.rejected or n not in params:
            continue
        if not params[n].requires_grad:
            det.rejected[full] = FROZEN
        elif g is None:
            det.rejected[full] = "the data flow could not be analysed"
        elif n not in g.param_node:
            det.rejected[full] = "not used in the analysed forward pass"
        else:
            det.rejected[full] = (
                "not used directly as a layer's weight (it reaches the layers only through other ops, e.g. a matmul or "
                "a computation together with other tensors), so its scale cannot be followed; if it is normalized, name "
                "it with include=[...]"
            )


def _absorber_label(g: _Graph, i: int) -> str:
    """How a normalization that absorbs the scale is shown: its op, or for one written by hand (``x *
    rsqrt(mean(x²) + eps)``, ``x / x.norm()``) the op that computes the statistic."""
    op = g.ops[i]
    if op.kind in ("mul", "div", "rdiv"):
        stat = next((g.ops[a].label for a in op.args if a is not None and g.ops[a].kind in ("power", "rdiv")), None)
        return f"{stat} (by hand)" if stat else f"{op.label} (by hand)"
    return op.label


def _granularity(g: _Graph, absorbed: list[tuple[int, Any, bool, _Mix | None]], layer_node: int, weight: torch.Tensor) -> tuple[str, int | None, bool]:
    """The structural granularity the absorbing normalizations give, coarsened where a layer between the unit and a
    normalization sums over the unit's channels (a depthwise conv into a pointwise conv before the norm: only the
    whole depthwise weight is invariant), and whether the structure leaves it open (then the numerical check may
    refine or coarsen it): channels moved or split before a normalization, a weight divided by its own statistics
    or normalized before the layer (the reduction dims are not recorded), BatchNorm after a Linear, a grouped conv
    whose groups do not divide the unit's filters."""
    layer = g.ops[layer_node]
    order = {"filter": 0, "group": 1, "tensor": 2}
    grans: list[tuple[str, int | None]] = []
    n_filters = weight.shape[layer.filter_dim] if weight.dim() else 1
    refinable = False
    for i, _, moved, mix in absorbed:
        op = g.ops[i]
        refinable |= moved or (i < layer_node and op.kind == "norm" and op.norm_kind != "batch")  # F.normalize(W, dim=1)
        refinable |= mix is not None and not mix.certain
        if mix is not None and mix.groups < n_filters:  # groups == filters: a depthwise conv keeps each filter apart
            size = n_filters // mix.groups if n_filters % mix.groups == 0 else n_filters
            refinable |= mix.groups > 1 or not mix.certain or mix.axis != layer.feature_axis
            grans.append(("tensor", None) if size >= n_filters else ("group", size))
        if op.kind == "weight_norm":
            grans.append(("filter", None))
        elif op.kind in ("div", "rdiv", "mul"):
            grans.append(("tensor", None))
            refinable = True
        elif op.kind == "norm":
            gran = _NORM_KINDS[op.norm_kind][0]
            if gran == "group" and op.groups:
                size = max(n_filters // op.groups, 1)
                grans.append(("filter", None) if size == 1 else (("tensor", None) if op.groups == 1 else ("group", size)))
            elif gran == "filter" and layer.feature_axis != 1:
                # BatchNorm after a Linear: per row only if the features are on BatchNorm's channel axis (2-D
                # input), which the structure alone does not show; the numerical check refines it
                grans.append(("tensor", None))
                refinable = True
            else:
                grans.append((gran, None))
    if not grans:
        return "tensor", None, True
    gran, size = max(grans, key=lambda x: order[x[0]])
    if gran == "group":  # blocks of several sizes: the smallest block that is a union of blocks of each
        size = math.lcm(*(s for k, s in grans if k == "group" and s))
        if size >= n_filters or n_filters % size:
            return "tensor", None, True
    return gran, size, refinable


def _apply_overrides(
    units: list[NormalizedWeight],
    named: Mapping[str, nn.Parameter],
    include: Sequence[str] | None,
    exclude: Sequence[str] | None,
    det: Detection,
) -> list[NormalizedWeight]:
    from lightning_smd.options import check_patterns

    include, exclude = check_patterns("include", include), check_patterns("exclude", exclude)
    out = list(units)
    have = {p for u in out for p in u.params}
    names = {u.name for u in out} | set(named)
    unmatched = {
        "include": [p for p in dict.fromkeys(include) if not any(fnmatch.fnmatchcase(n, p) for n in named)],
        "exclude": [p for p in dict.fromkeys(exclude) if not any(fnmatch.fnmatchcase(n, p) for n in names)],
    }
    det.unmatched_patterns = {k: v for k, v in unmatched.items() if v}
    det.pattern_hint = {k: _pattern_hint(v, list(named)) for k, v in det.unmatched_patterns.items()}
    for pattern in include:
        matched = [n for n in named if fnmatch.fnmatchcase(n, pattern)]
        if not matched:
            det.rejected.setdefault(f"include:{pattern}", "the include pattern matches no parameter")
        for n in matched:
            if n in have or not named[n].requires_grad:
                continue
            p = named[n]
            out.append(
                NormalizedWeight(
                    name=n, params=(n,), shape=tuple(p.shape), numel=p.numel(), layer="?", norm="?", granularity="tensor", found_by="include"
                )
            )
            have.add(n)
            det.rejected.pop(n, None)
    if exclude:
        kept = []
        for u in out:
            if any(fnmatch.fnmatchcase(p, pat) or fnmatch.fnmatchcase(u.name, pat) for pat in exclude for p in u.params):
                det.rejected[u.name] = "excluded by the user"
            else:
                kept.append(u)
        out = kept
    order = {n: i for i, n in enumerate(named)}
    out.sort(key=lambda u: order.get(u.params[0], math.inf))
    return out


def _pattern_hint(patterns: Sequence[str], names: Sequence[str]) -> str:
    """What the user needs to fix patterns that match nothing: the parameter names nearest them (a pattern missing the
    names' prefix: ``conv1.weight`` for ``net.conv1.weight``), then a few of the model's parameter names."""
    import difflib

    near: list[str] = []
    for p in patterns:
        tail = [n for n in names if fnmatch.fnmatchcase(n, "*." + p) or fnmatch.fnmatchcase(n, "*" + p)]
        near += tail[:3] or difflib.get_close_matches(p, names, n=2, cutoff=0.6)
    near = list(dict.fromkeys(near))[:4]
    first = [n for n in names if n not in near][: max(0, 6 - len(near))]
    if not names:
        return "The model has no parameters"
    did = f"Did you mean {' or '.join(repr(n) for n in near)}? " if near else ""
    more = f" and {len(names) - len(near + first)} more" if len(names) > len(near + first) else ""
    return f"{did}The model's {len(names)} parameter names read like {', '.join(repr(n) for n in near + first)}{more}"


def _is_lazy(model: nn.Module) -> bool:
    return any(isinstance(p, nn.parameter.UninitializedParameter) for p in model.parameters())


def find_normalized_weights(
    model: nn.Module,
    example_input: Any = None,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
) -> Detection:
    """Find the scale-invariant weights of ``model`` from its data flow, and explain every decision.

    Args:
        model: any ``nn.Module`` (a LightningModule, a ``torch.compile``'d module included).
        example_input: an input batch (a tensor, or a tuple/dict of arguments for ``forward``). With it, the
            model is also run once in training mode (its parameters, buffers and gradients are restored
            afterwards): a model fx cannot trace is analysed from that real forward pass, and every
            candidate weight gets the numerical check ``|cos(∇L(W), W)|`` with ``L`` a fixed random linear
            function of the outputs — which also settles the granularity.
        include: parameter-name globs to track in addition (the way out when detection cannot see a
            weight's normalization).
        exclude: parameter-name globs never to track.

    Returns:
        A :class:`Detection`. It never raises for a model it cannot analyse: ``error`` then says why.
    """
    inner, prefix = _unwrap(model)
    params = dict(inner.named_parameters())
    pname = {id(p): n for n, p in params.items()}
    det = Detection()
    g: _Graph | None = None
    found_by = "fx"
    fx_error: str | None = None
    if _is_lazy(inner) and example_input is None:
        det.method = "deferred"
        det.error = "the model has lazy (uninitialized) parameters: detection needs a forward pass first"
    else:
        if not _is_lazy(inner):
            try:
                g = _graph_from_fx(inner, pname)
            except Exception as err:  # noqa: BLE001 - any tracing failure means "fall back", never crash
                fx_error = f"{type(err).__name__}: {_first_line(err)}"
        if g is None and example_input is not None:
            try:
                g = _graph_from_run(inner, example_input)
                found_by = det.method = "run"
                params = dict(inner.named_parameters())  # lazy modules are materialized now
            except Exception as err:  # noqa: BLE001
                det.method = "none"
                det.error = (
                    f"{type(inner).__name__} could not be analysed: torch.fx failed ({fx_error}) and so did a real "
                    f"forward pass ({type(err).__name__}: {_first_line(err)}). Name the normalized weights with "
                    "SMDCallback(include=['layer1.*.weight', ...])."
                )
        elif g is None:
            det.method = "deferred"
            det.error = (
                f"torch.fx could not trace {type(inner).__name__}.forward ({fx_error}); the data flow is recorded from "
                "the first real forward pass instead (pass example_input=... here, or let SMDCallback do it on the first "
                "training batch). If that fails too, name the weights with SMDCallback(include=['layer1.*.weight', ...])."
            )
    units = _analyse(g, params, found_by, prefix, det) if g is not None else []
    named = {prefix + n: p for n, p in params.items()}
    det.units = _apply_overrides(units, named, include, exclude, det)
    if det.method != "deferred":
        _account_for_layers(inner, prefix, g, det)
    if example_input is not None and det.method not in ("none", "deferred"):
        _verify_with_input(model, example_input, det)
    return det


def units_from_patterns(model: nn.Module, include: Sequence[str] | None, exclude: Sequence[str] | None) -> Detection:
    """Units named by ``include`` (minus ``exclude``) only, without analysing the data flow."""
    inner, prefix = _unwrap(model)
    det = Detection(method="include")
    det.units = _apply_overrides([], {prefix + n: p for n, p in inner.named_parameters()}, include, exclude, det)
    return det


def detect_from_graph(model: nn.Module, graph: _Graph, include: Sequence[str] | None, exclude: Sequence[str] | None) -> Detection:
    """Detection from a graph recorded by :class:`DataFlowRecorder` (used by the callback's first batch)."""
    inner, prefix = _unwrap(model)
    params = dict(inner.named_parameters())
    det = Detection(method="run")
    units = _analyse(graph, params, "run", prefix, det)
    det.units = _apply_overrides(units, {prefix + n: p for n, p in params.items()}, include, exclude, det)
    _account_for_layers(inner, prefix, graph, det)
    return det


def _call(model: nn.Module, example_input: Any) -> Any:
    if isinstance(example_input, dict):
        return model(**example_input)
    if isinstance(example_input, tuple):
        return model(*example_input)
    return model(example_input)


def _graph_from_run(model: nn.Module, example_input: Any) -> _Graph:
    with _restored(model), torch.no_grad():
        rec = DataFlowRecorder(dict(model.named_parameters()))
        with rec:
            out = _call(model, example_input)
        return rec.graph(out)


class _restored:
    """Run a model in training mode and restore its mode, buffers, gradients and the random number generators
    afterwards (a dropout in the analysed pass must not change the training that follows)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def __enter__(self) -> None:
        self.modes = {m: m.training for m in self.model.modules()}
        self.buffers = {n: b.detach().clone() for n, b in self.model.named_buffers()}
        self.grads = {p: (p.grad.detach().clone() if p.grad is not None else None) for p in self.model.parameters()}
        cuda = sorted({t.device.index or 0 for t in self.model.parameters() if t.device.type == "cuda"})
        self.rng = torch.random.fork_rng(devices=cuda)
        self.rng.__enter__()
        self.model.train()

    def __exit__(self, *exc: Any) -> None:
        self.rng.__exit__(None, None, None)
        for m, mode in self.modes.items():
            m.train(mode)
        with torch.no_grad():
            for n, b in self.model.named_buffers():
                if n in self.buffers:
                    b.copy_(self.buffers[n])
        for p, grad in self.grads.items():
            p.grad = grad


#: Attributes that hold a normalization's stabilizing epsilon (torch, timm, Hugging Face).
_EPS_ATTRS = ("eps", "variance_epsilon", "epsilon")


class _negligible_eps:
    """Make every normalization's epsilon negligible (1e-12) for the numerical check, and restore it: with its
    real epsilon a normalization of small activations is invariant only approximately (BatchNorm after a Linear:
    |cos| up to 1e-3), and that must not be mistaken for, or hide, a structural violation of 1e-5."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.saved: list[tuple[nn.Module, str, float]] = []

    def __enter__(self) -> None:
        for m in self.model.modules():
            for a in _EPS_ATTRS:
                v = m.__dict__.get(a)
                if isinstance(v, float) and 0.0 < v < 1e-2:
                    self.saved.append((m, a, v))
                    setattr(m, a, 1e-12)

    def __exit__(self, *exc: Any) -> None:
        for m, a, v in self.saved:
            setattr(m, a, v)


def _verify_with_input(model: nn.Module, example_input: Any, det: Detection) -> None:
    inner, prefix = _unwrap(model)
    named = {prefix + n: p for n, p in inner.named_parameters()}
    candidates = {p for u in det.units for p in u.params} | {n for n in det.rejected if n in named}
    with _restored(inner), _negligible_eps(inner):
        for p in inner.parameters():
            p.grad = None
        out = _call(inner, example_input)
        gen = torch.Generator().manual_seed(1234)
        loss = 0.0
        for t in _flatten_args(out):
            if isinstance(t, torch.Tensor) and t.is_floating_point() and t.requires_grad:
                r = torch.randn(t.shape, generator=gen, dtype=torch.float64).to(device=t.device, dtype=t.dtype)
                loss = loss + (t * r).sum()
        if not isinstance(loss, torch.Tensor):
            return
        loss.backward()
        grads = {n: (named[n].grad.detach().clone() if named[n].grad is not None else None) for n in candidates}
    units, rejected = verify_orthogonality(det.units, {n: named[n] for n in candidates}, grads, det.rejected)
    det.units = units
    det.rejected_verification = rejected


def verify_orthogonality(
    units: Sequence[NormalizedWeight],
    params: Mapping[str, torch.Tensor],
    grads: Mapping[str, torch.Tensor | None],
    rejected: Mapping[str, str] | None = None,
) -> tuple[list[NormalizedWeight], dict[str, float]]:
    """Numerical check of scale invariance: ``⟨∇L(W), W⟩ = 0``.

    For each unit, the relative value ``|cos(g, w)|`` is computed per filter, per block of filters and for
    the whole unit. Where the structure fixes the granularity (``refinable`` false: BatchNorm after a conv,
    GroupNorm, LayerNorm over the features) it stands: a gradient can neither refine it nor, near zero, coarsen
    it. Where the structure leaves it open (channels reshaped or split before the normalization: attention heads,
    a pixel shuffle; a weight divided by its own statistics), a granularity that is clearly not invariant
    (above :data:`NOT_ORTHOGONAL_WARNING`) is coarsened to the finest block below
    :data:`ORTHOGONALITY_TOLERANCE`, and a finer one is taken where every block's ``|cos|`` is at the noise
    floor: within 32× what the unit shows where it is invariant (at least 8 ulps of the gradient's dtype).
    ``verification`` is the largest ``|cos|`` at the final granularity. Rejected weights get their
    whole-tensor value. Runs once, off the step
    path; it synchronizes the host.
    """
    out = []
    for u in units:
        ws = [params[n].detach() for n in u.params]
        gs = [grads.get(n) for n in u.params]
        if any(g is None for g in gs) or u.found_by == "include":
            if u.found_by == "include" and not any(g is None for g in gs):
                out.append(replace(u, verification=_whole_cos([w.flatten() for w in ws], [g.flatten() for g in gs])))  # type: ignore[union-attr]
            else:
                out.append(u)
            continue
        rows_w = [_rows(w, u.filter_dim) for w in ws]
        rows_g = [_rows(g, u.filter_dim) for g in gs]  # type: ignore[arg-type]
        n_filters = rows_w[0].shape[0]
        if any(r.shape[0] != n_filters for r in rows_w):
            out.append(replace(u, verification=_whole_cos([w.flatten() for w in ws], [g.flatten() for g in gs])))  # type: ignore[union-attr]
            continue
        w_rows = torch.cat([r.to(torch.float64) for r in rows_w], dim=1)
        g_rows = torch.cat([r.to(torch.float64) for r in rows_g], dim=1)
        if not bool(torch.isfinite(g_rows).all()):
            out.append(u)  # an overflowed gradient (fp16 loss scaling): no verdict from this batch
            continue
        current = {"filter": 1, "group": u.group_size or n_filters, "tensor": n_filters}[u.granularity]
        best = (u.granularity, u.group_size, _block_cos(w_rows, g_rows, current))
        if not u.refinable:
            # the structure fixes the granularity (BatchNorm after a conv, GroupNorm, LayerNorm over the features):
            # a gradient can neither refine it nor, near zero, coarsen it
            out.append(replace(u, verification=best[2]))
            continue
        if best[2] > NOT_ORTHOGONAL_WARNING:
            # clearly not invariant at the structural granularity (channels moved by a reshape or a pixel
            # shuffle before the norm): the finest coarser block that is
            for size in [d for d in _divisors(n_filters) if d > current]:
                c = _block_cos(w_rows, g_rows, size)
                if c <= ORTHOGONALITY_TOLERANCE:
                    best = ("tensor", None, c) if size == n_filters else ("group", size, c)
                    break
        # A finer block is invariant only if its |cos| is at the noise floor of this precision: the floor is what the
        # unit shows where it is invariant (its granularity so far), but never below 256 ulps of the gradient's dtype.
        # What the unit shows is a sum over its blocks of filters whose deviations (a normalization's epsilon, rounding)
        # have random signs: a block of `size` filters shows sqrt(current / size) times more (BatchNorm1d after a
        # Linear, real epsilon: rows at 1e-4 to 9e-4 where the whole weight shows 1e-5).
        current = {"filter": 1, "group": best[1] or n_filters, "tensor": n_filters}[best[0]]
        ulps = 8.0 * torch.finfo(gs[0].dtype).eps  # type: ignore[union-attr]
        for size in [1] + [d for d in _divisors(n_filters) if d < current]:
            if size >= current:
                break
            finer_limit = min(ORTHOGONALITY_TOLERANCE, 32.0 * max(best[2] * math.sqrt(current / size), ulps))
            c = _block_cos(w_rows, g_rows, size)
            if c <= finer_limit:
                best = ("filter", None, c) if size == 1 else ("group", size, c)
                break
        out.append(replace(u, granularity=best[0], group_size=best[1], verification=best[2]))
    rejected_cos: dict[str, float] = {}
    for name in rejected or {}:
        w, g = params.get(name), grads.get(name)
        if w is not None and g is not None:
            rejected_cos[name] = _whole_cos([w.detach().flatten()], [g.flatten()])
    return out, rejected_cos


def _rows(t: torch.Tensor, dim: int) -> torch.Tensor:
    if t.dim() == 0:
        return t.reshape(1, 1)
    if t.dim() == 1:
        return t.reshape(-1, 1)
    return t.movedim(dim, 0).reshape(t.shape[dim], -1)


def _divisors(n: int) -> list[int]:
    return [d for d in range(2, n + 1) if n % d == 0]


def _block_cos(w_rows: torch.Tensor, g_rows: torch.Tensor, size: int) -> float:
    """Largest |cos(g, w)| over contiguous blocks of ``size`` filters (blocks with no gradient skipped)."""
    n = w_rows.shape[0]
    w = w_rows.reshape(n // size, -1)
    g = g_rows.reshape(n // size, -1)
    dots = (w * g).sum(1)
    denom = w.norm(dim=1) * g.norm(dim=1)
    ok = denom > 0
    if not bool(ok.any()):
        return 0.0
    return float((dots[ok].abs() / denom[ok]).max())


def _whole_cos(ws: list[torch.Tensor], gs: list[torch.Tensor]) -> float:
    """``|cos(g, w)|`` of the concatenation of the unit's tensors."""
    w = torch.cat([x.to(torch.float64) for x in ws]).reshape(1, -1)
    g = torch.cat([x.to(torch.float64) for x in gs]).reshape(1, -1)
    return _block_cos(w, g, 1)


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0][:200] if text else ""


def format_detection_table(det: Detection) -> str:
    """A fixed-width table of the tracked units (like Lightning's model summary)."""
    rows = [("name", "shape", "layer", "normalization", "granularity", "found by", "|cos(g,w)|")]
    for u in det.units:
        gran = f"group of {u.group_size}" if u.granularity == "group" and u.group_size else u.granularity
        ver = "-" if u.verification is None else f"{u.verification:.1e}"
        rows.append((u.name, "x".join(map(str, u.shape)), u.layer, u.norm, gran, u.found_by, ver))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)
