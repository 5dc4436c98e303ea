"""Signal directions for the segment-union threat set ``certlab.threat.SegmentUnion(directions, eps)``.

- ``spheres``: the signal direction of a point is radial, d(x) = x/‖x‖₂ (moving along it changes the class, moving
  orthogonally does not): one direction per sample, shape ``[B, 1, d]``.
- everything else: ``k`` random orthonormal directions shared by all samples, shape ``[k, *input_shape]``:
  Q from the QR factorisation of a Gaussian ``[n, k]`` matrix (signs fixed by diag(R) > 0, so Q is Haar
  distributed on the Stiefel manifold) with a seeded generator.
"""

from __future__ import annotations

import math

import torch

from certlab.data.base import positive_int
from certlab.errors import InputError


def radial(x: torch.Tensor) -> torch.Tensor:
    """x/‖x‖₂ per sample, shape ``[B, 1, *x.shape[1:]]``."""
    flat = x.reshape(x.shape[0], -1)
    norms = flat.norm(dim=1)
    if (norms <= 0).any():
        raise InputError("radial direction undefined: a sample is the zero vector")
    return (flat / norms[:, None]).reshape(x.shape[0], 1, *x.shape[1:])


def orthonormal(shape: tuple, k: int, seed: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """``k`` orthonormal directions of shape ``shape``: ``[k, *shape]``, rows orthonormal after flattening."""
    n = math.prod(shape)
    k = positive_int("k", k)
    if k > n:
        raise InputError(f"k={k} orthonormal directions do not exist in dimension {n}")
    if isinstance(seed, bool) or not hasattr(seed, "__index__"):
        raise InputError(f"seed must be an integer, got {seed!r}")
    g = torch.Generator().manual_seed(int(seed))
    q, r = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64))
    q = q * torch.sign(torch.diagonal(r)).where(torch.diagonal(r) != 0, torch.ones(k, dtype=torch.float64))
    return q.T.reshape(k, *shape).to(device=device, dtype=dtype)
