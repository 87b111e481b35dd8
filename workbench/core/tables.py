"""Helpers for the tidy tables (`Result.to_frame`) engines build from their tensors."""

from __future__ import annotations

import torch


def grid_index(shape: tuple[int, ...] | torch.Size) -> tuple[torch.Tensor, ...]:
    """One flat index tensor per axis of `shape`, covering every cell in row-major order: ``grid_index((2, 3))``
    is ``([0, 0, 0, 1, 1, 1], [0, 1, 2, 0, 1, 2])``, so ``t[grid_index(t.shape)]`` is ``t.flatten()``."""
    grids = torch.meshgrid(*(torch.arange(n) for n in shape), indexing="ij")
    return tuple(g.flatten() for g in grids)
