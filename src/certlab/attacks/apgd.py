"""Auto-PGD (Croce & Hein, ICML 2020, "Reliable evaluation of adversarial robustness with an ensemble of diverse
parameter-free attacks").

Budget ``N`` iterations, step ``η⁰ = 2ε``, momentum ``α = 0.75``, ``P`` the projection onto the set:

    z^{k+1} = P(x^k + η^k·s(∇L(x^k)))                     s = sign (ℓ∞) or g/‖g‖₂ (ℓ2)
    x^{k+1} = P(x^k + α(z^{k+1} − x^k) + (1 − α)(x^k − x^{k−1}))   (α = 1 on the first step)

Checkpoints ``w_j = ⌈p_j N⌉`` with ``p₀ = 0, p₁ = 0.22, p_{j+1} = p_j + max(p_j − p_{j−1} − 0.03, 0.06)``.
At a checkpoint the step is halved and the iterate restarts from the best-loss point ``x_max`` when

1. fewer than ``ρ·(w_j − w_{j−1})`` of the steps since the last checkpoint increased the loss (ρ = 0.75), or
2. the step was not halved at the last checkpoint and the best loss ``L_max`` has not improved since.

Losses: cross-entropy (APGD-CE), DLR (APGD-DLR) and targeted DLR (APGD-T, one run per target class).
"""

from __future__ import annotations

import math
import time

import torch

from certlab.attacks.base import (
    Best,
    bview,
    ce_loss,
    dlr_loss,
    dlr_targeted_loss,
    loss_and_grad,
    random_start,
)
from certlab.errors import InputError


def checkpoints(steps: int) -> list[int]:
    """Iterations ``w_j = ⌈p_j·steps⌉`` (j ≥ 1, ``p_j ≤ 1``) where the step-size conditions are checked."""
    p = [0.0, 0.22]
    while True:
        nxt = p[-1] + max(p[-1] - p[-2] - 0.03, 0.06)
        if nxt > 1:
            break
        p.append(nxt)
    marks = {math.ceil(q * steps - 1e-9) for q in p[1:]}
    return sorted(w for w in marks if 0 < w < steps)


def apgd(model, x, y, threat, generator, steps: int = 100, loss: str = "ce", target=None,
         rho: float = 0.75, momentum: float = 0.75, rand_init: bool = True, deadline: float | None = None) -> Best:
    """One APGD run on the (already validated) batch; ``target`` [B] selects targeted DLR. Returns the best points
    (those so far once ``time.perf_counter()`` passes ``deadline``)."""
    for name, v in (("rho", rho), ("momentum", momentum)):
        if not isinstance(v, (int, float)) or not 0 < v <= 1:
            raise InputError(f"{name} must be a number in (0, 1], got {v!r}")
    if target is not None:
        lf = lambda z: dlr_targeted_loss(z, y, target)  # noqa: E731
    elif loss == "dlr":
        lf = lambda z: dlr_loss(z, y)  # noqa: E731
    else:
        lf = lambda z: ce_loss(z, y)  # noqa: E731
    B = x.shape[0]
    eta = 2.0 * threat.eps_vector(x)
    x0 = random_start(threat, x, generator) if rand_init else x.clone()

    f, g, z = loss_and_grad(model, x0, lf)
    best = Best(x0, z, y)
    f_max, x_max, g_max = f.clone(), x0.clone(), g.clone()
    x_prev = x0
    x_cur = threat.project(x0 + bview(eta, x) * threat.ascent(g), x)
    f_prev = f

    marks = set(checkpoints(steps))
    last_mark = 0
    n_up = torch.zeros(B, device=x.device)
    f_max_at_mark = f_max.clone()
    halved_at_mark = torch.zeros(B, dtype=torch.bool, device=x.device)

    for k in range(1, steps):
        if deadline is not None and time.perf_counter() > deadline:
            break
        f, g, z = loss_and_grad(model, x_cur, lf)
        best.update(x_cur, z)
        n_up += (f > f_prev).float()
        f_prev = f
        up = f > f_max
        if up.any():
            f_max = torch.where(up, f, f_max)
            x_max[up] = x_cur[up]
            g_max[up] = g[up]
        if k in marks:
            cond1 = n_up < rho * (k - last_mark)
            cond2 = (~halved_at_mark) & (f_max <= f_max_at_mark)
            halve = cond1 | cond2
            eta = torch.where(halve, eta / 2, eta)
            if halve.any():
                x_cur = x_cur.clone()
                x_cur[halve] = x_max[halve]
                g = g.clone()
                g[halve] = g_max[halve]
                x_prev = x_prev.clone()
                x_prev[halve] = x_max[halve]
                f_prev = torch.where(halve, f_max, f_prev)
            halved_at_mark = halve
            f_max_at_mark = f_max.clone()
            n_up.zero_()
            last_mark = k
        zk = threat.project(x_cur + bview(eta, x) * threat.ascent(g), x)
        x_new = threat.project(x_cur + momentum * (zk - x_cur) + (1 - momentum) * (x_cur - x_prev), x)
        x_prev, x_cur = x_cur, x_new

    with torch.no_grad():
        best.update(x_cur, model(x_cur))
    return best


def target_classes(z_clean: torch.Tensor, y: torch.Tensor, n_targets: int) -> torch.Tensor:
    """[B, n] target classes for APGD-T: the classes other than y with the largest clean logits, best first."""
    other = z_clean.scatter(1, y.view(-1, 1), float("-inf"))
    n = min(n_targets, z_clean.shape[1] - 1)
    return other.argsort(1, descending=True)[:, :n]
