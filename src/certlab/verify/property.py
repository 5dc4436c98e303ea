"""Properties in the VNN-COMP form: an input region and an *unsafe* output condition.

A :class:`Property` is a disjunction of :class:`Region` s. A region is one input box ``lower ≤ x ≤ upper``
(flattened, row-major order of the network input) and a disjunction of conjunctions of linear constraints on the
outputs ``f``: conjunction ``k`` holds at ``f`` when ``C_k f ≤ d_k`` row by row. The property is *satisfied* (sat)
when some point of some box makes some conjunction hold; it is *verified* (unsat) when no point does.

Soundness of an "unsat" from bounds: a conjunction cannot hold anywhere in the box as soon as one of its rows has
``min_x (c·f(x)) − d > 0``; a lower bound of ``c·f`` over the box that exceeds ``d`` proves it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from certlab.errors import InputError

TOL = 1e-6  # a row's lower bound must exceed d by this (plus a relative share) to refute it


@dataclass
class Region:
    """One input box and the disjunction ``OR_k (C_k f ≤ d_k)`` of output conjunctions that is unsafe on it."""

    lower: np.ndarray
    upper: np.ndarray
    conjunctions: list = field(default_factory=list)  # [(C [m, K] float64, d [m] float64)]

    def __post_init__(self):
        self.lower = np.asarray(self.lower, dtype=np.float64).reshape(-1)
        self.upper = np.asarray(self.upper, dtype=np.float64).reshape(-1)
        if self.lower.shape != self.upper.shape:
            raise InputError(f"box bounds differ in size: {self.lower.size} lower, {self.upper.size} upper")
        if np.isnan(self.lower).any() or np.isnan(self.upper).any():
            raise InputError("box bounds contain NaN")
        if not (np.isfinite(self.lower).all() and np.isfinite(self.upper).all()):
            i = int(np.nonzero(~(np.isfinite(self.lower) & np.isfinite(self.upper)))[0][0])
            raise InputError(f"input X_{i} is not bounded on both sides")
        bad = np.nonzero(self.lower > self.upper)[0]
        if bad.size:
            i = int(bad[0])
            raise InputError(f"input X_{i} has lower bound {self.lower[i]!r} > upper bound {self.upper[i]!r}")
        self.conjunctions = [(np.atleast_2d(np.asarray(C, np.float64)), np.asarray(d, np.float64).reshape(-1))
                             for C, d in self.conjunctions]

    def satisfied(self, f, tol: float = 0.0) -> int | None:
        """Index of a conjunction that holds at output vector f (within tol), else None."""
        f = np.asarray(f, dtype=np.float64).reshape(-1)
        for k, (C, d) in enumerate(self.conjunctions):
            if np.all(C @ f <= d + tol):
                return k
        return None

    def contains(self, x, tol: float = 0.0) -> bool:
        x = np.asarray(x, dtype=np.float64).reshape(-1)
        return bool(np.all(x >= self.lower - tol) and np.all(x <= self.upper + tol))


@dataclass
class Property:
    """``OR_r (x ∈ box_r AND OR_k C_rk f ≤ d_rk)`` over ``n_inputs`` inputs and ``n_outputs`` outputs."""

    n_inputs: int
    n_outputs: int
    regions: list

    def __post_init__(self):
        for r in self.regions:
            if r.lower.size != self.n_inputs:
                raise InputError(f"a box has {r.lower.size} inputs, the property declares {self.n_inputs}")
            for C, d in r.conjunctions:
                if C.shape[1] != self.n_outputs or C.shape[0] != d.size:
                    raise InputError(f"an output constraint block has shape {C.shape} with {d.size} constants; "
                                     f"expected [m, {self.n_outputs}] with m constants")

    def violation(self, x, f, tol: float = 1e-6) -> bool:
        """True when (x, f) witnesses the property: x in a box whose unsafe condition holds at f."""
        return any(r.contains(x, tol) and r.satisfied(f, tol) is not None for r in self.regions)


def robustness(lower, upper, label: int, num_classes: int) -> Property:
    """"Some other class scores at least the label's": ``OR_{j≠y} (f_y − f_j ≤ 0)`` on one box."""
    conj = []
    for j in range(num_classes):
        if j != label:
            C = np.zeros((1, num_classes))
            C[0, label], C[0, j] = 1.0, -1.0
            conj.append((C, np.zeros(1)))
    return Property(int(np.size(lower)), num_classes, [Region(lower, upper, conj)])
