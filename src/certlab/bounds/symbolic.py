"""Forward symbolic forms shared by hBox and DeepZ.

A node's value is represented as  z = G·x' + c + (extra terms),  x' in the threat set, where the *input block*
G has shape [Bg, n_in, *shape] (Bg = 1 while G is the same for every sample, else B). Affine ops act on G through
their linear part; concretising G uses the threat set's own support function (so ℓ2 and segment sets are handled
with their dual norms, not a box).
"""

from __future__ import annotations

import math

import torch

from certlab.bounds import patches
from certlab.bounds.ops import SpecLinearOp


def input_block(x):
    n = x[0].numel()
    return torch.eye(n, device=x.device, dtype=x.dtype).reshape(1, n, *x.shape[1:])


def apply_lin(op, G):
    """The linear part of op applied to each generator row of G [Bg, m, *s] → [Bg, m, *s']."""
    Bg, m = G.shape[:2]
    if m == 0:
        return G.new_zeros(Bg, 0, *op.out_shape)
    if Bg == 1 and isinstance(op, SpecLinearOp):  # a per-sample specification needs B rows
        G = G.expand(op.index.shape[0], *G.shape[1:])
        Bg = G.shape[0]
    out = op.lin(G.reshape(Bg * m, *G.shape[2:]))
    return out.reshape(Bg, m, *out.shape[1:])


def concretize_input(G, x, threat):
    """(lower, upper) of G·x' over the set, each [B, *shape]."""
    B = x.shape[0]
    shape = G.shape[2:]
    n_in = G.shape[1]
    Gb = G.expand(B, *G.shape[1:]) if G.shape[0] == 1 else G
    A = Gb.reshape(B, n_in, -1).transpose(1, 2).reshape(B, -1, *x.shape[1:])
    lo, hi = threat.concretize(A, x)
    return lo.reshape(B, *shape), hi.reshape(B, *shape)


def walk(g, x, init, affine, add, relu):
    """Forward pass of a symbolic value over the graph: ``init`` at the input, then ``affine(op, v)``,
    ``add(v1, v2)`` and ``relu(i, v) -> (v', (l, u))`` per node. Returns (pre-activation bounds by ReLU node, value
    at the output)."""
    vals = {0: init}
    pre = {}
    for i, node in enumerate(g.nodes):
        if i == 0:
            continue
        if node.kind == "affine":
            vals[i] = affine(node.op, vals[node.inputs[0]])
        elif node.kind == "add":
            vals[i] = add(vals[node.inputs[0]], vals[node.inputs[1]])
        else:
            vals[i], pre[i] = relu(i, vals[node.inputs[0]])
    return pre, vals[len(g.nodes) - 1]


def backward_is_cheaper(g, x, threat) -> bool:
    """Whether hBox and DeepZ take their backward form: unless the ReLU layers whose every neuron would be
    back-substituted densely (not an affine map of the input, not a convolution chain in patches mode) outnumber
    half the forward form's generators (one per input feature and per ReLU neuron). On Jovanović et al.'s MNIST CONV
    the forward form carries B × 3,920 generators × 3,136 neurons, the backward one 100 dense rows; on a residual
    network of wide convolutions the forward form is the cheaper one."""
    from certlab.bounds.ibp import prefix_bounds

    exact = prefix_bounds(g, x, threat)[1]
    relus = [i for i, nd in enumerate(g.nodes) if nd.kind == "relu"]
    generators = x[0].numel() + sum(math.prod(g.nodes[i].shape) for i in relus)
    dense = sum(math.prod(g.nodes[i].shape) for i in relus
                if g.nodes[i].inputs[0] not in exact and patches.chain(g, g.nodes[i].inputs[0]) is None)
    return 2 * dense <= generators
