"""DeepZ zonotopes (Singh et al. 2018, "Fast and Effective Robustness Certification").

z = G·x' + c + Σ_b E_b·ε_b with ε_b ∈ [−1, 1]^{m_b}: the input block G is concretised by the threat set itself
(for ℓ2 the dual norm, i.e. an ℓ2-ball block; for segments their support function), the error blocks E_b by
‖·‖₁. A crossing ReLU (l < 0 < u) maps z to λz + μ + μ·ε_new with λ = u/(u−l), μ = −λl/2 (the minimal-area
parallelogram); stable neurons are kept or zeroed. Error blocks carry ids so the two branches of a residual
block stay correlated when they are summed.

Two ways to compute the same numbers:

- forward: carry G and the error blocks through the network (one generator per input feature and per crossing
  neuron, each the width of the layer);
- backward: concretising a row Λ of a later layer equals back-substituting Λ through the parallel lines
  λẑ ≤ relu(ẑ) ≤ λẑ − λl (Fast-Lin's): each ReLU maps Λ ↦ Λλ and adds Λμ − |Λ|μ = Λ⁻·(−λl) to the lower bound,
  affine maps act on Λ as on G, and a residual sum adds the coefficients of the error terms both branches share,
  as the ids do. DeepZ is then Fast-Lin with its own pre-activation bounds for every neuron
  (``backsub.intermediate(intersect=False)``), where Fast-Lin also intersects each layer with IBP.

``compute`` takes the cheaper one (``symbolic.backward_is_cheaper``).
"""

from __future__ import annotations

import torch

from certlab.bounds import backsub
from certlab.bounds.symbolic import apply_lin, backward_is_cheaper, concretize_input, input_block, walk


def _bounds(G, c, E, x, threat):
    lo, hi = concretize_input(G, x, threat)
    rad = torch.zeros_like(c)
    for blk in E.values():
        rad = rad + blk.abs().sum(1)
    return lo + c - rad, hi + c + rad


def forward(g, x, threat):
    """(pre-activation bounds by ReLU node, output bounds) by the zonotope carried forward."""
    B = x.shape[0]

    def affine(op, v):
        G, c, E = v
        return apply_lin(op, G), op.fwd(c), {k: apply_lin(op, e) for k, e in E.items()}

    def add(v1, v2):
        (G1, c1, E1), (G2, c2, E2) = v1, v2
        E = dict(E1)
        for k, e in E2.items():
            E[k] = E[k] + e if k in E else e
        return G1 + G2, c1 + c2, E

    def relu(i, v):
        G, c, E = v
        l, u = _bounds(G, c, E, x, threat)
        crossing = (l < 0) & (u > 0)
        # u − l ≥ u > 0 where crossing; the floor only keeps the unused branch finite (l = u = 0), and at the dtype's
        # smallest normal it cannot shrink a real chord slope (which μ = −λl/2 below must match to stay sound)
        lam = torch.where(crossing, u / (u - l).clamp_min(torch.finfo(x.dtype).tiny), (l >= 0).to(x.dtype))
        mu = torch.where(crossing, -lam * l / 2, torch.zeros_like(l))
        E2 = {k: e * lam.unsqueeze(1) for k, e in E.items()}
        # one new error term per neuron that crosses in some sample of the batch
        cols = crossing.reshape(B, -1).any(0).nonzero().squeeze(1)
        if cols.numel():
            n = crossing[0].numel()
            blk = torch.zeros(B, cols.numel(), n, device=x.device, dtype=x.dtype)
            blk = blk.scatter(2, cols.view(1, -1, 1).expand(B, -1, 1), mu.reshape(B, n)[:, cols].unsqueeze(-1))
            E2[i] = blk.reshape(B, cols.numel(), *l.shape[1:])
        return (G * lam.unsqueeze(1), c * lam + mu, E2), (l, u)

    pre, (G, c, E) = walk(g, x, (input_block(x), torch.zeros_like(x), {}), affine, add, relu)
    return pre, _bounds(G, c, E, x, threat)


def intermediate(g, x, threat, **_):
    if backward_is_cheaper(g, x, threat):
        return backsub.intermediate(g, x, threat, lower="parallel", intersect=False)
    return forward(g, x, threat)[0]


def compute(g, x, threat, lower_only=False, **_):
    if backward_is_cheaper(g, x, threat):
        pre = backsub.intermediate(g, x, threat, lower="parallel", intersect=False)
        return backsub.output(g, x, threat, pre, lower="parallel", lower_only=lower_only)
    return forward(g, x, threat)[1]
