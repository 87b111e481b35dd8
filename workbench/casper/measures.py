"""Measures shared by both Casper challenges."""

from __future__ import annotations

import torch

from workbench.errors import InputError


def agreement(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor | None = None) -> float:
    """Fraction of places where two label tensors of the same shape agree (optionally only where a boolean
    `mask` of that shape holds): e.g. a rule's labels [N] against the CNN's, or two label maps [A, B]."""
    if a.shape != b.shape:
        raise InputError(f"label tensors differ in shape: {tuple(a.shape)} vs {tuple(b.shape)}")
    same = a.long() == b.long()
    if mask is not None:
        if mask.shape != a.shape or mask.dtype != torch.bool:
            raise InputError(
                f"the mask must be a bool tensor shaped like the labels {tuple(a.shape)}, got "
                f"{mask.dtype} {tuple(mask.shape)}"
            )
        same = same[mask]
    return same.double().mean().item()
