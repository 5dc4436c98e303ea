"""SVHN (cropped digits) from the standard MATLAB files ``train_32x32.mat`` / ``test_32x32.mat``.

Each file holds ``X`` (uint8 ``[32, 32, 3, N]``) and ``y`` (``[N, 1]``, digits 1..10 where 10 means 0). Images
become ``[N, 3, 32, 32]`` in [0, 1]; label 10 becomes 0. Folder: ``root/svhn`` (or ``root`` itself).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from certlab.data.base import ArrayDataset, DatasetInfo
from certlab.data.download import Remote, download, pick_folder, resolve_root, verify, where_to_put
from certlab.errors import DataError

# mean/std: the per-channel statistics of the SVHN training set commonly used for normalisation
INFO = DatasetInfo("svhn", (3, 32, 32), 10, (0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970))
_URL = "http://ufldl.stanford.edu/housenumbers/"
MD5 = {"train_32x32.mat": "e26dedcc434d2e4c54c9b2d4a06d8373", "test_32x32.mat": "eb5a983be6a315427106f1b164d9cef3"}
FILES = {"train": "train_32x32.mat", "test": "test_32x32.mat"}


def read_mat(path: Path) -> tuple:
    """(images uint8 [N, 3, 32, 32], labels int64 [N] in 0..9)."""
    import scipy.io

    try:
        m = scipy.io.loadmat(str(path), variable_names=["X", "y"])
    except Exception as e:  # scipy raises many types (ValueError, MatReadError, OSError, ...) on bad files
        raise DataError(f"{path}: not a readable .mat file ({type(e).__name__}: {str(e)[:120]})") from None
    X, y = m.get("X"), m.get("y")
    if not isinstance(X, np.ndarray) or X.dtype != np.uint8 or X.ndim != 4 or X.shape[:3] != (32, 32, 3):
        desc = f"{X.dtype} {X.shape}" if isinstance(X, np.ndarray) else "missing"
        raise DataError(f"{path}: 'X' must be uint8 [32, 32, 3, N], got {desc}")
    if not isinstance(y, np.ndarray) or y.size != X.shape[3]:
        raise DataError(f"{path}: {X.shape[3]} images but {getattr(y, 'size', 0)} labels (truncated or garbled)")
    y = y.reshape(-1).astype(np.int64)
    if y.size and (y.min() < 1 or y.max() > 10):
        raise DataError(f"{path}: labels outside 1..10")
    return X.transpose(3, 2, 0, 1), np.where(y == 10, 0, y)


def load(split: str, root=None, download_missing: bool = True) -> ArrayDataset:
    base = resolve_root(root)
    name = FILES[split]
    folder = pick_folder([base / "svhn", base], list(MD5))
    path = folder / name
    if not path.is_file():
        remote = Remote(name, (_URL + name,), MD5[name])
        if not download_missing:
            raise DataError(f"svhn: {name} not found in {folder}; " + where_to_put("svhn", folder, [remote]))
        download("svhn", folder, [remote])
    how = verify(path, MD5)
    X, y = read_mat(path)
    x = torch.from_numpy(np.ascontiguousarray(X).astype(np.float32)).div_(255.0)
    return ArrayDataset(x, torch.from_numpy(y), "svhn", split, INFO, [path], how)
