"""Shape arithmetic and argument checks shared by the zoo builders.

A conv layer with kernel k, stride s, padding p maps a side of length n to ⌊(n + 2p − k)/s⌋ + 1.
"""

from __future__ import annotations

import numbers
from collections import OrderedDict

from torch import nn

from certlab.errors import CertlabError


def check_input_shape(name: str, input_shape) -> tuple[int, ...]:
    """``input_shape`` without the batch axis: ``(d,)`` for vectors or ``(C, H, W)`` for images."""
    try:
        shape = tuple(int(s) for s in input_shape)
    except (TypeError, ValueError):
        raise CertlabError(f"model {name!r}: input_shape must be a tuple of ints like (1, 28, 28) or (d,), "
                           f"got {input_shape!r}") from None
    if len(shape) not in (1, 3) or any(s < 1 for s in shape):
        raise CertlabError(f"model {name!r}: input_shape must be (d,) or (C, H, W) with positive sizes "
                           f"(no batch axis), got {input_shape!r}")
    return shape


def image_shape(name: str, shape: tuple[int, ...]) -> tuple[int, int, int]:
    """(C, H, W) of an image input; vectors are refused for convolutional models."""
    if len(shape) != 3:
        raise CertlabError(f"model {name!r} is convolutional and needs an image input_shape (C, H, W); "
                           f"got the vector shape {shape}; use 'mlp' or 'fc5' for vector data")
    return shape  # type: ignore[return-value]


def conv_side(name: str, n: int, k: int, s: int, p: int) -> int:
    """Output side ⌊(n + 2p − k)/s⌋ + 1 of a conv layer, or CertlabError if the input is too small."""
    out = (n + 2 * p - k) // s + 1
    if out < 1:
        raise CertlabError(f"model {name!r}: input is too small: a conv with kernel {k}, stride {s}, "
                           f"padding {p} gets a side of {n} pixels and would output {out}")
    return out


class Stack:
    """Ordered, auto-named list of layers (``conv1``, ``bn1``, ``relu1``, ``fc1`` …) for an ``nn.Sequential``."""

    def __init__(self):
        self.layers: OrderedDict[str, nn.Module] = OrderedDict()
        self._count: dict[str, int] = {}

    def add(self, kind: str, module: nn.Module) -> "Stack":
        self._count[kind] = self._count.get(kind, 0) + 1
        self.layers[f"{kind}{self._count[kind]}"] = module
        return self

    def fc_head(self, in_features: int, widths, num_classes: int, bn: bool = False) -> "Stack":
        """Linear layers through ``widths`` (ReLU after each, BatchNorm1d before it if ``bn``), then the logits."""
        for w in widths:
            self.add("fc", nn.Linear(in_features, w))
            if bn:
                self.add("bn", nn.BatchNorm1d(w))
            self.add("relu", nn.ReLU())
            in_features = w
        self.add("fc", nn.Linear(in_features, num_classes))
        return self


def check_params(name: str, params: dict, allowed: dict) -> dict:
    """Merge ``params`` into the defaults ``allowed``; unknown keys raise CertlabError listing the valid ones."""
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        valid = ", ".join(sorted(allowed)) or "none"
        raise CertlabError(f"model {name!r} has no parameter {', '.join(map(repr, unknown))}; valid: {valid}")
    return {**allowed, **params}


def positive_int(name: str, key: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise CertlabError(f"model {name!r}: parameter {key!r} must be a positive int, got {value!r}")
    return int(value)
