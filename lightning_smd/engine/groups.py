"""Which parameters get weight decay: the audit of the optimizers' param groups, and the conventional groups.

``torch.optim.SGD(model.parameters(), weight_decay=…)`` is the first line of most training scripts, and it decays
the gains and biases of the normalization layers too. A gain is not scale-invariant: decay shrinks it towards 0, and
since the normalized weight before it is, the layer after it then learns as if its learning rate were raised (our
ResNet example: a shortcut branch's gain shrank, its convolution sat steady at 0.57–0.64× the prediction with an
effective learning rate 36× the other layers'). timm (``param_groups_weight_decay``), nanoGPT and torchvision's
reference scripts all keep 1-D parameters — gains, biases — out of the decay. :func:`audit_groups` finds what does
not; :func:`param_groups` builds the conventional groups, so the fix is one line.

The converse, a normalized weight in a group with weight decay 0, has no equilibrium at all: that is ``SMD002``
(:func:`~lightning_smd.engine.alerts.setup_warnings`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from lightning_smd.messages import shown_names
from torch import nn

__all__ = [
    "GroupFinding", "GroupAudit", "ParamRoles", "param_roles", "norm_parameters", "embedding_parameters", "audit_groups", "audit_session",
    "param_groups",
]  # fmt: skip

#: Normalization modules of torch (their parameters are gains and shifts); other libraries' are found by name.
_TORCH_NORMS: tuple[type, ...] = tuple(
    t
    for t in (
        getattr(nn.modules.batchnorm, "_NormBase", None),
        nn.LayerNorm,
        nn.GroupNorm,
        getattr(nn, "RMSNorm", None),
        nn.LocalResponseNorm,
    )
    if t is not None
)


def _norm_params(model: nn.Module) -> dict[int, tuple[nn.Parameter, str]]:
    """``id`` → (parameter, class name) of the parameters owned directly by normalization layers: every one of a
    torch normalization module's; of a module whose class is named like one (``LlamaRMSNorm``, ``T5LayerNorm``,
    ``FrozenBatchNorm2d``, ...), those of at most one dimension (a cosine classifier ``NormedLinear`` owns a matrix,
    which is a weight)."""
    out: dict[int, tuple[nn.Parameter, str]] = {}
    for module in model.modules():
        torch_norm = isinstance(module, _TORCH_NORMS)
        if torch_norm or "norm" in type(module).__name__.lower():
            for p in module.parameters(recurse=False):
                if torch_norm or p.dim() <= 1:
                    out.setdefault(id(p), (p, type(module).__name__))
    return out


def _embedding_params(model: nn.Module) -> dict[int, nn.Parameter]:
    """``id`` → weight of the model's ``nn.Embedding`` / ``nn.EmbeddingBag`` layers (subclasses included)."""
    return {
        id(m.weight): m.weight
        for m in model.modules()
        if isinstance(m, (nn.Embedding, nn.EmbeddingBag)) and isinstance(getattr(m, "weight", None), nn.Parameter)
    }


def _first_names(model: nn.Module) -> dict[int, str]:
    """``id`` → the name ``model.named_parameters()`` gives a parameter (the first, for one shared by modules)."""
    return {id(p): n for n, p in reversed(list(model.named_parameters()))}


def norm_parameters(model: nn.Module) -> dict[str, str]:
    """The parameters owned directly by normalization layers, by their name in ``model.named_parameters()``, with the
    layer's class name."""
    names = _first_names(model)
    return {names[i]: cls for i, (_, cls) in _norm_params(model).items() if i in names}


def embedding_parameters(model: nn.Module) -> list[str]:
    """The embedding weights, by their name in ``model.named_parameters()`` (a weight tied to a head is found under
    whichever name comes first)."""
    names = _first_names(model)
    return [names[i] for i in _embedding_params(model) if i in names]


@dataclass(frozen=True)
class ParamRoles:
    """What the audit needs to know of a model's parameters, by ``id``: those of normalization layers (with the
    layer's class) and the embedding weights. :meth:`named` gives them under the names a front end uses."""

    norms: dict[int, str]
    embeddings: set[int]

    def named(self, named: Mapping[str, torch.Tensor]) -> tuple[dict[str, str], list[str]]:
        """The norms and embeddings under ``named``'s names (the last name of a parameter listed under several: the
        front ends list a wrapped module's parameter under its wrapper's path, then under its own)."""
        names = {id(p): n for n, p in named.items()}
        return {names[i]: c for i, c in self.norms.items() if i in names}, [names[i] for i in self.embeddings if i in names]


def audit_session(named: Mapping[str, torch.Tensor], roles: ParamRoles, optimizers: Sequence[torch.optim.Optimizer], units: Iterable[Any]) -> GroupAudit:
    """:func:`audit_groups` as a session runs it: the roles under ``named``'s names, the tracked ``units``
    (:class:`~lightning_smd.engine.detect.NormalizedWeight`) as the normalized ones."""
    norms, embeddings = roles.named(named)
    return audit_groups(named, norms, optimizers, normalized=[u.params for u in units], embeddings=embeddings)


def param_roles(model: nn.Module) -> ParamRoles:
    """The normalization layers' parameters and the embedding weights of ``model``, by ``id``."""
    return ParamRoles({i: cls for i, (_, cls) in _norm_params(model).items()}, set(_embedding_params(model)))


def _adaptive(optimizer: Any) -> bool:
    """Adam-type (AdamW, Adam, NAdam, RAdam) or Lion: a per-coordinate (or sign) update, not a gradient step."""
    from lightning_smd.analysis.theory import AdamWRule, LionRule, rule_for

    try:
        return isinstance(rule_for(optimizer), (AdamWRule, LionRule))
    except Exception:  # an optimizer the theory cannot read is not Adam-type for this purpose
        return False


@dataclass(frozen=True)
class GroupFinding:
    """Gains and biases with weight decay in one param group."""

    optimizer: int
    group: int
    weight_decay: float
    norm: tuple[str, ...]
    """Parameters of normalization layers (gains, shifts)."""
    other: tuple[str, ...]
    """Other parameters with at most one dimension (biases, layer scales)."""

    @property
    def names(self) -> tuple[str, ...]:
        return self.norm + self.other


@dataclass
class GroupAudit:
    """What :func:`audit_groups` found."""

    decayed: list[GroupFinding] = field(default_factory=list)
    shared: dict[str, list[int]] = field(default_factory=dict)
    """Parameters in the param groups of more than one optimizer, with the optimizers' indices."""
    undecayed: list[str] = field(default_factory=list)
    """Normalized (scale-invariant) units none of whose parameters has weight decay, by their first parameter: no
    equilibrium (``SMD002``). A ``weight+bias`` unit whose weight is decayed is not one: conventional groups leave
    every bias undecayed, and the decay of the weight still pulls the unit in."""
    embeddings: list[str] = field(default_factory=list)
    """Embedding weights decayed by an Adam-type optimizer: information, not a warning (nanoGPT does it): a row is
    decayed at every step but updated only when its token occurs."""

    @property
    def findings(self) -> int:
        """The count of what the audit finds wrong: one per param group decaying gains or biases (``SMD038``), one for
        parameters in several optimizers (``SMD039``), one for normalized units without decay (said by ``SMD002``);
        decayed embeddings are information, not counted."""
        return len(self.decayed) + bool(self.shared) + bool(self.undecayed)

    def embeddings_note(self) -> str:
        """The line the verbose fit start prints about :attr:`embeddings` (information: no code, no warning)."""
        shown = shown_names(self.embeddings)
        return (
            f"SMDCallback: note: {len(self.embeddings)} embedding weight(s) ({shown}) are decayed by an Adam-type "
            "optimizer. Common (nanoGPT does it) and not an error, but a row is decayed at every step and updated only "
            "when its token occurs, so rare tokens' rows shrink; lightning_smd.param_groups(model, weight_decay=..., "
            "decay_embeddings=False) leaves them out."
        )

    def summary(self) -> dict[str, Any]:
        """The summary's ``groups`` block."""
        return {
            "decayed_gains_and_biases": [
                {"optimizer": f.optimizer, "group": f.group, "weight_decay": f.weight_decay, "normalization": list(f.norm), "other": list(f.other)}
                for f in self.decayed
            ],
            "in_several_optimizers": {k: list(v) for k, v in self.shared.items()},
            "normalized_without_decay": list(self.undecayed),
            "decayed_embeddings_adaptive": list(self.embeddings),
        }


def audit_groups(
    named: Mapping[str, torch.Tensor],
    norm_names: Iterable[str],
    optimizers: Sequence[torch.optim.Optimizer],
    *,
    normalized: Iterable[Sequence[str]] = (),
    embeddings: Iterable[str] = (),
) -> GroupAudit:
    """Each param group of ``optimizers`` with weight decay > 0 that holds parameters of normalization layers
    (``norm_names``) or parameters of at most one dimension; parameters in more than one optimizer; the normalized
    units (``normalized``: each the names of its parameters, e.g. ``("conv.weight", "conv.bias")``) none of whose
    parameters is decayed; the embedding weights (``embeddings``) an Adam-type optimizer decays. ``named``: the
    model's parameters by name (a parameter under several names is reported under its first)."""
    names = {id(p): name for name, p in named.items()}  # the last name: a wrapper's path comes before the module's own
    norms, embedded = set(norm_names), set(embeddings)
    units = [tuple(u) for u in normalized]
    in_units = {p for u in units for p in u}
    decayed_names: set[str] = set()
    audit = GroupAudit()
    owners: dict[int, list[int]] = {}
    for oi, opt in enumerate(optimizers):
        adaptive = _adaptive(opt) if embedded else False
        for gi, group in enumerate(opt.param_groups):
            wd = group.get("weight_decay", 0.0)
            try:
                wd = float(wd)
            except (TypeError, ValueError):
                wd = 0.0
            norm, other = [], []
            for p in group["params"]:
                if not p.requires_grad:  # frozen: no step moves it, whatever its group says
                    continue
                if oi not in owners.setdefault(id(p), []):
                    owners[id(p)].append(oi)
                name = names.get(id(p))
                if name is None or not wd > 0.0:
                    continue
                decayed_names.add(name)
                if adaptive and name in embedded:
                    audit.embeddings.append(name)
                elif name in in_units:  # part of a normalized unit (a weight+bias unit's bias): decay is its due
                    continue
                elif name in norms:
                    norm.append(name)
                elif p.dim() <= 1:
                    other.append(name)
            if norm or other:
                audit.decayed.append(GroupFinding(oi, gi, wd, tuple(norm), tuple(other)))
    audit.shared = {names[i]: o for i, o in owners.items() if len(o) > 1 and i in names}
    optimized = {names[i] for i in owners if i in names}
    audit.undecayed = [u[0] for u in units if u and all(p in optimized and p not in decayed_names for p in u)]
    return audit


def param_groups(model: nn.Module, weight_decay: float, *, decay: Iterable[str] = (), decay_embeddings: bool = True) -> list[dict[str, Any]]:
    """The conventional param groups of ``model``: weight decay ``weight_decay`` on the weights (parameters of two or
    more dimensions outside normalization layers), none on the gains, shifts and biases (normalization layers'
    parameters and every 1-D one). This is the grouping of nanoGPT and of timm's ``param_groups_weight_decay`` (which
    also takes a model's ``no_weight_decay()`` names out: pass the others with ``decay``, or build the groups with
    timm). ``decay``: names to decay whatever their shape (e.g. the normalized weights a detection found,
    ``[p for u in find_normalized_weights(model).units for p in u.params]``). ``decay_embeddings=False`` keeps the
    ``nn.Embedding`` weights out of the decay too.

    ``torch.optim.AdamW(lightning_smd.param_groups(model, weight_decay=0.05), lr=1e-3)``. Frozen parameters
    (``requires_grad=False``) are left out; an empty group is left out. A parameter shared under several names is
    placed once."""
    forced = set(decay)
    norms = _norm_params(model)
    kept = set() if decay_embeddings else set(_embedding_params(model))
    decayed, plain = [], []
    for name, p in model.named_parameters():  # each shared parameter once, under its first name
        if not p.requires_grad:
            continue
        if name in forced or (p.dim() >= 2 and id(p) not in norms and id(p) not in kept):
            decayed.append(p)
        else:
            plain.append(p)
    groups = []
    if decayed:
        groups.append({"params": decayed, "weight_decay": float(weight_decay)})
    if plain:
        groups.append({"params": plain, "weight_decay": 0.0})
    return groups
