"""Certificates that hang on rounding: decided again in float64.

Bounds are computed with torch's round-to-nearest arithmetic in the dtype of the model and x, not with outward
rounding. A float32 margin bound m differs from its exact-arithmetic value by a few units of float32 rounding
(2⁻²⁴ ≈ 6e-8) times the size of the numbers it is made of (measured on MNIST models: at most 2.6e-7 of
|clean margin| + bound gap). So the sign of m is trusted only when

    m > REL · (1 + |c| + |c − m|),      c = f_y(x) − f_j(x), the clean margin,

with REL = 1e-4 (about 400× the largest error measured). A sample whose margins are all positive but one of them
lies under that line is recomputed in float64 — a float64 copy of the model, x and the set's own radii — and decided
by the float64 margins, whose rounding (2⁻⁵³ ≈ 1e-16) is nine orders of magnitude further from the decision. When
no float64 copy can be made, such a sample is not certified. Samples that no margin puts near zero cost one clean
forward pass of the certified samples (for c) and nothing else.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from certlab.bounds import core

REL = 1e-4


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
            except Exception:  # a model that cannot be copied: its borderline samples stay uncertified
                self._failed = True
        return self._net


def batch_dependent(model: nn.Module) -> bool:
    """True when the model's map depends on the whole batch (BatchNorm with batch statistics): then no sample can
    be recomputed on its own."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) and (m.training or not m.track_running_stats)
               for m in model.modules())


@torch.no_grad()
def settle(model, x, y, threat, method, m, opts=None, twin: Float64Twin | None = None) -> torch.Tensor:
    """m ([B, K] lower margin bounds computed in x's dtype, column y ignored) with the rows of the samples whose
    certificate hangs on rounding replaced by their float64 margins (cast back to m's dtype: a positive float64
    margin too small for it becomes 0, not certified)."""
    if x.dtype == torch.float64 or m.numel() == 0:
        return m
    from certlab.bounds.api import margins  # local: the API imports this module

    B, K = m.shape
    y = y.to(device=m.device, dtype=torch.long)
    own = torch.nn.functional.one_hot(y, K).bool()
    cand = ((m > 0) | own).all(1).nonzero().flatten()
    if cand.numel() == 0:
        return m
    whole = batch_dependent(model)
    if whole:
        logits = core.build_graph(model, x, full=True).output_value[cand]
    else:
        logits = core.build_graph(model, x[cand], full=True).output_value
    logits = logits.to(m.dtype)
    clean = logits.gather(1, y[cand].unsqueeze(1)) - logits
    mc = m[cand]
    tol = REL * (1 + clean.abs() + (clean - mc).abs())
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
