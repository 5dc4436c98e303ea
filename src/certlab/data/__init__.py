"""Datasets: one call shape for synthetic and real data.

``load(name, split="train", root=None, **params)`` returns an :class:`ArrayDataset` of ``(x float32, y int64)``
with the full tensors as ``.x`` / ``.y``: images ``[N, C, H, W]`` in [0, 1], vectors ``[N, d]``.
``info(name)`` gives the input shape, number of classes and standard normalisation mean/std.
``signal_directions(name_or_dataset, k, seed, x=None)`` gives directions for ``certlab.threat.SegmentUnion``.

Names and parameters (see docs/data.md): spheres (d, n, n_test, r0, r1, margin, seed), linsep (d, n, n_test,
margin, sigma, seed), mnist / fashion-mnist / cifar10 / svhn (n, download), digits (n). Real datasets: ``n`` keeps
the first n samples; ``download=False`` never touches the network.
"""

from __future__ import annotations

import torch

from certlab.data import cifar, digits, idx, svhn, synthetic
from certlab.data.base import ArrayDataset, DatasetInfo, take_first
from certlab.data.directions import orthonormal, radial, radial_plus_orthogonal
from certlab.data.download import resolve_root
from certlab.errors import CertlabError, InputError

__all__ = ["load", "info", "signal_directions", "NAMES", "SPLITS", "PARAMS", "ArrayDataset", "DatasetInfo",
           "resolve_root"]

SPLITS = ("train", "test")
_FILE_PARAMS = {"n": None, "download": True}
PARAMS = {
    "spheres": {"d": 10, "n": 1000, "n_test": None, "r0": 1.0, "r1": None, "margin": None, "seed": 0},
    "linsep": {"d": 10, "n": 1000, "n_test": None, "margin": None, "sigma": 1.0, "seed": 0},
    "mnist": dict(_FILE_PARAMS),
    "fashion-mnist": dict(_FILE_PARAMS),
    "cifar10": dict(_FILE_PARAMS),
    "svhn": dict(_FILE_PARAMS),
    "digits": {"n": None},
}
NAMES = tuple(PARAMS)
_ALIASES = {"cifar-10": "cifar10", "fashion": "fashion-mnist", "fmnist": "fashion-mnist"}


def _canon(name) -> str:
    if not isinstance(name, str):
        raise CertlabError(f"dataset name must be a string, got {type(name).__name__}; valid: {', '.join(NAMES)}")
    key = name.strip().lower().replace("_", "-")
    key = _ALIASES.get(key, key)
    if key not in PARAMS:
        raise CertlabError(f"unknown dataset {name!r}; valid: {', '.join(NAMES)}")
    return key


def _params(key: str, params: dict) -> dict:
    unknown = sorted(set(params) - set(PARAMS[key]))
    if unknown:
        raise CertlabError(f"unknown parameter{'s' if len(unknown) > 1 else ''} {', '.join(unknown)} for dataset "
                           f"{key!r}; valid: {', '.join(PARAMS[key]) or 'none'}")
    return {**PARAMS[key], **params}


def info(name: str, **params) -> DatasetInfo:
    """Input shape, number of classes, normalisation mean/std (None for synthetic vectors) and input domain.

    ``params`` are the same as for :func:`load` (only ``d`` matters: the dimension of synthetic vectors)."""
    key = _canon(name)
    p = _params(key, params)
    if key in ("spheres", "linsep"):
        return synthetic.info(key, p["d"])
    return {"mnist": idx.INFO["mnist"], "fashion-mnist": idx.INFO["fashion-mnist"], "cifar10": cifar.INFO,
            "svhn": svhn.INFO, "digits": digits.INFO}[key]


def load(name: str, split: str = "train", root=None, **params) -> ArrayDataset:
    """The ``split`` ("train" or "test") of dataset ``name`` as an in-memory :class:`ArrayDataset`.

    Real datasets are read from ``root`` (else ``$CERTLAB_DATA``, else ``~/.cache/certlab``) and downloaded there
    if missing; a missing, truncated, garbled or checksum-failing file raises :class:`certlab.DataError`."""
    key = _canon(name)
    if split not in SPLITS:
        raise CertlabError(f"unknown split {split!r} for dataset {key!r}; valid: {', '.join(SPLITS)}")
    p = _params(key, params)
    if key == "spheres":
        return synthetic.spheres(split, **p)
    if key == "linsep":
        return synthetic.linsep(split, **p)
    if key == "digits":
        return take_first(digits.load(split), p["n"])
    dl = p["download"]
    if not isinstance(dl, bool):
        raise InputError(f"download must be True or False, got {dl!r}")
    if key in ("mnist", "fashion-mnist"):
        ds = idx.load(key, split, root, dl)
    elif key == "cifar10":
        ds = cifar.load(split, root, dl)
    else:
        ds = svhn.load(split, root, dl)
    return take_first(ds, p["n"])


def signal_directions(name_or_dataset, k: int = 1, seed: int = 0, x: torch.Tensor | None = None) -> torch.Tensor:
    """Directions for ``SegmentUnion(directions, eps)``.

    spheres: the radial direction x/‖x‖ of each sample first, then k − 1 seeded directions orthogonal to it,
    ``[B, k, d]`` (``x`` required, or the dataset's own ``.x`` when a dataset is passed). Others: ``k`` seeded random orthonormal directions
    ``[k, *input_shape]`` (input shape from ``x`` if given, else from the dataset / :func:`info`), on ``x``'s
    device when given. These are the runs' directions under ``segment_dirs: signal``; the default ``random``
    (the paper's B_{ε,k}) uses the k seeded orthonormal directions, nested in k, on every dataset, spheres too."""
    if isinstance(name_or_dataset, ArrayDataset):
        key, shape = name_or_dataset.name, tuple(name_or_dataset.x.shape[1:])
        if key == "spheres" and x is None:
            x = name_or_dataset.x
    else:
        key = _canon(name_or_dataset)
        shape = info(key).input_shape if key not in ("spheres", "linsep") else None
    if x is not None:
        if not isinstance(x, torch.Tensor) or x.dim() < 2:
            raise InputError("x must be a batch tensor [B, *input_shape]")
        shape = tuple(x.shape[1:])
    if key == "spheres":
        if x is None:
            raise InputError("spheres: signal directions are radial, pass the batch x")
        return radial_plus_orthogonal(x, k, seed)
    if shape is None:
        raise InputError(f"{key}: pass x (or the dataset) so the input dimension is known")
    if x is None or not x.is_floating_point():
        return orthonormal(shape, k, seed, device=None if x is None else x.device)
    return orthonormal(shape, k, seed, device=x.device, dtype=x.dtype)
