"""What every loader returns: :class:`ArrayDataset` (in-memory tensors) and :class:`DatasetInfo` (static facts)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.data import TensorDataset

from certlab.errors import InputError


@dataclass(frozen=True)
class DatasetInfo:
    """Static facts about a dataset.

    ``input_shape``: shape of one sample (``[C, H, W]`` or ``[d]``); ``mean``/``std``: standard per-channel
    normalisation (``None`` for synthetic vectors, which are used unnormalised); ``domain``: the box the inputs live
    in (``(0, 1)`` for images, ``None`` for unbounded vectors) — pass it as ``domain=`` to the threat sets.
    """

    name: str
    input_shape: tuple
    num_classes: int
    mean: tuple | None = None
    std: tuple | None = None
    domain: tuple | None = (0.0, 1.0)


class ArrayDataset(TensorDataset):
    """A ``TensorDataset`` of ``(x float32, y int64)`` with the full tensors at hand as ``.x`` / ``.y``.

    ``files``: the files it was read from; ``verified``: how those files were checked.
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, name: str, split: str, info: DatasetInfo,
                 files: tuple = (), verified: str = ""):
        super().__init__(x, y)
        self.name, self.split, self.info = name, split, info
        self.files, self.verified = tuple(str(f) for f in files), verified

    @property
    def x(self) -> torch.Tensor:
        return self.tensors[0]

    @property
    def y(self) -> torch.Tensor:
        return self.tensors[1]

    def __repr__(self) -> str:
        extra = f", verified={self.verified!r}" if self.verified else ""
        return (f"ArrayDataset(name={self.name!r}, split={self.split!r}, n={len(self)}, "
                f"input_shape={tuple(self.x.shape[1:])}, classes={self.info.num_classes}{extra})")


def take_first(ds: ArrayDataset, n: int | None) -> ArrayDataset:
    """The first ``n`` samples of ``ds`` (``None``: all). Asking for more than there are is an error."""
    if n is None:
        return ds
    n = positive_int("n", n)
    if n > len(ds):
        raise InputError(f"{ds.name} {ds.split} has {len(ds)} samples, n={n} requested")
    return ArrayDataset(ds.x[:n], ds.y[:n], ds.name, ds.split, ds.info, ds.files, ds.verified)


def positive_int(name: str, v) -> int:
    if isinstance(v, bool) or not isinstance(v, int) and not (hasattr(v, "__index__")):
        raise InputError(f"{name} must be a positive integer, got {v!r}")
    v = int(v)
    if v < 1:
        raise InputError(f"{name} must be a positive integer, got {v}")
    return v


def real(name: str, v, lo: float | None = None, strict: bool = True) -> float:
    """A finite float, ``> lo`` (``strict``) or ``>= lo``."""
    try:
        f = float(v)
    except (TypeError, ValueError):
        raise InputError(f"{name} must be a number, got {v!r}") from None
    if f != f or f in (float("inf"), float("-inf")):
        raise InputError(f"{name} must be finite, got {v!r}")
    if lo is not None and (f <= lo if strict else f < lo):
        raise InputError(f"{name} must be {'>' if strict else '>='} {lo}, got {f}")
    return f
