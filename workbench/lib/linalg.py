"""The linear algebra of LIB, as plain functions on tensors (float64 throughout).

Row-vector convention: an activation is a row f [d] whose last coordinate is the constant 1. A basis is a matrix
C [d, k] whose columns are directions: the coordinates are f_hat = f @ C, and f is recovered (on the kept
subspace) as f_hat @ C_pinv with C_pinv [k, d]. The centring matrix S [d, d] maps f to f - mu on every
coordinate but the constant one (f @ S = f - mu with the last entry kept at 1), so ablated directions go to their
mean, not to zero.
"""

from __future__ import annotations

import numpy as np
import torch

from workbench.errors import InputError

CONST_THRESHOLD = 1e-6
"""An eigenvector is the constant direction if its constant component and its eigenvalue both exceed this."""

INTEGRATIONS = ("gradient", "trapezoidal", "gauss-legendre")


def eigh_desc(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues (absolute values, descending) and eigenvectors (columns) of a symmetric matrix, in float64."""
    values, vectors = torch.linalg.eigh(matrix.to(torch.float64))
    values = values.abs()
    order = torch.argsort(values, descending=True)
    return values[order], vectors[:, order]


def const_first(values: torch.Tensor, vectors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Move the constant direction (the one eigenvector with a constant component and a non-zero eigenvalue)
    to index 0."""
    is_const = (vectors[-1].abs() > CONST_THRESHOLD) & (values > CONST_THRESHOLD)
    if int(is_const.sum()) != 1:
        raise InputError(
            f"expected exactly one constant direction in the centred Gram matrix, found {int(is_const.sum())}; "
            "the node layer's last coordinate must be the constant 1"
        )
    i = int(is_const.nonzero()[0, 0])
    order = torch.tensor([i] + [j for j in range(len(values)) if j != i])
    return values[order], vectors[:, order]


def centring(mean: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(S, S_inv) [d, d] for a mean [d] whose last entry is the constant: f @ S = f - mean (constant kept)."""
    d = len(mean)
    S = torch.eye(d, dtype=torch.float64)
    S[-1, :-1] = -mean[:-1]
    S_inv = torch.eye(d, dtype=torch.float64)
    S_inv[-1, :-1] = mean[:-1]
    return S, S_inv


def integration_points(method: str, n_intervals: int) -> list[tuple[float, float]]:
    """(alpha, weight) pairs for the path integral over alpha * f, as the authors' code defines them.

    gradient: alpha = 1 only (n_intervals must be 0). trapezoidal: n_intervals + 1 equally spaced points in
    [eps, 1 - eps] with eps = 1e-3 / (n_intervals + 1), end points half-weighted (n_intervals = 0 gives alpha
    = 0.5). gauss-legendre: n_intervals + 1 Gauss-Legendre points on [0, 1].
    """
    if method not in INTEGRATIONS:
        raise InputError(f"integration must be one of {INTEGRATIONS}, got {method!r}")
    if isinstance(n_intervals, bool) or not isinstance(n_intervals, int) or n_intervals < 0:
        raise InputError(f"n_intervals must be a whole number >= 0, got {n_intervals!r}")
    if method == "gradient":
        if n_intervals != 0:
            raise InputError("integration='gradient' evaluates at alpha = 1 only; leave n_intervals at 0")
        return [(1.0, 1.0)]
    if method == "gauss-legendre":
        x, w = np.polynomial.legendre.leggauss(n_intervals + 1)
        return [(float((xi + 1) / 2), float(wi / 2)) for xi, wi in zip(x, w)]
    if n_intervals == 0:
        return [(0.5, 1.0)]
    eps = 1e-3 / (n_intervals + 1)
    alphas = np.linspace(eps, 1 - eps, n_intervals + 1)
    weights = np.full(n_intervals + 1, 1.0 / n_intervals)
    weights[0] /= 2
    weights[-1] /= 2
    return [(float(a), float(w)) for a, w in zip(alphas, weights)]


def smallest_holding(weights: torch.Tensor, fraction: float) -> int:
    """How many of the largest entries hold `fraction` of the total (at least 1; 0 for an all-zero tensor)."""
    flat = weights.flatten().to(torch.float64).sort(descending=True).values
    total = flat.sum()
    if total <= 0:
        return 0
    cum = flat.cumsum(0)
    return int(min(int((cum < fraction * total).sum()) + 1, len(flat)))
