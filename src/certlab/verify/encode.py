"""Mixed-integer (and LP) encodings of a ReLU network over a threat set, built from the bound graph.

Every node value is kept as an affine expression ``z = M v + c`` of the solver variables ``v`` (sparse ``M``), so
affine layers and residual sums cost no variables or rows. Variables are created only for the input set and for
crossing ReLUs. With pre-activation bounds ``l < 0 < u`` a ReLU ``y = max(0, z)`` becomes (big-M, Tjeng et al. 2019)

    y ≥ z,   y ≤ z − l·(1 − δ),   y ≤ u·δ,   y ≥ 0,   δ ∈ {0, 1},

which is exact for any sound ``[l, u]``; with ``δ ∈ [0, 1]`` its projection onto ``(z, y)`` is the triangle
relaxation (Ehlers 2017). Stable ReLUs are the identity (``l ≥ 0``) or zero (``u ≤ 0``).

Input sets: ℓ∞ ball ∩ domain is a box (exact). A union of segments ``x + β_j d_j`` uses one binary ``s_j`` per
segment: ``β_j ∈ [β⁻_j s_j, β⁺_j s_j]``, ``Σ s_j = 1`` (exact; ``β^±`` already cut to the domain). An ℓ2 ball is
encoded by its box hull; callers add tangent cuts ``g·(x' − x) ≤ ε‖g‖`` (outer polyhedra, so still sound).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp
import torch

from certlab.errors import InputError

PAD = 1e-6  # widen float32 bounds by PAD·(1 + |b|) so float64 solving never cuts off a true value


@dataclass
class Encoding:
    """Variables (bounds, integrality), linear rows ``lo ≤ A v ≤ hi`` and the affine expression of every node."""

    n: int = 0
    lb: list = field(default_factory=list)
    ub: list = field(default_factory=list)
    integ: list = field(default_factory=list)
    rows: list = field(default_factory=list)  # (sparse row block [r, n_at_creation], lo [r], hi [r])
    expr: dict = field(default_factory=dict)  # node -> (M sparse [size, n_at_creation], c [size])
    input_map: tuple | None = None  # (M, c): the input point x' as an expression of v
    n_binary: int = 0

    def new_vars(self, lb, ub, integer=False) -> np.ndarray:
        lb, ub = np.asarray(lb, float).ravel(), np.asarray(ub, float).ravel()
        idx = np.arange(self.n, self.n + lb.size)
        self.n += lb.size
        self.lb.extend(lb.tolist())
        self.ub.extend(ub.tolist())
        self.integ.extend([1 if integer else 0] * lb.size)
        if integer:
            self.n_binary += lb.size
        return idx

    def add_rows(self, A, lo, hi):
        self.rows.append((sp.csr_matrix(A), np.asarray(lo, float).ravel(), np.asarray(hi, float).ravel()))

    def matrix(self):
        """(A csr [m, n], lo [m], hi [m]) with every block padded to the final number of variables."""
        if not self.rows:
            return sp.csr_matrix((0, self.n)), np.zeros(0), np.zeros(0)
        A = sp.vstack([pad(M, self.n) for M, _, _ in self.rows], format="csr")
        lo = np.concatenate([lo for _, lo, _ in self.rows])
        hi = np.concatenate([hi for _, _, hi in self.rows])
        return A, lo, hi

    def linear(self, node: int, coef: np.ndarray):
        """(objective vector [n], constant) of coef·z_node."""
        M, c = self.expr[node]
        obj = np.asarray(pad(M, self.n).T @ coef).ravel()
        return obj, float(coef @ c)

    def point(self, v: np.ndarray) -> np.ndarray:
        M, c = self.input_map
        return np.asarray(pad(M, self.n) @ v).ravel() + c


def pad(M, n):
    M = sp.csr_matrix(M)
    if M.shape[1] == n:
        return M
    return sp.csr_matrix((M.data, M.indices, M.indptr), shape=(M.shape[0], n))


def widen(l, u):
    l = np.asarray(l, float)
    u = np.asarray(u, float)
    return l - PAD * (1 + np.abs(l)), u + PAD * (1 + np.abs(u))


def _np(t):
    return t.detach().double().cpu().numpy()


def dense_ops(g) -> dict:
    """{affine node: (W csr float64, b float64)} — reusable across encodings of the same graph."""
    out = {}
    for i, node in enumerate(g.nodes):
        if node.kind == "affine":
            W, bias = node.op.dense()
            out[i] = (sp.csr_matrix(_np(W)), _np(bias))
    return out


def encode(g, x, threat, pre, b: int = 0, integral: bool = True, splits=None, dense=None) -> Encoding:
    """Encoding of sample ``b`` of ``x`` over ``threat``; ``pre[i] = (l, u)`` ([B, *shape]) for every ReLU node i.

    ``splits[i]`` (optional, int tensor [B, n_i]): +1 forces z ≥ 0, −1 forces z ≤ 0 on neuron k of ReLU i (a
    branch-and-bound subdomain); the rows are added explicitly since clamped bounds alone would not enforce them."""
    enc = Encoding()
    M0, c0 = threat.milp_input(enc, x, b, integral)
    enc.input_map = (M0, c0)
    enc.expr[0] = (M0, c0)
    for i, node in enumerate(g.nodes):
        if i == 0:
            continue
        if node.kind == "affine":
            if dense is not None and i in dense:
                W, bias = dense[i]
            else:
                W, bias = node.op.dense()
                W, bias = sp.csr_matrix(_np(W)), _np(bias)
            M, c = enc.expr[node.inputs[0]]
            enc.expr[i] = (sp.csr_matrix(W @ M), W @ c + bias)
        elif node.kind == "add":
            (M1, c1), (M2, c2) = enc.expr[node.inputs[0]], enc.expr[node.inputs[1]]
            n = max(M1.shape[1], M2.shape[1])
            enc.expr[i] = (pad(M1, n) + pad(M2, n), c1 + c2)
        else:
            zexpr = enc.expr[node.inputs[0]]
            if splits is not None and i in splits:
                _split_rows(enc, zexpr, splits[i][b].reshape(-1).cpu().numpy())
            enc.expr[i] = _relu(enc, zexpr, pre[i], b, integral)
    return enc


def _relu(enc: Encoding, zexpr, bounds, b, integral):
    M, c = zexpr
    l, u = widen(_np(bounds[0][b]).ravel(), _np(bounds[1][b]).ravel())
    m = c.size
    active = l >= 0
    cross = (l < 0) & (u > 0)
    k = int(cross.sum())
    M = sp.csr_matrix(M)
    out_M = sp.diags(active.astype(float)) @ M
    out_c = np.where(active, c, 0.0)
    if k == 0:
        return sp.csr_matrix(out_M), out_c
    ci = np.nonzero(cross)[0]
    lc, uc = l[ci], u[ci]
    y = enc.new_vars(np.zeros(k), uc)
    d = enc.new_vars(np.zeros(k), np.ones(k), integer=integral)
    n = enc.n
    Mz = M[ci].tocoo()
    cz = c[ci]
    ar = np.arange(k)
    # rows 0..k-1: y − z ≥ c ;  k..2k-1: y − z − l δ ≤ c − l ;  2k..3k-1: y − u δ ≤ 0
    rows = np.concatenate([Mz.row, Mz.row + k, ar, ar + k, ar + 2 * k, ar + k, ar + 2 * k])
    cols = np.concatenate([Mz.col, Mz.col, y, y, y, d, d])
    vals = np.concatenate([-Mz.data, -Mz.data, np.ones(3 * k), -lc, -uc])
    A = sp.csr_matrix((vals, (rows, cols)), shape=(3 * k, n))
    enc.add_rows(A, np.concatenate([cz, np.full(2 * k, -np.inf)]),
                 np.concatenate([np.full(k, np.inf), cz - lc, np.zeros(k)]))
    sel = sp.csr_matrix((np.ones(k), (ci, y)), shape=(m, n))
    return sp.csr_matrix(pad(out_M, n) + sel), out_c


def _split_rows(enc: Encoding, zexpr, sv):
    """z_k ≥ 0 where sv = +1, z_k ≤ 0 where sv = −1."""
    M, c = zexpr
    for sign in (1, -1):
        idx = np.nonzero(sv == sign)[0]
        if idx.size == 0:
            continue
        rows = pad(sp.csr_matrix(M)[idx], enc.n)
        if sign == 1:
            enc.add_rows(rows, -c[idx], np.full(idx.size, np.inf))
        else:
            enc.add_rows(rows, np.full(idx.size, -np.inf), -c[idx])
