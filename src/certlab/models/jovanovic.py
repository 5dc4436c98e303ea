"""Architectures of Jovanović et al. 2022 ("On the paradox of certified training"): ``fc5``, ``conv``, ``convplus``.

- ``fc5``:      fc 400 − fc 200 − fc 100 − fc 100 − fc K
- ``conv``:     conv(16, k4, s2, p1) − fc 100 − fc K
- ``convplus``: conv(16, k4, s2, p0) − conv(32, k4, s1, p0) − fc 100 − fc K
ReLU after every hidden layer, none after the logits.
"""

from __future__ import annotations

from torch import nn

from certlab.models._shapes import Stack, check_params, conv_side, image_shape
from certlab.models.mlp import dense_stack


def build_fc5(name: str, shape: tuple[int, ...], num_classes: int, **params) -> Stack:
    check_params(name, params, {})
    return dense_stack(shape, (400, 200, 100, 100), num_classes)


def conv_stack(name: str, shape, convs, fc_widths, num_classes: int) -> Stack:
    """Convs given as (out_channels, kernel, stride, padding), ReLU after each, then Flatten and the fc head."""
    c, h, w = image_shape(name, shape)
    stack = Stack()
    for out_c, k, s, pad in convs:
        stack.add("conv", nn.Conv2d(c, out_c, k, stride=s, padding=pad))
        stack.add("relu", nn.ReLU())
        c, h, w = out_c, conv_side(name, h, k, s, pad), conv_side(name, w, k, s, pad)
    stack.add("flatten", nn.Flatten())
    return stack.fc_head(c * h * w, fc_widths, num_classes)


def build_conv(name: str, shape: tuple[int, ...], num_classes: int, **params) -> Stack:
    check_params(name, params, {})
    return conv_stack(name, shape, [(16, 4, 2, 1)], (100,), num_classes)


def build_convplus(name: str, shape: tuple[int, ...], num_classes: int, **params) -> Stack:
    check_params(name, params, {})
    return conv_stack(name, shape, [(16, 4, 2, 0), (32, 4, 1, 0)], (100,), num_classes)
