"""Per-unit state declared once: each part of the analysis lists its arrays as :class:`Field` s, and creation,
checkpointing and restoring follow from that list (the pattern of torchmetrics' ``Metric.add_state``).

A checkpoint holds plain Python types only (lists, numbers, strings, ``None``; nan and inf as the strings
``"nan"``, ``"inf"``, ``"-inf"``), so that ``torch.load(weights_only=True)`` reads it. Every field is written under
its :attr:`Field.key`; the keys of all the parts of one :class:`~lightning_smd.analysis.Diagnostics` are distinct
(:func:`check_distinct`) and are those of the checkpoints written before the parts existed.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from enum import Enum
from typing import Any, ClassVar

import numpy as np

__all__ = ["Field", "PerUnit", "plain", "unplain", "num", "check_distinct", "vector"]


@dataclass(frozen=True)
class Field:
    """One per-unit array (or list) of a part.

    ``dtype`` ``float``, ``int``, ``bool`` make a numpy array (``float64``, ``int64``, ``bool``) of ``fill``; ``object``
    makes a Python list of ``fill`` (called once per unit when it is callable, e.g. ``list``). ``width``: a 2-D array
    ``[units, width]``. ``kind`` converts list items when a checkpoint is read (e.g. a ``str`` enum from its value)."""

    name: str
    dtype: type
    fill: Any = math.nan
    width: int | None = None
    key: str | None = None
    """The checkpoint key (default: ``name``)."""
    added: bool = False
    """Added after the checkpoint layout was set: a checkpoint without it keeps the initial values."""
    kind: Callable[[Any], Any] | None = None

    @property
    def checkpoint_key(self) -> str:
        return self.key or self.name

    def new(self, n: int) -> Any:
        if self.dtype is object:
            return [self.fill() if callable(self.fill) else self.fill for _ in range(n)]
        dtype = {float: np.float64, int: np.int64, bool: bool}[self.dtype]
        return np.full((n, self.width) if self.width else n, self.fill, dtype=dtype)

    def dump(self, value: Any) -> Any:
        return plain(value if self.dtype is object else value.tolist())

    def load(self, raw: Any, current: Any) -> Any:
        value = unplain(raw)
        if self.dtype is object:
            return [self.kind(v) if self.kind is not None and v is not None else v for v in value]
        return np.asarray(value, dtype=current.dtype).reshape(current.shape)


class PerUnit:
    """A part of the analysis with per-unit state declared in :attr:`FIELDS`: one attribute per field, created for
    ``n`` units, written to and read from a checkpoint by :meth:`state_dict` / :meth:`load_state_dict`."""

    FIELDS: ClassVar[tuple[Field, ...]] = ()

    def __init__(self, n: int) -> None:
        self.n = n
        for f in self.FIELDS:
            setattr(self, f.name, f.new(n))

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in cls.FIELDS)

    def state_dict(self) -> dict[str, Any]:
        return {f.checkpoint_key: f.dump(getattr(self, f.name)) for f in self.FIELDS}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore every field from ``state`` (a missing field raises ``KeyError``, unless it is :attr:`Field.added`).
        Nothing is changed when a field is missing."""
        missing = [f.checkpoint_key for f in self.FIELDS if f.checkpoint_key not in state and not f.added]
        if missing:
            raise KeyError(f"the checkpoint's SMD state lacks {', '.join(missing)}")
        for f in self.FIELDS:
            if f.checkpoint_key in state:
                setattr(self, f.name, f.load(state[f.checkpoint_key], getattr(self, f.name)))


def check_distinct(parts: Iterable[type[PerUnit]], reserved: Iterable[str] = ()) -> None:
    """Raise if two fields of ``parts`` (or a field and a ``reserved`` key) share a checkpoint key or a name."""
    seen: dict[str, str] = {k: "the facade" for k in reserved}
    for part in parts:
        for f in part.FIELDS:
            for label in {f.checkpoint_key, f.name}:
                if label in seen and seen[label] != part.__name__:
                    raise TypeError(f"{part.__name__}.{f.name}: {label!r} is also declared by {seen[label]}")
                seen[label] = part.__name__


def plain(obj: Any) -> Any:
    """nan/inf as strings, numpy scalars as Python numbers, ``str`` enums as their values: a checkpoint-safe copy."""
    if isinstance(obj, Enum):
        return obj.value
    if isinstance(obj, (float, np.floating)):
        x = float(obj)
        return x if math.isfinite(x) else repr(x)
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.bool_):
        return bool(obj)
    if isinstance(obj, dict):
        return {k: plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [plain(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return plain(obj.tolist())
    return obj


def vector(value: Any) -> np.ndarray:
    """A :attr:`Field.kind` for per-unit float arrays of their own length (per-filter figures)."""
    return np.asarray(value, dtype=np.float64)


def unplain(obj: Any) -> Any:
    """The inverse of :func:`plain` (lists stay lists)."""
    if isinstance(obj, str) and obj in ("nan", "inf", "-inf"):
        return float(obj)
    if isinstance(obj, dict):
        return {k: unplain(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [unplain(v) for v in obj]
    return obj


def num(x: float) -> float | None:
    """A JSON-safe float: nan and inf become None."""
    x = float(x)
    return x if math.isfinite(x) else None
