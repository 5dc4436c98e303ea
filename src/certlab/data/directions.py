"""Signal directions for the segment-union threat set ``certlab.threat.SegmentUnion(directions, eps)``.

- ``spheres``: the signal direction of a point is radial, d(x) = x/‖x‖₂ (moving along it changes the class, moving
  orthogonally does not). With k > 1 the set grows by k − 1 seeded directions orthogonal to the radial one (the
  same k − 1 random directions for every sample, with their radial component removed and re-orthonormalised per
  sample): shape ``[B, k, d]``, the radial direction first. This is certlab's reading of "k signal-aligned segments"
  on spheres, where a point has only one signal direction.
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


def radial_plus_orthogonal(x: torch.Tensor, k: int, seed: int) -> torch.Tensor:
    """[B, k, *x.shape[1:]]: the radial direction of each sample, then k − 1 orthonormal directions orthogonal to it."""
    k = positive_int("k", k)
    r = radial(x)
    if k == 1:
        return r
    B, n = x.shape[0], x[0].numel()
    if k > n:
        raise InputError(f"k={k} orthonormal directions do not exist in dimension {n}")
    rf = r.reshape(B, 1, n).double()
    q = orthonormal((n,), k, seed, device=x.device, dtype=torch.float64)[1:]  # [k-1, n]
    basis = torch.cat([rf, q.unsqueeze(0).expand(B, -1, -1)], 1)  # [B, k, n]
    # Gram-Schmidt per sample keeps the radial direction first and makes the rest orthogonal to it and each other;
    # a degenerate draw (q nearly parallel to x) is completed by QR of the projected block
    qq, rr = torch.linalg.qr(basis.transpose(1, 2))  # [B, n, k]
    qq = qq * torch.sign(torch.diagonal(rr, dim1=1, dim2=2)).where(torch.diagonal(rr, dim1=1, dim2=2) != 0,
                                                                  torch.ones(1, dtype=torch.float64, device=x.device)).unsqueeze(1)
    return qq.transpose(1, 2).reshape(B, k, *x.shape[1:]).to(x.dtype)
