"""Certificates that hang on rounding: decided again in float64.

Bounds are computed with torch's round-to-nearest arithmetic in the dtype of the model and x, not with outward
rounding. A float32 bound is a sum of many products; its error is a few units of float32 rounding (2⁻²⁴ ≈ 6e-8)
times the size of those products — which may be far larger than the bound itself when they cancel. ``magnitudes``
bounds that size for every logit without any cancellation: s₀ = max(|lo|, |hi|) over the set's interval hull, then
s' = |W| s + |b| through affine layers (the sum of the absolute terms of each dot product), unchanged through ReLUs,
summed at residual additions. The terms of every relaxation's bound on f_y − f_j (coefficients are products of W's and
of ReLU slopes in [0, 1], intercepts are at most the pre-activation bounds) are sized like those of the forward
pass, so M = s_y + s_j sizes them all. The sign of a float32 margin bound m is trusted only when

    m > REL · (1 + M),      REL = 1e-5

(about 170 units of float32 rounding of M; M overestimates the terms, and the largest float32 −
float64 difference measured on two MNIST CNNs, IBP/CROWN-IBP/CROWN at ε 0.02 and 0.1, is 9.4e-9·(1 + M), a thousand
times below the line). A sample whose margins are all positive but one lies under that line
is recomputed in float64 — a float64 copy of the model, x and the set's own radii — and decided by the float64
margins, whose rounding (2⁻⁵³ ≈ 1e-16) is nine orders of magnitude further from the decision. When no float64 copy
can be made, such a sample is not certified. Samples whose margins are all clear of the line cost one
magnitude pass (about an IBP radius pass) over the certified samples and nothing else. Float32's false negatives
within rounding are left alone: they cost completeness, not soundness.
"""

from __future__ import annotations

import copy
import warnings

import torch
from torch import nn

from certlab.bounds import core
from certlab.bounds.engine import margins

REL = 1e-5


class Float64Twin:
    """A float64 copy of a model, made on first use (kept by callers that decide many times, e.g. radius search)."""

    def __init__(self, model: nn.Module):
        self.model = model
        self._net = None
        self._failed = False

    def get(self) -> nn.Module | None:
        if self._net is None and not self._failed:
            try:
                self._net = copy.deepcopy(self.model).to(torch.float64)
            except Exception as e:  # a model that cannot be copied: its borderline samples stay uncertified
                self._failed = True
                warnings.warn(f"certlab: no float64 copy of the model for rechecking certificates within float32 "
                              f"rounding of zero ({type(e).__name__}: {e}); those samples are reported uncertified",
                              RuntimeWarning, stacklevel=2)
        return self._net


def batch_dependent(model: nn.Module) -> bool:
    """True when the model's map depends on the whole batch (BatchNorm with batch statistics): then no sample can
    be recomputed on its own."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) and (m.training or not m.track_running_stats)
               for m in model.modules())


def magnitudes(g, x, threat) -> torch.Tensor:
    """[B, K]: per logit, a bound on the size of every term that goes into it (and into any bound on it) over the
    set's interval hull, without cancellation: |W|·s + |b| per affine layer."""
    return node_magnitudes(g, x, threat)[len(g.nodes) - 1].reshape(x.shape[0], -1)


def node_magnitudes(g, x, threat) -> dict:
    """{node index: tensor}: ``magnitudes``' pass for every node of the graph, not only the output."""
    lo, hi = threat.interval_hull(x)
    s = {0: torch.maximum(lo.abs(), hi.abs())}
    for i, node in enumerate(g.nodes):
        if i == 0:
            continue
        if node.kind == "affine":
            zero = torch.zeros(1, *node.op.in_shape, dtype=x.dtype, device=x.device)
            s[i] = node.op.absfwd(s[node.inputs[0]]) + node.op.fwd(zero).abs()
        elif node.kind == "relu":
            s[i] = s[node.inputs[0]]
        else:
            s[i] = s[node.inputs[0]] + s[node.inputs[1]]
    return s


@torch.no_grad()
@core.float32_exact
def tolerances(model, x, y, threat, rel: float | None = None) -> torch.Tensor:
    """[B, K]: rel·(1 + M) per margin f_y − f_j, M = magnitude of f_y plus that of f_j (``rel`` defaults to REL)."""
    M = magnitudes(core.build_graph(model, x), x, threat)
    y = y.to(device=M.device, dtype=torch.long)
    return (REL if rel is None else rel) * (1 + M.gather(1, y.unsqueeze(1)) + M)


@torch.no_grad()
@core.float32_exact
def settle(model, x, y, threat, method, m, opts=None, twin: Float64Twin | None = None) -> torch.Tensor:
    """m ([B, K] lower margin bounds computed in x's dtype, column y ignored) with the rows of the samples whose
    certificate hangs on rounding replaced by their float64 margins (cast back to m's dtype: a positive float64
    margin too small for it becomes 0, not certified)."""
    if x.dtype == torch.float64 or m.numel() == 0:
        return m
    B, K = m.shape
    y = y.to(device=m.device, dtype=torch.long)
    own = torch.nn.functional.one_hot(y, K).bool()
    cand = ((m > 0) | own).all(1).nonzero().flatten()
    if cand.numel() == 0:
        return m
    whole = batch_dependent(model)  # a subset alone would be mapped with its own batch statistics
    if whole:
        tol = tolerances(model, x, y, threat)[cand]
    else:
        tol = tolerances(model, x[cand], y[cand], threat.subset(x, cand))
    mc = m[cand]
    near = ((mc <= tol) & ~own[cand]).any(1)
    if not near.any():
        return m
    sel = cand[near]
    out = m.clone()
    net = (twin or Float64Twin(model)).get()
    if net is None:
        out[sel] = 0.0
        return out
    if whole:
        m64 = margins(net, x.to(torch.float64), y, threat, method, **(opts or {}))[sel]
    else:
        m64 = margins(net, x[sel].to(torch.float64), y[sel], threat.subset(x, sel), method, **(opts or {}))
    out[sel] = m64.to(m.dtype)
    return out
