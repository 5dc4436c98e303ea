"""α-CROWN (Xu et al. 2021, "Fast and Complete"): CROWN whose lower ReLU slopes α ∈ [0, 1] are optimised.

Every α gives a sound bound, so any α is allowed; we run projected gradient ascent on the output bound over one α per
(sample, output row, neuron), starting from CROWN's slopes, and keep, per output row, the best α seen. The bound
is then recomputed once with those α (differentiably in the model's parameters), so it is never looser than CROWN.
Intermediate bounds are CROWN's.
"""

import torch

from certlab.bounds import backsub
from certlab.bounds.ops import SpecLinearOp
from certlab.errors import InputError


def intermediate(g, x, threat, **_):
    return backsub.intermediate(g, x, threat, lower="adaptive")


def _start(g, x):
    last = g.nodes[-1]
    if last.kind == "affine" and isinstance(last.op, SpecLinearOp):
        return last.inputs[0], last.op.W, last.op.b
    B, K = x.shape[0], last.shape[0]
    return len(g.nodes) - 1, torch.eye(K, device=x.device, dtype=x.dtype).unsqueeze(0).expand(B, -1, -1), None


def compute(g, x, threat, lower_only=False, iters=20, lr=0.1, **_):
    if int(iters) < 0 or not float(lr) > 0:
        raise InputError(f"alpha-crown: iters must be >= 0 and lr > 0, got iters={iters}, lr={lr}")
    pre = intermediate(g, x, threat)
    start, A, const = _start(g, x)
    if not lower_only:
        A = torch.cat([A, -A], 1)
        const = None if const is None else torch.cat([const, -const], 1)
    S = A.shape[1]
    relus = [i for i in g.relus if i <= start]
    init = {}
    for i in relus:
        a = backsub.relu_lines(*pre[i], lower="adaptive")[0]
        init[i] = a.detach().unsqueeze(1).expand(-1, S, *a.shape[1:]).clone()
    det_pre = {i: (l.detach(), u.detach()) for i, (l, u) in pre.items()}
    best_alpha = {i: v.clone() for i, v in init.items()}
    with torch.enable_grad():
        A_d = A.detach()
        c_d = None if const is None else const.detach()
        alpha = {i: v.clone().requires_grad_(True) for i, v in init.items()}
        best = None
        opt = torch.optim.Adam(list(alpha.values()), lr=float(lr)) if alpha else None
        for it in range(int(iters) + 1):
            low = backsub.lower_bound(g, start, A_d, det_pre, x, threat, "adaptive", alpha, c_d)
            low_d = low.detach()
            if best is None:
                best = low_d.clone()
            improved = low_d > best
            best = torch.where(improved, low_d, best)
            for i in alpha:
                m = improved.view(*improved.shape, *([1] * (alpha[i].dim() - 2)))
                best_alpha[i] = torch.where(m, alpha[i].detach(), best_alpha[i])
            if it == int(iters) or opt is None:
                break
            opt.zero_grad()
            params = list(alpha.values())
            grads = torch.autograd.grad(-low.sum(), params, allow_unused=True)
            for p, gr in zip(params, grads):
                p.grad = gr
            opt.step()
            with torch.no_grad():
                for p in params:
                    p.clamp_(0.0, 1.0)
    # final differentiable pass with the best slopes (gradients reach the model's parameters, not α)
    low = backsub.lower_bound(g, start, A, pre, x, threat, "adaptive", best_alpha, const)
    if lower_only:
        return low, None
    half = S // 2
    return low[:, :half], -low[:, half:]
