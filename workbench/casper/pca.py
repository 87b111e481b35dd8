"""Principal components for both Casper challenges: the CNN's 200 neurons and the pair transformer's residual
stream. One class, one fit; the two challenges differ only in how a component's sign is chosen."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch

from workbench.errors import InputError


@dataclasses.dataclass(frozen=True)
class PCA:
    """Principal components of activations [n, d]: mean [d], components [k, d] (rows, orthonormal, by variance),
    explained [k] (fraction of the total variance each explains).

    `project` and `inverse` are the names the CNN challenge's code uses for `transform` and `inverse_transform`.
    """

    mean: torch.Tensor
    components: torch.Tensor
    explained: torch.Tensor

    def transform(self, x: torch.Tensor) -> torch.Tensor:
        """Coordinates [..., k] of activations x [..., d] (float64)."""
        return (x.double() - self.mean) @ self.components.T

    def inverse_transform(self, z: torch.Tensor) -> torch.Tensor:
        """The activation [..., d] at coordinates z [..., k] (mean included)."""
        return z.double() @ self.components + self.mean

    project = transform
    inverse = inverse_transform


def fit_pca(x: torch.Tensor, k: int | None = None, *, positive: Sequence[torch.Tensor] | None = None) -> PCA:
    """PCA of x [n, d] (float64 SVD), keeping the first `k` components (default: all).

    Signs: each component's largest loading is made positive; then, for each ``positive[i]`` (an activation [d]),
    component i is flipped if needed so that that vector projects on it with a positive coordinate (the CNN
    solution orients PC1 towards the clue and PC2 towards the anti-1).
    """
    if not isinstance(x, torch.Tensor) or x.ndim != 2:
        raise InputError(f"fit_pca needs activations [n, d], got {tuple(getattr(x, 'shape', ()))}")
    k = x.shape[1] if k is None else k
    positive = list(positive or [])
    if not 1 <= k <= x.shape[1] or len(positive) > k:
        raise InputError(
            f"fit_pca needs 1 <= k <= d = {x.shape[1]} and at most k positive vectors, got k={k} and "
            f"{len(positive)}"
        )
    x = x.double()
    mean = x.mean(0)
    _, s, vh = torch.linalg.svd(x - mean, full_matrices=False)
    largest = vh.abs().argmax(1)
    components = (vh * torch.sign(vh[torch.arange(len(vh)), largest])[:, None])[:k].clone()
    for i, vec in enumerate(positive):
        if float((vec.double() - mean) @ components[i]) < 0:
            components[i] = -components[i]
    return PCA(mean=mean, components=components, explained=(s**2 / (s**2).sum())[:k])
