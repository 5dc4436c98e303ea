"""Synthetic vector datasets with a known geometry.

- ``spheres`` (Gilmer et al., "Adversarial spheres"): y ∈ {0, 1} equiprobable, x = R_y · z/‖z‖₂, z ~ N(0, I_d).
  Every point of class y lies exactly on the sphere of radius R_y; the classes are ℓ2-separated by γ = R1 − R0.
- ``linsep``: y ∈ {−1, +1} equiprobable (labels 0, 1), x = [γ·y; x̃], x̃ ~ N(0, σ² I_{d−1}). The hyperplane
  x₁ = 0 separates the classes with margin exactly γ (only the first coordinate carries signal).

Each (seed, split) pair has its own random streams (``numpy.random.SeedSequence([seed, dataset tag, split])``), so
the test split is drawn independently of the training split, the data is identical for a given seed, and the first
m points of a draw of n ≥ m points are the draw of m points.
"""

from __future__ import annotations

import numpy as np
import torch

from certlab.data.base import ArrayDataset, DatasetInfo, positive_int, real
from certlab.errors import InputError

DEFAULT_MARGIN = {"spheres": 0.3, "linsep": 1.0}
_TAG = {"spheres": 1, "linsep": 2}
_SPLIT = {"train": 0, "test": 1}


def info(name: str, d: int = 10, **_) -> DatasetInfo:
    return DatasetInfo(name, (positive_int("d", d),), 2, None, None, None)


def _rngs(name: str, split: str, seed) -> tuple:
    """(label stream, feature stream): separate streams keep the first m points of a larger draw identical."""
    if isinstance(seed, bool) or not hasattr(seed, "__index__") or int(seed) < 0:
        raise InputError(f"seed must be a non-negative integer, got {seed!r}")
    ss = np.random.SeedSequence([int(seed), _TAG[name], _SPLIT[split]])
    return tuple(np.random.default_rng(s) for s in ss.spawn(2))


def _size(split: str, n, n_test) -> int:
    return positive_int("n_test" if split == "test" and n_test is not None else "n",
                        n_test if split == "test" and n_test is not None else n)


def _radii(r0, r1, margin) -> tuple:
    r0 = real("r0", r0, 0.0)
    if r1 is None:
        r1 = r0 + (DEFAULT_MARGIN["spheres"] if margin is None else real("margin", margin, 0.0))
    else:
        r1 = real("r1", r1, r0)
        if margin is not None and abs((r1 - r0) - real("margin", margin, 0.0)) > 1e-9 * max(1.0, r1):
            raise InputError(f"spheres: margin={margin} contradicts r1 - r0 = {r1 - r0} (give one of r1, margin)")
    return r0, r1


def spheres(split: str, d=10, n=1000, n_test=None, r0=1.0, r1=None, margin=None, seed=0) -> ArrayDataset:
    """``n`` points (``n_test`` for the test split if given) on two concentric spheres in R^d."""
    d, size = positive_int("d", d), _size(split, n, n_test)
    r0, r1 = _radii(r0, r1, margin)
    ry, rz = _rngs("spheres", split, seed)
    y = (ry.random(size) < 0.5).astype(np.int64)
    z = rz.standard_normal((size, d))
    norms = np.linalg.norm(z, axis=1, keepdims=True)
    x = z / np.maximum(norms, 1e-300) * np.where(y == 1, r1, r0)[:, None]
    return ArrayDataset(torch.from_numpy(x.astype(np.float32)), torch.from_numpy(y.astype(np.int64)),
                        "spheres", split, info("spheres", d))


def linsep(split: str, d=10, n=1000, n_test=None, margin=None, sigma=1.0, seed=0) -> ArrayDataset:
    """``n`` points x = [γ·y; x̃] with y = ±1 (label (y+1)/2) and x̃ ~ N(0, σ² I_{d−1})."""
    d, size = positive_int("d", d), _size(split, n, n_test)
    gamma = DEFAULT_MARGIN["linsep"] if margin is None else real("margin", margin, 0.0)
    sigma = real("sigma", sigma, 0.0, strict=False)
    ry, rz = _rngs("linsep", split, seed)
    label = (ry.random(size) < 0.5).astype(np.int64)
    x = np.empty((size, d))
    x[:, 0] = gamma * (2 * label - 1)
    x[:, 1:] = sigma * rz.standard_normal((size, d - 1))
    return ArrayDataset(torch.from_numpy(x.astype(np.float32)), torch.from_numpy(label.astype(np.int64)),
                        "linsep", split, info("linsep", d))
