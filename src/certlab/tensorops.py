"""Small tensor kernels shared by the threat sets and the bound engine.

``bdot(A, v)`` = Σ_n A[b, s, n]·v[b, n] → [B, S], the batched matrix–vector product that every concretisation and
every back-substituted constant is made of. torch 2.13's CPU ``bmm`` of a matrix with a column (``A @ v[..., None]``,
also what ``einsum("bsn,bn->bs")`` dispatches to) runs 3–15× slower than the same sums written as a row times the
transposed matrix (``v[:, None] @ Aᵀ``), and a multiply followed by a sum writes an A-sized temporary. With gradients
the autograd backward of either form is slow too (a column of ``Aᵀ`` times a row, or a transposed gradient that the
next elementwise op reads with strides), so ``bdot`` carries its own: ∂/∂A = g ⊗ v by broadcasting (one pass, laid
out like A) and ∂/∂v = g·A as a row times a matrix. That backward is written in differentiable torch ops, so double
backward works. Timings: docs/benchmarks.md ("Batched matrix–vector products").
"""

from __future__ import annotations

import torch


def _bdot(A, v):
    return torch.bmm(v.unsqueeze(1), A.transpose(1, 2)).squeeze(1)


class _BDot(torch.autograd.Function):
    # forward with ctx, not a separate setup_context: torch's apply then binds the arguments with inspect.signature
    # on every call, which cost more than the product itself in branch and bound (thousands of small calls)
    @staticmethod
    def forward(ctx, A, v):
        ctx.save_for_backward(A, v)
        return _bdot(A, v)

    @staticmethod
    def backward(ctx, g):
        A, v = ctx.saved_tensors
        gA = g.unsqueeze(-1) * v.unsqueeze(1) if ctx.needs_input_grad[0] else None
        gv = torch.bmm(g.unsqueeze(1), A).squeeze(1) if ctx.needs_input_grad[1] else None
        return gA, gv


def bdot(A: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Σ over the last dim of A [B, S, n] times v [B, n] (or [1, n], shared by the batch) → [B, S]."""
    if A.dim() != 3 or v.dim() != 2 or v.shape[-1] != A.shape[-1] or v.shape[0] not in (1, A.shape[0]):
        raise ValueError(f"bdot: expected A [B, S, n] and v [B, n], got {tuple(A.shape)} and {tuple(v.shape)}")
    if v.shape[0] != A.shape[0]:
        v = v.expand(A.shape[0], -1)
    if v.dtype != A.dtype:  # as A * v would promote
        dt = torch.promote_types(A.dtype, v.dtype)
        A, v = A.to(dt), v.to(dt)
    if torch.is_grad_enabled() and (A.requires_grad or v.requires_grad):
        return _BDot.apply(A, v)
    return _bdot(A, v)
