"""Audit of the detector of scale-invariant weights against a numerical ground truth, over a zoo of real
architectures from torchvision, timm and Hugging Face transformers (built at random init, no downloads).

    python benchmarks/zoo_audit.py                          # every model, then a Markdown table
    python benchmarks/zoo_audit.py --quick                  # a CI-size subset (about 8 small models)
    python benchmarks/zoo_audit.py --models resnet18,tm_nf_resnet26 --json /tmp/zoo.json
    python benchmarks/zoo_audit.py --list                   # the model names
    python benchmarks/zoo_audit.py --selftest               # the ground truth on hand-made cases

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


def audit(spec: Spec, verbose: bool = False) -> Result:
    from lightning_smd.engine.detect import find_normalized_weights

    res = Result(spec.name, spec.source)
    torch.manual_seed(0)
    try:
        model, inp = spec.build()
        disable_dropout(model)
    except SkipModel as err:
        res.skipped = str(err)
        return res
    except Exception as err:  # noqa: BLE001 - a model that cannot be built is reported, not fatal
        res.error = f"constructor: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        return res
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", help="comma-separated model names (see --list)")
    parser.add_argument("--quick", action="store_true", help="a CI-size subset of small models")
    parser.add_argument("--list", action="store_true", help="list the model names and exit")
    parser.add_argument("--json", help="write the results as JSON to this path")
    parser.add_argument("--selftest", action="store_true", help="check the ground truth on hand-made cases")
    parser.add_argument("--verbose", action="store_true", help="print tracebacks of model errors")
    args = parser.parse_args()
    torch.set_num_threads(2)

    if args.selftest:
        sys.exit(0 if selftest() else 1)
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
