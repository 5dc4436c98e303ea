"""scikit-learn's built-in 8×8 handwritten digits (1797 images, no download) with a fixed split.

Pixels 0..16 are scaled to [0, 1] by /16. Split: for each class, a fixed permutation
(``numpy.random.default_rng(0)``) puts 50 images in the test set, so test = 500 images (50 per class) and
train = the other 1297.
"""

from __future__ import annotations

import numpy as np
import torch

from certlab.data.base import ArrayDataset, DatasetInfo

TEST_PER_CLASS = 50
# mean/std of all pixels of the 1297-image training split (after /16)
INFO = DatasetInfo("digits", (1, 8, 8), 10, (0.3056,), (0.3763,))


def split_indices(y: np.ndarray) -> tuple:
    """(train indices, test indices), both sorted: ``TEST_PER_CLASS`` test images per class."""
    rng = np.random.default_rng(0)
    test = np.sort(np.concatenate([rng.permutation(np.flatnonzero(y == c))[:TEST_PER_CLASS]
                                   for c in range(10)]))
    return np.setdiff1d(np.arange(len(y)), test), test


def load(split: str) -> ArrayDataset:
    from sklearn.datasets import load_digits

    d = load_digits()
    idx = split_indices(d.target)[0 if split == "train" else 1]
    x = torch.from_numpy((d.data[idx] / 16.0).astype(np.float32)).reshape(-1, 1, 8, 8)
    y = torch.from_numpy(d.target[idx].astype(np.int64))
    return ArrayDataset(x, y, "digits", split, INFO, verified="scikit-learn")
