"""Branch and bound over ReLU splits (complete for ℓ∞ balls and unions of segments, sound for ℓ2).

A subdomain fixes the sign of some crossing ReLUs: z ≥ 0 (its pre-activation lower bound becomes max(l, 0)) or
z ≤ 0 (upper bound min(u, 0)). Each margin f_y − f_j gets its own search by default (``per_margin``). For a batch of
subdomains we

1. recompute the pre-activation bounds of every later ReLU by back-substitution (CROWN lines) with the clamped
   bounds, intersected with the parent's (a subdomain's bounds only shrink); on dense nets the second ReLU layer's
   bounds are the root's plus an exact correction for the split first-layer neurons (``_second_bounds``);
2. lower-bound the margins by back-substitution to the input and Adam steps on α (slopes) and β (split multipliers),
   starting from the parent's optimised values (on float64 bounds the steps run on a float32 copy of the network
   and only choose α and β; the bound that counts is recomputed in float64); a subdomain whose margins are all
   proven is done (float64 bounds:
   > REL64·(1 + M) with the β terms charged; float32: ``milp.decision_tols``), one with an empty bound interval
   (l > u) is infeasible and dropped;
3. evaluate the model at the minimiser of the linear lower bound over the input set (a vertex for ℓ∞) and, every few
   rounds, refine the worst candidates with a few PGD steps — any misclassified point ends the search;
4. split the neuron with the largest score relu(−Λ)·(−l·u/(u−l)) + ¼·relu(Λ)·min(u, −l) (Λ: the back-substitution
   coefficient of the worst margin at that ReLU, i.e. the looseness its relaxation adds; BaBSR-like), or, on nets
   with at most two ReLU layers, the best of its top ``FSB`` candidates by a one-pass bound of both children.

A subdomain with no crossing neuron left is an affine region: its exact minimum under the split constraints is an
LP (HiGHS), which verifies it or yields a point. Subdomains are explored worst bound first, in batches.
"""
from __future__ import annotations

import copy
import heapq
import itertools
import time
from dataclasses import dataclass

import numpy as np
import torch

from certlab.attacks.base import eval_mode
from certlab.bounds import backsub, core, rounding
from certlab.bounds.ibp import prefix_bounds
from certlab.bounds.ops import LinearOp
from certlab.errors import CertlabError, InputError
from certlab.threat import _BoxSet
from certlab.verify.encode import dense_ops
from certlab.verify.milp import TOL, decision_tols, problem
from certlab.verify.result import Result, attack_subset, check_counterexample

BUDGET = 3e7  # floats per back-substitution chunk (memory cap)
# float64 bounds: a margin bound counts as proven when it exceeds REL64·(1 + M) (M: the size of the terms it is made
# of, ``rounding.magnitudes``), and β terms add β·s_k to M. A chain of dot products of lengths n_k in float64 is off by
# at most about (Σ n_k)·2⁻⁵³·M (first order, no cancellation assumed): 2.9e-13·M on eran's mnist_relu_9_200 (784 +
# 9·200 terms), so 1e-11 is 34 times that worst case; measured float32 − float64 root margins there differ by at most
# 1e-14·(1 + M), i.e. the bound's actual rounding is far below M's scale (docs/verification.md, step 5)
REL64 = 1e-11
WARM_ITERS = 10  # α/β steps of warm-started subdomains of nets with at most two ReLU layers (deeper: ``iters``)
FSB = 8  # branching candidates tried per subdomain on nets with at most two ReLU layers (deeper: 1, the score alone)
# float64 bounds: the Adam steps on α and β (and the root's α-CROWN) run on a float32 copy of the network, about twice
# as fast on a CPU; they only choose α and β, and the bound that may prove a margin is then computed once in float64
# with the chosen values (any α ∈ [0, 1], β ≥ 0 gives a sound bound)
STEPS32 = True


@dataclass
class Domain:
    lower: float
    lo: list  # per ReLU: [n_r] pre-activation lower bounds
    hi: list
    split: list  # per ReLU: int8 [n_r] in {-1, 0, +1}
    branch: tuple | None  # (relu position, neuron) to split next; None: no crossing neuron left
    depth: int = 0
    n_cross: int = 0
    open_rows: torch.Tensor | None = None  # bool [S]: margins not yet proven on this subdomain (None: all)
    low: torch.Tensor | None = None  # [S]: its margin lower bounds (they hold on its subdomains too)
    alpha: dict | None = None  # {relu position: [S, n]}: its optimised α (its children start from them)
    beta: dict | None = None  # likewise β


class _Search:
    fast_second = True  # second-layer bounds updated from the root's (``_second_bounds``)
    warm_parts = "ab"  # what children inherit from their parent: "a" (α), "b" (β), "ab"
    fsb = 1  # branching candidates tried per domain (1: the BaBSR-like score alone)

    def __init__(self, model, x, y, threat, batch, iters=0, lr=0.1):
        self.model, self.x, self.y, self.threat = model, x, y, threat
        self.iters, self.lr = iters, lr
        self.tol = self.tol_solver = TOL  # what a margin bound must exceed (per sample: milp.decision_tols)
        self.beta_mag = None  # {ReLU node: [n] magnitude of its input} when β terms are charged (float64 bounds)
        self.g = core.build_graph(model, x)
        self.K = core.output_dim(self.g)
        self.relus = self.g.relus
        self.shapes = [self.g.nodes[r].shape for r in self.relus]
        self.exact = prefix_bounds(self.g, x, threat)[1]  # ReLU inputs whose IBP interval is already exact
        self.batch = batch
        C = core.margin_spec(y, self.K, x.dtype)[0]
        keep = [j for j in range(self.K) if j != int(y[0])]
        self.rows = keep
        C = C[keep]  # [S, K]
        last = self.g.nodes[-1]
        if last.kind == "affine" and isinstance(last.op, LinearOp):
            self.start = last.inputs[0]
            self.A = C @ last.op.W
            self.c = C @ last.op.b if last.op.b is not None else C.new_zeros(C.shape[0])
        else:
            self.start, self.A, self.c = len(self.g.nodes) - 1, C, C.new_zeros(C.shape[0])
        self.dense = None
        self.n_max = max([int(np.prod(n.shape)) for n in self.g.nodes])
        self.deadline = None  # time.perf_counter() value after which bounding and attacks stop (None: never)
        self.root_pre = None  # {ReLU node: (l, u)} at the root (reference for ``_second_bounds``)
        self._second_cache, self._second_root = {}, {}
        self.g32 = None  # float32 copy of the graph for the α/β steps (``STEPS32``), when bounds are float64
        if STEPS32 and x.dtype == torch.float64:
            with torch.no_grad():  # the steps differentiate in α and β only
                g32 = core.build_graph(copy.deepcopy(model).float().requires_grad_(False), x.float())
            if [n.kind for n in g32.nodes] == [n.kind for n in self.g.nodes]:
                self.g32, self.A32, self.c32 = g32, self.A.detach().float(), self.c.detach().float()

    def late(self) -> bool:
        return self.deadline is not None and time.perf_counter() > self.deadline

    # -- bounds ------------------------------------------------------------------------------------------
    def _record(self, pre, N, alpha=None, beta=None, signs=None, rows=None, f32=False):
        """Back-substitution of the margin rows; returns (A at the input, constant, {relu: Λ before relaxing}).

        ``alpha[i]`` [N, S, *shape]: lower slopes of crossing neurons (α-CROWN); ``beta[i]`` [N, S, *shape] ≥ 0 with
        ``signs[i]`` (+1: split z ≥ 0, −1: split z ≤ 0, 0: free): the Lagrangian term −β·sign·z of the split
        constraints (β-CROWN), so min f − Σ β·sign·z over the relaxation bounds f on the subdomain. ``f32``: on the
        float32 copy of the network (``pre`` etc. float32 too)."""
        g, Am, cm = (self.g32, self.A32, self.c32) if f32 else (self.g, self.A, self.c)
        if rows is not None:
            Am, cm = Am[rows], cm[rows]
        A = Am.unsqueeze(0).expand(N, *Am.shape).reshape(N, Am.shape[0], *g.nodes[self.start].shape)
        total = cm.unsqueeze(0).expand(N, -1).clone()
        pending, coefs = {self.start: A}, {}
        for i in range(self.start, 0, -1):
            Ai = pending.pop(i, None)
            if Ai is None:
                continue
            node = g.nodes[i]
            if node.kind == "affine":
                total = total + node.op.bias_back(Ai)
                _acc(pending, node.inputs[0], node.op.back(Ai))
            elif node.kind == "relu":
                coefs[i] = Ai
                a, s, t, cross = backsub.relu_lines(*pre[i], lower="adaptive", crossing=True)
                a = a.unsqueeze(1)
                if alpha is not None and i in alpha:
                    a = torch.where(cross.unsqueeze(1), alpha[i], a)
                pos, neg = Ai.clamp(min=0), Ai.clamp(max=0)
                total = total + (neg * t.unsqueeze(1)).flatten(2).sum(-1)
                Ain = pos * a + neg * s.unsqueeze(1)
                if beta is not None and i in beta:
                    Ain = Ain - beta[i] * signs[i].unsqueeze(1)
                _acc(pending, node.inputs[0], Ain)
            else:
                _acc(pending, node.inputs[0], Ai)
                _acc(pending, node.inputs[1], Ai)
        return pending.pop(0), total, coefs

    def _bound(self, pre, split, N, X, rows=None, closed=None, init=None):
        """(low [N, S'], A0, coefs, opt): CROWN, then ``iters`` Adam steps on α (slopes) and β (split multipliers).

        ``rows``: indices of the margin rows bounded (S' of them; default all); ``closed`` [N, S'] bool: rows already
        proven on a domain (they stay +inf and do not steer the optimisation). ``init``: (α, β), {relu position:
        [N, S', n]} each (or None per position), the starting point (a parent's optimised values) instead of CROWN's
        slopes and β = 0. ``opt``: the α and β of each row's best bound ({position: [N, S', n]}), or None without
        steps. Domains whose rows are all proven leave the optimisation; every bound is sound whatever α ∈ [0, 1]
        and β ≥ 0, so the best per row is kept."""
        A0, total, coefs = self._record(pre, N, rows=rows)
        low = self.threat.concretize(A0, X)[0] + total
        if closed is not None:
            low = low.masked_fill(closed, float("inf"))
        if self.iters <= 0 or bool((low > self.tol).all()):
            return low, A0, coefs, None
        Sr = low.shape[1]
        alpha, beta, signs, a_def = {}, {}, {}, {}
        for pos, r in enumerate(self.relus):
            if r > self.start:
                continue
            shape = self.shapes[pos]
            a0 = init[0].get(pos) if init is not None and "a" in self.warm_parts else None
            a = backsub.relu_lines(*pre[r], lower="adaptive")[0].unsqueeze(1).expand(N, Sr, *shape)
            if a0 is not None:
                alpha[r] = a0.to(X.dtype).reshape(N, Sr, *shape).clone()
                a_def[r] = a
            else:
                alpha[r] = a.clone()
            sg = split[pos].to(X.dtype).reshape(N, *shape)
            if bool((sg != 0).any()):
                signs[r] = sg
                b0 = init[1].get(pos) if init is not None and "b" in self.warm_parts else None
                if b0 is not None:
                    beta[r] = b0.to(X.dtype).reshape(N, Sr, *shape).clone()
                else:
                    beta[r] = torch.zeros(N, Sr, *shape, dtype=X.dtype, device=X.device)
        f32 = self.g32 is not None  # the steps in float32, the bound that counts in float64 (``STEPS32``)
        pre64, signs64, X64 = pre, signs, X
        if f32:
            pre = {r: (lu[0].float(), lu[1].float()) for r, lu in pre.items()}
            signs = {r: v.float() for r, v in signs.items()}
            alpha = {r: v.float() for r, v in alpha.items()}
            a_def = {r: v.float() for r, v in a_def.items()}
            beta = {r: v.float() for r, v in beta.items()}
            X = X.float()
        best = low.detach().to(X.dtype)
        best_a = {r: (a_def[r] if r in a_def else v).clone() for r, v in alpha.items()}
        best_b = {r: v.clone() for r, v in beta.items()}
        # manual Adam (ascent) on the domains with a row still open; they are dropped as they are proven
        m = {k: torch.zeros_like(v) for k, v in itertools.chain(alpha.items(), ((-r - 1, b) for r, b in beta.items()))}
        v2 = {k: torch.zeros_like(t) for k, t in m.items()}
        idx = torch.arange(N, device=X.device)
        cur_pre, cur_signs, cur_X = pre, signs, X
        b1, b2, eps = 0.9, 0.999, 1e-8
        for step in range(1, self.iters + 1):
            if self.late():  # every step's bound is sound: keep the best so far
                break
            need = (best[idx] <= self.tol).any(1)
            if not bool(need.any()):
                break
            if not bool(need.all()):  # drop the proven domains
                keep = need.nonzero().flatten()
                idx = idx[keep]
                alpha = {r: v[keep] for r, v in alpha.items()}
                beta = {r: v[keep] for r, v in beta.items()}
                m = {k: t[keep] for k, t in m.items()}
                v2 = {k: t[keep] for k, t in v2.items()}
                cur_pre = {r: (lu[0][idx], lu[1][idx]) for r, lu in pre.items()}
                cur_signs = {r: sg[idx] for r, sg in signs.items()}
                cur_X = X[idx]
            n = idx.numel()
            with torch.enable_grad():
                pa = {r: v.requires_grad_(True) for r, v in alpha.items()}
                pb = {r: v.requires_grad_(True) for r, v in beta.items()}
                A0s, tot, _ = self._record(cur_pre, n, pa, pb, cur_signs, rows, f32)
                cur = self.threat.concretize(A0s, cur_X)[0] + tot
                open_ = best[idx] <= self.tol
                grads = torch.autograd.grad((cur * open_).sum(), list(pa.values()) + list(pb.values()))
            cur = cur.detach()
            with torch.no_grad():
                better = cur > best[idx]
                if bool(better.any()):
                    best[idx] = torch.maximum(best[idx], cur)
                    for r in alpha:
                        mk = better.view(n, Sr, *([1] * (alpha[r].dim() - 2)))
                        best_a[r][idx] = torch.where(mk, alpha[r].detach(), best_a[r][idx])
                        if r in beta:
                            best_b[r][idx] = torch.where(mk, beta[r].detach(), best_b[r][idx])
                keys = list(alpha) + [-r - 1 for r in beta]
                params = list(alpha.values()) + list(beta.values())
                c1, c2 = 1 - b1 ** step, 1 - b2 ** step
                for k, p_, gr in zip(keys, params, grads):
                    m[k].mul_(b1).add_(gr, alpha=1 - b1)
                    v2[k].mul_(b2).addcmul_(gr, gr, value=1 - b2)
                    p_.detach_()
                    p_.addcdiv_(m[k] / c1, (v2[k] / c2).sqrt_().add_(eps), value=self.lr)
                for v in alpha.values():
                    v.clamp_(0.0, 1.0)
                for v in beta.values():
                    v.clamp_(min=0.0)
        # the best α, β per row: one more sound bound, and the coefficients for branching and candidate points
        if f32:  # back to float64: the steps' own bounds do not count, CROWN's (low) and this one do
            pre, signs, X, best = pre64, signs64, X64, low
            best_a = {r: v.to(X.dtype) for r, v in best_a.items()}
            best_b = {r: v.to(X.dtype) for r, v in best_b.items()}
        A0, total, coefs = self._record(pre, N, best_a, best_b, signs, rows)
        cur = self.threat.concretize(A0, X)[0] + total
        best = torch.maximum(best, cur)
        if self.beta_mag is not None and best_b:  # the β terms' share of rounding (see REL64)
            pen = sum((v.reshape(N, Sr, -1) * self.beta_mag[r]).sum(2) for r, v in best_b.items())
            best = best - REL64 * pen
        pos_of = {r: p for p, r in enumerate(self.relus)}
        opt = ({pos_of[r]: v.reshape(N, Sr, -1) for r, v in best_a.items()},
               {pos_of[r]: v.reshape(N, Sr, -1) for r, v in best_b.items()})
        return best, A0, coefs, opt

    def evaluate(self, lo, hi, split, start_pos, open_rows=None, init=None):
        """Recompute ReLU bounds after position start_pos, then margins. Returns (lo, hi, low [N,S], A0, coefs, opt),
        or None when the deadline passes first. ``open_rows`` [N, S] bool: the margins still to prove per domain (the
        others were proven on an ancestor, hence hold on the subdomain); only rows open in some domain are bounded,
        the others come back +inf, and A0/coefs have one row per bounded margin (``self.bounded``). ``init``: the
        starting α and β ({relu position: [N, S, n]} each, all S margins) and ``opt`` the optimised ones, likewise
        (the rows not bounded keep ``init``'s), or None without α/β steps."""
        if self.late():
            return None
        N = lo[0].shape[0]
        X = self.x.expand(N, *self.x.shape[1:])
        pre = {}
        lo, hi = list(lo), list(hi)
        for pos, r in enumerate(self.relus):
            l, u = lo[pos], hi[pos]
            p = self.g.nodes[r].inputs[0]
            if pos > start_pos and p not in self.exact:
                cols = ((l < 0) & (u > 0)).any(0).nonzero().flatten()
                if cols.numel():
                    nb = self._node_bounds(p, cols, pre, X, pos)
                    if nb is None:
                        return None
                    nl, nu = nb
                    l, u = l.clone(), u.clone()
                    l[:, cols] = torch.maximum(l[:, cols], nl)
                    u[:, cols] = torch.minimum(u[:, cols], nu)
                sp = split[pos]
                l = torch.where(sp > 0, l.clamp_min(0), l)
                u = torch.where(sp < 0, u.clamp_max(0), u)
            lo[pos], hi[pos] = l, u
            pre[r] = (l.reshape(N, *self.shapes[pos]), u.reshape(N, *self.shapes[pos]))
        S = self.A.shape[0]
        rows = None if open_rows is None else open_rows.any(0).nonzero().flatten()
        self.bounded = torch.arange(S, device=X.device) if rows is None else rows
        sub = None
        if init is not None:
            sub = tuple({p_: (v if rows is None else v[:, rows]) for p_, v in part.items() if v is not None}
                        for part in init)
        closed = None if open_rows is None else ~open_rows[:, rows]
        part, A0, coefs, opt = self._bound(pre, split, N, X, rows, closed, sub)
        if rows is None:
            low = part
        else:
            low = torch.full(open_rows.shape, float("inf"), dtype=part.dtype, device=part.device)
            low[:, rows] = part
        if opt is not None and rows is not None:  # back to all S margins
            full = []
            for k, got in enumerate(opt):
                out = {}
                for p_, v in got.items():
                    base = init[k].get(p_) if init is not None else None
                    f = (base.to(v.dtype).clone() if base is not None
                         else v.new_zeros(N, S, v.shape[2]))
                    f[:, rows] = v
                    out[p_] = f
                full.append(out)
            opt = tuple(full)
        return lo, hi, low, A0, coefs, opt

    def _second(self, pos):
        """For the ReLU at ``pos`` whose input is ``W2·relu(z1) + b2`` with ``z1 = W1·x + b1`` exact (the first hidden
        layer of a dense network): (W2, b2, W1, b1, ReLU node of z1) so that its bounds can be updated from the
        root's (``_second_bounds``), else None."""
        if pos in self._second_cache:
            return self._second_cache[pos]
        out = None
        g = self.g
        p = g.nodes[self.relus[pos]].inputs[0]
        n2 = g.nodes[p]
        if n2.kind == "affine" and isinstance(n2.op, LinearOp) and len(n2.op.W.shape) == 2:
            r1 = n2.inputs[0]
            if g.nodes[r1].kind == "relu" and self.root_pre is not None and r1 in self.root_pre:
                p1 = g.nodes[r1].inputs[0]
                n1 = g.nodes[p1]
                if (p1 in self.exact and n1.kind == "affine" and isinstance(n1.op, LinearOp)
                        and n1.inputs[0] == 0 and len(g.nodes[0].shape) == 1):
                    out = (n2.op.W, n2.op.b, n1.op.W, n1.op.b, r1)
        self._second_cache[pos] = out
        return out

    def _second_bounds(self, pos, cols, pre, X):
        """Bounds of the neurons ``cols`` of a second-layer ReLU input (see ``_second``), each the same CROWN
        back-substitution as ``_node_bounds`` but as the root's plus a correction for the first-layer neurons whose
        relaxation differs from the root's (the split ones): the matmul through W1 shrinks from all first-layer
        neurons to those, the correction is exact."""
        W2, b2, W1, b1, r1 = self._second(pos)
        N, dt, dev = X.shape[0], X.dtype, X.device
        key = (pos,)
        if key not in self._second_root:
            a, s_, t = backsub.relu_lines(*[v.reshape(1, -1) for v in self.root_pre[r1]], lower="adaptive")
            lam = torch.cat([W2, -W2])  # [2·n2, n1]: lower bounds of z_j and of −z_j
            c = lam.clamp(min=0) * a + lam.clamp(max=0) * s_
            const = (lam.clamp(max=0) * t).sum(1) + (c @ b1 if b1 is not None else 0.0)
            if b2 is not None:
                const = const + torch.cat([b2, -b2])
            self._second_root[key] = (a[0], s_[0], t[0], c @ W1, const)
        a_r, s_r, t_r, A_r, c_r = self._second_root[key]
        l, u = (v.reshape(N, -1) for v in pre[r1])
        a, s_, t = backsub.relu_lines(l, u, lower="adaptive")
        diff = (a != a_r) | (s_ != s_r) | (t != t_r)  # [N, n1]
        cnt = diff.sum(1)
        K = max(int(cnt.max()), 1)
        idx = torch.argsort(diff.to(torch.int8), dim=1, descending=True, stable=True)[:, :K]  # [N, K]
        valid = (torch.arange(K, device=dev).unsqueeze(0) < cnt.unsqueeze(1)).to(dt)
        n2 = W2.shape[0]
        rows = torch.cat([cols, cols + n2])  # [2C]
        lam = torch.cat([W2[cols], -W2[cols]])  # [2C, n1]
        lam_g = lam[:, idx].permute(1, 0, 2)  # [N, 2C, K]
        g_ = lambda v: v.gather(1, idx).unsqueeze(1)  # noqa: E731  [N, 1, K]
        pos_, neg = lam_g.clamp(min=0), lam_g.clamp(max=0)
        ar, sr, tr = a_r[idx].unsqueeze(1), s_r[idx].unsqueeze(1), t_r[idx].unsqueeze(1)
        dc = (pos_ * (g_(a) - ar) + neg * (g_(s_) - sr)) * valid.unsqueeze(1)  # [N, 2C, K]
        dconst = (neg * (g_(t) - tr) * valid.unsqueeze(1)).sum(2)
        if b1 is not None:
            dconst = dconst + (dc * b1[idx].unsqueeze(1)).sum(2)
        C = cols.numel()
        chunk = max(1, int(BUDGET // (2 * N * W1.shape[1])))
        low = []
        box = isinstance(self.threat, _BoxSet) and bool((X == X[:1]).all())
        if box:  # min of A0·x' over [mid − rad, mid + rad] = A0·mid − |A0 ⊙ rad|·1, with A0·mid linear in dc
            lo_, hi_ = self.threat.interval_hull(X[:1])
            mid, rad = ((lo_ + hi_) / 2).reshape(-1), ((hi_ - lo_) / 2).reshape(-1)
            if "rad" not in self._second_root:
                self._second_root["rad"] = (W1 * rad, W1 @ mid)
            W1r, W1m = self._second_root["rad"]
            if (key, "rad") not in self._second_root:
                self._second_root[(key, "rad")] = (A_r * rad, A_r @ mid)
            Arr, Arm = self._second_root[(key, "rad")]
            W1g = W1r[idx]  # [N, K, n0]
            centre = Arm[rows].unsqueeze(0) + (dc * W1m[idx].unsqueeze(1)).sum(2)
        for c0 in range(0, 2 * C, chunk):
            if self.late():
                return None
            sl = slice(c0, c0 + chunk)
            if box:
                A0 = torch.baddbmm(Arr[rows[sl]].unsqueeze(0), dc[:, sl], W1g)
                low.append(centre[:, sl] - A0.abs_().sum(2) + c_r[rows[sl]].unsqueeze(0) + dconst[:, sl])
            else:
                A0 = torch.bmm(dc[:, sl], W1[idx]) + A_r[rows[sl]].unsqueeze(0)
                low.append(self.threat.concretize(A0, X)[0] + c_r[rows[sl]].unsqueeze(0) + dconst[:, sl])
        low = torch.cat(low, 1)
        return low[:, :C], -low[:, C:]

    def _node_bounds(self, p, cols, pre, X, pos):
        if self.fast_second and self._second(pos) is not None:
            return self._second_bounds(pos, cols, pre, X)
        N, n = X.shape[0], int(np.prod(self.shapes[pos]))
        chunk = max(1, int(BUDGET // (2 * N * self.n_max)))
        outs_l, outs_u = [], []
        for c0 in range(0, cols.numel(), chunk):
            if self.late():
                return None
            cc = cols[c0:c0 + chunk]
            S = cc.numel()
            A = torch.zeros(N, S, n, dtype=X.dtype, device=X.device)
            A[:, torch.arange(S, device=X.device), cc] = 1.0
            lo_, hi_ = backsub.both_bounds(self.g, p, A.reshape(N, S, *self.shapes[pos]), pre, X, self.threat)
            outs_l.append(lo_)
            outs_u.append(hi_)
        return torch.cat(outs_l, 1), torch.cat(outs_u, 1)

    def optimise_intermediate(self, pre, iters, lr=0.1):
        """α-CROWN for the intermediate bounds: layer by layer, Adam steps on the lower slopes of every earlier ReLU
        (one set per bounded neuron and side) maximise each crossing neuron's lower bound and minimise its upper
        bound; every step's bound is sound, the best one per neuron is intersected with ``pre`` (updated in place,
        so later layers start from the tightened ones). Stops at the deadline."""
        X = self.x
        for pos, r in enumerate(self.relus):
            p = self.g.nodes[r].inputs[0]
            if pos == 0 or p in self.exact or self.late():
                continue
            l, u = pre[r]
            lf, uf = l.reshape(1, -1), u.reshape(1, -1)
            idx = ((lf < 0) & (uf > 0))[0].nonzero().flatten()
            m = idx.numel()
            if m == 0:
                continue
            n = lf.shape[1]
            A = torch.zeros(1, 2 * m, n, dtype=X.dtype, device=X.device)
            A[0, torch.arange(m), idx] = 1.0
            A[0, m + torch.arange(m), idx] = -1.0
            A = A.reshape(1, 2 * m, *self.shapes[pos])
            # the steps on the float32 copy when there is one (``STEPS32``): they pick each row's α, and the bound
            # with the picked α is computed once more on the network itself
            f32 = self.g32 is not None
            g, As, Xs = (self.g32, A.float(), X.float()) if f32 else (self.g, A, X)
            pre_s = {q: (lu[0].float(), lu[1].float()) for q, lu in pre.items()} if f32 else pre
            alpha = {}
            for q in self.relus[:pos]:
                a = backsub.relu_lines(*pre_s[q], lower="adaptive")[0].detach()
                alpha[q] = a.unsqueeze(1).expand(1, 2 * m, *a.shape[1:]).clone().requires_grad_(True)
            opt = torch.optim.Adam(list(alpha.values()), lr=lr)
            best, best_a = None, {q: v.detach().clone() for q, v in alpha.items()}
            with torch.enable_grad():
                for _ in range(iters + 1):
                    low = backsub.lower_bound(g, p, As, pre_s, Xs, self.threat, "adaptive", alpha)
                    if best is None:
                        best = low.detach()
                    else:
                        better = low.detach() > best
                        best = torch.where(better, low.detach(), best)
                        for q, v in alpha.items():
                            mk = better.view(1, 2 * m, *([1] * (v.dim() - 2)))
                            best_a[q] = torch.where(mk, v.detach(), best_a[q])
                    if self.late():
                        break
                    opt.zero_grad()
                    (-low.sum()).backward()
                    opt.step()
                    with torch.no_grad():
                        for v in alpha.values():
                            v.clamp_(0.0, 1.0)
            if f32:
                best_a = {q: v.to(X.dtype) for q, v in best_a.items()}
                with torch.no_grad():
                    best = backsub.lower_bound(self.g, p, A, pre, X, self.threat, "adaptive", best_a)
            nl, nu = lf.clone(), uf.clone()
            nl[0, idx] = torch.maximum(lf[0, idx], best[0, :m])
            nu[0, idx] = torch.minimum(uf[0, idx], -best[0, m:])
            pre[r] = (nl.reshape(l.shape), nu.reshape(u.shape))

    # -- candidates -------------------------------------------------------------------------------------------
    def argmin_points(self, A0w):
        """Minimiser over the input set of A0w·x' (one row per domain): [N, *in]."""
        N = A0w.shape[0]
        X = self.x.expand(N, *self.x.shape[1:])
        return self.threat.argmin(A0w.reshape(X.shape), X)

    def find_counterexample(self, pts, pgd_steps=0):
        """A misclassified point among pts (optionally after PGD steps on the worst margin), checked, or None."""
        if pgd_steps and self.threat.gradient_attacks:
            pts = self._pgd(pts, pgd_steps)
        with torch.no_grad():
            out = self.model(pts)
        bad = (out.argmax(1) != self.y[0]).nonzero().flatten()
        for i in bad.tolist()[:4]:
            z = check_counterexample(self.model, self.x, self.y, self.threat, 0, pts[i])
            if z is not None:
                return z
        return None

    def _pgd(self, z, steps):
        N = z.shape[0]
        X = self.x.expand(N, *self.x.shape[1:])
        eps = float(self.threat.eps_vector(self.x)[0])
        step = 0.25 * eps
        yv = self.y.expand(N)
        for _ in range(steps):
            if self.late():
                break
            z = z.detach().requires_grad_(True)
            with torch.enable_grad():
                out = self.model(z)
                other = out.scatter(1, yv.view(-1, 1), float("-inf")).max(1).values
                m = (out.gather(1, yv.view(-1, 1)).squeeze(1) - other).sum()
                gr, = torch.autograd.grad(m, z)
            z = z - step * self.threat.ascent(gr)
            z = self.threat.project(z.detach(), X)
            step *= 0.8
        return z.detach()

    def choose(self, lo, hi, split, coefs, w, opt=None, closed=None):
        """Branching neuron per domain: [(pos, k) or None]. The BaBSR-like score ranks the crossing unsplit neurons;
        with ``fsb`` > 1 candidates and the domains' optimised α/β (``opt``, rows ``self.bounded``; ``closed``
        [N, S'] their proven rows), each of the top ``fsb`` is tried: both children bounded once with the parent's α,
        β and intermediate bounds, the neuron whose worse child is best wins (filtered smart branching)."""
        N = w.shape[0]
        dev = w.device
        ar = torch.arange(N, device=dev)
        scores = []
        for pos, r in enumerate(self.relus):
            l, u = lo[pos], hi[pos]
            cross = (l < 0) & (u > 0) & (split[pos] == 0)
            lam = coefs[r][ar, w].reshape(N, -1) if r in coefs else torch.zeros_like(l)
            t = u * (-l) / (u - l).clamp_min(1e-12)
            score = (-lam).clamp_min(0) * t + 0.25 * lam.clamp_min(0) * torch.minimum(u, -l) + 1e-6 * t
            scores.append(torch.where(cross, score, torch.full_like(score, -1.0)))
        flat = torch.cat(scores, 1)  # [N, Σ n]
        offs = np.cumsum([0] + [v.shape[1] for v in lo])

        def where(j):  # flat index → (ReLU position, neuron)
            pos = int(np.searchsorted(offs, j, side="right") - 1)
            return pos, int(j - offs[pos])

        k = min(self.fsb, flat.shape[1])
        if k <= 1 or opt is None or self.late():
            s, j = flat.max(1)
            return [None if s[i] < 0 else where(int(j[i])) for i in range(N)]
        top_s, top_j = flat.topk(k, 1)  # [N, k]
        M = N * k * 2
        rep = lambda v: v.repeat_interleave(2 * k, 0)  # noqa: E731
        Lc, Uc = [rep(v).clone() for v in lo], [rep(v).clone() for v in hi]
        cand = top_j.reshape(-1).repeat_interleave(2)  # [M]
        sign = torch.tensor([1, -1], device=dev).repeat(N * k)
        for pos in range(len(lo)):
            inl = (cand >= int(offs[pos])) & (cand < int(offs[pos + 1]))
            rows_ = inl.nonzero().flatten()
            if rows_.numel():
                kk = cand[rows_] - int(offs[pos])
                pl = rows_[sign[rows_] > 0]
                Lc[pos][pl, kk[sign[rows_] > 0]] = Lc[pos][pl, kk[sign[rows_] > 0]].clamp_min(0)
                ng = rows_[sign[rows_] < 0]
                Uc[pos][ng, kk[sign[rows_] < 0]] = Uc[pos][ng, kk[sign[rows_] < 0]].clamp_max(0)
        f32 = self.g32 is not None  # an estimate that only ranks candidates: on the float32 copy where there is one
        dt = torch.float32 if f32 else self.x.dtype
        pre = {r: (Lc[p].reshape(M, *self.shapes[p]).to(dt), Uc[p].reshape(M, *self.shapes[p]).to(dt))
               for p, r in enumerate(self.relus)}
        rows = self.bounded
        Sr = rows.numel()
        alpha, beta, signs = {}, {}, {}
        for p, r in enumerate(self.relus):
            if r > self.start:
                continue
            if p in opt[0]:
                alpha[r] = rep(opt[0][p][:, rows].to(dt)).reshape(M, Sr, *self.shapes[p])
            sg = rep(split[p]).to(dt)
            if p in opt[1] and bool((sg != 0).any()):
                signs[r] = sg.reshape(M, *self.shapes[p])
                beta[r] = rep(opt[1][p][:, rows].to(dt)).reshape(M, Sr, *self.shapes[p])
        X = self.x.expand(M, *self.x.shape[1:]).to(dt)
        A0, total, _ = self._record(pre, M, alpha or None, beta or None, signs, rows, f32)
        lb = self.threat.concretize(A0, X)[0] + total  # [M, Sr]
        if closed is not None:
            lb = lb.masked_fill(rep(closed), float("inf"))
        lb = lb.min(1).values.reshape(N, k, 2).min(2).values  # the worse child per candidate
        lb = torch.where(top_s >= 0, lb, torch.full_like(lb, -float("inf")))
        pick = lb.argmax(1)
        j = top_j[ar, pick]
        return [None if top_s[i, 0] < 0 else where(int(j[i])) for i in range(N)]

    def leaf(self, d: Domain, deadline):
        """Exact LP over an affine region (no crossing neuron left), or exact MILP over a subdomain with few
        crossing neurons (binaries only for those): 'verified', a counterexample, or 'stuck'."""
        pre = {r: (d.lo[p].reshape(1, *self.shapes[p]), d.hi[p].reshape(1, *self.shapes[p]))
               for p, r in enumerate(self.relus)}
        splits = {r: d.split[p].reshape(1, -1) for p, r in enumerate(self.relus)}
        integral = d.n_cross > 0
        if self.dense is None:
            self.dense = dense_ops(self.g)
        prob = problem(self.g, self.x, self.threat, pre, 0, integral=integral, splits=splits, dense=self.dense)
        C = core.margin_spec(self.y, self.K, self.x.dtype)[0].double().cpu().numpy()
        for n, j in enumerate(self.rows):
            if d.open_rows is not None and not bool(d.open_rows[n]):  # proven on an ancestor
                continue
            obj, const = prob.enc.linear(self.g.output, C[j])
            r = prob.optimise(obj, const, False, deadline, integral=integral)
            if r["status"] == "infeasible":  # a relaxation of the region is empty: so is the region
                return "verified"
            if r["bound"] is not None and r["bound"] > self.tol_solver:
                continue
            if r["point"] is not None:
                z = check_counterexample(self.model, self.x, self.y, self.threat, 0,
                                         torch.as_tensor(r["point"], dtype=self.x.dtype))
                if z is not None:
                    return z
            return "stuck"
        return "verified"


def _input_magnitudes(g, x, threat):
    """{ReLU node: [n]}: the size of the terms of its input (``rounding.node_magnitudes``)."""
    s = rounding.node_magnitudes(g, x, threat)
    return {r: s[g.nodes[r].inputs[0]].reshape(-1) for r in g.relus}


def _acc(pending, j, A):
    pending[j] = A if j not in pending else pending[j] + A


def _bab_one(model, x, y, threat, timeout, max_nodes, batch, attack, pgd_every, leaf_milp, iters=0, root_iters=0,
             log=None, warm=True, warm_iters=None, warm_lr=None, per_margin=True, warm_beta=None, fsb=None):
    t0 = time.perf_counter()
    deadline = t0 + timeout
    nodes = 0

    def done(status, z=None, bound=None):
        return Result(status, z, time.perf_counter() - t0, nodes, bound, "bab")

    z = check_counterexample(model, x, y, threat, 0, x[0])
    if z is not None:
        return done("falsified", z)
    if attack:
        from certlab.attacks import run

        try:
            za = run(model, x, y, threat, method="apgd-ce", steps=50, restarts=1, seed=0)
            z = check_counterexample(model, x, y, threat, 0, za[0])
        except CertlabError:
            z = None
        if z is not None:
            return done("falsified", z)
    S = _Search(model, x, y, threat, batch, iters)
    S.deadline = deadline
    S.tol, S.tol_solver = decision_tols(model, x, y, threat)
    shallow = len(S.relus) <= 2
    if warm_beta is None:  # measured (docs/verification.md): β inherited helps two-ReLU-layer nets, hurts deeper ones
        warm_beta = shallow
    S.warm_parts = "ab" if warm_beta else "a"
    S.fsb = int(fsb) if fsb is not None else (FSB if shallow else 1)
    if warm_iters is None:
        warm_iters = WARM_ITERS if shallow else iters
    if x.dtype == torch.float64:  # float64 bounds: float64's rounding line (REL64), not the solver's
        S.tol = max(TOL, REL64 * float(rounding.tolerances(model, x, y, threat, 1.0).max()))
        S.beta_mag = _input_magnitudes(S.g, x, threat)
    pre0 = backsub.intermediate(S.g, x, threat, lower="adaptive")
    if root_iters:
        S.optimise_intermediate(pre0, root_iters)
    S.root_pre = pre0
    lo = [pre0[r][0].reshape(1, -1) for r in S.relus]
    hi = [pre0[r][1].reshape(1, -1) for r in S.relus]
    split = [torch.zeros_like(v, dtype=torch.int8) for v in lo]
    n_rows = S.A.shape[0]
    if per_margin and n_rows > 1:  # one search per margin (rows proven at their root cost one evaluation)
        groups = [torch.arange(n_rows, device=x.device).eq(j).unsqueeze(0) for j in range(n_rows)]
    else:
        groups = [None]
    for open0 in groups:
        res = _search(S, lo, hi, split, open0, batch, leaf_milp, pgd_every, iters, warm, warm_iters, warm_lr,
                      deadline, max_nodes, log, lambda: nodes)
        nodes += res[1]
        if res[0] == "falsified":
            return done("falsified", res[2])
        if res[0] == "unknown":
            return done("unknown", bound=res[2])
    return done("verified")


def _search(S, lo, hi, split, open0, batch, leaf_milp, pgd_every, iters, warm, warm_iters, warm_lr, deadline,
            max_nodes, log, nodes_before):
    """Best-first branch and bound from the root bounds (lo, hi) on the margins open in ``open0`` ([1, S] bool, None:
    all): ("verified" | "unknown", nodes, bound) or ("falsified", nodes, counterexample)."""
    nodes = 0
    heap, counter = [], itertools.count()
    stuck = False
    pending = [(lo, hi, split, len(S.relus), [0], open0, None, None)]
    rounds = 0
    global_low = None
    while pending:
        lo, hi, split, start_pos, depths, open_rows, init, parent_low = pending.pop()
        warm_now = warm and init is not None and bool(init[0])
        S.iters = (warm_iters if warm_iters is not None else iters) if warm_now else iters
        S.lr = (warm_lr if warm_lr is not None else 0.1) if warm_now else 0.1
        ev = S.evaluate(lo, hi, split, start_pos, open_rows, init if warm else None)
        if ev is None:  # out of time while bounding this batch
            stuck = True
            break
        lo, hi, low, A0, coefs, opt = ev
        if parent_low is not None:  # a parent's bound holds on its subdomains
            low = torch.maximum(low, parent_low)
        if opt is not None:
            opt = tuple({p_: v.to(torch.float32) for p_, v in part.items()} for part in opt)
        nodes += low.shape[0]
        rounds += 1
        if global_low is None:
            global_low = float(low.min())
        inv = torch.full((low.shape[1],), -1, dtype=torch.long, device=low.device)
        inv[S.bounded] = torch.arange(S.bounded.numel(), device=low.device)
        w = inv[low.argmin(1)]  # the worst margin, as a row of A0 and coefs (a bounded one: open rows are finite)
        pts = S.argmin_points(A0[torch.arange(low.shape[0], device=w.device), w])
        steps = 10 if (pgd_every and rounds % pgd_every == 0) else 0
        z = S.find_counterexample(pts, steps)
        if z is not None:
            return "falsified", nodes, z
        worst = low.min(1).values
        infeasible = torch.zeros_like(worst, dtype=torch.bool)
        for l, u in zip(lo, hi):
            infeasible |= ((l - u) > 1e-5 * (1 + l.abs() + u.abs())).any(1)
        open_ = ((worst <= S.tol) & ~infeasible).nonzero().flatten().tolist()
        n_cross = sum(((l < 0) & (u > 0) & (sp == 0)).sum(1) for l, u, sp in zip(lo, hi, split))
        if open_:
            pick = lambda vs: [v[open_] for v in vs]  # noqa: E731
            closed = None if open_rows is None else ~(low[open_][:, S.bounded] <= S.tol)
            choice = S.choose(pick(lo), pick(hi), pick(split), {r: c[open_] for r, c in coefs.items()}, w[open_],
                              None if opt is None else tuple({p_: v[open_] for p_, v in part.items()} for part in opt),
                              closed)
            for n, i in enumerate(open_):
                d = Domain(float(worst[i]), [v[i] for v in lo], [v[i] for v in hi], [v[i] for v in split],
                           choice[n], depths[i], int(n_cross[i]), low[i] <= S.tol, low[i],
                           None if opt is None else {p_: v[i] for p_, v in opt[0].items()},
                           None if opt is None else {p_: v[i] for p_, v in opt[1].items()})
                heapq.heappush(heap, (d.lower, next(counter), d))
        if log is not None:
            log(rounds, nodes_before() + nodes, len(heap), heap[0][0] if heap else None)
        if time.perf_counter() > deadline or nodes_before() + nodes >= max_nodes:
            break
        # next batch: worst bounds first; affine regions go to the LP
        take = []
        while heap and len(take) < max(1, batch // 2):
            _, _, d = heapq.heappop(heap)
            if d.branch is None or d.n_cross <= leaf_milp:
                if S.late():
                    stuck = True
                    break
                res = S.leaf(d, deadline)
                nodes += 1
                if isinstance(res, torch.Tensor):
                    return "falsified", nodes, res
                if res == "stuck":
                    stuck = True
                continue
            take.append(d)
        if not take:
            break
        kids_lo, kids_hi, kids_split, kd, kopen, kpar = [], [], [], [], [], []
        for d in take:
            pos, k = d.branch
            for sign in (1, -1):
                l = [v.clone() if p == pos else v for p, v in enumerate(d.lo)]
                u = [v.clone() if p == pos else v for p, v in enumerate(d.hi)]
                s = [v.clone() if p == pos else v for p, v in enumerate(d.split)]
                s[pos][k] = sign
                if sign > 0:
                    l[pos][k] = max(float(l[pos][k]), 0.0)
                else:
                    u[pos][k] = min(float(u[pos][k]), 0.0)
                kids_lo.append(l)
                kids_hi.append(u)
                kids_split.append(s)
                kd.append(d.depth + 1)
                kopen.append(d.open_rows)
                kpar.append(d)
        start = min(d.branch[0] for d in take)
        stack = lambda ks: [torch.stack([k[p] for k in ks]) for p in range(len(S.relus))]  # noqa: E731
        init = None
        if warm:  # each child starts from its parent's α (where every parent has them) and β (0 where absent)
            a_init, b_init = {}, {}
            for pos in range(len(S.relus)):
                if all(d.alpha is not None and pos in d.alpha for d in kpar):
                    a_init[pos] = torch.stack([d.alpha[pos] for d in kpar])
                have = [d.beta[pos] for d in kpar if d.beta is not None and pos in d.beta]
                if have:
                    z = torch.zeros_like(have[0])
                    b_init[pos] = torch.stack([d.beta[pos] if d.beta is not None and pos in d.beta else z
                                               for d in kpar])
            init = (a_init, b_init)
        pending.append((stack(kids_lo), stack(kids_hi), stack(kids_split), start, kd, torch.stack(kopen), init,
                        torch.stack([d.low for d in kpar])))
    if not heap and not pending and not stuck:
        return "verified", nodes, None
    known = [v for v in [global_low] + ([heap[0][0]] if heap else []) if v is not None]
    return "unknown", nodes, min(known) if known else None


@core.float32_exact
def verify(model, x, y, threat, timeout: float = 30.0, max_nodes: int = 100000, batch: int = 128,
           attack: bool = True, pgd_every: int = 5, leaf_milp: int = 12, iters: int = 20,
           root_iters: int = 50, warm_iters: int | None = None, per_margin: bool = True,
           warm_beta: bool | None = None, fsb: int | None = None) -> list:
    """Branch and bound per sample → list of :class:`Result`. ``timeout`` seconds and ``max_nodes`` evaluated
    subdomains per sample; ``batch`` subdomains bounded together; ``attack``: APGD-CE first; ``pgd_every``: every
    that many rounds, 10 PGD steps from the bound minimisers (0: never); ``leaf_milp``: subdomains with at most that
    many crossing neurons are finished by an exact MILP (binaries for those neurons only; 0: LP leaves only);
    ``iters``: Adam steps on the α slopes and β split multipliers per batch (0: plain CROWN bounds);
    ``root_iters``: Adam steps of α-CROWN on each layer's intermediate bounds at the root (0: CROWN's);
    ``warm_iters``: the steps for subdomains, which start from their parent's optimised α (and β where
    ``warm_beta``); None: ``WARM_ITERS`` for nets with at most two ReLU layers, else ``iters``; ``warm_beta``: None:
    inherit β on nets with at most two ReLU layers only (start from β = 0 on deeper ones); ``fsb``: branching
    candidates bounded per subdomain (None: ``FSB`` on nets with at most two ReLU layers, else 1: the score alone);
    ``per_margin``: one search per margin (splits chosen for that margin alone) instead of one for all."""
    core.validate(model, x, threat)
    for name, v in (("timeout", timeout), ("max_nodes", max_nodes), ("batch", batch)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0:
            raise InputError(f"{name} must be a positive number, got {v!r}")
    if not isinstance(model, torch.nn.Module):
        raise InputError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    from certlab.bounds.api import certify

    with eval_mode(model), torch.no_grad():
        K = core.output_dim(core.build_graph(model, x[:1]))
        y = core.check_labels(y, x.shape[0], K, x.device)
        B = x.shape[0]
        out = [None] * B
        # batched screening: CROWN certifies most samples of a trained model, attacks find most of the others; each
        # sample's share of it counts against its timeout, so the attacks stop once the batch's timeouts have passed
        t0 = start = time.perf_counter()
        cert = certify(model, x, y, threat, "crown")
        share = (time.perf_counter() - t0) / max(B, 1)
        for i in cert.nonzero().flatten().tolist():
            out[i] = Result("verified", None, share, 1, None, "bab")
        rest = (~cert).nonzero().flatten()
        used = share  # each sample's share of the screening counts against its timeout
        if attack and rest.numel():
            t0 = time.perf_counter()
            found = attack_subset(model, x, y, threat, rest, ("apgd-ce", "apgd-t"), deadline=start + timeout * B)
            used = share2 = share + (time.perf_counter() - t0) / rest.numel()
            for i, z in found.items():
                out[i] = Result("falsified", z, share2, 0, None, "bab")
        for b in range(B):
            if out[b] is None:
                if used >= timeout:
                    out[b] = Result("unknown", None, used, 0, None, "bab")
                    continue
                ts = threat.single(x, b)
                out[b] = _bab_one(model, x[b:b + 1], y[b:b + 1], ts, float(timeout) - used, int(max_nodes), int(batch),
                                  False, pgd_every, int(leaf_milp), int(iters), int(root_iters),
                                  warm_iters=None if warm_iters is None else int(warm_iters),
                                  per_margin=bool(per_margin), warm_beta=warm_beta, fsb=fsb)
                out[b].time += used
    return out
