"""The triangle LP relaxation (Ehlers 2017), solved exactly per output by HiGHS (``scipy.optimize.milp`` without
integers): the reference for how tight any single-neuron convex relaxation can be.

Each crossing ReLU (l < 0 < u) is replaced by its convex hull over [l, u]:

    y ≥ 0,   y ≥ z,   y ≤ u (z − l) / (u − l),

the LP relaxation of the big-M encoding (δ ∈ [0, 1] projects to exactly these rows). The input set is exact for an
ℓ∞ ball (a box); for a union of segments it is the convex hull of the segments; for an ℓ2 ball it is the box hull
cut by tangent planes until the optimum lies in the ball (the bound stays sound). Pre-activation bounds come from
CROWN ∩ IBP (``pre="crown"``) — the classical "LP with CROWN intermediate bounds" — or, with ``refine=True``, from
this LP itself layer by layer (every unstable neuron min/max, the "LP-all" setting: tighter and much slower).
"""

from __future__ import annotations

import time

import numpy as np
import torch

from certlab.attacks.base import eval_mode
from certlab.bounds import backsub, core
from certlab.bounds.api import fold_spec
from certlab.errors import InputError
from certlab.verify.host import on_cpu
from certlab.verify.milp import decision_tols, pre_bounds, problem, setup
from certlab.verify.result import Result


def refine_pre(g, x, threat, pre, b, deadline=None):
    """Tighten sample b's pre-activation bounds with the LP, ReLU by ReLU (in place on copies; returns them). Stops
    at ``deadline`` (a ``time.perf_counter()`` value) with the bounds tightened so far (each is sound)."""
    pre = {i: (l.clone(), u.clone()) for i, (l, u) in pre.items()}
    late = lambda: deadline is not None and time.perf_counter() >= deadline  # noqa: E731
    for r in g.relus:
        p = g.nodes[r].inputs[0]
        sub = core.Graph(g.nodes[:p + 1])
        l, u = pre[r]
        lf, uf = l[b].reshape(-1), u[b].reshape(-1)
        todo = ((lf < 0) & (uf > 0)).nonzero().flatten().tolist()
        if not todo:
            continue
        if late():
            return pre
        prob = problem(sub, x, threat, pre, b, integral=False)
        for k in todo:
            if late():
                return pre
            coef = np.zeros(lf.numel())
            coef[k] = 1.0
            obj, const = prob.enc.linear(p, coef)
            for maximize in (False, True):
                r_ = prob.optimise(obj, const, maximize, deadline, integral=False)
                if r_["bound"] is None:
                    continue
                v = torch.tensor(r_["bound"], dtype=lf.dtype)
                if maximize:
                    uf[k] = torch.minimum(uf[k], v + 1e-7 * (1 + v.abs()))
                else:
                    lf[k] = torch.maximum(lf[k], v - 1e-7 * (1 + v.abs()))
    return pre


@on_cpu
@core.float32_exact
def lp_bounds(model, x, threat, C=None, pre: str = "crown", refine: bool = False, timeout: float = 60.0):
    """(lower [B, S], upper [B, S]) of C·model(x') by the triangle LP (C=None: the logits). Sound bounds."""
    with eval_mode(model), torch.no_grad():
        g, Cn, P = setup(model, x, threat, C, pre)
        B, S = Cn.shape[:2]
        lower, upper = np.full((B, S), -np.inf), np.full((B, S), np.inf)
        for b in range(B):
            deadline = time.perf_counter() + timeout
            Pb = refine_pre(g, x, threat, P, b, deadline) if refine else P
            if time.perf_counter() >= deadline:
                continue
            prob = problem(g, x, threat, Pb, b, integral=False)
            for s in range(S):
                obj, const = prob.enc.linear(g.output, Cn[b, s])
                for maximize, out in ((False, lower), (True, upper)):
                    r = prob.optimise(obj, const, maximize, deadline, integral=False)
                    if r["bound"] is not None:
                        out[b, s] = r["bound"]
    return (torch.as_tensor(lower, dtype=x.dtype, device=x.device),
            torch.as_tensor(upper, dtype=x.dtype, device=x.device))


@on_cpu
@core.float32_exact
def lp_margins(model, x, y, threat, pre: str = "crown", refine: bool = False, timeout: float = 60.0):
    """[B, K] LP lower bounds on f_y − f_j (column y = 0), like :func:`certlab.margins`."""
    with torch.no_grad():
        K = model(x[:1]).shape[1]
    y = core.check_labels(y, x.shape[0], K, x.device)
    C = core.margin_spec(y, K, x.dtype)
    low = _lower_only(model, x, threat, C, pre, refine, timeout)
    return low.masked_fill(torch.nn.functional.one_hot(y, K).bool(), 0.0)


def _lower_only(model, x, threat, C, pre, refine, timeout, deadline=None):
    """[B, S] LP lower bounds of C·f (−inf where time ran out): ``timeout`` seconds per sample, or all of them by
    ``deadline`` (a ``time.perf_counter()`` value) when given."""
    with eval_mode(model), torch.no_grad():
        g, Cn, P = setup(model, x, threat, C, pre)
        B, S = Cn.shape[:2]
        lower = np.full((B, S), -np.inf)
        fixed = deadline
        for b in range(B):
            deadline = fixed if fixed is not None else time.perf_counter() + timeout
            Pb = refine_pre(g, x, threat, P, b, deadline) if refine else P
            if time.perf_counter() >= deadline:
                continue
            prob = problem(g, x, threat, Pb, b, integral=False)
            for s in range(S):
                if not Cn[b, s].any():
                    lower[b, s] = 0.0
                    continue
                obj, const = prob.enc.linear(g.output, Cn[b, s])
                r = prob.optimise(obj, const, False, deadline, integral=False)
                if r["bound"] is not None:
                    lower[b, s] = r["bound"]
    return torch.as_tensor(lower, dtype=x.dtype, device=x.device)


@on_cpu
@core.float32_exact
def verify(model, x, y, threat, timeout: float = 30.0, pre: str = "crown", refine: bool = False) -> list:
    """"verified" when every LP margin is > 0, else "unknown" (a relaxation never falsifies)."""
    core.validate(model, x, threat)
    if not isinstance(timeout, (int, float)) or timeout <= 0:
        raise InputError(f"timeout must be a positive number of seconds, got {timeout!r}")
    out = []
    with eval_mode(model), torch.no_grad():
        K = core.output_dim(core.build_graph(model, x[:1]))
        y = core.check_labels(y, x.shape[0], K, x.device)
        for b in range(x.shape[0]):
            t0 = time.perf_counter()
            xb, yb, ts = x[b:b + 1], y[b:b + 1], threat.subset(x, torch.tensor([b], device=x.device))
            g = core.build_graph(model, xb)
            C = core.margin_spec(yb, K, x.dtype)
            # CROWN first: the LP is at least as tight, so only rows CROWN leaves open need an LP
            P = pre_bounds(g, xb, ts, pre)
            low, _ = backsub.output(fold_spec(g, C), xb, ts, P, lower_only=True)
            low = low[0].clone()
            low[int(yb[0])] = float("inf")
            # CROWN's bounds (model dtype) and the LP's (float64 solver) each decide against their own tolerance
            tol, tol_solver = decision_tols(model, xb, yb, ts)
            open_rows = (low <= tol).nonzero().flatten().tolist()
            proven = True
            if open_rows:
                lp = _lower_only(model, xb, ts, C[:, open_rows], pre, refine, timeout, deadline=t0 + timeout)
                proven = bool((lp[0] > tol_solver).all())
                low[open_rows] = torch.maximum(low[open_rows], lp[0])
            worst = float(low.min())
            status = "verified" if proven else "unknown"
            out.append(Result(status, None, time.perf_counter() - t0, len(open_rows), worst, "lp"))
    return out
