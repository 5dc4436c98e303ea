"""CNN-7 with BatchNorm (Shi et al. 2021 "Fast certified robust training with short warmup"; also used by ACERT).

conv(64) − conv(64) − conv(128, s2) − conv(128) − conv(128) − fc 512 − fc K, every conv 3×3 with padding 1,
each conv and the fc 512 followed by BatchNorm then ReLU. ``width`` (64) and ``linear`` (512) scale it.
"""

from __future__ import annotations

from torch import nn

from certlab.models._shapes import Stack, check_params, conv_side, image_shape, positive_int


def build_cnn7(name: str, shape: tuple[int, ...], num_classes: int, **params) -> Stack:
    p = check_params(name, params, {"width": 64, "linear": 512})
    width, linear = positive_int(name, "width", p["width"]), positive_int(name, "linear", p["linear"])
    c, h, w = image_shape(name, shape)
    stack = Stack()
    for out_c, s in [(width, 1), (width, 1), (2 * width, 2), (2 * width, 1), (2 * width, 1)]:
        stack.add("conv", nn.Conv2d(c, out_c, 3, stride=s, padding=1))
        stack.add("bn", nn.BatchNorm2d(out_c)).add("relu", nn.ReLU())
        c, h, w = out_c, conv_side(name, h, 3, s, 1), conv_side(name, w, 3, s, 1)
    stack.add("flatten", nn.Flatten())
    return stack.fc_head(c * h * w, (linear,), num_classes, bn=True)
