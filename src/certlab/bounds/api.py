"""Public entry points: ``bounds``, ``margins``, ``relu_bounds`` (from :mod:`certlab.bounds.engine`, the dispatch to
one relaxation module each) and ``certify``, which decides near-zero certificates again in float64
(:mod:`certlab.bounds.rounding`)."""

from __future__ import annotations

import torch

from certlab.bounds import core, rounding
from certlab.bounds.engine import (  # noqa: F401
    ALIASES, METHODS, PARAMETRISED, RELAXATIONS, Bounds, bounds, compute, fold_spec, intermediate_bounds, margins, relu_bounds,
    resolve_method,
)


@core.float32_exact
def certify(model, x, y, threat, method="crown", recheck=True, **opts) -> torch.Tensor:
    """BoolTensor [B]: every margin f_y − f_j (j ≠ y) is provably > 0 on the whole set.

    ``recheck``: a float32 (or lower precision) certificate whose smallest margin is within rounding of zero is
    decided again in float64 (:mod:`certlab.bounds.rounding`); False decides by the sign of the bounds as computed."""
    with torch.no_grad():
        m = margins(model, x, y, threat, method, **opts)
        if recheck:
            m = rounding.settle(model, x, y, threat, resolve_method(method), m, opts)
    K = m.shape[1]
    y = y.to(m.device).long()
    m = m.masked_fill(torch.nn.functional.one_hot(y, K).bool(), float("inf"))
    return (m > 0).all(1)
