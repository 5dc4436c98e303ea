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
