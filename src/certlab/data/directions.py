"""Signal directions for the segment-union threat set ``certlab.threat.SegmentUnion(directions, eps)``.

- ``spheres`` with ``segment_dirs: signal`` (the named alternative, not the paper's set): the signal direction of a
  point is radial, d(x) = x/‖x‖₂ (moving along it changes the class, moving
  orthogonally does not). With k > 1 the set grows by k − 1 seeded directions orthogonal to the radial one (the
  same k − 1 random directions for every sample, with their radial component removed and re-orthonormalised per
  sample): shape ``[B, k, d]``, the radial direction first. This is certlab's reading of "k signal-aligned segments"
  on spheres, where a point has only one signal direction.
- everything else, and ``segment_dirs: random`` (the default) on every dataset: ``k`` random orthonormal
  directions v_1..v_k shared by all samples, shape ``[k, *input_shape]`` — the B_{ε,k} of De Bartolomeis et al.
  2023. Gram-Schmidt of k Gaussian vectors drawn one after another with a seeded generator (= the Q factor of
  their QR factorisation with diag(R) > 0, so Haar distributed on the Stiefel manifold).
  The family is **nested**: for one seed, the directions for k are the first k of those for k + 1, so
  B_{ε,k} ⊂ B_{ε,k+1} and an axis over k only adds segments.
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
    """``k`` orthonormal directions of shape ``shape``: ``[k, *shape]``, rows orthonormal after flattening.

    Nested in ``k``: ``orthonormal(shape, k, seed)`` equals ``orthonormal(shape, k + 1, seed)[:k]``."""
    n = math.prod(shape)
    k = positive_int("k", k)
    if k > n:
        raise InputError(f"k={k} orthonormal directions do not exist in dimension {n}")
    if isinstance(seed, bool) or not hasattr(seed, "__index__"):
        raise InputError(f"seed must be an integer, got {seed!r}")
    g = torch.Generator().manual_seed(int(seed))
    # one Gaussian vector per direction, drawn in order (one call each: a single randn(k, n) call may fill its
    # last values differently for different k), so the first k draws are the same for every k' >= k
    q = torch.empty(k, n, dtype=torch.float64)
    for j in range(k):
        # Gram-Schmidt in draw order, projecting twice (stable in float64): row j depends only on draws 1..j, so the
        # rows are bit-for-bit the same for every k > j (a library QR need not be); this is the Q factor with
        # diag(R) > 0 of the Gaussian matrix, i.e. Haar distributed on the Stiefel manifold
        v = torch.randn(n, generator=g, dtype=torch.float64)
        for _ in range(2):
            v = v - q[:j].T @ (q[:j] @ v)
        q[j] = v / v.norm()
    return q.reshape(k, *shape).to(device=device, dtype=dtype)


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
