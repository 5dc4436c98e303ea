"""Exact worst case over a union of segments by line search (as De Bartolomeis et al. evaluate segment threats).

For ``S = ⋃_j {x + β·d_j : β ∈ [β⁻_j, β⁺_j]}`` the attack solves, per sample,

    min_j  min_{β ∈ [β⁻_j, β⁺_j]}  m(x + β·d_j),     m(z) = f_y(z) − max_{i≠y} f_i(z)

by a dense grid of ``grid`` points on every segment, then ``refine`` rounds that re-grid ``[β_{g−1}, β_{g+1}]``
around each segment's best point with ``refine_points`` points (the bracket shrinks by ``(refine_points−1)/2`` per
round). All samples and segments are evaluated together, in chunks of at most ``chunk`` forward rows.
"""

from __future__ import annotations

import torch

from certlab.attacks.base import Best, margin


def _margins(model, x, y, d, betas, chunk):
    """Margins at ``x + β·d_j`` for betas ``[B, k, G]`` -> ``[B, k, G]``."""
    B, k, G = betas.shape
    n = d.shape[-1]
    per = max(1, chunk // (k * G))
    out = []
    with torch.no_grad():
        for s in range(0, B, per):
            xb = x[s:s + per].reshape(-1, 1, 1, n)
            pts = xb + betas[s:s + per].unsqueeze(-1) * d[s:s + per].unsqueeze(2)  # [b, k, G, n]
            b = pts.shape[0]
            z = model(pts.reshape(b * k * G, *x.shape[1:]))
            yy = y[s:s + per].repeat_interleave(k * G)
            out.append(margin(z, yy).view(b, k, G))
    return torch.cat(out, 0)


def segment_search(model, x, y, threat, grid: int = 101, refine: int = 3, refine_points: int = 21,
                   chunk: int = 8192) -> Best:
    """Line search over every segment of a :class:`~certlab.threat.SegmentUnion`; returns the best points."""
    d = threat.directions_for(x)  # [B, k, n]
    blo, bhi = threat.beta_range(x)  # [B, k]
    t = torch.linspace(0, 1, grid, device=x.device, dtype=x.dtype)
    betas = blo.unsqueeze(-1) + (bhi - blo).unsqueeze(-1) * t  # [B, k, G]
    m = _margins(model, x, y, d, betas, chunk)
    gi = m.argmin(-1, keepdim=True)
    best_m, best_b = m.gather(-1, gi).squeeze(-1), betas.gather(-1, gi).squeeze(-1)  # [B, k]
    tr = torch.linspace(0, 1, refine_points, device=x.device, dtype=x.dtype)
    for _ in range(refine):
        G = betas.shape[-1]
        lo = betas.gather(-1, (gi - 1).clamp_min(0))
        hi = betas.gather(-1, (gi + 1).clamp_max(G - 1))
        betas = lo + (hi - lo) * tr
        m = _margins(model, x, y, d, betas, chunk)
        gi = m.argmin(-1, keepdim=True)
        mr, br = m.gather(-1, gi).squeeze(-1), betas.gather(-1, gi).squeeze(-1)
        better = mr < best_m
        best_m = torch.where(better, mr, best_m)
        best_b = torch.where(better, br, best_b)
        # keep refining around the overall best point of each segment
        gi = torch.where(better.unsqueeze(-1), gi, (betas - best_b.unsqueeze(-1)).abs().argmin(-1, keepdim=True))
    j = best_m.argmin(1)
    beta = best_b.gather(1, j.view(-1, 1)).squeeze(1)
    x_adv = threat.points(x, j, beta)
    with torch.no_grad():
        z = model(x_adv)
    return Best(x_adv, z, y)
