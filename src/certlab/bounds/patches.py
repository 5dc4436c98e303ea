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
from certlab.bounds.relu import relu_lines


def chain(g, start):
    """Node indices from ``start`` (a convolution, or a per-channel map such as BatchNorm after one) back to the input
    when the path allows patches mode, else None."""
    node = g.nodes[start]
    if node.kind != "affine" or not isinstance(node.op, (ConvOp, ChannelAffineOp)):
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
    """Where each patch sits on a layer of spatial size (H, W): unfolds per-position maps at the patches' places.

    ``rows``, ``cols``: [B, S] positions of each sample's patches, or [1, Q] positions shared by the batch (grouped
    mode: every position holds R rows that share its maps, so maps are read once per position and broadcast)."""

    def __init__(self, hw, patch, stride, pad, rows, cols, grouped=False):
        self.grouped = grouped
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
        """m: [Bm, C, H, W] (Bm = 1 or B) → [B, S, C, ph, pw] values at each patch's entries ([Bm, Q, 1, C, ph, pw]
        in grouped mode).

        The unfolded map is small ([Bm, L, C·ph·pw] for L patch positions); the result is read from it by whole
        rows (index_select), not element by element, and is contiguous."""
        Bm, C = m.shape[:2]
        u = _unfold_rows(F.pad(m, self.padding), self.ph, self.pw, self.st)  # [Bm·L, C·ph·pw]
        L = u.shape[0] // Bm
        B, S = self.idx.shape
        if self.grouped:  # the same positions in every sample: [Bm, Q, 1, C, ph, pw]
            return u.view(Bm, L, -1)[:, self.idx[0]].view(Bm, S, 1, C, self.ph, self.pw)
        if Bm == 1:
            rows = self.idx.reshape(-1)
        else:
            rows = self._flat.get(L)
            if rows is None:
                off = torch.arange(B, device=self.idx.device).view(B, 1) * L
                rows = self._flat[L] = (self.idx + off).reshape(-1)
        return u.index_select(0, rows).view(B, S, C, self.ph, self.pw)


def _unfold_rows(m, ph, pw, st, view=None):
    """[Bm, C, H, W] → [Bm·L, C·ph·pw]: the ph×pw patches at stride st, one row per (sample, position) in row-major
    position order. Read as a strided view and copied once (one kernel; F.unfold loops over the batch, on CUDA one
    launch per sample, and is 1.4–9× slower on CPU at the small CNN's shapes). Its backward, a scatter-add, is
    slower on CPU than F.unfold's, so CPU tensors that need gradients keep F.unfold (``view`` forces a path)."""
    Bm = m.shape[0]
    if view is None:
        view = not (m.requires_grad and m.device.type == "cpu")
    if not view:
        u = F.unfold(m, (ph, pw), stride=st)  # [Bm, C·ph·pw, L]
        return u.transpose(1, 2).reshape(Bm * u.shape[2], -1)
    v = m.unfold(2, ph, st[0]).unfold(3, pw, st[1])  # [Bm, C, LH, LW, ph, pw]
    return v.permute(0, 2, 3, 1, 4, 5).reshape(Bm * v.shape[2] * v.shape[3], -1)


PATCH_BUDGET = 1 << 27  # entries of one patch tensor on the CPU; on a GPU, free memory / (32 × bytes per entry)


def _largest_patch(g, path) -> int:
    """Entries of one row's patch (C·ph·pw) at its largest along the path: the receptive field grows by each
    convolution's kernel and stride on the way to the input."""
    C, ph, pw = g.nodes[path[0]].shape[0], 1, 1
    big = C
    for i in path:
        op = g.nodes[i].op
        if isinstance(op, ConvOp):
            kh, kw = op.W.shape[2:]
            ph = (ph - 1) * op.stride[0] + op.dilation[0] * (kh - 1) + 1
            pw = (pw - 1) * op.stride[1] + op.dilation[1] * (kw - 1) + 1
            C = op.W.shape[1] * op.groups
            big = max(big, C * ph * pw)
    return big


def _per_chunk(n, per_item, x) -> int:
    """How many of n items (rows or positions, each ``per_item`` patch entries) one back-substitution takes at once:
    all of them unless their patches would outgrow the budget (CNN7: 2.8 GB per sample for its second layer's
    patches, several such temporaries live at once)."""
    if x.device.type == "cuda":
        free = torch.cuda.mem_get_info(x.device)[0]  # plus what torch's allocator holds but does not use
        free += torch.cuda.memory_reserved(x.device) - torch.cuda.memory_allocated(x.device)
        budget = free // (32 * x.element_size())
    else:
        budget = PATCH_BUDGET
    return max(1, min(n, budget // max(1, per_item)))


def _in_chunks(n, k, run):
    """run(slice) over consecutive slices of range(n), k at a time, concatenated along dim 1 (tuples elementwise)."""
    if k >= n:
        return run(slice(0, n))
    parts = [run(slice(a, min(a + k, n))) for a in range(0, n, k)]
    if isinstance(parts[0], tuple):
        return tuple(torch.cat(p, 1) for p in zip(*parts))
    return torch.cat(parts, 1)


def lower_rows(g, start, path, chan, rows, cols, coef, pre, x, threat, lower="adaptive", upper=False):
    """Lower bounds of coef·z for the neurons z = (chan, rows, cols) of conv node ``start``, by back-substitution in
    patches mode. ``chan``, ``rows``, ``cols``: long [B, S]; ``coef``: [B, S] (±1, or 0 for padding rows);
    ``pre`` as in :func:`certlab.bounds.backsub.lower_bound`. Returns [B, S]; with ``upper=True`` (parallel lines
    only) (lower, upper) from one pass, as :func:`certlab.bounds.backsub.lower_bound` does."""
    B, S = chan.shape
    C0 = g.nodes[start].shape[0]
    P = torch.zeros(B, S, C0, 1, 1, device=x.device, dtype=x.dtype)
    P.scatter_(2, chan.view(B, S, 1, 1, 1), coef.view(B, S, 1, 1, 1).to(x.dtype))
    k = _per_chunk(S, B * _largest_patch(g, path), x)
    return _in_chunks(S, k, lambda j: _back(g, start, path, P[:, j], rows[:, j], cols[:, j], pre, x, threat, lower,
                                            upper))


def bounds_all(g, start, path, pre, x, threat, lower="adaptive"):
    """(lower, upper) [B, C, H, W] of every neuron of conv node ``start``, in patches mode with the patches grouped
    by position: the rows ±e_c of all C channels at a position share the position's maps (ReLU lines, input box),
    which are read once per position and broadcast, and the starting patches (the kernel of ``start``) are shared
    by the whole batch until the first ReLU. The same sums as :func:`lower_rows` over every neuron, with far less
    memory traffic when most neurons need bounds."""
    C0, H, W = g.nodes[start].shape
    B = x.shape[0]
    pos = torch.arange(H * W, device=x.device).view(1, -1)
    one = torch.eye(C0, device=x.device, dtype=x.dtype)
    parallel = lower == "parallel"  # one pass gives both sides
    P = one.view(1, 1, C0, C0, 1, 1) if parallel else torch.cat([one, -one]).view(1, 1, 2 * C0, C0, 1, 1)
    k = _per_chunk(H * W, B * P.shape[2] * _largest_patch(g, path), x)  # positions at a time
    out = _in_chunks(H * W, k, lambda j: _back(g, start, path, P, pos[:, j] // W, pos[:, j] % W, pre, x, threat,
                                               lower, upper=parallel))
    lo, hi = out if parallel else (out[..., :C0], -out[..., C0:])
    as_map = (lambda v: v.expand(B, -1, -1).reshape(B, H, W, C0).permute(0, 3, 1, 2))  # [B, Q, C] -> [B, C, H, W]
    return as_map(lo), as_map(hi)


def _dot(P, m):
    """Σ over the last three dims of P·m: per row (row mode, P and m [B, S, …]) or, in grouped mode (m [Bm, Q, 1,
    …], one map per position), a batched matrix–vector product without a P-sized temporary."""
    if m.dim() == 6:  # grouped
        if P.shape[0] == 1 and m.shape[0] > 1:  # rows shared by the batch: no batch-sized copy of P
            return torch.einsum("qrk,bqk->bqr", P[0].flatten(-3), m[:, :, 0].flatten(-3))
        return torch.matmul(P.flatten(-3), m.flatten(-3).transpose(-1, -2)).squeeze(-1)
    return (P * m).flatten(-3).sum(-1)


def _bias(P, b):
    """Σ_c P[..., c, h, w]·b[c]: one matrix–vector product (no P-sized temporary)."""
    return torch.matmul(P.flatten(-3), b.repeat_interleave(P.shape[-2] * P.shape[-1]))


def _back(g, start, path, P, rows, cols, pre, x, threat, lower, upper=False):
    """Back-substitution of the patches P ([B, S, C0, 1, 1] per row, or [1, 1, R, C0, 1, 1] shared rows at the [1, Q]
    positions of grouped mode) from conv node ``start`` to the input. Returns [B, S] (or [B, Q, R]); with ``upper``
    (parallel lines only) (lower, upper)."""
    if upper and lower != "parallel":
        raise ValueError("one-pass lower and upper bounds need parallel ReLU lines")
    grouped = P.dim() == 6
    st, pad = (1, 1), (0, 0)
    const = x.new_zeros(P.shape[:-3])
    const_hi = const
    for i in path:
        node = g.nodes[i]
        Hc, Wc = node.shape[1:]
        if node.kind == "relu":
            geo = _Geometry((Hc, Wc), P.shape[-2:], st, pad, rows, cols, grouped)
            l, u = pre[i]
            a, s, t = relu_lines(l, u, lower)
            if upper:  # a = s: P ↦ P·s; constants P⁻t (lower) and P⁺t = Pt − P⁻t (upper)
                tg = geo.gather(t)
                neg_t = _dot(P.clamp(max=0), tg)
                const, const_hi = const + neg_t, const_hi + _dot(P, tg) - neg_t
                P = P * geo.gather(s)
                continue
            # P⁺a + P⁻s = Pa + P⁻(s − a), with s − a formed on the small per-position map before the gather
            neg = P.clamp(max=0)
            const = const + _dot(neg, geo.gather(t))
            P = (P * geo.gather(a)).addcmul_(neg, geo.gather(s - a))
            continue
        op = node.op
        if isinstance(op, ChannelAffineOp):
            scale = op.s.reshape(-1, 1, 1) if op.s.numel() > 1 else op.s.reshape(1, 1, 1)
            shift = op.t.reshape(-1) if op.t.numel() > 1 else op.t.reshape(1).expand(P.shape[-3])
            bias = _bias(P, shift)
            const, const_hi = const + bias, const_hi + bias
            P = P * scale
            continue
        # convolution: bias of the current layer, then the transposed convolution of every patch
        if op.b is not None:
            bias = _bias(P, op.b)
            const, const_hi = const + bias, const_hi + bias
        Pn = _transpose_conv(P.reshape(-1, *P.shape[-3:]), op)
        st = (st[0] * op.stride[0], st[1] * op.stride[1])
        pad = (pad[0] * op.stride[0] + op.padding[0], pad[1] * op.stride[1] + op.padding[1])
        P = Pn.reshape(*P.shape[:-3], *Pn.shape[1:])
        if i == path[-1] and threat.support_by_maps:
            continue  # at the input the set's maps are read zero-padded: no mask needed (a row norm, as ℓ2 takes,
            # needs the real entries only)
        Hi, Wi = op.in_shape[1:]
        geo = _Geometry((Hi, Wi), P.shape[-2:], st, pad, rows, cols, grouped)
        mask = geo.gather(torch.ones(1, 1, Hi, Wi, device=x.device, dtype=x.dtype))  # 0 on padding
        P = P * mask
    geo = _Geometry(tuple(x.shape[2:]), P.shape[-2:], st, pad, rows, cols, grouped)
    if upper:
        lo, hi = _concretize(threat, x, P, geo)
        return const + lo, const_hi + hi
    return const + _concretize(threat, x, P, geo, lower_only=True)[0]


_MATMUL_LIMIT = 1 << 22  # entries of an explicit patch-to-patch operator worth building


def _transpose_conv(P, op):
    """The transposed convolution of every patch in P [N, C, ph, pw] with op's kernel: [N, C', ph', pw'].

    The first convolution meets 1×1 patches (a row's channel vector), so it is a product with the (dilated) kernel
    whatever the stride; later steps use an explicit operator matrix when it is small (one matmul beats a transposed
    convolution over tiny images on CPU)."""
    N, C, ph, pw = P.shape
    W = op.W
    if ph == 1 and pw == 1 and op.groups == 1:
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


class _Rows:
    """Patch rows P as ``threat.concretize_rows`` reads them: products with maps shaped like x, and row norms."""

    def __init__(self, P, geo, B):
        self.P, self.geo = P, geo
        self.lead = (B,) + (1,) * (P.dim() - 4)  # per-sample scalars against the results' leading dims

    def dot(self, t):
        return _dot(self.P, self.geo.gather(t))

    def absdot(self, t):
        return _dot(self.P.abs(), self.geo.gather(t))

    def norm(self):
        return self.P.flatten(-3).norm(dim=-1)


def _concretize(threat, x, P, geo, lower_only=False):
    """(min, max) of P·x' over the set for every patch (max is None when lower_only); P [B, S, C, ph, pw], or
    [·, Q, R, C, ph, pw] in grouped mode (results [B, Q, R])."""
    return threat.concretize_rows(_Rows(P, geo, x.shape[0]), x, lower_only)
