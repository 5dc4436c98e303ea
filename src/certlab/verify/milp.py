"""Exact verification of ReLU networks by mixed-integer linear programming (HiGHS through ``scipy.optimize.milp``).

For sample x, label y and threat set T the network is robust iff, for every j ≠ y,

    min_{x' ∈ T} f_y(x') − f_j(x') > 0,

and each minimum is a MILP over the encoding of :mod:`certlab.verify.encode` (big-M ReLUs from the tightest
available pre-activation bounds: CROWN ∩ IBP). ℓ∞ balls and unions of segments are encoded exactly. An ℓ2 ball is
not polyhedral: we solve over its box hull and add tangent cuts ``g·(x' − x) ≤ ε`` with ``g`` the unit direction of
the last optimum until the optimum lies in the ball (then it is exact) or time runs out — every intermediate
problem is an outer relaxation, so "verified" stays sound and "falsified" always comes with a checked point.

Public: :func:`exact_bounds` (exact min/max of C·f over the set) and :func:`verify` (→ list of Result).
"""

from __future__ import annotations

import contextlib
import copy
import os
import sys
import time

import numpy as np
import scipy.sparse as sp
import torch
from scipy.optimize import Bounds as _Box, LinearConstraint, linprog as _linprog, milp as _milp

from certlab.attacks.base import eval_mode
from certlab.bounds import backsub, core, rounding
from certlab.bounds.ibp import interval_pass
from certlab.errors import CertlabError, InputError
from certlab.verify.encode import Encoding, dense_ops, encode
from certlab.verify.host import on_cpu
from certlab.verify.result import Result, check_counterexample

TOL = 1e-6  # a margin must exceed this (solver precision) to count as verified
SOLVER_REL = 1e-6  # ... and this much of the size of the terms it is made of (HiGHS's tolerances are absolute)


def decision_tols(model, x, y, threat) -> tuple[float, float]:
    """What a margin bound of the one sample x must exceed to count as proven: (for bounds computed in the model's
    dtype, for the float64 solvers' bounds). Both are at least TOL and grow with M, the size of the terms the margin
    is made of (:func:`certlab.bounds.rounding.magnitudes`): REL·(1 + M) below float64 (the float32 rounding line of
    :mod:`certlab.bounds.rounding`), SOLVER_REL·(1 + M) for the solvers (HiGHS's tolerances are absolute). Without
    them a network whose logits are large sums that cancel could be "verified" by rounding or by the LP solver."""
    base = rounding.tolerances(model, x, y, threat, 1.0)
    solver = max(TOL, SOLVER_REL * float(base.max()))
    return (solver if x.dtype == torch.float64 else max(TOL, rounding.REL * float(base.max()))), solver


@contextlib.contextmanager
def _quiet():
    """Silence HiGHS' own prints to the process's stdout (it writes to fd 1 directly)."""
    try:
        sys.stdout.flush()
        saved = os.dup(1)
    except (OSError, ValueError):
        yield
        return
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, 1)
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)
        os.close(null)


def pre_bounds(g, x, threat, method: str = "crown"):
    """{relu node: (l, u)} pre-activation bounds: "ibp", or "crown" (CROWN ∩ IBP)."""
    if method == "ibp":
        return interval_pass(g, x, threat)[0]
    if method == "crown":
        return backsub.intermediate(g, x, threat, lower="adaptive")
    raise InputError(f"pre-activation bounds must come from 'ibp' or 'crown', got {method!r}")


class Problem:
    """One sample's encoding with its constraint matrix cached; ℓ2 tangent cuts are appended as rows."""

    def __init__(self, enc: Encoding, threat, x0: np.ndarray, eps: float):
        self.enc = enc
        self.threat = threat
        self.x0, self.eps = x0, eps
        self.A, self.lo, self.hi = enc.matrix()
        self.lb, self.ub = np.array(enc.lb), np.array(enc.ub)
        self.integ = np.array(enc.integ)

    def add_cut(self, g: np.ndarray):
        """g·(x' − x) ≤ ε on the input variables (the first n_in of an ℓ2 encoding)."""
        row = sp.csr_matrix((g, (np.zeros(g.size, int), np.arange(g.size))), shape=(1, self.enc.n))
        self.A = sp.vstack([self.A, row], format="csr")
        self.lo = np.append(self.lo, -np.inf)
        self.hi = np.append(self.hi, self.eps + float(g @ self.x0))

    def solve(self, obj, const, maximize=False, time_limit=60.0, integral=True):
        """dict(status, value, bound, v, nodes): value/v the best point found (None if none), bound a proven
        bound on the optimum (lower for min, upper for max); status "optimal" | "limit" | "failed"."""
        c = -obj if maximize else obj
        if not integral or not self.integ.any():
            r = self._solve_lp(c, const, maximize, time_limit)
            if r is not None:
                return r  # else numerical trouble in the interior-point method: the simplex path below retries
        cons = LinearConstraint(self.A, self.lo, self.hi) if self.A.shape[0] else None
        opts = {"time_limit": max(float(time_limit), 0.05), "mip_rel_gap": 1e-9, "disp": False}
        with _quiet():
            res = _milp(c, integrality=self.integ if integral else None, bounds=_Box(self.lb, self.ub),
                        constraints=cons, options=opts)
            if res.status == 4:  # HiGHS "solve error" (seen on nearly infeasible subdomains): retry without presolve
                res = _milp(c, integrality=self.integ if integral else None, bounds=_Box(self.lb, self.ub),
                            constraints=cons, options={**opts, "presolve": False})
        sign = -1.0 if maximize else 1.0
        v = None if res.x is None else np.asarray(res.x)
        value = None if v is None else sign * float(c @ v) + const
        bound = getattr(res, "mip_dual_bound", None)
        if bound is None or not np.isfinite(bound):
            bound = float(res.fun) if res.status == 0 and res.fun is not None else None
        bound = None if bound is None else sign * float(bound) + const
        if res.status == 0 and bound is None:
            bound = value
        status = {0: "optimal", 1: "limit", 2: "infeasible"}.get(res.status, "failed")
        return {"status": status, "value": value, "bound": bound, "v": v,
                "nodes": int(getattr(res, "mip_node_count", 0) or 0)}

    def _solve_lp(self, c, const, maximize, time_limit):
        """The LP relaxation by HiGHS' interior-point method (with crossover): on the dense encodings of MLPs such
        as fc5 (~10⁶ nonzeros) about 10× faster than the dual simplex that milp() runs on a problem without
        integers (4 s instead of 45–60 s per margin). None on a numerical failure (the caller falls back)."""
        A, lo, hi = self.A.tocsr(), self.lo, self.hi
        eq = np.isfinite(lo) & np.isfinite(hi) & (lo == hi)
        up, down = np.isfinite(hi) & ~eq, np.isfinite(lo) & ~eq
        A_ub = sp.vstack([A[up], -A[down]], format="csr") if (up.any() or down.any()) else None
        b_ub = np.concatenate([hi[up], -lo[down]]) if A_ub is not None else None
        opts = {"time_limit": max(float(time_limit), 0.05), "disp": False}
        with _quiet():
            res = _linprog(c, A_ub=A_ub, b_ub=b_ub, A_eq=A[eq] if eq.any() else None, b_eq=lo[eq] if eq.any() else None,
                           bounds=np.stack([self.lb, self.ub], 1), method="highs-ipm", options=opts)
        if res.status == 4:
            return None
        sign = -1.0 if maximize else 1.0
        ok = res.status == 0 and res.x is not None
        v = np.asarray(res.x) if ok else None
        value = sign * float(res.fun) + const if ok else None
        status = {0: "optimal", 1: "limit", 2: "infeasible"}.get(res.status, "failed")
        return {"status": status, "value": value, "bound": value, "v": v, "nodes": 0}

    def optimise(self, obj, const, maximize=False, deadline=None, integral=True, value_at=None, gap=5e-6,
                 max_cuts=300):
        """solve() with ℓ2 cutting planes. Adds 'exact': the optimum is known to within ``gap``·(1 + |value|).

        For ℓ2, ``value_at(p)`` (the objective at input point p, evaluated by the network) scores the projection of
        each relaxed optimum onto the set: a feasible value; the loop stops once it is within ``gap`` of the
        relaxation's bound, which is then exact up to that gap, and 'value'/'point' report the feasible point.
        """
        cuts = nodes = 0
        last = None
        while True:
            left = 60.0 if deadline is None else deadline - time.perf_counter()
            if left <= 0:
                return {"status": "limit", "value": None, "bound": None, "v": None, "point": None,
                        "nodes": nodes, "exact": False}
            r = self.solve(obj, const, maximize, left, integral)
            nodes += r["nodes"] + 1
            r["nodes"] = nodes
            r["point"] = None if r["v"] is None else self.enc.point(r["v"])
            ok = r["status"] == "optimal" and r["v"] is not None
            if not self.threat.needs_cuts or not ok:
                r["exact"] = ok
                return r
            p = r["point"]
            q = self.project(p)
            if value_at is not None:
                val = value_at(q)
                r["point"], r["value"] = q, val
                r["exact"] = abs(val - r["bound"]) <= gap * (1 + abs(val))
            else:
                r["exact"] = bool(np.linalg.norm(p - self.x0) <= self.eps * (1 + 1e-9))
            if r["exact"] or cuts >= max_cuts or (last is not None and np.abs(p - last).max() < 1e-10):
                return r  # exact, out of cuts, or stalled at the solver's feasibility tolerance
            last = p
            d = p - self.x0
            nd = np.linalg.norm(d)
            if nd <= self.eps * (1 + 1e-12):  # inside the ball yet not exact: cannot cut further
                return r
            self.add_cut(d / nd)
            cuts += 1

    def project(self, p: np.ndarray) -> np.ndarray:
        xb = torch.as_tensor(self.x0, dtype=torch.float64).unsqueeze(0)
        return self.threat.project(torch.as_tensor(p, dtype=torch.float64).unsqueeze(0), xb)[0].numpy()


def evaluator(model, shape):
    """value_at factory: coef ↦ (p ↦ coef·f(p)) with a float64 copy of the model (ℓ2 cutting planes)."""
    net = copy.deepcopy(model).double().eval()

    def make(coef):
        def value_at(p):
            with torch.no_grad():
                out = net(torch.as_tensor(p, dtype=torch.float64).reshape(1, *shape))[0].numpy()
            return float(coef @ out)
        return value_at
    return make


def problem(g, x, threat, pre, b: int, integral=True, splits=None, dense=None) -> Problem:
    enc = encode(g, x, threat, pre, b, integral, splits, dense)
    x0 = x[b].detach().double().cpu().numpy().ravel()
    ts = threat.single(x, b)  # the set around x[b] alone: what projections and cuts need
    return Problem(enc, ts, x0, float(ts.eps_vector(x[b:b + 1])[0]))


def _spec(C, x, K):
    C = core.check_spec(C, x.shape[0], K, x)
    if C is None:
        C = torch.eye(K, dtype=x.dtype, device=x.device).unsqueeze(0).expand(x.shape[0], -1, -1)
    return C.detach().double().cpu().numpy()


def setup(model, x, threat, C, pre):
    """Validate, build the graph, the spec [B, S, K] (numpy) and the intermediate bounds: what every
    per-output optimisation (MILP, LP) starts from. Call inside ``eval_mode(model)`` and ``no_grad``."""
    core.validate(model, x, threat)
    g = core.build_graph(model, x)
    Cn = _spec(C, x, core.output_dim(g))
    return g, Cn, pre_bounds(g, x, threat, pre)


@on_cpu
@core.float32_exact
def exact_bounds(model, x, threat, C=None, pre: str = "ibp", timeout: float = 120.0):
    """Exact (lower [B, S], upper [B, S]) of C·model(x') over x' in ``threat`` (C=None: the logits, S = K).

    Each entry is the optimum of one MILP, the objective at a point of the set (up to solver tolerance ~1e-7).
    ``pre`` picks the big-M bounds ("ibp" by default, so the answer does not rely on the relaxations being tested).
    ℓ2 balls are handled by tangent cuts until the optimum lies in the ball. Raises CertlabError when a problem
    is not solved to optimality within ``timeout`` seconds (each).
    """
    with eval_mode(model), torch.no_grad():
        g, Cn, P = setup(model, x, threat, C, pre)
        B, S = Cn.shape[:2]
        lower, upper = np.zeros((B, S)), np.zeros((B, S))
        dense = dense_ops(g)
        make = evaluator(model, x.shape[1:]) if threat.needs_cuts else None
        for b in range(B):
            prob = problem(g, x, threat, P, b, dense=dense)
            for s in range(S):
                obj, const = prob.enc.linear(g.output, Cn[b, s])
                va = make(Cn[b, s]) if make else None
                for maximize, out in ((False, lower), (True, upper)):
                    r = prob.optimise(obj, const, maximize, time.perf_counter() + timeout, value_at=va)
                    if not r["exact"]:
                        raise CertlabError(f"MILP for sample {b}, row {s} not solved exactly ({r['status']}) "
                                           f"within {timeout:g} s")
                    out[b, s] = r["value"]
    return (torch.as_tensor(lower, dtype=x.dtype, device=x.device),
            torch.as_tensor(upper, dtype=x.dtype, device=x.device))


def _attack(model, x, y, threat):
    """A quick PGD on one sample; its point if misclassified (checked), else None."""
    from certlab.attacks import run

    try:
        z = run(model, x, y, threat, method="pgd", steps=20, restarts=1, seed=0)
    except CertlabError:
        return None
    return check_counterexample(model, x, y, threat, 0, z[0])


@on_cpu
@core.float32_exact
def verify(model, x, y, threat, timeout: float = 30.0, attack: bool = True, pre: str = "crown") -> list:
    """Complete verification of every sample: a list of :class:`Result` (one per sample).

    "verified": every margin f_y − f_j is proven > 0 on the set; "falsified": a point of the set that the model
    misclassifies (re-checked with the model); "unknown": the time limit (``timeout`` seconds per sample) ran out,
    or (ℓ2) the cutting planes did not close the gap.
    """
    core.validate(model, x, threat)
    with eval_mode(model), torch.no_grad():
        g = core.build_graph(model, x)
        K = core.output_dim(g)
        y = core.check_labels(y, x.shape[0], K, x.device)
        out = []
        for b in range(x.shape[0]):
            out.append(_verify_one(model, g, x, y, threat, b, timeout, attack, pre))
    return out


def _verify_one(model, g, x, y, threat, b, timeout, attack, pre):
    t0 = time.perf_counter()
    deadline = t0 + timeout
    xb, yb = x[b:b + 1], y[b:b + 1]
    ts = threat.subset(x, torch.tensor([b], device=x.device))
    done = lambda st, z=None, nodes=0, bound=None: Result(st, z, time.perf_counter() - t0, nodes, bound, "milp")  # noqa: E731
    z = check_counterexample(model, xb, yb, ts, 0, xb[0])
    if z is not None:
        return done("falsified", z)
    if attack:
        z = _attack(model, xb, yb, ts)
        if z is not None:
            return done("falsified", z)
    gb = core.build_graph(model, xb)
    K = core.output_dim(gb)
    C = core.margin_spec(yb, K, x.dtype)
    P = pre_bounds(gb, xb, ts, pre)
    low, _ = backsub.output(_fold(gb, C), xb, ts, P, lower_only=True)
    low = low[0].cpu().numpy()
    yi = int(yb[0])
    tol, tol_solver = decision_tols(model, xb, yb, ts)
    order = [int(j) for j in np.argsort(low) if j != yi and low[j] <= tol]
    proven = [float(low[j]) for j in range(K) if j != yi and low[j] > tol]
    if not order:
        return done("verified", bound=min(proven))
    prob = problem(gb, xb, ts, P, 0)
    Cn = C[0].double().cpu().numpy()
    make = evaluator(model, x.shape[1:]) if ts.needs_cuts else None
    nodes, unknown = 0, False
    for j in order:
        obj, const = prob.enc.linear(gb.output, Cn[j])
        r = prob.optimise(obj, const, False, deadline, value_at=make(Cn[j]) if make else None)
        nodes += r["nodes"]
        if r["point"] is not None and r["value"] is not None and r["value"] <= TOL:
            z = check_counterexample(model, xb, yb, ts, 0, torch.as_tensor(r["point"], dtype=x.dtype))
            if z is not None:
                return done("falsified", z, nodes)
        if r["bound"] is not None and r["bound"] > tol_solver:
            proven.append(r["bound"])
            continue
        unknown = True
        if time.perf_counter() >= deadline:
            break
    if unknown:
        return done("unknown", nodes=nodes)
    return done("verified", nodes=nodes, bound=min(proven))


def _fold(g, C):
    from certlab.bounds.api import fold_spec

    return fold_spec(g, C)
