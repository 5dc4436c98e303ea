"""Polyphase layout for dense back-substitution through strided convolutions.

Back-substituting rows Λ through a convolution with stride s is a transposed convolution, which is slow on CPU
(oneDNN: ~3× a forward convolution of the same size at the shapes of an MNIST CNN). Written per output phase it is
an ordinary convolution: with Λ over the convolution's output at positions h and the result over its input at
Y = s·h − p + kh, split Y = S·J + g − base with S the stride product so far and g ∈ [0, S) the phase, and the
result is a stride-1 convolution of the phase grid J whose output channels are (input channel, phase) pairs. Rows
stay in that layout through the ReLU steps below (the ReLU maps are brought into it once per call) and the next
strided convolution (strides multiply), and are turned back into the plain layout where anything else needs them.

A ``Phased`` row tensor Z [B, R, C·S·S, Hg, Wg] stands for the plain rows A [B, R, C, H, W] with
A[b, r, c, S·I + gy − base, S·J + gx − base] = Z[b, r, c·S² + gy·S + gx, I, J]; entries that fall outside
[0, H) × [0, W) are not part of A (they are cropped by ``plain``, and zeroed by the ReLU maps, which are zero there).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from certlab.bounds.ops import ConvOp


class Phased:
    __slots__ = ("Z", "S", "base", "shape")

    def __init__(self, Z, S, base, shape):
        self.Z, self.S, self.base, self.shape = Z, S, base, tuple(shape)

    def plain(self):
        """The rows in the plain layout [B, R, C, H, W]."""
        B, R = self.Z.shape[:2]
        C, H, W = self.shape
        P = F.pixel_shuffle(self.Z.reshape(B * R, *self.Z.shape[2:]), self.S) if self.S > 1 else self.Z.reshape(
            B * R, *self.Z.shape[2:])
        b = self.base
        need_h, need_w = b + H - P.shape[-2], b + W - P.shape[-1]
        if need_h > 0 or need_w > 0:  # positions no row reaches (a transposed convolution's output padding): zero
            P = F.pad(P, (0, max(need_w, 0), 0, max(need_h, 0)))
        return P[:, :, b:b + H, b:b + W].reshape(B, R, C, H, W)

    def map(self, m):
        """A per-sample map m [Bm, 1, C, H, W] (or [Bm, C, H, W]) in this layout, [Bm, 1, C·S², Hg, Wg], zero at the
        places that are not positions of the layer."""
        if m.dim() == 5:
            m = m.squeeze(1)
        Hg, Wg = self.Z.shape[-2:]
        H, W = m.shape[-2:]
        b = self.base
        m = F.pad(m, (b, self.S * Wg - W - b, b, self.S * Hg - H - b))
        if self.S > 1:
            m = F.pixel_unshuffle(m, self.S)
        return m.unsqueeze(1)


MAX_FACTOR = 4  # phase grids of S² channels per input channel: beyond 4 the kernels' zeros cost more than they save


def concretize(threat, x, A):
    """(min, max) of A·x' over the set for Phased rows A over the input: a box set's maps are brought into the
    rows' layout (zero where it has no pixel, so entries there drop out), other sets get the plain rows."""
    if not threat.is_box:
        return threat.concretize(A.plain(), x)
    lo, hi = threat.interval_hull(x)
    return threat.box_concretize(A.Z, A.map(lo), A.map(hi))


def eligible(op, A=None) -> bool:
    """Whether rows A (plain or Phased) go back through ``op`` in this layout: a convolution with one group, equal
    strides > 1, equal paddings and no dilation, and a stride product of at most ``MAX_FACTOR``."""
    if not (isinstance(op, ConvOp) and op.groups == 1 and op.stride[0] == op.stride[1] > 1
            and op.padding[0] == op.padding[1] and tuple(op.dilation) == (1, 1)):
        return False
    return (A.S if isinstance(A, Phased) else 1) * op.stride[0] <= MAX_FACTOR


def _kernel(W, s_c, p, s_a, o_a):
    """(K, Q, S, base): the stride-1 kernel [cin·S², cout·s_a², Q, Q] mapping rows in layout (s_a, o_a) over the
    convolution's output to rows in layout (S = s_a·s_c, base) over its input, for weight W [cout, cin, k, k']."""
    cout, cin, kh, kw = W.shape
    S = s_a * s_c
    base = s_c * o_a + p

    def taps(k):  # (phase in, tap, shift q, phase out) with s_c(f − o_a) − p + tap + base = S·q + g
        return [(f, t, *divmod(s_c * (f - o_a) - p + t + base, S)) for f in range(s_a) for t in range(k)]

    ty, tx = taps(kh), taps(kw)
    Q = max(max(e[2] for e in ty), max(e[2] for e in tx)) + 1
    K = W.new_zeros(cin, S, S, cout, s_a, s_a, Q, Q)
    Wt = W.permute(1, 0, 2, 3)  # [cin, cout, kh, kw]
    for fy, ky, qy, gy in ty:
        for fx, kx, qx, gx in tx:
            K[:, gy, gx, :, fy, fx, Q - 1 - qy, Q - 1 - qx] = Wt[:, :, ky, kx]
    return K.reshape(cin * S * S, cout * s_a * s_a, Q, Q), Q, S, base


def back(op, A, cache):
    """Rows A (plain [B, R, *op.out_shape] or Phased) back through convolution ``op``: Phased rows over its input.
    ``cache`` (a dict kept for one back-substitution) holds the kernels built so far."""
    if isinstance(A, Phased):
        Z, s_a, o_a = A.Z, A.S, A.base
    else:
        Z, s_a, o_a = A, 1, 0
    key = (id(op), s_a, o_a)
    if key not in cache:
        cache[key] = _kernel(op.W, op.stride[0], op.padding[0], s_a, o_a)
    K, Q, S, base = cache[key]
    B, R = Z.shape[:2]
    out = F.conv2d(Z.reshape(B * R, *Z.shape[2:]), K, None, 1, Q - 1)
    return Phased(out.reshape(B, R, *out.shape[1:]), S, base, op.in_shape)


def bias(op, A):
    """Σ A·b over the rows' channels and positions for Phased rows whose entries outside the layer are zero."""
    B, R = A.Z.shape[:2]
    if op.b is None:
        return A.Z.new_zeros(B, R)
    return A.Z.reshape(B, R, op.out_shape[0], -1).sum(-1).matmul(op.b)
