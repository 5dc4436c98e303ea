"""Model zoo: ``build(name, input_shape, num_classes, normalize=None, **params)`` returns an ``nn.Sequential``
made only of layers the bound engine understands (Linear, Conv2d, ReLU, Flatten, BatchNorm1d/2d, AvgPool2d,
Identity, Dropout, certlab.nn.Normalize, certlab.nn.Residual). See docs/models.md for the table and references.

``input_shape`` has no batch axis: ``(d,)`` or ``(C, H, W)``. With ``normalize=(mean, std)`` a
``certlab.nn.Normalize`` is the first layer, so ε stays in [0, 1] pixel units.
"""

from __future__ import annotations

from collections import OrderedDict

from torch import nn

from certlab.errors import CertlabError
from certlab.models._shapes import check_input_shape
from certlab.models.cnn7 import build_cnn7
from certlab.models.init import ibp_std, init_ibp_
from certlab.models.jovanovic import build_conv, build_convplus, build_fc5
from certlab.models.mlp import build_mlp
from certlab.models.wong import build_wong_large, build_wong_resnet, build_wong_small
from certlab.nn import Normalize

_ZOO = {
    "mlp": (build_mlp, "fully connected ReLU net fc h1 - ... - fc K; param hidden=(100,) (De Bartolomeis et al.)"),
    "fc5": (build_fc5, "fc 400-200-100-100-K (Jovanovic et al. 2022 FC5)"),
    "conv": (build_conv, "conv(16,k4,s2,p1) - fc 100 - fc K (Jovanovic et al. 2022 CONV)"),
    "convplus": (build_convplus,
                 "conv(16,k4,s2,p0) - conv(32,k4,s1,p0) - fc 100 - fc K (Jovanovic et al. 2022 CONV+)"),
    "wong-small": (build_wong_small,
                   "conv(16,k4,s2,p1) - conv(32,k4,s2,p1) - fc 100 - fc K (Wong & Kolter 2018)"),
    "wong-large": (build_wong_large,
                   "conv(32,k3,s1,p1) - conv(32,k4,s2,p1) - conv(64,k3,s1,p1) - conv(64,k4,s2,p1)"
                   " - fc 512 - fc 512 - fc K (Wong et al. 2018)"),
    "wong-resnet": (build_wong_resnet,
                    "conv16 - residual blocks 16,16,32,64 (conv shortcuts) - fc 1000 - fc K (Wong et al. 2018); "
                    "params blocks=1, factor=1"),
    "cnn7": (build_cnn7,
             "CNN-7 with BatchNorm: conv 64,64,128(s2),128,128 (3x3, p1) - fc 512 - fc K (Shi et al. 2021); "
             "params width=64, linear=512"),
}

NAMES: list[str] = list(_ZOO)


def _lookup(name):
    if name not in _ZOO:
        raise CertlabError(f"unknown model {name!r}; choose one of: {', '.join(NAMES)}")
    return _ZOO[name]


def describe(name: str) -> str:
    """One-line description of the architecture ``name``."""
    return _lookup(name)[1]


def build(name: str, input_shape, num_classes: int, normalize=None, **params) -> nn.Sequential:
    """Build the zoo model ``name`` for inputs of shape ``input_shape`` and ``num_classes`` logits."""
    builder = _lookup(name)[0]
    shape = check_input_shape(name, input_shape)
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise CertlabError(f"model {name!r}: num_classes must be an int ≥ 2, got {num_classes!r}")
    layers = builder(name, shape, num_classes, **params).layers
    if normalize is not None:
        layers = OrderedDict([("normalize", _normalize(name, shape, normalize)), *layers.items()])
    return nn.Sequential(layers)


def _normalize(name: str, shape: tuple[int, ...], normalize) -> Normalize:
    try:
        mean, std = normalize
        norm = Normalize(mean, std)
    except (TypeError, ValueError) as e:
        raise CertlabError(f"model {name!r}: normalize must be (mean, std) with std > 0: {e}") from None
    n = shape[0]  # channels for images, features for vectors
    if norm.mean.numel() not in (1, n):
        raise CertlabError(f"model {name!r}: normalize has {norm.mean.numel()} means but the input has {n} "
                           f"{'channels' if len(shape) == 3 else 'features'}")
    return norm


def count_params(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of scalar parameters (optionally only those with ``requires_grad``)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


__all__ = ["NAMES", "build", "describe", "init_ibp_", "ibp_std", "count_params"]
