"""CROWN-IBP (Zhang et al. 2020, "Towards Stable and Efficient Training of Verifiably Robust Neural Networks").

Intermediate bounds by IBP, output bounds by CROWN back-substitution (adaptive slopes). The returned bound mixes
the two output bounds: β·CROWN-IBP + (1 − β)·IBP (β = 1: pure CROWN-IBP; β = 0: pure IBP). A convex combination of
two sound lower (upper) bounds is a sound lower (upper) bound.
"""

from certlab.bounds import backsub
from certlab.bounds.ibp import interval_pass
from certlab.errors import InputError


def intermediate(g, x, threat, **_):
    return interval_pass(g, x, threat)[0]


def compute(g, x, threat, lower_only=False, beta=1.0, **_):
    beta = float(beta)
    if not 0.0 <= beta <= 1.0:
        raise InputError(f"crown-ibp: beta must lie in [0, 1], got {beta}")
    pre, (il, iu), _ = interval_pass(g, x, threat)
    if beta == 0.0:
        return il, iu
    cl, cu = backsub.output(g, x, threat, pre, lower="adaptive", lower_only=lower_only)
    if beta == 1.0:
        return cl, cu
    low = beta * cl + (1 - beta) * il
    up = None if cu is None else beta * cu + (1 - beta) * iu
    return low, up
