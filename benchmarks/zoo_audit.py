"""Audit of the detector of scale-invariant weights against a numerical ground truth, over a zoo of real
architectures from torchvision, timm and Hugging Face transformers (built at random init, no downloads).

    python benchmarks/zoo_audit.py                          # every model, then a Markdown table
    python benchmarks/zoo_audit.py --quick                  # a CI-size subset (about 8 small models)
    python benchmarks/zoo_audit.py --models resnet18,tm_nf_resnet26 --json /tmp/zoo.json
    python benchmarks/zoo_audit.py --list                   # the model names
    python benchmarks/zoo_audit.py --selftest               # the ground truths on hand-made cases
    python benchmarks/zoo_audit.py --groups [--quick]       # the audit of the param groups instead (below)

For every model, ``find_normalized_weights(model, example_input)`` runs on the model as a user would have it
(float32, default epsilons; timed with 2 threads) and is compared, weight by weight, with the ground truth.

Ground truth (written here from scratch; it shares no code with ``lightning_smd.engine.detect``). It is computed on
a deep copy of the model, converted to float64, in train mode, with every dropout / drop-path rate set to 0
and every normalization epsilon (module attributes ``eps``, ``variance_epsilon``, ``epsilon``,
``layer_norm_eps``, ``norm_eps``, ``rms_norm_eps``) set to 1e-30, so that invariance is exact up to
round-off. Parameters whose entries are all equal (zero-initialized biases and gains, BatchNorm's ones,
layer scales of 1e-6) first get random noise of standard deviation ``0.1 * max(|value|, 1)``: the truth is
taken at a *generic* parameter point, so that a zero bias, a zero residual gain or a 1e-6 layer scale cannot
make a weight look (nearly) invariant by accident. The forward passes run in float64 throughout (explicit
float32 casts inside the model, as in Hugging Face norms, are kept in float64 too).

Candidates are the ``weight`` parameters (with ``requires_grad``) of ``nn.Conv1d/2d/3d``,
``nn.ConvTranspose1d/2d/3d`` and ``nn.Linear`` modules (subclasses included) and of Hugging Face ``Conv1D``.
Their filters lie along dim 0, or dim 1 for transposed convs and ``Conv1D``. With ``L = <r, out>`` (``out``
every floating tensor of the model's output, flattened; ``r`` a fixed random vector) and ``g = dL/dW``:

1. Euler test: a weight invariant under scaling a block of filters has ``<g_b, W_b> = 0`` for that block.
   ``|cos(g_b, W_b)|`` is computed for every block size ``d`` dividing the number of filters ``F`` (the
   blocks are the contiguous filters ``[k d, (k+1) d)``); ``d`` passes when every block has
   ``|cos| < 1e-6``.
2. Scaling test, for the smallest ``d`` that passes (the next one if it fails): block 0 and one other
   random block (when there are several) are multiplied by 1.7, one at a time; the output must stay put,
   ``max|out' - out| / max|out| < 1e-7``.

The smallest confirmed ``d`` gives the granularity: ``filter`` (d = 1), ``tensor`` (d = F), else ``group``
of d. When ``W`` alone is not invariant even at d = F and the layer has a bias, ``(W, bias)`` is tested the
same way, the bias entries scaling with their filters: a pass makes the unit ``weight+bias``. A weight that
gets no gradient at all is reported as ``unused`` and left out of the scores.

Scores per model: precision and recall of the tracked weights, whether the unit (weight vs weight+bias) and
the granularity agree on the correctly tracked ones, and how many candidates are neither in a unit nor in
``Detection.rejected`` ("unaccounted").

``--groups`` audits ``lightning_smd.engine.groups`` instead. Its ground truth of normalization gains and shifts
(:func:`norm_truth`, sharing no code with groups.py) works on the same float64 reference copy: every module that
owns parameters directly (conv / linear / embedding layers left out) is called again on its own, on the inputs its
first call got, with its first tensor input scaled by 1.7; a module whose output does not move (< 1e-7 relative),
but does under a generic change of that input, and in which no other module owns parameters, is a normalization
layer, and its direct parameters are gains and shifts. Then, per model, ``audit_groups`` (with the detector's
units as ``normalized=``) on AdamW over timm's default groups (``param_groups_weight_decay`` with the
model's ``no_weight_decay()``), nanoGPT's (weight decay on dim >= 2) and ``lightning_smd.param_groups()``, each of
which should give no finding; and on ``SGD(model.parameters(), weight_decay=5e-4)``, where the audit should name
every gain and shift of the truth (recall).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import random
import sys
import time
import traceback
import types
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

EPS_ATTRS = ("eps", "variance_epsilon", "epsilon", "layer_norm_eps", "norm_eps", "rms_norm_eps")
COS_TOL = 1e-6
CHANGE_TOL = 1e-7
SCALE = 1.7
BATCH = 4


def _import_torchvision_models() -> Any:
    """Import ``torchvision.models``, or return None when torchvision is not installed.

    The torchvision wheel in this environment is a CUDA build on top of a CPU-only torch: importing it fails
    in ``torchvision._meta_registrations`` (``operator torchvision::nms does not exist``), because the compiled
    detection ops it registers fake/autograd kernels for are missing. The model definitions are pure Python
    and need none of that, so the two registration modules are replaced by empty ones before the import.
    timm imports torchvision too, so this must run before timm is imported.
    """
    for name in ("torchvision._meta_registrations", "torchvision._autograd_registrations"):
        sys.modules.setdefault(name, types.ModuleType(name))
    try:
        import torchvision.models
    except ImportError:
        return None
    return torchvision.models


# ----------------------------------------------------------------------------------------------
# Ground truth
# ----------------------------------------------------------------------------------------------


@dataclass
class Truth:
    """The ground truth for one candidate weight."""

    status: str  # "invariant" | "not invariant" | "unused"
    filters: int
    unit: str | None = None  # "weight" | "weight+bias"
    block: int | None = None  # the smallest invariant block size d
    # invariant: the largest |cos| over the blocks at d; not invariant: the smallest, over block sizes (and over
    # weight / weight+bias), of the largest block |cos| (how close the weight came to passing the Euler test)
    cos: float | None = None
    change: float | None = None  # largest relative output change of the scaling tests at d
    note: str = ""

    @property
    def granularity(self) -> tuple[str, int | None] | None:
        if self.block is None:
            return None
        return _kind(self.block, self.filters)

    def describe(self) -> str:
        if self.status != "invariant":
            extra = f", best block |cos| {self.cos:.1e}" if self.cos is not None else ""
            return f"{self.status}{extra}{'; ' + self.note if self.note else ''}"
        kind, size = self.granularity  # type: ignore[misc]
        gran = f"group of {size}" if kind == "group" else kind
        return f"invariant as {self.unit}, {gran} (F={self.filters})"


def _kind(block: int, filters: int) -> tuple[str, int | None]:
    if block == filters:
        return ("tensor", None)
    if block == 1:
        return ("filter", None)
    return ("group", block)


def _is_candidate_layer(mod: nn.Module) -> bool:
    if isinstance(mod, (nn.modules.conv._ConvNd, nn.Linear)):
        return True
    return _is_hf_conv1d(mod)


def _is_hf_conv1d(mod: nn.Module) -> bool:
    # transformers' GPT-2 style Conv1D: a linear layer whose weight is stored (in, out).
    return type(mod).__name__ == "Conv1D" and type(mod).__module__.startswith("transformers")


def _filter_dim(mod: nn.Module) -> int:
    return 1 if isinstance(mod, nn.modules.conv._ConvTransposeNd) or _is_hf_conv1d(mod) else 0


def candidates(model: nn.Module) -> dict[str, tuple[nn.Module, int]]:
    """Candidate weight name -> (its layer module, its filter dim)."""
    pname = {id(p): n for n, p in model.named_parameters()}
    found: dict[str, tuple[nn.Module, int]] = {}
    for mod in model.modules():
        w = getattr(mod, "weight", None)
        if _is_candidate_layer(mod) and isinstance(w, nn.Parameter) and w.requires_grad and id(w) in pname:
            found.setdefault(pname[id(w)], (mod, _filter_dim(mod)))
    return found


def call(model: nn.Module, inp: Any) -> Any:
    if isinstance(inp, Mapping):
        return model(**inp)
    if isinstance(inp, tuple):
        return model(*inp)
    return model(inp)


def flat_output(out: Any) -> torch.Tensor:
    """Every floating tensor of a model output (tensor, tuple, list, dict, HF ModelOutput), as one vector."""
    parts: list[torch.Tensor] = []

    def visit(o: Any) -> None:
        if isinstance(o, torch.Tensor):
            if o.is_floating_point():
                parts.append(o.reshape(-1))
        elif isinstance(o, Mapping):  # HF ModelOutput is an OrderedDict of its non-None fields
            for v in o.values():
                visit(v)
        elif isinstance(o, (list, tuple)):
            for v in o:
                visit(v)
        elif hasattr(o, "to_tuple"):
            visit(o.to_tuple())

    visit(out)
    if not parts:
        raise RuntimeError("the model output holds no floating tensor")
    return torch.cat(parts)


def to_float64(inp: Any) -> Any:
    if isinstance(inp, torch.Tensor):
        return inp.double() if inp.is_floating_point() else inp
    if isinstance(inp, Mapping):
        return {k: to_float64(v) for k, v in inp.items()}
    if isinstance(inp, tuple):
        return tuple(to_float64(v) for v in inp)
    return inp


def reference_copy(model: nn.Module, seed: int = 1) -> nn.Module:
    """float64 train-mode copy, no dropout, ~zero epsilons, constant parameters perturbed (see the docstring)."""
    ref = copy.deepcopy(model).double().train()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in ref.parameters():
            if p.numel() and p.is_floating_point() and bool((p == p.reshape(-1)[0]).all()):
                c = abs(float(p.reshape(-1)[0]))
                p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.1 * max(c, 1.0))
    disable_dropout(ref)
    for mod in ref.modules():
        for attr, val in list(vars(mod).items()):
            if isinstance(val, float) and attr in EPS_ATTRS:
                setattr(mod, attr, 1e-30)
    return ref


def disable_dropout(model: nn.Module) -> nn.Module:
    """Set every dropout / drop-path / stochastic-depth rate to 0 (float attributes only)."""
    for mod in model.modules():
        cls = type(mod).__name__.lower()
        dropout_like = "drop" in cls or "stochastic" in cls
        for attr, val in list(vars(mod).items()):
            if isinstance(val, float) and ("drop" in attr.lower() or (attr == "p" and dropout_like)):
                setattr(mod, attr, 0.0)
    return model


_LOW_PRECISION = (torch.float32, torch.float16, torch.bfloat16)
_DOWNCASTS = (torch.Tensor.float, torch.Tensor.half, torch.Tensor.bfloat16)


class _StayFloat64(TorchFunctionMode):
    """Keeps a float64 forward pass in float64.

    Hugging Face norms (``LlamaRMSNorm``, ``T5LayerNorm``, Gemma's …) and rotary embeddings compute in an
    explicit ``float32``, which in a float64 copy is a downcast: its ~1e-7 round-off would hide the exactness of
    invariance. Within this mode every requested float32/float16/bfloat16 dtype (``.to``, ``.float()``,
    factories, ``softmax(dtype=...)``) becomes float64; factories without a dtype follow the default dtype,
    set to float64 by :func:`_float64`.
    """

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        if func in _DOWNCASTS:
            func = torch.Tensor.double
        args = tuple(torch.float64 if isinstance(a, torch.dtype) and a in _LOW_PRECISION else a for a in args)
        kwargs = dict(kwargs or {})
        if isinstance(kwargs.get("dtype"), torch.dtype) and kwargs["dtype"] in _LOW_PRECISION:
            kwargs["dtype"] = torch.float64
        return func(*args, **kwargs)


class _float64:  # used like a function: ``with _float64(): ...``
    def __enter__(self) -> None:
        self.default = torch.get_default_dtype()
        torch.set_default_dtype(torch.float64)
        self.mode = _StayFloat64()
        self.mode.__enter__()

    def __exit__(self, *exc: object) -> None:
        self.mode.__exit__(*exc)
        torch.set_default_dtype(self.default)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def block_cos(w: torch.Tensor, g: torch.Tensor, fdim: int, b: torch.Tensor | None = None,
              gb: torch.Tensor | None = None) -> dict[int, float]:
    """Block size d -> max over blocks of |cos(g_b, W_b)| (bias entries joined to their filters if given)."""
    n = w.shape[fdim]
    wf = w.detach().movedim(fdim, 0).reshape(n, -1)
    gf = g.movedim(fdim, 0).reshape(n, -1)
    dot, wn, gn = (wf * gf).sum(1), (wf * wf).sum(1), (gf * gf).sum(1)
    if b is not None and gb is not None:
        bd = b.detach()
        dot, wn, gn = dot + bd * gb, wn + bd * bd, gn + gb * gb
    out = {}
    for d in _divisors(n):
        num = dot.view(n // d, d).sum(1).abs()
        den = (wn.view(n // d, d).sum(1) * gn.view(n // d, d).sum(1)).sqrt().clamp_min(1e-300)
        out[d] = float((num / den).max())
    return out


class _Reference:
    """The float64 copy with its fixed input, its baseline output and the scaling test."""

    def __init__(self, model: nn.Module, inp: Any, seed: int) -> None:
        self.model = reference_copy(model, seed)
        self.inp = to_float64(inp)
        self.rng = random.Random(seed)
        with torch.no_grad():
            self.base = self.forward()
            again = self.forward()
        self.base_max = float(self.base.abs().max())
        if self.base_max == 0 or not math.isfinite(self.base_max):
            raise RuntimeError(f"degenerate float64 output (max |out| = {self.base_max})")
        drift = float((again - self.base).abs().max()) / self.base_max
        if drift > 1e-12:
            raise RuntimeError(f"the float64 forward pass is not deterministic (relative drift {drift:.1e})")

    def forward(self) -> torch.Tensor:
        with _float64():
            return flat_output(call(self.model, self.inp))

    def change(self, w: torch.Tensor, fdim: int, d: int, k: int, b: torch.Tensor | None) -> float:
        """Relative output change when block k (size d) of w, and of b if given, is multiplied by SCALE."""
        with torch.no_grad():
            ws = w.narrow(fdim, k * d, d)
            saved_w = ws.clone()
            bs = b.narrow(0, k * d, d) if b is not None else None
            saved_b = bs.clone() if bs is not None else None
            try:
                ws.mul_(SCALE)
                if bs is not None:
                    bs.mul_(SCALE)
                out = self.forward()
            finally:
                ws.copy_(saved_w)
                if bs is not None:
                    bs.copy_(saved_b)
        return float((out - self.base).abs().max()) / self.base_max

    def confirm(self, w: torch.Tensor, fdim: int, cos: dict[int, float], b: torch.Tensor | None,
                failures: list[str]) -> tuple[int | None, float | None]:
        """Smallest block size passing the Euler test whose scaling test passes too, with its output change.

        Block sizes that pass the Euler test but fail the scaling test are appended to ``failures``.
        """
        n = w.shape[fdim]
        for d in sorted(d for d, c in cos.items() if c < COS_TOL):
            blocks = [0] + ([self.rng.randrange(1, n // d)] if n // d > 1 else [])
            worst = max(self.change(w, fdim, d, k, b) for k in blocks)
            if worst < CHANGE_TOL:
                return d, worst
            failures.append(f"{'weight+bias' if b is not None else 'weight'} passes the Euler test at d={d} "
                            f"but scaling changes the output by {worst:.1e}")
        return None, None


def ground_truth(model: nn.Module, inp: Any, seed: int = 0) -> dict[str, Truth]:
    """Candidate weight name -> its :class:`Truth` (see the module docstring)."""
    ref = _Reference(model, inp, seed)
    cands = candidates(ref.model)
    biases = {}
    for name, (mod, fdim) in cands.items():
        b = getattr(mod, "bias", None)
        if isinstance(b, nn.Parameter) and b.requires_grad and b.numel() == mod.weight.shape[fdim]:
            biases[name] = b
    tensors = [mod.weight for mod, _ in cands.values()] + list(biases.values())
    r = torch.randn(ref.base.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    loss = (ref.forward() * r).sum()
    grads = torch.autograd.grad(loss, tensors, allow_unused=True)
    grad_of = {id(t): g for t, g in zip(tensors, grads)}

    truths: dict[str, Truth] = {}
    for name, (mod, fdim) in cands.items():
        w, b = mod.weight, biases.get(name)
        g = grad_of[id(w)]
        n = w.shape[fdim]
        if g is None or not bool(g.any()):
            truths[name] = Truth("unused", n, note="no gradient reaches it")
            continue
        failures: list[str] = []
        cos = block_cos(w, g, fdim)
        d, change = ref.confirm(w, fdim, cos, None, failures)
        if d is not None:
            truths[name] = Truth("invariant", n, "weight", d, cos[d], change)
            continue
        closest = min(cos.values())
        if b is not None:
            gb = grad_of[id(b)]
            cos_j = block_cos(w, g, fdim, b, torch.zeros_like(b) if gb is None else gb)
            d, change = ref.confirm(w, fdim, cos_j, b, failures)
            if d is not None:
                truths[name] = Truth("invariant", n, "weight+bias", d, cos_j[d], change)
                continue
            closest = min(closest, *cos_j.values())
        truths[name] = Truth("not invariant", n, cos=closest, note="; ".join(failures))
    return truths


# ----------------------------------------------------------------------------------------------
# Hand-made checks of the ground truth
# ----------------------------------------------------------------------------------------------


class _HeadRMS(nn.Module):
    """Linear -> per-head RMS normalization (QK-norm style) -> linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.proj, self.head = nn.Linear(8, 12), nn.Linear(12, 3)
        self.eps = 1e-6

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.proj(x).unflatten(-1, (3, 4))
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.head(h.flatten(-2))


class _Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x)


class _StdConv(nn.Conv2d):
    """Weight standardization per filter, then a residual add: invariant per filter."""

    def __init__(self) -> None:
        super().__init__(4, 4, 3, padding=1, bias=False)
        self.eps = 1e-5

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        w = (w - w.mean((1, 2, 3), keepdim=True)) / (w.var((1, 2, 3), keepdim=True) + self.eps).sqrt()
        return x + self._conv_forward(x, w, None)


class _UsedOnly(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.used, self.unused = nn.Linear(8, 3), nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.used(x)


def selftest() -> bool:
    """Run the ground truth on small models whose answers are known; True when all agree."""
    x4 = torch.randn(BATCH, 4, 6, 6)
    cases: list[tuple[str, nn.Module, Any, dict[str, tuple[str, str | None, int | None]]]] = [
        ("Conv->BN->ReLU->Linear", nn.Sequential(nn.Conv2d(4, 6, 3, bias=False), nn.BatchNorm2d(6), nn.ReLU(),
                                                 nn.Flatten(), nn.Linear(6 * 16, 3)), x4,
         {"0.weight": ("invariant", "weight", 1), "4.weight": ("not invariant", None, None)}),
        ("Conv+bias->BN", nn.Sequential(nn.Conv2d(4, 6, 3), nn.BatchNorm2d(6)), x4,
         {"0.weight": ("invariant", "weight", 1)}),
        ("conv in a residual add", _Residual(), x4, {"conv.weight": ("not invariant", None, None)}),
        ("Conv+bias->GroupNorm(2)", nn.Sequential(nn.Conv2d(4, 8, 3), nn.GroupNorm(2, 8)), x4,
         {"0.weight": ("invariant", "weight+bias", 4)}),
        ("Linear->LayerNorm->Linear", nn.Sequential(nn.Linear(8, 6), nn.LayerNorm(6), nn.Linear(6, 3)),
         torch.randn(BATCH, 5, 8),
         {"0.weight": ("invariant", "weight+bias", 6), "2.weight": ("not invariant", None, None)}),
        ("Linear(no bias)->LayerNorm", nn.Sequential(nn.Linear(8, 6, bias=False), nn.LayerNorm(6)),
         torch.randn(BATCH, 8), {"0.weight": ("invariant", "weight", 6)}),
        ("Linear->per-head RMS norm", _HeadRMS(), torch.randn(BATCH, 8),
         {"proj.weight": ("invariant", "weight+bias", 4), "head.weight": ("not invariant", None, None)}),
        ("ConvTranspose->BN", nn.Sequential(nn.ConvTranspose2d(4, 6, 2, stride=2, bias=False), nn.BatchNorm2d(6)),
         x4, {"0.weight": ("invariant", "weight", 1)}),
        ("weight-standardized conv + residual", _StdConv(), x4, {"weight": ("invariant", "weight", 1)}),
        ("layer left out of forward", _UsedOnly(), torch.randn(BATCH, 8),
         {"used.weight": ("not invariant", None, None), "unused.weight": ("unused", None, None)}),
    ]
    ok = True
    for title, model, inp, expected in cases:
        torch.manual_seed(0)
        truths = ground_truth(model, inp)
        for name, (status, unit, block) in expected.items():
            t = truths[name]
            good = (t.status, t.unit, t.block) == (status, unit, block)
            ok &= good
            print(f"  [{'ok' if good else 'FAIL'}] {title}: {name}: {t.describe()}"
                  + ("" if good else f" (expected {status}, {unit}, block {block})"))
    return ok


# ----------------------------------------------------------------------------------------------
# The zoo
# ----------------------------------------------------------------------------------------------


class SkipModel(Exception):
    """Raised by a builder when the installed library does not have the model (reported, not an error)."""


@dataclass
class Spec:
    name: str
    source: str
    build: Callable[[], tuple[nn.Module, Any]]
    quick: bool = False


def _images(size: int, batch: int = BATCH) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0))


def _tokens(seq: int = 8, vocab: int = 100) -> torch.Tensor:
    return torch.randint(0, vocab, (BATCH, seq), generator=torch.Generator().manual_seed(0))


def _torchvision_specs() -> list[Spec]:
    def tv(name: str, size: int = 64, quick: bool = False, **kw: Any) -> Spec:
        def build() -> tuple[nn.Module, Any]:
            tvm = _import_torchvision_models()
            return getattr(tvm, name)(weights=None, num_classes=10, **kw), _images(size)
        return Spec(name, "torchvision", build, quick)

    def vit_small() -> tuple[nn.Module, Any]:
        tvm = _import_torchvision_models()
        model = tvm.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=64,
                                      mlp_dim=128, num_classes=10)
        return model, _images(32)

    return [
        tv("resnet18", quick=True),
        tv("resnet50"),
        tv("densenet121", size=32, quick=True),
        tv("mobilenet_v3_small", quick=True, dropout=0.0),
        tv("efficientnet_b0", dropout=0.0, stochastic_depth_prob=0.0),
        tv("convnext_tiny", stochastic_depth_prob=0.0),
        tv("regnet_y_400mf"),
        tv("shufflenet_v2_x0_5"),
        tv("swin_t"),  # its stochastic depth rate is fixed by the builder: disable_dropout() zeroes it
        tv("resnext50_32x4d"),
        tv("googlenet", aux_logits=False, init_weights=True, dropout=0.0),
        tv("mnasnet0_5", dropout=0.0),
        tv("squeezenet1_0", dropout=0.0),
        Spec("vit_b_16_small", "torchvision", vit_small),
        tv("maxvit_t", size=224),
    ]


def _timm_specs() -> list[Spec]:
    def tm(name: str, size: int = 64, quick: bool = False, **kw: Any) -> Spec:
        def build() -> tuple[nn.Module, Any]:
            _import_torchvision_models()
            import timm

            rates = {"drop_rate": 0.0, "drop_path_rate": 0.0}
            while True:  # not every timm model takes both rates
                try:
                    return timm.create_model(name, pretrained=False, num_classes=10, **rates, **kw), _images(size)
                except TypeError as err:
                    unknown = [r for r in rates if r in str(err)]
                    if not unknown:
                        raise
                    del rates[unknown[0]]
        return Spec("tm_" + name, "timm", build, quick)

    return [
        tm("nf_resnet26", quick=True),
        tm("convnext_atto", quick=True),
        tm("resnetv2_50x1_bit"),
        tm("dpn68"),
        tm("cspresnet50"),
        tm("ghostnet_100"),
        tm("res2net50_14w_8s"),
        tm("coatnet_nano_rw_224", img_size=64),
        tm("maxvit_nano_rw_256", img_size=64),
        tm("levit_128", img_size=64),
        tm("vit_tiny_patch16_224", img_size=64),
        tm("hrnet_w18_small"),
        tm("repvgg_a0"),
        tm("densenet121"),
        tm("selecsls42b"),
        tm("eca_nfnet_l0"),
        # separable convs without a norm between depthwise and pointwise: only the whole depthwise weight is invariant
        tm("ese_vovnet19b_dw"),
        tm("legacy_xception", size=72),
    ]


def _hf_specs() -> list[Spec]:
    no_dropout = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    decoder = dict(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, max_position_embeddings=32, use_cache=False)

    def hf(cls_name: str, config_name: str, config: dict[str, Any], inputs: Callable[[], dict[str, Any]],
           quick: bool = False) -> Spec:
        def build() -> tuple[nn.Module, Any]:
            _import_torchvision_models()  # transformers imports torchvision too
            import transformers

            try:
                model_cls, config_cls = getattr(transformers, cls_name), getattr(transformers, config_name)
            except AttributeError as err:
                raise SkipModel(f"transformers {transformers.__version__} has no {cls_name}") from err
            model = model_cls(config_cls(**config))
            return model.train(), inputs()
        return Spec("hf_" + cls_name, "transformers", build, quick)

    def ids() -> dict[str, Any]:
        return {"input_ids": _tokens()}

    def pixels(size: int) -> Callable[[], dict[str, Any]]:
        return lambda: {"pixel_values": _images(size)}

    return [
        hf("BertModel", "BertConfig", dict(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                           intermediate_size=64, max_position_embeddings=32, **no_dropout), ids),
        hf("ViTModel", "ViTConfig", dict(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2,
                                         num_attention_heads=2, intermediate_size=64, **no_dropout), pixels(32)),
        hf("LlamaModel", "LlamaConfig", decoder, ids),
        hf("T5Model", "T5Config", dict(vocab_size=100, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                                       dropout_rate=0.0, use_cache=False),
           lambda: {"input_ids": _tokens(), "decoder_input_ids": _tokens()}),
        hf("Qwen3Model", "Qwen3Config", dict(decoder, head_dim=8), ids, True),
        hf("GPT2Model", "GPT2Config", dict(vocab_size=100, n_embd=32, n_layer=2, n_head=2, n_positions=32, resid_pdrop=0.0,
                                           embd_pdrop=0.0, attn_pdrop=0.0, use_cache=False), ids, True),
        hf("Olmo2Model", "Olmo2Config", decoder, ids, True),
        hf("Gemma3TextModel", "Gemma3TextConfig", dict(decoder, head_dim=8, sliding_window=4), ids),
        hf("ConvNextModel", "ConvNextConfig", dict(hidden_sizes=[16, 32, 48, 64], depths=[1, 1, 2, 1],
                                                   drop_path_rate=0.0), pixels(64)),
        hf("MistralModel", "MistralConfig", dict(decoder, sliding_window=None), ids),
    ]


def zoo() -> list[Spec]:
    return _torchvision_specs() + _timm_specs() + _hf_specs()


def _family_available(source: str) -> bool:
    if source == "torchvision":
        return _import_torchvision_models() is not None
    module = {"timm": "timm", "transformers": "transformers"}[source]
    try:
        _import_torchvision_models()  # timm imports torchvision: apply the workaround first
        __import__(module)
    except ImportError:
        return False
    return True


# ----------------------------------------------------------------------------------------------
# Comparison
# ----------------------------------------------------------------------------------------------


@dataclass
class Result:
    model: str
    source: str
    error: str | None = None
    skipped: str | None = None
    method: str = ""
    detector_error: str | None = None
    candidates: int = 0
    invariant: int = 0
    unused: int = 0
    tracked: int = 0
    true_positives: int = 0
    units_ok: int = 0
    granularity_ok: int = 0
    unaccounted: int = 0
    detection_s: float = 0.0
    structural_s: float = 0.0
    model_pass_s: float = 0.0
    truth_s: float = 0.0
    disagreements: list[dict[str, str]] = field(default_factory=list)
    tracked_outside_candidates: list[str] = field(default_factory=list)
    weights: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def precision(self) -> float | None:
        return self.true_positives / self.tracked if self.tracked else None

    @property
    def recall(self) -> float | None:
        return self.true_positives / self.invariant if self.invariant else None


def _det_granularity(unit: Any, filters: int) -> tuple[str, int | None]:
    if unit.granularity == "group" and unit.group_size is not None:
        return _kind(unit.group_size, filters)
    return (unit.granularity, unit.group_size if unit.granularity == "group" else None)


def _fmt_unit(unit: Any) -> str:
    gran = f"group of {unit.group_size}" if unit.granularity == "group" else unit.granularity
    return f"tracked as {'weight+bias' if len(unit.params) > 1 else 'weight'}, {gran} ({unit.found_by})"


def compare(res: Result, det: Any, truths: dict[str, Truth]) -> None:
    unit_of = {p: u for u in det.units for p in u.params}
    res.method = det.method
    res.detector_error = det.error
    res.candidates = len(truths)
    res.tracked_outside_candidates = sorted(
        u.name for u in det.units if not any(p in truths for p in u.params))
    for name, t in truths.items():
        unit = unit_of.get(name)
        det_text = _fmt_unit(unit) if unit else f"rejected: {det.rejected[name]}" if name in det.rejected else "absent"
        rec: dict[str, Any] = {"truth": asdict(t), "detector": det_text}
        res.weights[name] = rec
        problems = []
        if unit is None and name not in det.rejected:
            res.unaccounted += 1
            problems.append("unaccounted")
        if t.status == "unused":
            res.unused += 1
        else:
            invariant = t.status == "invariant"
            res.invariant += invariant
            res.tracked += unit is not None
            if invariant and unit is None:
                problems.append("missed")
            elif unit is not None and not invariant:
                problems.append("false positive")
            elif invariant and unit is not None:
                res.true_positives += 1
                unit_ok = (len(unit.params) > 1) == (t.unit == "weight+bias")
                gran = t.granularity
                det_gran = _det_granularity(unit, t.filters)
                gran_ok = det_gran == gran or (t.filters == 1 and det_gran[0] in ("filter", "tensor"))
                res.units_ok += unit_ok
                res.granularity_ok += gran_ok
                if not unit_ok:
                    problems.append("unit")
                if not gran_ok:
                    problems.append("granularity")
        if problems:
            res.disagreements.append({"param": name, "kind": ", ".join(problems), "truth": t.describe(),
                                      "detector": det_text})


def _forward_backward(model: nn.Module, inp: Any) -> None:
    model.train()
    total = flat_output(call(model, inp)).sum()
    if total.requires_grad:
        total.backward()
    for p in model.parameters():
        p.grad = None


def _build(spec: Spec, res: Any) -> tuple[nn.Module, Any] | None:
    """The model (seed 0, dropout off) and its example input; or None, with ``res.skipped`` / ``res.error`` set."""
    torch.manual_seed(0)
    try:
        model, inp = spec.build()
        disable_dropout(model)
    except SkipModel as err:
        res.skipped = str(err)
        return None
    except Exception as err:  # noqa: BLE001 - a model that cannot be built is reported, not fatal
        res.error = f"constructor: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        return None
    return model, inp


def audit(spec: Spec, verbose: bool = False) -> Result:
    from lightning_smd.engine.detect import find_normalized_weights

    res = Result(spec.name, spec.source)
    built = _build(spec, res)
    if built is None:
        return res
    model, inp = built
    try:
        # the model's own forward + backward on the example batch (also a warm-up): the numerical check needs one
        t0 = time.perf_counter()
        _forward_backward(model, inp)
        res.model_pass_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        find_normalized_weights(model)
        res.structural_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        det = find_normalized_weights(model, inp)
        res.detection_s = time.perf_counter() - t0
    except Exception as err:  # noqa: BLE001
        res.error = f"detector raised {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        return res
    try:
        t0 = time.perf_counter()
        truths = ground_truth(model, inp)
        res.truth_s = time.perf_counter() - t0
    except Exception as err:  # noqa: BLE001
        res.error = f"forward: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        if verbose:
            traceback.print_exc()
        return res
    compare(res, det, truths)
    return res


# ----------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{x:.2f}"


def line(res: Result) -> str:
    if res.skipped:
        return f"{res.model:28s} {res.source:12s} skipped: {res.skipped}"
    if res.error:
        return f"{res.model:28s} {res.source:12s} error: {res.error}"
    return (f"{res.model:28s} {res.source:12s} {res.method:4s} cand {res.candidates:4d}  inv {res.invariant:4d}  "
            f"tracked {res.tracked:4d}  P {_pct(res.precision)}  R {_pct(res.recall)}  "
            f"units {res.units_ok}/{res.true_positives}  gran {res.granularity_ok}/{res.true_positives}  "
            f"unacc {res.unaccounted}  detect {res.structural_s:.2f}s/{res.detection_s:.2f}s (model pass "
            f"{res.model_pass_s:.2f}s)  truth {res.truth_s:.1f}s")


def table(results: list[Result]) -> str:
    rows = [("| model | source | method | candidates | invariant | tracked | precision | recall | units ok | "
             "granularity ok | unaccounted | structural s | with check s | model pass s |"),
            "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        if r.skipped:
            rows.append(f"| {r.model} | {r.source} | skipped: {r.skipped} | | | | | | | | | | | |")
            continue
        if r.error:
            rows.append(f"| {r.model} | {r.source} | error: {r.error.replace('|', '/')} | | | | | | | | | | | |")
            continue
        method = r.method + (f" (unused: {r.unused})" if r.unused else "")
        rows.append(f"| {r.model} | {r.source} | {method} | {r.candidates} | {r.invariant} | {r.tracked} | "
                    f"{_pct(r.precision)} | {_pct(r.recall)} | {r.units_ok}/{r.true_positives} | "
                    f"{r.granularity_ok}/{r.true_positives} | {r.unaccounted} | {r.structural_s:.2f} | {r.detection_s:.2f} | "
                    f"{r.model_pass_s:.2f} |")
    ok = [r for r in results if not r.error and not r.skipped]
    errors = sum(1 for r in results if r.error)
    tot = {k: sum(getattr(r, k) for r in ok) for k in
           ("candidates", "invariant", "tracked", "true_positives", "units_ok", "granularity_ok", "unaccounted")}
    det_s = sum(r.detection_s for r in ok)
    prec = tot["true_positives"] / tot["tracked"] if tot["tracked"] else None
    rec = tot["true_positives"] / tot["invariant"] if tot["invariant"] else None
    rows.append(f"| **total ({len(ok)} models, {errors} errors)** | | | {tot['candidates']} | "
                f"{tot['invariant']} | {tot['tracked']} | {_pct(prec)} | {_pct(rec)} | "
                f"{tot['units_ok']}/{tot['true_positives']} | {tot['granularity_ok']}/{tot['true_positives']} | "
                f"{tot['unaccounted']} | {sum(r.structural_s for r in ok):.2f} | {det_s:.2f} | "
                f"{sum(r.model_pass_s for r in ok):.2f} |")
    return "\n".join(rows)


def disagreement_list(results: list[Result]) -> str:
    out = []
    for r in results:
        if r.error or r.skipped or not (r.disagreements or r.tracked_outside_candidates or r.detector_error):
            continue
        out.append(f"\n### {r.model} ({r.source}, {r.method})")
        if r.detector_error:
            out.append(f"- detector error: {r.detector_error}")
        for d in r.disagreements:
            out.append(f"- `{d['param']}` [{d['kind']}]: truth: {d['truth']}; detector: {d['detector']}")
        for name in r.tracked_outside_candidates:
            out.append(f"- `{name}` [not a candidate, not scored]: tracked by the detector")
    return "\n".join(out) if out else "\n(none)"


def margins(results: list[Result]) -> str:
    """How far the ground truth's decisions were from its thresholds, over all models."""
    inv, non = [], []
    for r in results:
        for name, w in r.weights.items():
            t = w["truth"]
            if t["status"] == "invariant":
                inv.append((t["cos"], t["change"], f"{r.model}:{name}"))
            elif t["status"] == "not invariant" and t["cos"] is not None:
                non.append((t["cos"], f"{r.model}:{name}"))
    parts = []
    if inv:
        c, ch = max(inv), max(inv, key=lambda x: x[1])
        parts.append(f"invariant weights ({len(inv)}): largest block |cos| {c[0]:.1e} ({c[2]}), largest output "
                     f"change {ch[1]:.1e} ({ch[2]}) [thresholds {COS_TOL:.0e}, {CHANGE_TOL:.0e}]")
    if non:
        c2 = min(non)
        parts.append(f"not-invariant weights ({len(non)}): smallest best-block |cos| {c2[0]:.1e} ({c2[1]})")
    return "\n".join("- " + p for p in parts) or "- (no weights)"


# ----------------------------------------------------------------------------------------------
# Parameter groups (--groups): the audit of the param groups against a ground truth of normalization gains
# ----------------------------------------------------------------------------------------------

GROUPS_WD = 0.05  # AdamW's weight decay of the timm / nanoGPT / param_groups() groupings
SGD_WD = 5e-4  # the weight decay of ``SGD(model.parameters(), ...)``
SENSITIVE_TOL = 1e-3  # a normalization layer's output must move at least this much under a generic input change


def _is_linear_map(mod: nn.Module) -> bool:
    """Conv, linear and embedding layers (HF ``Conv1D`` too): linear in their input, never normalization layers."""
    return isinstance(mod, (nn.modules.conv._ConvNd, nn.Linear, nn.Embedding, nn.EmbeddingBag)) or _is_hf_conv1d(mod)


def _first_tensor(args: tuple, kwargs: dict) -> tuple[str, int | str] | None:
    """Where the first tensor input of a call is: ("arg", index) or ("kwarg", key)."""
    for i, a in enumerate(args):
        if isinstance(a, torch.Tensor):
            return ("arg", i)
    for k, v in kwargs.items():
        if isinstance(v, torch.Tensor):
            return ("kwarg", k)
    return None


def _with_input(args: tuple, kwargs: dict, where: tuple[str, int | str], x: torch.Tensor) -> tuple[tuple, dict]:
    if where[0] == "arg":
        i = int(where[1])
        return args[:i] + (x,) + args[i + 1:], kwargs
    return args, dict(kwargs, **{str(where[1]): x})


@dataclass
class NormTruth:
    """The ground truth of normalization layers of one model (see :func:`norm_truth`)."""

    gains: list[str] = field(default_factory=list)
    """The direct parameters of the normalization layers: the gains and shifts."""
    layers: dict[str, str] = field(default_factory=dict)
    """Normalization layer (module name) -> its class."""
    checked: int = 0
    """Modules owning parameters directly, linear maps left out, called again in isolation."""
    linear_maps: int = 0
    """Conv / linear / embedding modules, not checked (linear in their input)."""
    unchecked: dict[str, str] = field(default_factory=dict)
    """Module -> why it could not be checked."""
    compound: dict[str, list[str]] = field(default_factory=dict)
    """Modules invariant to the scale of their input whose children own parameters (the invariance may come from
    normalization layers inside), with their direct parameters: not counted as gains."""
    input_independent: list[str] = field(default_factory=list)
    """Modules whose output did not move under a generic change of their input either: not normalization layers."""
    largest_invariant_change: float | None = None
    """The largest relative output change, under input scaling, of a module judged invariant."""
    closest_non_invariant: tuple[float, str] | None = None
    """The smallest relative output change, under input scaling, of a module judged not invariant."""


def norm_truth(model: nn.Module, inp: Any, seed: int = 0) -> NormTruth:
    """Which parameters are normalization gains and shifts, by behaviour (no code shared with
    ``lightning_smd.engine.groups``).

    On the float64 reference copy (:func:`reference_copy`: train mode, dropout off, epsilons 1e-30, constant
    parameters perturbed), forward pre-hooks record the first call's inputs of every module that owns parameters
    directly, conv / linear / embedding layers left out. Each such module is then called again on its own, on the
    recorded inputs with the first tensor input (a) as recorded, (b) multiplied by 1.7 and (c) changed generically
    (plus 0.5 of its standard deviation times Gaussian noise), the other inputs unchanged. A module whose output
    is unchanged by (b), ``max|out_b - out_a| / max|out_a| < 1e-7``, and moves under (c) by more than 1e-3 is
    invariant to the scale of its input: when no module inside it owns parameters it is a normalization layer and
    its direct parameters are the gains and shifts; otherwise it is listed as compound and not counted.
    """
    ref = _Reference(model, inp, seed)
    first_name: dict[int, str] = {}
    for name, p in ref.model.named_parameters():
        first_name.setdefault(id(p), name)
    owners: dict[str, nn.Module] = {}
    truth = NormTruth()
    for mname, mod in ref.model.named_modules():
        if not list(mod.named_parameters(recurse=False)):
            continue
        if _is_linear_map(mod):
            truth.linear_maps += 1
        else:
            owners[mname] = mod
    recorded: dict[str, tuple[tuple, dict, tuple[str, int | str]] | str] = {}

    def hook_for(mname: str) -> Callable[..., None]:
        def hook(mod: nn.Module, args: tuple, kwargs: dict) -> None:
            if mname in recorded:
                return
            where = _first_tensor(args, kwargs)
            if where is None:
                recorded[mname] = "no tensor input"
                return
            x = args[int(where[1])] if where[0] == "arg" else kwargs[str(where[1])]
            if not x.is_floating_point():
                recorded[mname] = f"its first tensor input is {x.dtype}, not floating"
                return
            recorded[mname] = (*_with_input(args, kwargs, where, x.detach().clone()), where)
        return hook

    handles = [mod.register_forward_pre_hook(hook_for(mname), with_kwargs=True) for mname, mod in owners.items()]
    try:
        with torch.no_grad():
            ref.forward()
    finally:
        for h in handles:
            h.remove()

    gen = torch.Generator().manual_seed(seed)
    for mname, mod in owners.items():
        rec = recorded.get(mname)
        if rec is None:
            truth.unchecked[mname] = ("never called as a module in the forward pass (its parameters may be used by a "
                                      "method of it, e.g. timm's RelPosBias.get_bias())")
            continue
        if isinstance(rec, str):
            truth.unchecked[mname] = rec
            continue
        args, kwargs, where = rec
        x = args[int(where[1])] if where[0] == "arg" else kwargs[str(where[1])]
        noise = torch.randn(x.shape, generator=gen, dtype=x.dtype) * 0.5 * float(x.std() if x.numel() > 1 else 1.0)
        try:
            with torch.no_grad(), _float64():
                outs = [flat_output(mod(*a, **k)) for a, k in
                        (_with_input(args, kwargs, where, v) for v in (x.clone(), x * SCALE, x + noise))]
        except Exception as err:  # noqa: BLE001 - a module that cannot be called on its own is reported
            truth.unchecked[mname] = f"cannot be called on its own: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
            continue
        base = float(outs[0].abs().max()) if outs[0].numel() else 0.0
        if base == 0 or not math.isfinite(base) or any(o.shape != outs[0].shape for o in outs):
            truth.unchecked[mname] = f"degenerate output (max |out| = {base}) or one whose shape depends on the input's values"
            continue
        truth.checked += 1
        scaled, generic = (float((o - outs[0]).abs().max()) / base for o in outs[1:])
        if scaled >= CHANGE_TOL:
            if truth.closest_non_invariant is None or scaled < truth.closest_non_invariant[0]:
                truth.closest_non_invariant = (scaled, mname or "(model)")
            continue
        if generic <= SENSITIVE_TOL:
            truth.input_independent.append(mname or "(model)")
            continue
        truth.largest_invariant_change = max(truth.largest_invariant_change or 0.0, scaled)
        direct = [first_name[id(p)] for _, p in mod.named_parameters(recurse=False) if id(p) in first_name]
        if any(True for child in mod.children() for _ in child.parameters()):
            truth.compound[mname or "(model)"] = direct
            continue
        truth.layers[mname] = type(mod).__name__
        truth.gains.extend(n for n in direct if n not in truth.gains)
    return truth


class _Scaler(nn.Module):
    """An RMS normalization with a gain, in a class not named like a normalization layer."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n))
        self.eps = 1e-6

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class _LayerScale(nn.Module):
    def __init__(self, n: int) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((n,), 1e-5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class _Table(nn.Module):
    """A learned table added to the input's shape, the input's values ignored."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.table = nn.Parameter(torch.randn(n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.table.expand_as(x) + 0 * x


class _NormedProjection(nn.Module):
    """Linear (no bias) -> LayerNorm -> + its own shift: invariant to its input's scale, but compound."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.proj, self.ln = nn.Linear(n, n, bias=False), nn.LayerNorm(n, elementwise_affine=False)
        self.shift = nn.Parameter(torch.zeros(n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ln(self.proj(x)) + self.shift


class _NormTruthNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.bn = nn.Linear(8, 6), nn.BatchNorm1d(6)
        self.fc2, self.scaler = nn.Linear(6, 6), _Scaler(6)
        self.ls, self.table = _LayerScale(6), _Table(6)
        self.block, self.ln, self.head = _NormedProjection(6), nn.LayerNorm(6), nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.scaler(self.fc2(torch.relu(self.bn(self.fc1(x)))))
        h = h + self.ls(h) + self.table(h)
        return self.head(self.ln(self.block(h)))


def norm_truth_selftest() -> bool:
    """The ground truth of normalization gains on a hand-made model whose answer is known."""
    torch.manual_seed(0)
    truth = norm_truth(_NormTruthNet(), torch.randn(BATCH, 8))
    expected = {"gains": ["bn.weight", "bn.bias", "scaler.weight", "ln.weight", "ln.bias"], "compound": {"block": ["block.shift"]},
                "input_independent": ["table"], "linear_maps": 4, "unchecked": {}}
    got = {"gains": truth.gains, "compound": truth.compound, "input_independent": truth.input_independent,
           "linear_maps": truth.linear_maps, "unchecked": truth.unchecked}
    ok = True
    for key, want in expected.items():
        good = (sorted(got[key]) == sorted(want)) if isinstance(want, list) else got[key] == want
        ok &= good
        print(f"  [{'ok' if good else 'FAIL'}] normalization gains: {key}: {got[key]}" + ("" if good else f" (expected {want})"))
    return ok


def _nanogpt_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """nanoGPT's ``configure_optimizers``: weight decay on every parameter of two or more dimensions."""
    param_dict = {pn: p for pn, p in model.named_parameters() if p.requires_grad}
    decay_params = [p for n, p in param_dict.items() if p.dim() >= 2]
    nodecay_params = [p for n, p in param_dict.items() if p.dim() < 2]
    groups = [{"params": decay_params, "weight_decay": weight_decay}, {"params": nodecay_params, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]  # (nanoGPT's models have both)


def _timm_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """timm's default (``create_optimizer_v2`` without layer decay): ``param_groups_weight_decay`` with the model's
    ``no_weight_decay()`` names."""
    _import_torchvision_models()
    from timm.optim import param_groups_weight_decay

    no_wd = model.no_weight_decay() if hasattr(model, "no_weight_decay") else ()
    return param_groups_weight_decay(model, weight_decay, no_weight_decay_list=no_wd)


def _decayed_names(model: nn.Module, groups: list[dict[str, Any]]) -> set[str]:
    name = {}
    for n, p in model.named_parameters():
        name.setdefault(id(p), n)
    return {name[id(p)] for g in groups if float(g.get("weight_decay", 0.0)) > 0 for p in g["params"]}


@dataclass
class GroupsResult:
    model: str
    source: str
    error: str | None = None
    skipped: str | None = None
    detector_error: str | None = None
    params: int = 0
    norm_by_class: int = 0
    """Parameters of normalization layers by class (``norm_parameters``)."""
    units: list[list[str]] = field(default_factory=list)
    """The detector's units (their parameters: a weight, or a weight and its bias; ``normalized=`` of the audits)."""
    truth: dict[str, Any] = field(default_factory=dict)
    """:class:`NormTruth` as a dict."""
    findings: dict[str, int | None] = field(default_factory=dict)
    """Grouping -> the audit's finding count (None where the grouping could not be built)."""
    audits: dict[str, Any] = field(default_factory=dict)
    """Grouping -> the audit's summary block, or the error building it."""
    recall: float | None = None
    """The fraction of the truth's gains and shifts the audit names when ``model.parameters()`` is decayed."""
    missed: list[str] = field(default_factory=list)
    """The truth's gains the audit does not name then."""
    norm_unconfirmed: list[str] = field(default_factory=list)
    """Named as normalization parameters by class (``audit.decayed[].norm``) but not invariant by the truth."""
    other_named: int = 0
    """Parameters the audit names as ``other`` (at most one dimension, not in a normalization layer)."""
    truth_not_norm_by_class: list[str] = field(default_factory=list)
    """The truth's gains that ``norm_parameters`` does not list (the audit can still name them as 1-D)."""
    pg_vs_nanogpt: dict[str, list[str]] = field(default_factory=dict)
    """Decayed by ``param_groups()`` only / by nanoGPT's grouping only."""
    timm_vs_nanogpt: dict[str, list[str]] = field(default_factory=dict)
    """Decayed by timm's grouping only / by nanoGPT's only."""
    detection_s: float = 0.0
    truth_s: float = 0.0
    audit_s: float = 0.0


def groups_audit(spec: Spec, verbose: bool = False) -> GroupsResult:
    """The param-group audit of one model: the three groupings, ``model.parameters()`` and ``param_groups()``."""
    from lightning_smd.engine.detect import find_normalized_weights
    from lightning_smd.engine.groups import audit_groups, embedding_parameters, norm_parameters, param_groups

    res = GroupsResult(spec.name, spec.source)
    built = _build(spec, res)
    if built is None:
        return res
    model, inp = built
    try:
        t0 = time.perf_counter()
        det = find_normalized_weights(model, inp)
        res.detection_s = time.perf_counter() - t0
        res.detector_error = det.error
        res.units = [list(u.params) for u in det.units]
        t0 = time.perf_counter()
        truth = norm_truth(model, inp)
        res.truth_s = time.perf_counter() - t0
    except Exception as err:  # noqa: BLE001
        res.error = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        if verbose:
            traceback.print_exc()
        return res
    res.truth = asdict(truth)
    t0 = time.perf_counter()
    named = dict(model.named_parameters())
    res.params = len(named)
    norms = norm_parameters(model)
    res.norm_by_class = len(norms)
    embeddings = embedding_parameters(model)
    res.truth_not_norm_by_class = [n for n in truth.gains if n not in norms]
    builders: dict[str, Callable[[], torch.optim.Optimizer]] = {
        "timm": lambda: torch.optim.AdamW(_timm_groups(model, GROUPS_WD), lr=1e-3),
        "nanogpt": lambda: torch.optim.AdamW(_nanogpt_groups(model, GROUPS_WD), lr=1e-3),
        "param_groups": lambda: torch.optim.AdamW(param_groups(model, GROUPS_WD), lr=1e-3),
        "parameters": lambda: torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=SGD_WD),
    }
    opts: dict[str, torch.optim.Optimizer] = {}
    for key, build in builders.items():
        try:
            opts[key] = build()
        except Exception as err:  # noqa: BLE001
            res.findings[key] = None
            res.audits[key] = {"error": f"{type(err).__name__}: {err}"}
            continue
        audit = audit_groups(named, norms, [opts[key]], normalized=res.units, embeddings=embeddings)
        res.findings[key] = audit.findings
        res.audits[key] = audit.summary()
        if key == "parameters":
            named_by_audit = {n for f in audit.decayed for n in f.names}
            gains = set(truth.gains)
            res.missed = [n for n in truth.gains if n not in named_by_audit]
            res.recall = len(gains & named_by_audit) / len(gains) if gains else None
            res.norm_unconfirmed = [n for f in audit.decayed for n in f.norm if n not in gains]
            res.other_named = sum(len(f.other) for f in audit.decayed)

    def diff(a: str, b: str) -> dict[str, list[str]]:
        if a not in opts or b not in opts:
            return {}
        da, db = _decayed_names(model, opts[a].param_groups), _decayed_names(model, opts[b].param_groups)
        return {f"only_{a}": sorted(da - db), f"only_{b}": sorted(db - da)}

    res.pg_vs_nanogpt = diff("param_groups", "nanogpt")
    res.timm_vs_nanogpt = diff("timm", "nanogpt")
    res.audit_s = time.perf_counter() - t0
    return res


def _finding_text(summary: dict[str, Any]) -> str:
    if "error" in summary:
        return f"could not be built: {summary['error']}"
    parts = [f"group {f['group']} (wd {f['weight_decay']:g}): normalization {f['normalization']}, other {f['other']}"
             for f in summary["decayed_gains_and_biases"]]
    if summary["in_several_optimizers"]:
        parts.append(f"in several optimizers: {summary['in_several_optimizers']}")
    if summary["normalized_without_decay"]:
        parts.append(f"normalized weights without decay: {summary['normalized_without_decay']}")
    return "; ".join(parts)


def groups_line(res: GroupsResult) -> str:
    if res.skipped:
        return f"{res.model:28s} {res.source:12s} skipped: {res.skipped}"
    if res.error:
        return f"{res.model:28s} {res.source:12s} error: {res.error}"
    t = res.truth
    f = res.findings
    return (f"{res.model:28s} {res.source:12s} params {res.params:4d}  by class {res.norm_by_class:4d}  truth {len(t['gains']):4d}"
            f" (layers {len(t['layers'])}, compound {len(t['compound'])}, unchecked {len(t['unchecked'])})  findings timm "
            f"{f.get('timm')} nanoGPT {f.get('nanogpt')} param_groups {f.get('param_groups')} parameters() {f.get('parameters')}"
            f"  recall {_pct(res.recall)}  detect {res.detection_s:.2f}s truth {res.truth_s:.2f}s")


def _diff_text(res: GroupsResult) -> str:
    d = res.pg_vs_nanogpt
    if not d:
        return "–"
    if not d["only_param_groups"] and not d["only_nanogpt"]:
        return "none"
    return f"+{len(d['only_param_groups'])} / −{len(d['only_nanogpt'])}"


def groups_table(results: list[GroupsResult]) -> str:
    rows = ["| model | source | norm params by class | truth gains | unchecked | findings timm | findings nanoGPT | "
            "findings param_groups | recall | by class, not confirmed | differences |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in results:
        if r.skipped or r.error:
            rows.append(f"| {r.model} | {r.source} | {'skipped: ' + r.skipped if r.skipped else 'error: ' + (r.error or '').replace('|', '/')}"
                        " | | | | | | | | |")
            continue
        f = r.findings
        rows.append(f"| {r.model} | {r.source} | {r.norm_by_class} | {len(r.truth['gains'])} | {len(r.truth['unchecked'])} | "
                    f"{f.get('timm')} | {f.get('nanogpt')} | {f.get('param_groups')} | {_pct(r.recall)} | "
                    f"{len(r.norm_unconfirmed)} | {_diff_text(r)} |")
    ok = [r for r in results if not r.error and not r.skipped]
    gains = sum(len(r.truth["gains"]) for r in ok)
    found = sum(len(r.truth["gains"]) - len(r.missed) for r in ok)

    def total(key: str) -> int:
        return sum(r.findings.get(key) or 0 for r in ok)

    errors = sum(1 for r in results if r.error)
    rows.append(f"| **total ({len(ok)} models, {errors} errors)** | | {sum(r.norm_by_class for r in ok)} | {gains} | "
                f"{sum(len(r.truth['unchecked']) for r in ok)} | {total('timm')} | {total('nanogpt')} | {total('param_groups')} | "
                f"{_pct(found / gains if gains else None)} | {sum(len(r.norm_unconfirmed) for r in ok)} | "
                f"{sum(1 for r in ok if _diff_text(r) not in ('none', '–'))} models |")
    return "\n".join(rows)


def groups_notes(results: list[GroupsResult]) -> str:
    """Every finding, every missed gain, every unconfirmed name, every difference, every unchecked module."""
    out = []
    for r in results:
        if r.error or r.skipped:
            continue
        lines = []
        if r.detector_error:
            lines.append(f"- detector error: {r.detector_error}")
        for key in ("timm", "nanogpt", "param_groups"):
            if r.findings.get(key) != 0:
                lines.append(f"- {key}: {r.findings.get(key)} finding(s): {_finding_text(r.audits[key])}")
        if r.missed:
            lines.append(f"- model.parameters(): truth gains the audit does not name: {r.missed}")
        if r.norm_unconfirmed:
            lines.append(f"- named as normalization by class, not invariant by the truth: {r.norm_unconfirmed}")
        if r.truth_not_norm_by_class:
            lines.append(f"- truth gains not in norm_parameters() (named by the audit as 1-D): {r.truth_not_norm_by_class}")
        for key, diff in (("param_groups() vs nanoGPT", r.pg_vs_nanogpt), ("timm vs nanoGPT", r.timm_vs_nanogpt)):
            if any(diff.values()):
                lines.append(f"- decayed, {key}: " + "; ".join(f"{k}: {v}" for k, v in diff.items() if v))
        for mname, reason in r.truth["unchecked"].items():
            lines.append(f"- unchecked `{mname}`: {reason}")
        for mname, direct in r.truth["compound"].items():
            lines.append(f"- compound invariant module `{mname}` (not counted), its direct parameters: {direct}")
        if r.truth["input_independent"]:
            lines.append(f"- modules ignoring their input (not counted): {r.truth['input_independent']}")
        if lines:
            out.append(f"\n### {r.model} ({r.source})")
            out.extend(lines)
    return "\n".join(out) if out else "\n(none)"


def groups_margins(results: list[GroupsResult]) -> str:
    inv = [(r.truth["largest_invariant_change"], r.model) for r in results
           if not r.error and not r.skipped and r.truth["largest_invariant_change"] is not None]
    non = [(r.truth["closest_non_invariant"][0], f"{r.model}:{r.truth['closest_non_invariant'][1]}") for r in results
           if not r.error and not r.skipped and r.truth["closest_non_invariant"] is not None]
    parts = []
    if inv:
        c = max(inv)
        parts.append(f"largest output change of an invariant module under input scaling {c[0]:.1e} ({c[1]})")
    if non:
        c2 = min(non)
        parts.append(f"smallest output change of a non-invariant module {c2[0]:.1e} ({c2[1]}) [threshold {CHANGE_TOL:.0e}]")
    return "\n".join("- " + p for p in parts) or "- (no modules)"


def run_groups(specs: list[Spec], args: argparse.Namespace) -> None:
    start = time.perf_counter()
    results = []
    for spec in specs:
        res = groups_audit(spec, args.verbose)
        results.append(res)
        print(groups_line(res), flush=True)
    total = time.perf_counter() - start
    print(f"\n{groups_table(results)}\n\nNotes:{groups_notes(results)}")
    print(f"\nGround-truth margins:\n{groups_margins(results)}")
    print(f"\ngroups audit wall time {total:.1f} s ({len(results)} models)")
    if args.json:
        payload = {"wall_s": total, "table": groups_table(results), "models": [asdict(r) for r in results]}
        with open(args.json, "w") as fh:
            json.dump(payload, fh, indent=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", help="comma-separated model names (see --list)")
    parser.add_argument("--quick", action="store_true", help="a CI-size subset of small models")
    parser.add_argument("--list", action="store_true", help="list the model names and exit")
    parser.add_argument("--json", help="write the results as JSON to this path")
    parser.add_argument("--selftest", action="store_true", help="check the ground truth on hand-made cases")
    parser.add_argument("--verbose", action="store_true", help="print tracebacks of model errors")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    parser.add_argument("--groups", action="store_true",
                        help="audit the param groups (timm's, nanoGPT's, param_groups(), model.parameters()) against a "
                             "ground truth of normalization gains, instead of the detector")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    if args.selftest:
        ok = selftest()
        ok &= norm_truth_selftest()
        sys.exit(0 if ok else 1)
    specs = zoo()
    if args.list:
        for s in specs:
            print(f"{s.name:28s} {s.source}{'  (quick)' if s.quick else ''}")
        return
    if args.models:
        wanted = [m.strip() for m in args.models.split(",") if m.strip()]
        unknown = sorted(set(wanted) - {s.name for s in specs})
        if unknown:
            parser.error(f"unknown models: {', '.join(unknown)} (see --list)")
        specs = [s for s in specs if s.name in wanted]
    elif args.quick:
        specs = [s for s in specs if s.quick]
    available = {}
    for source in dict.fromkeys(s.source for s in specs):
        available[source] = _family_available(source)
        if not available[source]:
            print(f"note: {source} is not installed; skipping its models", flush=True)
    specs = [s for s in specs if available[s.source]]

    if args.groups:
        run_groups(specs, args)
        return
    start = time.perf_counter()
    results = []
    for spec in specs:
        res = audit(spec, args.verbose)
        results.append(res)
        print(line(res), flush=True)
    total = time.perf_counter() - start
    print(f"\n{table(results)}\n\nDisagreements:{disagreement_list(results)}")
    print(f"\nGround-truth margins:\n{margins(results)}")
    print(f"\naudit wall time {total:.1f} s ({len(results)} models)")
    if args.json:
        payload = {"wall_s": total, "models": [asdict(r) | {"precision": r.precision, "recall": r.recall}
                                               for r in results]}
        with open(args.json, "w") as fh:
            json.dump(payload, fh, indent=1)


if __name__ == "__main__":
    main()
