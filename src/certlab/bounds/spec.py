"""Specifications as a table of distinct rows: C[b, s] = table[index[b, s]].

A specification C [B, S, K] asks for bounds on C·f(x') per sample. Most specifications repeat a few rows over the
batch: the margin specification of label y has rows e_y − e_j, so a batch holds at most K² distinct rows whatever
its size, and a C given as [S, K] is one set of S rows for every sample. Folded into the last linear layer V, the
table becomes U rows table·V, and the radius maps that need |C[b]·V| (IBP's radii, ℓ2 row norms) become one matrix
product with |table·V| (U×n values) and a gather, instead of B×S×n values and B matrix–vector products.
Back-substitution starts from the per-sample rows (``dense``).
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class Spec(NamedTuple):
    table: torch.Tensor  # [U, K]: the distinct rows
    index: torch.Tensor  # [B, S] (long): which row each sample's s-th specification is

    def dense(self) -> torch.Tensor:
        """C as [B, S, K]."""
        return self.table[self.index]


def margin_table(y: torch.Tensor, K: int, dtype) -> Spec:
    """The margin specification of labels y (row j of sample b is e_{y_b} − e_j; row y_b is zero) as a table of the
    K² rows e_c − e_j and an index y_b·K + j."""
    table = _difference_table(K, dtype, y.device)  # row c·K + j = e_c − e_j
    index = y.long().unsqueeze(1) * K + torch.arange(K, device=y.device)
    return Spec(table, index)


def from_dense(C: torch.Tensor) -> Spec:
    """C [B, S, K] as a Spec: one table for the batch when C is a single [S, K] set expanded over it (stride 0), else
    each sample's own rows (finding repeated rows in a general C — a hash or a sort — costs more than it saves at
    the sizes where it would matter; :func:`as_differences` recognises the common case, margins written out)."""
    B, S, K = C.shape
    if B > 0 and C.stride(0) == 0:
        return Spec(C[0], torch.arange(S, device=C.device).expand(B, S))
    return Spec(C.reshape(B * S, K), torch.arange(B * S, device=C.device).view(B, S))


def as_differences(C: torch.Tensor) -> Spec | None:
    """C [B, S, K] as the K² difference rows e_i − e_j and an index, when every row of C is exactly one of them (a
    margin specification written out per sample, as most callers pass it; zero rows are e_i − e_i); else None.
    Two reductions, a gather and a comparison over C's B·S·K values. A C that needs a gradient is never replaced."""
    B, S, K = C.shape
    if K < 2 or C.requires_grad:
        return None
    index = C.argmax(-1) * K + C.argmin(-1)  # e_i − e_j has its maximum at i and its minimum at j
    table = _difference_table(K, C.dtype, C.device)
    return Spec(table, index) if torch.equal(table[index], C) else None


def _difference_table(K: int, dtype, device) -> torch.Tensor:
    """[K², K]: row i·K + j is e_i − e_j (zero when i = j)."""
    eye = torch.eye(K, device=device, dtype=dtype)
    return (eye.unsqueeze(1) - eye.unsqueeze(0)).reshape(K * K, K)
