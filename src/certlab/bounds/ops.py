"""Affine operators: every supported layer that is not a ReLU becomes one of these.

An affine op maps a per-sample tensor z of shape ``in_shape`` to ``W z + b`` of shape ``out_shape``. Each op offers
the handful of maps the relaxations need, all batched over a leading dimension N:

- ``fwd(z) = W z + b``, ``lin(z) = W z`` (generators, differences), ``absfwd(r) = |W| r`` (interval radii),
  ``sqfwd(v) = (W∘W) v`` (squared row norms, for ℓ2);
- ``back(A) = A W`` for ``A`` of shape ``[N, S, *out_shape]`` (back-substitution) and ``bias_back(A) = A·b`` → ``[N, S]``;
- ``diagonal``: True when W is diagonal (per-channel scaling), so composing it keeps row norms exact.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from certlab.bounds.spec import as_differences
from certlab.tensorops import bdot


class AffineOp:
    in_shape: tuple
    out_shape: tuple
    diagonal = False

    def fwd(self, z):
        raise NotImplementedError

    def lin(self, z):
        raise NotImplementedError

    def absfwd(self, r):
        raise NotImplementedError

    def sqfwd(self, v):
        raise NotImplementedError

    def back(self, A):
        raise NotImplementedError

    def bias_back(self, A):
        raise NotImplementedError

    def dense(self):
        """(W [n_out, n_in], b [n_out]) as explicit matrices (small networks only: MILP/LP encodings)."""
        n_in = 1
        for s in self.in_shape:
            n_in *= s
        eye = torch.eye(n_in, device=self._device(), dtype=self._dtype()).reshape(n_in, *self.in_shape)
        W = self.lin(eye).reshape(n_in, -1).T.contiguous()
        b = self.fwd(torch.zeros(1, *self.in_shape, device=eye.device, dtype=eye.dtype)).reshape(-1)
        return W, b

    def _device(self):
        return torch.device("cpu")

    def _dtype(self):
        return torch.float32


class LinearOp(AffineOp):
    """Dense layer z ↦ W z + b (nn.Linear)."""

    def __init__(self, weight, bias):
        self.W, self.b = weight, bias
        self.in_shape, self.out_shape = (weight.shape[1],), (weight.shape[0],)

    def fwd(self, z):
        return F.linear(z, self.W, self.b)

    def lin(self, z):
        return F.linear(z, self.W)

    def absfwd(self, r):
        return F.linear(r, self.W.abs())

    def sqfwd(self, v):
        return F.linear(v, self.W * self.W)

    def back(self, A):
        return A.matmul(self.W)

    def bias_back(self, A):
        if self.b is None:
            return A.new_zeros(A.shape[:2])
        return A.matmul(self.b)

    def dense(self):
        b = self.b if self.b is not None else self.W.new_zeros(self.W.shape[0])
        return self.W, b

    def _device(self):
        return self.W.device

    def _dtype(self):
        return self.W.dtype


class SpecLinearOp(AffineOp):
    """A specification C folded into the last layer: z ↦ C[b](V z + a) = W[b] z + c[b] per sample, with V, a the
    last Linear layer (or the identity, V = None) and C held as a :class:`~certlab.bounds.spec.Spec` (a table of U
    distinct rows and an index [B, S]).

    The centre maps (``fwd``, ``lin``) apply V first and then C[b], so they cost a forward pass of the last layer
    plus K-sized products; the radius maps (``absfwd``, ``sqfwd``) need |W| and W∘W per row: with the table when
    its rows repeat over the batch (U·``TABLE_MIN_REPEAT`` ≤ B·S; a margin specification has U = K² rows for any
    batch), else per sample. Back-substitution starts from ``W`` [B, S, n] (made once, on first use)."""

    TABLE_MIN_REPEAT = 2
    # per-sample rows are checked for being margin rows (spec.as_differences) before the first radius map when the
    # per-sample radius products are at least this many values (B·S·n): below it the check costs more than it saves
    # on this CPU (measured: break-even near B = 64 for n = 256, B = 128 for n = 100, 9 rows per sample)
    DETECT_MIN_WORK = 150_000

    def __init__(self, spec, weight=None, bias=None):
        self.table, self.index = spec
        self.V, self.a = weight, bias
        K = self.table.shape[1]
        self.in_shape, self.out_shape = ((K,) if weight is None else (weight.shape[1],)), (self.index.shape[1],)
        self.tabled = self.table.shape[0] * self.TABLE_MIN_REPEAT <= self.index.numel()
        self._detect = not self.tabled and self.table.shape[0] == self.index.numel()  # per-sample rows
        self._C = self._W = self._b = self._Wt = None

    def _table_for_radii(self) -> bool:
        """True when the radius maps take the table path; per-sample rows that are all margin rows switch to it
        (once, on first use: back-substitution never needs it)."""
        if self._detect:
            self._detect = False
            if self.index.numel() * self.in_shape[0] >= self.DETECT_MIN_WORK:
                found = as_differences(self.C)
                if found is not None and found.table.shape[0] * self.TABLE_MIN_REPEAT <= self.index.numel():
                    self.table, self.index = found
                    self.tabled, self._Wt = True, None
        return self.tabled

    @property
    def C(self):  # [B, S, K]
        if self._C is None:
            self._C = self.table[self.index]
        return self._C

    @property
    def W(self):  # [B, S, n]
        if self._W is None:
            self._W = self.C if self.V is None else torch.matmul(self.C, self.V)
        return self._W

    @property
    def b(self):  # [B, S]
        if self._b is None:
            self._b = self.C @ self.a if self.a is not None else self.C.new_zeros(self.index.shape)
        return self._b

    @property
    def Wt(self):  # [U, n]: the table's rows through the last layer
        if self._Wt is None:
            self._Wt = self.table if self.V is None else self.table @ self.V
        return self._Wt

    def _last(self, z, bias=True):
        return z if self.V is None else F.linear(z, self.V, self.a if bias else None)

    def _apply_C(self, zK):  # zK [B, G, K] -> [B, G, S]: K-sized products per sample
        return torch.matmul(zK, self.C.transpose(1, 2))

    def fwd(self, z):
        return self._apply_C(self._last(z).unsqueeze(1)).squeeze(1)

    def lin(self, z):  # z: [B*G, n] where G generators per sample
        B = self.index.shape[0]
        zK = self._last(z, bias=False)
        return self._apply_C(zK.reshape(B, -1, zK.shape[-1])).reshape(-1, self.index.shape[1])

    def _pick(self, out):  # [B or 1, U] -> [B, S]
        return out.expand(self.index.shape[0], -1).gather(1, self.index)

    def absfwd(self, r):  # r: [B or 1, n] (ℓ2 row-norm bounds are shared by the batch)
        if self._table_for_radii():
            return self._pick(F.linear(r, self.Wt.abs()))
        return bdot(self.W.abs(), r)

    def sqfwd(self, v):
        if self._table_for_radii():
            return self._pick(F.linear(v, self.Wt * self.Wt))
        return bdot(self.W * self.W, v)

    def back(self, A):
        return torch.bmm(A, self.W)

    def bias_back(self, A):
        return bdot(A, self.b)


class ConvOp(AffineOp):
    """2-D convolution (nn.Conv2d with zero padding, or an AvgPool2d written as a depthwise convolution)."""

    def __init__(self, weight, bias, stride, padding, dilation, groups, in_shape, out_shape):
        self.W, self.b = weight, bias
        self.stride, self.padding, self.dilation, self.groups = stride, padding, dilation, groups
        self.in_shape, self.out_shape = tuple(in_shape), tuple(out_shape)
        kh, kw = weight.shape[2:]
        oh, ow = out_shape[1:]
        self.output_padding = (
            in_shape[1] - ((oh - 1) * stride[0] - 2 * padding[0] + dilation[0] * (kh - 1) + 1),
            in_shape[2] - ((ow - 1) * stride[1] - 2 * padding[1] + dilation[1] * (kw - 1) + 1),
        )

    def _conv(self, z, w, b=None):
        return F.conv2d(z, w, b, self.stride, self.padding, self.dilation, self.groups)

    def fwd(self, z):
        return self._conv(z, self.W, self.b)

    def lin(self, z):
        return self._conv(z, self.W)

    def absfwd(self, r):
        return self._conv(r, self.W.abs())

    def sqfwd(self, v):
        return self._conv(v, self.W * self.W)

    def back(self, A):
        """Λ ↦ Λ·W as a transposed convolution. With few input channels (e.g. the first layer of an MNIST network)
        it is computed as one batched matrix product into columns, Wᵀ [cin·kh·kw, cout] @ Λ [N·S, cout, positions]
        (Wᵀ expanded over the batch without a copy), plus a col2im fold: the same sums in another order, about 3×
        faster on CPU than oneDNN's conv_transpose2d at these shapes. (``torch.matmul`` of a matrix with a batch
        folds the batch into the rows instead, through two transposed copies of Λ: 10–20 % of a CROWN-IBP call on
        the small CNN.) On CUDA, cuDNN's transposed convolution: F.fold's backward there launches one kernel per
        row, N·S of them."""
        N, S = A.shape[:2]
        A2 = A.reshape(N * S, *self.out_shape)
        cout, cin, kh, kw = self.W.shape
        if self.groups == 1 and cin <= 2 and A.device.type == "cpu":
            Wt = self.W.reshape(cout, -1).t().unsqueeze(0).expand(N * S, -1, -1)
            cols = torch.bmm(Wt, A2.reshape(N * S, cout, -1))
            out = F.fold(cols, self.in_shape[1:], (kh, kw), self.dilation, self.padding, self.stride)
        else:
            out = F.conv_transpose2d(A2, self.W, None, self.stride, self.padding, self.output_padding, self.groups,
                                     self.dilation)
        return out.reshape(N, S, *self.in_shape)

    def bias_back(self, A):
        if self.b is None:
            return A.new_zeros(A.shape[:2])
        return torch.einsum("nschw,c->ns", A, self.b)

    def _device(self):
        return self.W.device

    def _dtype(self):
        return self.W.dtype


class ChannelAffineOp(AffineOp):
    """Per-channel (dim 1) scaling and shift z ↦ s·z + t: BatchNorm (affine in eval or with fixed batch statistics)
    and certlab.nn.Normalize."""

    diagonal = True

    def __init__(self, scale, shift, shape):
        self.in_shape = self.out_shape = tuple(shape)
        view = (-1,) + (1,) * (len(shape) - 1)
        one = (1,) * len(shape)
        self.s = scale.reshape(one if scale.numel() == 1 else view)
        self.t = shift.reshape(one if shift.numel() == 1 else view)

    def fwd(self, z):
        return z * self.s + self.t

    def lin(self, z):
        return z * self.s

    def absfwd(self, r):
        return r * self.s.abs()

    def sqfwd(self, v):
        return v * (self.s * self.s)

    def back(self, A):
        return A * self.s

    def bias_back(self, A):
        return (A * self.t).flatten(2).sum(-1)

    def _device(self):
        return self.s.device

    def _dtype(self):
        return self.s.dtype


class ReshapeOp(AffineOp):
    """nn.Flatten (and any pure reshape): W is a permutation-free identity."""

    diagonal = True

    def __init__(self, in_shape, out_shape):
        self.in_shape, self.out_shape = tuple(in_shape), tuple(out_shape)

    def fwd(self, z):
        return z.reshape(z.shape[0], *self.out_shape)

    lin = fwd
    absfwd = fwd
    sqfwd = fwd

    def back(self, A):
        return A.reshape(*A.shape[:2], *self.in_shape)

    def bias_back(self, A):
        return A.new_zeros(A.shape[:2])
