"""Fully connected ReLU network ``mlp``: [Flatten] − fc h₁ − … − fc h_L − fc K, ReLU after hidden layers.

De Bartolomeis et al. use one hidden layer of 100 units, the default ``hidden=(100,)``.
"""

from __future__ import annotations

import math

from torch import nn

from certlab.errors import CertlabError
from certlab.models._shapes import Stack, check_params, positive_int


def build_mlp(name: str, shape: tuple[int, ...], num_classes: int, **params) -> Stack:
    p = check_params(name, params, {"hidden": (100,)})
    hidden = p["hidden"]
    if isinstance(hidden, int):
        hidden = (hidden,)
    try:
        hidden = tuple(positive_int(name, "hidden", h) for h in hidden)
    except TypeError:
        raise CertlabError(f"model {name!r}: parameter 'hidden' must be a sequence of positive ints, "
                           f"got {p['hidden']!r}") from None
    return dense_stack(shape, hidden, num_classes)


def dense_stack(shape: tuple[int, ...], hidden, num_classes: int) -> Stack:
    """Flatten (only for image inputs) then the fully connected layers."""
    stack = Stack()
    if len(shape) > 1:
        stack.add("flatten", nn.Flatten())
    return stack.fc_head(math.prod(shape), hidden, num_classes)
