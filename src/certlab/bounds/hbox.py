"""hBox / symbolic intervals (Mirman et al. 2018, DiffAI; Gowal et al. 2018; Jovanović et al. 2022).

Each neuron is z = G·x' + c ± r: an exact affine form in the input plus a box of radius r. Affine layers act
exactly on G and c and as |W| on r. A ReLU keeps the form of stable-active neurons, zeroes stable-inactive ones,
and replaces a crossing neuron (l < 0 < u) by the box [0, u]: G = 0, c = r = u/2.
"""

from __future__ import annotations

import torch

from certlab.bounds.symbolic import apply_lin, concretize_input, input_block, walk


def _bounds(G, c, r, x, threat):
    lo, hi = concretize_input(G, x, threat)
    return lo + c - r, hi + c + r


def _run(g, x, threat):
    def affine(op, v):
        G, c, r = v
        return apply_lin(op, G), op.fwd(c), op.absfwd(r)

    def add(v1, v2):
        return tuple(a + b for a, b in zip(v1, v2))

    def relu(i, v):
        G, c, r = v
        l, u = _bounds(G, c, r, x, threat)
        active = (l >= 0).to(x.dtype)
        half = torch.where((l < 0) & (u > 0), u / 2, torch.zeros_like(u))
        return (G * active.unsqueeze(1), c * active + half, r * active + half), (l, u)

    pre, (G, c, r) = walk(g, x, (input_block(x), torch.zeros_like(x), torch.zeros_like(x)), affine, add, relu)
    return pre, _bounds(G, c, r, x, threat)


def compute(g, x, threat, lower_only=False, **_):
    return _run(g, x, threat)[1]


def intermediate(g, x, threat, **_):
    return _run(g, x, threat)[0]
