"""Architectures of Wong & Kolter 2018 and Wong, Schmidt, Metzen, Kolter 2018 ("Scaling provable adversarial defenses").

- ``wong-small``: conv(16, k4, s2, p1) − conv(32, k4, s2, p1) − fc 100 − fc K
- ``wong-large``: conv(32, k3, s1, p1) − conv(32, k4, s2, p1) − conv(64, k3, s1, p1) − conv(64, k4, s2, p1)
                  − fc 512 − fc 512 − fc K
- ``wong-resnet``: conv(16, k3, s1, p1), then residual blocks of widths 16, 16, 32, 64, then fc 1000 − fc K.
  A block maps x to ReLU(skip(x) + conv_b(ReLU(conv_a(x)))):
    same size:   conv_a = conv(k3, s1, p1), conv_b = conv(k3, s1, p1), skip = conv(k1, s1, p0)
    downsample:  conv_a = conv(k4, s2, p1), conv_b = conv(k3, s1, p1), skip = conv(k2, s2, p0)
  The blocks of width 32 and 64 downsample (32×32 → 16×16 → 8×8 on CIFAR). With ``blocks=N`` and ``factor=f``
  the stages are [16f]·(N+1), [32f]·N, [64f]·N (the defaults N=1, f=1 give the four blocks above).
ReLU after every hidden layer, none after the logits.
"""

from __future__ import annotations

from collections import OrderedDict

from torch import nn

from certlab.models._shapes import Stack, check_params, conv_side, image_shape, positive_int
from certlab.models.jovanovic import conv_stack
from certlab.nn import Residual


def build_wong_small(name: str, shape: tuple[int, ...], num_classes: int, **params) -> Stack:
    check_params(name, params, {})
    return conv_stack(name, shape, [(16, 4, 2, 1), (32, 4, 2, 1)], (100,), num_classes)


def build_wong_large(name: str, shape: tuple[int, ...], num_classes: int, **params) -> Stack:
    check_params(name, params, {})
    convs = [(32, 3, 1, 1), (32, 4, 2, 1), (64, 3, 1, 1), (64, 4, 2, 1)]
    return conv_stack(name, shape, convs, (512, 512), num_classes)


def residual_block(in_c: int, out_c: int, downsample: bool) -> Residual:
    """skip(x) + conv_b(ReLU(conv_a(x))); the ReLU after the sum is added by the caller."""
    k_a, stride, k_skip = (4, 2, 2) if downsample else (3, 1, 1)
    body = nn.Sequential(OrderedDict(
        conv_a=nn.Conv2d(in_c, out_c, k_a, stride=stride, padding=1),
        relu=nn.ReLU(),
        conv_b=nn.Conv2d(out_c, out_c, 3, stride=1, padding=1),
    ))
    return Residual(body, nn.Conv2d(in_c, out_c, k_skip, stride=stride, padding=0))


def build_wong_resnet(name: str, shape: tuple[int, ...], num_classes: int, **params) -> Stack:
    p = check_params(name, params, {"blocks": 1, "factor": 1})
    n_blocks, f = positive_int(name, "blocks", p["blocks"]), positive_int(name, "factor", p["factor"])
    c, h, w = image_shape(name, shape)
    stack = Stack()
    stack.add("conv", nn.Conv2d(c, 16, 3, stride=1, padding=1)).add("relu", nn.ReLU())
    plan = [(16, 16 * f, False)] + [(16 * f, 16 * f, False)] * n_blocks
    plan += [(16 * f, 32 * f, True)] + [(32 * f, 32 * f, False)] * (n_blocks - 1)
    plan += [(32 * f, 64 * f, True)] + [(64 * f, 64 * f, False)] * (n_blocks - 1)
    for in_c, out_c, down in plan:
        if down:  # conv_a (k4 s2 p1) and skip (k2 s2 p0) both give ⌊n/2⌋; check the side stays ≥ 1
            h, w = conv_side(name, h, 4, 2, 1), conv_side(name, w, 4, 2, 1)
        stack.add("block", residual_block(in_c, out_c, down)).add("relu", nn.ReLU())
    stack.add("flatten", nn.Flatten())
    return stack.fc_head(64 * f * h * w, (1000,), num_classes)
