"""Checkpoints: one ``torch.save`` dict of plain types and tensors, written atomically and read with
``torch.load(weights_only=True)``.

Keys: ``format`` (= FORMAT), ``arch`` (model name), ``model_params``, ``dataset`` ({name, data, input_shape,
num_classes, mean, std, domain}), ``config`` (TrainConfig as a dict), ``epoch`` (completed epochs), ``model``
(state dict), ``optimizer``, ``scheduler`` (state dicts or None), ``rng`` (torch / numpy / python / loader
generator states), ``best`` (best validation score so far), ``global_step``.
"""

from __future__ import annotations

import os
import pickle
import random
import zipfile

import numpy as np
import torch

from certlab.errors import CheckpointError

FORMAT = "certlab-checkpoint-v1"
REQUIRED = ("format", "arch", "model_params", "dataset", "config", "epoch", "model")


def save(path, payload: dict) -> None:
    """``torch.save`` to a temporary file in the same folder, then ``os.replace`` (readers never see half a file)."""
    path = os.fspath(path)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            torch.save({"format": FORMAT, **payload}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load(path, map_location="cpu") -> dict:
    """Read a checkpoint; raise :class:`CheckpointError` if it is missing, corrupt or not a certlab checkpoint."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError, KeyError,
            AttributeError, TypeError, IndexError) as e:
        # torch's own text is many lines long and names its internals: the kind of failure is enough here
        raise CheckpointError(f"{path} is not a readable checkpoint: the file is corrupt, truncated or not a "
                              f"certlab checkpoint (torch.load raised {type(e).__name__})") from None
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a certlab checkpoint (no '{FORMAT}' format tag)")
    missing = [k for k in REQUIRED if k not in obj]
    if missing:
        raise CheckpointError(f"{path} is missing checkpoint keys: {', '.join(missing)}")
    return obj


# -- RNG states as plain tensors / lists (weights_only-loadable) ----------------------------------------------
def rng_state(loader_gen: torch.Generator | None = None) -> dict:
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    py = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "python": [py[0], list(py[1]), py[2]],
        "loader": loader_gen.get_state() if loader_gen is not None else None,
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict, loader_gen: torch.Generator | None = None) -> None:
    try:
        torch.set_rng_state(state["torch"])
        n = state["numpy"]
        np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
        p = state["python"]
        random.setstate((p[0], tuple(p[1]), p[2]))
        if loader_gen is not None and state.get("loader") is not None:
            loader_gen.set_state(state["loader"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"checkpoint holds an unusable RNG state: {e}") from None
