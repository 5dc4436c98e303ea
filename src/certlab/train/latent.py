"""The pieces of SABR and TAPS that are not bounds: the small set around an attack point, the split of a network into
an IBP-bounded part and a PGD-searched head, the latent search and TAPS's gradient connector.

- Small set (SABR, Müller et al. 2023): for a threat set S(x, ε) and λ ∈ (0, 1], the centre c is the attack point
  projected onto S(x, (1 − λ)ε), and the small set is S(c, λε), the same kind of set. For the balls the triangle
  inequality gives S(c, λε) ⊆ S(x, ε) (both are cut to the same domain); for one segment too (c lies on the
  segment's line). λ = 1 gives c = x and the set itself.
- Split (TAPS, Mao et al. 2023): an ``nn.Sequential`` is cut right after a top-level ReLU; the head holds
  ``head_relus`` ReLU layers (0: only the affine layers after the last ReLU). The latent box is the ReLU of that
  ReLU's pre-activation bounds over the set.
- Latent search: for every sample and every class j ≠ y one point z_j of the latent box [lo, hi] minimising the
  head's margin h_y(z) − h_j(z), by projected sign steps of size α_t·(hi − lo), α_t = a·(T − t)/T with
  a = max(1/4, 2/T) (the steps add up to at least the box's width, so on an affine head every coordinate reaches its
  minimising vertex); the lowest point seen is kept. The estimate m̂_j = h_y(z_j) − h_j(z_j) is not a bound.
  With ``taps_targets`` = k < K − 1 only the k classes with the lowest certified margin bounds are searched and the
  other columns keep their bounds (with IBP, never above an estimate; the searched classes weigh most in the loss).
- Connector: ∂z/∂hi = clip((z − hi + s)/s, 0, 1) and ∂z/∂lo = clip((lo + s − z)/s, 0, 1) with s = c·(hi − lo)
  (TAPS's rectified linear link, c the threshold); a coordinate with hi = lo passes half its gradient to each.
"""

from __future__ import annotations

import torch
from torch import nn

from certlab.attacks.base import eval_mode
from certlab.errors import CertlabError


def small_set(threat, x: torch.Tensor, z: torch.Tensor, eps: float, lam: float):
    """(centre c, small set) of SABR: c = projection of z onto the set of radius (1 − λ)ε around x, small set =
    the set of radius λε (to be centred at c). Needs only the set's own ``with_eps`` and ``project``."""
    c = threat.with_eps(eps * (1.0 - lam)).project(z.detach(), x).detach()
    return c, threat.with_eps(eps * lam)


def _top_relus(model) -> list:
    return [i for i, m in enumerate(model) if isinstance(m, nn.ReLU)]


def split(model, head_relus: int):
    """(first part, head, number of ReLU layers in the first part): ``model`` cut right after its top-level ReLU
    that leaves ``head_relus`` top-level ReLUs in the head."""
    if not isinstance(model, nn.Sequential):
        raise CertlabError(f"TAPS needs an nn.Sequential model to split, got {type(model).__name__}")
    relus = _top_relus(model)
    if len(relus) < head_relus + 1:
        raise CertlabError(f"taps_head={head_relus} needs a model with at least {head_relus + 1} top-level ReLU layers "
                           f"(the IBP part must keep one); this model has {len(relus)}")
    s = relus[-(head_relus + 1)] + 1
    children = list(model.children())
    first, head = nn.Sequential(*children[:s]), nn.Sequential(*children[s:])
    n_first = sum(1 for m in first.modules(remove_duplicate=False) if isinstance(m, nn.ReLU))
    return first, head, n_first


def _targets(y: torch.Tensor, K: int) -> torch.Tensor:
    """[B, K − 1]: the classes other than y, in order."""
    B = y.shape[0]
    all_ = torch.arange(K, device=y.device).expand(B, K)
    return all_[all_ != y.view(-1, 1)].view(B, K - 1)


def worst_targets(bounds: torch.Tensor, y: torch.Tensor, k: int) -> torch.Tensor:
    """[B, k]: per sample, the k classes j ≠ y with the lowest margin bounds ``bounds`` [B, K] (the most violated)."""
    b = bounds.detach().scatter(1, y.view(-1, 1), float("inf"))
    return b.topk(k, dim=1, largest=False).indices


def _head_margins(head, z, y, t):
    """h_y(z) − h_t(z) for points z [B, J, *latent] and targets t [B, J]."""
    B, J = t.shape
    out = head(z.reshape(B * J, *z.shape[2:])).view(B, J, -1)
    yy = y.view(B, 1, 1).expand(B, J, 1)
    return (out.gather(2, yy) - out.gather(2, t.unsqueeze(-1))).squeeze(-1)


def search(head, lo: torch.Tensor, hi: torch.Tensor, y: torch.Tensor, K: int, steps: int, generator=None,
           targets: torch.Tensor | None = None):
    """[B, J, *latent] points of [lo, hi] (no gradient) minimising h_y − h_j for each target class j: ``targets``
    [B, J], by default every class j ≠ y (J = K − 1)."""
    lo, hi = lo.detach().unsqueeze(1), hi.detach().unsqueeze(1)
    t = _targets(y, K) if targets is None else targets
    B, J = t.shape
    width = hi - lo
    z = torch.rand((B, J, *lo.shape[2:]), generator=generator, device=lo.device, dtype=lo.dtype).mul_(width).add_(lo)
    a = max(0.25, 2.0 / steps)
    best_z = best_m = None
    with eval_mode(head):
        for it in range(steps + 1):
            with torch.enable_grad():
                zv = z.requires_grad_(it < steps)
                m = _head_margins(head, zv, y, t)
                g = torch.autograd.grad(m.sum(), zv)[0] if it < steps else None
            z, m = z.detach(), m.detach()
            if best_m is None:
                best_m, best_z = m, z
            else:  # the lowest margin seen (the step sizes shrink, so this is mostly the last point)
                better = m < best_m
                best_m = torch.where(better, m, best_m)
                best_z = torch.where(better.view(B, J, *([1] * (z.dim() - 2))), z, best_z)
            if g is not None:
                step = g.sign_().mul_(width).mul_(-a * (steps - it) / steps)
                z = torch.clamp(z + step, min=lo, max=hi)
    return best_z


def connect(z: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, threshold: float) -> torch.Tensor:
    """z itself in value; its gradient flows to lo [B, *latent] and hi by the rectified linear connector."""
    lo1, hi1 = lo.unsqueeze(1), hi.unsqueeze(1)
    with torch.no_grad():
        w = hi1 - lo1
        s = threshold * w
        flat = s <= 1e-12
        sd = torch.where(flat, torch.ones_like(s), s)
        g_hi = torch.where(flat, torch.full_like(s, 0.5), ((z - hi1 + s) / sd).clamp(0, 1))
        g_lo = torch.where(flat, torch.full_like(s, 0.5), ((lo1 + s - z) / sd).clamp(0, 1))
    return z.detach() + g_lo * (lo1 - lo1.detach()) + g_hi * (hi1 - hi1.detach())


def estimate(head, z: torch.Tensor, y: torch.Tensor, K: int, targets: torch.Tensor | None = None,
             rest: torch.Tensor | None = None) -> torch.Tensor:
    """[B, K] margin estimates from the searched points (column y is 0), with the head's running statistics.
    With ``targets`` (the classes searched) the other columns are taken from ``rest`` [B, K] (margin bounds)."""
    t = _targets(y, K) if targets is None else targets
    with eval_mode(head):
        m = _head_margins(head, z, y, t)
    base = m.new_zeros(y.shape[0], K) if rest is None else rest
    return base.scatter(1, t, m)
