"""Back-substitution: the engine shared by Fast-Lin, CROWN, CROWN-IBP and α-CROWN.

To lower-bound Λ·z_k (Λ ∈ R^{S×n_k}) over the threat set, walk the graph backwards:

- affine z = W z' + b:  Λ ↦ Λ W, constant += Λ b;
- ReLU z = relu(ẑ) with pre-activation bounds [l, u] and linear bounds a ẑ ≤ relu(ẑ) ≤ s ẑ + t:
  Λ ↦ Λ⁺ a + Λ⁻ s, constant += Λ⁻ t  (Λ⁺ = max(Λ, 0), Λ⁻ = min(Λ, 0));
- residual sum z = z₁ + z₂: Λ flows to both branches;

and at the input concretise min_{x'∈set} Λ x' with the set's support function. The upper line is the chord
s = u/(u−l), t = −l·s for crossing neurons; the lower slope a is what tells the relaxations apart
(Fast-Lin: a = s; CROWN: a = 1[u > −l]; α-CROWN: a = α ∈ [0, 1] optimised). Upper bounds are lower bounds of −Λ.

Intermediate bounds are computed node by node with Λ = rows of the identity, only for the neurons that are not
already known to be stable (from IBP, which the result is intersected with — both are sound). The IBP reference of
a layer starts from the tightened bounds of the layers before it.
"""

from __future__ import annotations

import math

import torch

from certlab.bounds import patches, phased
from certlab.bounds.relu import relu_lines
from certlab.tensorops import bdot


PHASED = True  # dense rows through strided convolutions in the polyphase layout on CPU (False: transposed convolutions)


def lower_bound(g, start, A, pre, x, threat, lower="adaptive", alpha=None, const=None, upper=False):
    """Lower bound of A·z_start over the set. A: [B, S, *shape(start)]. Returns [B, S].

    pre[i] = (l, u) for every ReLU node i before ``start``; ``alpha[i]`` ([B, S, *shape] in [0, 1]) replaces the lower
    slope of crossing neurons of ReLU i when given.

    ``upper=True`` (parallel lines only, no alpha) returns (lower, upper) from one pass: with a = s every ReLU maps
    Λ ↦ Λs whatever the signs, so the lower and the upper bound share Λ and differ only in the constants
    (Λ⁻t for the lower, Λ⁺t for the upper) and in the side of the support function taken at the input.
    """
    if upper and (lower != "parallel" or alpha is not None):
        raise ValueError("one-pass lower and upper bounds need parallel ReLU lines and no alpha")
    B, S = A.shape[:2]
    total = A.new_zeros(B, S) if const is None else const
    total_hi = total
    pending = {start: A}
    nodes = g.nodes
    # polyphase rows through strided convolutions (phased.py): on CPU, where it was measured faster; α is per neuron
    # in the plain layout, so α-CROWN's passes stay plain
    kernels = {} if alpha is None and PHASED and x.device.type == "cpu" else None
    for i in range(start, 0, -1):
        Ai = pending.pop(i, None)
        if Ai is None:
            continue
        node = nodes[i]
        if isinstance(Ai, phased.Phased) and node.kind != "relu" and not (
                node.kind == "affine" and phased.eligible(node.op, Ai) and _phase_target(g, node)):
            Ai = Ai.plain()
        if node.kind == "affine":
            if isinstance(Ai, phased.Phased) or (kernels is not None and phased.eligible(node.op, Ai)
                                                  and nodes[node.inputs[0]].kind == "relu"):
                bias = phased.bias(node.op, Ai) if isinstance(Ai, phased.Phased) else node.op.bias_back(Ai)
                back = phased.back(node.op, Ai, kernels)
            else:
                bias, back = node.op.bias_back(Ai), None
            total = total + bias
            if upper:
                total_hi = total_hi + bias
            _acc(pending, node.inputs[0], back if back is not None else node.op.back(Ai))
        elif node.kind == "relu":
            l, u = pre[i]
            a, s, t, *crossing = relu_lines(l, u, lower, crossing=alpha is not None and i in alpha)
            a, s, t = a.unsqueeze(1), s.unsqueeze(1), t.unsqueeze(1)
            ph = Ai if isinstance(Ai, phased.Phased) else None
            if ph is not None:  # the maps in the rows' layout (zero where the layout has no neuron)
                Ai, a, s, t = ph.Z, ph.map(a), ph.map(s), ph.map(t)
            # constants as batched dot products with t (no [B, S, n] temporary); elementwise work on [B, S, n] views
            # (broadcasting over 5-D shapes runs several times slower in torch's CPU kernels than over 3-D)
            Bn, Sn = Ai.shape[:2]
            shape = Ai.shape
            t_b = t.reshape(t.shape[0], -1)  # [B or 1, n]: bdot broadcasts a map shared by the batch
            Ai, a, s = Ai.reshape(Bn, Sn, -1), a.reshape(a.shape[0], 1, -1), s.reshape(s.shape[0], 1, -1)
            # Λ⁻ as neg·h: clamp without gradients; with them 2Λ⁻ = Λ − |Λ| (h = ½), whose backward multiplies by
            # sign(Λ) where clamp's selects with a mask (a comparison and a where, several times slower on CPU)
            neg, h = (Ai - Ai.abs(), 0.5) if Ai.requires_grad and torch.is_grad_enabled() else (Ai.clamp(max=0), 1.0)
            neg_t = bdot(neg, t_b) * h
            if upper:  # a = s: Λ ↦ Λs; lower constant Λ⁻t, upper constant Λ⁺t = Λt − Λ⁻t
                all_t = bdot(Ai, t_b)
                total, total_hi = total + neg_t, total_hi + (all_t - neg_t)
                _acc(pending, node.inputs[0], _wrap((Ai * s).reshape(shape), ph))
                continue
            if alpha is not None and i in alpha:
                a = torch.where(crossing[0].unsqueeze(1), alpha[i], a.reshape(a.shape[0], 1, *shape[2:]))
                a = a.reshape(*a.shape[:2], -1)
            # Λ⁺a + Λ⁻s = Λa + Λ⁻(s − a); the constant Λ⁻t. Three passes over Λ-sized tensors and two allocations
            # (Λ⁻, and the result, updated in place) instead of five passes and four allocations
            total = total + neg_t
            _acc(pending, node.inputs[0], _wrap((Ai * a).addcmul_(neg, s - a, value=h).reshape(shape), ph))
        else:  # add
            _acc(pending, node.inputs[0], Ai)
            _acc(pending, node.inputs[1], Ai)
    A0 = pending.pop(0)
    low, up = phased.concretize(threat, x, A0) if isinstance(A0, phased.Phased) else threat.concretize(A0, x)
    return (low + total, up + total_hi) if upper else low + total


def _acc(pending, j, A):
    if j not in pending:
        pending[j] = A
        return
    old = pending[j]
    plain = (lambda v: v.plain() if isinstance(v, phased.Phased) else v)
    pending[j] = plain(old) + plain(A)


def _wrap(Z, ph):
    return Z if ph is None else phased.Phased(Z, ph.S, ph.base, ph.shape)


def _phase_target(g, node):
    """Phased rows may go on through this convolution when what receives them keeps or ends the layout: a ReLU
    (whose maps zero the entries outside the layer) or the input."""
    j = node.inputs[0]
    return j == 0 or g.nodes[j].kind == "relu"


def both_bounds(g, start, A, pre, x, threat, lower="adaptive", alpha=None, const=None, lower_only=False):
    """(lower, upper) of A·z_start (+const); upper is None when lower_only."""
    if lower_only:
        return lower_bound(g, start, A, pre, x, threat, lower, alpha, const), None
    if lower == "parallel" and alpha is None:  # one pass gives both sides (see lower_bound)
        return lower_bound(g, start, A, pre, x, threat, lower, None, const, upper=True)
    S = A.shape[1]
    c2 = None if const is None else torch.cat([const, -const], 1)
    low = lower_bound(g, start, torch.cat([A, -A], 1), pre, x, threat, lower, alpha, c2)
    return low[:, :S], -low[:, S:]


def every_neuron(g, p, pre, x, threat, lower="adaptive"):
    """(lower, upper) [B, *shape] of every neuron of node p by back-substitution: in patches mode when p ends a
    convolution chain, else dense rows e_k, as many at a time as keep the widest node's [B, rows, n_i] (and a
    convolution's unfolded copy of it, up to 32 times larger) within the patch budget."""
    path = patches.chain(g, p)
    if path is not None:
        return patches.bounds_all(g, p, path, pre, x, threat, lower)
    B, shape = x.shape[0], g.nodes[p].shape
    n = math.prod(shape)
    widest = max(math.prod(g.nodes[i].shape) for i in range(p + 1))
    eye = torch.eye(n, device=x.device, dtype=x.dtype)
    k = patches._per_chunk(n, 32 * B * widest, x)
    lo, hi = patches._in_chunks(n, k, lambda j: both_bounds(
        g, p, eye[j].expand(B, -1, -1).reshape(B, -1, *shape), pre, x, threat, lower))
    return lo.reshape(B, *shape), hi.reshape(B, *shape)


def intermediate(g, x, threat, lower="adaptive", reference=None, intersect=True):
    """Pre-activation bounds of every ReLU by back-substitution, intersected with IBP's.

    Layer by layer: the interval pass reaches a ReLU with IBP bounds computed from the (tighter) bounds of the ReLUs
    before it, back-substitution bounds the neurons those call unstable, and the pass goes on from the intersection.
    Neurons it calls stable keep their interval bounds: a stable ReLU is relaxed exactly whatever its bounds, so the
    result is never looser than back-substituting every neuron, and deeper layers see fewer unstable ones.

    ``intersect=False``: every neuron of a layer that is not an affine map of the input is bounded by
    back-substitution alone (the interval bounds are not used), so each layer's bounds come from the relaxation and
    the layers before it only (DeepZ's, :mod:`certlab.bounds.deepz`).

    Returns {ReLU node: (l, u)}; a dict passed as ``reference`` receives the interval bounds each layer started from."""
    from certlab.bounds.ibp import interval_pass

    B = x.shape[0]

    def tighten(r, l, u, pre, exact):
        p = g.nodes[r].inputs[0]
        if reference is not None:
            reference[r] = (l, u)
        if p in exact:
            return l, u
        if not intersect:
            return every_neuron(g, p, pre, x, threat, lower)
        shape = l.shape[1:]
        lf, uf = l.reshape(B, -1), u.reshape(B, -1)
        n = lf.shape[1]
        unstable = (lf < 0) & (uf > 0)
        cnt = unstable.sum(1)
        S = int(cnt.max().item()) if B else 0
        if S == 0:
            return l, u
        path = patches.chain(g, p)
        if path is not None and 2 * S >= n:  # most neurons need bounds: all of them, patches grouped by position
            lo, hi = patches.bounds_all(g, p, path, pre, x, threat, lower)
            return torch.maximum(l, lo), torch.minimum(u, hi)
        idx = torch.argsort(unstable.to(torch.int8), dim=1, descending=True, stable=True)[:, :S]
        valid = torch.arange(S, device=x.device).unsqueeze(0) < cnt.unsqueeze(1)
        if path is not None:  # convolution chain to the input: receptive-field patches instead of dense rows
            C, H, W = shape
            chan, rows, cols = idx // (H * W), (idx // W) % H, idx % W
            coef = valid.to(x.dtype)
            if lower == "parallel":  # one pass gives both sides
                lo, hi = patches.lower_rows(g, p, path, chan, rows, cols, coef, pre, x, threat, lower, upper=True)
            else:
                cat = (lambda t: torch.cat([t, t], 1))
                low = patches.lower_rows(g, p, path, cat(chan), cat(rows), cat(cols), torch.cat([coef, -coef], 1),
                                         pre, x, threat, lower)
                lo, hi = low[:, :S], -low[:, S:]
        else:
            A = torch.zeros(B, S, n, device=x.device, dtype=x.dtype)
            A.scatter_(2, idx.unsqueeze(-1), valid.unsqueeze(-1).to(x.dtype))
            lo, hi = both_bounds(g, p, A.reshape(B, S, *shape), pre, x, threat, lower)
        slot = torch.where(valid, idx, torch.full_like(idx, n))
        ninf = torch.full((B, n + 1), float("-inf"), device=x.device, dtype=x.dtype)
        new_l = ninf.scatter(1, slot, lo)[:, :n]
        new_u = (-ninf).scatter(1, slot, hi)[:, :n]
        return torch.maximum(lf, new_l).reshape(l.shape), torch.minimum(uf, new_u).reshape(u.shape)

    return interval_pass(g, x, threat, tighten=tighten)[0]


def output(g, x, threat, pre, lower="adaptive", alpha=None, lower_only=False):
    """Bounds of the output node of g (whose last op may be a folded specification)."""
    from certlab.bounds.ops import SpecLinearOp

    last = g.nodes[-1]
    B = x.shape[0]
    if last.kind == "affine" and isinstance(last.op, SpecLinearOp):
        # start one node earlier with Λ = C·W (the spec folded into the last layer): no S×S identity
        return both_bounds(g, last.inputs[0], last.op.W, pre, x, threat, lower, alpha, last.op.b, lower_only)
    K = last.shape[0]
    eye = torch.eye(K, device=x.device, dtype=x.dtype).unsqueeze(0).expand(B, -1, -1)
    return both_bounds(g, len(g.nodes) - 1, eye, pre, x, threat, lower, alpha, None, lower_only)
