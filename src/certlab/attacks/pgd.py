"""Projected gradient descent (Madry et al., 2018).

From a random start ``x⁰`` in the set ``S``, ascend the loss ``L`` with fixed steps

    ℓ∞:  x^{k+1} = P_S(x^k + α·sign(∇L(x^k)))
    ℓ2:  x^{k+1} = P_S(x^k + α·∇L(x^k)/‖∇L(x^k)‖₂)

with ``α = 2.5·ε/steps`` by default (per sample when ε is). Every iterate is scored and the one with the lowest
margin is kept.
"""

from __future__ import annotations

import time

import torch

from certlab.attacks.base import LOSSES, Best, bview, loss_and_grad, random_start
from certlab.errors import InputError


def pgd(model, x, y, threat, generator, steps: int = 20, step_size=None, loss: str = "ce",
        rand_init: bool = True, deadline: float | None = None) -> Best:
    """One PGD run on the (already validated) batch; returns the per-sample best points (those so far once
    ``time.perf_counter()`` passes ``deadline``)."""
    if loss not in LOSSES:
        raise InputError(f"unknown PGD loss {loss!r}; choose from {sorted(LOSSES)}")
    lf = LOSSES[loss]
    eps = threat.eps_vector(x)
    if step_size is None:
        alpha = 2.5 * eps / steps
    else:
        alpha = torch.as_tensor(step_size, device=x.device, dtype=x.dtype).expand_as(eps)
        if not torch.isfinite(alpha).all() or (alpha < 0).any():
            raise InputError(f"step_size must be finite and >= 0, got {step_size!r}")
    alpha = bview(alpha, x)
    xa = random_start(threat, x, generator) if rand_init else x.clone()
    best = None
    for k in range(steps):
        if k and deadline is not None and time.perf_counter() > deadline:
            break
        _, g, z = loss_and_grad(model, xa, lambda z: lf(z, y))
        if best is None:
            best = Best(xa, z, y)
        else:
            best.update(xa, z)
        xa = threat.project(xa + alpha * threat.ascent(g), x)
    with torch.no_grad():
        best.update(xa, model(xa))
    return best
