"""Layers certlab adds to torch.nn, both understood by the bound engine.

- ``Normalize(mean, std)``: x ↦ (x − mean) / std per channel (first layer of image models, so ε stays in pixel units).
- ``Residual(body, shortcut=Identity())``: x ↦ body(x) + shortcut(x).
"""

from __future__ import annotations

import torch
from torch import nn


class Normalize(nn.Module):
    """Per-channel affine normalisation (x − mean) / std. ``mean``/``std``: floats or sequences, one per channel."""

    def __init__(self, mean, std):
        super().__init__()
        mean = torch.as_tensor(mean, dtype=torch.float32).reshape(-1)
        std = torch.as_tensor(std, dtype=torch.float32).reshape(-1)
        if mean.shape != std.shape:
            raise ValueError(f"Normalize: mean has {mean.numel()} entries but std has {std.numel()}")
        if not torch.all(std > 0):
            raise ValueError("Normalize: every std must be > 0")
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)

    def _view(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if x.dim() >= 3 and t.numel() > 1:  # [N, C, ...]: per channel
            return t.view(1, -1, *([1] * (x.dim() - 2)))
        if t.numel() == 1:
            return t.view(*([1] * x.dim()))
        return t.view(1, -1)  # vectors: per feature

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self._view(self.mean, x)) / self._view(self.std, x)

    def extra_repr(self) -> str:
        return f"mean={self.mean.tolist()}, std={self.std.tolist()}"


class Residual(nn.Module):
    """body(x) + shortcut(x); both branches must give the same shape."""

    def __init__(self, body: nn.Module, shortcut: nn.Module | None = None):
        super().__init__()
        self.body = body
        self.shortcut = shortcut if shortcut is not None else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x) + self.shortcut(x)
