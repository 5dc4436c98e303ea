"""Deciding a :class:`~certlab.verify.property.Property` on a network: ``unsat`` (no point of any box makes its
unsafe condition hold), ``sat`` (with a checked witness), ``timeout`` or ``unknown``.

Per region (box ``[lo, hi]``, unsafe ``OR_k C_k f ≤ d_k``), in order until decided or out of time:

1. falsification: PGD with random restarts on ``max_i (c_i·f − d_i)`` for each conjunction (≤ 0 is a witness);
2. bounds (``crown`` or ``alpha-crown``): conjunction k is refuted where some row has ``lower(c·f) − d > tol``;
3. complete (``bab`` / ``milp``; ``auto`` picks): the open conjunctions with one row each become the margins of a
   network ``g = [0, d_1 − c_1·f, …]`` with label 0 (g_0 − g_k = c_k·f − d_k), which the existing branch and bound
   or MILP decides exactly; a conjunction of several rows is refuted by any row those prove. Low-dimensional inputs
   (``n ≤ SPLIT_DIMS``) are instead split into sub-boxes until each is refuted by bounds or yields a witness.

The box is handed to the bound engine as an ℓ∞ ball in reparametrised coordinates: with centre ``c`` and radius
``r``, ``x = c + r ⊙ t`` for ``t ∈ [−1, 1]^n``, and the network's affine prefix up to its first Linear layer absorbs
the map (exact: ``W(c + r⊙t) + b``). Everything runs in float64 and every witness is re-evaluated on the original
network before it is returned.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from certlab import nn as cnn
from certlab.errors import CertlabError, InputError
from certlab.verify.property import TOL, Property, Region

METHODS = ("auto", "crown", "alpha-crown", "bab", "milp")
SPLIT_DIMS = 6  # inputs at most this many: split the box (2^n cubes per split) instead of ReLUs


@dataclass
class Answer:
    status: str  # "unsat" | "sat" | "timeout" | "unknown"
    x: np.ndarray | None = None  # witness input (flattened) when sat
    y: np.ndarray | None = None  # network output there
    time: float = 0.0
    note: str = ""


class _Clock:
    def __init__(self, timeout, log):
        self.t0 = time.perf_counter()
        self.deadline = self.t0 + float(timeout)
        self.log = log or (lambda msg: None)

    def left(self):
        return self.deadline - time.perf_counter()

    def say(self, msg):
        self.log(f"[{time.perf_counter() - self.t0:7.2f}s] {msg}")


def reparametrise(model: nn.Module, lo: np.ndarray, hi: np.ndarray, shape) -> nn.Sequential:
    """``t ↦ model(c + r ⊙ t)`` on flat ``t`` (float64), with the affine prefix up to the first Linear folded into one
    Linear layer. CertlabError when the prefix is not affine or does not end in a Linear layer (e.g. a convolution)."""
    mods = list(model.children()) if isinstance(model, nn.Sequential) else [model]
    k = next((i for i, m in enumerate(mods) if isinstance(m, nn.Linear)), None)
    ok = (nn.Flatten, cnn.Normalize, nn.Identity, nn.Dropout)
    if k is None or not all(isinstance(m, ok) for m in mods[:k]):
        raise CertlabError("per-feature input boxes need the network to start with affine layers up to a Linear layer "
                           f"(got {', '.join(type(m).__name__ for m in mods[:(k or 0) + 1]) or type(model).__name__})")
    prefix = nn.Sequential(*mods[:k + 1]).double().eval()
    c = torch.as_tensor((lo + hi) / 2, dtype=torch.float64)
    r = torch.as_tensor((hi - lo) / 2, dtype=torch.float64)
    n = c.numel()
    with torch.no_grad():
        base = prefix(c.reshape(1, *shape))[0]
        eye = torch.eye(n, dtype=torch.float64) * r.reshape(1, -1)
        cols = torch.cat([prefix((c.reshape(1, -1) + eye[i:i + 256]).reshape(-1, *shape)) - base
                          for i in range(0, n, 256)])
    lin = nn.Linear(n, base.numel()).double()
    with torch.no_grad():
        lin.weight.copy_(cols.T)
        lin.bias.copy_(base)
    rest = [m for m in mods[k + 1:]]
    return nn.Sequential(lin, *rest).double().eval()


class _Problem:
    """One region on one network: the network in t-coordinates (reparametrised where the prefix allows, else the
    original on the box itself), its spec rows and point checks."""

    def __init__(self, model, region: Region, shape, clock):
        self.model, self.region, self.shape, self.clock = model, region, tuple(shape), clock
        self.lo, self.hi = region.lower, region.upper
        self.n = self.lo.size
        try:
            self.net = reparametrise(model, self.lo, self.hi, self.shape)
            self.tlo = -torch.ones(1, self.n, dtype=torch.float64)
            self.thi = torch.ones(1, self.n, dtype=torch.float64)
            self.flat = True
        except CertlabError:  # e.g. a convolution first: the box as a Box set on the original input
            self.net = model
            self.tlo = torch.as_tensor(self.lo, dtype=torch.float64).reshape(1, *self.shape)
            self.thi = torch.as_tensor(self.hi, dtype=torch.float64).reshape(1, *self.shape)
            self.flat = False
        self.c = torch.as_tensor((self.lo + self.hi) / 2, dtype=torch.float64)
        self.r = torch.as_tensor((self.hi - self.lo) / 2, dtype=torch.float64)

    def centre(self):
        return (self.tlo + self.thi) / 2

    def to_x(self, t):
        if self.flat:
            t = self.c + self.r * t.reshape(-1, self.n)
        return torch.clamp(t.reshape(-1, self.n), torch.as_tensor(self.lo), torch.as_tensor(self.hi))

    def check(self, x) -> Answer | None:
        """A witness answer if the original network at x (flat) satisfies the region's unsafe condition."""
        x = torch.as_tensor(x, dtype=torch.float64).reshape(1, -1)
        with torch.no_grad():
            f = self.model(x.reshape(1, *self.shape).to(next(self.model.parameters()).dtype)).double().reshape(-1)
        if self.region.contains(x.numpy(), 0.0) and self.region.satisfied(f.numpy(), 0.0) is not None:
            return Answer("sat", x.numpy().reshape(-1), f.numpy())
        return None

    def attack(self, conjs, restarts=8, steps=40, seed=0) -> Answer | None:
        """PGD in t-space on max_i (c_i·f − d_i), every conjunction of conjs with its own restarts, in one batch."""
        conjs = list(conjs)
        if not conjs:
            return None
        if any(self.region.conjunctions[k][0].shape[0] == 0 for k in conjs):
            return self.check(self.c)
        g = torch.Generator().manual_seed(seed)
        M = max(self.region.conjunctions[k][0].shape[0] for k in conjs)
        K = self.region.conjunctions[conjs[0]][0].shape[1]
        Cp = torch.zeros(len(conjs), M, K, dtype=torch.float64)
        dp = torch.full((len(conjs), M), float("inf"), dtype=torch.float64)  # padding rows never reach the max
        for j, k in enumerate(conjs):
            C, d = self.region.conjunctions[k]
            Cp[j, :C.shape[0]], dp[j, :C.shape[0]] = torch.as_tensor(C), torch.as_tensor(d)
        Cp, dp = Cp.repeat_interleave(restarts, 0), dp.repeat_interleave(restarts, 0)  # [J·R, M, K]
        lo, hi = self.tlo, self.thi
        N = len(conjs) * restarts
        t = lo + (hi - lo) * torch.rand(N, *lo.shape[1:], generator=g, dtype=torch.float64)
        t[::restarts] = self.centre()[0]
        step = 0.25 * (hi - lo) / 2
        loss_of = lambda f: (torch.einsum("nmk,nk->nm", Cp, f) - dp).max(1).values  # noqa: E731
        for s in range(steps + 1):
            t.requires_grad_(True)
            loss = loss_of(self.net(t))
            hits = (loss.detach() <= 0).nonzero().flatten().tolist()
            for i in hits[:4]:
                a = self.check(self.to_x(t[i].detach()))
                if a is not None:
                    return a
            if s == steps or self.clock.left() <= 0:
                return None
            (gr,) = torch.autograd.grad(loss.sum(), t)
            with torch.no_grad():
                t = torch.max(torch.min(t - step * gr.sign(), hi), lo)
            if s % 10 == 9:
                step = step / 2
        return None

    def rows(self, conjs):
        """(C [S, K], d [S], owner [S]) of the rows of conjunctions conjs."""
        Cs, ds, own = [], [], []
        for k in conjs:
            C, d = self.region.conjunctions[k]
            Cs.append(C)
            ds.append(d)
            own += [k] * C.shape[0]
        return np.concatenate(Cs), np.concatenate(ds), np.array(own)

    def refuted(self, conjs, method, lo=None, hi=None):
        """[B, len(conjs)] bool: conjunction refuted on each t-box [lo, hi] (default: the whole box)."""
        from certlab.bounds.api import bounds
        from certlab.threat import Box

        C, d, own = self.rows(conjs)
        lo, hi = (self.tlo, self.thi) if lo is None else (lo, hi)
        Ct = torch.as_tensor(C).unsqueeze(0).expand(lo.shape[0], -1, -1)
        with torch.no_grad() if method != "alpha-crown" else torch.enable_grad():
            low = bounds(self.net, (lo + hi) / 2, Box(lo, hi), method, C=Ct).lower.detach().double()
        tol = TOL * (1 + np.abs(d))
        row_ok = (low - torch.as_tensor(d + tol)) > 0  # [B, S]
        out = torch.zeros(lo.shape[0], len(conjs), dtype=torch.bool)
        for j, k in enumerate(conjs):
            out[:, j] = row_ok[:, torch.as_tensor(own == k)].any(1)
        return out, low


def _wrapped(net, rows, d):
    """g = [0, d_1 − c_1·f, …]: label 0 is 'robust' exactly where every c_k·f − d_k > 0."""
    K = rows.shape[1]
    lin = nn.Linear(K, rows.shape[0] + 1).double()
    with torch.no_grad():
        lin.weight.zero_()
        lin.weight[1:] = -torch.as_tensor(rows)
        lin.bias.zero_()
        lin.bias[1:] = torch.as_tensor(d)
    return nn.Sequential(*net.children(), lin).double().eval()


def _milp_conjunction(p: _Problem, C, d, clock):
    """Exact MILP: min t s.t. c_i·f(x) − d_i ≤ t for every row, x in the box. "unsat" when the proven lower bound
    on t exceeds the tolerance, an Answer "sat" from the optimum's point, else None (undecided in time)."""
    import scipy.sparse as sp

    from certlab.bounds import core
    from certlab.threat import Box
    from certlab.verify import milp

    x0, box = p.centre(), Box(p.tlo, p.thi)
    with torch.no_grad():
        g = core.build_graph(p.net, x0)
        pre = milp.pre_bounds(g, x0, box, "crown")
        prob = milp.problem(g, x0, box, pre, 0)
    n = prob.enc.n
    rows, his = [], []
    for i in range(C.shape[0]):
        obj, const = prob.enc.linear(g.output, C[i])
        rows.append(np.append(obj, -1.0))
        his.append(d[i] - const)
    prob.A = sp.vstack([sp.hstack([prob.A, sp.csr_matrix((prob.A.shape[0], 1))]), sp.csr_matrix(np.array(rows))],
                       format="csr")
    prob.lo = np.concatenate([prob.lo, np.full(len(his), -np.inf)])
    prob.hi = np.concatenate([prob.hi, his])
    prob.lb, prob.ub = np.append(prob.lb, -np.inf), np.append(prob.ub, np.inf)
    prob.integ = np.append(prob.integ, 0)
    r = prob.solve(np.eye(n + 1)[n], 0.0, time_limit=max(clock.left(), 0.05))
    if r["bound"] is not None and r["bound"] > TOL * (1 + float(np.abs(d).max(initial=0))):
        return "unsat"
    if r["v"] is not None and r["value"] is not None and r["value"] <= 0:
        a = p.check(p.to_x(torch.as_tensor(prob.enc.point(np.asarray(r["v"])[:n]))))
        if a is not None:
            return a
    return None


def _complete(p: _Problem, conjs, method, clock) -> Answer | None:
    """Exact search on the open conjunctions; an Answer (sat/timeout/unknown) or None when all are refuted."""
    from certlab.verify.complete import verify_complete

    single = [k for k in conjs if p.region.conjunctions[k][0].shape[0] == 1]
    multi = [k for k in conjs if k not in single]
    from certlab.threat import Box

    t0, box = p.centre(), Box(p.tlo, p.thi)
    jobs = []
    if single:
        C, d, _ = p.rows(single)
        jobs.append((C, d, True))
    for k in multi:
        C, d = p.region.conjunctions[k]
        if method == "milp":  # exact
            a = _milp_conjunction(p, C, d, clock)
            if isinstance(a, Answer):
                return a
            if a is None:
                return Answer("timeout" if clock.left() <= 0.05 else "unknown")
            continue
        jobs.append((C, d, False))  # branch and bound per row: sufficient only (any row proven refutes it)
    undecided = False
    for C, d, exact in jobs:
        if exact:
            tries = [(C, d)]
        else:
            tries = [(C[i:i + 1], d[i:i + 1]) for i in range(C.shape[0])]
        proven = False
        for Ci, di in tries:
            left = clock.left()
            if left <= 0.05:
                return Answer("timeout")
            g = _wrapped(p.net, Ci, di)
            clock.say(f"{method}: {Ci.shape[0]} constraint(s), {left:.1f}s left")
            r = verify_complete(g, t0, torch.zeros(1, dtype=torch.long), box, method,
                                timeout=max(left, 0.05))[0]
            if r.status == "verified":
                proven = True
                break
            if r.status == "falsified" and r.counterexample is not None:
                a = p.check(p.to_x(r.counterexample.reshape(-1).double()))
                if a is not None:
                    return a
        if not proven:
            undecided = True
    if undecided:
        return Answer("timeout" if clock.left() <= 0.05 else "unknown")
    return None


def _split(p: _Problem, conjs, method, clock) -> Answer | None:
    """Input splitting: bisect every open sub-box along the t-axis with the largest |gradient|·width of its most
    promising row (per open conjunction, the row whose lower bound is closest to refuting it), in batches; None when
    every sub-box is refuted."""
    C, d, own = p.rows(conjs)
    Ct, dt = torch.as_tensor(C), torch.as_tensor(d)
    ok, low = p.refuted(conjs, "crown")
    queue = [(p.tlo[0], p.thi[0], low[0])]
    nodes, batch, shown = 0, 64, 0
    while queue:
        if clock.left() <= 0.05:
            return Answer("timeout")
        take, queue = queue[:batch], queue[batch:]
        lo = torch.stack([a for a, _, _ in take])
        hi = torch.stack([b for _, b, _ in take])
        gap = torch.stack([g for _, _, g in take]) - dt  # [M, S]
        R = torch.zeros(len(take), C.shape[1], dtype=torch.float64)
        for k in conjs:
            cols = torch.as_tensor(own == k)
            best = gap[:, cols].argmax(1)
            R += Ct[cols][best]
        mid = ((lo + hi) / 2).requires_grad_(True)
        (gr,) = torch.autograd.grad((p.net(mid) * R).sum(), mid)
        score = ((hi - lo) * (gr.abs() + 1e-12)).reshape(len(take), -1)
        k = score.argmax(1)
        mid = mid.detach()
        rows = torch.arange(len(take))
        h1, l2 = hi.clone().reshape(len(take), -1), lo.clone().reshape(len(take), -1)
        h1[rows, k] = mid.reshape(len(take), -1)[rows, k]
        l2[rows, k] = mid.reshape(len(take), -1)[rows, k]
        los = torch.cat([lo, l2.reshape(lo.shape)])
        his = torch.cat([h1.reshape(hi.shape), hi])
        nodes += los.shape[0]
        ok, low = p.refuted(conjs, "crown", los, his)
        for j in (~ok.all(1)).nonzero().flatten().tolist():
            a = p.check(p.to_x((los[j] + his[j]) / 2))
            if a is not None:
                return a
            if float((his[j] - los[j]).max()) < 1e-9:
                return Answer("unknown", note="a sub-box too small to split further")
            queue.append((los[j], his[j], low[j]))
        if nodes >= shown + 1000:
            shown = nodes
            clock.say(f"input split: {nodes} boxes, {len(queue)} open")
    return None


def decide(model: nn.Module, prop: Property, shape, method: str = "auto", timeout: float = 60.0, log=None) -> Answer:
    """Decide ``prop`` on ``model`` (inputs of shape ``shape`` per sample) within about ``timeout`` seconds."""
    if method not in METHODS:
        raise InputError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if int(np.prod(shape)) != prop.n_inputs:
        raise CertlabError(f"the property has {prop.n_inputs} inputs, the network takes {int(np.prod(shape))}")
    clock = _Clock(timeout, log)
    model = copy.deepcopy(model).double().eval()  # the caller's model is left as it is
    with torch.no_grad():
        K = model(torch.zeros(1, *shape, dtype=torch.float64)).numel()
    if K != prop.n_outputs:
        raise CertlabError(f"the property has {prop.n_outputs} outputs, the network gives {K}")
    done = lambda a: Answer(a.status, a.x, a.y, time.perf_counter() - clock.t0, a.note)  # noqa: E731
    unknown = False
    probs = [_Problem(model, r, shape, clock) for r in prop.regions]
    for i, p in enumerate(probs):  # cheap falsification of every region first
        clock.say(f"region {i + 1}/{len(probs)}: attack on {len(p.region.conjunctions)} conjunction(s)")
        a = p.attack(range(len(p.region.conjunctions)))
        if a is not None:
            return done(a)
        if clock.left() <= 0:
            return done(Answer("timeout"))
    for i, p in enumerate(probs):
        conjs = list(range(len(p.region.conjunctions)))
        bound = "alpha-crown" if method == "alpha-crown" else "crown"
        ok = p.refuted(conjs, bound)[0][0]
        conjs = [k for k, o in zip(conjs, ok.tolist()) if not o]
        clock.say(f"region {i + 1}: {bound} refutes {int(ok.sum())}/{len(ok)} conjunction(s)")
        if not conjs:
            continue
        if method in ("crown", "alpha-crown"):
            unknown = True
            continue
        if method == "auto" and p.n <= SPLIT_DIMS:
            a = _split(p, conjs, method, clock)
        else:
            a = _complete(p, conjs, "milp" if method == "milp" else "bab", clock)
        if a is not None:
            if a.status == "sat":
                return done(a)
            if a.status == "timeout":
                return done(a)
            unknown = True
    return done(Answer("unknown" if unknown else "unsat"))
