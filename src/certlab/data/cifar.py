"""CIFAR-10 from the standard python pickle batches (``cifar-10-batches-py/data_batch_1..5``, ``test_batch``).

Each batch is a pickled dict with ``data`` (uint8 ``[n, 3072]``, channel-major 3×32×32) and ``labels`` (n ints in
0..9). Only these expected file names are ever unpickled, and with an unpickler that refuses every global except
the few numpy reconstructors an array needs (a foreign pickle cannot run code).

Folder: ``root/cifar10/cifar-10-batches-py`` (``root/cifar-10-batches-py`` or the batches folder itself as
``root`` work too). Missing batches are extracted from ``root/cifar10/cifar-10-python.tar.gz`` (downloaded if
absent; official md5 checked for the archive and each batch).
"""

from __future__ import annotations

import hashlib
import pickle
import tarfile
import warnings
from pathlib import Path

import numpy as np
import torch

from certlab.data.base import ArrayDataset, DatasetInfo
from certlab.data.download import (Remote, combine, download, md5_file, pick_folder, record, resolve_root, verify,
                                   write_atomic)
from certlab.errors import DataError

INFO = DatasetInfo("cifar10", (3, 32, 32), 10, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
BATCHES = "cifar-10-batches-py"
ARCHIVE = Remote("cifar-10-python.tar.gz", ("https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",),
                 "c58f30108f718f92721af3b95e74349a")
MD5 = {
    "data_batch_1": "c99cafc152244af753f735de768cd75f",
    "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
    "data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
    "data_batch_4": "634d18415352ddfa80567beed471001a",
    "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
    "test_batch": "40351d587109b95175f43aff81a1287e",
}
FILES = {"train": tuple(f"data_batch_{i}" for i in range(1, 6)), "test": ("test_batch",)}

_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
}


class _ArrayUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing global {module}.{name}")


def read_batch(path: Path) -> tuple:
    """(images uint8 [n, 3, 32, 32], labels int64 [n]) of one batch file."""
    try:
        with open(path, "rb") as f, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            obj = _ArrayUnpickler(f, encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError) as e:
        raise DataError(f"{path}: not a readable CIFAR batch ({type(e).__name__}: {e})") from None
    if not isinstance(obj, dict):
        raise DataError(f"{path}: expected a pickled dict, got {type(obj).__name__}")
    obj = {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in obj.items()}
    data, labels = obj.get("data"), obj.get("labels")
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        desc = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise DataError(f"{path}: 'data' must be uint8 [n, 3072], got {desc}")
    try:
        labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    except (TypeError, ValueError):
        raise DataError(f"{path}: 'labels' is not a list of integers") from None
    if labels.shape[0] != data.shape[0]:
        raise DataError(f"{path}: {data.shape[0]} images but {labels.shape[0]} labels (truncated or garbled)")
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise DataError(f"{path}: labels outside 0..9")
    return data.reshape(-1, 3, 32, 32), labels


def _extract(archive: Path, dest: Path, names) -> None:
    """Write the batches ``names`` from the official archive into ``dest`` (md5-checked, atomic)."""
    dest.mkdir(parents=True, exist_ok=True)
    wanted = {f"{BATCHES}/{n}": n for n in names}
    try:
        with tarfile.open(archive, "r:gz") as tf:
            for m in tf:
                if m.name in wanted and m.isfile():
                    data = tf.extractfile(m).read()
                    got = hashlib.md5(data).hexdigest()
                    want = MD5[wanted[m.name]]
                    if got != want:
                        raise DataError(f"{archive}: member {m.name} has md5 {got}, not the official {want}")
                    write_atomic(dest / wanted[m.name], data)
                    record(dest, wanted[m.name], got)
                    wanted.pop(m.name)
    except (tarfile.TarError, EOFError, OSError) as e:
        raise DataError(f"{archive}: unreadable archive ({type(e).__name__}: {e})") from None
    if wanted:
        raise DataError(f"{archive}: lacks {', '.join(sorted(wanted))}")


def load(split: str, root=None, download_missing: bool = True) -> ArrayDataset:
    base = resolve_root(root)
    names = FILES[split]
    folder = pick_folder([base / "cifar10" / BATCHES, base / BATCHES, base], list(MD5))
    missing = [n for n in names if not (folder / n).is_file()]
    if missing:
        home = base / "cifar10"
        folder = home / BATCHES
        hint = (f"put {', '.join(missing)} into {folder}, or the official {ARCHIVE.name} ({ARCHIVE.urls[0]}) "
                f"into {home}, or pass root= / set CERTLAB_DATA to the folder above 'cifar10'")
        archive = home / ARCHIVE.name
        if not archive.is_file():
            if not download_missing:
                raise DataError(f"cifar10: {', '.join(missing)} not found; " + hint)
            download("cifar10", home, [ARCHIVE], hint)
        elif md5_file(archive) != ARCHIVE.md5:
            raise DataError(f"{archive}: md5 {md5_file(archive)} is not the official {ARCHIVE.md5}")
        _extract(archive, folder, missing)
        archive.unlink()
        record(home, ARCHIVE.name, None)
    paths = [folder / n for n in names]
    how = combine(verify(p, MD5) for p in paths)
    parts = [read_batch(p) for p in paths]
    x = torch.from_numpy(np.concatenate([p[0] for p in parts]).astype(np.float32)).div_(255.0)
    y = torch.from_numpy(np.concatenate([p[1] for p in parts]))
    return ArrayDataset(x, y, "cifar10", split, INFO, paths, how)
