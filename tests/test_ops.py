"""The affine operators' backward maps are exact transposes of their forward maps (Λ·W computed two ways)."""

import pytest
import torch

from certlab.bounds.ops import ConvOp


@pytest.mark.parametrize("cin", [1, 2, 3])
@pytest.mark.parametrize("stride,padding,dilation", [(1, 0, 1), (2, 1, 1), (2, 2, 2), (3, 1, 1)])
def test_conv_back_is_the_transpose_of_forward(cin, stride, padding, dilation):
    g = torch.Generator().manual_seed(cin * 100 + stride * 10 + padding)
    conv = torch.nn.Conv2d(cin, 5, 3, stride=stride, padding=padding, dilation=dilation)
    in_shape = (cin, 11, 10)
    x = torch.randn(1, *in_shape, generator=g, requires_grad=True)
    out = conv(x)
    op = ConvOp(conv.weight.detach(), None, conv.stride, conv.padding, conv.dilation, 1, in_shape, out.shape[1:])
    A = torch.randn(2, 3, *out.shape[1:], generator=g)  # [B, S, *out]
    got = op.back(A)
    assert got.shape == (2, 3, *in_shape)
    for b in range(2):
        for s in range(3):
            (ref,) = torch.autograd.grad(out, x, A[b, s].unsqueeze(0), retain_graph=True)
            torch.testing.assert_close(got[b, s], ref[0], rtol=1e-5, atol=1e-5)


# -- folded specifications (bounds.spec / SpecLinearOp) ------------------------------------------------------------
from certlab.bounds import spec as spec_mod  # noqa: E402
from certlab.bounds.core import margin_spec  # noqa: E402
from certlab.bounds.ops import SpecLinearOp  # noqa: E402


def test_margin_table_is_the_margin_specification():
    y = torch.tensor([3, 0, 9, 3, 5])
    s = spec_mod.margin_table(y, 10, torch.float32)
    assert s.table.shape == (100, 10) and s.index.shape == (5, 10)
    assert torch.equal(s.dense(), margin_spec(y, 10, torch.float32))


def test_from_dense_keeps_rows_and_shares_a_broadcast_set():
    g = torch.Generator().manual_seed(1)
    C = torch.randn(4, 3, 6, generator=g)
    s = spec_mod.from_dense(C)
    assert torch.equal(s.dense(), C)
    shared = torch.randn(3, 6, generator=g).unsqueeze(0).expand(4, -1, -1)
    s = spec_mod.from_dense(shared)
    assert s.table.shape == (3, 6) and torch.equal(s.dense(), shared)


def test_margin_rows_written_out_are_recognised_exactly(monkeypatch):
    """A margin specification written out per sample is recognised as the K² difference rows and an index, and the
    folded op then takes the table path for radii with the same results; any row that is not exactly some
    e_i − e_j (or zero) keeps the per-sample rows; a C that needs a gradient is left as it is."""
    g = torch.Generator().manual_seed(4)
    B, K, n = 24, 10, 7  # 216 rows: enough for the 100-row table to be used
    y = torch.randint(0, K, (B,), generator=g)
    C = margin_spec(y, K, torch.float32)
    keep = torch.ones(B, K, dtype=torch.bool)
    keep[torch.arange(B), y] = False
    C9 = C[keep].reshape(B, K - 1, K)  # without the zero rows, as benchmarks and auto_LiRPA users pass it
    for dense in (C, C9):
        s = spec_mod.as_differences(dense)
        assert s.table.shape == (K * K, K) and torch.equal(s.dense(), dense)
    for bad in (2 * C9, C9 + 1e-7 * torch.randn(C9.shape, generator=g), torch.eye(K)[y].unsqueeze(1).repeat(1, 9, 1)):
        assert spec_mod.as_differences(bad) is None
    assert spec_mod.as_differences(C9.clone().requires_grad_()) is None
    assert spec_mod.from_dense(C9).table.shape == (B * (K - 1), K)  # from_dense itself never searches

    V, a, r = torch.randn(K, n, generator=g), torch.randn(K, generator=g), torch.rand(B, n, generator=g)
    want = torch.einsum("bsn,bn->bs", (C9 @ V).abs(), r)
    for work, tabled in ((0, True), (10**9, False)):
        monkeypatch.setattr(SpecLinearOp, "DETECT_MIN_WORK", work)
        op = SpecLinearOp(spec_mod.from_dense(C9), V, a)
        assert not op.tabled
        torch.testing.assert_close(op.absfwd(r), want)
        assert op.tabled == tabled and op.table.shape[0] == (K * K if tabled else B * (K - 1))
        torch.testing.assert_close(op.sqfwd(r), torch.einsum("bsn,bn->bs", (C9 @ V) ** 2, r))
        torch.testing.assert_close(op.back(torch.ones(B, 1, K - 1)), torch.ones(B, 1, K - 1) @ (C9 @ V))


@pytest.mark.parametrize("tabled", [True, False])
@pytest.mark.parametrize("with_layer", [True, False])
def test_spec_linear_op_equals_per_sample_maps(tabled, with_layer, monkeypatch):
    """Every map of the folded specification equals the explicit per-sample W[b] = C[b]·V, c[b] = C[b]·a, on the
    table path (few distinct rows) and on the per-sample path."""
    monkeypatch.setattr(SpecLinearOp, "TABLE_MIN_REPEAT", 0 if tabled else 10**6)
    g = torch.Generator().manual_seed(2 + tabled + 2 * with_layer)
    B, K, n, G = 6, 5, 7, 3
    y = torch.randint(0, K, (B,), generator=g)
    s = spec_mod.margin_table(y, K, torch.float32)
    V = torch.randn(K, n, generator=g) if with_layer else None
    a = torch.randn(K, generator=g) if with_layer else None
    op = SpecLinearOp(s, V, a)
    assert op.tabled == tabled
    C = margin_spec(y, K, torch.float32)
    W = C @ V if with_layer else C
    c = C @ a if with_layer else torch.zeros(B, K)
    m = W.shape[-1]
    z = torch.randn(B, m, generator=g)
    r = torch.rand(B, m, generator=g)
    zg = torch.randn(B * G, m, generator=g)
    A = torch.randn(B, 2, K, generator=g)
    close = lambda u, v: torch.testing.assert_close(u, v, rtol=1e-5, atol=1e-5)  # noqa: E731
    close(op.fwd(z), torch.einsum("bsn,bn->bs", W, z) + c)
    close(op.lin(zg), torch.einsum("bsn,bgn->bgs", W, zg.view(B, G, m)).reshape(B * G, K))
    close(op.absfwd(r), torch.einsum("bsn,bn->bs", W.abs(), r))
    close(op.absfwd(r[:1]), torch.einsum("bsn,n->bs", W.abs(), r[0]))  # radii shared by the batch
    close(op.sqfwd(r), torch.einsum("bsn,bn->bs", W * W, r))
    close(op.sqfwd(r[:1]), torch.einsum("bsn,n->bs", W * W, r[0]))
    close(op.back(A), torch.bmm(A, W))
    close(op.bias_back(A), torch.einsum("bts,bs->bt", A, c))


@pytest.mark.parametrize("cin", [1, 2])
def test_conv_back_columns_path_has_the_transposes_gradients(cin):
    """The few-input-channel path (batched product into columns + fold) differentiates like conv_transpose2d, with
    respect to both Λ and the weights (certified training backpropagates through it)."""
    g = torch.Generator().manual_seed(7 + cin)
    conv = torch.nn.Conv2d(cin, 4, 4, stride=2, padding=1)
    in_shape = (cin, 12, 10)
    out_shape = conv(torch.zeros(1, *in_shape)).shape[1:]
    W = conv.weight.detach().clone().requires_grad_(True)
    A = torch.randn(3, 2, *out_shape, generator=g, requires_grad=True)
    G = torch.randn(3, 2, *in_shape, generator=g)
    op = ConvOp(W, None, conv.stride, conv.padding, conv.dilation, 1, in_shape, out_shape)
    got = torch.autograd.grad((op.back(A) * G).sum(), (A, W))
    ref_out = torch.nn.functional.conv_transpose2d(A.reshape(6, *out_shape), W, None, conv.stride, conv.padding,
                                                   op.output_padding, 1, conv.dilation)
    ref = torch.autograd.grad((ref_out.reshape(3, 2, *in_shape) * G).sum(), (A, W))
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_patch_rows_from_the_strided_view_equal_f_unfold():
    """patches._unfold_rows reads patches as a strided view (no-grad, or on a GPU) and through F.unfold (CPU tensors
    that need gradients): the same rows, and the view's gradient is F.unfold's."""
    import torch.nn.functional as F

    from certlab.bounds.patches import _unfold_rows

    g = torch.Generator().manual_seed(0)
    cases = (((3, 5, 11, 9), (4, 3), (2, 1)), ((1, 2, 8, 8), (3, 3), (3, 3)), ((2, 1, 6, 7), (6, 7), (1, 1)))
    for shape, k, st in cases:
        m = torch.randn(shape, generator=g, dtype=torch.float64)
        ref = F.unfold(m, k, stride=st).transpose(1, 2).reshape(-1, shape[1] * k[0] * k[1])
        assert torch.equal(_unfold_rows(m, *k, st), ref)  # no gradients: the view
        w = torch.randn(ref.shape, generator=g, dtype=torch.float64)
        grads = []
        for view in (True, False):
            mg = m.clone().requires_grad_()
            rows = _unfold_rows(mg, *k, st, view=view)
            assert torch.equal(rows, ref)
            (rows * w).sum().backward()
            grads.append(mg.grad)
        torch.testing.assert_close(grads[0], grads[1], rtol=1e-12, atol=1e-12)
