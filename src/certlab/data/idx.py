"""MNIST and Fashion-MNIST from the standard IDX files (``*-ubyte.gz``, or uncompressed).

IDX layout: magic ``00 00 08 nd`` (unsigned bytes, ``nd`` dimensions), ``nd`` big-endian uint32 sizes, then
``prod(sizes)`` bytes. A file whose magic, sizes or payload length disagree raises :class:`DataError` naming it —
a truncated file never yields a silently short dataset. A smaller but well-formed set (e.g. 5000 training
images) loads as it is.
"""

from __future__ import annotations

import gzip
import struct
import zlib
from pathlib import Path

import numpy as np
import torch

from certlab.data.base import ArrayDataset, DatasetInfo
from certlab.data.download import (Remote, cache_key, combine, download, md5_file, pick_folder, resolve_root, verify,
                                   where_to_put)
from certlab.errors import DataError

_CACHE: dict = {}

_MNIST_URLS = ("https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/")
_FASHION_URLS = ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",)

# official md5 of each .gz file
_MD5 = {
    "mnist": {
        "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
        "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
        "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
        "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
    },
    "fashion-mnist": {
        "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
        "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
        "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
        "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
    },
}
_URLS = {"mnist": _MNIST_URLS, "fashion-mnist": _FASHION_URLS}
_PREFIX = {"train": "train", "test": "t10k"}

INFO = {
    "mnist": DatasetInfo("mnist", (1, 28, 28), 10, (0.1307,), (0.3081,)),
    "fashion-mnist": DatasetInfo("fashion-mnist", (1, 28, 28), 10, (0.2860,), (0.3530,)),
}


def _names(split: str) -> tuple:
    p = _PREFIX[split]
    return f"{p}-images-idx3-ubyte", f"{p}-labels-idx1-ubyte"


def _read_bytes(path: Path) -> bytes:
    try:
        raw = path.read_bytes()
        return gzip.decompress(raw) if path.suffix == ".gz" else raw
    except EOFError:
        raise DataError(f"{path}: truncated gzip stream") from None
    except (OSError, zlib.error) as e:
        raise DataError(f"{path}: unreadable or garbled gzip data ({e})") from None


def read_idx(path: Path, ndim: int) -> np.ndarray:
    """The uint8 array stored in an IDX file with ``ndim`` dimensions (cached per file version)."""
    key = cache_key(path)
    if key is not None and (key, ndim) in _CACHE:
        return _CACHE[key, ndim]
    raw = _read_bytes(path)
    head = 4 + 4 * ndim
    if len(raw) < head:
        raise DataError(f"{path}: truncated IDX header ({len(raw)} bytes, need {head})")
    if raw[:4] != bytes((0, 0, 8, ndim)):
        raise DataError(f"{path}: not an IDX file of {ndim}-D unsigned bytes (magic {raw[:4].hex()}, "
                        f"expected 000008{ndim:02x})")
    dims = struct.unpack(f">{ndim}I", raw[4:head])
    need = int(np.prod(dims, dtype=np.int64))
    have = len(raw) - head
    if have != need:
        raise DataError(f"{path}: header declares sizes {dims} = {need} bytes but the payload has {have} "
                        f"({'truncated' if have < need else 'trailing garbage'})")
    arr = np.frombuffer(raw, dtype=np.uint8, count=need, offset=head).reshape(dims)
    if key is not None:
        if len(_CACHE) >= 8:  # a few decoded files at most
            _CACHE.pop(next(iter(_CACHE)))
        _CACHE[key, ndim] = arr
    return arr


def _find(folder: Path, base: str) -> Path | None:
    for name in (base + ".gz", base):
        if (folder / name).is_file():
            return folder / name
    return None


def load(name: str, split: str, root=None, download_missing: bool = True) -> ArrayDataset:
    """``name`` in {"mnist", "fashion-mnist"}; images ``[N, 1, 28, 28]`` in [0, 1], labels 0..9."""
    base = resolve_root(root)
    img_name, lab_name = _names(split)
    folder = pick_folder([base / name, base], [img_name, lab_name])
    paths = [_find(folder, img_name), _find(folder, lab_name)]
    missing = [Remote(b + ".gz", tuple(u + b + ".gz" for u in _URLS[name]), _MD5[name][b + ".gz"])
               for b, p in zip((img_name, lab_name), paths) if p is None]
    if missing:
        if not download_missing:
            raise DataError(f"{name}: {', '.join(r.name for r in missing)} not found in {folder}; "
                            + where_to_put(name, folder, missing))
        download(name, folder, missing)
        paths = [_find(folder, img_name), _find(folder, lab_name)]
    how = {verify(p, _MD5[name]) for p in paths}
    other = "fashion-mnist" if name == "mnist" else "mnist"
    for p in paths:  # same file names for both sets: catch a folder of the other one
        if p.name in _MD5[other] and md5_file(p) == _MD5[other][p.name]:
            raise DataError(f"{p} is the official {other} file, not {name} (wrong folder?)")
    images, labels = read_idx(paths[0], 3), read_idx(paths[1], 1)
    if images.shape[1:] != (28, 28):
        raise DataError(f"{paths[0]}: images are {images.shape[1]}x{images.shape[2]}, expected 28x28")
    if images.shape[0] != labels.shape[0]:
        raise DataError(f"{paths[0]} holds {images.shape[0]} images but {paths[1]} holds {labels.shape[0]} labels")
    if labels.size and labels.max() > 9:
        raise DataError(f"{paths[1]}: label {int(labels.max())} outside 0..9")
    x = torch.from_numpy(images.astype(np.float32)).div_(255.0).unsqueeze(1)
    y = torch.from_numpy(labels.astype(np.int64))
    return ArrayDataset(x, y, name, split, INFO[name], paths, combine(how))
