"""Certified radius: the largest ε ≤ ε_max at which a relaxation certifies each sample.

The worst certified margin m(ε) = min_{j≠y} lower(f_y − f_j) over the set of radius ε is (for these relaxations)
non-increasing in ε, so the radius is the root of m(ε) = 0 on [0, ε_max]. We keep, per sample, a bracket
[lo, hi] with lo certified and hi not, and shrink it until hi − lo ≤ tol:

- ``bisect``: mid-point steps;
- ``brent``: a safeguarded secant (regula falsi with the Illinois fix, falling back to bisection whenever the
  step would leave the middle 90% of the bracket or fails to halve it within two steps), Brent-style.

All samples are searched at once (one batched ``certify`` per step, per-sample ε), without gradient. Samples that the
model misclassifies get 0; samples certified at ε_max get ε_max. The returned radius is always certified (it is
a bracket end that was checked). The search converges onto m(ε) = 0, so its last decisions are the ones rounding
can flip: margins within rounding of zero are decided in float64 (:mod:`certlab.bounds.rounding`).
"""

from __future__ import annotations

import torch

from certlab.bounds import core
from certlab.bounds.api import margins
from certlab.bounds.rounding import Float64Twin, settle
from certlab.errors import InputError
from certlab.threat import KINDS, ThreatSet


def _template(norm, threat):
    if threat is not None:
        if not isinstance(threat, ThreatSet):
            raise InputError(f"threat must be a certlab threat set, got {type(threat).__name__}")
        return threat
    cls = KINDS.get(norm)
    if cls is None or cls.needs_directions:
        raise InputError(f"norm must be 'linf' or 'l2' (or pass threat=...), got {norm!r}")
    return cls(0.0)


def _worst_margin(model, x, y, threat, eps, method, opts, twin, stats=None):
    if stats is not None:  # one batched bound evaluation over x.shape[0] samples
        stats["evals"] = stats.get("evals", 0) + 1
        stats["sample_evals"] = stats.get("sample_evals", 0) + int(x.shape[0])
    th = threat.with_eps(eps)
    m = margins(model, x, y, th, method=method, **opts)
    if twin is not None:  # margins within rounding of zero: decided in float64
        m = settle(model, x, y, th, method, m, opts, twin)
    K = m.shape[1]
    m = m.masked_fill(torch.nn.functional.one_hot(y, K).bool(), float("inf"))
    return m.min(1).values


@torch.no_grad()
@core.float32_exact
def certified_radius(model, x, y, norm="linf", method="ibp", max_eps=None, tol=1e-5, solver="bisect", threat=None,
                     max_steps=100, recheck=True, stats=None, **opts) -> torch.Tensor:
    """Tensor [B]: per sample, the largest certified ε in [0, max_eps] (to within ``tol``). ``recheck``: margins
    within rounding of zero are decided in float64 (see :func:`certlab.bounds.api.certify`). ``stats``: a dict
    in which the search adds its batched bound evaluations (``evals``) and the samples they bounded
    (``sample_evals``)."""
    tmpl = _template(norm, threat)
    if max_eps is None:
        raise InputError("certified_radius needs max_eps")
    max_eps = float(max_eps)
    if not max_eps > 0:
        raise InputError(f"max_eps must be > 0, got {max_eps}")
    if not tol > 0:
        raise InputError(f"tol must be > 0, got {tol}")
    if solver not in ("bisect", "brent"):
        raise InputError(f"solver must be 'bisect' or 'brent', got {solver!r}")
    tmpl.with_eps(0.0).validate(x)
    B = x.shape[0]
    y = y.to(x.device).long()
    if B == 0:
        return x.new_zeros(0)
    correct = model(x).argmax(1) == y
    twin = Float64Twin(model) if recheck else None
    lo = x.new_zeros(B)
    hi = x.new_full((B,), max_eps)
    m_hi = _worst_margin(model, x, y, tmpl, hi, method, opts, twin, stats)
    at_max = (m_hi > 0) & correct
    m_lo = _worst_margin(model, x, y, tmpl, lo, method, opts, twin, stats)
    ok0 = (m_lo > 0) & correct
    active = ok0 & ~at_max
    lo = torch.where(at_max, hi, lo)
    stalls = torch.zeros(B, dtype=torch.long, device=x.device)
    side = torch.zeros(B, dtype=torch.long, device=x.device)  # Illinois: which end was kept last time
    f_lo, f_hi = m_lo.clone(), m_hi.clone()
    for _ in range(max_steps):
        active = active & (hi - lo > tol)
        if not active.any():
            break
        mid = (lo + hi) / 2
        if solver == "brent":
            denom = (f_lo - f_hi)
            sec = lo + f_lo * (hi - lo) / torch.where(denom.abs() > 0, denom, torch.ones_like(denom))
            w = hi - lo
            good = (denom > 0) & (sec > lo + 0.05 * w) & (sec < hi - 0.05 * w) & (stalls < 2)
            mid = torch.where(good, sec, mid)
        mid = torch.where(active, mid, lo)
        idx = active.nonzero().squeeze(1)
        f = _worst_margin(model, x[idx], y[idx], tmpl, mid[idx], method, opts, twin, stats)
        cert = torch.zeros(B, dtype=torch.bool, device=x.device)
        fm = torch.zeros(B, dtype=x.dtype, device=x.device)
        cert[idx] = f > 0
        fm[idx] = f
        width_before = hi - lo
        new_lo = torch.where(active & cert, mid, lo)
        new_hi = torch.where(active & ~cert, mid, hi)
        # Illinois modification: halve the retained end's value when the same end is kept twice
        f_lo_new = torch.where(active & cert, fm, torch.where(active & (side == -1), f_lo / 2, f_lo))
        f_hi_new = torch.where(active & ~cert, fm, torch.where(active & (side == 1), f_hi / 2, f_hi))
        side = torch.where(active, torch.where(cert, torch.ones_like(side), -torch.ones_like(side)), side)
        lo, hi, f_lo, f_hi = new_lo, new_hi, f_lo_new, f_hi_new
        halved = (hi - lo) <= width_before / 2
        stalls = torch.where(active, torch.where(halved, torch.zeros_like(stalls), stalls + 1), stalls)
    return torch.where(ok0, lo, torch.zeros_like(lo))


def average_certified_radius(radii: torch.Tensor, max_eps: float) -> float:
    """ACR as a fraction of max_eps: mean(radius) / max_eps (ACERT reports it this way, in %)."""
    if radii.numel() == 0:
        return 0.0
    return float(radii.float().mean().item() / float(max_eps))
