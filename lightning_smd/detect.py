"""Which parameters are scale-invariant ("normalized"), at what granularity, and why.

A weight ``W`` is scale-invariant when the model's outputs do not change if ``W`` is multiplied by any
``k > 0``. This module decides that from the model's real data flow, not from module order: it traces
the forward pass with :mod:`torch.fx` and propagates, for each candidate weight, the *degree of
homogeneity* of every value in ``W``:

- a value that does not depend on the scale of ``W`` has degree 0;
- ``conv(x, W)`` has degree 1; positively homogeneous ops (ReLU, pooling, reshapes, dropout, scalar
  multiplication) keep the degree; products add degrees, quotients subtract them;
- a normalization (BatchNorm, GroupNorm, LayerNorm, InstanceNorm, RMSNorm, functional forms) maps any
  non-zero degree back to 0: it absorbs the scale;
- anything else that mixes degrees (a residual addition, a bias added after, a non-homogeneous
  activation before the norm, the model output) breaks invariance.

``W`` is tracked when every output of the forward pass has degree 0 in ``W``. A conv/linear bias that a
per-channel normalization cancels (BatchNorm, InstanceNorm) does not stop its weight from being tracked;
where the bias is not cancelled, the weight and bias are only invariant *together* and become one unit.
"""

from __future__ import annotations

import fnmatch
import math
import operator
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["NormalizedWeight", "Detection", "find_normalized_weights", "format_detection_table"]


@dataclass(frozen=True)
class NormalizedWeight:
    """One tracked unit: a weight (or weight + bias) whose scale the model's output does not see."""

    name: str
    """The unit's name: the weight's parameter name (``+bias`` appended when the bias belongs to it)."""
    params: tuple[str, ...]
    """Parameter names whose concatenation is scale-invariant."""
    shape: tuple[int, ...]
    """Shape of the weight."""
    numel: int
    """Number of elements of the unit (all its parameters)."""
    layer: str
    """The layer using the weight (``Conv2d``, ``linear`` for a functional call, …)."""
    norm: str
    """The normalization(s) that absorb its scale."""
    granularity: str
    """``filter`` (each output filter/row is invariant on its own), ``group`` or ``tensor``."""
    found_by: str
    """``fx`` (traced data flow) or ``include`` (named by the user)."""


@dataclass
class Detection:
    """The outcome of :func:`find_normalized_weights`."""

    units: list[NormalizedWeight] = field(default_factory=list)
    rejected: dict[str, str] = field(default_factory=dict)
    """Conv/linear weights that are *not* tracked, with the reason."""
    method: str = "fx"
    error: str | None = None
    """Why the data flow could not be analysed (then only ``include`` patterns are honoured)."""

    @property
    def names(self) -> list[str]:
        return [u.name for u in self.units]


# ----------------------------------------------------------------------------------------------
# Op semantics
# ----------------------------------------------------------------------------------------------

_LAYER_MODULES: tuple[type[nn.Module], ...] = (
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
    nn.Linear,
)
_LAYER_FUNCTIONS = {
    F.conv1d: "conv1d",
    F.conv2d: "conv2d",
    F.conv3d: "conv3d",
    F.conv_transpose1d: "conv_transpose1d",
    F.conv_transpose2d: "conv_transpose2d",
    F.conv_transpose3d: "conv_transpose3d",
    F.linear: "linear",
}

# Normalization kind -> (granularity of the invariance it gives, cancels a per-channel constant?)
_NORM_KINDS = {
    "batch": ("filter", True),
    "instance": ("filter", True),
    "group": ("group", False),
    "layer": ("tensor", False),
    "rms": ("tensor", False),
}


def _norm_modules() -> dict[type[nn.Module], str]:
    table: dict[type[nn.Module], str] = {
        nn.BatchNorm1d: "batch",
        nn.BatchNorm2d: "batch",
        nn.BatchNorm3d: "batch",
        nn.SyncBatchNorm: "batch",
        nn.InstanceNorm1d: "instance",
        nn.InstanceNorm2d: "instance",
        nn.InstanceNorm3d: "instance",
        nn.GroupNorm: "group",
        nn.LayerNorm: "layer",
    }
    rms = getattr(nn, "RMSNorm", None)
    if rms is not None:
        table[rms] = "rms"
    return table


_NORM_MODULES = _norm_modules()
_NORM_FUNCTIONS: dict[Any, str] = {
    F.batch_norm: "batch",
    F.instance_norm: "instance",
    F.group_norm: "group",
    F.layer_norm: "layer",
}
if hasattr(F, "rms_norm"):
    _NORM_FUNCTIONS[F.rms_norm] = "rms"

# Positively homogeneous of degree 1 in their first tensor argument (f(kx) = k f(x), k > 0).
_HOMOGENEOUS_MODULES: tuple[type[nn.Module], ...] = (
    nn.ReLU,
    nn.LeakyReLU,
    nn.PReLU,
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.MaxPool3d,
    nn.AvgPool1d,
    nn.AvgPool2d,
    nn.AvgPool3d,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d,
    nn.AdaptiveMaxPool3d,
    nn.Flatten,
    nn.Unflatten,
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.Identity,
    nn.ZeroPad1d if hasattr(nn, "ZeroPad1d") else nn.Identity,
    nn.ZeroPad2d,
    nn.PixelShuffle,
    nn.PixelUnshuffle,
    nn.Upsample,
)
# Ops that also commute with adding a per-channel constant (so a bias before them stays cancellable).
_BIAS_TRANSPARENT_MODULES: tuple[type[nn.Module], ...] = (
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.MaxPool3d,
    nn.AvgPool1d,
    nn.AvgPool2d,
    nn.AvgPool3d,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d,
    nn.AdaptiveMaxPool3d,
    nn.Identity,
)
_HOMOGENEOUS_FUNCTIONS: set[Any] = {
    torch.relu,
    F.relu,
    F.leaky_relu,
    F.prelu,
    F.max_pool1d,
    F.max_pool2d,
    F.max_pool3d,
    F.avg_pool1d,
    F.avg_pool2d,
    F.avg_pool3d,
    F.adaptive_avg_pool1d,
    F.adaptive_avg_pool2d,
    F.adaptive_avg_pool3d,
    F.adaptive_max_pool1d,
    F.adaptive_max_pool2d,
    F.adaptive_max_pool3d,
    F.dropout,
    F.dropout1d,
    F.dropout2d,
    F.dropout3d,
    F.pad,
    F.interpolate,
    torch.flatten,
    torch.reshape,
    torch.permute,
    torch.transpose,
    torch.squeeze,
    torch.unsqueeze,
    torch.neg,
    torch.mean,
    torch.sum,
    torch.amax,
    torch.amin,
    torch.narrow,
    torch.chunk,
    torch.split,
    torch.roll,
    operator.getitem,
    operator.neg,
    operator.pos,
}
_BIAS_TRANSPARENT_FUNCTIONS: set[Any] = {
    F.max_pool1d,
    F.max_pool2d,
    F.max_pool3d,
    F.avg_pool1d,
    F.avg_pool2d,
    F.avg_pool3d,
    F.adaptive_avg_pool1d,
    F.adaptive_avg_pool2d,
    F.adaptive_avg_pool3d,
    F.adaptive_max_pool1d,
    F.adaptive_max_pool2d,
    F.adaptive_max_pool3d,
}
_HOMOGENEOUS_METHODS = {
    "relu",
    "relu_",
    "view",
    "view_as",
    "reshape",
    "reshape_as",
    "flatten",
    "unflatten",
    "permute",
    "transpose",
    "t",
    "contiguous",
    "squeeze",
    "unsqueeze",
    "expand",
    "expand_as",
    "repeat",
    "neg",
    "mean",
    "sum",
    "amax",
    "amin",
    "narrow",
    "chunk",
    "split",
    "roll",
    "clone",
    "detach",
    "float",
    "to",
    "type_as",
    "__getitem__",
}
_META_METHODS = {"size", "dim", "numel", "type", "__len__"}
_META_ATTRS = {"shape", "dtype", "device", "ndim", "is_cuda", "requires_grad"}
# Degree multipliers: f(kx) = k^p f(x).
_POWER_METHODS = {"sqrt": 0.5, "rsqrt": -0.5, "reciprocal": -1.0, "norm": 1.0, "std": 1.0, "var": 2.0, "abs": 1.0, "square": 2.0}
_POWER_FUNCTIONS = {
    torch.sqrt: 0.5,
    torch.rsqrt: -0.5,
    torch.reciprocal: -1.0,
    torch.norm: 1.0,
    torch.std: 1.0,
    torch.var: 2.0,
    torch.abs: 1.0,
    torch.square: 2.0,
    torch.linalg.vector_norm: 1.0,
    operator.abs: 1.0,
}


# ----------------------------------------------------------------------------------------------
# The degree lattice
# ----------------------------------------------------------------------------------------------
# A value is one of:
#   0.0            independent of the unit's scale
#   d (float != 0) positively homogeneous of degree d
#   _AFF           degree 1 plus a per-channel constant (a layer's bias, analysing the weight alone)
#   _BROKEN        depends on the scale in any other way
_AFF = "aff"
_BROKEN = "broken"

Value = Any  # float | str


def _is_broken(v: Value) -> bool:
    return v == _BROKEN


def _degree_of_product(a: Value, b: Value) -> Value:
    if a == 0.0:
        return b if b != _AFF else _BROKEN
    if b == 0.0:
        return a if a != _AFF else _BROKEN
    if isinstance(a, float) and isinstance(b, float):
        return _nz(a + b)
    return _BROKEN


def _nz(d: float) -> Value:
    return 0.0 if abs(d) < 1e-12 else d


def _degree_of_sum(values: Sequence[Value]) -> Value:
    values = list(values)
    if not values:
        return 0.0
    first = values[0]
    if any(v != first for v in values[1:]):
        return _BROKEN
    return first


@dataclass
class _Op:
    kind: str  # param | layer | norm | unary | power | mul | div | add | cat | meta | output | module_opaque | other
    args: list[Any]  # fx nodes / constants in order
    label: str = ""
    norm_kind: str = ""
    transparent: bool = False  # unary: commutes with a per-channel constant
    power: float = 1.0
    weight: Any = None  # layer: param name (call_module) or node (functional)
    bias: Any = None
    params: tuple[str, ...] = ()  # params used by an opaque module


def _classify(node: torch.fx.Node, modules: dict[str, nn.Module], pname: dict[int, str]) -> _Op:
    op = node.op
    if op == "placeholder":
        return _Op("other", [], label="input")
    if op == "get_attr":
        return _Op("param", [], label=str(node.target))
    if op == "output":
        return _Op("output", list(_flatten(node.args)), label="output")
    if op == "call_module":
        mod = modules[str(node.target)]
        label = type(mod).__name__
        tensor_args = list(_flatten(node.args)) + list(_flatten(node.kwargs.values()))
        if isinstance(mod, _LAYER_MODULES):
            w = pname.get(id(mod.weight)) if isinstance(getattr(mod, "weight", None), torch.Tensor) else None
            b = pname.get(id(mod.bias)) if isinstance(getattr(mod, "bias", None), torch.Tensor) else None
            return _Op("layer", [node.args[0]] if node.args else tensor_args[:1], label=label, weight=w, bias=b)
        for cls, kind in _NORM_MODULES.items():
            if type(mod) is cls or isinstance(mod, cls):
                own = tuple(pname[id(p)] for p in mod.parameters(recurse=True) if id(p) in pname)
                return _Op("norm", tensor_args[:1], label=label, norm_kind=kind, params=own)
        if isinstance(mod, _HOMOGENEOUS_MODULES) and not isinstance(mod, nn.PReLU):
            return _Op("unary", tensor_args[:1], label=label, transparent=isinstance(mod, _BIAS_TRANSPARENT_MODULES))
        own = tuple(pname[id(p)] for p in mod.parameters(recurse=True) if id(p) in pname)
        if isinstance(mod, nn.PReLU):
            return _Op("unary", tensor_args[:1], label=label, params=own)
        return _Op("module_opaque", tensor_args, label=label, params=own)
    if op == "call_function":
        fn = node.target
        name = getattr(fn, "__name__", str(fn))
        args = list(node.args)
        if fn in _LAYER_FUNCTIONS:
            x = args[0] if args else node.kwargs.get("input")
            w = args[1] if len(args) > 1 else node.kwargs.get("weight")
            b = args[2] if len(args) > 2 else node.kwargs.get("bias")
            return _Op("layer", [x], label=_LAYER_FUNCTIONS[fn], weight=w, bias=b)
        if fn in _NORM_FUNCTIONS:
            rest = [a for a in list(_flatten(args[1:])) + list(_flatten(node.kwargs.values()))]
            return _Op("norm", [args[0]] + rest, label=name, norm_kind=_NORM_FUNCTIONS[fn])
        if fn is getattr and len(args) > 1 and args[1] in _META_ATTRS:
            return _Op("meta", [], label=f"getattr.{args[1]}")
        if fn in _HOMOGENEOUS_FUNCTIONS:
            return _Op("unary", args[:1], label=name, transparent=fn in _BIAS_TRANSPARENT_FUNCTIONS)
        if fn in _POWER_FUNCTIONS:
            return _Op("power", args[:1], label=name, power=_POWER_FUNCTIONS[fn])
        if fn in (operator.mul, torch.mul, operator.matmul, torch.matmul, torch.bmm, torch.mm, torch.einsum):
            if fn is torch.einsum:
                return _Op("mul", list(_flatten(args[1:])), label=name)
            return _Op("mul", args[:2], label=name)
        if fn in (operator.truediv, torch.div, torch.true_divide):
            return _Op("div", args[:2], label=name)
        if fn in (operator.add, operator.sub, torch.add, torch.sub):
            return _Op("add", args[:2], label=name)
        if fn is operator.pow or fn is torch.pow:
            if len(args) > 1 and isinstance(args[1], (int, float)):
                return _Op("power", args[:1], label=name, power=float(args[1]))
        if fn in (torch.cat, torch.concat, torch.stack):
            return _Op("cat", list(_flatten(args[:1])), label=name)
        return _Op("other", list(_flatten(args)) + list(_flatten(node.kwargs.values())), label=name)
    if op == "call_method":
        method = str(node.target)
        args = list(node.args)
        if method in _META_METHODS:
            return _Op("meta", [], label=method)
        if method in _HOMOGENEOUS_METHODS:
            return _Op("unary", args[:1], label=method)
        if method in _POWER_METHODS:
            return _Op("power", args[:1], label=method, power=_POWER_METHODS[method])
        if method in ("mul", "mul_", "matmul", "bmm", "mm", "__mul__", "__rmul__"):
            return _Op("mul", args[:2], label=method)
        if method in ("div", "div_", "__truediv__"):
            return _Op("div", args[:2], label=method)
        if method in ("add", "add_", "sub", "sub_", "__add__", "__sub__"):
            return _Op("add", args[:2], label=method)
        if method == "pow" and len(args) > 1 and isinstance(args[1], (int, float)):
            return _Op("power", args[:1], label=method, power=float(args[1]))
        return _Op("other", list(_flatten(args)) + list(_flatten(node.kwargs.values())), label=method)
    return _Op("other", list(_flatten(node.args)), label=str(node.target))


def _flatten(obj: Any) -> Iterable[Any]:
    if isinstance(obj, (list, tuple)):
        for item in obj:
            yield from _flatten(item)
    elif isinstance(obj, dict):
        for item in obj.values():
            yield from _flatten(item)
    elif isinstance(obj, slice):
        yield from _flatten((obj.start, obj.stop, obj.step))
    else:
        yield obj


# ----------------------------------------------------------------------------------------------
# Graph analysis
# ----------------------------------------------------------------------------------------------


class _Graph:
    """An fx graph with each node classified once, ready for one propagation per candidate unit."""

    def __init__(self, graph: torch.fx.Graph, modules: dict[str, nn.Module], pname: dict[int, str], root: nn.Module):
        self.nodes = list(graph.nodes)
        self.index = {n: i for i, n in enumerate(self.nodes)}
        self.ops = [_classify(n, modules, pname) for n in self.nodes]
        self.users = [[self.index[u] for u in n.users] for n in self.nodes]
        # get_attr nodes that read a parameter: node index -> canonical parameter name
        self.param_nodes: dict[int, str] = {}
        for i, (node, op) in enumerate(zip(self.nodes, self.ops)):
            if op.kind == "param":
                obj = _resolve_attr(root, str(node.target))
                if isinstance(obj, torch.Tensor) and id(obj) in pname:
                    self.param_nodes[i] = pname[id(obj)]
        # Which nodes use which parameter directly (layers via call_module, opaque modules, norms)
        self.param_users: dict[str, list[int]] = {}
        for i, op in enumerate(self.ops):
            names: list[str] = []
            if op.kind == "layer":
                names += [p for p in (op.weight, op.bias) if isinstance(p, str)]
            names += list(op.params)
            for p in names:
                self.param_users.setdefault(p, []).append(i)
        for i, p in self.param_nodes.items():
            self.param_users.setdefault(p, []).append(i)

    def layers_of(self, pname: str) -> list[int]:
        """Layer nodes that use ``pname`` as their weight (directly or through a get_attr node)."""
        out = []
        for i, op in enumerate(self.ops):
            if op.kind != "layer":
                continue
            w = op.weight
            if w == pname or (isinstance(w, torch.fx.Node) and self.param_nodes.get(self.index[w]) == pname):
                out.append(i)
        return out

    def bias_of(self, layer_index: int) -> str | None:
        b = self.ops[layer_index].bias
        if isinstance(b, str):
            return b
        if isinstance(b, torch.fx.Node):
            return self.param_nodes.get(self.index[b])
        return None

    def _ref_degree(self, ref: Any, unit: set[str], val: Any) -> Value:
        """Degree of a layer's weight/bias reference: a parameter name (call_module) or an fx node."""
        if isinstance(ref, str):
            return 1.0 if ref in unit else 0.0
        if isinstance(ref, torch.fx.Node):
            return val(ref)
        return 0.0

    def propagate(self, unit: set[str], weight_only_bias: str | None) -> tuple[bool, str, set[tuple[str, str]]]:
        """Propagate the degree of every value in the scale of ``unit``.

        ``weight_only_bias``: the bias of the unit's layer when analysing the weight alone (the layer's
        output is then degree 1 plus a per-channel constant). Returns (invariant, first breaking op,
        normalizations that absorbed the scale).
        """
        start = [i for p in unit for i in self.param_users.get(p, [])]
        if not start:
            return False, "not used in the forward pass", set()
        reach: set[int] = set()
        stack = list(start)
        while stack:
            i = stack.pop()
            if i in reach:
                continue
            reach.add(i)
            stack.extend(self.users[i])
        value: dict[int, Value] = {}
        norms: set[tuple[str, str]] = set()

        def val(a: Any) -> Value:
            if isinstance(a, torch.fx.Node):
                return value.get(self.index[a], 0.0)
            return 0.0

        for i in sorted(reach):
            op = self.ops[i]
            if op.kind == "param":
                v: Value = 1.0 if self.param_nodes.get(i) in unit else 0.0
            elif op.kind == "layer":
                w = self._ref_degree(op.weight, unit, val)
                x = val(op.args[0]) if op.args else 0.0
                core = _degree_of_product(x, w)
                if op.bias is None:
                    v = core
                else:
                    b = self._ref_degree(op.bias, unit, val)
                    bias_name = op.bias if isinstance(op.bias, str) else self.param_nodes.get(self.index[op.bias])
                    if core == b:
                        v = core
                    elif core == 1.0 and b == 0.0 and bias_name is not None and bias_name == weight_only_bias:
                        v = _AFF
                    else:
                        v = _BROKEN
            elif op.kind == "norm":
                x = val(op.args[0]) if op.args else 0.0
                others = [val(a) for a in op.args[1:]]
                if any(o != 0.0 for o in others) or any(p in unit for p in op.params):
                    v = _BROKEN
                elif x == 0.0:
                    v = 0.0
                elif x == _AFF:
                    v = 0.0 if _NORM_KINDS[op.norm_kind][1] else _BROKEN
                    if v == 0.0:
                        norms.add((op.label, op.norm_kind))
                elif x == _BROKEN:
                    v = _BROKEN
                else:
                    v = 0.0
                    norms.add((op.label, op.norm_kind))
            elif op.kind == "unary":
                x = val(op.args[0]) if op.args else 0.0
                if any(p in unit for p in op.params):
                    v = _BROKEN
                elif x == _AFF and not op.transparent:
                    v = _BROKEN
                else:
                    v = x
            elif op.kind == "power":
                x = val(op.args[0]) if op.args else 0.0
                v = _nz(x * op.power) if isinstance(x, float) else _BROKEN
            elif op.kind == "mul":
                v = 0.0
                for a in op.args:
                    v = _degree_of_product(v, val(a))
            elif op.kind == "div":
                a = val(op.args[0]) if op.args else 0.0
                b2 = val(op.args[1]) if len(op.args) > 1 else 0.0
                v = _degree_of_product(a, -b2 if isinstance(b2, float) else _BROKEN)
            elif op.kind == "add":
                vals = [val(a) for a in op.args]
                consts = [a for a in op.args if not isinstance(a, torch.fx.Node)]
                if consts and any(c != 0 for c in consts if isinstance(c, (int, float))) and any(x != 0.0 for x in vals):
                    v = _BROKEN
                else:
                    v = _degree_of_sum([x for a, x in zip(op.args, vals) if isinstance(a, torch.fx.Node)])
            elif op.kind == "cat":
                v = _degree_of_sum([val(a) for a in op.args if isinstance(a, torch.fx.Node)])
            elif op.kind == "meta":
                v = 0.0
            elif op.kind == "output":
                bad = [a for a in op.args if isinstance(a, torch.fx.Node) and val(a) != 0.0]
                if bad:
                    return False, _explain(self, bad[0], value), norms
                continue
            else:  # other / module_opaque: fine only when nothing it reads depends on the scale
                if any(p in unit for p in op.params) or any(val(a) != 0.0 for a in op.args):
                    v = _BROKEN
                else:
                    v = 0.0
            value[i] = v
        return True, "", norms


def _explain(g: _Graph, node: torch.fx.Node, value: dict[int, Value]) -> str:
    """Name the op where the scale stopped being absorbed."""
    # Walk back from the offending output to the earliest node whose value is broken.
    i = g.index[node]
    seen = set()
    while i not in seen:
        seen.add(i)
        op = g.ops[i]
        if value.get(i) != _BROKEN:
            return f"its scale reaches the model output through {op.label or g.nodes[i].name} without a normalization"
        preds = [a for a in op.args if isinstance(a, torch.fx.Node) and value.get(g.index[a]) == _BROKEN]
        if not preds:
            kind = {
                "add": "an addition (e.g. a residual connection or a bias added after it) mixes it with a term of another scale",
                "layer": "a bias is added that no normalization cancels",
                "cat": "it is concatenated with values of another scale",
            }.get(op.kind, "this op is not positively homogeneous")
            return f"not scale-invariant at {g.nodes[i].name} ({op.label}): {kind}"
        i = g.index[preds[0]]
    return "not scale-invariant"


def _resolve_attr(root: nn.Module, target: str) -> Any:
    obj: Any = root
    for part in target.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


# ----------------------------------------------------------------------------------------------
# Public entry point
# ----------------------------------------------------------------------------------------------


def _unwrap(model: nn.Module) -> tuple[nn.Module, str]:
    """Strip wrappers whose parameters live under a prefix (``torch.compile``'s ``_orig_mod``)."""
    prefix = ""
    while hasattr(model, "_orig_mod") and isinstance(getattr(model, "_orig_mod"), nn.Module):
        model = model._orig_mod  # type: ignore[assignment]
        prefix += "_orig_mod."
    return model, prefix


def find_normalized_weights(
    model: nn.Module,
    example_input: Any = None,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
) -> Detection:
    """Find the scale-invariant weights of ``model`` from its traced data flow.

    Args:
        model: any ``nn.Module`` (a LightningModule included); its ``forward`` is traced with torch.fx.
        example_input: reserved for the run-time fallback for models fx cannot trace.
        include: parameter-name globs to track in addition (``"encoder.*.weight"``) — the way out when
            detection cannot see a weight's normalization.
        exclude: parameter-name globs never to track.

    Returns:
        A :class:`Detection` with the tracked units, and the conv/linear weights not tracked with the reason.
        It never raises for a model it cannot analyse: ``error`` then says why.
    """
    inner, prefix = _unwrap(model)
    pname: dict[int, str] = {}
    params: dict[str, nn.Parameter] = {}
    for name, p in inner.named_parameters():
        pname[id(p)] = name
        params[name] = p
    det = Detection()
    try:
        graph = torch.fx.Tracer().trace(inner)
        g = _Graph(graph, dict(inner.named_modules()), pname, inner)
    except Exception as err:  # noqa: BLE001 - any tracing failure means "fall back", never crash training
        det.method = "none"
        det.error = (
            f"torch.fx could not trace {type(inner).__name__}.forward ({type(err).__name__}: {_first_line(err)}). "
            "Name the normalized weights yourself with SMDCallback(include=['layer1.*.weight', ...])."
        )
        g = None

    units: list[NormalizedWeight] = []
    if g is not None:
        candidates: list[str] = []
        for i, op in enumerate(g.ops):
            if op.kind != "layer":
                continue
            w = op.weight if isinstance(op.weight, str) else (g.param_nodes.get(g.index[op.weight]) if isinstance(op.weight, torch.fx.Node) else None)
            if w is not None and w not in candidates:
                candidates.append(w)
        for w in candidates:
            p = params[w]
            if not p.requires_grad:
                det.rejected[prefix + w] = "frozen (requires_grad=False)"
                continue
            layer_nodes = g.layers_of(w)
            biases = {g.bias_of(i) for i in layer_nodes}
            bias = next(iter(biases)) if len(biases) == 1 else None
            label = g.ops[layer_nodes[0]].label if layer_nodes else "?"
            ok, why, norms = g.propagate({w}, weight_only_bias=bias)
            unit_params: tuple[str, ...] = (w,)
            if not ok and bias is not None and params[bias].requires_grad:
                ok2, _, norms2 = g.propagate({w, bias}, weight_only_bias=None)
                if ok2:
                    ok, norms, unit_params = True, norms2, (w, bias)
            if not ok:
                det.rejected[prefix + w] = why
                continue
            granularity = _coarsest({kind for _, kind in norms})
            numel = sum(params[n].numel() for n in unit_params)
            name = prefix + w + ("+bias" if len(unit_params) > 1 else "")
            units.append(
                NormalizedWeight(
                    name=name,
                    params=tuple(prefix + n for n in unit_params),
                    shape=tuple(p.shape),
                    numel=numel,
                    layer=label,
                    norm="+".join(sorted({label for label, _ in norms})),
                    granularity=granularity,
                    found_by="fx",
                )
            )
    det.units = _apply_overrides(units, model, include, exclude, det)
    return det


def _apply_overrides(
    units: list[NormalizedWeight],
    model: nn.Module,
    include: Sequence[str] | None,
    exclude: Sequence[str] | None,
    det: Detection,
) -> list[NormalizedWeight]:
    named = dict(model.named_parameters())
    out = list(units)
    have = {p for u in out for p in u.params}
    for pattern in include or ():
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


def _coarsest(kinds: set[str]) -> str:
    order = {"filter": 0, "group": 1, "tensor": 2}
    grans = [_NORM_KINDS[k][0] for k in kinds if k in _NORM_KINDS] or ["tensor"]
    return max(grans, key=order.__getitem__)


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0][:200] if text else ""


def format_detection_table(det: Detection) -> str:
    """A fixed-width table of the tracked units (like Lightning's model summary)."""
    rows = [("name", "shape", "layer", "normalization", "granularity", "found by")]
    for u in det.units:
        rows.append((u.name, "x".join(map(str, u.shape)), u.layer, u.norm, u.granularity, u.found_by))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)
