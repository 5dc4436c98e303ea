"""IBP initialisation of Shi et al. 2021 ("Fast certified robust training with short warmup").

For a Linear or Conv2d layer with fan-in n (n = in_features, or in_channels·kh·kw for a conv):

    W ~ N(0, σ²),  σ = √(2π) / n,  b = 0.

Why: E|w| = σ√(2/π); if about half of the inputs' interval radii survive the ReLU, the expected output radius is
n · σ√(2/π) · Δ/2 = Δ, so IBP interval widths neither explode nor vanish with depth at initialisation.

Residual connections (our reading of the paper and of the authors' public release; no code copied): a sum of
two branches roughly doubles the interval radius, so every Linear/Conv2d whose input is a residual sum (directly or
through element-wise layers such as ReLU, BatchNorm, Dropout, Flatten) gets σ/2. That covers the first conv of a
block's body and its shortcut conv when the block follows another block, and the first fc after the last block;
all other convs of a block use the plain σ with their own fan-in.

BatchNorm layers are reset to their identity affine map (γ = 1, β = 0, running mean 0 / variance 1): BN
re-normalises the pre-activations anyway, and the scheme only prescribes Linear/Conv weights.

The authors' release leaves the final classifier at its default initialisation; ``skip_last=True`` does the same.
By default (``skip_last=False``) every Linear/Conv2d layer, the logits layer included, follows the rule above.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from certlab.nn import Residual

_AFFINE = (nn.Linear, nn.Conv2d)


def ibp_std(layer: nn.Module) -> float:
    """σ = √(2π)/fan_in for a Linear or Conv2d layer."""
    w = layer.weight
    fan_in = w.shape[1] * math.prod(w.shape[2:])
    return math.sqrt(2 * math.pi) / fan_in


@torch.no_grad()
def _init_affine(layer: nn.Module, halve: bool) -> None:
    layer.weight.normal_(0.0, ibp_std(layer))
    if halve:
        layer.weight.mul_(0.5)
    if layer.bias is not None:
        layer.bias.zero_()


def _walk(module: nn.Module, after_sum: bool, plan: list) -> bool:
    """Record (affine layer, halve?) in execution order; return whether the output is (a view of) a residual sum."""
    if isinstance(module, _AFFINE):
        plan.append((module, after_sum))
        return False
    if isinstance(module, Residual):
        _walk(module.body, after_sum, plan)
        _walk(module.shortcut, after_sum, plan)
        return True
    if isinstance(module, nn.Sequential):
        for child in module:
            after_sum = _walk(child, after_sum, plan)
        return after_sum
    inner = [m for m in module.modules() if isinstance(m, _AFFINE)]  # any other container: plain rule
    plan.extend((m, False) for m in inner)
    return after_sum if not inner else False


@torch.no_grad()
def init_ibp_(model: nn.Module, skip_last: bool = False) -> nn.Module:
    """Re-initialise ``model`` in place with the IBP initialisation (see module docstring); returns ``model``."""
    plan: list = []
    _walk(model, False, plan)
    if skip_last and plan:
        plan = plan[:-1]
    for layer, halve in plan:
        _init_affine(layer, halve)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.reset_parameters()
    return model
