"""The linear ReLU relaxation every back-substitution uses: lower and upper lines from pre-activation bounds."""

from __future__ import annotations

import torch


def relu_lines(l, u, lower="adaptive", crossing=False):
    """(lower slope a, upper slope s, upper intercept t) for pre-activation bounds [l, u], and the crossing mask
    (l < 0 < u) after them when ``crossing``.

    With l⁻ = min(l, 0) and u⁺ = max(u, 0): s = u⁺/(u⁺ − l⁻), which is the chord slope u/(u − l) for a crossing
    neuron, 1 for an active one (u/u) and 0 for a dead one (0/−l, and 0/tiny when l = u = 0); t = −l⁻·s. The adaptive
    lower slope is 1 where u⁺ + l⁻ > 0 (a crossing neuron with u > −l, or an active one) and 0 elsewhere. Only
    arithmetic: comparisons and ``where`` run several times slower than it on CPU tensors."""
    lm, up = l.clamp(max=0), u.clamp(min=0)
    s = up / (up - lm).clamp_min(torch.finfo(l.dtype).tiny)
    t = -lm * s
    a = s if lower == "parallel" else torch.sign((up + lm).clamp_min(0))
    if crossing:
        return a, s, t, (l < 0) & (u > 0)
    return a, s, t
