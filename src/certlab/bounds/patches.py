"""Patches mode: back-substitution for the neurons of a convolutional layer without dense matrices.

Back-substituting a neuron of a convolution to the input only ever touches its receptive field, so instead of a row
of length n_in we keep a *patch* P of shape [C, ph, pw] over the current layer, with the geometry (stride st,
padding pad) that places the patch of output position (h, w) at rows h·st − pad … and columns w·st − pad ….

Going back through a convolution (kernel k, stride s, padding p, dilation d) is a transposed convolution of the patch
with the kernel: ph' = (ph − 1)s + d(k − 1) + 1, st' = st·s, pad' = pad·s + p. Per-position maps (ReLU slopes,
the input box, ℓ2 centre, segment directions) are read at each patch's location by unfolding the map with the same
geometry. Entries of a patch that fall on zero padding are masked to 0, so biases and concretisation only see real
neurons. This is used for the intermediate bounds of chains conv / per-channel affine / ReLU that reach the input;
everything else (fully connected layers, residual sums) uses dense back-substitution.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from certlab.bounds.ops import ChannelAffineOp, ConvOp


def chain(g, start):
    """Node indices from ``start`` back to the input when the path allows patches mode, else None."""
    node = g.nodes[start]
    if node.kind != "affine" or not isinstance(node.op, ConvOp):
        return None
    path, i = [], start
    while i != 0:
        node = g.nodes[i]
        if node.kind == "add" or len(node.shape) != 3:
            return None
        if node.kind == "affine" and not isinstance(node.op, (ConvOp, ChannelAffineOp)):
            return None
        path.append(i)
        i = node.inputs[0]
    return path if len(g.nodes[0].shape) == 3 else None


class _Geometry:
    """Where each patch sits on a layer of spatial size (H, W): unfolds per-position maps at the patches' places."""

    def __init__(self, hw, patch, stride, pad, rows, cols):
        self.H, self.W = hw
        self.ph, self.pw = patch
        self.st, self.pad = stride, pad
        # pad generously on the bottom/right so every patch fits; position (h, w) starts at (h·st, w·st) in padded
        # coordinates, i.e. (h·st − pad, w·st − pad) in the layer
        self.padding = (pad[1], pad[1] + self.pw, pad[0], pad[0] + self.ph)
        Hp = self.H + pad[0] * 2 + self.ph
        Wp = self.W + pad[1] * 2 + self.pw
        self.WL = (Wp - self.pw) // stride[1] + 1
        self.idx = rows * self.WL + cols  # [B, S] flat positions in the unfold grid
        self._flat = {}  # L -> the positions as rows of the batch-flattened grid [B·L, ·]

    def gather(self, m):
        """m: [Bm, C, H, W] (Bm = 1 or B) → [B, S, C, ph, pw] values at each patch's entries.

        The unfolded map is small ([Bm, L, C·ph·pw] for L patch positions); the result is read from it by whole
        rows (index_select), not element by element, and is contiguous."""
        Bm, C = m.shape[:2]
        u = F.unfold(F.pad(m, self.padding), (self.ph, self.pw), stride=self.st)  # [Bm, C·ph·pw, L]
        L = u.shape[2]
        u = u.transpose(1, 2).reshape(Bm * L, -1)  # [Bm·L, C·ph·pw]
        B, S = self.idx.shape
        if Bm == 1:
            rows = self.idx.reshape(-1)
        else:
            rows = self._flat.get(L)
            if rows is None:
                off = torch.arange(B, device=self.idx.device).view(B, 1) * L
                rows = self._flat[L] = (self.idx + off).reshape(-1)
        return u.index_select(0, rows).view(B, S, C, self.ph, self.pw)


def lower_rows(g, start, path, chan, rows, cols, coef, pre, x, threat, lower="adaptive", upper=False):
    """Lower bounds of coef·z for the neurons z = (chan, rows, cols) of conv node ``start``, by back-substitution in
    patches mode. ``chan``, ``rows``, ``cols``: long [B, S]; ``coef``: [B, S] (±1, or 0 for padding rows);
    ``pre`` as in :func:`certlab.bounds.backsub.lower_bound`. Returns [B, S]; with ``upper=True`` (parallel lines
    only) (lower, upper) from one pass, as :func:`certlab.bounds.backsub.lower_bound` does."""
    from certlab.bounds.backsub import relu_lines

    if upper and lower != "parallel":
        raise ValueError("one-pass lower and upper bounds need parallel ReLU lines")
    B, S = chan.shape
    C0 = g.nodes[start].shape[0]
    P = torch.zeros(B, S, C0, 1, 1, device=x.device, dtype=x.dtype)
    P.scatter_(2, chan.view(B, S, 1, 1, 1), coef.view(B, S, 1, 1, 1).to(x.dtype))
    st, pad = (1, 1), (0, 0)
    const = x.new_zeros(B, S)
    const_hi = const
    for i in path:
        node = g.nodes[i]
        Hc, Wc = node.shape[1:]
        if node.kind == "relu":
            geo = _Geometry((Hc, Wc), P.shape[3:], st, pad, rows, cols)
            l, u = pre[i]
            a, s, t, _ = relu_lines(l, u, lower)
            if upper:  # a = s: P ↦ P·s; constants P⁻t (lower) and P⁺t = Pt − P⁻t (upper)
                tg = geo.gather(t)
                neg_t = (P.clamp(max=0) * tg).flatten(2).sum(-1)
                const, const_hi = const + neg_t, const_hi + (P * tg).flatten(2).sum(-1) - neg_t
                P = P * geo.gather(s)
                continue
            # P⁺a + P⁻s = Pa + P⁻(s − a), with s − a formed on the small per-position map before the gather
            neg = P.clamp(max=0)
            const = const + (neg * geo.gather(t)).flatten(2).sum(-1)
            P = (P * geo.gather(a)).addcmul_(neg, geo.gather(s - a))
            continue
        op = node.op
        if isinstance(op, ChannelAffineOp):
            scale = op.s.reshape(-1, 1, 1) if op.s.numel() > 1 else op.s.reshape(1, 1, 1)
            shift = op.t.reshape(-1) if op.t.numel() > 1 else op.t.reshape(1).expand(P.shape[2])
            bias = torch.einsum("bschw,c->bs", P, shift)
            const, const_hi = const + bias, const_hi + bias
            P = P * scale
            continue
        # convolution: bias of the current layer, then the transposed convolution of every patch
        if op.b is not None:
            bias = torch.einsum("bschw,c->bs", P, op.b)
            const, const_hi = const + bias, const_hi + bias
        Pn = _transpose_conv(P.reshape(B * S, *P.shape[2:]), op, first=(i == start))
        st = (st[0] * op.stride[0], st[1] * op.stride[1])
        pad = (pad[0] * op.stride[0] + op.padding[0], pad[1] * op.stride[1] + op.padding[1])
        P = Pn.reshape(B, S, *Pn.shape[1:])
        Hi, Wi = op.in_shape[1:]
        geo = _Geometry((Hi, Wi), P.shape[3:], st, pad, rows, cols)
        mask = geo.gather(torch.ones(1, 1, Hi, Wi, device=x.device, dtype=x.dtype))  # 0 on padding
        P = P * mask
    geo = _Geometry(tuple(x.shape[2:]), P.shape[3:], st, pad, rows, cols)
    if upper:
        lo, hi = _concretize(threat, x, P, geo)
        return const + lo, const_hi + hi
    return const + _concretize(threat, x, P, geo, lower_only=True)[0]


_MATMUL_LIMIT = 1 << 22  # entries of an explicit patch-to-patch operator worth building


def _transpose_conv(P, op, first=False):
    """The transposed convolution of every patch in P [N, C, ph, pw] with op's kernel: [N, C', ph', pw'].

    The first step starts from one-hot patches, so it is an indexing of the (dilated) kernel; later steps use an
    explicit operator matrix when it is small (one matmul beats a transposed convolution over tiny images on CPU)."""
    N, C, ph, pw = P.shape
    W = op.W
    if first and ph == 1 and pw == 1 and op.groups == 1:
        if op.dilation != (1, 1):
            W = _dilate(op.W, op.dilation)
        return torch.einsum("nc,cihw->nihw", P.reshape(N, C), W)
    kh, kw = W.shape[2:]
    oh = (ph - 1) * op.stride[0] + op.dilation[0] * (kh - 1) + 1
    ow = (pw - 1) * op.stride[1] + op.dilation[1] * (kw - 1) + 1
    cin = W.shape[1] * op.groups
    if C * ph * pw * cin * oh * ow <= _MATMUL_LIMIT and N > C * ph * pw:
        eye = torch.eye(C * ph * pw, device=P.device, dtype=P.dtype).reshape(-1, C, ph, pw)
        M = F.conv_transpose2d(eye, W, None, op.stride, 0, 0, op.groups, op.dilation).reshape(C * ph * pw, -1)
        return (P.reshape(N, -1) @ M).reshape(N, cin, oh, ow)
    return F.conv_transpose2d(P, W, None, op.stride, 0, 0, op.groups, op.dilation)


def _dilate(W, dilation):
    """The kernel with dilation written out as zeros between taps."""
    co, ci, kh, kw = W.shape
    out = W.new_zeros(co, ci, dilation[0] * (kh - 1) + 1, dilation[1] * (kw - 1) + 1)
    out[:, :, :: dilation[0], :: dilation[1]] = W
    return out


def _concretize(threat, x, P, geo, lower_only=False):
    """(min, max) of P·x' over the set for every patch (max is None when lower_only)."""
    B, S = P.shape[:2]
    Pf = P.reshape(B, S, -1)
    box = None
    if threat.norm == "linf" or (threat.norm == "l2" and threat.domain is not None):
        lo, hi = threat.interval_hull(x)
        c = (Pf * geo.gather((lo + hi) / 2).reshape(B, S, -1)).sum(-1)
        r = (Pf.abs() * geo.gather((hi - lo) / 2).reshape(B, S, -1)).sum(-1)
        box = (c - r, None if lower_only else c + r)
        if threat.norm == "linf":
            return box
    centre = (Pf * geo.gather(x).reshape(B, S, -1)).sum(-1)
    if threat.norm == "l2":
        rad = Pf.norm(dim=-1) * threat.eps_vector(x).view(B, 1)
        ball = (centre - rad, None if lower_only else centre + rad)
        if box is None:
            return ball
        return torch.max(ball[0], box[0]), None if lower_only else torch.min(ball[1], box[1])
    d = threat.directions_for(x)  # [B, k, n]
    k = d.shape[1]
    ad = torch.stack([(Pf * geo.gather(d[:, j].reshape(x.shape)).reshape(B, S, -1)).sum(-1) for j in range(k)], -1)
    blo, bhi = threat.beta_range(x)
    ends = (ad * blo.unsqueeze(1), ad * bhi.unsqueeze(1))
    low = centre + torch.min(*ends).min(-1).values
    return low, None if lower_only else centre + torch.max(*ends).max(-1).values
