"""VNN-LIB properties (the VNN-COMP format) for ℓ∞ robustness of one sample.

The file declares the flattened input ``X_0 … X_{n−1}`` (row-major order of the ONNX input) and the logits
``Y_0 … Y_{K−1}``, bounds every input to ``[max(x_i − ε, lo), min(x_i + ε, hi)]`` and asserts the *unsafe* outputs:
some other class j reaches the label's logit, ``(or (and (>= Y_j Y_y)) …)``. A verifier answering "unsat" proves
robustness; "sat" comes with a counterexample.
"""

from __future__ import annotations

import os
import re

import numpy as np
import torch

from certlab.errors import CertlabError


def _fmt(v: float) -> str:
    return repr(float(v))


def vnnlib_text(x, y: int, eps: float, num_classes: int, domain=(0.0, 1.0)) -> str:
    x = np.asarray(x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else x, dtype=np.float64).reshape(-1)
    eps = float(eps)
    if not eps >= 0 or not np.isfinite(eps):
        raise CertlabError(f"eps must be a finite number >= 0, got {eps}")
    if not 0 <= int(y) < num_classes or num_classes < 2:
        raise CertlabError(f"label {y} must lie in [0, {num_classes - 1}] (num_classes >= 2)")
    lo, hi = x - eps, x + eps
    if domain is not None:
        lo, hi = np.maximum(lo, domain[0]), np.minimum(hi, domain[1])
    lines = [f"; certlab robustness property: label {int(y)}, l_inf eps {eps!r}, {x.size} inputs, {num_classes} outputs"]
    lines += [f"(declare-const X_{i} Real)" for i in range(x.size)]
    lines += [f"(declare-const Y_{j} Real)" for j in range(num_classes)]
    lines.append("; input box")
    for i in range(x.size):
        lines.append(f"(assert (<= X_{i} {_fmt(hi[i])}))")
        lines.append(f"(assert (>= X_{i} {_fmt(lo[i])}))")
    lines.append("; unsafe: another class scores at least as high as the label")
    others = [j for j in range(num_classes) if j != int(y)]
    lines.append("(assert (or")
    lines += [f"    (and (>= Y_{j} Y_{int(y)}))" for j in others]
    lines.append("))")
    return "\n".join(lines) + "\n"


def write_vnnlib(path, x, y: int, eps: float, num_classes: int, domain=(0.0, 1.0)) -> None:
    """Write the property for sample x (any shape; flattened row-major) with label y (atomic)."""
    text = vnnlib_text(x, y, eps, num_classes, domain)
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".tmp-{os.getpid()}-{os.path.basename(path)}")
    try:
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


_BOUND = re.compile(r"\(assert \((<=|>=) X_(\d+) ([-+0-9.eE]+|inf|-inf)\)\)")
_OUT = re.compile(r"\(and \(>= Y_(\d+) Y_(\d+)\)\)")


def read_vnnlib(path):
    """(lo [n], hi [n], label, others) from a file in the format above (input box and one-label disjunction)."""
    text = open(os.fspath(path)).read()
    n = len(re.findall(r"\(declare-const X_\d+ Real\)", text))
    if n == 0:
        raise CertlabError(f"{path}: no input variables declared")
    lo, hi = np.full(n, -np.inf), np.full(n, np.inf)
    for op, i, v in _BOUND.findall(text):
        (hi if op == "<=" else lo)[int(i)] = float(v)
    pairs = _OUT.findall(text)
    labels = {int(b) for _, b in pairs}
    if len(labels) != 1:
        raise CertlabError(f"{path}: expected disjunction of (>= Y_j Y_y) for one label y, found {sorted(labels)}")
    return lo, hi, labels.pop(), sorted(int(a) for a, _ in pairs)
