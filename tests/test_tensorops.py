"""certlab.tensorops.bdot: the batched matrix–vector product, its hand-written backward and its broadcasting."""

import pytest
import torch

from certlab.tensorops import bdot


def _ref(A, v):
    return (A * v.unsqueeze(1)).sum(-1)


@pytest.mark.parametrize("shape", [(1, 1, 1), (3, 5, 7), (4, 18, 300), (2, 0, 5)])
def test_equals_the_sum_of_products(shape):
    g = torch.Generator().manual_seed(0)
    A = torch.randn(*shape, generator=g)
    v = torch.randn(shape[0], shape[2], generator=g)
    out = bdot(A, v)
    assert out.shape == shape[:2]
    torch.testing.assert_close(out, _ref(A, v), rtol=1e-5, atol=1e-5)


def test_transposed_and_strided_operands():
    g = torch.Generator().manual_seed(1)
    A = torch.randn(3, 9, 6, generator=g).transpose(1, 2)  # [3, 6, 9], not contiguous
    v = torch.randn(9, 3, generator=g).t()  # [3, 9], not contiguous
    torch.testing.assert_close(bdot(A, v), _ref(A, v), rtol=1e-5, atol=1e-5)


def test_a_vector_shared_by_the_batch_and_promotion():
    g = torch.Generator().manual_seed(2)
    A = torch.randn(4, 3, 5, generator=g)
    v = torch.randn(1, 5, generator=g, dtype=torch.float64)
    out = bdot(A, v)
    assert out.dtype == torch.float64 and out.shape == (4, 3)
    torch.testing.assert_close(out, _ref(A.double(), v.expand(4, 5)))


def test_gradients_match_finite_differences_to_second_order():
    g = torch.Generator().manual_seed(3)
    A = torch.randn(3, 4, 6, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(3, 6, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(bdot, (A, v))
    assert torch.autograd.gradgradcheck(bdot, (A, v))
    shared = torch.randn(1, 6, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(bdot, (A, shared))


def test_gradient_of_one_operand_only():
    g = torch.Generator().manual_seed(4)
    A = torch.randn(2, 3, 4, generator=g, requires_grad=True)
    v = torch.randn(2, 4, generator=g)
    w = torch.randn(2, 3, generator=g)
    (bdot(A, v) * w).sum().backward()
    torch.testing.assert_close(A.grad, w.unsqueeze(-1) * v.unsqueeze(1))
    assert v.grad is None


@pytest.mark.parametrize("A, v", [((2, 3), (2, 3)), ((2, 3, 4), (2, 5)), ((2, 3, 4), (3, 4)), ((2, 3, 4), (2, 1, 4))])
def test_wrong_shapes_are_named(A, v):
    with pytest.raises(ValueError, match="bdot"):
        bdot(torch.zeros(A), torch.zeros(v))
