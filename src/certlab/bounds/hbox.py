"""hBox / symbolic intervals (Mirman et al. 2018, DiffAI; Gowal et al. 2018; Jovanović et al. 2022).

Each neuron is z = G·x' + c ± r: an exact affine form in the input plus a box of radius r. Affine layers act
exactly on G and c and as |W| on r. A ReLU keeps the form of stable-active neurons, zeroes stable-inactive ones,
and replaces a crossing neuron (l < 0 < u) by the box [0, u]: G = 0, c = r = u/2.

Two ways to compute the same numbers:

- forward: carry G (one generator per input feature, each the width of the layer) with c and r;
- backward: split c = c_b + c_h, the biases carried through the kept neurons and the boxes' centres. G·x' + c_b of
  every neuron of a layer is a back-substitution of its rows through the affine maps with each earlier ReLU replaced
  by its mask (slope 1 on stable-active neurons, 0 elsewhere, no intercept: the bounds (l, 0) on the others give
  exactly that); c_h and r are vectors carried forward (c_h ↦ W·c_h without the bias, r ↦ |W|·r, and at a ReLU
  mask·(·) + u/2 on crossing neurons).

``compute`` takes the cheaper one (``symbolic.backward_is_cheaper``).
"""

from __future__ import annotations

import torch

from certlab.bounds import backsub
from certlab.bounds.symbolic import apply_lin, backward_is_cheaper, concretize_input, input_block, walk


def _bounds(G, c, r, x, threat):
    lo, hi = concretize_input(G, x, threat)
    return lo + c - r, hi + c + r


def _active(l, u):
    """The mask of kept neurons: stable-active ones with u > 0 (l = u = 0 is the constant 0, zeroed in both forms,
    as the back-substitution's lines do)."""
    return (l >= 0) & (u > 0)


def _relu(l, u, c, r):
    """The ReLU's action on the carried parts: (mask·c + u/2, mask·r + u/2) on crossing neurons' boxes."""
    active = _active(l, u).to(l.dtype)
    half = torch.where((l < 0) & (u > 0), u / 2, torch.zeros_like(u))
    return c * active + half, r * active + half


def _add(v1, v2):
    return tuple(a + b for a, b in zip(v1, v2))


def forward(g, x, threat):
    """(pre-activation bounds by ReLU node, output bounds) with G carried forward."""
    def affine(op, v):
        G, c, r = v
        return apply_lin(op, G), op.fwd(c), op.absfwd(r)

    def relu(i, v):
        G, c, r = v
        l, u = _bounds(G, c, r, x, threat)
        return (G * _active(l, u).to(x.dtype).unsqueeze(1), *_relu(l, u, c, r)), (l, u)

    pre, (G, c, r) = walk(g, x, (input_block(x), torch.zeros_like(x), torch.zeros_like(x)), affine, _add, relu)
    return pre, _bounds(G, c, r, x, threat)


def backward(g, x, threat):
    """The same by back-substitution of G·x' + c_b per layer, with (c_h, r) carried forward (module docstring)."""
    masks = {}

    def bounds(p, v):  # every neuron of node p: back-substituted G·x' + c_b, plus c_h ± r
        lo, hi = backsub.every_neuron(g, p, masks, x, threat, lower="parallel")
        c, r = v
        return lo + c - r, hi + c + r

    def affine(op, v):
        c, r = v
        return op.lin(c), op.absfwd(r)

    def relu(i, v):
        l, u = bounds(g.nodes[i].inputs[0], v)
        masks[i] = (l, torch.where(_active(l, u), u, torch.zeros_like(u)))  # lines: slope 1 where kept, else 0
        return _relu(l, u, *v), (l, u)

    pre, v = walk(g, x, (torch.zeros_like(x), torch.zeros_like(x)), affine, _add, relu)
    return pre, bounds(len(g.nodes) - 1, v)


def _run(g, x, threat):
    return backward(g, x, threat) if backward_is_cheaper(g, x, threat) else forward(g, x, threat)


def compute(g, x, threat, lower_only=False, **_):
    return _run(g, x, threat)[1]


def intermediate(g, x, threat, **_):
    return _run(g, x, threat)[0]
