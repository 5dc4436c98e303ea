"""hBox / symbolic intervals (Mirman et al. 2018, DiffAI; Gowal et al. 2018; Jovanović et al. 2022).

Each neuron is z = G·x' + c ± r: an exact affine form in the input plus a box of radius r. Affine layers act
exactly on G and c and as |W| on r. A ReLU keeps the form of stable-active neurons, zeroes stable-inactive ones,
and replaces a crossing neuron (l < 0 < u) by the box [0, u]: G = 0, c = r = u/2.
"""

from __future__ import annotations

import torch

from certlab.bounds.symbolic import apply_lin, concretize_input, input_block


def _bounds(G, c, r, x, threat):
    lo, hi = concretize_input(G, x, threat)
    return lo + c - r, hi + c + r


def _run(g, x, threat):
    vals = {0: (input_block(x), torch.zeros_like(x), torch.zeros_like(x))}
    pre = {}
    for i, node in enumerate(g.nodes):
        if i == 0:
            continue
        if node.kind == "affine":
            G, c, r = vals[node.inputs[0]]
            vals[i] = (apply_lin(node.op, G), node.op.fwd(c), node.op.absfwd(r))
        elif node.kind == "add":
            (G1, c1, r1), (G2, c2, r2) = vals[node.inputs[0]], vals[node.inputs[1]]
            vals[i] = (G1 + G2, c1 + c2, r1 + r2)
        else:
            G, c, r = vals[node.inputs[0]]
            l, u = _bounds(G, c, r, x, threat)
            pre[i] = (l, u)
            active = (l >= 0).to(x.dtype)
            crossing = (l < 0) & (u > 0)
            half = torch.where(crossing, u / 2, torch.zeros_like(u))
            vals[i] = (G * active.unsqueeze(1), c * active + half, r * active + half)
    G, c, r = vals[len(g.nodes) - 1]
    return pre, _bounds(G, c, r, x, threat)


def compute(g, x, threat, lower_only=False, **_):
    return _run(g, x, threat)[1]


def intermediate(g, x, threat, **_):
    return _run(g, x, threat)[0]
